"""The document-level train/validation split and the on-disk token cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_moe.data.tokenizers import BOS_ID

# Bump whenever the cached arrays would change for the same inputs.
_FORMAT_VERSION = 1


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

