"""A Hugging Face checkpoint's safetensors read tensor by tensor into a converted model, shard by shard.

A model too large for one rank is built on the meta device, converted (:func:`~lightning_moe.hf.from_hf`
only moves meta tensors) and sharded with FSDP2; then each rank allocates its own shards and
fills them from the checkpoint's files (:func:`fill_from_checkpoint`): one tensor at a time,
only the rows of its shard, read straight into the shard where the layouts agree and
transposed into ``MoELayer``'s expert layout on the way where they do not.

Checkpoint keys are the model's names after ``transformers``' own conversion mapping
(:func:`checkpoint_plan`): released MoE checkpoints store each expert's ``gate_proj``, ``up_proj``
and ``down_proj`` separately (Mixtral's ``w1``/``w3``/``w2`` under ``block_sparse_moe``), which
``transformers`` >= 5 stacks into ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F] when it
loads; here the stacking reads only the experts of a rank's shard.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO

import torch
from torch import Tensor, nn

from lightning_moe.errors import ConfigError
from lightning_moe.hf.convert import AS_IS, TRANSPOSED, from_hf_layout, hf_tensor_names
from lightning_moe.hf.safetensors_io import DTYPES, read_header, read_rows

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers for real.

    Parameters are what a checkpoint fills; buffers (rotary frequencies, routing statistics,
    anything non-persistent) are small and computed by the modules' own constructors, so they
    come out exactly as ``from_pretrained`` makes them. A parameter created for real (an
    ``empty`` one: untouched memory) moves to meta as it is registered.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def has_safetensors(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (SAFE_INDEX, SAFE_SINGLE))


class SafetensorsFolder:
    """The tensors of a Hugging Face model folder's safetensors (one file or several with an index),
    read with plain file I/O (:mod:`~lightning_moe.hf.safetensors_io`): only the bytes asked for,
    straight into the tensor that keeps them, nothing memory-mapped."""

    def __init__(self, folder: str) -> None:
        index = os.path.join(folder, SAFE_INDEX)
        self.folder = folder
        self._stack = ExitStack()
        self._files: dict[str, tuple[IO[bytes], int, dict]] = {}
        if os.path.isfile(index):
            with open(index) as fh:
                self.weight_map = json.load(fh)["weight_map"]
        elif os.path.isfile(os.path.join(folder, SAFE_SINGLE)):
            self.weight_map = {k: SAFE_SINGLE for k in self._file(SAFE_SINGLE)[2] if k != "__metadata__"}
        else:
            raise ConfigError(
                f"`pretrained`={folder!r} has no safetensors weights ({SAFE_SINGLE} or {SAFE_INDEX}), which loading"
                " shard by shard (meta_init) reads; convert it with save_pretrained, or set meta_init: false"
            )

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._files.clear()

    def _file(self, filename: str) -> tuple[IO[bytes], int, dict]:
        if filename not in self._files:
            fh = self._stack.enter_context(open(os.path.join(self.folder, filename), "rb"))
            self._files[filename] = (fh, *read_header(fh))
        return self._files[filename]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(self.weight_map[key])[2][key]["shape"])

    def read_into(self, key: str, out: Tensor, start: int = 0) -> None:
        """Fill ``out`` with rows ``start:start + len(out)`` of tensor ``key`` (cast to ``out``'s dtype and device)."""
        fh, data_offset, header = self._file(self.weight_map[key])
        entry = header[key]
        dtype = DTYPES[entry["dtype"]]
        if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu":
            read_rows(fh, data_offset, entry, out, start)
            return
        staged = torch.empty(out.shape, dtype=dtype)  # in host memory: files are read there
        read_rows(fh, data_offset, entry, staged, start)
        out.copy_(staged)

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._file(self.weight_map[key])[2][key]["dtype"]]


@dataclass(frozen=True)
class Source:
    """Where one tensor of the ``transformers`` model comes from: one checkpoint key, or experts
    stacked from per-expert keys (``stacked[i]``: the keys of one source pattern, in expert order)
    and, for gate and up, concatenated along dim 1."""

    key: str | None = None
    stacked: tuple[tuple[str, ...], ...] = ()

    def shape(self, files: SafetensorsFolder) -> tuple[int, ...]:
        """The tensor's shape in the ``transformers`` model."""
        if self.key is not None:
            return files.shape(self.key)
        widths = [files.shape(keys[0]) for keys in self.stacked]
        return (len(self.stacked[0]), sum(w[0] for w in widths), *widths[0][1:])

    def read(self, files: SafetensorsFolder, start: int | None = None, stop: int | None = None) -> Tensor:
        """Rows ``[start:stop]`` (all for ``None``) in the ``transformers`` layout and the checkpoint's dtype."""
        shape = self.shape(files)
        start, stop = (0, shape[0]) if start is None else (start, stop)
        first = self.key if self.key is not None else self.stacked[0][0]
        out = torch.empty((stop - start, *shape[1:]), dtype=files.dtype(first))
        if self.key is not None:
            files.read_into(self.key, out, start)
            return out
        offset = 0
        for keys in self.stacked:  # each expert's tensor is one contiguous block of its row of `out`
            width = files.shape(keys[0])[0]
            for row, key in enumerate(keys[start:stop]):
                files.read_into(key, out[row, offset : offset + width])
            offset += width
        return out


def checkpoint_plan(hf_model: nn.Module, keys: list[str]) -> dict[str, Source]:
    """The :class:`Source` of each tensor of the ``transformers`` model ``hf_model`` (by its name)
    among the checkpoint's ``keys``, following ``transformers``' conversion mapping for the family.

    Conversions other than stacking experts (and concatenating gate and up) are refused in one
    line: this reader does not know them, ``from_pretrained`` does (``meta_init: false``).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(hf_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    # transformers' renaming reads this to add or strip the base model's prefix (values must not be None)
    wanted = {name: True for name, _ in hf_model.named_parameters(remove_duplicate=False)}
    wanted.update({name: True for name, _ in hf_model.named_buffers()})
    prefix = getattr(hf_model, "base_model_prefix", None) or None
    plan: dict[str, Source] = {}
    grouped: dict[str, dict[str, list[str]]] = {}
    converter_of: dict[str, object] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
        if pattern is None:
            plan[target] = Source(key=key)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = [type(op) for op in converter.operations]
        simple = ops in ([MergeModulelist], [MergeModulelist, Concatenate]) and all(
            getattr(op, "dim", None) == dim for op, dim in zip(converter.operations, (0, 1))
        )
        if not simple:
            raise ConfigError(
                f"checkpoint key {key!r} needs transformers' conversion {converter!r}, which loading shard by shard"
                " does not implement; set meta_init: false to load with from_pretrained"
            )
        grouped.setdefault(target, {}).setdefault(pattern, []).append(key)
        converter_of[target] = converter
    for target, by_pattern in grouped.items():
        order = converter_of[target].source_patterns
        plan[target] = Source(stacked=tuple(tuple(by_pattern[p]) for p in order if p in by_pattern))
    return plan


def _local_rows(param: Tensor) -> tuple[Tensor, int | None, int | None]:
    """The tensor to fill and which rows of the full tensor it holds (``None``: all of it)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(param, DTensor):
        return param.data, None, None
    local = param.to_local()
    placements = [p for p in param.placements if not p.is_replicate()]
    if not placements:
        return local, None, None
    # Rows over one mesh dimension (FSDP2), or over two (experts split over expert-parallel ranks,
    # each block FSDP2-sharded: _StridedShard(0) then Shard(0), which still leaves a rank one run of rows).
    if len(placements) > 2 or not all(isinstance(p, (Shard, _StridedShard)) and p.dim == 0 for p in placements):
        raise ConfigError(f"loading shard by shard supports FSDP2's row sharding (Shard(0)), not {param.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return local, offset[0], offset[0] + shape[0]


def materialize_empty(model: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Allocate (uninitialised) every parameter of ``model`` still on the meta device, each rank
    only its shard under FSDP2; return the names to fill: those, and the persistent buffers
    (a checkpoint may hold them; the others keep the values their modules computed).
    Tensors that exist already are kept."""
    names = [name for name, p in model.named_parameters() if p.is_meta]
    non_persistent = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    buffers = [name for name, _ in model.named_buffers() if name not in non_persistent]
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    return names + buffers


@torch.no_grad()
def fill_from_checkpoint(model: nn.Module, hf_plan: dict[str, Source], folder: str, names: list[str]) -> None:
    """Fill the tensors ``names`` of the converted ``model`` (each rank its shard) from ``folder``'s
    safetensors, as ``hf_plan`` (:func:`checkpoint_plan`) says where each lives.

    A tied parameter (``tie_word_embeddings``) is filled once, from whichever of its names the
    checkpoint holds. A tensor the checkpoint lacks is refused, naming it: ``from_pretrained``
    would initialise it randomly, which a sharded model cannot reproduce.
    """
    ours = hf_tensor_names(model)
    aliases: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(tensor), []).append(name)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    missing = []
    with SafetensorsFolder(folder) as files:
        for name in names:
            tensor = tensors[name]
            found = [(ours[alias][0], ours[alias][1]) for alias in aliases[id(tensor)]]
            found = [(hf, layout) for hf, layout in found if hf in hf_plan]
            if not found:
                if not isinstance(tensor, nn.Parameter):
                    continue  # a buffer the checkpoint does not hold keeps its module's value, as in from_pretrained
                missing.append(name)
                continue
            hf_name, layout = found[0]
            local, start, stop = _local_rows(tensor)
            source = hf_plan[hf_name]
            shape = source.shape(files)
            rows = (shape[0] if start is None else stop - start, *shape[1:])
            expected = (rows[0], rows[2], rows[1], *rows[3:]) if layout == TRANSPOSED else rows
            if tuple(expected) != tuple(local.shape) and (layout != AS_IS or start is not None or
                                                          math.prod(expected) != local.numel()):
                raise ConfigError(
                    f"checkpoint tensor {hf_name} has shape {shape}, the model expects {tuple(local.shape)}"
                    f" (rows {start}:{stop}); the checkpoint and its config.json disagree"
                )
            if source.key is not None and layout == AS_IS and tuple(expected) == tuple(local.shape):
                files.read_into(source.key, local, start or 0)  # straight into the shard: no copy in between
                continue
            value = source.read(files, start, stop)
            # experts: the transpose (gpt-oss: de-interleaved); a selection bias: [1, E] in ERNIE-4.5, [E] in MoELayer
            local.copy_(from_hf_layout(value, layout, local.shape))
            del value
    if missing:
        raise ConfigError(
            f"the checkpoint in {folder!r} has no weights for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
