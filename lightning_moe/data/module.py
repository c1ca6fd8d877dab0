"""The Lightning data module: a corpus source, tokenised and cached, as resumable batches."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_moe.data.cache import (
    FORMAT_VERSION,
    CacheDamaged,
    Corpus,
    EmptyCorpus,
    TokenStream,
    build_cache,
    open_cache,
)
from lightning_moe.data.loading import ResumableLoaders, TokenChunkDataset
from lightning_moe.data.sources import FileSource, capped, resolve_source
from lightning_moe.data.tokenizers import Tokenizer, load_tokenizer
from lightning_moe.errors import ConfigError
from lightning_moe.testbed import TestbedSource, domain_labels, parse_testbed_source

_CACHE_ENV = "LIGHTNING_MOE_CACHE"


class TextDataModule(ResumableLoaders):
    """Language-modelling batches from a text corpus, tokenised once into a memory-mapped cache.

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
        tokenizer: ``"bytes"`` (UTF-8 bytes, vocabulary 258) or a Hugging Face tokenizer: a
            ``tokenizer.json`` file, a folder holding one, or a Hub name loaded with
            ``transformers.AutoTokenizer`` (:mod:`lightning_moe.data.tokenizers`).
        num_proc: processes that tokenise the corpus when the cache is built (the cache
            does not depend on it).
        max_tokens: stop after this many tokens (counting one start-of-document token per
            document; the last document is cut).
        hf_streaming: read a Hugging Face dataset as a stream instead of downloading it
            whole (``datasets.load_dataset(streaming=True)``); needs ``max_bytes`` or
            ``max_tokens`` to bound it.

    Batches are tuples ``(input_ids, targets)``, both ``[batch_size, seq_len]`` int64,
    with ``targets`` the inputs shifted left by one token. The testbed's batches are
    ``(input_ids, targets, domains)``, ``domains`` the domain of each input token, and
    :attr:`num_domains` is its number of domains (``None`` for other sources).
    :attr:`vocab_size` is the tokenizer's; ``lightning-moe`` links ``model.vocab_size`` to it.
    """

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
        tokenizer: str = "bytes",
        num_proc: int = 1,
        max_tokens: int | None = None,
        hf_streaming: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise ConfigError(f"data.source must be a non-empty string, got {source!r}")
        source = os.fspath(source)
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("num_proc", num_proc, 1)
        if max_bytes is not None:
            _check_int("max_bytes", max_bytes, 1, "a positive integer or None")
        if max_tokens is not None:
            _check_int("max_tokens", max_tokens, 1, "a positive integer or None")
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not (0.0 < float(val_fraction) < 1.0)
        ):
            raise ConfigError(f"data.val_fraction must be a number with 0 < val_fraction < 1, got {val_fraction!r}")
        if hf_streaming and max_bytes is None and max_tokens is None:
            raise ConfigError("data.hf_streaming=true needs data.max_bytes or data.max_tokens to bound the stream")
        self.save_hyperparameters()
        self.source = source
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.num_workers = int(num_workers)
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
        self.hf_split = hf_split
        self.hf_text_field = hf_text_field
        self.hf_streaming = bool(hf_streaming)
        self.seed = int(seed)
        self.num_proc = int(num_proc)
        self.num_domains = parse_testbed_source(source)
        # Loaded now, not in setup: the model's vocab_size is linked to it when the CLI
        # instantiates the classes, and a tokenizer that cannot load should fail first.
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        self.vocab_size: int = self.tokenizer.vocab_size
        """Number of token ids of the tokenizer (the embedding size a model needs)."""

        self.loaded_from_cache: bool = False
        """True when the token streams came from an existing on-disk cache."""
        self.cache_path: str | None = None
        """The cache folder of the current corpus (set by ``prepare_data``/``setup``)."""
        self._corpus: Corpus | None = None
        self.train_dataset: TokenChunkDataset | None = None
        self.val_dataset: TokenChunkDataset | None = None

    # ----------------------------------------------------------------- lifecycle

    def prepare_data(self) -> None:
        """Tokenise the corpus and write the cache (Lightning calls this on rank 0 only)."""
        self._check_fits_model()
        self._corpus = self._load_or_build()
        self._check_size(self._corpus)

    def setup(self, stage: str | None = None) -> None:
        """Open the token cache (building it if needed) and build the datasets."""
        self._check_fits_model()
        if self._corpus is None:
            self._corpus = self._load_or_build()
        self._check_size(self._corpus)
        corpus = self._corpus
        train_labels = val_labels = None
        if self.num_domains is not None:
            start = self.tokenizer.doc_start_id
            train_labels = domain_labels(np.asarray(corpus.train), corpus.documents(0), start)
            val_labels = domain_labels(np.asarray(corpus.val), corpus.documents(1), start)
        self.train_dataset = TokenChunkDataset(corpus.train, self.seq_len, train_labels)
        self.val_dataset = TokenChunkDataset(corpus.val, self.seq_len, val_labels)
        rank_zero_info(
            f"TextDataModule: unigram entropy of the training tokens is {self.unigram_entropy():.3f} nats"
            " (the loss of a model that ignores context; val/loss should end well below it)."
        )

    def too_few_rows(self, rows: int, ranks: int) -> str:
        return (
            f"data.source={self.source!r}: the training split has {rows} sequences of"
            f" data.seq_len={self.seq_len}, fewer than the {ranks} data-parallel ranks;"
            " use more text or a smaller seq_len"
        )

    def test_dataloader(self) -> DataLoader:
        """The validation split: the corpus is split in two, so ``test`` reuses held-out data."""
        return self.val_dataloader()

    # ----------------------------------------------------------------- statistics

    @property
    def train_tokens(self) -> TokenStream:
        """The training token stream (memory-mapped), documents each preceded by the tokenizer's ``doc_start_id``."""
        return self._require(self._corpus).train

    @property
    def val_tokens(self) -> TokenStream:
        """The validation token stream (memory-mapped)."""
        return self._require(self._corpus).val

    @property
    def train_documents(self) -> list[str]:
        """Names (relative paths, or ``split/index`` for Hub data) of training documents."""
        return self._require(self._corpus).documents(0)

    @property
    def val_documents(self) -> list[str]:
        """Names of the validation documents."""
        return self._require(self._corpus).documents(1)

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
        counts = self._require(self._corpus).train_counts.astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    # ----------------------------------------------------------------- internals

    def _resolved_cache_dir(self) -> str:
        if self.cache_dir is not None:
            return os.path.expanduser(os.fspath(self.cache_dir))
        env = os.environ.get(_CACHE_ENV)
        return os.path.expanduser(env) if env else os.path.join(Path.home(), ".cache", "lightning_moe")

    def _check_fits_model(self) -> None:
        """Refuse, before any tokenising, a model too small for this data (when one is attached)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        hparams = getattr(module, "hparams", None) or {}
        model_vocab, max_seq_len = hparams.get("vocab_size"), hparams.get("max_seq_len")
        if isinstance(model_vocab, int) and self.vocab_size > model_vocab:
            raise ConfigError(
                f"data.tokenizer={self.tokenizer.name!r} has {self.vocab_size} tokens, more than"
                f" model.vocab_size={model_vocab}; set model.vocab_size to at least {self.vocab_size}"
            )
        if isinstance(max_seq_len, int) and self.seq_len > max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.seq_len} is longer than model.max_seq_len={max_seq_len};"
                f" use data.seq_len <= {max_seq_len} or a larger model.max_seq_len"
            )

    def _load_or_build(self) -> Corpus:
        if self.num_domains is not None:
            src = TestbedSource(self.source, self.num_domains, self.seed)
        else:
            src = resolve_source(self.source, self.hf_split, self.hf_text_field, self.hf_streaming)
        key_material = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "identity": src.identity(),
            "max_bytes": self.max_bytes,
            "max_tokens": self.max_tokens,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "tokenizer": self.tokenizer.fingerprint(),
        }
        key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.source).strip("_")[-40:] or "source"
        tok_slug = "" if self.tokenizer.name == "bytes" else "bpe-"
        path = os.path.join(self._resolved_cache_dir(), f"tokens-{tok_slug}{slug}-{key}")
        self.cache_path = path
        if os.path.isdir(path):
            try:
                corpus = open_cache(path, {"key": key})
                self.loaded_from_cache = True
                return corpus
            except CacheDamaged as err:
                # A damaged or foreign cache: rebuild it rather than fail or train on it.
                warnings.warn(f"token cache {path!r} is damaged ({err}); rebuilding it", stacklevel=2)
        elif os.path.exists(path):
            os.unlink(path)  # a file where the cache folder belongs

        start = time.perf_counter()
        documents = src.documents(self.max_bytes)
        if self.max_bytes is not None:
            documents = capped(documents, self.max_bytes)
        try:
            corpus = build_cache(
                path,
                documents,
                self.tokenizer,
                meta={"key": key, "key_material": key_material, "tokenizer": self.tokenizer.name},
                val_fraction=self.val_fraction,
                seed=self.seed,
                num_proc=self.num_proc,
                max_tokens=self.max_tokens,
            )
        except EmptyCorpus:
            what = "no files" if isinstance(src, FileSource) and not src.files else "0 bytes of text"
            raise ConfigError(
                f"data.source={self.source!r}: found {what} in {src.describe()} (0 bytes); need at least"
                f" {self._bytes_needed()} bytes of text for one training and one validation sequence"
                f" of seq_len={self.seq_len}"
            ) from None
        self.loaded_from_cache = not corpus.built_here
        if self.loaded_from_cache:  # another process or host built it while this one waited for its turn
            rank_zero_info(f"TextDataModule: opened the token cache another builder finished -> {path}")
            return corpus
        meta = corpus.meta
        rank_zero_info(
            f"TextDataModule: {meta['total_bytes']:,} bytes from {meta['num_documents']:,} documents of "
            f"{src.describe()} tokenised in {time.perf_counter() - start:.1f}s "
            f"(train {len(corpus.train):,} / val {len(corpus.val):,} tokens) -> {path}"
        )
        return corpus

    def _bytes_needed(self) -> int:
        # Each split needs seq_len + 1 tokens, one of them the document start marker, and
        # holds roughly its share of the bytes.
        share = min(self.val_fraction, 1.0 - self.val_fraction)
        return max(2 * self.seq_len, math.ceil(self.seq_len / share))

    def _check_size(self, corpus: Corpus) -> None:
        need = self.seq_len + 1
        if len(corpus.train) < need or len(corpus.val) < need:
            raise ConfigError(
                f"data.source={self.source!r}: found {corpus.total_bytes} bytes of text, giving "
                f"{len(corpus.train)} training and {len(corpus.val)} validation tokens; each "
                f"split needs at least data.seq_len + 1 = {need} tokens, i.e. about "
                f"{self._bytes_needed()} bytes in total with val_fraction={self.val_fraction}. "
                "Use more text (or a larger max_bytes), a smaller seq_len, or a different "
                "val_fraction."
            )


def _check_int(field: str, value: Any, minimum: int, expected: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{field} must be {expected or f'an integer >= {minimum}'}, got {value!r}")
