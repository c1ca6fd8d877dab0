"""Examples rendered and tokenised for the post-training cache, in this process or in a pool of ``num_proc``.

Rendering a chat template and tokenising a conversation is the expensive part of building
the cache (about 10 ms for a 1.2k-token conversation on one CPU core), and examples are
independent, so batches of them go to forked worker processes, at most two batches per
process in flight, and come back in order: the cache does not depend on ``num_proc``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from lightning_moe.data.chat import SkippedExample, messages_of, tokenize_chat
from lightning_moe.errors import ConfigError

_BATCH = 64  # examples per worker task

Tokenized = tuple[np.ndarray, np.ndarray] | SkippedExample


class ExampleTokenizer:
    """One example's token ids and loss labels, or the :class:`SkippedExample` saying why it is skipped."""

    def __init__(self, tokenizer: Any, fmt: str, messages_field: str, text_field: str) -> None:
        self.tokenizer, self.fmt = tokenizer, fmt
        self.messages_field, self.text_field = messages_field, text_field

    def __call__(self, example: dict[str, Any], where: str) -> Tokenized:
        """``where`` (``"train example 3"``) completes a ``ConfigError`` about the example."""
        try:
            if self.fmt == "text":
                ids, labelled = self.tokenize_text(example.get(self.text_field))
                return (ids, labelled) if len(ids) else SkippedExample("with no text")
            return tokenize_chat(self.tokenizer, messages_of(example, self.messages_field))
        except SkippedExample as skipped:
            return skipped
        except ConfigError as err:
            raise ConfigError(f"{err} ({where})") from None

    def tokenize_text(self, text: Any) -> tuple[np.ndarray, np.ndarray]:
        """The tokenizer's own encoding (with its BOS when it adds one) and an EOS that ends the document."""
        if not text:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        ids = list(self.tokenizer(str(text))["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)

    def batch(self, items: list[tuple[int, dict[str, Any]]], split: str) -> list[Tokenized]:
        return [self(example, f"{split} example {index}") for index, example in items]


_worker: ExampleTokenizer | None = None


def _init_worker(tokenize: ExampleTokenizer) -> None:
    global _worker
    _worker = tokenize


def _in_worker(items: list[tuple[int, dict[str, Any]]], split: str) -> list[Tokenized]:
    return _worker.batch(items, split)


def tokenized(
    tokenize: ExampleTokenizer, items: Iterable[tuple[int, dict[str, Any]]], split: str, num_proc: int
) -> Iterator[tuple[int, Tokenized]]:
    """``(index, tokenize(example))`` for each ``(index, example)`` of ``items``, in order."""
    if num_proc <= 1:
        for index, example in items:
            yield index, tokenize(example, f"{split} example {index}")
        return
    # fork: workers start at once and inherit the tokenizer and template.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                                                initargs=(tokenize,)) as pool:
        pending: collections.deque = collections.deque()
        batch: list[tuple[int, dict[str, Any]]] = []

        def submit() -> None:
            pending.append(([index for index, _ in batch], pool.submit(_in_worker, list(batch), split)))
            batch.clear()

        for item in items:
            batch.append(item)
            if len(batch) == _BATCH:
                submit()
            while len(pending) > 2 * num_proc or (pending and pending[0][1].done()):
                indices, future = pending.popleft()
                yield from zip(indices, future.result())
        if batch:
            submit()
        while pending:
            indices, future = pending.popleft()
            yield from zip(indices, future.result())
