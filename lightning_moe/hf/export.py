"""Export: a post-trained HFMoELanguageModel written back as an ordinary Hugging Face folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` without this library. The
output folder is checked before anything is converted, written beside and renamed into
place when complete, so a failed export leaves it as it was.
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_moe.data.tokenizers import load_transformers_tokenizer
from lightning_moe.errors import ConfigError
from lightning_moe.hf.checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    MODEL_PREFIX,
    CheckpointTensors,
    ShardWriter,
    parse_size,
)
from lightning_moe.hf.convert import from_hf, hf_tensor_names, to_hf, to_hf_layout
from lightning_moe.hf.loading import STORED_MODEL
from lightning_moe.hf.module import HFMoELanguageModel, write_files
from lightning_moe.hf.weights import parameters_on_meta


def _overlap(path: str, folder: str) -> str | None:
    """How ``path`` overlaps ``folder`` (both real paths): the same, inside it, containing it; ``None``: apart."""
    if path == folder:
        return "is"
    if path.startswith(os.path.join(folder, "")):
        return "is inside"
    if folder.startswith(os.path.join(path, "")):
        return "contains"
    return None


def check_export_output(output: str, overwrite: bool, pretrained: str | None, keep: tuple[str, ...] = ()) -> None:
    """Refuse an export ``output`` folder that would lose something; one line naming ``--output``.

    Refused always, even with ``overwrite``: the base model's folder (``pretrained`` when
    it is a local folder), a folder inside it or containing it, the Hugging Face cache
    (where Hub models live), and a folder holding any of the files ``keep`` (the
    checkpoint being exported). Refused without ``overwrite``: a folder that is not empty.
    """
    from huggingface_hub import constants

    real = os.path.realpath(output)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(f"--output={output!r} is a file; give the folder to write the model to")
    protected = [(os.path.realpath(constants.HF_HUB_CACHE), "the Hugging Face cache")]
    if pretrained is not None and os.path.isdir(pretrained):
        protected.insert(0, (os.path.realpath(pretrained), "the base model's folder"))
    for folder, what in protected:
        relation = _overlap(real, folder)
        if relation is not None:
            raise ConfigError(
                f"--output={output!r} {relation} {what} {folder!r}, which export never writes into (not even with"
                " --overwrite): the base model would be lost; choose another folder"
            )
    for path in keep:
        if _overlap(os.path.realpath(path), real) == "is inside":
            raise ConfigError(f"--output={output!r} holds the checkpoint being exported ({path!r}); choose another folder")
    if not overwrite and os.path.isdir(real) and os.listdir(real):
        raise ConfigError(
            f"--output={output!r} is not empty; pass --overwrite to replace that folder and everything in it,"
            " or choose a new folder"
        )


@contextmanager
def _replaced_whole(output: str) -> Iterator[str]:
    """A new folder beside ``output`` to write into; when the block succeeds it replaces ``output``.

    A failure (or a kill) mid-write leaves ``output`` as it was, never half-written: the
    folder is renamed into place only when complete (a rename within one file system).
    Temporary folders left by an export that was killed are removed first.
    """
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):
        # An ``.old`` folder is the previous export only while ``output`` is missing (killed between renames).
        if stale.startswith(f".{name}.") and (stale.endswith(".tmp") or stale.endswith(".old") and os.path.isdir(output)):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    stem = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}")
    new, old = f"{stem}.tmp", f"{stem}.old"
    os.mkdir(new)  # not mkdtemp: the folder gets the usual permissions, not 0700
    try:
        yield new
        if os.path.isdir(output):
            os.rename(output, old)
            try:
                os.rename(new, output)
            except BaseException:
                os.rename(old, output)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(new, output)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def export_pretrained(
    module: HFMoELanguageModel, output: str, tokenizer: Any = None, overwrite: bool = False, keep: tuple[str, ...] = ()
) -> str:
    """Write ``module``'s model to ``output`` as an ordinary Hugging Face folder, and its tokenizer.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` without this library
    (:func:`~lightning_moe.hf.to_hf`). The conversion happens in place, so ``module`` is
    used up: export last, or from a checkpoint (``lightning-moe export``). ``tokenizer``: a
    ``transformers`` tokenizer, or a folder / Hub name to load one from; default: the
    model's own (:meth:`~HFMoELanguageModel.load_tokenizer`); none is written when there is none.

    ``output`` must be a new or empty folder, or ``overwrite`` set, and is never the base
    model's folder (:func:`check_export_output`; ``keep``: files the folder must not hold).
    It is written beside and renamed into place when complete, so a failed export leaves
    it as it was.
    """
    check_export_output(output, overwrite, module.hparams.pretrained, keep)
    # The tokenizer first: a bad one fails before anything is converted or written.
    if tokenizer is None:
        tokenizer = module.load_tokenizer()
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_transformers_tokenizer(os.fspath(tokenizer), field="tokenizer")
    model = to_hf(module.model)
    model.config.use_cache = True
    with _replaced_whole(output) as folder:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return output


def stream_export(source: CheckpointTensors, output: str, tokenizer: str | None, max_bytes: int) -> str:
    """Write the model of ``source`` (a checkpoint that carries its model's config) to ``output``
    as :func:`export_pretrained` would, reading and writing one tensor at a time.

    The Hugging Face model is built on the meta device from the stored config (no weights), so
    the names, tied weights and checkpoint layout ``save_pretrained`` would write (per-expert
    tensors where the family's released checkpoints have them) come from ``transformers``
    itself. The shards are planned from the shapes alone (on the meta device); then each of our
    tensors is read, transposed back to the Hugging Face expert layout and written into its
    shard (:class:`~lightning_moe.hf.checkpoint_io.ShardWriter`) before the next is read.
    """
    import transformers
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    stored = source.stored
    tok = None if tokenizer is None else load_transformers_tokenizer(os.fspath(tokenizer), field="tokenizer")
    config = CONFIG_MAPPING[stored["config"]["model_type"]].from_dict(stored["config"])
    with parameters_on_meta():
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the family's own routing: nothing to warn about
        ours = hf_tensor_names(from_hf(copy.deepcopy(hf_model)))
    persistent = {name: tensor.shape for name, tensor in hf_model.state_dict(keep_vars=True).items()}
    first_name: dict[int, str] = {}
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(param), name)
    tied = {name for name, param in hf_model.named_parameters(remove_duplicate=False) if first_name[id(param)] != name}
    _warn_dropped(source, ours)
    work = []  # (our name, the Hugging Face name, its layout there), in the order written
    entries = []  # what each becomes in the files: (name, dtype, shape), planned on the meta device
    for name, (hf_name, layout) in ours.items():
        if hf_name is None or hf_name in tied or hf_name not in persistent:
            continue
        if name not in source.shapes:
            raise ConfigError(f"checkpoint={source.path!r} has no tensor {MODEL_PREFIX}{name}; it is not of this model")
        work.append((name, hf_name, layout))
        shape, dtype = source.shapes[name]
        planned = torch.empty(shape, dtype=dtype, device="meta")
        planned = to_hf_layout(planned, layout, persistent[hf_name])
        entries += [(k, v.dtype, tuple(v.shape)) for k, v in revert_weight_conversion(hf_model, {hf_name: planned}).items()]
    with _replaced_whole(output) as folder:
        writer = ShardWriter(folder, entries, max_bytes)
        for name, hf_name, layout in work:
            tensor = to_hf_layout(source.get(name), layout, persistent[hf_name])  # also [E] -> ERNIE's [1, E]
            for key, value in revert_weight_conversion(hf_model, {hf_name: tensor}).items():
                writer.write(key, value)
            del tensor
        writer.close()
        dtype = next((dtype for _, dtype, _ in entries if dtype.is_floating_point), None)
        config.use_cache = True
        config.architectures = [type(hf_model).__name__]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(folder)
        if stored.get("generation_config"):
            transformers.GenerationConfig.from_dict(stored["generation_config"]).save_pretrained(folder)
        if tok is not None:
            tok.save_pretrained(folder)
        elif stored.get("tokenizer"):
            write_files(folder, stored["tokenizer"])
    return output


def _warn_dropped(source: CheckpointTensors, ours: dict[str, tuple[str | None, str]]) -> None:
    """Warn, as :func:`~lightning_moe.hf.to_hf` does, when state the Hugging Face format has no place for was in use."""
    biases = [name for name, (hf_name, _) in ours.items() if hf_name is None and name.endswith("moe.selection_bias")]
    if any(name in source.shapes and bool(source.get(name).any()) for name in biases):
        warnings.warn("the model has no place for the aux-loss-free selection bias; not exported", stacklevel=3)


def export_checkpoint(
    checkpoint: str,
    output: str,
    tokenizer: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Write a checkpoint of :class:`HFMoELanguageModel` as a Hugging Face folder (``lightning-moe export``).

    ``checkpoint``: a ``.ckpt`` file, or the folder of a distributed checkpoint (``ModelParallelStrategy``
    with ``save_distributed_checkpoint``). A checkpoint that carries its model (:data:`~lightning_moe.hf.loading.STORED_MODEL`)
    is streamed: tensor by tensor into safetensors shards of at most ``max_shard_size`` (bytes, or
    ``"5GB"``, ``"500MB"``), never the whole model in memory, the optimizer state never read
    (:func:`stream_export`). An older ``.ckpt`` without it loads whole and goes through
    :func:`export_pretrained`. The output folder is checked first, so a refusal comes at once.
    """
    from lightning_moe.checkpointing import damaged_checkpoint_errors

    shard_bytes = parse_size(max_shard_size)
    with damaged_checkpoint_errors(checkpoint):
        source = CheckpointTensors.open(checkpoint)
    pretrained = source.hyper_parameters.get("pretrained")
    check_export_output(output, overwrite, pretrained, keep=(checkpoint,))
    if source.stored is not None:
        with damaged_checkpoint_errors(checkpoint):
            return stream_export(source, output, tokenizer, shard_bytes)
    if source.distributed:
        raise ConfigError(
            f"checkpoint={checkpoint!r} is not of HFMoELanguageModel (it carries no {STORED_MODEL!r} entry); only those"
            " export to Hugging Face"
        )
    with damaged_checkpoint_errors(checkpoint):
        module = HFMoELanguageModel.load_from_checkpoint(checkpoint, map_location="cpu")
    return export_pretrained(module, output, tokenizer, overwrite=overwrite, keep=(checkpoint,))
