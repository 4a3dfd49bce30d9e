"""The command-line entry points: run dirs, resume, eval, multirun, DDP on CPU, --help, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from support import event_files, files_under, only_run_dir, scalar_steps, sweep_jobs, tensorboard_events

from mnist_precision.cli import eval as eval_cli
from mnist_precision.cli import train as train_cli
from mnist_precision.kit.config import run_name_suffix
from mnist_precision.kit.runs import merge_overrides, quote_values


def test_train_writes_a_run_dir_then_eval_tests_it_with_the_run_config(run_main, tmp_path):
    result = run_main(train_cli.main, "net=quadrants_cnn", "trainer.max_epochs=2", "precision=bf16-mixed")
    assert result.code == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "logs")
    assert f"run dir: {run_dir}" in result.stdout and "test/acc=" in result.stdout
    assert (run_dir / ".hydra/config.yaml").is_file() and (run_dir / "checkpoints/last.ckpt").is_file()
    assert event_files(run_dir)

    tags = tensorboard_events(run_dir).Tags()
    for tag in ["train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "lr-Adam",
                "train/samples_per_sec"]:
        assert tag in tags["scalars"], tag

    test_acc = float(result.stdout.split("test/acc=")[1].split()[0])
    best = next((run_dir / "checkpoints").glob("best_*.ckpt"))
    evaluated = run_main(eval_cli.main, f"ckpt_path={best}", fast=False)
    assert evaluated.code == 0, evaluated.stderr
    assert f"test/acc={test_acc:.4f}" in evaluated.stdout  # same model, same precision, same data: same accuracy
    eval_dir = only_run_dir(tmp_path / "logs", "eval")
    eval_overrides = yaml.safe_load((eval_dir / ".hydra/overrides.yaml").read_text())
    assert "net=quadrants_cnn" in eval_overrides and "precision=bf16-mixed" in eval_overrides


@pytest.mark.slow  # about 18 s: two mnist-train processes
def test_resume_latest_continues_the_same_run_dir_and_event_stream(run_cli, tmp_path):
    first = run_cli("train", "trainer.max_epochs=2")
    assert first.code == 0, first.stderr
    run_dir = only_run_dir(tmp_path / "logs")
    second = run_cli("train", "resume=latest", "trainer.max_epochs=4")
    assert second.code == 0, second.stderr
    assert only_run_dir(tmp_path / "logs") == run_dir and f"run dir: {run_dir}" in second.stdout
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4 * 8
    assert scalar_steps(run_dir, "val/acc") == sorted(set(scalar_steps(run_dir, "val/acc")))  # curves continue, no overlap
    assert len(scalar_steps(run_dir, "val/acc")) == 4
    saved = yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text())
    assert "trainer.max_epochs=4" in saved and "trainer.max_epochs=2" not in saved


def test_ckpt_path_starts_a_new_run_from_a_checkpoint(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=1").code == 0
    source = only_run_dir(tmp_path / "logs")
    shutil.copytree(source, tmp_path / "source")  # the second run gets a new timestamped dir
    shutil.rmtree(source)
    result = run_main(train_cli.main, f"ckpt_path={tmp_path / 'source/checkpoints/last.ckpt'}", "trainer.max_epochs=2")
    assert result.code == 0, result.stderr
    new_run = only_run_dir(tmp_path / "logs")
    assert torch.load(new_run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2 * 8


@pytest.mark.slow  # about 4 s: four jobs
def test_multirun_sweeps_precision_and_network(run_main, tmp_path):
    result = run_main(train_cli.main, "-m", "precision=32,bf16-mixed", "net=quadrants_mlp,quadrants_cnn", "trainer.max_epochs=1")
    assert result.code == 0, result.stderr
    sweep = only_run_dir(tmp_path / "logs", "multirun")
    jobs = sweep_jobs(sweep)
    overrides = [yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) for job in jobs]
    # Each job's directory, and so its TensorBoard run name, says what its overrides are (sorted).
    named = [sorted(o.replace("'", "") for o in job if not o.startswith("paths.log_dir=")) for job in overrides]  # paths excluded
    # the swept keys first, and every pair whole: the rest is cut at 80 characters, with a hash of the whole
    assert [job.name.split(",")[:2] for job in jobs] == [[f"{n}_" + pair.replace("/", "-") for pair in job if pair.startswith("net=")]
                                                          + [pair for pair in job if pair.startswith("precision=")] for n, job in enumerate(named)]
    assert all(len(job.name) <= 2 + 80 and job.name.split(",")[-1].startswith("+") for job in jobs)
    combos = {frozenset(o for o in job if o.startswith(("precision=", "net="))) for job in overrides}
    assert combos == {frozenset({f"precision={p}", f"net={m}"}) for p in ("'32'", "bf16-mixed") for m in ("quadrants_mlp", "quadrants_cnn")}
    assert all((job / "tensorboard").is_dir() for job in jobs)


@pytest.mark.slow  # about 16 s: two DDP processes
def test_ddp_on_cpu_with_two_processes(run_cli, tmp_path):
    result = run_cli("train", "trainer=ddp_cpu", "trainer.max_epochs=1", timeout=400, env={"PYTHONWARNINGS": ""})  # warnings on, as a user has them
    assert result.code == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "logs")
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4  # 512 training images / 2 ranks / 64 per batch
    assert result.stdout.count("test/acc=") == 1  # rank 0 alone reports
    assert (run_dir / "train_rank_1.log").is_file()  # rank 1 worked in the run's own directory
    assert "It is recommended to use `self.log(" not in result.stdout + result.stderr  # values logged already reduced


@pytest.mark.slow  # about 15 s: two jobs, each on two processes
def test_a_sweep_over_ddp_makes_one_sweep_dir_and_each_job_runs_once_on_both_ranks(run_cli, tmp_path):
    result = run_cli("train", "-m", "trainer=ddp_cpu", "trainer.max_epochs=1", "precision=32,bf16-mixed", timeout=400)
    assert result.code == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "logs/multirun").iterdir())
    assert len(sweeps) == 1 and not (tmp_path / "logs/train").exists()
    jobs = sweep_jobs(sweeps[0])
    assert len(jobs) == 2
    for job, precision in zip(jobs, ["32", "bf16-mixed"], strict=True):
        assert "test/acc" in json.loads((job / "metrics.json").read_text())
        rank_1 = (job / "train_rank_1.log").read_text()  # rank 1 ran this job, in this job's directory
        job_line = rank_1.splitlines()[0].split()
        assert "rank 1 of the job" in rank_1 and {f"precision={precision}", f"precision='{precision}'"} & set(job_line)
        assert torch.load(job / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    assert result.stdout.count("test/acc=") == 2 and result.stdout.count("sweep of 2 job(s)") == 1


@pytest.mark.slow  # about 40 s: two sweeps of DDP jobs
def test_a_ddp_sweep_goes_on_past_a_job_that_fails_on_any_rank_and_ends_with_its_summary(run_cli, tmp_path):
    # lightning-hydra-template's own DDP sweep test, verbatim: Lightning refuses every job (fractions of < 1 batch)
    refused = run_cli("train", "-m", "trainer=ddp_cpu", "trainer.max_epochs=3", "+trainer.limit_train_batches=0.01",
                      "+trainer.limit_val_batches=0.1", "+trainer.limit_test_batches=0.1", "optimizer.lr=0.005,0.01,0.02",
                      log_dir=tmp_path / "refused", timeout=400)
    assert refused.code == 1, refused.stderr[-3000:]  # the sweep's own status, not 137: nothing was SIGKILLed
    assert "3 job(s) of the sweep failed" in refused.stderr and "Forcefully terminating" not in refused.stdout + refused.stderr
    assert refused.stderr.count("error: Lightning refused the run: You requested to check") == 3  # once a job, not once a rank
    # one job's rank 1 raises mid-training: that job fails, the others run, the sweep ends with its summary
    one = run_cli("train", "-m", "trainer=ddp_cpu", "trainer.max_epochs=1", "+callbacks.fault._target_=fault_injection.RaiseAtStep",
                  "+callbacks.fault.rank=1", "+callbacks.fault.step=2,1000", log_dir=tmp_path / "one", timeout=400)
    assert one.code == 1, one.stderr[-3000:]
    assert "1 job(s) of the sweep failed" in one.stderr and "another process of this 2-process DDP job stopped" in one.stderr
    assert "sweep of 1 job(s): test/acc" in one.stdout
    jobs = sweep_jobs(only_run_dir(tmp_path / "one", "multirun"))
    assert "injected failure" in (jobs[0] / "train_rank_1.log").read_text() and "test/acc" in json.loads((jobs[1] / "metrics.json").read_text())
    assert one.stderr.count("injected failure") == 0  # rank 1's error is in its log; rank 0 says where


def test_help_lists_every_config_group_and_the_machinerys_options(run_main):
    result = run_main(train_cli.main, "--help", fast=False)
    assert result.code == 0
    for group, options in {
        "data": [], "net": [], "model": [], "optimizer": ["adam", "adamw", "sgd"],
        "scheduler": ["none", "step", "exponential", "cosine", "onecycle"],
        "precision": ["32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "16-master", "bf16-master"],
        "trainer": ["cpu", "gpu", "ddp", "ddp_cpu"], "callbacks": ["default", "none"], "logger": ["tensorboard", "csv", "mlflow", "none"],
        "debug": ["fdr", "overfit", "limit", "profiler"],
    }.items():
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{group}:"))
        assert all(option in line for option in options), line


def test_run_names_keep_whole_key_value_pairs_and_a_hash_when_cut():
    assert run_name_suffix("") == ""
    assert run_name_suffix("net=cnn,precision=16-master,tags=[a,b]") == "_tags=[a,b],net=cnn,precision=16-master"
    lr = [f"optimizer.lr=0.00{digit}2345678901234,optimizer.weight_decay=0.000123456789,trainer.max_epochs=3,"
          "precision=bf16-mixed,net=cnn,data.batch_size=64" for digit in (1, 2)]
    names = [run_name_suffix(name) for name in lr]
    assert names[0].startswith("_lr=0.0012345678901234,weight_decay=0.000123456789,max_epochs=3,")  # groups dropped
    assert all(len(name) <= 81 for name in names) and names[0] != names[1]
    assert all(pair.partition("=")[2] for name in names for pair in name[1:].split(",")[:-1])  # every kept pair whole
    # pairs dropped from the end: how many, and a hash of all of them (runs that differ only there stay apart)
    same_start = ["a.b=" + "x" * 66 + f",c.x={value},e.x={value}" for value in (1, 2)]  # (c.x, e.x: both x if shortened)
    cut = [run_name_suffix(name) for name in same_start]
    assert cut[0].startswith("_a.b=" + "x" * 66 + ",") and cut[0].split(",")[-1].startswith("+") and cut[0] != cut[1]


def test_every_job_of_a_sweep_is_named_the_same_way(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mnist-train", "-m", "precision=32,16-master", "+trainer.limit_train_batches=50",
                                      "trainer.max_epochs=2", "trainer=cpu"])
    names = [run_name_suffix(f"+trainer.limit_train_batches=50,precision={value},trainer.max_epochs=2,trainer=cpu")
             for value in ("32", "16-master")]  # Hydra's override_dirname of each job: the second is the longer
    assert names == ["_precision=32,limit_train_batches=50,max_epochs=2,trainer=cpu",
                     "_precision=16-master,limit_train_batches=50,max_epochs=2,trainer=cpu"]


def test_override_merging_and_precision_quoting():
    assert merge_overrides(["net=cnn", "trainer.max_epochs=5", "resume=/old"], ["trainer.max_epochs=10"]) == [
        "net=cnn", "trainer.max_epochs=10"]
    assert quote_values(["precision=32,bf16-mixed", "seed=32"]) == ["precision='32',bf16-mixed", "seed=32"]


# --- bad inputs: one clear message, non-zero exit, nothing written -------------------------------------------------

BAD_TRAIN_INPUTS = {
    "unknown option": (["trainer.nonsense=1"], "Could not override 'trainer.nonsense'"),
    "unknown group option": (["model=resnet"], "Could not find 'model/resnet'"),
    "wrong type": (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer, got 'abc'"),
    "negative lr": (["optimizer.lr=-0.1"], "optimizer.lr must be > 0, got -0.1"),
    "unknown device": (["trainer.accelerator=tpu9"], "trainer.accelerator='tpu9' is not one of"),
    "unknown matmul precision": (["matmul_precision=fast"], "matmul_precision must be highest, high or medium, got 'fast'"),
    "gpu without gpu": (["trainer=gpu"], "torch sees no CUDA GPU here"),
    "too many devices": (["trainer=ddp_cpu", "trainer.devices=64"], "trainer.devices=64 but this machine has"),
    "zero nodes": (["trainer.num_nodes=0"], "trainer.num_nodes must be a positive integer, got 0"),
    "nodes without a cluster": (["trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2"],
                                "trainer.num_nodes=2 but this process is not one of several nodes: run it under SLURM"),
    "a launcher for a single run": (["hydra/launcher=submitit_local"], "hydra/launcher=submitit_local launches the jobs of a sweep, "
                                    "and this is a single run: add -m"),
    "resume missing dir": (["resume=/nonexistent/run"], "resume=/nonexistent/run: /nonexistent/run is not a directory"),
    "resume and ckpt_path": (["resume=latest", "ckpt_path=x.ckpt"], "not both"),
    "resume in a sweep": (["-m", "resume=latest"], "cannot be combined with -m/--multirun"),
    "missing ckpt_path": (["ckpt_path=/nonexistent.ckpt"], "/nonexistent.ckpt does not exist"),
    "guard patience zero": (["callbacks.training_monitor.patience=0"], "callbacks.training_monitor: patience must be an integer >= 1, got 0"),
    "negative kept epochs": (["callbacks.last_checkpoint.keep_every_n_epochs=-1"], "keep_every_n_epochs must be >= 0, got -1"),
    "a group set to null": (["callbacks=null"], "callbacks=null: a config group takes an option, not null; use callbacks=none"),
    "trainer.precision": (["+trainer.precision=16-mixed"], "trainer.precision is not read here: precision is its own config group; "
                          "use precision=16-mixed"),
    # Lightning's spellings, as a lightning-hydra-template user types them: the option that means the same, in one step
    "Lightning's 16 as trainer.precision": (["trainer.precision=16"], "use precision=16-mixed (Lightning's 16)"),
    "Lightning's bf16 as a group option": (["precision=bf16"], "precision=bf16: use precision=bf16-mixed (Lightning's bf16)"),
    "Lightning's 16 in a sweep": (["-m", "precision=32,16"], "precision=32,16: use precision=16-mixed"),
    "a precision nobody offers": (["+trainer.precision=64"], "precision=64 is not offered; choose one of: 16-master"),
    "lightning-hydra-template's model.compile": (["model.compile=true"], "use compile=true (a top-level key)"),
    "unknown model argument": (["+model.nonsense=true"], "model: QuadrantsClassifier.__init__() got an unexpected keyword argument 'nonsense'"),
    "zero-width layer": (["net.hidden=0"], "model: layers with no weights cannot train: net.1.weight (0, 64)"),
    "unknown trainer argument": (["+trainer.nonsense=3"], "trainer: Trainer.__init__() got an unexpected keyword argument 'nonsense'"),
    "an optimizer argument torch refuses": (["+optimizer.betas=[1.5,0.9]"], "optimizer: Invalid beta parameter at index 0: 1.5"),
    "a scheduler that divides by zero": (["scheduler=step", "scheduler.lr_scheduler.step_size=0"],
                                         "scheduler.lr_scheduler: ZeroDivisionError: integer modulo by zero"),
    "a learning rate that drops to 0": (["scheduler=exponential", "scheduler.lr_scheduler.gamma=0"],
                                        "the learning rate would be 0.0 after the first scheduler step"),
    "a learning rate of 0 from the start": (["scheduler=onecycle", "scheduler.lr_scheduler.max_lr=0"],
                                            "the learning rate of the first step would be 0.0"),
    "a log dir nothing can be written to": (["paths.log_dir=/proc/no_such_dir"], "paths.log_dir=/proc/no_such_dir: runs cannot be written there"),
    "a non-boolean for a Trainer flag": (["trainer.enable_progress_bar=maybe"], "trainer.enable_progress_bar must be null or true or false, got 'maybe'"),
    "a wrong type for an optimizer argument": (["+optimizer.amsgrad=maybe"], "optimizer.amsgrad must be true or false, got 'maybe'"),
    "a wrong type for a callback argument": (["callbacks.progress_bar.refresh_rate=abc"], "callbacks.progress_bar.refresh_rate must be an integer, got 'abc'"),
    "zero gradient accumulation": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be >= 1, got 0"),
    "a negative logging interval": (["trainer.log_every_n_steps=-3"], "trainer.log_every_n_steps must be >= 0, got -3"),
    "fp8 with no linear layer torchao takes": (["precision=fp8", "net=cnn"], "precision=fp8: none of the model's linear layers "
                                               "has both dimensions a multiple of 16"),
    "compile that is not a switch": (["compile=fast"], "compile must be true or false, got 'fast'"),
    "a choice the schema does not offer": (["scheduler.interval=daily"], "scheduler.interval must be one of epoch, step, got 'daily'"),
    "a fraction of less than one batch": (["trainer.limit_val_batches=0.1"], "Lightning refused the run: You requested to check 0.1 of "
                                                                               "the `val_dataloader` but 0.1 * 2 < 1"),
    "checkpointing off beside the checkpoint callbacks": (["trainer.enable_checkpointing=false"],
                                                          "trainer: Trainer was configured with `enable_checkpointing=False` but found `ModelCheckpoint`"),
    "a seed that is not a number": (["seed=abc"], "seed must be an integer, got 'abc'"),
    "no threads": (["threads=0"], "threads must be auto or a number of threads >= 1, got 0"),
    "tags that are not a list": (["tags=a"], "tags must be a list of labels, as in tags=[baseline,ablation], got 'a'"),
    "a top-level key nothing reads": (["+tag=x"], "tag: nothing reads this key (did you mean tags?)"),
    "a key appended where nothing reads it": (["+monitor.metrc=val/loss"], "+monitor.metrc: nothing reads monitor.metrc (did you mean monitor.metric?)"),
    "a misspelt key": (["trainer.max_epoch=3"], "trainer.max_epoch: did you mean trainer.max_epochs?"),
    "a misspelt top-level key": (["sed=3"], "sed: did you mean seed?"),
    "a misspelt option": (["optimizer=adamm"], "optimizer=adamm: did you mean optimizer=adam?"),
    "an option of another group": (["optimizer=quadrants_mlp"], "optimizer=quadrants_mlp: did you mean net=quadrants_mlp?"),
    "an option close to the groups own": (["model=quadrant"], "model=quadrant: did you mean model=quadrants?"),
    "kahan sums for an optimizer torch-optimi lacks": (["precision=bf16-kahan", "optimizer=adamw8bit"],
                                                       "precision=bf16-kahan compensates the updates of optimizer=adam, adamw, sgd "
                                                       "(torch-optimi), not those of torchao.optim.AdamW8bit"),
    "kahan sums for Nesterov momentum": (["precision=bf16-kahan", "optimizer=sgd"],
                                         "precision=bf16-kahan: optimi.SGD (torch-optimi) has no nesterov: set optimizer.nesterov=false"),
    "kahan sums for a fused optimizer": (["precision=bf16-kahan", "+optimizer.fused=true"], "has no fused: set optimizer.fused=false"),
    "stochastic rounding for SGD": (["precision=bf16-sr", "optimizer=sgd"],
                                    "precision=bf16-sr compensates the updates of optimizer=adam, adamw, adamw8bit, adamw4bit, adamwfp8 (torchao)"),
    "stochastic rounding for Adam's L2 decay": (["precision=bf16-sr", "optimizer=adam", "+optimizer.weight_decay=0.1"],
                                                "precision=bf16-sr: torchao has no Adam with L2 weight decay (optimizer.weight_decay=0.1)"),
}


@pytest.mark.parametrize("case", BAD_TRAIN_INPUTS, ids=list(BAD_TRAIN_INPUTS))
def test_bad_training_input_gets_one_clear_message(run_main, tmp_path, case):
    if case == "gpu without gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, message = BAD_TRAIN_INPUTS[case]
    result = run_main(train_cli.main, *args)
    assert result.code != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "logs").glob("train/*"))  # a refused run leaves no directory behind


def test_compile_without_a_compiler_says_what_to_install(run_main, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++")  # where torch's Inductor looks first for the C++ compiler it builds with on a CPU
    result = run_main(train_cli.main, "compile=true", "trainer=cpu")
    assert result.code == 1 and "Traceback" not in result.stderr
    assert "compile=true on a CPU needs a C++ compiler for torch's Inductor, and no-such-c++ ($CXX) is not on PATH: install one" in result.stderr
    assert not list((tmp_path / "logs").glob("train/*"))


@pytest.mark.parametrize("refused", ["trainer.accumulate_grad_batches=0", "trainer.enable_checkpointing=false"])
def test_a_refused_run_in_a_directory_of_the_users_removes_only_what_it_wrote(run_main, tmp_path, refused):
    """hydra.run.dir may name an existing directory: a refused input took all of it away, the user's files too."""
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes/keep.txt").write_text("precious")
    (mine / "data.csv").write_text("1,2")
    result = run_main(train_cli.main, f"hydra.run.dir={mine}", refused)
    assert result.code == 1 and "Traceback" not in result.stderr
    assert (mine / "notes/keep.txt").read_text() == "precious" and (mine / "data.csv").read_text() == "1,2"
    assert {entry.name for entry in mine.iterdir()} <= {"notes", "data.csv", ".hydra", "train.log"}  # Hydra's files stay


@pytest.mark.parametrize("option", ["callbacks=none", "~callbacks", "~callbacks.progress_bar", "logger=none"])
def test_callbacks_and_loggers_can_be_switched_off(run_main, tmp_path, option):
    result = run_main(train_cli.main, option, "trainer.max_epochs=1", "trainer.enable_progress_bar=true")
    assert result.code == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "logs")
    assert (run_dir / "checkpoints").exists() == (option in ("~callbacks.progress_bar", "logger=none"))
    assert (run_dir / "tensorboard").exists() == (option != "logger=none")
    assert ("epoch 1/1" in result.stdout) == (option == "logger=none")  # the progress lines are a callback too


def test_without_our_callbacks_and_logger_lightnings_own_checkpoint_stays_in_the_run_dir(run_main, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # Lightning's default root is the working directory
    result = run_main(train_cli.main, "callbacks=none", "logger=none", "trainer.max_epochs=1")
    assert result.code == 0, result.stderr
    assert list((only_run_dir(tmp_path / "logs") / "checkpoints").glob("epoch=0-step=*.ckpt"))  # Lightning's ModelCheckpoint
    assert not list(elsewhere.iterdir())
    result = run_main(train_cli.main, "callbacks=none", "logger=none", "trainer.max_epochs=1", "trainer.enable_checkpointing=false")
    assert result.code == 0, result.stderr
    assert not list(elsewhere.iterdir())


def test_a_run_in_use_by_another_process_is_refused_until_that_process_ends(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=1").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); f.write('4242'); f.flush(); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(run_dir / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run_dir / ".hydra/overrides.yaml").read_text()
        refused = run_main(train_cli.main, f"resume={run_dir}", "trainer.max_epochs=2")
        assert refused.code == 1 and f"{run_dir} is in use by another process (pid 4242)" in refused.stderr
        assert (run_dir / ".hydra/overrides.yaml").read_text() == before  # refused before Hydra rewrote the run's files
    finally:
        holder.kill()  # the kernel releases its lock, as for a crashed run
        holder.wait()
    assert run_main(train_cli.main, f"resume={run_dir}", "trainer.max_epochs=2").code == 0


def test_resume_latest_with_no_runs_says_so(run_main, tmp_path):
    result = run_main(train_cli.main, "resume=latest")
    assert result.code == 1 and f"no run under {tmp_path / 'logs'} has a checkpoints/last.ckpt" in result.stderr


def test_resume_of_a_directory_that_is_not_a_run(run_main, tmp_path):
    (tmp_path / "plain").mkdir()
    result = run_main(train_cli.main, f"resume={tmp_path / 'plain'}")
    assert result.code == 1 and "is not a training run directory" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "missing"])
def test_resume_from_a_damaged_checkpoint_is_refused_and_nothing_is_overwritten(run_main, tmp_path, damage):
    assert run_main(train_cli.main, "trainer.max_epochs=1").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    last = run_dir / "checkpoints/last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(2)}, last)
    else:
        last.unlink()
    before = files_under(run_dir)
    result = run_main(train_cli.main, f"resume={run_dir}", "trainer.max_epochs=2")
    assert result.code == 1 and "resume=" in result.stderr and str(run_dir) in result.stderr, result.stderr
    assert files_under(run_dir) == before


def test_non_finite_loss_exits_non_zero_with_the_step_precision_and_fix(run_main):
    result = run_main(train_cli.main, "precision=16-true", "optimizer.lr=1e-4", "trainer.max_epochs=1")
    assert result.code == 1
    assert "error: the training loss is nan at step" in result.stderr and "precision=16-true" in result.stderr
    assert "16-master" in result.stderr and "Traceback" not in result.stderr


def test_eval_without_ckpt_path_says_how_to_call_it(run_main):
    result = run_main(eval_cli.main, fast=False)
    assert result.code == 1 and "mnist-eval needs a checkpoint: mnist-eval ckpt_path=" in result.stderr


def test_eval_of_a_truncated_checkpoint_is_refused(run_main, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x02not really")
    result = run_main(eval_cli.main, f"ckpt_path={bad}", fast=False)
    assert result.code == 1 and "is not a readable checkpoint" in result.stderr


def test_a_failing_sweep_job_is_reported_and_the_sweep_goes_on(run_main, tmp_path):
    result = run_main(train_cli.main, "-m", "precision=16-true,32", "optimizer.lr=1e-4", "trainer.max_epochs=1")
    assert result.code == 1 and "1 job(s) of the sweep failed" in result.stderr
    sweep = only_run_dir(tmp_path / "logs", "multirun")
    failed, trained = sweep_jobs(sweep)
    assert "precision=16-true" in json.loads((failed / "metrics.json").read_text())["error"]
    assert 0 <= json.loads((trained / "metrics.json").read_text())["test/acc"] <= 1


@pytest.mark.parametrize("entry", ["train", "eval"])
def test_a_checkpoint_from_a_different_model_is_named_as_such(run_main, tmp_path, entry):
    assert run_main(train_cli.main, "net=quadrants_mlp", "trainer.max_epochs=1").code == 0
    ckpt = only_run_dir(tmp_path / "logs") / "checkpoints/last.ckpt"
    main = train_cli.main if entry == "train" else eval_cli.main
    result = run_main(main, f"ckpt_path={ckpt}", "net=quadrants_cnn", fast=entry == "train")
    assert result.code == 1 and "was written for a different model than the one configured" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_sweep_over_seeds_ends_with_mean_and_spread_of_accuracy_and_fit_time(run_main, tmp_path):
    result = run_main(train_cli.main, "-m", "seed=0,1", "trainer.max_epochs=1")
    assert result.code == 0, result.stderr
    sweep = only_run_dir(tmp_path / "logs", "multirun")
    jobs = [json.loads((job / "metrics.json").read_text()) for job in sweep_jobs(sweep)]
    assert all(job["time/fit_seconds"] > 0 for job in jobs)
    accuracies = [job["test/acc"] for job in jobs]
    mean = sum(accuracies) / 2
    summary = next(line for line in result.stdout.splitlines() if line.startswith("sweep of 2 job(s): "))
    assert f"test/acc {mean:.4f} ± " in summary and "time/fit_seconds " in summary, summary


def test_a_finished_run_resumed_as_it_was_says_so_and_how_to_train_on(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=2").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    again = run_main(train_cli.main, "resume=latest")
    assert again.code == 1
    hint = f"mnist-train resume={run_dir} trainer.max_epochs=4"
    assert again.stderr == f"error: resume={run_dir}: the checkpoint has trained 2 epoch(s), 16 step(s), and trainer.max_epochs=2: " \
                           f"nothing is left to train. Train on with a larger limit: {hint}\n"
    # The refusal changed nothing in the run: its metrics, and the overrides Hydra had rewritten before the check.
    assert "test/acc" in json.loads((run_dir / "metrics.json").read_text())
    assert "trainer.max_epochs=2" in yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text())
    assert run_main(train_cli.main, "resume=latest", "trainer.max_epochs=1").code == 1
    assert "trainer.max_epochs=2" in yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text())
    assert run_main(train_cli.main, *hint.split()[1:]).code == 0  # the command it gives works


def test_ckpt_path_past_the_runs_max_epochs_is_one_message_not_lightnings_exception(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=3").code == 0
    last = only_run_dir(tmp_path / "logs") / "checkpoints/last.ckpt"
    result = run_main(train_cli.main, f"ckpt_path={last}", "trainer.max_epochs=2")
    assert result.code == 1 and "Misconfiguration" not in result.stderr
    assert result.stderr.startswith(f"error: ckpt_path={last}: the checkpoint has trained 3 epoch(s), 24 step(s), and trainer.max_epochs=2")
    assert run_main(train_cli.main, "trainer.max_steps=24", "trainer.max_epochs=-1", f"ckpt_path={last}").code == 1  # max_steps too


@pytest.mark.parametrize("named", ["run dir", "checkpoints dir"])
def test_ckpt_path_a_run_directory_takes_its_last_checkpoint_and_says_so(run_main, tmp_path, named):
    assert run_main(train_cli.main, "trainer.max_epochs=1").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    given = run_dir if named == "run dir" else run_dir / "checkpoints"
    evaluated = run_main(eval_cli.main, f"ckpt_path={given}", fast=False)
    assert evaluated.code == 0, evaluated.stderr
    assert f"ckpt_path={given}: taking {run_dir / 'checkpoints/last.ckpt'}" in evaluated.stdout and "test/acc=" in evaluated.stdout


def test_a_missing_checkpoint_or_run_names_the_nearest_runs(run_main, tmp_path):
    assert run_main(train_cli.main, "trainer.max_epochs=1").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    cut = run_dir.parent / run_dir.name[:-3]  # a run name cut short, as a terminal's copy may leave it
    for main, arg in ((train_cli.main, f"ckpt_path={cut}/checkpoints/last.ckpt"), (eval_cli.main, f"ckpt_path={cut}/checkpoints/last.ckpt"),
                      (train_cli.main, f"resume={cut}")):
        result = run_main(main, arg)
        assert result.code == 1 and f"Runs with a close name: {run_dir}" in result.stderr, result.stderr
    result = run_main(train_cli.main, f"ckpt_path={tmp_path / 'elsewhere.ckpt'}")
    assert result.code == 1 and f"does not exist. The latest runs: {run_dir}" in result.stderr, result.stderr


def test_ckpt_path_a_directory_without_a_checkpoint_lists_what_it_holds(run_main, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    result = run_main(eval_cli.main, f"ckpt_path={empty}", fast=False)
    assert result.code == 1 and result.stderr.strip() == (
        f"error: ckpt_path={empty}: {empty} is a directory without a checkpoints/last.ckpt (it holds: notes.txt). "
        "Name a checkpoint file, or a run directory.")
