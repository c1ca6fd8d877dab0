"""Every rank's random number generator states, saved in checkpoints and restored on resume.

:class:`ResumableRNG` (re-exported by :mod:`lightning_moe.checkpointing`, whose exact resume it
is part of) and the functions it saves and restores the states with.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_moe.distributed import all_gather_objects

__all__ = ["ResumableRNG", "rank_seed", "rng_states", "saveable_rng_states", "set_rng_states"]


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
