"""Checkpoints that survive a crash and resume exactly.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target's
  own folder, flushes it to disk and renames it over the target, so a process killed
  mid-write leaves the previous checkpoint intact; a checkpoint that cannot be read
  anyway (truncated, corrupt, an incomplete distributed checkpoint) gives a
  :class:`CheckpointError` that names it and the checkpoints beside it to resume from instead.
  :func:`use_atomic_checkpoint_io` does the same for the distributed checkpoints (folders,
  :mod:`lightning_moe.distributed_checkpoint`) of ``ModelParallelStrategy``.
* :class:`ResumableRNG` saves every rank's random number generator states (torch, CUDA,
  numpy, Python) in checkpoints and restores them on ``fit(ckpt_path=...)``, so sampled
  routing (SparseMixer's Gumbel draws and coins, router and input jitter) continues
  exactly as in an uninterrupted run.
* :func:`check_checkpoint_matches` turns "this checkpoint is from another architecture"
  into one error that lists the hyperparameters and tensors that differ.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lightning_moe.distributed_checkpoint import (
    META_FILE,
    checkpoint_time,
    is_distributed_checkpoint,
    load_distributed_weights,
    missing_parts,
)
from lightning_moe.lightning_versions import require_tested_lightning
from lightning_moe.rng_state import ResumableRNG, rng_states, set_rng_states  # noqa: F401 - part of exact resume

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "PreemptionCheckpoint",
    "ResumableEpochEnd",
    "ResumableRNG",
    "check_checkpoint_matches",
    "loadable_checkpoint",
    "read_checkpoint_settings",
    "use_atomic_checkpoint_io",
]

#: Mismatched tensors listed in full before the rest are only counted.
_MAX_LISTED = 12


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _remove(path: str) -> None:
    """Remove the file or folder ``path``."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files and folders that writers of ``path`` killed earlier left beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(_temp_prefix(path)) + "*.tmp")):
        with contextlib.suppress(OSError):
            _remove(stale)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one, even if the
    process is killed at any point: the rename is atomic within one filesystem, which is
    why the temporary file lives in the target's folder (the system temp folder may be
    another filesystem, where a "move" is a copy). Temporary files left by a writer
    that was killed earlier are removed first. A write that fails (full disk, I/O error,
    read-only folder) removes its temporary file and raises :class:`CheckpointError`: one
    line naming ``path`` and the system's reason, the file at ``path`` left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = _os_error(err)
        if cause is None or not isinstance(err, Exception):
            raise
        raise _write_error(path, cause, partial=tmp is not None) from err
    _fsync_directory(directory)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err`` (``torch.save`` reports a failed write as a ``RuntimeError``)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
    return None


def _write_error(path: str, err: OSError, partial: bool) -> CheckpointError:
    code = errno.errorcode.get(err.errno, str(err.errno))
    kept = "the previous checkpoint there is unchanged" if os.path.exists(path) else "no file was written there"
    removed = "the partial file was removed and " if partial else ""
    hint = " Free space on that disk or save elsewhere (ModelCheckpoint dirpath)." if err.errno == errno.ENOSPC else ""
    return CheckpointError(
        f"Cannot write the checkpoint {path!r}: {os.strerror(err.errno)} ({code}); {removed}{kept}.{hint}"
    )


def _is_intact_zip(path: str) -> bool:
    """Whether ``path`` is a complete zip archive (``torch.save``'s format) with valid CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _other_checkpoints(path: str) -> list[str]:
    """The other ``*.ckpt`` files and complete distributed checkpoints in ``path``'s folder, newest first."""
    directory = os.path.dirname(os.path.abspath(path))
    found = [
        p
        for p in glob.glob(os.path.join(glob.escape(directory), "*.ckpt"))
        if not os.path.samefile(p, path) and (os.path.isfile(p) or not missing_parts(p))
    ]
    return sorted(found, key=checkpoint_time, reverse=True)


def _resume_instead(path: str) -> str:
    others = _other_checkpoints(path)
    if others:
        return "Resume from an earlier checkpoint instead, e.g. " + ", ".join(repr(p) for p in others[:3])
    return "No other checkpoint is in that folder; start the run again without ckpt_path"


def corrupt_checkpoint_error(path: str, err: BaseException) -> CheckpointError:
    """The error for a checkpoint file that exists but cannot be read."""
    return CheckpointError(
        f"Cannot read the checkpoint {path!r} ({os.path.getsize(path)} bytes): the file is truncated or corrupt"
        f" [{type(err).__name__}: {err}]. A run killed while writing it with a non-atomic writer leaves such a"
        f" file (lightning_moe.checkpointing.AtomicCheckpointIO prevents that). {_resume_instead(path)}."
    )


def incomplete_checkpoint_error(path: str, missing: list[str]) -> CheckpointError:
    """The error for a distributed checkpoint folder that lacks ``missing`` (see :func:`missing_parts`)."""
    return CheckpointError(
        f"Cannot read the checkpoint {path!r}: it is an incomplete distributed checkpoint (no {' or '.join(missing)}"
        " in the folder); a run killed while Lightning wrote it in place leaves such a folder (lightning-moe writes"
        f" a temporary folder and renames it into place). {_resume_instead(path)}."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe writes and clear errors for unreadable files.

    ``save_checkpoint`` writes to a temporary file in the checkpoint's own folder, fsyncs
    it and ``os.replace``\\ s it over the target (then fsyncs the folder), so ``last.ckpt``
    is always either the previous complete checkpoint or the new complete one. (Lightning's
    own writer goes through an fsspec transaction whose temporary file is created in the
    system temp folder and moved without an fsync: when that folder is on another
    filesystem the move is a copy, which a crash can cut short.) Remote paths (``s3://``
    and other non-local fsspec URLs) keep Lightning's behaviour.

    ``load_checkpoint`` raises :class:`CheckpointError` naming the file and the other
    checkpoints beside it when the file is truncated or corrupt.

    Use it with ``Trainer(plugins=[AtomicCheckpointIO()])``; ``lightning-moe`` adds it to
    every run (see :func:`use_atomic_checkpoint_io`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        atomic_write(os.fspath(path), lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only=None):
        if isinstance(get_filesystem(path), LocalFileSystem) and is_distributed_checkpoint(path):
            # A sharded run's checkpoint read by a strategy that does not shard (evaluation on one
            # device): its weights, assembled whole; resuming training needs ModelParallelStrategy.
            _check_complete(os.fspath(path))
            return load_distributed_weights(path)
        with damaged_checkpoint_errors(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _check_complete(path: str) -> None:
    missing = missing_parts(path)
    if missing:
        raise incomplete_checkpoint_error(path, missing)


@contextlib.contextmanager
def damaged_checkpoint_errors(path):
    """Turn a failure to read the local checkpoint ``path`` into :class:`CheckpointError` if it is damaged.

    A missing file raises ``FileNotFoundError`` as usual; an intact archive that fails to
    load has another problem (e.g. ``weights_only`` refusing an object) and its error passes
    through unchanged. A distributed checkpoint (a folder) is damaged when it is incomplete; a
    complete one given to code that opens it as a file is refused in one line.
    """
    try:
        yield
    except FileNotFoundError:
        if isinstance(get_filesystem(path), LocalFileSystem) and is_distributed_checkpoint(path):
            _check_complete(os.fspath(path))
        raise
    except Exception as err:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            raise
        path = os.fspath(path)
        if os.path.isdir(path):
            if not is_distributed_checkpoint(path):
                raise
            missing = missing_parts(path)
            if missing:
                raise incomplete_checkpoint_error(path, missing) from err
            if isinstance(err, IsADirectoryError):  # code that reads checkpoints as files only
                raise CheckpointError(
                    f"Cannot read the checkpoint {path!r} as a file: it is a distributed checkpoint (a folder of"
                    " shards, written by ModelParallelStrategy with save_distributed_checkpoint: true); evaluate it"
                    " with lightning-moe validate/test --ckpt_path, resume it under ModelParallelStrategy, or export"
                    " it (HFMoELanguageModel)"
                ) from err
            raise
        if _is_intact_zip(path):
            raise
        raise corrupt_checkpoint_error(path, err) from err


def read_checkpoint_settings(path: str | os.PathLike) -> Any:
    """Checkpoint ``path`` with its tensors unread, for the settings it holds (``hyper_parameters``, ...).

    A ``.ckpt`` file is memory-mapped, so little of it is read; of a distributed checkpoint only
    ``meta.pt`` is read, which holds everything but the weights and optimizer states (so no
    ``state_dict``). A damaged file or an incomplete folder raises :class:`CheckpointError`.
    """
    path = os.fspath(path)
    if is_distributed_checkpoint(path):
        _check_complete(path)
        path = os.path.join(path, META_FILE)
    with damaged_checkpoint_errors(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@contextlib.contextmanager
def loadable_checkpoint(path: str | os.PathLike) -> Iterator[str | os.PathLike]:
    """``path`` as ``LightningModule.load_from_checkpoint`` reads it: a file as it is; a distributed checkpoint's
    weights and settings (:func:`~lightning_moe.distributed_checkpoint.load_distributed_weights`) written whole
    into a temporary file, removed afterwards.

    A file rather than a file object, because loaders read more than ``torch.load`` does from a path:
    ``HFMoELanguageModel`` builds itself from the model its checkpoint carries, looked up by path.
    """
    if not is_distributed_checkpoint(path):
        yield path
        return
    _check_complete(os.fspath(path))
    with tempfile.TemporaryDirectory(prefix="lightning-moe-") as folder:
        file = os.path.join(folder, os.path.basename(os.path.normpath(path)))
        torch.save(load_distributed_weights(path), file)
        yield file


def use_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Make ``trainer`` write checkpoints atomically: :class:`AtomicCheckpointIO`, and distributed ones renamed into place.

    Only Lightning's default checkpoint IO, a plain ``TorchCheckpointIO``, is replaced; a
    checkpoint IO of another class, chosen by the user or the strategy, is kept. Under
    ``ModelParallelStrategy`` with ``save_distributed_checkpoint=True``, which writes its
    checkpoint folders itself (not through the checkpoint IO), every rank writes its shards into
    a temporary folder beside the target, and rank 0 puts it in the target's place once the
    checkpoint is complete (:class:`AtomicDistributedSave`).
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if isinstance(strategy, ModelParallelStrategy) and not isinstance(strategy.save_checkpoint, AtomicDistributedSave):
        strategy.save_checkpoint = AtomicDistributedSave(strategy, strategy.save_checkpoint)


class AtomicDistributedSave:
    """``ModelParallelStrategy.save_checkpoint`` that writes a distributed checkpoint beside its target, then swaps it in.

    Lightning writes the folder in place: a run killed while it overwrites ``last.ckpt`` leaves
    some of the new step's shards with the old step's ``meta.pt`` (a folder that loads, wrongly),
    and one killed while writing a new folder leaves it without ``.metadata`` or ``meta.pt``.
    Here every rank writes into ``.<name>.<random>.tmp`` in the target's folder (a name
    ``--ckpt_path last`` never takes); DCP's save ends with a collective after which every
    rank's shards are on disk (its writer fsyncs each file) and rank 0 writes ``.metadata``
    and ``meta.pt``; then rank 0 alone exchanges the temporary folder with the target (Linux's
    ``renameat2(RENAME_EXCHANGE)``: atomic, whether the target is a folder, a file or absent;
    elsewhere the old target is renamed aside first) and removes the old one. Every rank
    learns whether that worked and raises the same :class:`CheckpointError` if not. Full
    checkpoints (``save_distributed_checkpoint=False``) and remote paths are left to Lightning.
    """

    def __init__(self, strategy: ModelParallelStrategy, save: Callable[..., None]) -> None:
        self.strategy, self.save = strategy, save

    def __call__(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        strategy = self.strategy
        if not strategy._save_distributed_checkpoint or not isinstance(get_filesystem(filepath), LocalFileSystem):
            self.save(checkpoint, filepath, storage_options)
            return
        path = strategy.broadcast(os.path.abspath(os.fspath(filepath)))  # rank 0's path, as Lightning's save uses
        temp, error = None, None  # rank 0 decides; every rank learns the outcome (no rank left waiting)
        if strategy.is_global_zero:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _remove_stale_temporaries(path)
                temp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=_temp_prefix(path), suffix=".tmp")
            except OSError as err:
                error = str(_write_error(path, err, partial=False))
        temp, error = strategy.broadcast((temp, error))
        if error is not None:
            raise CheckpointError(error)
        try:
            self.save(checkpoint, temp, storage_options)
        except BaseException:
            if strategy.is_global_zero:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        if strategy.is_global_zero:
            try:
                _put_in_place(temp, path)
            except OSError as err:
                shutil.rmtree(temp, ignore_errors=True)
                error = str(_write_error(path, err, partial=False))
        error = strategy.broadcast(error)
        if error is not None:
            raise CheckpointError(error)


def _exchange(a: str, b: str) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2``); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    raise OSError(code, os.strerror(code), b)


def _put_in_place(folder: str, path: str) -> None:
    """Give the complete checkpoint ``folder`` the name ``path``, replacing what is there, then remove that."""
    _fsync_directory(folder)
    if not os.path.lexists(path):
        os.replace(folder, path)
    elif not _exchange(folder, path):
        # Without an atomic exchange: for an instant ``path`` is absent; the old checkpoint is then
        # under the temporary name, removed with the next save's stale temporaries.
        aside = folder + ".old.tmp"
        os.replace(path, aside)
        os.replace(folder, path)
        folder = aside
    _fsync_directory(os.path.dirname(path))
    with contextlib.suppress(OSError):  # the new checkpoint is in place; a leftover goes with the next save
        _remove(folder)


# --------------------------------------------------------------------------- stopping


class ResumableEpochEnd(L.Callback):
    """Checkpoints written once an epoch has closed resume at the batch that comes next.

    Lightning resumes a step-budgeted run (``max_steps`` set) as "restarting" whatever the
    checkpoint holds, and two checkpoints it writes itself then resume at the wrong batch:

    * When ``max_steps`` (or ``trainer.should_stop``, e.g. early stopping) ends training
      part-way through an epoch, the fit loop still closes the epoch: it counts it as
      processed, runs ``on_train_epoch_end`` and counts it as completed. ``last.ckpt``,
      written there or in ``on_train_end``, records a finished epoch while the epoch's batch
      counter and the data loader's position say it is part done. Resumed (say, with a larger
      ``max_steps``) it starts the next epoch's shuffle and never sees the rest of this one.
    * After an epoch that did run to its end, the checkpoint keeps that epoch's batch
      counter, so the resumed run takes one batch as the end of the old epoch and then
      starts yet another epoch: one epoch's shuffle is skipped after the first batch.

    This callback writes the loop state such a resume needs: an epoch cut short is still in
    progress (the state of a checkpoint taken right after its last batch, which is also
    what a preemption checkpoint holds), and an epoch that ran to its end is completed with
    the next epoch's batch counter at zero. Either way the resumed run repeats an
    uninterrupted one. (An ``interval="epoch"`` learning-rate scheduler steps after
    ``on_train_epoch_end``; a checkpoint saved in that hook misses that step, with or
    without this callback.) ``MoELanguageModel`` adds it itself.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_tested_lightning("ResumableEpochEnd (it rewrites the fit loop's counters in checkpoints)")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        epoch = trainer.fit_loop.epoch_progress.current
        if trainer.state.fn != TrainerFn.FITTING or not 0 < epoch.processed == epoch.started:
            return  # inside an epoch: Lightning resumes that correctly
        batches = trainer.fit_loop.epoch_loop.batch_progress
        loops = checkpoint["loops"]["fit_loop"]
        cut_short = batches.current.ready < trainer.num_training_batches and not batches.is_last_batch
        for counts in (loops["epoch_progress"]["total"], loops["epoch_progress"]["current"]):
            counts["processed"] -= int(cut_short)
            counts["completed"] = counts["processed"]
        if not cut_short:
            batch_progress = loops["epoch_loop.batch_progress"]
            batch_progress["current"] = dict.fromkeys(batch_progress["current"], 0)
            batch_progress["is_last_batch"] = False
        checkpoint["epoch"] = loops["epoch_progress"]["current"]["completed"]


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, save ``last.ckpt`` at the step the run reached, to resume from exactly.

    Schedulers and spot instances send SIGTERM some time before they stop a job. Lightning
    catches it: the training loop finishes the batch it is on, then raises
    ``SIGTERMException`` (a ``SystemExit``: the process exits with status 0), and calls every
    callback's ``on_exception`` on the way out (on every rank: Lightning broadcasts rank 0's
    SIGTERM). This callback then writes a full checkpoint to the ``last`` file of every
    ``ModelCheckpoint`` (``<dirpath>/last.ckpt``, atomically with :class:`AtomicCheckpointIO`;
    under ``ModelParallelStrategy(save_distributed_checkpoint=True)`` a distributed checkpoint
    that every rank writes its shards of, swapped into place by :class:`AtomicDistributedSave`),
    whether or not it saves a last checkpoint itself, so
    ``fit(ckpt_path="last")`` (``lightning-moe fit ... --ckpt_path last``) continues from
    that step. The loops are between two batches at that point (or between validation
    batches, which Lightning resumes), so the resumed run repeats the uninterrupted one.
    Other exceptions save nothing: a checkpoint taken inside a failing step is no place to
    resume from. ``MoELanguageModel`` adds it itself.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}
        paths = sorted(
            {
                callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST)
                for callback in trainer.checkpoint_callbacks
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None
            }
        )
        if not paths:
            rank_zero_warn(
                f"Received SIGTERM at step {trainer.global_step}; no checkpoint saved: the trainer has no"
                " ModelCheckpoint callback to say where."
            )
            return
        for path in paths:
            trainer.save_checkpoint(path)
        rank_zero_info(
            f"Received SIGTERM at step {trainer.global_step}: saved {', '.join(paths)}; continue with"
            " fit(ckpt_path='last') (lightning-moe fit ... --ckpt_path last)."
        )


# --------------------------------------------------------------------------- matching


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_checkpoint_matches(
    module: nn.Module,
    checkpoint: Mapping[str, Any],
    *,
    hparams: Mapping[str, Any] | None = None,
    strict: bool = True,
    source: str = "The checkpoint",
) -> None:
    """Raise :class:`CheckpointError` if ``checkpoint["state_dict"]`` does not fit ``module``.

    The message lists the tensors whose shapes differ (``checkpoint [8, 32, 64], this model
    [16, 32, 64]``), the missing and unexpected keys (only with ``strict``), and, when
    ``hparams`` (the module's hyperparameters) and ``checkpoint["hyper_parameters"]`` are
    given, the hyperparameters that differ (``moe.num_experts: checkpoint 8, this model 16``),
    which usually explain the rest. A checkpoint without a ``state_dict`` is not checked.
    """
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping):
        return
    current = module.state_dict()
    shapes = [
        f"{key}: checkpoint {list(saved[key].shape)}, this model {list(current[key].shape)}"
        for key in current
        if key in saved and hasattr(saved[key], "shape") and tuple(saved[key].shape) != tuple(current[key].shape)
    ]
    missing = sorted(current.keys() - saved.keys()) if strict else []
    unexpected = sorted(saved.keys() - current.keys()) if strict else []
    if not (shapes or missing or unexpected):
        return
    lines = [f"{source} does not match this model's architecture."]
    if hparams is not None and isinstance(checkpoint.get("hyper_parameters"), Mapping):
        ours, theirs = _flatten(hparams), _flatten(checkpoint["hyper_parameters"])
        differ = [
            f"  {key}: checkpoint {theirs.get(key)!r}, this model {ours.get(key)!r}"
            for key in sorted(ours.keys() | theirs.keys())
            if ours.get(key) != theirs.get(key)
        ]
        if differ:
            lines += ["Hyperparameters that differ:", *differ]
    for title, entries in (
        ("Tensors with different shapes", shapes),
        ("Missing from the checkpoint", missing),
        ("In the checkpoint but not in this model", unexpected),
    ):
        if entries:
            more = len(entries) - _MAX_LISTED
            lines += [f"{title} ({len(entries)}):", *(f"  {e}" for e in entries[:_MAX_LISTED])]
            if more > 0:
                lines.append(f"  ... and {more} more")
    lines.append("Build the model with the checkpoint's settings, or start from another checkpoint.")
    raise CheckpointError("\n".join(lines))
