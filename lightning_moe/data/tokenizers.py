"""Text to token ids: raw UTF-8 bytes (the default), or any Hugging Face tokenizer.

:func:`load_tokenizer` turns the ``tokenizer`` setting of :class:`TextDataModule` into a
:class:`Tokenizer`: ``"bytes"`` is the byte-level vocabulary (256 byte values plus
:data:`BOS_ID` and :data:`EOS_ID`, nothing to download); anything else names a Hugging
Face tokenizer: a ``tokenizer.json`` file, a folder holding one (its
``tokenizer_config.json``, when present, names the special tokens), or a folder / Hub name
that :class:`transformers.AutoTokenizer` loads. Every tokenizer is used through the
``tokenizers`` library, so tokenising needs neither ``transformers`` nor the network once
loaded, and :meth:`Tokenizer.state` (stored in checkpoints) rebuilds it anywhere.

Every document of a token stream starts with :attr:`Tokenizer.doc_start_id`: the
tokenizer's BOS token, or its EOS token when it has no BOS (GPT-2 style "end of text"
between documents).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from lightning_moe.errors import ConfigError

VOCAB_SIZE = 258
"""Size of the byte-level vocabulary: 256 byte values plus BOS and EOS/padding."""
BYTE_VOCAB_SIZE = VOCAB_SIZE
"""Alias of :data:`VOCAB_SIZE` (the embedding size a byte-level model needs)."""
BOS_ID = 256
"""Start-of-document token; also the separator between concatenated documents."""
EOS_ID = 257
"""End-of-sequence / padding token (never emitted by the corpus itself)."""
PAD_ID = EOS_ID

# Special tokens looked up in a bare tokenizer.json (no tokenizer_config.json beside it).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


def encode(text: str, bos: bool = False) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint16 token ids, optionally preceded by :data:`BOS_ID`."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    if bos:
        data = np.concatenate([np.array([BOS_ID], dtype=np.uint16), data])
    return data


def decode(ids: Any) -> str:
    """Text of a sequence of token ids; special tokens are dropped, broken UTF-8 replaced."""
    arr = _flat_ids(ids)
    return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _flat_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).reshape(-1)


class Tokenizer:
    """Byte-level tokenizer; the base of every tokenizer :class:`TextDataModule` uses.

    Attributes:
        name: the ``tokenizer`` setting it was loaded from (``"bytes"``, a path or Hub name).
        vocab_size: number of token ids (the embedding size a model needs).
        bos_id / eos_id / pad_id: special token ids (``None`` when the tokenizer has none).
        doc_start_id: the id every document of a token stream starts with.
    """

    name = "bytes"
    vocab_size = VOCAB_SIZE
    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID
    pad_id: int | None = PAD_ID

    @property
    def doc_start_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eos_id

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The smallest unsigned integer type that holds every id: uint16, else uint32."""
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        """Token ids of each UTF-8 document, without special tokens."""
        return [np.frombuffer(doc, dtype=np.uint8).astype(np.uint16) for doc in documents]

    def encode(self, text: str, bos: bool = False) -> np.ndarray:
        """Token ids of ``text``, optionally preceded by :attr:`doc_start_id` (as a document starts)."""
        ids = self.encode_documents([text.encode("utf-8")])[0].astype(self.dtype)
        return np.concatenate([np.array([self.doc_start_id], dtype=self.dtype), ids]) if bos else ids

    def decode(self, ids: Any) -> str:
        """Text of token ids; special tokens are dropped."""
        return decode(ids)

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable record that :func:`tokenizer_from_state` turns back into this tokenizer."""
        return {"name": self.name}

    def fingerprint(self) -> str:
        """What identifies the token ids it produces (part of the token cache's key)."""
        return self.name


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with its special token ids."""

    def __init__(
        self, backend: Any, name: str, bos_id: int | None, eos_id: int | None, pad_id: int | None = None
    ) -> None:
        self.backend = backend
        self.name = name
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        if bos_id is None and eos_id is None:
            raise ConfigError(
                f"data.tokenizer={name!r} has neither a BOS nor an EOS token to start documents with;"
                f" add one of {list(_BOS_NAMES + _EOS_NAMES)} as a special token"
            )

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        # errors="ignore": a document cut at max_bytes may end inside a UTF-8 character.
        texts = [doc.decode("utf-8", errors="ignore") for doc in documents]
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=self.dtype) for enc in encodings]

    def decode(self, ids: Any) -> str:
        return self.backend.decode(_flat_ids(ids).astype(np.int64).tolist(), skip_special_tokens=True)

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "json": self.backend.to_str(),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.state(), sort_keys=True).encode()).hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        return self.state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        restored = tokenizer_from_state(state)
        self.__dict__.update(restored.__dict__)


def tokenizer_from_state(state: dict[str, Any] | None) -> Tokenizer:
    """The tokenizer :meth:`Tokenizer.state` recorded (bytes when ``state`` is ``None``)."""
    if not state or "json" not in state:
        return Tokenizer()
    from tokenizers import Tokenizer as Backend

    return HFTokenizer(
        Backend.from_str(state["json"]), state["name"], state.get("bos_id"), state.get("eos_id"), state.get("pad_id")
    )


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"bytes"``, a tokenizer.json file or folder, or a Hub name."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"data.tokenizer must be 'bytes' or a Hugging Face tokenizer path or name, got {spec!r}")
    if spec == "bytes":
        return Tokenizer()
    path = os.path.expanduser(spec)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        return _from_tokenizer_json(spec, file, folder)
    return _from_transformers(spec)


def _from_tokenizer_json(spec: str, file: str, folder: str) -> HFTokenizer:
    from tokenizers import Tokenizer as Backend

    from lightning_moe.data.sources import first_line

    try:
        backend = Backend.from_file(file)
    except Exception as err:  # the Rust library raises a bare Exception for any parse error
        raise ConfigError(
            f"data.tokenizer={spec!r}: {file!r} is not a Hugging Face tokenizer.json"
            f" ({type(err).__name__}: {first_line(err)})"
        ) from None
    specials = _config_specials(os.path.join(folder, "tokenizer_config.json"), backend)
    if specials is None:
        specials = tuple(_first_token_id(backend, names) for names in (_BOS_NAMES, _EOS_NAMES, _PAD_NAMES))
    return HFTokenizer(backend, spec, *specials)


def _config_specials(config_file: str, backend: Any) -> tuple[int | None, int | None, int | None] | None:
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as fh:
        config = json.load(fh)

    def token_id(key: str) -> int | None:
        token = config.get(key)
        if isinstance(token, dict):  # {"content": "<s>", ...} in older configs
            token = token.get("content")
        return backend.token_to_id(token) if isinstance(token, str) else None

    return token_id("bos_token"), token_id("eos_token"), token_id("pad_token")


def _first_token_id(backend: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _from_transformers(spec: str) -> HFTokenizer:
    tok = load_transformers_tokenizer(spec)
    return HFTokenizer(tok.backend_tokenizer, spec, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def load_transformers_tokenizer(spec: str, field: str = "data.tokenizer") -> Any:
    """A ``transformers`` fast tokenizer from a tokenizer.json file, a folder or a Hub name.

    Anything that cannot be loaded, or has no fast (Rust) tokenizer, is a one-line
    ``ConfigError`` naming ``field``. Hub names honour ``HF_HUB_OFFLINE``.
    """
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise ConfigError(
            f"{field}={spec!r} is not a local tokenizer.json file or folder; loading it by name"
            " needs the transformers package (pip install transformers)"
        ) from None
    from lightning_moe.data.sources import first_line
    from lightning_moe.hub import load_cache_first

    path = os.path.expanduser(spec)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
    if looks_local and not os.path.exists(path):
        raise ConfigError(
            f"{field}={spec!r} cannot be loaded: no such file or folder; pass a local tokenizer.json or folder,"
            " or a Hub name"
        )
    try:
        if os.path.isfile(path):
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        else:  # a Hub name from the cache first: no ~23 s of retries when the Hub cannot be reached
            tok = load_cache_first(path, AutoTokenizer.from_pretrained, field=field, what="tokenizer")
    except ConfigError:
        raise
    except Exception as err:  # a folder without tokenizer files, or not a tokenizer
        raise ConfigError(
            f"{field}={spec!r} cannot be loaded with transformers.AutoTokenizer"
            f" ({type(err).__name__}: {first_line(err)}); pass a local tokenizer.json or folder, or a Hub name"
            " with network access (or HF_HUB_OFFLINE=1 and a cached copy)"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{field}={spec!r} has no fast (Rust) tokenizer; use a tokenizer with tokenizer.json")
    return tok
