"""`AtomicCheckpointIO`: Lightning checkpoint files written atomically on any local filesystem.

Lightning's `TorchCheckpointIO` serialises the whole checkpoint into memory and writes it through an fsspec
transaction, whose temporary file lives in the system temp folder: when that folder is on another filesystem the
final move is a copy into the final path (a full disk leaves a truncated ``last.ckpt``), and a killed write leaves
the temporary file behind. Here the checkpoint is streamed by ``torch.save`` into a temporary file in the
checkpoint's own folder, flushed, and renamed over the target (`cf.atomic.atomic_path`): the target always holds
the previous complete checkpoint or the new one, a failed write removes its temporary file, and one left by a
killed process is removed at the next save into that folder. Remote paths (s3://, gs://, ...) keep Lightning's
own writer.

Use it as a Trainer plugin (YAML: ``trainer.plugins: [{class_path: cf.checkpoint_io.AtomicCheckpointIO}]``).
DeepSpeed checkpoints (folders written by the engines) do not go through a CheckpointIO.
"""

from __future__ import annotations

from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cf.atomic import atomic_path

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes go to a temporary file beside the target, renamed when complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; pass None")
        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_path(fs._strip_protocol(str(path))) as temp:
            torch.save(checkpoint, temp)
