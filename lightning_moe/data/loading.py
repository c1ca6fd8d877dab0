"""Fixed-length training windows over a token stream, and a sampler/loader that resume mid-epoch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_moe.errors import ConfigError
from lightning_moe.lightning_versions import require_tested_lightning

#: The target of a position no loss falls on (a prompt, padding, another example's tokens):
#: the data writes it, the models' loss skips it (PyTorch's and transformers' default, -100).
IGNORE_INDEX = -100


class TokenChunkDataset(Dataset):
    """Consecutive windows of ``seq_len + 1`` tokens over one token stream.

    Item ``i`` is ``(input_ids, targets)`` with ``input_ids = stream[i*L : i*L + L]`` and
    ``targets = stream[i*L + 1 : i*L + L + 1]`` (``L = seq_len``, int64). Windows advance by
    ``seq_len``, so neighbouring windows share only their boundary token: inputs never
    overlap and every token after the first is a prediction target exactly once.

    With ``labels`` (one int per token of the stream, e.g. its domain) items are
    ``(input_ids, targets, input_labels)``.
    """

    def __init__(self, tokens: Any, seq_len: int, labels: np.ndarray | None = None) -> None:
        # Any sliceable token stream: an ndarray, or the memory-mapped TokenStream of a cache.
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.labels = labels

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} chunks")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        if self.labels is None:
            return window[:-1], window[1:]
        return window[:-1], window[1:], torch.from_numpy(self.labels[start : start + self.seq_len].astype(np.int64))


def _collate(batch: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    # default_collate turns tuples into lists; batches are documented as tuples, and a
    # named tuple (PackedBatch) stays one so that models can tell it apart.
    stacked = [torch.stack(items) for items in zip(*batch)]
    kind = type(batch[0])
    return kind(*stacked) if hasattr(kind, "_fields") else tuple(stacked)


class ResumableSampler(DistributedSampler):
    """Shuffled indices of one data-parallel rank that can resume in the middle of an epoch.

    The order of epoch ``e`` is ``DistributedSampler``'s: a permutation drawn from
    ``seed + e`` of which rank ``r`` of ``W`` takes every ``W``-th index, starting at ``r``.
    It depends only on the seed and the epoch (which Lightning sets through
    :meth:`set_epoch`), never on the global RNG, and the first ``n * W`` indices of the
    permutation are exactly the first ``n`` of every rank: ``W`` ranks with batch ``B``
    see, step by step, the same samples as one process with batch ``W * B``.

    :meth:`resume` skips the samples of an epoch that were already trained on, given as
    a count over all ranks, so a run can also resume with a different number of ranks.
    Subclassing ``DistributedSampler`` keeps Lightning from replacing it with its own.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        # drop_last: every rank gets the same number of samples, with none repeated.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0  # samples of this rank's share of the current epoch not to yield again

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def resume(self, epoch: int, samples_seen: int) -> None:
        """Continue epoch ``epoch`` after its first ``samples_seen`` samples (summed over ranks)."""
        self.epoch, self.skip = epoch, samples_seen // self.num_replicas
        if self.skip >= self.num_samples:
            self.epoch, self.skip = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        # DistributedSampler's order (shuffle, drop_last), kept as one int32 tensor (the
        # same permutation as its int64 one): its list of Python ints costs 36 bytes per
        # window, ~300 MB for a 2 GB byte corpus, this 4 bytes.
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        indices = torch.randperm(n, generator=g, dtype=torch.int32 if n < 2**31 else torch.int64)[: self.total_size]
        mine = indices[self.rank : self.total_size : self.num_replicas][self.skip :]
        for start in range(0, len(mine), 2**16):
            yield from mine[start : start + 2**16].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position Lightning saves in checkpoints.

    Lightning stores the ``state_dict`` of every training loader that has one and hands
    it back to ``load_state_dict`` before iterating on ``fit(ckpt_path=...)``; a plain
    DataLoader would restart the epoch from its first batch. The position saved is the
    number of batches the training loop has consumed in the current epoch, which
    ``batches_consumed`` reports (a count of at least ``len(self)`` means the epoch is
    over; ``TextDataModule`` reads it from the trainer's loop progress): the loader
    cannot count them itself, because the loop fetches batches ahead of using them.
    ``len`` stays the full epoch's, as Lightning expects of a resumed loader.
    """

    def __init__(self, *args: Any, batches_consumed: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_consumed = batches_consumed

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler) or self.batches_consumed is None or self.batch_size is None:
            return {}
        consumed = self.batches_consumed()
        return {
            "epoch": sampler.epoch,
            "samples_seen": min(consumed, len(self)) * self.batch_size * sampler.num_replicas,
            "epoch_done": consumed >= len(self),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or not isinstance(self.sampler, ResumableSampler):
            return
        epoch = int(state_dict["epoch"])
        if state_dict.get("epoch_done"):
            self.sampler.resume(epoch + 1, 0)
        else:
            self.sampler.resume(epoch, int(state_dict["samples_seen"]))


def resumable_train_loader(
    dataset: Dataset, trainer: Any, *, batch_size: int, seed: int, num_workers: int, too_few: Callable[[int, int], str]
) -> ResumableDataLoader:
    """Shuffled training batches of this rank's data-parallel share, resumable mid-epoch.

    The order depends only on ``seed`` and the epoch (:class:`ResumableSampler`); under a
    data-parallel strategy of ``trainer`` each rank takes its share itself, and
    ``fit(ckpt_path=...)`` continues an epoch after the batches already trained on. A
    dataset with fewer rows than ranks raises ``ConfigError(too_few(rows, ranks))``.
    """
    if trainer is not None:
        require_tested_lightning("resuming mid-epoch (the loader skips the batches already trained on)")
    sharding = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    num_replicas, rank = (sharding["num_replicas"], sharding["rank"]) if sharding else (1, 0)
    if len(dataset) < num_replicas:
        raise ConfigError(too_few(len(dataset), num_replicas))

    def batches_consumed() -> int:
        # Training batches of the current epoch the trainer has used; sys.maxsize once it is over
        # (num_training_batches is the epoch's length after limit_train_batches).
        if trainer is None:
            return 0
        used = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return used if used < trainer.num_training_batches else sys.maxsize

    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed),
        # Dropping the ragged last batch keeps shapes static, but never drop the only batch
        # of a tiny dataset (that would make an empty epoch).
        drop_last=len(dataset) // num_replicas >= batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=_collate,
        # Its own generator: creating an iterator then draws nothing from the global RNG.
        generator=torch.Generator().manual_seed(seed),
        batches_consumed=batches_consumed,
    )


def eval_loader(dataset: Dataset, *, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    """Validation or test batches in order; like :func:`resumable_train_loader`'s, its iterators draw nothing
    from the global RNG (they draw their base seed from the loader's own generator)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=_collate,
    )


class ResumableLoaders(lightning.LightningDataModule):
    """The loaders of this library's data modules: :func:`resumable_train_loader` over
    ``train_dataset`` and :func:`eval_loader` over ``val_dataset`` (both set in ``setup``).

    A subclass has ``batch_size``, ``seed`` and ``num_workers`` attributes and says, in
    :meth:`too_few_rows`, what to do when its training split has fewer rows than ranks.
    """

    train_dataset: Dataset | None = None
    val_dataset: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of this rank's data-parallel share, resumable mid-epoch.

        The order depends only on ``seed`` and the epoch (:class:`ResumableSampler`); under
        a data-parallel strategy each rank takes its share itself, and ``fit(ckpt_path=...)``
        continues an epoch after the batches already trained on (:class:`ResumableDataLoader`).
        """
        return resumable_train_loader(
            self._require(self.train_dataset), self.trainer, batch_size=self.batch_size, seed=self.seed,
            num_workers=self.num_workers, too_few=self.too_few_rows,
        )

    def val_dataloader(self) -> DataLoader:
        return eval_loader(
            self._require(self.val_dataset), batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers
        )

    def too_few_rows(self, rows: int, ranks: int) -> str:
        """The one-line error for a training split of ``rows`` rows under ``ranks`` data-parallel ranks."""
        raise NotImplementedError

    def _require(self, value: Any) -> Any:
        if value is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() first")
        return value
