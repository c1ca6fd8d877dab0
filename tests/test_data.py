"""Tests for lightning_moe.data.TextDataModule (byte-level corpora, split, cache, errors)."""

from __future__ import annotations

import itertools
import math
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import ready_datamodule
import torch

from lightning_moe.data import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    VOCAB_SIZE,
    TextDataModule,
    decode,
    encode,
)
from lightning_moe.errors import ConfigError

TEXT = "Héllo wörld — byte-level tokens ✓ 中文\n" * 40 + "the end\n"


def make_dm(source, tmp_path, **kwargs) -> TextDataModule:
    return ready_datamodule(source, kwargs.pop("cache_dir", tmp_path / "cache"), **kwargs)


def split_docs(stream: np.ndarray) -> list[bytes]:
    """Documents of a token stream: every document is BOS followed by its bytes."""
    assert stream[0] == BOS_ID
    starts = np.flatnonzero(stream == BOS_ID).tolist() + [len(stream)]
    return [stream[a + 1 : b].astype(np.uint8).tobytes() for a, b in itertools.pairwise(starts)]


def write_folder(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": "alpha " * 30,
        "b.md": "# bravo\n" + "beta text\n" * 20,
        "sub/c.py": "def charlie():\n    return 'ç'\n" * 10,
        "sub/deeper/d.rst": "delta\n=====\n" * 15,
        "e.json": '{"echo": [1, 2, 3]}\n' * 12,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    # Never part of the corpus: hidden folders and binary files.
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01\x02" * 20)
    return {rel: text.encode("utf-8") for rel, text in files.items()}


def test_constants_and_codec():
    assert VOCAB_SIZE == BYTE_VOCAB_SIZE == 258
    assert (BOS_ID, EOS_ID) == (256, 257)
    ids = encode(TEXT, bos=True)
    assert ids[0] == BOS_ID and ids.max() < VOCAB_SIZE
    assert decode(ids) == TEXT
    assert decode(torch.tensor(ids.astype(np.int64))) == TEXT


def test_local_file_round_trip(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    raw = TEXT.encode("utf-8")
    dm = make_dm(path, tmp_path, seq_len=32, batch_size=4, val_fraction=0.25)

    # One document: head for training, tail for validation, together the whole file.
    assert split_docs(dm.train_tokens)[0] + split_docs(dm.val_tokens)[0] == raw
    assert dm.num_train_tokens + dm.num_val_tokens == len(raw) + 2
    assert 0.15 < dm.num_val_tokens / len(raw) < 0.35

    x, y = dm.train_dataset[0]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (32,)
    assert x[0] == BOS_ID and decode(x) == raw[:31].decode("utf-8", errors="replace")
    assert torch.equal(x[1:], y[:-1])

    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataset) // 4  # drop_last
    for inputs, targets in batches:
        assert isinstance((inputs, targets), tuple)
        assert inputs.shape == targets.shape == (4, 32)
        assert inputs.dtype == targets.dtype == torch.int64
        assert int(inputs.max()) < VOCAB_SIZE and int(targets.max()) < VOCAB_SIZE
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in inputs:
            chunk = row[row < 256].numpy().astype(np.uint8).tobytes()
            assert chunk in raw  # every window is a verbatim slice of the file

    val = list(dm.val_dataloader())
    flat = torch.cat([inp for inp, _ in val]).reshape(-1)
    n = len(dm.val_dataset) * 32
    assert torch.equal(flat, torch.from_numpy(dm.val_tokens[:n].astype(np.int64)))  # in order


def test_folder_source_reads_all_text_files(tmp_path):
    root = tmp_path / "corpus"
    expected = write_folder(root)
    dm = make_dm(root, tmp_path, val_fraction=0.3)

    names = dm.train_documents + dm.val_documents
    assert sorted(names) == sorted(expected)  # no hidden folder, no binary file
    assert not set(dm.train_documents) & set(dm.val_documents)
    assert len(dm.val_documents) >= 1 and len(dm.train_documents) >= 1
    # Each stream is exactly its documents, in sorted order, each after a BOS.
    assert split_docs(dm.train_tokens) == [expected[n] for n in dm.train_documents]
    assert split_docs(dm.val_tokens) == [expected[n] for n in dm.val_documents]
    assert dm.train_documents == sorted(dm.train_documents)


def test_glob_source(tmp_path):
    root = tmp_path / "corpus"
    expected = write_folder(root)
    dm = make_dm(str(root / "**" / "*.[mr]*"), tmp_path)  # .md and .rst files
    wanted = {"b.md", "sub/deeper/d.rst"}
    assert set(dm.train_documents + dm.val_documents) == wanted
    got = split_docs(dm.train_tokens) + split_docs(dm.val_tokens)
    assert sorted(got) == sorted(expected[n] for n in wanted)


def test_split_and_order_are_deterministic(tmp_path):
    root = tmp_path / "corpus"
    write_folder(root)
    for i in range(20):
        (root / f"extra_{i:02d}.txt").write_text(f"document number {i}\n" * (5 + i))
    a = make_dm(root, tmp_path, cache_dir=str(tmp_path / "c1"), val_fraction=0.2, seed=3)
    b = make_dm(root, tmp_path, cache_dir=str(tmp_path / "c2"), val_fraction=0.2, seed=3)
    assert not a.loaded_from_cache and not b.loaded_from_cache  # both built from scratch
    assert np.array_equal(a.train_tokens, b.train_tokens)
    assert np.array_equal(a.val_tokens, b.val_tokens)
    assert a.val_documents == b.val_documents and len(a.val_documents) >= 5
    assert not set(a.train_documents) & set(a.val_documents)
    for (xa, ya), (xb, yb) in zip(a.train_dataloader(), b.train_dataloader()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same seeded shuffle


def test_cache_reused_and_invalidated(tmp_path):
    root = tmp_path / "corpus"
    write_folder(root)
    cache = tmp_path / "cache"
    first = make_dm(root, tmp_path)
    assert not first.loaded_from_cache
    assert first.cache_path and Path(first.cache_path).parent == cache

    second = make_dm(root, tmp_path)
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    assert np.array_equal(first.train_tokens, second.train_tokens)
    assert np.array_equal(first.val_tokens, second.val_tokens)
    assert second.val_documents == first.val_documents
    # Only the complete cache folder, no temp leftovers from the atomic write.
    assert [p.name for p in cache.iterdir()] == [Path(first.cache_path).name]

    (root / "a.txt").write_text("changed contents, and a different size\n" * 9)
    third = make_dm(root, tmp_path)
    assert not third.loaded_from_cache and third.cache_path != first.cache_path
    docs = dict(
        zip(third.train_documents + third.val_documents, split_docs(third.train_tokens) + split_docs(third.val_tokens))
    )
    assert docs["a.txt"].startswith(b"changed contents")

    # A different seq_len reuses the same token cache.
    fourth = make_dm(root, tmp_path, seq_len=8)
    assert fourth.loaded_from_cache and fourth.cache_path == third.cache_path


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "envcache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dm = TextDataModule(source=str(path), seq_len=16)
    dm.setup()  # setup alone also works (builds the cache when missing)
    assert Path(dm.cache_path).parent == tmp_path / "envcache"


def test_stdlib_source_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = make_dm("stdlib", tmp_path, max_bytes=300_000, seq_len=64, batch_size=8)
    names = dm.train_documents + dm.val_documents
    assert all(n.endswith(".py") for n in names)
    assert not any(n.startswith(("site-packages/", "test/")) for n in names)
    assert len(set(names)) == len(names)
    assert dm.train_documents == sorted(dm.train_documents)
    assert dm.val_documents == sorted(dm.val_documents)
    # Exactly max_bytes of text: the bytes plus one BOS per document.
    assert dm.num_train_tokens + dm.num_val_tokens == 300_000 + len(names)
    # Documents are the real files (the last one may be cut by max_bytes).
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = dict(zip(dm.train_documents, split_docs(dm.train_tokens)))
    for name in dm.train_documents[:3]:
        assert (root / name).read_bytes().startswith(docs[name])
    inputs, _ = next(iter(dm.train_dataloader()))
    assert inputs.shape == (8, 64) and int(inputs.max()) < VOCAB_SIZE
    assert 0.0 < dm.unigram_entropy() < math.log(VOCAB_SIZE)


def test_unigram_entropy_by_hand(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    contents = {"one.txt": "aaab", "two.txt": "abcabc", "three.txt": "hello world", "four.txt": "zz"}
    for name, text in contents.items():
        (root / name).write_text(text)
    dm = make_dm(root, tmp_path, seq_len=1, batch_size=1, val_fraction=0.25)
    counts = Counter()
    for name in dm.train_documents:
        counts.update(contents[name].encode())
        counts[BOS_ID] += 1  # every document starts with BOS
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert dm.num_train_tokens == total
    assert dm.unigram_entropy() == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------- errors


def test_empty_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"source=.*found no files.*0 bytes.*need at least \d+ bytes"):
        make_dm(tmp_path / "empty", tmp_path)


def test_glob_without_matches_raises(tmp_path):
    with pytest.raises(ValueError, match=r"source=.*0 bytes"):
        make_dm(tmp_path / "*.nothing", tmp_path)


def test_empty_files_raise(tmp_path):
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"source=.*0 bytes"):
        make_dm(tmp_path / "blank.txt", tmp_path)


def test_too_small_corpus_raises(tmp_path):
    (tmp_path / "small.txt").write_text("just a few bytes")
    with pytest.raises(ValueError, match=r"source=.*found 16 bytes.*seq_len \+ 1 = 65.*bytes in total"):
        make_dm(tmp_path / "small.txt", tmp_path, seq_len=64)


@pytest.mark.parametrize("name", ["missing/corpus.txt", "corpus.txt", "./corpus", "a/b/c"])
def test_missing_path_raises(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^data.source=.*no such file or folder[^\n]*$"):
        make_dm(name, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TextDataModule(**kwargs)


def test_hub_name_offline_raises_clear_error(tmp_path, monkeypatch):
    import datasets  # noqa: F401  (imported first: the flag must be honoured after import)
    import huggingface_hub.constants as hub_constants

    before = hub_constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    name = "lightning-moe-no-such-org/no-such-dataset-7f3a9c"
    with pytest.raises(ConfigError, match=r"^data.source=.*no-such-dataset-7f3a9c.*could not be reached") as info:
        make_dm(name, tmp_path)
    assert "HF_HUB_OFFLINE" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="config 'sub'"):
        make_dm(f"hf:{name}:sub", tmp_path)
    # The libraries' own flags are restored afterwards.
    assert hub_constants.HF_HUB_OFFLINE == before


def test_corrupt_cache_is_rebuilt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    first = make_dm(path, tmp_path)
    Path(first.cache_path, "meta.json").write_bytes(b"not json")
    with pytest.warns(UserWarning, match="damaged.*meta.json.*rebuilding"):
        again = make_dm(path, tmp_path)
    assert not again.loaded_from_cache
    assert np.array_equal(again.train_tokens, first.train_tokens)
    assert make_dm(path, tmp_path).loaded_from_cache
