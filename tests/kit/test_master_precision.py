"""The FP32 master-copy plugin: dtypes, loss scaling and skipped steps, clipping, accumulation, exact resume, DDP."""

from __future__ import annotations

import subprocess
import textwrap

import lightning as L
import pytest
import torch
from support import assert_same_training_state, load, straight_and_resumed, task_command, task_env, tensorboard_scalars

from mnist_precision.cli.train import train
from mnist_precision.kit.build import build_run
from mnist_precision.kit.errors import UserError
from mnist_precision.kit.master_precision import fp32_state_dict

LIMITED = ["trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


class Probe(L.Callback):
    """Records, per optimizer step, what the plugin did; optionally poisons one step's gradients with inf."""

    def __init__(self, poison_step: int | None = None):
        self.poison_step = poison_step
        self.masters_before: list[dict[str, torch.Tensor]] = []
        self.masters_after: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []
        self.unscaled_grad_norms: list[float] = []

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.poison_step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        plugin = trainer.precision_plugin
        self.masters_before.append({k: v.clone() for k, v in plugin.masters.items()})
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.unscaled_grad_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masters_after.append({k: v.clone() for k, v in trainer.precision_plugin.masters.items()})
        self.scales.append(trainer.precision_plugin.loss_scale)


def fit(make_config, *overrides, probe: Probe | None = None):
    run = build_run(make_config(*overrides))
    if probe is not None:
        run.trainer.callbacks.append(probe)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return run


@pytest.mark.parametrize("precision, half", [("16-master", torch.float16), ("bf16-master", torch.bfloat16)])
def test_half_model_fp32_norms_fp32_masters_and_optimizer_state(make_config, precision, half):
    run = fit(make_config, f"precision={precision}", "net=quadrants_cnn", *LIMITED, "trainer.limit_train_batches=2")
    net, plugin = run.model.net, run.trainer.precision_plugin
    for module in net.modules():
        for p in module.parameters(recurse=False):
            expected = torch.float32 if isinstance(module, torch.nn.BatchNorm2d) else half
            assert p.dtype == expected, (module, p.dtype)
    optimizer = run.trainer.optimizers[0]
    optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.dtype == torch.float32 for p in optimizer_params)
    assert {id(m) for m in plugin.masters.values()} <= {id(p) for p in optimizer_params}
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for v in state.values() if v.dim() > 0)
    for name, half_param in run.model.named_parameters():
        if name in plugin.masters:
            assert torch.equal(half_param, plugin.masters[name].to(half))  # the model is the rounded masters


def test_overflow_skips_the_step_keeps_masters_halves_the_scale_and_holds_the_scheduler(make_config):
    probe = Probe(poison_step=3)
    run = fit(make_config, "precision=16-master", "precision.init_scale=1024", "scheduler=exponential", "scheduler.interval=step", *LIMITED,
              probe=probe)
    plugin = run.trainer.precision_plugin
    assert plugin.skipped_steps == 1
    for name in plugin.masters:
        assert torch.equal(probe.masters_after[3][name], probe.masters_before[3][name])  # untouched
        assert not torch.equal(probe.masters_after[2][name], probe.masters_before[2][name])  # a clean step moves them
    assert probe.scales[2] == 1024 and probe.scales[3] == 512
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 8 - 1  # 8 optimizer steps taken, one skipped: 7 scheduler steps


def test_dynamic_scale_grows_after_the_interval(make_config):
    probe = Probe()
    fit(make_config, "precision=16-master", "precision.init_scale=256", "precision.growth_interval=3", *LIMITED, probe=probe)
    assert probe.scales == [256, 256, 512, 512, 512, 1024, 1024, 1024]


def test_static_scale_stays_constant_even_after_an_overflow(make_config):
    probe = Probe(poison_step=2)
    run = fit(make_config, "precision=16-master", "precision.loss_scale=128", *LIMITED, probe=probe)
    assert set(probe.scales) == {128} and run.trainer.precision_plugin.skipped_steps == 1


def test_clipping_measures_the_unscaled_fp32_master_gradients(make_config, monkeypatch):
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = original(parameters, max_norm, *args, **kwargs)
        seen.append(([p.dtype for p in parameters], float(total), float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    probe = Probe()
    fit(make_config, "precision=16-master", "trainer.gradient_clip_val=0.01", *LIMITED, probe=probe)
    assert len(seen) == 8
    for (dtypes, norm_before, norm_after), unscaled in zip(seen, probe.unscaled_grad_norms, strict=True):
        assert set(dtypes) == {torch.float32}
        assert norm_before == pytest.approx(unscaled, rel=1e-5) and norm_before < 1e3  # unscaled: scale is 65536
        assert norm_after == pytest.approx(0.01, rel=1e-3)


def test_accumulation_makes_one_optimizer_step_per_n_micro_batches(make_config):
    run = fit(make_config, "precision=16-master", "trainer.accumulate_grad_batches=4", *LIMITED)
    optimizer = run.trainer.optimizers[0]
    assert run.trainer.global_step == 2  # 8 micro-batches / 4
    assert {int(state["step"]) for state in optimizer.state.values()} == {2}


@pytest.mark.parametrize("precision", ["16-master", "bf16-master"])
def test_resume_is_exact_for_masters_half_weights_optimizer_and_scaler(make_config, tmp_path, precision):
    straight, resumed = straight_and_resumed(make_config, tmp_path, f"precision={precision}", "precision.growth_interval=5")
    assert_same_training_state(straight, resumed)
    a, b = straight["MasterCopyPrecision"], resumed["MasterCopyPrecision"]
    assert a["scaler"] == b["scaler"] and a["skipped_steps"] == b["skipped_steps"]
    assert all(torch.equal(a["masters"][k], b["masters"][k]) for k in a["masters"])
    assert all(v.dtype == torch.float32 for v in a["masters"].values())


def test_checkpoint_exports_fp32_weights_from_the_masters(make_config, tmp_path):
    train(make_config("precision=16-master", *LIMITED))
    checkpoint = load(tmp_path / "run/checkpoints/last.ckpt")
    weights = fp32_state_dict(checkpoint)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert torch.equal(weights["net.1.weight"], checkpoint["MasterCopyPrecision"]["masters"]["net.1.weight"])
    from quadrants.nets import mlp

    mlp().load_state_dict({k.removeprefix("net."): v for k, v in weights.items() if k.startswith("net.")})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision.loss_scale=0"], "precision.loss_scale must be 'dynamic' or a number > 0"),
        (["precision.loss_scale=-8"], "precision.loss_scale must be 'dynamic' or a number > 0"),
        (["precision.growth_factor=1.0"], "precision.growth_factor must be > 1"),
        (["trainer.strategy=fsdp"], "cannot be combined with strategy=fsdp"),
        (["trainer.strategy=deepspeed"], "cannot be combined with strategy=deepspeed"),
        (["optimizer._target_=torch.optim.LBFGS"], "LBFGS"),
        (["+optimizer.fused=true", "trainer.gradient_clip_val=1.0"], "fused"),
    ],
)
def test_unsupported_combinations_are_refused_before_training(make_config, overrides, message):
    with pytest.raises(UserError, match=message):
        build_run(make_config("precision=16-master", *overrides))


@pytest.mark.slow  # about 15 s: two DDP processes
def test_ddp_on_cpu_keeps_masters_identical_on_both_ranks(tmp_path, task):
    (tmp_path / "dump_masters.py").write_text(textwrap.dedent('''
        import lightning as L, torch
        class DumpMasters(L.Callback):
            def __init__(self, path): self.path = path
            def on_train_start(self, trainer, pl_module): self.dump(trainer, "start")
            def on_train_end(self, trainer, pl_module): self.dump(trainer, "end")
            def dump(self, trainer, when):
                masters = {k: v.clone() for k, v in trainer.precision_plugin.masters.items()}
                torch.save(masters, f"{self.path}/{when}{trainer.global_rank}.pt")
    '''))
    argv = task_command(task, tmp_path / "logs", "trainer=ddp_cpu", "precision=16-master", "trainer.max_epochs=2",
                        "+callbacks.dump._target_=dump_masters.DumpMasters", f"+callbacks.dump.path={tmp_path}")
    done = subprocess.run(argv, cwd=tmp_path, env=task_env(task, tmp_path), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    start0, start1, end0, end1 = (torch.load(tmp_path / f"{when}{r}.pt", weights_only=True) for when in ("start", "end") for r in (0, 1))
    for a, b in [(start0, start1), (end0, end1)]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(start0["net.1.weight"], end0["net.1.weight"])  # they did train


def test_tensorboard_gets_the_loss_scale_and_skipped_steps(make_config, tmp_path):
    train(make_config("precision=16-master", "precision.init_scale=1024", *LIMITED))
    assert tensorboard_scalars(tmp_path / "run", "train/loss_scale")[0][1] == 1024
    assert tensorboard_scalars(tmp_path / "run", "train/skipped_steps")[-1][1] == 0


@pytest.mark.parametrize("master, autocast", [("16-master", "16-mixed"), ("bf16-master", "bf16-mixed")])
def test_masters_equal_autocast_weights_bit_for_bit_on_an_mlp(make_config, tmp_path, master, autocast):
    """On an MLP both compute every op on the same half-rounded weights and step Adam in FP32 on the same
    unscaled gradients, so the FP32 masters must equal autocast's FP32 weights exactly: a check to the bit."""
    train(make_config(f"precision={autocast}", "trainer.max_epochs=2", output_dir=tmp_path / "autocast"))
    train(make_config(f"precision={master}", "trainer.max_epochs=2", output_dir=tmp_path / "master"))
    weights = load(tmp_path / "autocast/checkpoints/last.ckpt")["state_dict"]
    masters = load(tmp_path / "master/checkpoints/last.ckpt")["MasterCopyPrecision"]["masters"]
    assert masters.keys() == {k for k in weights if k.startswith("net.")}
    assert all(torch.equal(weights[name], masters[name]) for name in masters)


def test_eval_tests_a_master_copy_checkpoint_with_its_run_config(run_main, tmp_path):
    from mnist_precision.cli import eval as eval_cli
    from mnist_precision.cli import train as train_cli

    trained = run_main(train_cli.main, "precision=16-master", "trainer.max_epochs=1")
    assert trained.code == 0, trained.stderr
    accuracy = trained.stdout.split("test/acc=")[1].split()[0]
    best = next((tmp_path / "logs/train").glob("*/checkpoints/best_*.ckpt"))
    evaluated = run_main(eval_cli.main, f"ckpt_path={best}", fast=False)
    assert evaluated.code == 0, evaluated.stderr
    assert f"test/acc={accuracy}" in evaluated.stdout
