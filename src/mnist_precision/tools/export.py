"""`mnist-export ckpt_path=<file|run dir>`: the trained LightningModule as `torch.export` programs in FP32, FP16, BF16
and INT8, for any task.

Each program is the data module's `transform` (what it does to a batch's inputs on the device, if it names one: the
MNIST task standardises its images there) followed by the module's `forward`: it takes the inputs the data module's
loaders yield (for MNIST, images in [0, 1], any float dtype) and returns FP32 outputs, and it runs with
`torch.export.load(file).module()(inputs)` in a process that never imports this package (the int8 program after `import torchao`, which registers the quantize/dequantize ops its graph
calls). They go to `<run>/export/` with `export.json` and `export.md`: file size, the task's own test metrics computed
through the saved file (the module's `test_step` runs with the program as its forward), and latency at batch 1 and at
the test loader's batch size on this machine. Checkpoints of `16-master`/`bf16-master` export from their FP32 masters.

INT8 is PT2E (torchao's `prepare_pt2e`/`convert_pt2e` with `X86InductorQuantizer`): the export graph is annotated,
calibrated on training batches, and its weights stored as int8 (the deprecated eager/FX `torch.ao.quantization`
paths are not used). Run eagerly, its quantize/dequantize ops are reference code; `torch.compile` (Inductor) fuses
them into int8 kernels, so `export.compile=true` also reports compiled latency.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn

from mnist_precision.kit.config import CONF_DIR
from mnist_precision.kit.console import setup_job_console
from mnist_precision.kit.errors import UserError, first_line, log_job_error, report_user_errors
from mnist_precision.kit.runs import asks_hydra_only, eval_argv, override_value, suggest_close_matches
from mnist_precision.kit.schema import load_schemas

LOG = logging.getLogger("mnist_precision")
FLOAT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = (*FLOAT_TYPES, "int8")


class Deployable(nn.Module):
    """The data module's transform (in FP32), then the module's forward in one dtype: inputs of any float dtype in, FP32
    outputs out."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, transform: nn.Module):
        super().__init__()
        self.module, self.dtype = copy.deepcopy(module).to(dtype).eval(), dtype  # a copy: each format from the FP32 weights
        self.transform = transform

    def forward(self, inputs: Tensor) -> Tensor:
        return self.module(self.transform(inputs.float()).to(self.dtype)).float()


def trained_module(cfg: DictConfig) -> nn.Module:
    """The configured LightningModule with the checkpoint's weights, in FP32 (the masters, for a master-copy checkpoint)."""
    from hydra.utils import instantiate

    from mnist_precision.kit.master_precision import fp32_state_dict

    checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
    module = instantiate(cfg.model)
    try:
        module.load_state_dict(fp32_state_dict(checkpoint))
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), first_line(error))
        raise UserError(f"{cfg.ckpt_path} was written for a different model than the one configured ({detail[:200]}).") from None
    return module.float().eval()


def batches(cfg: DictConfig) -> tuple[Any, Tensor, Tensor]:
    """The task's data module (set up), `calibration_inputs` training inputs, and an example: its first test inputs."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    calibration, found = [], 0
    for batch in datamodule.train_dataloader():
        calibration.append(inputs_of(batch).cpu())
        found += len(calibration[-1])
        if found >= cfg.export.calibration_inputs:
            break
    datamodule.setup("test")
    example = inputs_of(next(iter(datamodule.test_dataloader()))).cpu()
    return datamodule, torch.cat(calibration)[: cfg.export.calibration_inputs], example


def inputs_of(batch: Any) -> Tensor:
    """A batch's inputs: the batch itself if it is a tensor, else its first item (the contract's `(inputs, targets)`)."""
    inputs = batch if isinstance(batch, Tensor) else batch[0]
    if not isinstance(inputs, Tensor):
        raise UserError(f"export takes the model's input from a batch's first item, which here is a {type(inputs).__name__}, "
                        "not a tensor.")
    return inputs


def export_program(module: nn.Module, fmt: str, transform: nn.Module, calibration: Tensor, example: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = (example[:2],)
    if fmt in FLOAT_TYPES:
        return torch.export.export(Deployable(module, FLOAT_TYPES[fmt], transform), example, dynamic_shapes=({0: batch},))
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    graph = torch.export.export(Deployable(module, torch.float32, transform), example, dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    with torch.no_grad():
        for inputs in calibration.split(100):
            prepared(inputs)  # observers record each activation's range
    return torch.export.export(without_unused_weights(convert_pt2e(prepared)), example, dynamic_shapes=({0: batch},))


def without_unused_weights(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e adds the int8 weights as new constants and leaves the FP32 ones attached, unused: drop them, or the
    saved file would carry both."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attribute)
    return graph


def without_debug_metadata(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drop what only debugging reads: each node's source stack trace, provenance and module path (a third of a small
    int8 file), and the example input kept for re-tracing. `.module()` and the saved weights do not need them."""
    for node in program.graph.nodes:
        for key in ("stack_trace", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn"):
            node.meta.pop(key, None)
    program.example_inputs = None
    return program


def test_metrics(module: nn.Module, program: Callable[[Tensor], Tensor], datamodule: Any) -> dict[str, float]:
    """The task's own test metrics with `program` as the module's forward: its test_step, on its test loader's batches
    as the loader yields them (the data module's transform is in the program), on CPU."""
    import lightning as L

    calls = []

    def forward(inputs: Tensor) -> Tensor:
        calls.append(len(inputs))
        return program(inputs)

    module.forward = forward  # an instance attribute: `self(x)` in test_step calls it
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        metrics = trainer.test(module, dataloaders=datamodule.test_dataloader(), verbose=False)[0]
    finally:
        del module.forward
    if not calls:
        raise UserError("the module's test_step never called self(inputs), so the exported programs cannot be scored with it: "
                        "compute the outputs with self(...) in test_step.")
    return {name: float(value) for name, value in metrics.items()}


def latency_ms(run: Callable[[Tensor], Tensor], inputs: Tensor, runs: int) -> float:
    """Median milliseconds of one call, over `runs` calls after 3 warm-up calls."""
    times = []
    with torch.no_grad():
        for i in range(runs + 3):
            start = time.perf_counter()
            run(inputs)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_formats(formats: list[str]) -> None:
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise UserError(f"export.formats: unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}.")
    if "int8" in formats and platform.machine().lower() not in ("x86_64", "amd64"):
        raise UserError(f"export.formats: int8 uses the x86 quantizer (X86InductorQuantizer) and this machine is {platform.machine()}; "
                        "leave int8 out here.")


def export(cfg: DictConfig, out_dir: Path) -> dict[str, dict[str, float | str]]:
    formats = list(cfg.export.formats)
    check_formats(formats)
    module = trained_module(cfg)
    datamodule, calibration, example = batches(cfg)
    transform = copy.deepcopy(getattr(datamodule, "transform", None) or nn.Identity()).cpu()
    sizes = (1, len(example))
    results: dict[str, dict[str, float | str]] = {}
    for fmt in formats:
        path = out_dir / f"{fmt}.pt2"
        torch.export.save(without_debug_metadata(export_program(module, fmt, transform, calibration, example)), path)
        program = torch.export.load(path).module()  # everything below runs what was saved
        row: dict[str, float | str] = {"file": path.name, "bytes": path.stat().st_size, **test_metrics(module, program, datamodule)}
        for size in sizes:
            row[f"latency_ms_batch_{size}"] = latency_ms(program, example[:size], cfg.export.latency_runs)
        if cfg.export.compile:
            compiled = torch.compile(program)
            for size in sizes:
                row[f"compiled_latency_ms_batch_{size}"] = latency_ms(compiled, example[:size], cfg.export.latency_runs)
        results[fmt] = row
    (out_dir / "export.json").write_text(json.dumps(results, indent=2))
    (out_dir / "export.md").write_text(markdown_table(results))
    return results


def markdown_table(results: dict[str, dict[str, float | str]]) -> str:
    """One row per format: file, size, each test metric (%, for accuracies), each latency."""
    columns = [key for key in next(iter(results.values())) if key not in ("file", "bytes")]
    header = ["format", "file", "size (KB)", *(column_title(key) for key in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fmt, row in results.items():
        cells = [fmt, f"`{row['file']}`", f"{int(row['bytes']) / 1024:,.0f}", *(format_cell(key, row[key]) for key in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def column_title(key: str) -> str:
    if key.startswith(("latency_ms_batch_", "compiled_latency_ms_batch_")):
        return ("compiled " if key.startswith("compiled") else "") + f"ms, batch {key.rsplit('_', 1)[1]}"
    return f"{key} (%)" if key.endswith("acc") else key


def format_cell(key: str, value: float | str) -> str:
    if "latency" in key:
        return f"{value:.3f}"
    return f"{100 * float(value):.2f}" if key.endswith("acc") else f"{float(value):.4f}"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_job_console()
    try:
        results = export(cfg, out_dir)
    except Exception as error:
        raise SystemExit(log_job_error(error)) from None
    LOG.info(f"{markdown_table(results)}exported to {out_dir}")  # on the console and in export.log


def export_argv(argv: list[str]) -> list[str]:
    """The run's own overrides (as mnist-eval replays them), writing into <run>/export/."""
    argv = eval_argv(argv)
    if asks_hydra_only(argv):
        return argv
    ckpt = Path(override_value(argv, "ckpt_path"))  # checked, and made absolute, by eval_argv
    return [*argv, f"hydra.run.dir='{ckpt.parent.parent / 'export'}'"]


def main() -> None:
    with report_user_errors():
        load_schemas()
        sys.argv[1:] = export_argv(sys.argv[1:])
    with suggest_close_matches(sys.argv[1:], "export"):
        _hydra_main()


if __name__ == "__main__":
    main()
