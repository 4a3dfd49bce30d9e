"""Print a Markdown table of a sweep's results: one row per job, from each run dir's metrics.json.

    python scripts/precision_table.py logs/multirun/<timestamp>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def row(job: Path) -> list[str]:
    overrides = " ".join(yaml.safe_load((job / ".hydra/overrides.yaml").read_text()))
    metrics = json.loads((job / "metrics.json").read_text()) if (job / "metrics.json").is_file() else {"error": "no metrics.json"}
    if "error" in metrics:
        return [overrides, "-", "-", "-", "stopped: " + metrics["error"].split(". ")[0]]
    skipped = metrics.get("precision/skipped_steps")
    return [overrides, f"{100 * metrics['test/acc']:.2f}", f"{metrics['train/loss_epoch']:.4f}",
            "-" if skipped is None else str(int(skipped)), ""]


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/precision_table.py logs/multirun/<timestamp>")
    jobs = sorted((p for p in Path(sys.argv[1]).iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    print("| run | test acc (%) | final train loss | skipped steps | note |")
    print("|---|---|---|---|---|")
    for job in jobs:
        print("| " + " | ".join(row(job)) + " |")


if __name__ == "__main__":
    main()
