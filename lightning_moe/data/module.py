"""The Lightning data module: a corpus source, tokenised and cached, as resumable batches."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_moe.data.cache import _FORMAT_VERSION, _build_corpus, _Corpus, _load_corpus, _save_corpus
from lightning_moe.data.loading import ResumableDataLoader, ResumableSampler, TokenChunkDataset, _collate
from lightning_moe.data.sources import _FileSource, _resolve_source
from lightning_moe.data.tokenizers import BOS_ID, VOCAB_SIZE
from lightning_moe.testbed import TestbedSource, domain_labels, parse_testbed_source

_CACHE_ENV = "LIGHTNING_MOE_CACHE"


class TextDataModule(lightning.LightningDataModule):
    """Byte-level language-modelling batches from a text corpus.

    Args:
        source: ``"stdlib"``, a local file / folder / glob pattern, a Hugging Face
            dataset name (``"name"``, ``"name:config"``; prefix ``"hf:"`` to force it), or
            ``"testbed"`` / ``"testbed:<domains>"`` (synthetic languages, 4 by default;
            ``max_bytes`` sets its size, 2 MB by default).
        seq_len: tokens per training sequence.
        batch_size: sequences per batch.
        val_fraction: share of documents (and at least that share of bytes) held out for
            validation; at least one document. A single-document source holds out its tail.
        num_workers: DataLoader worker processes.
        cache_dir: where tokenised corpora are cached; default ``$LIGHTNING_MOE_CACHE`` or
            ``~/.cache/lightning_moe``.
        max_bytes: stop reading after this many bytes of text (documents in sorted order;
            the last one is cut), for quick experiments.
        hf_split: split passed to :func:`datasets.load_dataset`.
        hf_text_field: column holding the text in a Hugging Face dataset.
        seed: seeds the train/validation split and the training shuffle (and the testbed's text).

    Batches are tuples ``(input_ids, targets)``, both ``[batch_size, seq_len]`` int64,
    with ``targets`` the inputs shifted left by one token. The testbed's batches are
    ``(input_ids, targets, domains)``, ``domains`` the domain of each input token, and
    :attr:`num_domains` is its number of domains (``None`` for other sources).
    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        source: str = "stdlib",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.02,
        num_workers: int = 0,
        cache_dir: str | None = None,
        max_bytes: int | None = None,
        hf_split: str = "train",
        hf_text_field: str = "text",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise ValueError(f"source must be a non-empty string, got {source!r}")
        source = os.fspath(source)
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        if max_bytes is not None:
            _check_int("max_bytes", max_bytes, 1, "a positive integer or None")
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not (0.0 < float(val_fraction) < 1.0)
        ):
            raise ValueError(f"val_fraction must be a number with 0 < val_fraction < 1, got {val_fraction!r}")
        self.save_hyperparameters()
        self.source = source
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.num_workers = int(num_workers)
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.hf_split = hf_split
        self.hf_text_field = hf_text_field
        self.seed = int(seed)
        self.num_domains = parse_testbed_source(source)

        self.loaded_from_cache: bool = False
        """True when the token streams came from an existing on-disk cache file."""
        self.cache_path: str | None = None
        """The cache file of the current corpus (set by ``prepare_data``/``setup``)."""
        self._corpus: _Corpus | None = None
        self.train_dataset: TokenChunkDataset | None = None
        self.val_dataset: TokenChunkDataset | None = None

    # ----------------------------------------------------------------- lifecycle

    def prepare_data(self) -> None:
        """Tokenise the corpus and write the cache (Lightning calls this on rank 0 only)."""
        self._corpus = self._load_or_build()
        self._check_size(self._corpus)

    def setup(self, stage: str | None = None) -> None:
        """Load the token streams (from the cache when it exists) and build the datasets."""
        if self._corpus is None:
            self._corpus = self._load_or_build()
        self._check_size(self._corpus)
        corpus = self._corpus
        train_labels = val_labels = None
        if self.num_domains is not None:
            train_labels = domain_labels(corpus.train, corpus.train_documents, BOS_ID)
            val_labels = domain_labels(corpus.val, corpus.val_documents, BOS_ID)
        self.train_dataset = TokenChunkDataset(corpus.train, self.seq_len, train_labels)
        self.val_dataset = TokenChunkDataset(corpus.val, self.seq_len, val_labels)
        rank_zero_info(
            f"TextDataModule: byte-unigram entropy of the training tokens is {self.unigram_entropy():.3f} nats"
            " (the loss of a model that ignores context; val/loss should end well below it)."
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of this rank's data-parallel share, resumable mid-epoch.

        The order depends only on ``seed`` and the epoch (:class:`ResumableSampler`); under
        a data-parallel strategy each rank takes its share itself, and ``fit(ckpt_path=...)``
        continues an epoch after the batches already trained on (:class:`ResumableDataLoader`).
        """
        ds = self._require(self.train_dataset)
        sharding = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        num_replicas, rank = (sharding["num_replicas"], sharding["rank"]) if sharding else (1, 0)
        if len(ds) < num_replicas:
            raise ValueError(
                f"source={self.source!r}: the training split has {len(ds)} sequences of seq_len={self.seq_len},"
                f" fewer than the {num_replicas} data-parallel ranks; use more text or a smaller seq_len."
            )
        per_rank = len(ds) // num_replicas
        return ResumableDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=ResumableSampler(ds, num_replicas=num_replicas, rank=rank, seed=self.seed),
            # Dropping the ragged last batch keeps shapes static, but never drop the
            # only batch of a tiny corpus (that would make an empty epoch).
            drop_last=per_rank >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate,
            # Its own generator: creating an iterator then draws nothing from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
            batches_consumed=self._train_batches_consumed,
        )

    def _train_batches_consumed(self) -> int:
        """Training batches of the current epoch the trainer has used; ``sys.maxsize`` once it is over."""
        trainer = self.trainer
        if trainer is None:
            return 0
        used = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        # num_training_batches is the epoch's length after limit_train_batches.
        return used if used < trainer.num_training_batches else sys.maxsize

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._require(self.val_dataset),
            batch_size=self.batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate,
        )

    def test_dataloader(self) -> DataLoader:
        """The validation split: the corpus is split in two, so ``test`` reuses held-out data."""
        return self.val_dataloader()

    # ----------------------------------------------------------------- statistics

    @property
    def train_tokens(self) -> np.ndarray:
        """The training token stream (uint16), documents each preceded by ``BOS_ID``."""
        return self._require(self._corpus).train

    @property
    def val_tokens(self) -> np.ndarray:
        """The validation token stream (uint16)."""
        return self._require(self._corpus).val

    @property
    def train_documents(self) -> list[str]:
        """Names (relative paths, or ``split/index`` for Hub data) of training documents."""
        return self._require(self._corpus).train_documents

    @property
    def val_documents(self) -> list[str]:
        """Names of the validation documents."""
        return self._require(self._corpus).val_documents

    @property
    def num_train_tokens(self) -> int:
        return len(self.train_tokens)

    @property
    def num_val_tokens(self) -> int:
        return len(self.val_tokens)

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the token unigram distribution of the training stream.

        The cross-entropy a model reaches by predicting token frequencies alone, so a
        validation loss below it shows the model has learnt context.
        """
        counts = np.bincount(self.train_tokens, minlength=VOCAB_SIZE).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    # ----------------------------------------------------------------- internals

    def _require(self, value: Any) -> Any:
        if value is None:
            raise RuntimeError("TextDataModule: call prepare_data() and setup() first")
        return value

    def _resolved_cache_dir(self) -> str:
        if self.cache_dir is not None:
            return os.path.expanduser(os.fspath(self.cache_dir))
        env = os.environ.get(_CACHE_ENV)
        return os.path.expanduser(env) if env else os.path.join(Path.home(), ".cache", "lightning_moe")

    def _load_or_build(self) -> _Corpus:
        if self.num_domains is not None:
            src = TestbedSource(self.source, self.num_domains, self.seed)
        else:
            src = _resolve_source(self.source, self.hf_split, self.hf_text_field)
        key_material = {
            "format_version": _FORMAT_VERSION,
            "source": self.source,
            "identity": src.identity(),
            "max_bytes": self.max_bytes,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }
        key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.source).strip("_")[-40:] or "source"
        path = os.path.join(self._resolved_cache_dir(), f"tokens-{slug}-{key}.npz")
        self.cache_path = path
        if os.path.isfile(path):
            try:
                corpus = _load_corpus(path)
                self.loaded_from_cache = True
                return corpus
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                # A truncated, corrupt or foreign file: rebuild it rather than fail.
                warnings.warn(f"ignoring unreadable token cache {path!r} ({err}); rebuilding")

        start = time.perf_counter()
        docs = list(src.documents(self.max_bytes))
        if self.max_bytes is not None:
            docs = _cap(docs, self.max_bytes)
        total = sum(len(d) for _, d in docs)
        if total == 0:
            what = "no files" if isinstance(src, _FileSource) and not src.files else "0 bytes of text"
            raise ValueError(
                f"source={self.source!r}: found {what} in {src.describe()} (0 bytes); need at "
                f"least {self._bytes_needed()} bytes of text for one training and one "
                f"validation sequence of seq_len={self.seq_len}"
            )
        corpus = _build_corpus(docs, self.val_fraction, self.seed)
        self.loaded_from_cache = False
        try:
            _save_corpus(path, corpus, key_material)
        except OSError as err:
            # A read-only home directory should not stop training; it only costs speed.
            warnings.warn(f"could not write token cache {path!r}: {err}")
        rank_zero_info(
            f"TextDataModule: {total:,} bytes from {len(docs):,} documents of "
            f"{src.describe()} tokenised in {time.perf_counter() - start:.1f}s "
            f"(train {len(corpus.train):,} / val {len(corpus.val):,} tokens) -> {path}"
        )
        return corpus

    def _bytes_needed(self) -> int:
        # Each split needs seq_len + 1 tokens, one of them the BOS marker, and holds
        # roughly its share of the bytes.
        share = min(self.val_fraction, 1.0 - self.val_fraction)
        return max(2 * self.seq_len, math.ceil(self.seq_len / share))

    def _check_size(self, corpus: _Corpus) -> None:
        need = self.seq_len + 1
        if len(corpus.train) < need or len(corpus.val) < need:
            raise ValueError(
                f"source={self.source!r}: found {corpus.total_bytes} bytes of text, giving "
                f"{len(corpus.train)} training and {len(corpus.val)} validation tokens; each "
                f"split needs at least seq_len + 1 = {need} tokens, i.e. about "
                f"{self._bytes_needed()} bytes in total with val_fraction={self.val_fraction}. "
                "Use more text (or a larger max_bytes), a smaller seq_len, or a different "
                "val_fraction."
            )


def _cap(docs: list[tuple[str, bytes]], max_bytes: int) -> list[tuple[str, bytes]]:
    out, total = [], 0
    for name, data in docs:
        if total >= max_bytes:
            break
        take = data[: max_bytes - total]
        out.append((name, take))
        total += len(take)
    return out


def _check_int(field: str, value: Any, minimum: int, expected: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field} must be {expected or f'an integer >= {minimum}'}, got {value!r}")
