"""Beyond one process: nodes started by hand, SLURM's requeue, and Hydra's submitit launcher (docs/scaling.md).

No cluster here: nodes are processes of this machine, SLURM is its environment variables plus a fake `scontrol` on
PATH, and submitit runs its jobs as local processes (hydra/launcher=submitit_local, the SLURM launcher's twin).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from support import TESTS, Task, only_run_dir, quadrants, scalar_steps, sweep_jobs, task_command
from test_reliability import assert_same_precision_state

from mnist_precision.cli import train as train_cli
from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.launch import SLURM_JOB_FILE

CLUSTER_VARIABLES = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "RANK", "SLURM_JOB_ID", "SLURM_NTASKS",
                     "SLURM_PROCID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def task() -> Task:
    """A SLURM requeue resumes mid-epoch: the quadrants task with its stateful loader."""
    return quadrants("stateful")


def launch(tmp_path: Path, task: Task, *overrides: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = (),
           runner: list[str] | None = None) -> subprocess.Popen:
    """`python -m mnist_precision.cli.train` in the background, outside any cluster unless `env` says otherwise.

    One thread per process: 1 node x 2 processes and 2 nodes x 1 process must do the same arithmetic, and torch
    picks its thread count from the processes per node (Lightning sets it for the processes it starts).
    """
    clean = {key: value for key, value in os.environ.items() if key not in CLUSTER_VARIABLES}
    env = {**clean, **task.env, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), task.env.get("PYTHONPATH", "")]), **(env or {})}
    argv = task_command(task, tmp_path / "logs", *flags, *overrides, runner=runner)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    return subprocess.Popen(argv, cwd=tmp_path / "elsewhere", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow  # about 20 s: three DDP processes
def test_two_nodes_of_one_process_train_exactly_as_one_node_of_two(tmp_path, task):
    one_node = tmp_path / "one_node"
    code, _, err = finish(launch(tmp_path, task, "trainer=ddp_cpu", "trainer.max_epochs=2", f"hydra.run.dir={one_node}"))
    assert code == 0, err[-2000:]

    two_nodes = tmp_path / "two_nodes"  # every node is given the run's directory, as a shared filesystem would hold it
    port = str(free_port())
    nodes = [launch(tmp_path, task, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=2",
                    f"hydra.run.dir={two_nodes}", env={"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in (0, 1)]
    (code_0, out_0, err_0), (code_1, out_1, err_1) = [finish(node) for node in nodes]
    assert code_0 == 0 and code_1 == 0, err_0[-2000:] + err_1[-2000:]

    assert_same_weights(weights(one_node), weights(two_nodes))
    assert torch.load(two_nodes / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 8  # 512 images / 2 ranks / 64, 2 epochs
    assert "test/acc=" in out_0 and "test/acc=" not in out_1  # the first node alone reports
    assert (two_nodes / "train_rank_1.0.log").is_file()  # node 1 logs beside node 0's train.log, into its own file
    assert "rank 1.0 of the job" in (two_nodes / "train_rank_1.0.log").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 0" in (two_nodes / "train.log").read_text()
    assert not (tmp_path / "logs").exists()  # and no node made a directory of its own


@pytest.mark.slow  # about 10 s
def test_torchrun_starts_the_ranks_and_they_share_one_run_dir(tmp_path, task):
    run = tmp_path / "run"
    torchrun = launch(tmp_path, task, "trainer=ddp_cpu", "trainer.max_epochs=1", f"hydra.run.dir={run}",
                      runner=["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())])
    code, out, err = finish(torchrun)
    assert code == 0, err[-2000:]
    assert out.count("test/acc=") == 1 and (run / "metrics.json").is_file()
    assert "rank 1 of the job" in (run / "train_rank_1.log").read_text()
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # about 10 s: the wait is cut to 6 s
def test_a_node_whose_peers_never_come_stops_after_the_timeout_with_one_message(tmp_path, task):
    node = launch(tmp_path, task, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy.timeout.minutes=0.1",
                  env={"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    code, _, err = finish(node, timeout=120)
    assert code == 1
    assert "error: the 2 DDP processes (trainer.num_nodes=2 x 1 devices) did not all meet at 127.0.0.1:" in err
    assert "1/2 clients joined" in err and "each with its own NODE_RANK (0 to 1)" in err and "Traceback" not in err
    assert not list((tmp_path / "logs").glob("train/*"))  # nothing trained, nothing left behind


def test_the_slurm_launcher_where_sbatch_does_not_exist_is_refused(run_main, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no_sbatch_here"))
    result = run_main(train_cli.main, "-m", "hydra/launcher=slurm", "precision=32,bf16-mixed")
    assert result.code == 1
    assert "hydra/launcher=slurm submits SLURM jobs with sbatch, which is not on this machine's PATH" in result.stderr
    assert "hydra/launcher=submitit_local" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_the_slurm_launcher_sizes_the_job_from_the_trainer():
    """2 nodes x 4 GPUs: SLURM's nodes, tasks and GPUs per node follow trainer.num_nodes and trainer.devices."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.signal_delay_s > 0 and launcher.timeout_min > 0


@pytest.mark.slow  # about 15 s: two jobs, each a process of its own
def test_submitit_local_runs_a_sweep_into_one_sweep_dir_and_reports_every_job(tmp_path, task):
    code, out, err = finish(launch(tmp_path, task, "hydra/launcher=submitit_local", "trainer.max_epochs=1", "precision=32,bf16-mixed",
                                   "net.hidden=0,8", flags=("-m",)))
    assert code == 1  # two of the four jobs are refused (a zero-width layer): the sweep says so and exits non-zero
    sweep = only_run_dir(tmp_path / "logs", "multirun")
    jobs = sweep_jobs(sweep)
    assert len(jobs) == 4 and not (tmp_path / "logs/train").exists()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert ("error" in metrics) == ("net.hidden=0" in (job / ".hydra/overrides.yaml").read_text()), metrics
        assert (job / "train.log").is_file() and (job / ".hydra/overrides.yaml").is_file()
    assert "sweep of 2 job(s): test/acc" in out  # read back from the jobs, which ran in other processes
    assert "2 job(s) of the sweep failed" in err and "layers with no weights cannot train" in err


@pytest.mark.slow  # about 25 s a case: an uninterrupted run, then a run stopped by the signal, then the requeued job
@pytest.mark.parametrize("relaunch", ["sbatch script", "submitit"])
def test_slurms_signal_before_the_time_limit_saves_requeues_and_the_requeued_job_resumes_in_place(tmp_path, task, relaunch):
    """SLURM sends SIGUSR1 (`sbatch --signal=USR1@120`) before the limit; the requeued job runs the same command again.

    "sbatch script": the command is run again and finds its run under paths.log_dir by the SLURM job id.
    "submitit": submitit runs the same Hydra job again, in the directory it was given (here outside paths.log_dir).
    """
    precision = ["precision=16-master", "precision.growth_interval=3", "trainer.max_epochs=3", "seed=7"]
    reference = tmp_path / "reference"
    code, _, err = finish(launch(tmp_path, task, *precision, f"hydra.run.dir={reference}"))
    assert code == 0, err[-2000:]

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (fake / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "PATH": f"{fake}:{os.environ['PATH']}"}
    where = [f"hydra.run.dir={tmp_path / 'submitit_job'}"] if relaunch == "submitit" else []
    command = [*precision, *where, "+callbacks.slurm_signal._target_=fault_injection.SendSignalAtStep",
               f"+callbacks.slurm_signal.signum={int(signal.SIGUSR1)}", "+callbacks.slurm_signal.step=13"]  # mid-epoch 2

    code, _, err = finish(launch(tmp_path, task, *command, env=slurm))
    assert code == 128 + signal.SIGUSR1, err[-2000:]
    assert "stopped by SIGUSR1 at step 13 (epoch 1)" in err and "requeued SLURM job 4242: it resumes this run" in err
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    run = tmp_path / "submitit_job" if relaunch == "submitit" else only_run_dir(tmp_path / "logs")
    assert (run / SLURM_JOB_FILE).read_text() == "4242"
    assert not (run / "metrics.json").exists()  # no result while requeued: a sweep's launcher would take it as the job's
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 13

    code, out, err = finish(launch(tmp_path, task, *command, env={**slurm, "SLURM_RESTART_COUNT": "1"}))  # the requeued job
    assert code == 0, err[-2000:]
    assert f"run dir: {run}" in out
    if relaunch == "sbatch script":
        assert only_run_dir(tmp_path / "logs") == run  # resumed in place: no second run
    assert_same_weights(weights(reference), weights(run))
    assert "test/acc" in json.loads((run / "metrics.json").read_text())
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    expected = torch.load(reference / "checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == expected["global_step"] == 24
    assert_same_precision_state(final, expected)  # the masters, the loss scaler and its skipped steps too
    assert scalar_steps(run, "train/loss_step") == list(range(24))  # one TensorBoard stream, each step once
