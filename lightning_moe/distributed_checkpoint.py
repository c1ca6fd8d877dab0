"""Distributed (sharded) checkpoints: a folder that stands where a ``.ckpt`` file would.

Runs sharded with FSDP2 (Lightning's ``ModelParallelStrategy``) save with
``save_distributed_checkpoint: true``: every rank writes only its own shards, so no rank ever
gathers the full weights and AdamW state (about 180 GB in bf16 for a 30B-parameter model). The
checkpoint keeps its usual name (``last.ckpt``, ``step=100.ckpt``) but is a folder holding

* ``__<rank>_0.distcp``: each rank's shards of the model's ``state_dict`` and of every optimizer's
  state (``optimizer_0``, ...), written by ``torch.distributed.checkpoint`` (DCP);
* ``.metadata``: DCP's index of those shards, written by rank 0 once every rank's shards are written;
* ``meta.pt``: the rest of the checkpoint (loops and data position, schedulers, hyperparameters,
  callback states), ``torch.save``\\ d by rank 0 alone after that. Whatever differs between ranks
  must be gathered into rank 0's copy by whoever saves it, as :class:`~lightning_moe.checkpointing.ResumableRNG`
  does with every rank's RNG states; the data position (samples seen by all ranks) is the same on each.

A folder lacking ``.metadata`` or ``meta.pt`` is incomplete: its writer was killed part-way.
Lightning writes the folder in place, so a kill while it overwrites an older checkpoint of the
same name would even leave a complete-looking mix of two steps; ``lightning-moe`` writes a
temporary folder and renames it into place instead
(:func:`~lightning_moe.checkpointing.use_atomic_checkpoint_io`), and ``--ckpt_path last`` passes
over incomplete folders. This module only reads the format; it imports nothing else of the library.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = [
    "DCP_INDEX",
    "META_FILE",
    "checkpoint_time",
    "is_distributed_checkpoint",
    "load_distributed_weights",
    "missing_parts",
]

#: DCP's index of the shards (``torch.distributed.checkpoint``'s name for it).
DCP_INDEX = ".metadata"
#: The non-tensor part (``lightning.fabric.utilities.load._METADATA_FILENAME``).
META_FILE = "meta.pt"


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a distributed checkpoint, complete or not (see :func:`missing_parts`)."""
    if not os.path.isdir(path):
        return False
    return any(name in (DCP_INDEX, META_FILE) or name.endswith(".distcp") for name in os.listdir(path))


def missing_parts(path: str | os.PathLike) -> list[str]:
    """The files a complete distributed checkpoint has and the folder ``path`` lacks (empty when complete)."""
    return [name for name in (DCP_INDEX, META_FILE) if not os.path.isfile(os.path.join(path, name))]


def checkpoint_time(path: str | os.PathLike) -> float:
    """When checkpoint ``path`` (a file or a distributed checkpoint's folder) was written, as a modification time.

    A folder's own time changes when a file is added to it or removed; the newest of the folder
    and its files is when the checkpoint was last written.
    """
    if not os.path.isdir(path):
        return os.path.getmtime(path)
    with os.scandir(path) as entries:
        return max([os.path.getmtime(path), *(entry.stat().st_mtime for entry in entries)])


def load_distributed_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A complete distributed checkpoint read whole in one process: ``meta.pt``'s entries and the full ``state_dict``.

    The optimizer states are left out (they are only needed to resume, which loads the shards on
    the ranks that own them). The weights are assembled from every rank's shards on the CPU, so
    this is for models that fit one process: evaluation and sampling.
    """
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    checkpoint = torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=True)
    reader = FileSystemReader(os.fspath(path))
    state_dict = {
        key.removeprefix("state_dict."): torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("state_dict.") and isinstance(item, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # one process on purpose: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load({"state_dict": state_dict}, storage_reader=reader, no_dist=True)
    return {**checkpoint, "state_dict": state_dict}
