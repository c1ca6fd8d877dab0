"""Corpus sources: the standard library, local files / folders / globs, Hugging Face datasets.

Each source yields ``(document name, UTF-8 bytes)`` pairs in a deterministic order and
describes its identity (what invalidates a cached tokenisation of it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from lightning_moe.errors import ConfigError

_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test"}
)
# A Hub id is "name" or "namespace/name", optionally ":config"; anything else that does
# not exist locally is reported as a missing path rather than sent to the Hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(:[\w.\-]+)?$")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")
_GLOB_CHARS = frozenset("*?[")
# A file is "not text" when more than this share of its first _SNIFF_BYTES is control
# bytes or invalid UTF-8: random or compressed bytes come out near 50%, while text in a
# legacy 8-bit encoding (accented letters invalid as UTF-8) stays below 20% even when
# every fifth letter is accented.
_MAX_BINARY_SHARE = 0.3
_SNIFF_BYTES = 2**20
_CONTROL_BYTES = bytes(c for c in range(32) if chr(c) not in "\t\n\r\f\v") + b"\x7f"


@dataclass
class FileSource:
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
                data = _read_text(path, self.skip_binary, self.source)
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


def _read_text(path: str, skip_binary: bool, source: str) -> bytes | None:
    """The file's text as UTF-8; ``None`` for a file that is not text when ``skip_binary``, else an error."""
    with open(path, "rb") as fh:
        raw = fh.read()
    # Same heuristic as git: a NUL byte near the start means "binary, not text".
    if skip_binary and b"\x00" in raw[:8192]:
        return None
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    share = _binary_share(raw[:_SNIFF_BYTES], valid)
    if share > _MAX_BINARY_SHARE:
        if skip_binary:
            return None
        raise ConfigError(
            f"data.source={source!r}: {path!r} is not text ({share:.0%} of its first bytes are NUL,"
            " control characters or invalid UTF-8); pass UTF-8 text files"
        )
    return raw if valid else raw.decode("utf-8", errors="replace").encode("utf-8")


def _binary_share(head: bytes, valid_utf8: bool) -> float:
    """Share of ``head`` that no text has: NUL and other control bytes, and invalid UTF-8."""
    if not head:
        return 0.0
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    invalid = 0 if valid_utf8 else head.decode("utf-8", errors="replace").count("\ufffd")
    return (controls + invalid) / len(head)


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
class HubSource:
    """A Hugging Face dataset, loaded whole (Arrow, memory-mapped) or read as a stream."""

    source: str
    name: str
    config: str | None
    split: str
    text_field: str
    streaming: bool = False
    _dataset: Any = None

    def describe(self) -> str:
        return f"the Hugging Face dataset {self.name!r}"

    def load(self) -> Any:
        if self._dataset is None:
            self._dataset = _load_hub_dataset(self)
            # A stream may not know its columns before its first row; documents() checks then.
            columns = getattr(self._dataset, "column_names", None)
            if columns is not None and self.text_field not in columns:
                self._missing_column(list(columns))
        return self._dataset

    def _missing_column(self, columns: list[str]) -> None:
        raise ConfigError(
            f"data.hf_text_field={self.text_field!r} is not a column of the Hugging Face "
            f"dataset {self.name!r} (split {self.split!r}); available columns: {columns}"
        )

    def identity(self) -> dict[str, Any]:
        ds = self.load()
        identity = {
            "kind": "hub",
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
        }
        if self.streaming:
            # A stream has no fingerprint: its cache is reused until the key settings change.
            return dict(identity, streaming=True)
        # The datasets library fingerprints every Arrow table it builds; a new revision of
        # the dataset gives a new fingerprint.
        return dict(identity, fingerprint=getattr(ds, "_fingerprint", None) or len(ds))

    def documents(self, max_bytes: int | None) -> Iterator[tuple[str, bytes]]:
        total = 0
        for index, text in enumerate(self._texts()):
            data = ("" if text is None else str(text)).encode("utf-8")
            if data:
                yield f"{self.split}/{index}", data
                total += len(data)
            if max_bytes is not None and total >= max_bytes:
                return

    def _texts(self) -> Iterator[Any]:
        ds = self.load()
        if self.streaming:
            for row in ds:
                if self.text_field not in row:
                    self._missing_column(list(row))
                yield row[self.text_field]
            return
        for batch in ds.select_columns([self.text_field]).iter(batch_size=1024):
            yield from batch[self.text_field]


def capped(documents: Iterator[tuple[str, bytes]], max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """The documents up to ``max_bytes`` bytes in all; the last one is cut."""
    total = 0
    for name, data in documents:
        if total >= max_bytes:
            return
        take = data[: max_bytes - total]
        yield name, take
        total += len(take)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def honour_offline_env() -> Iterator[None]:
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


def first_line(err: BaseException) -> str:
    """The first line of an error's message: the libraries' messages can run to many lines, ours are one."""
    return (str(err).strip().splitlines() or [""])[0]


def _load_hub_dataset(src: HubSource) -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ImportError(
            f"source={src.source!r} names a Hugging Face dataset, which needs the `datasets` "
            "package: pip install datasets"
        ) from err
    where = f"the Hugging Face dataset {src.name!r}" + (f" (config {src.config!r})" if src.config else "")
    try:
        with honour_offline_env():
            return datasets.load_dataset(src.name, src.config, split=src.split, streaming=src.streaming)
    except (ConnectionError, OSError) as err:
        # Offline, unreachable or unknown: datasets cannot tell these apart without the
        # network, and the fix is the same for all of them.
        raise ConfigError(
            f"data.source={src.source!r}: could not load {where}, split {src.split!r}: the Hugging "
            f"Face Hub could not be reached (or has no such dataset) and no local cache of it "
            f"exists [{type(err).__name__}: {first_line(err)}]. No local file or folder of that name exists "
            "either. To fix: download it once with network access and then set "
            "HF_HUB_OFFLINE=1 to use the cached copy, or pass a local file, folder or glob "
            "as data.source (data.source=stdlib trains on the built-in offline corpus)."
        ) from err
    except ValueError as err:
        raise ConfigError(
            f"data.source={src.source!r}: could not load {where} with data.hf_split={src.split!r}: {first_line(err)}"
        ) from err


def _looks_like_path(source: str) -> bool:
    if source.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in source):
        return True
    if not _HUB_ID.match(source):
        return True
    return bool(_FILE_EXTENSION.search(source.split(":", 1)[0].rsplit("/", 1)[-1]))


def resolve_source(
    source: str, hf_split: str, hf_text_field: str, hf_streaming: bool = False
) -> FileSource | HubSource:
    """The source ``TextDataModule(source=...)`` names (see its docstring)."""
    if source == "stdlib":
        return FileSource(source, "stdlib", _stdlib_files(), skip_binary=False)
    if source.startswith("hf:"):
        return _hub_source(source, source[3:], hf_split, hf_text_field, hf_streaming)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return FileSource(source, "file", [(os.path.abspath(path), os.path.basename(path))], False)
    if os.path.isdir(path):
        return FileSource(source, "folder", _folder_files(os.path.abspath(path)), skip_binary=True)
    if any(ch in _GLOB_CHARS for ch in source):
        return FileSource(source, "glob", _glob_files(path), skip_binary=True)
    if _looks_like_path(source):
        raise ConfigError(
            f"data.source={source!r}: no such file or folder: {os.path.abspath(path)!r}. Pass an "
            "existing file, folder or glob pattern, 'stdlib' for the built-in corpus, or a "
            "Hugging Face dataset name."
        )
    return _hub_source(source, source, hf_split, hf_text_field, hf_streaming)


def _hub_source(source: str, spec: str, hf_split: str, hf_text_field: str, streaming: bool) -> HubSource:
    name, _, config = spec.partition(":")
    if not name:
        raise ConfigError(f"data.source={source!r}: empty Hugging Face dataset name")
    return HubSource(source, name, config or None, hf_split, hf_text_field, streaming)

