"""`debug=profiler`: Lightning's PyTorchProfiler over a few steps, plus the per-layer table it does not write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.profilers import PyTorchProfiler

MODULE_PREFIX = "[pl][module]"  # what Lightning's `record_module_names` calls each module's forward in the profile


class LayerProfiler(PyTorchProfiler):
    """Lightning's PyTorchProfiler (module names recorded, memory profiled, a trace for Perfetto / chrome://tracing, its
    op table in `<stage>-profile.txt`) that also writes `layers-<stage>.md`: one row per module of the model.

    The rows come from the profiler's own records of each module's forward (Lightning's `record_module_names`), so
    they hold forward time and memory only: autograd runs the backward outside the modules' hooks (the trace shows it).
    """

    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        self.stage_name = getattr(stage, "value", stage)  # TrainerFn.FITTING -> "fit"
        super().setup(stage, local_rank, log_dir)

    def summary(self) -> str:
        report = super().summary()  # also collects function_events
        if self.function_events and self.dirpath is not None and self.local_rank in (None, 0):
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            (Path(self.dirpath) / f"layers-{self.stage_name}.md").write_text(layer_table(self.function_events.key_averages()))
        return report


def layer_table(averages: Any) -> str:
    """A Markdown table of the profiled modules, slowest first: type, name, calls, total and self CPU time, memory."""
    rows = []
    for event in averages:
        if not event.key.startswith(MODULE_PREFIX):
            continue
        path, _, name = event.key[len(MODULE_PREFIX):].partition(": ")
        rows.append((event.cpu_time_total, path.rsplit(".", 1)[-1], name, event))
    rows.sort(key=lambda row: -row[0])
    gpu = any(getattr(event, "device_time_total", 0) for *_, event in rows)
    header = "| module | type | calls | CPU total (ms) | CPU self (ms) | CPU memory (MB) |" + (" GPU total (ms) |" if gpu else "")
    lines = [header, "|" + "---|" * (7 if gpu else 6)]
    for _, kind, name, event in rows:
        cells = [f"`{name}`", kind, str(event.count), f"{event.cpu_time_total / 1e3:.3f}", f"{event.self_cpu_time_total / 1e3:.3f}",
                 f"{event.cpu_memory_usage / 2**20:.2f}"]
        if gpu:
            cells.append(f"{event.device_time_total / 1e3:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
