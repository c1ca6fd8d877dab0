"""Post-training data: render + tokenise throughput, peak memory, reopening the cache, packed-row loss equality.

Each phase runs in a fresh process, so that its peak resident memory (VmHWM) is its own:

* build: ``PostTrainDataModule.prepare_data()`` + ``setup()`` on ``--conversations`` synthetic
  multi-turn conversations of ultrachat-like length (about ``--tokens`` tokens each, 3 to 5
  exchanges of random words) in a .jsonl file, packed into rows of ``--seq-len``; the JSON is
  converted to Arrow by ``datasets`` first and timed apart;
* reopen: a new process from its start (imports included) to its first training batch, the
  cache reopened on a "resumed" launch (sizes checked; CRC-32 checked in ``prepare_data``);
* loss: for Qwen3-MoE and Mixtral tiny models and each attention implementation that runs
  here, the summed loss of packed rows against the sum of their examples' losses alone.

    python benchmarks/posttrain_cache.py --workdir /tmp/posttrain_bench --conversations 200000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: peak resident; RssAnon: resident and not file-backed), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return status_mb("VmHWM")


class AnonPeak(threading.Thread):
    """The peak of RssAnon, sampled every 50 ms: VmHWM also counts the pages of memory-mapped files
    (the Arrow dataset, the token stream) that were read, which the kernel can drop at any time."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, status_mb("RssAnon"))
            time.sleep(0.05)


def make_data(workdir: Path, conversations: int, tokens: int) -> tuple[str, str]:
    """A tokenizer folder and a .jsonl of ``conversations`` conversations of about ``tokens`` tokens."""
    from lightning_moe.hf.tiny import build_tokenizer

    tokenizer_dir = workdir / "tokenizer"
    if not tokenizer_dir.exists():
        build_tokenizer(512).save_pretrained(tokenizer_dir)
    source = workdir / f"chats-{conversations}-{tokens}.jsonl"
    if source.exists():
        return str(tokenizer_dir), str(source)
    from transformers import AutoTokenizer

    words = ("apple river stone cloud tiger paper green house light music water table night bread horse chair"
             " dream field glass honey ocean piano quiet robot smile train under violet winter yellow zebra").split()
    sample = " ".join(random.Random(0).choices(words, k=1000))
    per_word = len(AutoTokenizer.from_pretrained(tokenizer_dir)(sample)["input_ids"]) / 1000
    rng = random.Random(0)
    with open(source, "w", encoding="utf-8") as fh:
        for _ in range(conversations):
            exchanges = rng.randint(3, 5)
            words_per_turn = max(1, int(tokens / per_word / (2 * exchanges)))
            messages = []
            for _ in range(exchanges):
                for role, share in (("user", 0.4), ("assistant", 1.6)):
                    n = max(1, int(words_per_turn * share * rng.uniform(0.5, 1.5)))
                    messages.append({"role": role, "content": " ".join(rng.choices(words, k=n))})
            fh.write(json.dumps({"messages": messages}) + "\n")
    return str(tokenizer_dir), str(source)


def data_module(args: argparse.Namespace, tokenizer_dir: str, source: str):
    from lightning_moe.data.posttrain import PostTrainDataModule

    return PostTrainDataModule(source=source, tokenizer=tokenizer_dir, seq_len=args.seq_len, batch_size=8,
                               packing=True, val_fraction=0.01, num_proc=args.num_proc,
                               cache_dir=str(Path(args.workdir) / f"cache-{args.num_proc}"))


def phase_build(args: argparse.Namespace) -> dict:
    import datasets

    tokenizer_dir, source = make_data(Path(args.workdir), args.conversations, args.tokens)
    start = time.perf_counter()
    datasets.load_dataset("json", data_files=[source], split="train")  # JSON -> Arrow, once
    arrow_s = time.perf_counter() - start
    dm = data_module(args, tokenizer_dir, source)
    anon = AnonPeak()
    anon.start()
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    build_s = time.perf_counter() - start
    train = dm.train_dataset
    return {"conversations": args.conversations, "json_to_arrow_s": round(arrow_s, 1), "build_s": round(build_s, 1),
            "conversations_per_s": round(args.conversations / build_s, 1), "train_rows": len(train),
            "row_fill": round(float(train.lengths.sum()) / (len(train) * args.seq_len), 3),
            "tokens_per_conversation": round(float(train.lengths.sum()) / len(train.lengths) + 1),
            "truncated": dm.truncated_examples,
            "cache_mb": round(sum(f.stat().st_size for f in Path(dm.cache_path).iterdir()) / 2**20),
            "num_proc": args.num_proc, "peak_rss_mb": round(peak_rss_mb()), "peak_anon_rss_mb": round(anon.peak)}


def phase_reopen(args: argparse.Namespace, launched: float) -> dict:
    tokenizer_dir, source = make_data(Path(args.workdir), args.conversations, args.tokens)
    start = time.perf_counter()
    dm = data_module(args, tokenizer_dir, source)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return {"reopened": dm.loaded_from_cache, "launch_to_first_batch_s": round(time.time() - launched, 2),
            "data_module_to_first_batch_s": round(time.perf_counter() - start, 2),
            "batch": [list(t.shape) for t in batch], "peak_rss_mb": round(peak_rss_mb())}


def phase_loss(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lightning_moe.data.loading import _collate
    from lightning_moe.data.packing import PackedBatch, row_position_ids
    from lightning_moe.hf.module import HFMoELanguageModel

    common = dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, head_dim=8)
    families = {
        "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=True),
        "mixtral": dict(model_type="mixtral", intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    }
    implementations = ["sdpa", "eager", "flex_attention"]
    if torch.cuda.is_available():
        implementations.append("flash_attention_2")
    results = {}
    lengths, seq_len = [61, 40, 33, 90], 240
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(0, 400, (n + 1,), generator=generator) for n in lengths]
    inputs, targets = torch.zeros(seq_len, dtype=torch.long), torch.full((seq_len,), -100)
    slot = 0
    for ids in examples:
        inputs[slot : slot + len(ids) - 1], targets[slot : slot + len(ids) - 1] = ids[:-1], ids[1:]
        slot += len(ids) - 1
    batch = _collate([PackedBatch(inputs, targets, torch.from_numpy(row_position_ids(np.array(lengths), seq_len)))] * 2)
    for family, config in families.items():
        for attn in implementations:
            try:
                torch.manual_seed(0)
                module = HFMoELanguageModel(config={**common, **config}, dtype="float32", attn_implementation=attn)
            except Exception as err:  # an implementation that is not installed here
                results[f"{family}/{attn}"] = f"not available: {type(err).__name__}"
                continue
            module.eval()

            def summed(b):
                logits = module.logits(b)
                return F.cross_entropy(logits.flatten(0, 1), b[1].flatten(), ignore_index=-100, reduction="sum")

            with torch.no_grad():
                packed = summed(batch).item()
                alone = 2 * sum(summed((ids[None, :-1], ids[None, 1:])).item() for ids in examples)
                leaking = summed(tuple(batch[:2])).item()
            results[f"{family}/{attn}"] = {"packed": packed, "alone": alone, "rel_diff": abs(packed - alone) / alone,
                                           "without_position_ids_rel_diff": abs(leaking - alone) / alone}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/posttrain_bench")
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=1200)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--phases", default="build,reopen,loss")
    parser.add_argument("--phase", choices=["build", "reopen", "loss"], default=None)
    parser.add_argument("--launched", type=float, default=None)
    args = parser.parse_args()
    if args.phase is None:  # every phase in a fresh process
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        for phase in args.phases.split(","):
            command = [sys.executable, __file__, "--phase", phase, "--workdir", args.workdir,
                       "--conversations", str(args.conversations), "--tokens", str(args.tokens),
                       "--seq-len", str(args.seq_len), "--num-proc", str(args.num_proc), "--launched", str(time.time())]
            subprocess.run(command, check=True)
        return
    if args.phase == "build":
        result = phase_build(args)
    elif args.phase == "reopen":
        result = phase_reopen(args, args.launched)
    else:
        result = phase_loss(args)
    print(json.dumps({args.phase: result}), flush=True)


if __name__ == "__main__":
    main()
