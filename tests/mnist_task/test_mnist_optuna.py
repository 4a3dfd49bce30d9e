"""hparams_search=mnist_optuna: Hydra's Optuna sweeper maximises the best val/acc (never the test accuracy)."""

from __future__ import annotations

import json

import pytest
import yaml
from support import sweep_jobs

from mnist_precision.cli import train as train_cli


@pytest.mark.slow  # about 4 s: a 3-trial Optuna sweep
def test_the_optuna_search_maximises_validation_accuracy(run_main, tmp_path):
    result = run_main(train_cli.main, "hparams_search=mnist_optuna", "hydra.sweeper.n_trials=3", "trainer.max_epochs=1")
    assert result.code == 0, result.stderr
    sweep = next((tmp_path / "logs/multirun").iterdir())
    jobs = [json.loads((job / "metrics.json").read_text()) for job in sweep_jobs(sweep)]
    assert len(jobs) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(job["val/acc_best"] for job in jobs)
    # A key set on the command line is fixed, not searched: the test's fast settings set data.batch_size.
    assert set(best["best_params"]) == {"optimizer.lr", "net.hidden"}
