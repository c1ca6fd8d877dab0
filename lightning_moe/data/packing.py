"""Rows of whole examples, and the ``position_ids`` that keep each example's attention to itself.

An example of ``n`` tokens is ``n - 1`` predictions: inputs ``ids[:-1]``, targets ``ids[1:]``
(its last token is never an input, so no token predicts across the boundary into the next
example). A *window* is the run of inputs an example contributes to one row: at most
``seq_len`` of them (a longer conversation is truncated; a longer text document is cut into
windows of ``seq_len`` advancing by ``seq_len``, as ``TextDataModule`` cuts its stream).

Packed rows hold several windows side by side, placed by best-fit decreasing (each window,
longest first, into the fullest row it still fits, as Axolotl's and TRL's packers do); the
rest of a row is padding, whose targets carry no loss. ``position_ids`` restart at 0 at every
window, which is how Hugging Face models tell the examples of a row apart: transformers builds
the block-diagonal causal mask from them for ``sdpa``, ``eager`` and ``flex_attention``, and
flash-attention reads them as ``cu_seqlens`` (:func:`lightning_moe.hf.packed.packed_forward`).
Padding continues the positions of the window before it: it attends to that example, which
changes nothing (its outputs carry no loss and no earlier token sees it), and a row holding one
example stays a plain causal row that attention kernels run without a mask.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np
from torch import Tensor


class PackedBatch(NamedTuple):
    """A batch of packed rows: ``(input_ids, targets, position_ids)``, each ``[B, T]`` int64.

    A named tuple so that it stays distinguishable from other three-part batches
    (``TextDataModule``'s domain labels) through collation and device transfer, while
    ``batch[0]`` and ``batch[1]`` remain the inputs and targets every model reads.
    """

    input_ids: Tensor
    targets: Tensor
    position_ids: Tensor


def position_ids_of(batch: tuple[Tensor, ...]) -> Tensor | None:
    """The ``position_ids`` of a batch of packed rows, ``None`` for any other batch (one sequence per row)."""
    return batch.position_ids if isinstance(batch, PackedBatch) else None


def example_windows(num_tokens: int, seq_len: int, split_long: bool) -> tuple[list[tuple[int, int]], int]:
    """The windows ``[(start, length), ...]`` of an example of ``num_tokens`` tokens, and the tokens left out.

    ``split_long``: cut a long example into consecutive windows (text); otherwise keep its
    first window only (a conversation: later turns without their context would teach nothing).
    Tokens left out are those never predicted: ``num_tokens - 1 - sum(lengths)``.
    """
    predictions = max(0, num_tokens - 1)
    if not split_long:
        length = min(predictions, seq_len)
        return ([(0, length)] if length else []), predictions - length
    windows = [(start, min(seq_len, predictions - start)) for start in range(0, predictions, seq_len)]
    return windows, 0


def assign_rows(lengths: np.ndarray, seq_len: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row of each window and the order of windows within rows: ``(row_W, order_W)``.

    Without packing every window has a row of its own, in order. With packing, best-fit
    decreasing: windows by decreasing length (ties in their order), each into the row with
    the least room that still holds it, else a new row. ``order_W`` lists the window indices
    row by row, each row's windows in the order they were placed.
    """
    n = len(lengths)
    if not packing:
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    row_W = np.empty(n, dtype=np.int64)
    room: list[tuple[int, int]] = []  # (free slots, row), sorted; full rows leave the list
    rows = 0
    for window in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable"):
        length = int(lengths[window])
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = seq_len, rows
            rows += 1
        row_W[window] = row
        if free - length:
            bisect.insort(room, (free - length, row))
    # Within a row, windows in placement order (decreasing length, then index): a stable sort by row.
    placed = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    order_W = placed[np.argsort(row_W[placed], kind="stable")]
    return row_W, order_W


def row_position_ids(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """``position_ids [seq_len]`` of a row holding windows of ``lengths`` (in row order), then padding.

    Each window counts from 0; the padding after the last window continues its count.
    """
    starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64) if len(lengths) else np.zeros(1, np.int64)
    slots = np.arange(seq_len, dtype=np.int64)
    return slots - starts[np.searchsorted(starts, slots, side="right") - 1]
