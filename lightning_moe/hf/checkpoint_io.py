"""Reading a Lightning checkpoint's model tensors one at a time, and writing safetensors shards as they come.

Export streams (:func:`~lightning_moe.hf.export.stream_export`): a checkpoint is read tensor by
tensor (a ``.ckpt`` file memory-mapped; a distributed checkpoint, a folder of DCP files, through
``torch.distributed.checkpoint`` one tensor per request, its ranks' pieces assembled), the
optimizer state is never read, and the output is written in size-limited shards, so memory
holds at most one shard and one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from torch import Tensor

from lightning_moe.distributed_checkpoint import is_distributed_checkpoint
from lightning_moe.errors import ConfigError
from lightning_moe.hf.loading import STORED_MODEL
from lightning_moe.hf.safetensors_io import bytes_of, header_for

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
    """Safetensors shards of at most ``max_bytes`` each (a larger tensor gets one of its own), named and
    indexed as ``save_pretrained`` names them, planned from ``entries`` (name, dtype, shape, in the
    order they will come) and written as each tensor comes: only that tensor is in memory."""

    def __init__(self, folder: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> None:
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        self.folder, self.shards = folder, shards
        self.total_bytes = sum(math.prod(e[2]) * torch.empty((), dtype=e[1]).element_size() for e in entries)
        count = len(shards)
        self.filenames = (
            ["model.safetensors"] if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._next = ((i, j) for i, shard in enumerate(shards) for j in range(len(shard)))
        self._file: IO[bytes] | None = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor``, which must be the next entry of the plan."""
        shard, position = next(self._next)
        expected = self.shards[shard][position]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise RuntimeError(f"export wrote {name} {tensor.dtype} {tuple(tensor.shape)} where it planned {expected}")
        if position == 0:
            self._close_file()
            self._file = open(os.path.join(self.folder, self.filenames[shard]), "wb")  # noqa: SIM115 (closed below)
            self._file.write(header_for(self.shards[shard]))
        self._file.write(bytes_of(tensor.contiguous()))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the last shard and write the index (none for a single file)."""
        self._close_file()
        if next(self._next, None) is not None:
            raise RuntimeError("export ended before writing every planned tensor")
        if len(self.filenames) == 1:
            return
        weight_map = {name: self.filenames[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)
            fh.write("\n")
