"""Precisions beyond mixed: `bf16-kahan` and `bf16-sr` (bfloat16 weights and state, compensated updates), `fp8`
(float8 matmuls in the linear layers), the low-bit optimizer states (`optimizer=adamw8bit`, `adamw4bit`, `adamwfp8`),
and what each recipe holds per parameter (`memory/bytes_per_param`). Their exact resume and export are in the
conformance suite; their bad combinations in test_cli."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from support import only_run_dir, sweep_jobs, task_command, task_env, tensorboard_events

from mnist_precision.cli import train as train_cli
from mnist_precision.kit.errors import UserError
from mnist_precision.kit.monitor import bytes_per_parameter, unquantised_states
from mnist_precision.kit.precision import CompensatedPrecision, Float8Precision
from mnist_precision.kit.private_api import TORCHAO_ADAMW


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
                                                    [("bf16-mixed", 16, 8), ("bf16-true", 8, 4), ("bf16-master", 18, 16),
                                                     ("fp8", 16, 8)])]


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


def test_fp8_multiplies_in_float8_the_linear_layers_torchao_takes_and_keeps_the_others_fp32():
    from torchao.float8.float8_linear import Float8Linear

    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    weights = [id(parameter) for parameter in net.parameters()]
    net = Float8Precision("cpu").convert_module(Float8Precision("cpu").convert_module(net))  # (once for each stage)
    assert type(net[0]) is Float8Linear and type(net[2]) is torch.nn.Linear  # 10 outputs: not a multiple of 16
    assert [id(parameter) for parameter in net.parameters()] == weights  # what the optimizer holds, and the checkpoint's keys
    assert all(parameter.dtype == torch.float32 for parameter in net.parameters())
    inputs = torch.randn(8, 64)
    fp32 = net[2](torch.relu(torch.nn.functional.linear(inputs, net[0].weight, net[0].bias)))
    assert not torch.equal(net(inputs), fp32) and torch.allclose(net(inputs), fp32, atol=0.05)  # float8 rounds, close


def test_fp8_refuses_a_model_with_no_linear_layer_torchao_can_take():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 26 * 26, 10))
    with pytest.raises(UserError, match=r"precision=fp8: none of the model's linear layers has both dimensions a multiple of 16.*"
                                        r"its linear layers: 2 5408->10"):
        Float8Precision("cpu").convert_module(net)


def test_fp8_on_a_gpu_without_fp8_tensor_cores_says_which_gpus_have_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError, match=r"needs a GPU with FP8 tensor cores \(compute capability 8.9 or more: Ada, Hopper\); "
                                        r"this NVIDIA A100-SXM4-80GB has 8.0"):
        Float8Precision("cuda")


@pytest.mark.slow  # about 30 s: three DDP jobs of two processes
def test_each_new_recipe_keeps_both_ddp_ranks_weights_and_optimizer_states_equal(tmp_path, task):
    """Stochastic rounding draws random numbers and Kahan buffers hold what each update lost: on 2 CPU ranks both must
    stay the same on every rank (same seed, same all-reduced gradients), or the replicas drift apart silently."""
    (tmp_path / "dump_state.py").write_text(textwrap.dedent('''
        import lightning as L, torch
        class DumpState(L.Callback):
            def __init__(self, path): self.path = path
            def on_train_end(self, trainer, pl_module):
                state = {"weights": pl_module.state_dict(), "optimizer": trainer.optimizers[0].state_dict()["state"]}
                name = trainer.precision_plugin.name
                torch.save(state, f"{self.path}/{name}-{trainer.global_rank}.pt")
    '''))
    argv = task_command(task, tmp_path / "logs", "-m", "trainer=ddp_cpu", "precision=bf16-sr,bf16-kahan,fp8", "trainer.max_epochs=1",
                        "optimizer=adamw", "+callbacks.dump._target_=dump_state.DumpState", f"+callbacks.dump.path={tmp_path}")
    done = subprocess.run(argv, cwd=tmp_path, env=task_env(task, tmp_path), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(sweep_jobs(only_run_dir(tmp_path / "logs", "multirun"))) == 3
    for name in ("bf16-kahan", "bf16-sr", "fp8"):
        rank0, rank1 = (torch.load(tmp_path / f"{name}-{rank}.pt", weights_only=False) for rank in (0, 1))
        assert rank0["weights"].keys() == rank1["weights"].keys()
        assert all(torch.equal(rank0["weights"][key], rank1["weights"][key]) for key in rank0["weights"]), name
        states = [[torch.as_tensor(value) for state in dump["optimizer"].values() for value in state.values()] for dump in (rank0, rank1)]
        assert len(states[0]) == len(states[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*states, strict=True)), name


@pytest.mark.slow  # torchao compiles its update for each parameter shape
def test_a_low_bit_optimizer_that_quantises_little_of_the_model_says_so():
    """torchao keeps FP32 moments, silently, for a tensor whose count is not a multiple of its block size: the paper CNN's
    84 x 1014 weight is not, and there optimizer=adamw8bit saves nothing."""
    import torchao.optim

    def said(net: torch.nn.Module, optimizer=torchao.optim.AdamW8bit, **settings) -> list[str]:
        step = optimizer(net.parameters(), lr=1e-3, **settings)
        for parameter in net.parameters():
            parameter.grad = torch.randn_like(parameter)
        step.step()
        return unquantised_states(net, [step])

    assert said(torch.nn.Sequential(torch.nn.Linear(1014, 84), torch.nn.Linear(84, 10))) == [
        "AdamW8bit keeps FP32 moments for 100% of the parameters (the largest: 0.weight (85176), 1.weight (840), 0.bias (84)): "
        "torchao quantises only a tensor of at least 4096 elements whose count is a multiple of 256. "
        "memory/optimizer_bytes_per_param says what it holds."]
    assert said(torch.nn.Sequential(torch.nn.Linear(1024, 84), torch.nn.Linear(84, 10))) == []  # 86016 = 336 x 256
    # bf16-sr's full-precision AdamW quantises nothing, by design: nothing to say
    assert said(torch.nn.Linear(1014, 84), get_class(TORCHAO_ADAMW), bf16_stochastic_round=True) == []
