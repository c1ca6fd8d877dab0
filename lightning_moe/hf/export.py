"""Export: a post-trained HFMoELanguageModel written back as an ordinary Hugging Face folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` without this library. The
output folder is checked before anything is converted, written beside and renamed into
place when complete, so a failed export leaves it as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_moe.data.tokenizers import load_transformers_tokenizer
from lightning_moe.errors import ConfigError
from lightning_moe.hf.convert import to_hf
from lightning_moe.hf.module import HFMoELanguageModel


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


def export_checkpoint(checkpoint: str, output: str, tokenizer: str | None = None, overwrite: bool = False) -> str:
    """:func:`export_pretrained` of a checkpoint of :class:`HFMoELanguageModel` (``lightning-moe export``).

    The output folder is checked before the model is loaded, so a refusal comes at once.
    """
    from lightning_moe.checkpointing import damaged_checkpoint_errors

    with damaged_checkpoint_errors(checkpoint):
        hparams = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters")
    pretrained = (hparams or {}).get("pretrained")
    check_export_output(output, overwrite, pretrained, keep=(checkpoint,))
    with damaged_checkpoint_errors(checkpoint):
        module = HFMoELanguageModel.load_from_checkpoint(checkpoint, map_location="cpu")
    return export_pretrained(module, output, tokenizer, overwrite=overwrite, keep=(checkpoint,))
