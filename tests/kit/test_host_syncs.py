"""No host-device sync in a steady-state training step (a step that doesn't log), for every precision (host_reads.py
counts them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from host_reads import COUNTED, PRECISIONS, WITH_GRAD_SCALER, CountedSteps, HostReads, count_host_reads, fit_bracketed

from mnist_precision.kit.build import build_run
from mnist_precision.kit.monitor import TrainingMonitor


@pytest.mark.parametrize("precision", PRECISIONS)
def test_with_a_fused_optimizer_no_step_reads_a_tensor_on_the_host(make_config, precision):
    """Fused optimizers take GradScaler's inf/NaN flag on the device: nothing at all is read, by anyone."""
    reads = count_host_reads(make_config, f"precision={precision}", "optimizer=adam", "+optimizer.fused=true")
    assert sum(reads.values()) == 0, dict(reads)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_with_a_plain_optimizer_only_grad_scaler_step_reads_its_flag(make_config, precision):
    """A non-fused optimizer can't skip on the device: GradScaler.step reads found_inf, once a step, and nothing else reads."""
    reads = count_host_reads(make_config, f"precision={precision}", "optimizer=sgd")
    expected = {"GradScaler": len(COUNTED)} if precision in WITH_GRAD_SCALER else {}
    assert dict(reads) == expected


@pytest.mark.slow  # about 3 s
def test_kahan_compensated_updates_read_only_their_step_counter_which_stays_on_the_cpu(make_config):
    """torch-optimi's update (precision=bf16-kahan) reads one number a step: its step counter, which it keeps on the CPU
    (`torch.tensor(0)` with no device), so the read waits for no device."""
    reads = count_host_reads(make_config, "precision=bf16-kahan", "optimizer=adamw")
    assert dict(reads) == {"torch-optimi": len(COUNTED)}
    run = build_run(make_config("precision=bf16-kahan", "optimizer=adamw"))
    optimizer = run.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    for parameter in run.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    assert all(group["step"].device.type == "cpu" for group in optimizer.param_groups)


def test_the_counter_sees_every_kind_of_read_and_who_made_it():
    """The tests above would pass vacuously if the counter missed reads."""
    monitor = TrainingMonitor()
    monitor._losses, monitor._where = [torch.tensor(0.5)], [(0, 0, 0, 64)]
    with HostReads() as reads:
        monitor.check_losses(SimpleNamespace(precision_plugin=None, world_size=1))  # the template: one .tolist()
        value = torch.tensor([1.0, 2.0])
        value[0].item(), bool(value[1]), float(value[0]), value.numpy()  # this test file: four reads
    assert dict(reads.by_source) == {"template": 1, "other": 4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (issue 9, part C: run on the device)")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_on_cuda_steady_state_steps_do_not_synchronize(make_config, precision):
    class SyncDebugError(CountedSteps):
        """A sync raises in each COUNTED step (the counted steps of the tests above)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("error" if batch_idx in COUNTED else "default")

    try:  # a sync in a counted step raises RuntimeError
        fit_bracketed(make_config, SyncDebugError(), "trainer=gpu", f"precision={precision}", "optimizer=adam", "+optimizer.fused=true")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow  # about 10 s
@pytest.mark.parametrize("recipe", ["precision=bf16-sr optimizer=adamw", "optimizer=adamw8bit", "precision=fp8 optimizer=adam +optimizer.fused=true"])
def test_the_recipes_beyond_mixed_precision_read_nothing_on_the_host(make_config, recipe):
    """Stochastic rounding, low-bit states and float8's per-tensor scales are computed on the device. torchao compiles
    its updates, and the counter (a dispatch mode) cannot run inside compiled code: they are counted run eagerly, which
    reads whatever the compiled update could read. (fp8 with a fused Adam: torch's plain Adam on a CPU reads its step
    counter, a CPU tensor, every step.)"""
    with torch.compiler.set_stance("force_eager"):
        reads = count_host_reads(make_config, *recipe.split())
    assert sum(reads.values()) == 0, dict(reads)
