"""Byte-level text data for MoE language models.

:class:`TextDataModule` turns a corpus into fixed-length next-token-prediction batches.
Corpora:

* ``"stdlib"`` (default): the ``.py`` files of the running Python's standard library
  (about 12 MB). Every machine has it, so training works offline with no download.
* a local file, folder (recursive) or glob pattern of text files.
* a Hugging Face dataset name, optionally ``"name:config"`` (``"hf:"`` prefix forces
  this reading), loaded with :func:`datasets.load_dataset`.
* ``"testbed"`` or ``"testbed:<domains>"``: a mixture of synthetic languages generated
  from the seed (:mod:`lightning_moe.testbed`), whose batches also carry each token's
  domain.

Tokens are raw UTF-8 bytes (ids 0..255) plus two specials, so no tokenizer has to be
downloaded: :data:`BOS_ID` starts every document, :data:`EOS_ID` is reserved for
padding / end of sequence. The train/validation split is by document, and the token
streams are cached on disk so that a second run starts in well under a second.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
import sysconfig
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_moe.testbed import TestbedSource, domain_labels, parse_testbed_source

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "TextDataModule",
    "TokenChunkDataset",
    "decode",
    "encode",
]

VOCAB_SIZE = 258
"""Size of the byte-level vocabulary: 256 byte values plus BOS and EOS/padding."""
BYTE_VOCAB_SIZE = VOCAB_SIZE
"""Alias of :data:`VOCAB_SIZE` (the embedding size a byte-level model needs)."""
BOS_ID = 256
"""Start-of-document token; also the separator between concatenated documents."""
EOS_ID = 257
"""End-of-sequence / padding token (never emitted by the corpus itself)."""
PAD_ID = EOS_ID

# Bump whenever the cached arrays would change for the same inputs.
_FORMAT_VERSION = 1
_CACHE_ENV = "LIGHTNING_MOE_CACHE"
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test"}
)
# A Hub id is "name" or "namespace/name", optionally ":config"; anything else that does
# not exist locally is reported as a missing path rather than sent to the Hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(:[\w.\-]+)?$")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")
_GLOB_CHARS = frozenset("*?[")


def encode(text: str, bos: bool = False) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint16 token ids, optionally preceded by :data:`BOS_ID`."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    if bos:
        data = np.concatenate([np.array([BOS_ID], dtype=np.uint16), data])
    return data


def decode(ids: Any) -> str:
    """Text of a sequence of token ids; special tokens are dropped, broken UTF-8 replaced."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids).reshape(-1)
    return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class TokenChunkDataset(Dataset):
    """Consecutive windows of ``seq_len + 1`` tokens over one token stream.

    Item ``i`` is ``(input_ids, targets)`` with ``input_ids = stream[i*L : i*L + L]`` and
    ``targets = stream[i*L + 1 : i*L + L + 1]`` (``L = seq_len``, int64). Windows advance by
    ``seq_len``, so neighbouring windows share only their boundary token: inputs never
    overlap and every token after the first is a prediction target exactly once.

    With ``labels`` (one int per token of the stream, e.g. its domain) items are
    ``(input_ids, targets, input_labels)``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, labels: np.ndarray | None = None) -> None:
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
    # default_collate turns tuples into lists; batches are documented as tuples.
    return tuple(torch.stack(items) for items in zip(*batch))


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
        return itertools.islice(super().__iter__(), self.skip, None)


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


# --------------------------------------------------------------------------- sources


@dataclass
class _FileSource:
    """Text files: (absolute path, document name) pairs, names relative and '/'-separated."""

    source: str
    kind: str  # "stdlib", "file", "folder" or "glob"
    files: list[tuple[str, str]]
    skip_binary: bool

    def describe(self) -> str:
        return {
            "stdlib": "the Python standard library",
            "file": "the file",
            "folder": "the folder",
            "glob": "the files matching the pattern",
        }[self.kind]

    def identity(self) -> dict[str, Any]:
        # Sizes and mtimes make an edited, added or removed file invalidate the cache.
        entries = []
        for path, name in self.files:
            st = os.stat(path)
            entries.append([name, path, st.st_size, st.st_mtime_ns])
        return {"kind": self.kind, "skip_binary": self.skip_binary, "files": entries}

    def documents(self, max_bytes: int | None) -> Iterator[tuple[str, bytes]]:
        expected = sum(os.path.getsize(path) for path, _ in self.files)
        if max_bytes is not None:
            expected = min(expected, max_bytes)
        bar = None
        if expected >= 2**20 and rank_zero_only.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=expected, desc=f"Reading {self.describe()}", unit="B", unit_scale=True, leave=False)
        total = 0
        try:
            for path, name in self.files:
                data = _read_text(path, self.skip_binary)
                if data:
                    yield name, data
                    total += len(data)
                    if bar is not None:
                        bar.update(min(len(data), expected - bar.n))
                if max_bytes is not None and total >= max_bytes:
                    break
        finally:
            if bar is not None:
                bar.close()


def _read_text(path: str, skip_binary: bool) -> bytes | None:
    with open(path, "rb") as fh:
        raw = fh.read()
    # Same heuristic as git: a NUL byte near the start means "binary, not text".
    if skip_binary and b"\x00" in raw[:8192]:
        return None
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").encode("utf-8")


def _stdlib_files() -> list[tuple[str, str]]:
    # Test suites are skipped: they are half the stdlib by size and full of deliberately
    # odd inputs (bad encodings, generated tables), while the library code is ~12 MB of
    # ordinary, idiomatic Python. Generated per-machine files are skipped as well.
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("config-", "."))]
        for fname in filenames:
            if fname.endswith(".py") and not fname.startswith("_sysconfigdata"):
                path = os.path.join(dirpath, fname)
                found.append((path, Path(os.path.relpath(path, root)).as_posix()))
    return sorted(found, key=lambda item: item[1])


def _folder_files(folder: str) -> list[tuple[str, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .venv, ...) and bytecode caches are never corpus text.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for fname in filenames:
            if not fname.startswith("."):
                path = os.path.join(dirpath, fname)
                if os.path.isfile(path):
                    found.append((path, Path(os.path.relpath(path, folder)).as_posix()))
    return sorted(found, key=lambda item: item[1])


def _glob_files(pattern: str) -> list[tuple[str, str]]:
    paths = sorted({os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
    if not paths:
        return []
    base = os.path.commonpath([os.path.dirname(p) for p in paths])
    return sorted(((p, Path(os.path.relpath(p, base)).as_posix()) for p in paths), key=lambda x: x[1])


@dataclass
class _HubSource:
    source: str
    name: str
    config: str | None
    split: str
    text_field: str
    _dataset: Any = None

    def describe(self) -> str:
        return f"the Hugging Face dataset {self.name!r}"

    def load(self) -> Any:
        if self._dataset is None:
            self._dataset = _load_hub_dataset(self)
            columns = list(getattr(self._dataset, "column_names", None) or [])
            if self.text_field not in columns:
                raise ValueError(
                    f"hf_text_field={self.text_field!r} is not a column of the Hugging Face "
                    f"dataset {self.name!r} (split {self.split!r}); available columns: {columns}"
                )
        return self._dataset

    def identity(self) -> dict[str, Any]:
        ds = self.load()
        return {
            "kind": "hub",
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
            # The datasets library fingerprints every Arrow table it builds; a new
            # revision of the dataset gives a new fingerprint.
            "fingerprint": getattr(ds, "_fingerprint", None) or len(ds),
        }

    def documents(self, max_bytes: int | None) -> Iterator[tuple[str, bytes]]:
        ds = self.load().select_columns([self.text_field])
        total = 0
        index = 0
        for batch in ds.iter(batch_size=1024):
            for text in batch[self.text_field]:
                data = ("" if text is None else str(text)).encode("utf-8")
                if data:
                    yield f"{self.split}/{index}", data
                    total += len(data)
                index += 1
                if max_bytes is not None and total >= max_bytes:
                    return


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _honour_offline_env() -> Iterator[None]:
    # huggingface_hub and datasets read HF_HUB_OFFLINE once, at import time. If it was set
    # after that (a notebook, a test), respect it now instead of retrying the network for
    # half a minute before failing.
    if not (_env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")):
        yield
        return
    patched: list[tuple[Any, str, Any]] = []
    try:
        import datasets.config as ds_config
        import huggingface_hub.constants as hub_constants

        for module, attr in (
            (hub_constants, "HF_HUB_OFFLINE"),
            (ds_config, "HF_HUB_OFFLINE"),
            (ds_config, "HF_DATASETS_OFFLINE"),
        ):
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    except ImportError:
        pass
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


def _load_hub_dataset(src: _HubSource) -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ImportError(
            f"source={src.source!r} names a Hugging Face dataset, which needs the `datasets` "
            "package: pip install datasets"
        ) from err
    where = f"the Hugging Face dataset {src.name!r}" + (f" (config {src.config!r})" if src.config else "")
    try:
        with _honour_offline_env():
            return datasets.load_dataset(src.name, src.config, split=src.split)
    except (ConnectionError, OSError) as err:
        # Offline, unreachable or unknown: datasets cannot tell these apart without the
        # network, and the fix is the same for all of them.
        raise RuntimeError(
            f"source={src.source!r}: could not load {where}, split {src.split!r}: the Hugging "
            f"Face Hub could not be reached (or has no such dataset) and no local cache of it "
            f"exists [{type(err).__name__}: {err}]. No local file or folder of that name exists "
            "either. To fix: download it once with network access and then set "
            "HF_HUB_OFFLINE=1 to use the cached copy, or pass a local file, folder or glob "
            "as `source` (source='stdlib' trains on the built-in offline corpus)."
        ) from err
    except ValueError as err:
        raise ValueError(f"source={src.source!r}: could not load {where} with hf_split={src.split!r}: {err}") from err


def _looks_like_path(source: str) -> bool:
    if source.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in source):
        return True
    if not _HUB_ID.match(source):
        return True
    return bool(_FILE_EXTENSION.search(source.split(":", 1)[0].rsplit("/", 1)[-1]))


def _resolve_source(source: str, hf_split: str, hf_text_field: str) -> _FileSource | _HubSource:
    if source == "stdlib":
        return _FileSource(source, "stdlib", _stdlib_files(), skip_binary=False)
    if source.startswith("hf:"):
        return _hub_source(source, source[3:], hf_split, hf_text_field)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return _FileSource(source, "file", [(os.path.abspath(path), os.path.basename(path))], False)
    if os.path.isdir(path):
        return _FileSource(source, "folder", _folder_files(os.path.abspath(path)), skip_binary=True)
    if any(ch in _GLOB_CHARS for ch in source):
        return _FileSource(source, "glob", _glob_files(path), skip_binary=True)
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"source={source!r}: no such file or folder: {os.path.abspath(path)!r}. Pass an "
            "existing file, folder or glob pattern, 'stdlib' for the built-in corpus, or a "
            "Hugging Face dataset name."
        )
    return _hub_source(source, source, hf_split, hf_text_field)


def _hub_source(source: str, spec: str, hf_split: str, hf_text_field: str) -> _HubSource:
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"source={source!r}: empty Hugging Face dataset name")
    return _HubSource(source, name, config or None, hf_split, hf_text_field)


# --------------------------------------------------------------------------- corpus


@dataclass
class _Corpus:
    train: np.ndarray  # uint16 token stream
    val: np.ndarray
    train_documents: list[str]
    val_documents: list[str]
    total_bytes: int


def _doc_score(seed: int, name: str) -> bytes:
    # A hash of the document's name, not its position, so adding a file elsewhere in the
    # corpus does not move other documents between train and validation.
    return hashlib.sha256(f"{seed}\x00{name}".encode()).digest()


def _build_corpus(docs: list[tuple[str, bytes]], val_fraction: float, seed: int) -> _Corpus:
    total = sum(len(d) for _, d in docs)
    if len(docs) == 1:
        # One document cannot be split by document: its tail becomes validation text.
        name, data = docs[0]
        cut = min(max(1, round(len(data) * (1.0 - val_fraction))), max(1, len(data) - 1))
        # Never cut inside a multi-byte UTF-8 character.
        while 0 < cut < len(data) - 1 and (data[cut] & 0xC0) == 0x80:
            cut += 1
        train_docs = [(f"{name}[:{cut}]", data[:cut])]
        val_docs = [(f"{name}[{cut}:]", data[cut:])] if cut < len(data) else []
    else:
        order = sorted(range(len(docs)), key=lambda i: _doc_score(seed, docs[i][0]))
        # At least val_fraction of the documents AND of the bytes, and at least one
        # document on each side; a single tiny validation file would otherwise give a
        # validation set shorter than one sequence.
        min_docs = max(1, round(val_fraction * len(docs)))
        val_ids: set[int] = set()
        val_bytes = 0
        for i in order:
            if len(val_ids) >= len(docs) - 1:
                break
            if len(val_ids) >= min_docs and val_bytes >= val_fraction * total:
                break
            val_ids.add(i)
            val_bytes += len(docs[i][1])
        train_docs = [d for i, d in enumerate(docs) if i not in val_ids]
        val_docs = [d for i, d in enumerate(docs) if i in val_ids]
    return _Corpus(
        train=_concat(train_docs),
        val=_concat(val_docs),
        train_documents=[n for n, _ in train_docs],
        val_documents=[n for n, _ in val_docs],
        total_bytes=total,
    )


def _concat(docs: list[tuple[str, bytes]]) -> np.ndarray:
    out = np.empty(sum(len(d) + 1 for _, d in docs), dtype=np.uint16)
    pos = 0
    for _, data in docs:
        out[pos] = BOS_ID
        out[pos + 1 : pos + 1 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        pos += len(data) + 1
    return out


def _save_corpus(path: str, corpus: _Corpus, meta: dict[str, Any]) -> None:
    meta = dict(
        meta,
        train_documents=corpus.train_documents,
        val_documents=corpus.val_documents,
        total_bytes=corpus.total_bytes,
    )
    meta_arr = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Temp file in the same folder + os.replace: readers (other ranks, a parallel run)
    # see either no cache or a complete one, never a half-written file.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokens-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, train=corpus.train, val=corpus.val, meta=meta_arr)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_corpus(path: str) -> _Corpus:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"cache format {meta.get('format_version')} != {_FORMAT_VERSION}")
        return _Corpus(
            train=z["train"].astype(np.uint16, copy=False),
            val=z["val"].astype(np.uint16, copy=False),
            train_documents=list(meta["train_documents"]),
            val_documents=list(meta["val_documents"]),
            total_bytes=int(meta["total_bytes"]),
        )


# --------------------------------------------------------------------------- module


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
