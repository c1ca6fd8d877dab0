"""Reading a Lightning checkpoint's model tensors one at a time, and writing safetensors shards as they come.

Export streams (:func:`~lightning_moe.hf.export.stream_export`): a checkpoint is read tensor by
tensor (a ``.ckpt`` file memory-mapped; a distributed checkpoint, a folder of DCP files, through
``torch.distributed.checkpoint`` one tensor per request, its ranks' pieces assembled), the
optimizer state is never read, and the output is written in size-limited shards, so memory
holds at most one shard and one tensor.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_moe.errors import ConfigError

#: The largest safetensors shard export writes unless told otherwise (``transformers``' unit: 5 GB = 5 * 10**9 bytes).
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
#: The prefix of the language model's tensors in a Lightning checkpoint of HFMoELanguageModel.
MODEL_PREFIX = "model."
# What Lightning's ModelParallelStrategy names its distributed checkpoint's non-tensor part.
_DCP_METADATA_FILE = "meta.pt"


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an integer, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper()) if isinstance(size, str) else None
    if match is None or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"`max_shard_size` must be a positive number of bytes or a size like '5GB' or '500MB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def is_distributed_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


@dataclass
class CheckpointTensors:
    """The language model's tensors of a checkpoint of HFMoELanguageModel, by name (without ``model.``)."""

    path: str
    distributed: bool
    hyper_parameters: dict[str, Any]
    stored: dict[str, Any] | None  # the checkpoint's STORED_MODEL entry
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    _state: dict[str, Tensor] = field(default_factory=dict, repr=False)  # a .ckpt's memory-mapped tensors

    @classmethod
    def open(cls, path: str) -> CheckpointTensors:
        from lightning_moe.hf.loading import STORED_MODEL

        distributed = is_distributed_checkpoint(path)
        if distributed:
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            meta_file = os.path.join(path, _DCP_METADATA_FILE)
            rest = torch.load(meta_file, map_location="cpu", weights_only=True) if os.path.isfile(meta_file) else {}
            prefix = f"state_dict.{MODEL_PREFIX}"
            shapes = {
                key[len(prefix):]: (tuple(item.size), item.properties.dtype)
                for key, item in FileSystemReader(path).read_metadata().state_dict_metadata.items()
                if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
            }
            state: dict[str, Tensor] = {}
        elif os.path.isfile(path):
            rest = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(rest, dict) or not isinstance(rest.get("state_dict"), dict):
                raise ConfigError(f"checkpoint={path!r} is not a Lightning checkpoint (it has no state_dict)")
            state = {k[len(MODEL_PREFIX):]: v for k, v in rest["state_dict"].items() if k.startswith(MODEL_PREFIX)}
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        else:
            raise ConfigError(
                f"checkpoint={path!r}: no such file or distributed checkpoint folder (a folder with a .metadata file)"
            )
        stored = rest.get(STORED_MODEL)
        stored = stored if isinstance(stored, dict) and isinstance(stored.get("config"), dict) else None
        hparams = dict(rest.get("hyper_parameters") or {})
        return cls(path, distributed, hparams, stored, shapes, state)

    def get(self, name: str) -> Tensor:
        """Tensor ``name`` (the whole of it, assembled from every rank's piece), read now."""
        if not self.distributed:
            return self._state[name].clone()  # out of the memory map: its pages may go
        from torch.distributed.checkpoint import FileSystemReader, load

        shape, dtype = self.shapes[name]
        tensor = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # one process reading on its own is the intent here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            load({"state_dict": {MODEL_PREFIX + name: tensor}}, storage_reader=FileSystemReader(self.path), no_dist=True)
        return tensor


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each (a larger tensor gets one of its own),
    named and indexed as ``save_pretrained`` names them, written as tensors are added."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # the tensor names of each shard written
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, os.path.join(self.folder, f".shard-{len(self.files)}"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, then name the shards and write the index (none for a single file)."""
        if self.pending or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            os.rename(os.path.join(self.folder, ".shard-0"), os.path.join(self.folder, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            filename = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.rename(os.path.join(self.folder, f".shard-{i}"), os.path.join(self.folder, filename))
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)
            fh.write("\n")
