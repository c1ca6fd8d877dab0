"""The memory-mapped token cache: parallel = serial, shards, damage and killed builds, bounded sources."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ready_datamodule as make_dm
from helpers import train_bpe_tokenizer, write_corpus

import lightning_moe.data.sources as sources
from lightning_moe.data import BOS_ID, TextDataModule
from lightning_moe.data.cache import TokenStream, build_cache
from lightning_moe.data.tokenizers import load_tokenizer
from lightning_moe.errors import ConfigError

TEXTS = {
    f"part_{i:03d}.txt": f"document {i}: " + "lorem ipsum dolor sit amet, ünïcode ✓ " * (3 + i % 17) for i in range(60)
}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", TEXTS)


@pytest.fixture
def bpe(tmp_path):
    return train_bpe_tokenizer(tmp_path / "tokenizer.json", list(TEXTS.values()), vocab_size=280)


def cache_files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_parallel_build_equals_serial_build(tmp_path, corpus, bpe, tokenizer):
    tokenizer = str(bpe) if tokenizer == "bpe" else tokenizer
    serial = make_dm(corpus, tmp_path / "serial", tokenizer=tokenizer, val_fraction=0.1)
    parallel = make_dm(corpus, tmp_path / "parallel", tokenizer=tokenizer, val_fraction=0.1, num_proc=2)
    assert Path(serial.cache_path).name == Path(parallel.cache_path).name  # num_proc is not part of the key
    assert cache_files(serial.cache_path) == cache_files(parallel.cache_path)  # byte for byte, metadata included


def test_memmap_stream_equals_in_memory_tokenization(tmp_path, corpus):
    dm = make_dm(corpus, tmp_path / "cache", val_fraction=0.1)
    assert isinstance(dm.train_tokens, TokenStream)
    for names, stream in ((dm.train_documents, dm.train_tokens), (dm.val_documents, dm.val_tokens)):
        expected = b"".join(b"\x00" + TEXTS[n].encode("utf-8") for n in names)
        reference = np.frombuffer(expected, dtype=np.uint8).astype(np.uint16)
        reference[np.frombuffer(expected, dtype=np.uint8) == 0] = BOS_ID  # the text has no NUL bytes
        assert np.array_equal(np.asarray(stream), reference)
    # Training windows read through the memory map are the reference's windows.
    inputs, targets = dm.train_dataset[3]
    ref = np.asarray(dm.train_tokens)
    assert inputs.tolist() == ref[48:64].tolist() and targets.tolist() == ref[49:65].tolist()


def test_small_shards_give_the_same_stream_and_windows_across_shard_ends(tmp_path, corpus):
    tokenizer = load_tokenizer("bytes")
    docs = [(name, TEXTS[name].encode()) for name in sorted(TEXTS)]
    one = build_cache(str(tmp_path / "one"), docs, tokenizer, meta={"key": "k"}, val_fraction=0.1, seed=0)
    many = build_cache(
        str(tmp_path / "many"), docs, tokenizer, meta={"key": "k"}, val_fraction=0.1, seed=0, shard_tokens=1000
    )
    assert len(many.meta["shards"]) > 5 and len(one.meta["shards"]) == 1
    full = np.asarray(one.train)
    assert np.array_equal(np.asarray(many.train), full) and np.array_equal(np.asarray(many.val), np.asarray(one.val))
    rng = np.random.default_rng(0)
    for start in rng.integers(0, len(full) - 300, size=200):
        stop = start + int(rng.integers(0, 300))
        assert np.array_equal(many.train[start:stop], full[start:stop])
    assert many.train[-1] == full[-1] and np.array_equal(np.concatenate(list(many.train.chunks(777))), full)


def test_max_tokens_cuts_the_stream(tmp_path, corpus):
    full = make_dm(corpus, tmp_path / "full", val_fraction=0.1)
    capped = make_dm(corpus, tmp_path / "capped", val_fraction=0.1, max_tokens=2000)
    assert capped.num_train_tokens + capped.num_val_tokens == 2000
    every = np.concatenate([np.asarray(full.train_tokens), np.asarray(full.val_tokens)])
    assert full.num_train_tokens + full.num_val_tokens == len(every) > 2000



@pytest.mark.parametrize("max_tokens", [None, 2000])
def test_stored_train_counts_are_the_training_streams_counts(tmp_path, corpus, bpe, max_tokens):
    # Counted while writing, less the validation split's: must equal a count of the train stream itself.
    for tokenizer in ("bytes", str(bpe)):
        dm = make_dm(corpus, tmp_path / tokenizer.replace("/", "_"), tokenizer=tokenizer, val_fraction=0.1,
                     max_tokens=max_tokens)
        train = np.asarray(dm.train_tokens).astype(np.int64)
        counts = dm._corpus.train_counts
        assert len(counts) == dm.tokenizer.vocab_size
        assert np.array_equal(counts, np.bincount(train, minlength=dm.tokenizer.vocab_size))

def damage_truncate(path):
    shard = Path(path) / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])


def damage_flip(path):
    shard = Path(path) / "tokens-00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, one token altered
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [(damage_truncate, "has .* bytes"), (damage_flip, "fails its CRC-32")])
def test_damaged_shard_is_detected_reported_in_one_line_and_rebuilt(tmp_path, corpus, damage, reason):
    first = make_dm(corpus, tmp_path / "cache")
    expected = np.asarray(first.train_tokens).copy()
    damage(first.cache_path)
    with pytest.warns(UserWarning, match=rf"damaged \(tokens-00000.bin {reason}.*rebuilding") as caught:
        again = make_dm(corpus, tmp_path / "cache")
    assert "\n" not in str(caught[0].message)
    assert not again.loaded_from_cache and np.array_equal(np.asarray(again.train_tokens), expected)
    assert make_dm(corpus, tmp_path / "cache").loaded_from_cache


def _slow_build(source, cache_dir):
    # Reading each document takes 50 ms, so the parent can kill the build midway.
    read = sources._read_text

    def slow(*args):
        time.sleep(0.05)
        return read(*args)

    sources._read_text = slow
    make_dm(source, cache_dir)


def test_killed_build_leaves_nothing_trusted_and_the_next_run_rebuilds(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE_LOCK_TIMEOUT", "30")  # far below the heartbeat's stale time
    cache_dir = tmp_path / "cache"
    child = multiprocessing.get_context("fork").Process(target=_slow_build, args=(corpus, cache_dir))
    child.start()
    deadline = time.monotonic() + 60
    while not list(cache_dir.glob(".*.tmp-*/documents.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # a tenth of the way through reading the 60 documents
    assert child.is_alive(), "the build finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    leftovers = sorted(p.name.rsplit(".", 1)[1].split("-")[0] for p in cache_dir.iterdir())
    assert leftovers == ["lock", "tmp"], leftovers  # only the killed build's lock and temporary folder

    # Its process is provably gone (this host, this PID namespace): taken over at once, not
    # after the heartbeat timeout that a builder on another host would need.
    dm = make_dm(corpus, cache_dir)
    assert not dm.loaded_from_cache
    assert [p.name for p in cache_dir.iterdir()] == [Path(dm.cache_path).name]  # the dead build's entries removed
    reference = make_dm(corpus, tmp_path / "reference")
    assert cache_files(dm.cache_path) == cache_files(reference.cache_path)


def test_resume_sampler_order_is_unchanged_on_the_memmap_loader(tmp_path, corpus):
    dm = make_dm(corpus, tmp_path / "cache")
    loader = dm.train_dataloader()
    batches = [x for x, _ in loader]
    loader.sampler.resume(0, 3 * dm.batch_size)
    assert all(np.array_equal(a, b) for a, b in zip([x for x, _ in loader], batches[3:], strict=True))


def test_sampler_order_is_distributed_samplers(tmp_path):
    """The documented order: DistributedSampler's (shuffle, drop_last), kept without a list of Python ints."""
    from torch.utils.data import DistributedSampler

    from lightning_moe.data import ResumableSampler

    dataset = list(range(10_007))
    for ranks in (1, 3):
        for rank in range(ranks):
            ours = ResumableSampler(dataset, num_replicas=ranks, rank=rank, seed=5)
            torchs = DistributedSampler(dataset, num_replicas=ranks, rank=rank, seed=5, shuffle=True, drop_last=True)
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                torchs.set_epoch(epoch)
                assert list(ours) == list(torchs)
            ours.resume(3, 30 * ranks)
            assert list(ours) == list(torchs)[30:]


# --------------------------------------------------------------------------- bad inputs


def test_random_bytes_file_is_rejected_as_not_text(tmp_path):
    path = tmp_path / "random.txt"
    path.write_bytes(np.random.default_rng(0).integers(1, 256, size=100_000, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match=r"^data.source=.*random.txt' is not text \(\d+% [^\n]*$"):
        make_dm(path, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_legacy_8bit_text_is_still_read(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("Café crème à la française, déjà vu. " * 200).encode("latin-1"))
    dm = make_dm(path, tmp_path / "cache")
    assert "Caf\ufffd cr\ufffdme" in dm.tokenizer.decode(np.asarray(dm.train_tokens)[:40])


def test_folder_skips_binary_files(tmp_path, corpus):
    (corpus / "blob.dat").write_bytes(np.random.default_rng(1).integers(1, 256, size=5000, dtype=np.uint8).tobytes())
    dm = make_dm(corpus, tmp_path / "cache")
    assert "blob.dat" not in dm.train_documents + dm.val_documents
    assert sorted(dm.train_documents + dm.val_documents) == sorted(TEXTS)


# --------------------------------------------------------------------------- Hub streaming


def test_hub_stream_is_read_up_to_max_bytes(tmp_path, monkeypatch):
    import datasets

    rows = [f"row {i} " + "text " * 40 for i in range(500)]
    stream = datasets.Dataset.from_dict({"text": rows, "id": list(range(500))}).to_iterable_dataset()
    seen = []

    def load(src):
        seen.append(src.streaming)
        return stream

    monkeypatch.setattr(sources, "_load_hub_dataset", load)
    dm = make_dm("someone/corpus", tmp_path / "cache", hf_streaming=True, max_bytes=20_000, val_fraction=0.1)
    assert seen and all(seen)
    names = dm.train_documents + dm.val_documents
    assert sorted(names, key=lambda n: int(n.split("/")[1])) == [f"train/{i}" for i in range(len(names))]
    text = b"".join(rows[int(n.split("/")[1])].encode() for n in sorted(names, key=lambda n: int(n.split("/")[1])))
    assert dm._corpus.total_bytes == 20_000 and len(text) >= 20_000 > len(text) - len(rows[0])


def test_hub_stream_needs_a_bound_and_names_a_missing_column(tmp_path, monkeypatch):
    import datasets

    with pytest.raises(ConfigError, match=r"^data.hf_streaming=true needs data.max_bytes or data.max_tokens"):
        TextDataModule(source="someone/corpus", hf_streaming=True)
    stream = datasets.Dataset.from_dict({"content": ["a b c"] * 10}).to_iterable_dataset()
    monkeypatch.setattr(sources, "_load_hub_dataset", lambda src: stream)
    with pytest.raises(ConfigError, match=r"^data.hf_text_field='text' is not a column.*\['content'\]"):
        make_dm("someone/corpus", tmp_path / "cache", hf_streaming=True, max_tokens=100)


def test_hub_stream_offline_error_stays_clear(tmp_path, monkeypatch):
    import datasets  # noqa: F401  (imported first: the flag must be honoured after import)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^data.source=.*no-such-dataset-7f3a9c.*could not be reached.*OFFLINE"):
        make_dm("lightning-moe-no-such-org/no-such-dataset-7f3a9c", tmp_path / "cache", hf_streaming=True, max_bytes=10)
