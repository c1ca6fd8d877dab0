"""The on-disk cache of :class:`~lightning_moe.data.PostTrainDataModule`: examples tokenised once, as memory-mapped rows.

A cache is a folder named after a hash of everything its rows depend on (the source's
fingerprint, the tokenizer, the chat template, ``seq_len``, packing, the format and the
split settings) holding, for each split (``train``, ``validation``):

* ``<split>.inputs.bin``: the rows' input ids, ``[rows, seq_len]`` (uint16 when the
  vocabulary leaves room for the no-loss marker, else uint32);
* ``<split>.targets.bin``: their targets, same shape and dtype, the dtype's largest value
  where no loss is taken (read back as ``IGNORE_INDEX``);
* ``<split>.windows.npz``: the lengths of the windows (examples) of every row, row by row,
  from which :class:`CachedRows` makes the ``position_ids``;
* ``meta.json``, written last: the key, the dtype, what was skipped and truncated, and for
  every other file its size and CRC-32.

It is built the way ``TextDataModule``'s token cache is (:mod:`~lightning_moe.data.cache`):
under :class:`~lightning_moe.data.build_lock.BuildLock` (one builder per cache among
processes and hosts sharing the folder), written into the lock's temporary folder and renamed
when complete, so a killed build leaves nothing a later run trusts. While examples are
tokenised their tokens go to a stream file on disk, not to memory; rows are cut from it
once every window's length is known (packing needs them all), so memory stays small
whatever the size of the dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_moe.data.build_lock import OWNER_RECORD
from lightning_moe.data.cache import _record, build_once, read_checked_meta
from lightning_moe.data.loading import IGNORE_INDEX
from lightning_moe.data.packing import PackedBatch, assign_rows, example_windows, row_position_ids

CACHE_VERSION = 1
"""Bump whenever the cached files would change for the same inputs."""
_ROWS_PER_WRITE = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id and, above them, the no-loss marker."""
    return np.dtype(np.uint16 if vocab_size < np.iinfo(np.uint16).max else np.uint32)


class ExampleStream:
    """One split's examples, appended to a token stream on disk, then cut into rows (:meth:`write_rows`)."""

    def __init__(self, folder: str, split: str, dtype: np.dtype, seq_len: int, split_long: bool) -> None:
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        self.seq_len, self.split_long = seq_len, split_long
        # Open across many add() calls; write_rows closes them (a failed build deletes the folder).
        self._tokens = open(self._path("stream.bin"), "wb")  # noqa: SIM115
        self._labels = open(self._path("labels.bin"), "wb")  # noqa: SIM115
        self.size = 0
        self.starts: list[int] = []  # stream offset of every window
        self.lengths: list[int] = []

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, f"{self.split}.{name}")

    def windows(self, ids: np.ndarray, labelled: np.ndarray) -> tuple[list[tuple[int, int]], int]:
        """The windows the example would get and how many of its labelled tokens would never be predicted."""
        windows, _ = example_windows(len(ids), self.seq_len, self.split_long)
        predicted = np.zeros(len(ids), dtype=bool)
        for start, length in windows:
            predicted[start + 1 : start + length + 1] = True
        return windows, int((labelled & ~predicted).sum())

    def add(self, ids: np.ndarray, labelled: np.ndarray, windows: list[tuple[int, int]]) -> None:
        """Append one example (token ids and whether each carries loss) with its ``windows``."""
        np.asarray(ids, dtype=self.dtype).tofile(self._tokens)
        np.asarray(labelled, dtype=np.uint8).tofile(self._labels)
        for start, length in windows:
            self.starts.append(self.size + start)
            self.lengths.append(length)
        self.size += len(ids)

    def write_rows(self, packing: bool, pad_id: int) -> int:
        """Write the split's rows (and drop the stream); returns how many there are."""
        self._tokens.close()
        self._labels.close()
        lengths = np.asarray(self.lengths, dtype=np.int64)
        starts = np.asarray(self.starts, dtype=np.int64)
        row_W, order_W = assign_rows(lengths, self.seq_len, packing)
        rows = int(row_W.max()) + 1 if len(row_W) else 0
        per_row = np.bincount(row_W, minlength=rows)
        np.savez(self._path("windows.npz"), row_offsets=np.concatenate([[0], np.cumsum(per_row)]),
                 lengths=lengths[order_W].astype(np.int32))
        no_loss = np.iinfo(self.dtype).max
        tokens = np.memmap(self._path("stream.bin"), dtype=self.dtype, mode="r") if self.size else np.zeros(0)
        labels = np.memmap(self._path("labels.bin"), dtype=np.uint8, mode="r") if self.size else np.zeros(0)
        windows = iter(order_W.tolist())
        with open(self._path("inputs.bin"), "wb") as inputs_fh, open(self._path("targets.bin"), "wb") as targets_fh:
            for first in range(0, rows, _ROWS_PER_WRITE):
                count = min(_ROWS_PER_WRITE, rows - first)
                inputs_RT = np.full((count, self.seq_len), pad_id, dtype=self.dtype)
                targets_RT = np.full((count, self.seq_len), no_loss, dtype=self.dtype)
                for r in range(count):
                    slot = 0
                    for _ in range(per_row[first + r]):
                        w = next(windows)
                        start, length = starts[w], lengths[w]
                        inputs_RT[r, slot : slot + length] = tokens[start : start + length]
                        following = slice(start + 1, start + length + 1)
                        targets_RT[r, slot : slot + length] = np.where(labels[following], tokens[following], no_loss)
                        slot += length
                inputs_RT.tofile(inputs_fh)
                targets_RT.tofile(targets_fh)
        del tokens, labels
        for name in ("stream.bin", "labels.bin"):
            os.unlink(self._path(name))
        return rows


class CachedRows(Dataset):
    """The rows of one split of a cache, read through ``np.memmap``.

    Items are ``(input_ids, targets)`` int64 ``[seq_len]`` rows, or with ``packed``
    :class:`~lightning_moe.data.packing.PackedBatch` items that add their ``position_ids``.
    """

    def __init__(self, folder: str, split: str, meta: dict[str, Any], packed: bool) -> None:
        self.folder, self.split, self.packed = folder, split, packed
        self.seq_len, self.dtype = int(meta["seq_len"]), np.dtype(meta["dtype"])
        self.rows = int(meta["splits"][split]["rows"])
        with np.load(os.path.join(folder, f"{split}.windows.npz")) as windows:
            self.row_offsets, self.lengths = windows["row_offsets"], windows["lengths"]
        self._maps: tuple[np.ndarray, np.ndarray] | None = None  # opened on first use (also in each worker)

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _maps=None)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} out of range for {self.rows} rows")
        if self._maps is None:
            shape = (self.rows, self.seq_len)
            self._maps = tuple(
                np.memmap(os.path.join(self.folder, f"{self.split}.{name}.bin"), dtype=self.dtype, mode="r",
                          shape=shape)
                for name in ("inputs", "targets")
            )
        inputs_T = torch.from_numpy(self._maps[0][index].astype(np.int64))
        targets = self._maps[1][index].astype(np.int64)
        targets[targets == np.iinfo(self.dtype).max] = IGNORE_INDEX
        targets_T = torch.from_numpy(targets)
        if not self.packed:
            return inputs_T, targets_T
        lengths = self.lengths[self.row_offsets[index] : self.row_offsets[index + 1]]
        return PackedBatch(inputs_T, targets_T, torch.from_numpy(row_position_ids(lengths, self.seq_len)))


def open_rows_cache(path: str, key: str, verify: bool) -> dict[str, Any]:
    """The ``meta.json`` of the cache folder ``path``; :class:`CacheDamaged` when a file is missing or altered.

    ``verify`` reads every file once to check its CRC-32 (sizes are always checked).
    """
    return read_checked_meta(path, {"key": key}, verify)


def build_rows_cache(
    path: str, meta: dict[str, Any], write: Callable[[str], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Build the cache folder ``path`` with ``write(folder)`` (which returns more metadata): ``(meta, built)``.

    Built once among all builders sharing the folder (:func:`~lightning_moe.data.cache.build_once`);
    one whose turn comes after another finished the cache opens that instead (its CRCs checked;
    ``built`` false).
    """

    def write_with_meta(folder: str) -> None:
        full = dict(meta, **write(folder))
        names = sorted(name for name in os.listdir(folder) if name != OWNER_RECORD)
        full["files"] = {name: _record(os.path.join(folder, name)) for name in names}
        with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(full, fh)

    opened, built = build_once(
        path, write_with_meta, lambda finished: open_rows_cache(finished, meta["key"], verify=True)
    )
    if built:  # just written: sizes checked, no need to read it back
        opened = open_rows_cache(path, meta["key"], verify=False)
    return opened, built
