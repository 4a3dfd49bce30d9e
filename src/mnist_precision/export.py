"""`mnist-export ckpt_path=<file.ckpt>`: the trained network as `torch.export` programs in FP32, FP16, BF16 and INT8.

Each program takes float images in [0, 1] shaped (N, 1, 28, 28), standardises them itself and returns FP32 logits,
so it runs with `torch.export.load(file).module()(images)` in a process that never imports this package (the int8
program after `import torchao`, which registers the quantize/dequantize ops its graph calls). They go to
`<run>/export/` with `export.json` and `export.md`: file size, test accuracy on the full 10k test set through the
saved file, and latency at batch 1 and 1000 on this machine. Checkpoints of `16-master`/`bf16-master` export from
their FP32 masters.

INT8 is PT2E (torchao's `prepare_pt2e`/`convert_pt2e` with `X86InductorQuantizer`): the export graph is annotated,
calibrated on training images, and its weights stored as int8 (the deprecated eager/FX `torch.ao.quantization`
paths are not used). Run eagerly, its quantize/dequantize ops are reference code; `torch.compile` (Inductor) fuses
them into int8 kernels, so `export.compile=true` also reports compiled latency.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn

from mnist_precision.config import CONF_DIR
from mnist_precision.console import setup_job_console
from mnist_precision.data import MNIST_MEAN, MNIST_STD, read_split
from mnist_precision.errors import UserError, log_job_error, report_user_errors
from mnist_precision.runs import asks_hydra_only, eval_argv, override_value

LOG = logging.getLogger("mnist_precision")
FLOAT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = (*FLOAT_TYPES, "int8")


class Deployable(nn.Module):
    """Images in [0, 1], (N, 1, 28, 28), any float dtype -> FP32 logits, with the training standardisation inside."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, normalize: bool):
        super().__init__()
        self.net, self.dtype, self.normalize = net.to(dtype).eval(), dtype, normalize

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        return self.net(x.to(self.dtype)).float()


def trained_net(cfg: DictConfig) -> nn.Module:
    """The configured network with the checkpoint's weights, in FP32 (the masters, for a master-copy checkpoint)."""
    from hydra.utils import instantiate

    from mnist_precision.master_precision import fp32_state_dict

    checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
    weights = {name.removeprefix("net."): value for name, value in fp32_state_dict(checkpoint).items() if name.startswith("net.")}
    net = instantiate(cfg.model)
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:
        raise UserError(f"{cfg.ckpt_path} was written for a different model than the one configured: {str(error).splitlines()[1].strip()}") from None
    return net.float().eval()


def export_program(net: nn.Module, fmt: str, normalize: bool, calibration: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = (calibration[:2],)
    if fmt in FLOAT_TYPES:
        return torch.export.export(Deployable(net, FLOAT_TYPES[fmt], normalize), example, dynamic_shapes=({0: batch},))
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    graph = torch.export.export(Deployable(net, torch.float32, normalize), example, dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    with torch.no_grad():
        for images in calibration.split(100):
            prepared(images)  # observers record each activation's range
    return torch.export.export(without_unused_weights(convert_pt2e(prepared)), example, dynamic_shapes=({0: batch},))


def without_unused_weights(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e adds the int8 weights as new constants and leaves the FP32 ones attached, unused: drop them, or the
    saved file would carry both."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attribute)
    return graph


def without_debug_metadata(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drop what only debugging reads: each node's source stack trace, provenance and module path (a third of a small
    int8 file), and the example input kept for re-tracing. `.module()` and the saved weights do not need them."""
    for node in program.graph.nodes:
        for key in ("stack_trace", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn"):
            node.meta.pop(key, None)
    program.example_inputs = None
    return program


def test_accuracy(run: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([run(chunk).argmax(dim=1) for chunk in images.split(1000)])
    return (predictions == labels).float().mean().item()


def latency_ms(run: Callable[[Tensor], Tensor], images: Tensor, runs: int) -> float:
    """Median milliseconds of one call, over `runs` calls after 3 warm-up calls."""
    times = []
    with torch.no_grad():
        for i in range(runs + 3):
            start = time.perf_counter()
            run(images)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_formats(formats: list[str]) -> None:
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise UserError(f"export.formats: unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}.")
    if "int8" in formats and platform.machine().lower() not in ("x86_64", "amd64"):
        raise UserError(f"export.formats: int8 uses the x86 quantizer (X86InductorQuantizer) and this machine is {platform.machine()}; "
                        "leave int8 out here.")


def export(cfg: DictConfig, out_dir: Path) -> dict[str, dict[str, float | str]]:
    formats = list(cfg.export.formats)
    check_formats(formats)
    net = trained_net(cfg)
    train_images, _ = read_split(Path(cfg.data.data_dir), train=True)
    test_images, test_labels = read_split(Path(cfg.data.data_dir), train=False)
    as_input = lambda images: images.float().div(255).unsqueeze(1)  # noqa: E731  (uint8 (N, 28, 28) -> the programs' input)
    calibration = as_input(train_images[: cfg.export.calibration_images])
    test_inputs = as_input(test_images)
    results: dict[str, dict[str, float | str]] = {}
    for fmt in formats:
        path = out_dir / f"{fmt}.pt2"
        torch.export.save(without_debug_metadata(export_program(net, fmt, cfg.data.normalize, calibration)), path)
        program = torch.export.load(path).module()  # everything below runs what was saved
        row: dict[str, float | str] = {"file": path.name, "bytes": path.stat().st_size,
                                       "test_acc": test_accuracy(program, test_inputs, test_labels)}
        for batch in (1, 1000):
            row[f"latency_ms_batch_{batch}"] = latency_ms(program, test_inputs[:batch], cfg.export.latency_runs)
        if cfg.export.compile:
            compiled = torch.compile(program)
            for batch in (1, 1000):
                row[f"compiled_latency_ms_batch_{batch}"] = latency_ms(compiled, test_inputs[:batch], cfg.export.latency_runs)
        results[fmt] = row
    (out_dir / "export.json").write_text(json.dumps(results, indent=2))
    (out_dir / "export.md").write_text(markdown_table(results))
    return results


def markdown_table(results: dict[str, dict[str, float | str]]) -> str:
    compiled = any("compiled_latency_ms_batch_1" in row for row in results.values())
    header = "| format | file | size (KB) | test acc (%) | ms, batch 1 | ms, batch 1000 |" + (
        " compiled ms, batch 1 | compiled ms, batch 1000 |" if compiled else "")
    lines = [header, "|" + "---|" * (8 if compiled else 6)]
    for fmt, row in results.items():
        cells = [fmt, f"`{row['file']}`", f"{int(row['bytes']) / 1024:,.0f}", f"{100 * float(row['test_acc']):.2f}",
                 f"{row['latency_ms_batch_1']:.3f}", f"{row['latency_ms_batch_1000']:.1f}"]
        if compiled:
            cells += [f"{row['compiled_latency_ms_batch_1']:.3f}", f"{row['compiled_latency_ms_batch_1000']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_job_console()
    try:
        results = export(cfg, out_dir)
    except Exception as error:
        raise SystemExit(log_job_error(error)) from None
    LOG.info(f"{markdown_table(results)}exported to {out_dir}")  # on the console and in export.log


def export_argv(argv: list[str]) -> list[str]:
    """The run's own overrides (as mnist-eval replays them), writing into <run>/export/."""
    argv = eval_argv(argv)
    if asks_hydra_only(argv):
        return argv
    ckpt = Path(override_value(argv, "ckpt_path"))  # checked, and made absolute, by eval_argv
    return [*argv, f"hydra.run.dir='{ckpt.parent.parent / 'export'}'"]


def main() -> None:
    with report_user_errors():
        sys.argv[1:] = export_argv(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
