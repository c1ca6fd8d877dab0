"""Checkpoints that survive a crash and resume exactly.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target's
  own folder, flushes it to disk and renames it over the target, so a process killed
  mid-write leaves the previous checkpoint intact; a checkpoint that cannot be read
  anyway (truncated, corrupt) gives a :class:`CheckpointError` that names the file and
  the checkpoints beside it to resume from instead.
* :class:`ResumableRNG` saves every rank's random number generator states (torch, CUDA,
  numpy, Python) in checkpoints and restores them on ``fit(ckpt_path=...)``, so sampled
  routing (SparseMixer's Gumbel draws and coins, router and input jitter) continues
  exactly as in an uninterrupted run.
* :func:`check_checkpoint_matches` turns "this checkpoint is from another architecture"
  into one error that lists the hyperparameters and tensors that differ.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lightning_moe.distributed import all_gather_objects
from lightning_moe.lightning_versions import require_tested_lightning

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "PreemptionCheckpoint",
    "ResumableEpochEnd",
    "ResumableRNG",
    "check_checkpoint_matches",
    "use_atomic_checkpoint_io",
]

#: Mismatched tensors listed in full before the rest are only counted.
_MAX_LISTED = 12


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


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
    prefix = _temp_prefix(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*.tmp")):
            with contextlib.suppress(OSError):
                os.unlink(stale)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
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
    kept = "the previous checkpoint there is unchanged" if os.path.isfile(path) else "no file was written there"
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
    """The other ``*.ckpt`` files in ``path``'s folder, newest first."""
    directory = os.path.dirname(os.path.abspath(path))
    found = [p for p in glob.glob(os.path.join(glob.escape(directory), "*.ckpt")) if not os.path.samefile(p, path)]
    return sorted(found, key=os.path.getmtime, reverse=True)


def corrupt_checkpoint_error(path: str, err: BaseException) -> CheckpointError:
    """The error for a checkpoint file that exists but cannot be read."""
    others = _other_checkpoints(path)
    hint = (
        "Resume from an earlier checkpoint instead, e.g. " + ", ".join(repr(p) for p in others[:3])
        if others
        else "No other checkpoint is in that folder; start the run again without ckpt_path"
    )
    return CheckpointError(
        f"Cannot read the checkpoint {path!r} ({os.path.getsize(path)} bytes): the file is truncated or corrupt"
        f" [{type(err).__name__}: {err}]. A run killed while writing it with a non-atomic writer leaves such a"
        f" file (lightning_moe.checkpointing.AtomicCheckpointIO prevents that). {hint}."
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
        with damaged_checkpoint_errors(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


@contextlib.contextmanager
def damaged_checkpoint_errors(path):
    """Turn a failure to read the local checkpoint ``path`` into :class:`CheckpointError` if the file is damaged.

    A missing file raises ``FileNotFoundError`` as usual; an intact archive that fails to
    load has another problem (e.g. ``weights_only`` refusing an object) and its error passes
    through unchanged.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as err:
        if not isinstance(get_filesystem(path), LocalFileSystem) or _is_intact_zip(os.fspath(path)):
            raise
        raise corrupt_checkpoint_error(os.fspath(path), err) from err


def use_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Make ``trainer`` write checkpoints with :class:`AtomicCheckpointIO`.

    Only Lightning's default, a plain ``TorchCheckpointIO``, is replaced; a checkpoint IO
    of another class, chosen by the user or the strategy, is kept.
    """
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# --------------------------------------------------------------------------- RNG state


def rng_states() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA when in use, numpy, Python)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (also after :func:`saveable_rng_states`)."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = states["python"]
    random.setstate((version, tuple(internal), python_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def saveable_rng_states(states: Mapping[str, Any]) -> dict[str, Any]:
    """``states`` in plain types, which ``torch.load(weights_only=True)`` accepts (numpy arrays it does not)."""
    name, keys, pos, has_gauss, gauss = states["numpy"]
    version, internal, python_gauss = states["python"]
    return {
        **states,
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), python_gauss],
    }


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for ``rank`` derived from the run's ``seed`` (distinct ranks, unrelated streams)."""
    low, high = np.random.SeedSequence([seed % 2**64, rank]).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


class ResumableRNG(L.Callback):
    """Saves each rank's RNG states in checkpoints; ``fit(ckpt_path=...)`` continues the same streams.

    The estimators draw from torch's global RNG (SparseMixer's Gumbel samples and coins,
    router and input jitter), so resuming bit for bit needs those streams back where they
    were. Lightning does not save them; this callback does, for every data-parallel rank
    (gathered when the checkpoint is written, each rank restoring its own).

    The state saved is the one at the end of the latest training batch, and at the start
    of each training batch the RNGs are set back to it. So whatever runs between two
    training batches (validation, creating a DataLoader iterator at an epoch start,
    another callback's sampling) does not move the streams training draws from, and a
    resumed run, which skips or repeats some of that work, draws exactly what the
    uninterrupted run drew. The flip side: code that draws from the global RNG between
    training batches gets numbers the next batch draws again, and the same numbers every
    time if training itself draws none (``topk`` without jitter); give such code its own
    ``torch.Generator``. Randomness inside the training batch's own fetch (a dataset that
    draws from the global RNG in the main process) is not covered: give such datasets
    their own generator, or use DataLoader workers.

    Independent ranks: ``seed_everything`` gives every data-parallel rank the same seed,
    so without care rank r's token t would get the same Gumbel sample, coin and jitter as
    rank 0's token t: sampled routing noise correlated across the shards of the global
    batch (each token's noise still has the right distribution, but the global-batch
    gradient averages fewer independent draws). With ``independent_ranks=True`` (the
    default) a fresh multi-process run re-seeds torch's CPU and CUDA generators at the
    start of training from (``torch.initial_seed()``, global rank), after the model is
    built and its weights broadcast, so the ranks draw independent streams that are still
    reproducible from the one seed. ``False`` keeps the shared streams. One process is
    left untouched; a resumed run restores the saved streams instead.

    A callback rather than a LightningModule hook so that it works for any module. It
    is stateful: the checkpoint holds its states under its ``state_key``. Resuming with a
    different number of ranks restores the ranks that exist and warns that the resumed
    run is not bit-exact. ``MoELanguageModel`` adds it itself.
    """

    def __init__(self, independent_ranks: bool = True) -> None:
        self.independent_ranks = independent_ranks
        self._states: dict[str, Any] | None = None
        self._loaded: list[dict[str, Any]] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is None:
            if self.independent_ranks and trainer.world_size > 1 and self._states is None:
                torch.manual_seed(rank_seed(torch.initial_seed(), trainer.global_rank))
            return
        loaded, self._loaded = self._loaded, None
        if len(loaded) != trainer.world_size:
            rank_zero_warn(
                f"ResumableRNG: the checkpoint holds RNG states of {len(loaded)} ranks but this run has"
                f" {trainer.world_size}; ranks without a saved state keep their own, so sampled routing will not"
                " repeat the uninterrupted run exactly."
            )
        if trainer.global_rank < len(loaded):
            self._states = loaded[trainer.global_rank]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._states is not None:
            set_rng_states(self._states)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self._states = rng_states()

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is assembled, so the gather is collective.
        states = self._states if self._states is not None else rng_states()
        return {"ranks": all_gather_objects(saveable_rng_states(states))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in ``on_train_start``, when this process knows its rank.
        self._loaded = list(state_dict["ranks"])


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
    callback's ``on_exception`` on the way out. This callback then writes a full checkpoint
    to the ``last`` file of every ``ModelCheckpoint`` (``<dirpath>/last.ckpt``, atomically
    with :class:`AtomicCheckpointIO`), whether or not it saves a last checkpoint itself, so
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
