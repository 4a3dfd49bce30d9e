"""Print a Markdown table of a sweep's results: one row per job, from each run dir's metrics.json.

    python scripts/precision_table.py logs/multirun/<timestamp>

The first columns are the overrides that differ between the jobs (for a precision sweep: `precision`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def overrides_of(job: Path) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) if "=" in item)
    return {key: value.strip("'\"") for key, value in pairs}  # precision='32' is saved quoted


def results(job: Path) -> list[str]:
    metrics = json.loads((job / "metrics.json").read_text()) if (job / "metrics.json").is_file() else {"error": "no metrics.json"}
    if "error" in metrics:
        return ["-", "-", "-", "-", "-", "stopped: " + metrics["error"].split(". ")[0]]
    skipped = metrics.get("train/skipped_steps")
    scale = metrics.get("train/loss_scale")
    return [f"{100 * metrics['test/acc']:.2f}", f"{metrics['train/loss_epoch']:.4f}", *memory(metrics),
            "-" if skipped is None else str(int(skipped)), "" if scale is None else f"loss scale ended at {scale:g}"]


def memory(metrics: dict) -> list[str]:
    """Bytes a parameter (weights, gradients, optimizer state and the rest) and the optimizer's part, measured."""
    return [f"{metrics[name]:.1f}" if name in metrics else "-" for name in ("memory/bytes_per_param", "memory/optimizer_bytes_per_param")]


def table(sweep: Path) -> str:
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))  # 0_precision=32, 1_...
    overrides = [overrides_of(job) for job in jobs]
    keys = [key for key in dict.fromkeys(k for o in overrides for k in o) if len({o.get(key) for o in overrides}) > 1]
    columns = ["test acc (%)", "final train loss", "bytes/param", "of which optimizer", "skipped steps", "note"]
    lines = ["| " + " | ".join([*keys, *columns]) + " |", "|" + "---|" * (len(keys) + len(columns))]
    for job, job_overrides in zip(jobs, overrides, strict=True):
        lines.append("| " + " | ".join([*(f"`{job_overrides.get(key, '')}`" for key in keys), *results(job)]) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/precision_table.py logs/multirun/<timestamp>")
    print(table(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
