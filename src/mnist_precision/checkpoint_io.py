"""Checkpoint files that are never half-written, and a clear error when one cannot be written.

Lightning writes through an fsspec "transaction": a temporary file from `tempfile.mkstemp()` (the
system temp directory) moved over the target with `shutil.move`. That is a rename only when the
temp directory and the checkpoint share a filesystem; otherwise it is a copy, and a SIGKILL in the
middle leaves a truncated checkpoint. Here the temporary file sits beside the target, is fsynced,
and `os.replace` swaps it in: the old file or the new one, never a piece of either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mnist_precision.errors import RunFailed


class CheckpointSaveError(RunFailed):
    """A checkpoint could not be written (disk full, permissions, ...); the previous one is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except OSError as error:
            partial.unlink(missing_ok=True)
            kept = f"the previous {target.name} is intact" if target.exists() else "no earlier checkpoint of that name existed"
            raise CheckpointSaveError(f"could not write the checkpoint {target}: {error.strerror or error}; {kept}.") from None
