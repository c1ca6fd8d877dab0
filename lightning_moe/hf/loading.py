"""Loading the ``transformers`` model HFMoELanguageModel converts: from a Hub name or folder, a config, or a checkpoint.

A Hub name is loaded from the local cache first and asks the Hub once, without retries
(:func:`_from_pretrained`); a checkpoint that carries its model (:data:`STORED_MODEL`) is
built from the config it carries, so neither ``pretrained`` nor the network is needed.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_moe.errors import ConfigError
from lightning_moe.hf.weights import SafetensorsFolder, checkpoint_plan, parameters_on_meta
from lightning_moe.hub import load_cache_first

#: The checkpoint entry that makes a post-training checkpoint self-contained: the model's
#: ``transformers`` config and generation config (JSON dicts) and its tokenizer's files
#: (name -> bytes), so it loads and exports without the base model.
STORED_MODEL = "hf_model"
# The stored entry of the checkpoint HFMoELanguageModel.load_from_checkpoint is loading.
_STORED_MODEL: ContextVar[dict[str, Any] | None] = ContextVar("lightning_moe_stored_hf_model", default=None)


def _torch_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"`dtype` must be 'auto' or a torch floating dtype name (bfloat16, float32, ...), got {dtype!r}")
    return value


@dataclass
class PendingWeights:
    """Where the weights of a model built on the meta device come from: the safetensors of
    ``folder`` (``plan``: :func:`~lightning_moe.hf.weights.checkpoint_plan`), or, when ``folder``
    is ``None``, a Lightning checkpoint being loaded."""

    folder: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)


def load_causal_lm(
    pretrained: str | None,
    config: dict[str, Any] | None,
    dtype: str,
    attn_implementation: str | None,
    meta_init: bool = False,
) -> tuple[nn.Module, PendingWeights | None]:
    """A ``transformers`` causal LM: ``from_pretrained(pretrained)``, or ``from_config(config)`` (random weights).

    While :meth:`HFMoELanguageModel.load_from_checkpoint` loads a checkpoint that carries
    its model's config, the model is built from that config instead (its weights come from
    the checkpoint), so neither ``pretrained`` nor the network is needed.

    ``meta_init``: the parameters of a ``pretrained`` or stored model stay on the meta device
    (buffers are built for real, see :func:`~lightning_moe.hf.weights.parameters_on_meta`) and
    the second value says where their values are to come from; ``None`` when the model is
    complete (no ``meta_init``, or a randomly initialised ``config`` model, always built whole).
    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError("HFMoELanguageModel needs `transformers`: pip install 'lightning-moe[hf]'") from err
    torch_dtype = _torch_dtype(dtype)
    if (pretrained is None) == (config is None):
        raise ConfigError(
            "give exactly one of `pretrained` (a Hub name or local folder) and `config` (a dict of config"
            " fields with `model_type`, for a randomly initialised model)"
        )
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    stored = _STORED_MODEL.get()
    if stored is not None:
        if not meta_init:
            return _build_stored_model(stored, torch_dtype, kwargs), None
        with parameters_on_meta():
            return _build_stored_model(stored, torch_dtype, kwargs), PendingWeights()
    if pretrained is not None:
        looks_local = os.path.isabs(pretrained) or pretrained.startswith(".") or pretrained.count("/") > 1
        if looks_local and not os.path.isdir(pretrained):
            raise ConfigError(f"`pretrained`={pretrained!r}: no such folder (give a model folder or a Hub name)")
        if meta_init:
            return _from_pretrained(pretrained, _meta_from_pretrained, dtype=torch_dtype, **kwargs)
        return _from_pretrained(pretrained, None, dtype=torch_dtype, **kwargs), None
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError("`config` needs `model_type` (e.g. qwen3_moe, olmoe, mixtral, phimoe, qwen2_moe)")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        raise ConfigError(f"`config.model_type`={model_type!r}: {err}") from err
    model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
    return (model if torch_dtype == "auto" else model.to(torch_dtype)), None


def _build_stored_model(stored: dict[str, Any], torch_dtype: torch.dtype | str, kwargs: dict[str, Any]) -> nn.Module:
    """The model of a checkpoint's :data:`STORED_MODEL` entry, randomly initialised (the checkpoint's weights follow)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = stored["config"]
    hf_config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
    model = _from_config(hf_config, torch_dtype, kwargs)
    if stored.get("generation_config"):
        model.generation_config = transformers.GenerationConfig.from_dict(stored["generation_config"])
    return model


def _from_config(hf_config: Any, torch_dtype: torch.dtype | str, kwargs: dict[str, Any]) -> nn.Module:
    import transformers

    # `auto`: the dtype the config names, as from_pretrained would have loaded it.
    dtype = (getattr(hf_config, "dtype", None) or torch.float32) if torch_dtype == "auto" else torch_dtype
    return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **kwargs)


def _meta_from_pretrained(
    name: str, local_files_only: bool = False, dtype: torch.dtype | str = "auto", **kwargs: Any
) -> tuple[nn.Module, PendingWeights]:
    """As ``from_pretrained``, but with the parameters left on the meta device: the config, the
    generation config and where each weight lives in the folder's safetensors (a Hub name's
    local snapshot, downloaded unless ``local_files_only``); no weight is read."""
    import transformers

    folder = name
    if not os.path.isdir(name):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, local_files_only=local_files_only)
    with SafetensorsFolder(folder) as files:
        keys = list(files.weight_map)
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        model = _from_config(hf_config, dtype, kwargs)
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model, PendingWeights(folder, checkpoint_plan(model, keys))


def _from_pretrained(pretrained: str, load: Any = None, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (or ``load``); a Hub name from the cache first, the Hub
    only if it answers, so an unreachable Hub is one line at once (:func:`~lightning_moe.hub.load_cache_first`)."""
    if load is None:
        from transformers import AutoModelForCausalLM

        load = AutoModelForCausalLM.from_pretrained
    return load_cache_first(pretrained, load, field="`pretrained`", what="Hugging Face model", **kwargs)


def stored_model(checkpoint_path: Any) -> dict[str, Any] | None:
    """The :data:`STORED_MODEL` entry of the checkpoint file ``checkpoint_path``, or ``None``.

    ``None`` for checkpoints written before checkpoints carried it, and for paths that are
    not a local file (a URL, a file object): those load from ``pretrained`` as they always did.
    """
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.path.isfile(checkpoint_path):
        return None
    try:  # memory-mapped: reading the entry touches none of the weights
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or not a checkpoint: the loader that follows says so, in its own words
        return None
    stored = checkpoint.get(STORED_MODEL) if isinstance(checkpoint, dict) else None
    return stored if isinstance(stored, dict) and isinstance(stored.get("config"), dict) else None
