"""Precisions beyond mixed: `bf16-kahan` and `bf16-sr` (bfloat16 weights and state, compensated updates), the low-bit
optimizer states (`optimizer=adamw8bit`, `adamw4bit`, `adamwfp8`), and what each recipe holds per parameter
(`memory/bytes_per_param`). Their exact resume is in the conformance suite; their bad combinations in test_cli."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from support import only_run_dir, tensorboard_events

from mnist_precision.cli import train as train_cli
from mnist_precision.kit.errors import UserError
from mnist_precision.kit.monitor import bytes_per_parameter
from mnist_precision.kit.precision import CompensatedPrecision


def compensated(precision: str, **node) -> OmegaConf:
    return CompensatedPrecision(precision).optimizer_config(OmegaConf.create({"_partial_": True, **node}))


def test_bf16_kahan_updates_with_torch_optimi_under_torchs_hyperparameters():
    adam = compensated("bf16-kahan", _target_="torch.optim.Adam", lr=0.002)
    assert adam._target_ == "optimi.Adam" and adam.kahan_sum is True  # (optimi's own defaults: betas 0.99, eps 1e-6)
    assert adam.lr == 0.002 and list(adam.betas) == [0.9, 0.999] and adam.eps == 1e-8 and adam.weight_decay == 0
    adamw = compensated("bf16-kahan", _target_="torch.optim.AdamW", lr=0.001, weight_decay=0.05)
    assert adamw._target_ == "optimi.AdamW" and adamw.weight_decay == 0.05 and adamw.eps == 1e-8 and adamw.kahan_sum
    sgd = compensated("bf16-kahan", _target_="torch.optim.SGD", lr=0.05, momentum=0.9)
    assert sgd._target_ == "optimi.SGD" and sgd.momentum == 0.9 and sgd.torch_init and sgd.kahan_sum


@pytest.mark.parametrize("target", ["torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"])
def test_the_compensated_optimizer_is_torchs_where_nothing_needs_compensating(target):
    """On FP32 weights, with its compensation off, torch-optimi's optimizer steps as torch's does: the settings carried
    over are the whole of torch's."""
    settings = {"_target_": target, "lr": 0.01, **({"momentum": 0.9} if target.endswith("SGD") else {"weight_decay": 0.01})}
    node = compensated("bf16-kahan", **settings)
    node.kahan_sum = False
    weights = [torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    twins = [torch.nn.Parameter(weight.detach().clone()) for weight in weights]
    ours, theirs = instantiate(node)(params=weights), instantiate(OmegaConf.create({**settings, "_partial_": True}))(params=twins)
    for step in range(5):
        for weight, twin in zip(weights, twins, strict=True):
            weight.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
            twin.grad = weight.grad.clone()  # (optimi adds an L2 decay to the gradient in place)
        ours.step()
        theirs.step()
    for weight, twin in zip(weights, twins, strict=True):
        torch.testing.assert_close(weight, twin, rtol=1e-5, atol=1e-6)


def test_bf16_sr_updates_with_torchaos_adamw_rounding_stochastically():
    adam = compensated("bf16-sr", _target_="torch.optim.Adam", lr=0.002)
    assert adam._target_ == "torchao.optim._AdamW" and adam.bf16_stochastic_round and adam.weight_decay == 0  # Adam's update
    low_bit = compensated("bf16-sr", _target_="torchao.optim.AdamW8bit", lr=0.001)
    assert low_bit._target_ == "torchao.optim.AdamW8bit" and low_bit.bf16_stochastic_round


def test_a_module_that_builds_its_own_optimizer_is_refused_under_compensated_updates():
    """The machinery compensates the optimizer the `optimizer` config names; a torch optimizer the module made itself
    would update the bfloat16 weights as bf16-true does, silently."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="the module's configure_optimizers built a SGD, not the optimizer the `optimizer` config names"):
        CompensatedPrecision("bf16-kahan").connect(model, [torch.optim.SGD(model.parameters(), lr=0.1)], [])


# (precision, bytes a parameter in all, of which the optimizer's), Adam on the quadrants MLP (no tensor of 4096
# elements: torchao would keep even a low-bit state in full precision there, see the slow test below)
RECIPES = [("32", 16, 8), ("bf16-kahan", 10, 6), *(pytest.param(*recipe, marks=pytest.mark.slow) for recipe in
                                                    [("bf16-mixed", 16, 8), ("bf16-true", 8, 4), ("bf16-master", 18, 16)])]


@pytest.mark.parametrize(("precision", "total", "optimizer"), RECIPES)
def test_each_recipe_reports_the_bytes_it_holds_per_parameter(run_main, tmp_path, precision, total, optimizer):
    assert run_main(train_cli.main, f"precision={precision}", "trainer.max_epochs=1").code == 0
    run_dir = only_run_dir(tmp_path / "logs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # weights and gradients, then Adam's two moments, FP32 masters and their gradients, Kahan buffers; Adam's step
    # counters (a scalar a tensor) add a few thousandths
    assert metrics["memory/bytes_per_param"] == pytest.approx(total, abs=0.02)
    assert metrics["memory/optimizer_bytes_per_param"] == pytest.approx(optimizer, abs=0.02)
    scalars = tensorboard_events(run_dir).Tags()["scalars"]  # HParams shows every scalar beside the knobs
    assert {"memory/bytes_per_param", "memory/optimizer_bytes_per_param"} <= set(scalars)


@pytest.mark.slow  # torchao compiles its update for each parameter shape: about 20 s
@pytest.mark.parametrize(("optimizer", "expected"), [("AdamW8bit", 2.0), ("AdamW4bit", 1.0), ("AdamWFp8", 2.0)])
def test_a_low_bit_state_counts_the_tensors_it_is_made_of(optimizer, expected):
    import torchao.optim

    weight = torch.nn.Parameter(torch.randn(256, 256))  # quantised (torchao keeps a tensor under 4096 elements in FP32)
    step = getattr(torchao.optim, optimizer)([weight], lr=1e-3)
    weight.grad = torch.randn(256, 256)
    step.step()
    total, held = bytes_per_parameter(torch.nn.ParameterList([weight]), [step])
    # two moments of `expected / 2` bytes an element, their block scales (an FP32 per block of 128 or 256 elements),
    # their code books (256 FP32 values for 8 bits), and the step counter
    assert expected < held < expected + 0.1 and total == pytest.approx(held + 8, abs=1e-9)
