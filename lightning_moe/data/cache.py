"""The on-disk token cache: documents tokenised in parallel into memory-mapped shards.

A cache is a folder (named after a hash of the source, tokenizer and split settings) of

* ``tokens-00000.bin``, ...: shards of the token stream of all documents in source order,
  each document starting with the tokenizer's ``doc_start_id`` (uint16 when the vocabulary
  fits, else uint32). A shard holds whole documents and at most ``shard_tokens`` tokens
  (a longer document gets a shard of its own).
* ``index.npz``: per document its shard, offset and length in tokens, its size in bytes
  and its split (0 train, 1 validation).
* ``documents.jsonl``: the document names, one JSON string a line (read only on demand).
* ``meta.json``, written last: the key material, dtype and, for every other file, its size
  and CRC-32, checked each time the cache is opened.

It is written under a temporary name and renamed when complete, so a killed build leaves
nothing a later run trusts; builders sharing the folder (processes, containers, hosts) take
turns under :class:`~lightning_moe.data.build_lock.BuildLock`. Training reads the shards through ``np.memmap``: the corpus is
never held in memory whole, and :class:`TokenStream` shows the documents of one split as
one stream without copying them.

The split is by document and deterministic: documents are ranked by a hash of their name
and the seed (so adding a file elsewhere moves no other document), and validation takes
them in that order until it holds ``val_fraction`` of the documents and of the bytes,
leaving at least one document to training. A single document is split by its bytes
instead: its tail is the validation text.
"""

from __future__ import annotations

import array
import bisect
import collections
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from lightning_moe.data.build_lock import BuildLock
from lightning_moe.data.tokenizers import Tokenizer

# Bump whenever the cached files would change for the same inputs.
FORMAT_VERSION = 2
SHARD_TOKENS = 2**28
"""Default largest shard, in tokens (512 MB of uint16)."""
_BATCH_BYTES = 4 * 2**20  # text handed to one tokenizer call / worker task
_BATCH_DOCS = 1024
_CHECK_CHUNK = 2**24  # bytes hashed per step when checking a shard


T = TypeVar("T")

class CacheDamaged(Exception):
    """The cache folder is incomplete or does not match its metadata."""


class EmptyCorpus(ValueError):
    """The documents held no text at all."""


# --------------------------------------------------------------------------- reading


class TokenStream(np.lib.mixins.NDArrayOperatorsMixin):
    """The documents of one split as a single read-only token stream, backed by memory-mapped shards.

    ``len(stream)`` tokens; ``stream[i]`` and ``stream[a:b]`` read only the tokens asked for
    (a slice is a new ndarray). ``np.asarray(stream)``, and arithmetic or comparisons like
    ``stream == bos_id``, materialise all of it, which only small corpora should do.
    Pickles as file paths (DataLoader workers map the files again).
    """

    def __init__(self, paths: list[str], dtype: Any, segments_S3: np.ndarray) -> None:
        self.paths = paths
        self.dtype = np.dtype(dtype)
        self.segments_S3 = segments_S3  # rows (shard, start, length), in stream order
        self._starts = np.concatenate([[0], np.cumsum(segments_S3[:, 2])]).astype(np.int64)
        self._shards: list[np.ndarray] | None = None

    def _maps(self) -> list[np.ndarray]:
        if self._shards is None:
            self._shards = [
                np.memmap(p, dtype=self.dtype, mode="r") if os.path.getsize(p) else np.empty(0, self.dtype)
                for p in self.paths
            ]
        return self._shards

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[start:stop][::step]
            return self._read(start, max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} out of range for a stream of {len(self)}")
        return self._read(index, index + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.dtype)
        shards, pos = self._maps(), start
        seg = bisect.bisect_right(self._starts, start) - 1
        while pos < stop:
            shard, seg_start, _ = self.segments_S3[seg]
            skip = pos - self._starts[seg]
            take = min(stop, self._starts[seg + 1]) - pos
            out[pos - start : pos - start + take] = shards[shard][seg_start + skip : seg_start + skip + take]
            pos += take
            seg += 1
        return out

    def chunks(self, size: int = 2**24) -> Iterator[np.ndarray]:
        """The stream in consecutive pieces of at most ``size`` tokens, read with plain file reads.

        A scan through the memory map would leave every page of the corpus mapped into
        this process (counted in its resident memory); reads leave them to the page cache.
        """
        itemsize = self.dtype.itemsize
        for shard, start, length in self.segments_S3.tolist():
            for pos in range(start, start + length, size):
                count = min(size, start + length - pos)
                yield np.fromfile(self.paths[shard], dtype=self.dtype, count=count, offset=pos * itemsize)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(np.asarray(x) if isinstance(x, TokenStream) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (TokenStream, (self.paths, self.dtype, self.segments_S3))


@dataclass
class Corpus:
    """A tokenised corpus: the train and validation streams of a cache folder."""

    path: str
    train: TokenStream
    val: TokenStream
    total_bytes: int
    meta: dict[str, Any]
    train_counts: np.ndarray  # occurrences of each token id in the training stream
    built_here: bool = False  # written by this call of build_cache (not one another builder finished)

    def documents(self, split: int) -> list[str]:
        """Names of the documents of ``split`` (0 train, 1 validation), in stream order."""
        with np.load(os.path.join(self.path, "index.npz")) as index:
            chosen = index["split"] == split
        with open(os.path.join(self.path, "documents.jsonl"), encoding="utf-8") as fh:
            return [json.loads(line) for line, keep in zip(fh, chosen) if keep]


def read_checked_meta(path: str, expected_meta: dict[str, Any], verify: bool) -> dict[str, Any]:
    """The ``meta.json`` of the cache folder ``path``, after checking it has ``expected_meta``'s values
    and that every file it lists is there, whole (and, with ``verify``, of the same CRC-32);
    :class:`CacheDamaged` otherwise. Both caches (text and chat) open through this."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as err:
        raise CacheDamaged(f"meta.json unreadable: {err}") from None
    for key, value in expected_meta.items():
        if meta.get(key) != value:
            raise CacheDamaged(f"meta.json has {key}={meta.get(key)!r}, expected {value!r}")
    for name, record in meta["files"].items():
        _check_file(os.path.join(path, name), record, verify)
    return meta


def open_cache(path: str, expected_meta: dict[str, Any], verify: bool = True) -> Corpus:
    """The corpus cached in folder ``path``; :class:`CacheDamaged` if any file is missing, short or altered.

    ``verify`` reads every file once to check its CRC-32 (sizes are always checked).
    """
    meta = read_checked_meta(path, expected_meta, verify)
    with np.load(os.path.join(path, "index.npz")) as index:
        shard, offset, length, split = (index[k] for k in ("shard", "offset", "length", "split"))
        counts = index["train_counts"]
    streams = _streams(path, meta["shards"], meta["dtype"], shard, offset, length, split)
    return Corpus(path, streams[0], streams[1], int(meta["total_bytes"]), meta, counts)


def _streams(path: str, shard_names: list[str], dtype: Any, *index: np.ndarray) -> list[TokenStream]:
    shard, offset, length, split = index
    paths = [os.path.join(path, name) for name in shard_names]
    return [TokenStream(paths, dtype, _segments(shard, offset, length, split == s)) for s in (0, 1)]


def _check_file(path: str, record: dict[str, int], verify: bool) -> None:
    try:
        size = os.path.getsize(path)
    except OSError:
        raise CacheDamaged(f"{os.path.basename(path)} is missing") from None
    if size != record["bytes"]:
        raise CacheDamaged(f"{os.path.basename(path)} has {size} bytes, its metadata says {record['bytes']}")
    if not verify:
        return
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHECK_CHUNK):
            crc = zlib.crc32(chunk, crc)
    if crc != record["crc32"]:
        raise CacheDamaged(f"{os.path.basename(path)} fails its CRC-32 check")


def _segments(shard: np.ndarray, offset: np.ndarray, length: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Runs of the chosen documents that lie back to back in one shard, as (shard, start, length) rows."""
    shard, offset, length = shard[chosen], offset[chosen], length[chosen]
    if len(shard) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    joins = (shard[1:] == shard[:-1]) & (offset[1:] == offset[:-1] + length[:-1])
    starts = np.flatnonzero(np.concatenate([[True], ~joins]))
    return np.stack([shard[starts], offset[starts], np.add.reduceat(length, starts)], axis=1).astype(np.int64)


# --------------------------------------------------------------------------- the split


def doc_score(seed: int, name: str) -> int:
    """Rank of a document in the validation draw (the first 8 bytes of a hash of seed and name)."""
    # A hash of the document's name, not its position, so adding a file elsewhere in the
    # corpus does not move other documents between train and validation.
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{name}".encode()).digest()[:8], "big")


def choose_validation(scores: np.ndarray, sizes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of the validation documents (see the module docstring for the rule)."""
    n = len(scores)
    order = np.argsort(scores, kind="stable")
    # At least val_fraction of the documents AND of the bytes, and at least one document
    # on each side; a single tiny validation file would otherwise give a validation set
    # shorter than one sequence.
    min_docs = max(1, round(val_fraction * n))
    enough = (np.arange(1, n + 1) >= min_docs) & (np.cumsum(sizes[order]) >= val_fraction * sizes.sum())
    count = min(int(np.argmax(enough)) + 1 if enough.any() else n, n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask


def split_single_document(name: str, data: bytes, val_fraction: float) -> list[tuple[str, bytes]]:
    """One document cannot be split by document: its tail becomes the validation text."""
    cut = min(max(1, round(len(data) * (1.0 - val_fraction))), max(1, len(data) - 1))
    # Never cut inside a multi-byte UTF-8 character.
    while 0 < cut < len(data) - 1 and (data[cut] & 0xC0) == 0x80:
        cut += 1
    pieces = [(f"{name}[:{cut}]", data[:cut])]
    if cut < len(data):
        pieces.append((f"{name}[{cut}:]", data[cut:]))
    return pieces


# --------------------------------------------------------------------------- building


def build_cache(
    path: str,
    documents: Iterable[tuple[str, bytes]],
    tokenizer: Tokenizer,
    *,
    meta: dict[str, Any],
    val_fraction: float,
    seed: int,
    num_proc: int = 1,
    max_tokens: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
) -> Corpus:
    """Tokenise ``documents`` into the cache folder ``path`` and open it.

    Builders of one cache, in any process or on any host sharing the folder, take turns
    (:class:`~lightning_moe.data.build_lock.BuildLock`): one whose turn comes after another
    finished the cache opens that instead of building, so the documents are tokenised once
    and a finished cache is never removed or replaced (unless it fails its checks).
    ``num_proc`` processes tokenise batches of documents in parallel; the result does not
    depend on it. ``max_tokens`` stops after that many tokens (the last document is cut).
    Returns the opened corpus; an empty corpus (no bytes) raises :class:`EmptyCorpus` and
    writes nothing.
    """
    def write(folder: str) -> None:
        _write(folder, documents, tokenizer, meta, val_fraction, seed, num_proc, max_tokens, shard_tokens)

    corpus, built = build_once(path, write, lambda finished: open_cache(finished, {"key": meta["key"]}))
    if built:  # just written: no need to read it back
        corpus = open_cache(path, {"key": meta["key"]}, verify=False)
        corpus.built_here = True
    return corpus


def build_once(path: str, write: Callable[[str], None], open_finished: Callable[[str], T]) -> tuple[T | None, bool]:
    """Build the cache folder ``path`` once among every builder sharing its parent folder.

    Builders, in any process or on any host, take turns under
    :class:`~lightning_moe.data.build_lock.BuildLock`. One whose turn comes after another
    finished the folder returns ``(open_finished(path), False)``: nothing is built twice, and
    a finished cache is never removed or replaced unless it fails its checks
    (:class:`CacheDamaged`). Otherwise ``write(folder)`` fills a temporary folder that is
    renamed to ``path`` when complete, and the result is ``(None, True)``; a build that fails
    leaves nothing behind. While ``write`` runs, the folder also holds the lock's owner record
    (:data:`~lightning_moe.data.build_lock.OWNER_RECORD`), removed before the rename.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with BuildLock(path) as lock:
        if os.path.isdir(path):
            try:
                return open_finished(path), False  # finished by the builder this one waited for
            except CacheDamaged:
                lock.set_aside(path)  # checked under the lock: no builder is writing it
        tmp = lock.new_folder()
        try:
            lock.remove_abandoned()
            write(tmp)
            lock.finish(tmp)
            try:
                os.rename(tmp, path)  # onto a name nothing holds: a rename never replaces a non-empty folder
            except OSError:
                if not os.path.isdir(path):
                    raise
                # A builder whose lock was taken over as stale while it was still running
                # finished first; keep its cache.
                shutil.rmtree(tmp)
                return open_finished(path), False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return None, True


def _write(
    folder: str,
    documents: Iterable[tuple[str, bytes]],
    tokenizer: Tokenizer,
    meta: dict[str, Any],
    val_fraction: float,
    seed: int,
    num_proc: int,
    max_tokens: int | None,
    shard_tokens: int,
) -> None:
    """Write every file of a cache into ``folder`` (the arguments are :func:`build_cache`'s)."""
    writer = _Writer(folder, tokenizer, shard_tokens, max_tokens, seed)
    docs, single = _peek_single(documents, val_fraction)
    with _Tokenize(tokenizer, num_proc) as tokenize:
        for names, sizes, token_lists in tokenize(_batches(docs)):
            if not writer.add(names, sizes, token_lists):
                break
    written = writer.close()
    if written["total_bytes"] == 0:
        raise EmptyCorpus("no text")
    sizes = np.asarray(writer.sizes, dtype=np.int64)
    if single:
        split = np.arange(len(sizes)) > 0  # the cut document: head trains, tail validates
    else:
        split = choose_validation(np.asarray(writer.scores, dtype=np.uint64), sizes, val_fraction)
    arrays = {
        "shard": np.asarray(writer.shard, dtype=np.int32),
        "offset": np.asarray(writer.offset, dtype=np.int64),
        "length": np.asarray(writer.length, dtype=np.int64),
        "split": split.astype(np.uint8),
    }
    # Stored so that opening the cache never has to scan it: the counts of all tokens,
    # less those of the (small) validation split.
    val = _streams(folder, writer.shard_names, tokenizer.dtype, *arrays.values())[1]
    counts = writer.counts.copy()
    for chunk in val.chunks():
        counts -= np.bincount(chunk, minlength=len(counts))
    index = os.path.join(folder, "index.npz")
    np.savez(index, bytes=sizes, train_counts=counts, **arrays)
    files = dict(writer.files, **{"index.npz": _record(index)})
    full_meta = dict(meta, dtype=np.dtype(tokenizer.dtype).name, shards=writer.shard_names, files=files, **written)
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(full_meta, fh)


def _peek_single(documents: Iterable[tuple[str, bytes]], val_fraction: float) -> tuple[Iterator, bool]:
    """The documents again, split by bytes when there is exactly one; and whether there was one."""
    it = iter(documents)
    first = list(itertools.islice(it, 2))
    if len(first) == 1:
        return iter(split_single_document(*first[0], val_fraction)), True
    return itertools.chain(first, it), False


def _batches(documents: Iterator[tuple[str, bytes]]) -> Iterator[tuple[list[str], list[bytes]]]:
    names: list[str] = []
    texts: list[bytes] = []
    size = 0
    for name, data in documents:
        names.append(name)
        texts.append(data)
        size += len(data)
        if size >= _BATCH_BYTES or len(names) >= _BATCH_DOCS:
            yield names, texts
            names, texts, size = [], [], 0
    if names:
        yield names, texts


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[bytes]) -> list[np.ndarray]:
    return _worker_tokenizer.encode_documents(texts)


class _Tokenize:
    """Tokenises batches in order, in this process or in a pool with a bounded number in flight."""

    def __init__(self, tokenizer: Tokenizer, num_proc: int) -> None:
        self.tokenizer, self.num_proc = tokenizer, num_proc
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> _Tokenize:
        if self.num_proc > 1:
            # fork: workers start in milliseconds and inherit the tokenizer; the main
            # process has not used the tokenizer's own thread pool at this point.
            context = multiprocessing.get_context("fork")
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.num_proc, mp_context=context, initializer=_init_worker, initargs=(self.tokenizer,)
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, batches: Iterator[tuple[list[str], list[bytes]]]) -> Iterator[tuple]:
        if self.pool is None:
            for names, texts in batches:
                yield names, [len(t) for t in texts], self.tokenizer.encode_documents(texts)
            return
        # Two batches in flight per process keep every process busy while bounding the
        # memory held in queues.
        pending: collections.deque = collections.deque()
        for names, texts in batches:
            pending.append((names, [len(t) for t in texts], self.pool.submit(_encode_in_worker, texts)))
            if len(pending) >= 2 * self.num_proc:
                names, sizes, future = pending.popleft()
                yield names, sizes, future.result()
        while pending:
            names, sizes, future = pending.popleft()
            yield names, sizes, future.result()


class _Writer:
    """Appends documents to shard files and records the per-document index."""

    def __init__(self, folder: str, tokenizer: Tokenizer, shard_tokens: int, max_tokens: int | None, seed: int) -> None:
        self.folder, self.dtype, self.doc_start_id = folder, np.dtype(tokenizer.dtype), tokenizer.doc_start_id
        self.shard_tokens, self.max_tokens, self.seed = shard_tokens, max_tokens, seed
        self.shard, self.offset, self.length = array.array("i"), array.array("q"), array.array("q")
        self.sizes, self.scores = array.array("q"), array.array("Q")
        self.shard_names: list[str] = []
        self.files: dict[str, dict[str, int]] = {}
        self.total_tokens = self.total_bytes = 0
        self.counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)  # of every token written
        self._fh: Any = None
        self._crc = self._tokens_in_shard = 0
        self._names = open(os.path.join(folder, "documents.jsonl"), "w", encoding="utf-8")

    def add(self, names: list[str], sizes: list[int], token_lists: list[np.ndarray]) -> bool:
        """Write the documents; False once ``max_tokens`` is reached (nothing more is wanted)."""
        written = []
        for name, size, tokens in zip(names, sizes, token_lists):
            n = len(tokens) + 1
            if self.max_tokens is not None:
                n = min(n, self.max_tokens - self.total_tokens)
                if n <= 0:
                    break
            if self._fh is None or (self._tokens_in_shard and self._tokens_in_shard + n > self.shard_tokens):
                self._next_shard()
            doc = np.empty(n, dtype=self.dtype)
            doc[0] = self.doc_start_id
            doc[1:] = tokens[: n - 1]
            written.append(doc)
            data = doc.tobytes()
            self._fh.write(data)
            self._crc = zlib.crc32(data, self._crc)
            self.shard.append(len(self.shard_names) - 1)
            self.offset.append(self._tokens_in_shard)
            self.length.append(n)
            self.sizes.append(size)
            self.scores.append(doc_score(self.seed, name))
            self._names.write(json.dumps(name) + "\n")
            self._tokens_in_shard += n
            self.total_tokens += n
            self.total_bytes += size
        if written:
            self.counts += np.bincount(np.concatenate(written), minlength=len(self.counts))
        return self.max_tokens is None or self.total_tokens < self.max_tokens

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"tokens-{len(self.shard_names):05d}.bin"
        self.shard_names.append(name)
        self._fh = open(os.path.join(self.folder, name), "wb")
        self._crc = self._tokens_in_shard = 0

    def _close_shard(self) -> None:
        if self._fh is not None:
            size = self._fh.tell()
            self._fh.close()
            self.files[self.shard_names[-1]] = {"bytes": size, "crc32": self._crc}

    def close(self) -> dict[str, int]:
        self._close_shard()
        self._names.close()
        self.files["documents.jsonl"] = _record(self._names.name)
        return {"total_bytes": self.total_bytes, "total_tokens": self.total_tokens, "num_documents": len(self.sizes)}


def _record(path: str) -> dict[str, int]:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHECK_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": os.path.getsize(path), "crc32": crc}
