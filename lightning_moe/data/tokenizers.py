"""Tokens: the byte-level vocabulary (UTF-8 bytes plus two special tokens)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

VOCAB_SIZE = 258
"""Size of the byte-level vocabulary: 256 byte values plus BOS and EOS/padding."""
BYTE_VOCAB_SIZE = VOCAB_SIZE
"""Alias of :data:`VOCAB_SIZE` (the embedding size a byte-level model needs)."""
BOS_ID = 256
"""Start-of-document token; also the separator between concatenated documents."""
EOS_ID = 257
"""End-of-sequence / padding token (never emitted by the corpus itself)."""
PAD_ID = EOS_ID



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

