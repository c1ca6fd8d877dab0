"""The data pipeline: tokenisation throughput, memory while caching and training on a large corpus, first batch.

Three measurements, each in fresh processes so that peak memory belongs to one phase:

* throughput: MB of text per second that ``build_cache`` tokenises and writes, with 1 and
  2 processes, for the byte tokenizer and a byte-level BPE tokenizer trained here on the
  standard library (vocabulary ``--bpe-vocab``; each process single-threaded);
* memory: a generated corpus of ``--gb`` GB of text (a folder of 8 MB files, standard
  library source with every file shifted differently) is cached, then the quickstart model
  trains on it for ``--train-steps`` steps; peak resident memory (VmHWM) of the main
  process and of the tokeniser processes, for ``--gb`` and for ``--small-gb`` to show it
  does not grow with the corpus;
* time to first batch on the already cached corpus: a new process opens the cache
  (checking every file's size and CRC-32) and draws one training batch.

    python benchmarks/data_pipeline.py --workdir /tmp/data_bench            # 2 GB: ~4 GB of cache on disk
    python benchmarks/data_pipeline.py --workdir /tmp/data_bench --gb 0.2 --small-gb 0.05 --train-steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: processes are the unit

FILE_BYTES = 8 * 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    """Largest peak resident memory of any finished child process (the tokeniser pool), MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def stdlib_text() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join(p.read_bytes() for p in sorted(root.glob("*.py")))


def generate_corpus(folder: Path, gb: float, file_bytes: int = FILE_BYTES) -> Path:
    """A folder of ``file_bytes`` text files, ``gb`` GB in all (reused when already complete)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    text = stdlib_text()
    for i in range(max(1, round(gb * 2**30 / file_bytes))):
        shift = (i * 7919 * 4099) % len(text)
        body = (f"# part {i}\n".encode() + text[shift:] + text[:shift]) * (file_bytes // len(text) + 1)
        cut = body[:file_bytes].rfind(b"\n") + 1
        (folder / f"part_{i:05d}.py").write_bytes(body[:cut])
    done.touch()
    return folder


def train_bpe(path: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([stdlib_text().decode("utf-8", errors="replace")], trainer)
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------- phases (child processes)


def phase_throughput(args: argparse.Namespace) -> dict:
    from lightning_moe.data.cache import build_cache
    from lightning_moe.data.sources import resolve_source
    from lightning_moe.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    out = Path(args.workdir) / f"throughput-{os.getpid()}"
    docs = resolve_source(args.source, "train", "text").documents(None)
    start = time.perf_counter()
    corpus = build_cache(
        str(out), docs, tokenizer, meta={"key": "bench"}, val_fraction=0.01, seed=0, num_proc=args.num_proc
    )
    seconds = time.perf_counter() - start
    result = {"MB": corpus.total_bytes / 1e6, "seconds": seconds, "MB_per_s": corpus.total_bytes / 1e6 / seconds}
    shutil.rmtree(out)
    return result


def quickstart_data(args: argparse.Namespace):
    from lightning_moe.data import TextDataModule

    return TextDataModule(
        source=args.source, seq_len=256, batch_size=16, cache_dir=args.cache_dir, num_proc=args.num_proc
    )


def phase_build(args: argparse.Namespace) -> dict:
    data = quickstart_data(args)
    start = time.perf_counter()
    data.prepare_data()
    return {
        "seconds": time.perf_counter() - start,
        "tokens": len(data.train_tokens) + len(data.val_tokens),
        "cache_GB": sum(f.stat().st_size for f in Path(data.cache_path).iterdir()) / 2**30,
        "peak_rss_MB": peak_rss_mb(),
        "tokeniser_processes_peak_rss_MB": children_peak_rss_mb(),
    }


def phase_train(args: argparse.Namespace) -> dict:
    import lightning as L

    from lightning_moe.module import MoELanguageModel

    start = time.perf_counter()
    data = quickstart_data(args)
    data.prepare_data()
    data.setup("fit")
    next(iter(data.train_dataloader()))
    first_batch = time.perf_counter() - start
    assert data.loaded_from_cache, "the train phase must find the cache built by the build phase"
    model = MoELanguageModel(
        d_model=256,
        n_layers=4,
        n_heads=4,
        max_seq_len=256,
        moe={"num_experts": 8, "top_k": 2, "ffn_hidden": 512},
        learning_rate=2e-3,
        warmup_steps=2,
    )
    trainer = L.Trainer(
        max_steps=args.train_steps,
        limit_val_batches=2,
        val_check_interval=args.train_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    return {
        "time_to_first_batch_s": first_batch,
        "train_seconds": time.perf_counter() - start,
        "steps": args.train_steps,
        "peak_rss_MB": peak_rss_mb(),
    }


PHASES = {"throughput": phase_throughput, "build": phase_build, "train": phase_train}


def run_phase(phase: str, **kwargs) -> dict:
    argv = [sys.executable, __file__, "--phase", phase]
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lightning_moe_data_bench")
    parser.add_argument("--gb", type=float, default=2.0, help="size of the large generated corpus")
    parser.add_argument("--small-gb", type=float, default=0.25, help="size of the small corpus compared with it")
    parser.add_argument("--throughput-mb", type=float, default=64.0, help="MB of text per byte-tokenizer run")
    parser.add_argument("--bpe-throughput-mb", type=float, default=4.0, help="MB of text per BPE run")
    parser.add_argument("--bpe-vocab", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--num-proc", type=int, default=2, help="tokeniser processes for the large corpus")
    parser.add_argument("--skip-large", action="store_true", help="throughput only")
    # Internal: run one phase in this process.
    parser.add_argument("--phase", choices=sorted(PHASES))
    parser.add_argument("--source")
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(), "throughput": {}, "corpora": {}}
    bpe = train_bpe(work / f"bpe-{args.bpe_vocab}.json", args.bpe_vocab)
    for name, tokenizer, mb in (
        ("bytes", "bytes", args.throughput_mb),
        (f"bpe{args.bpe_vocab}", str(bpe), args.bpe_throughput_mb),
    ):
        sample = generate_corpus(work / f"corpus-sample-{mb:g}MB", mb / 1024, 2**20)
        for num_proc in (1, 2):
            result = run_phase("throughput", workdir=work, source=sample, tokenizer=tokenizer, num_proc=num_proc)
            results["throughput"][f"{name}/{num_proc}proc"] = result
            print(f"throughput {name:>8} {num_proc} proc: {result['MB_per_s']:7.2f} MB/s", flush=True)
    if not args.skip_large:
        for gb in (args.small_gb, args.gb):
            corpus = generate_corpus(work / f"corpus-{gb:g}GB", gb)
            cache = work / f"cache-{gb:g}GB"
            shutil.rmtree(cache, ignore_errors=True)
            common = {"source": corpus, "cache_dir": cache, "num_proc": args.num_proc}
            build = run_phase("build", **common)
            train = run_phase("train", train_steps=args.train_steps, **common)
            results["corpora"][f"{gb:g}GB"] = {"build": build, "train": train}
            print(
                f"{gb:g} GB corpus: build {build['seconds']:.0f}s, peak RSS {build['peak_rss_MB']:.0f} MB"
                f" (tokeniser processes {build['tokeniser_processes_peak_rss_MB']:.0f} MB);"
                f" train {args.train_steps} steps peak RSS {train['peak_rss_MB']:.0f} MB;"
                f" first batch from cache {train['time_to_first_batch_s']:.2f}s",
                flush=True,
            )
            shutil.rmtree(cache, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
