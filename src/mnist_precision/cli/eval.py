"""`mnist-eval ckpt_path=<file|run dir>`: test a checkpoint with the config saved by the run that wrote it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.console import setup_job_console
from mnist_precision.kit.errors import explain_checkpoint_mismatch, log_job_error, report_user_errors
from mnist_precision.kit.runs import eval_argv, suggest_close_matches
from mnist_precision.kit.schema import load_schemas

LOG = logging.getLogger("mnist_precision")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from mnist_precision.kit.build import build_run  # torch and Lightning load once the command line is parsed

    run = build_run(cfg)
    with explain_checkpoint_mismatch(cfg.ckpt_path):
        run.test(cfg.ckpt_path, verbose=False)
    return {name: float(value) for name, value in run.trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_job_console()
    try:
        metrics = evaluate(cfg)
    except Exception as error:
        raise SystemExit(log_job_error(error)) from None
    shown = "  ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name.startswith("test/"))
    LOG.info(f"{shown}\ncheckpoint: {cfg.ckpt_path}\nrun dir: {run_dir}")


def main() -> None:
    with report_user_errors():
        load_schemas()
        sys.argv[1:] = eval_argv(sys.argv[1:])
    with suggest_close_matches(sys.argv[1:], "eval"):
        _hydra_main()


if __name__ == "__main__":
    main()
