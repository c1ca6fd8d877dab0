"""Peak memory per rank of post-training a Hugging Face MoE under FSDP2: loading, first step, export.

Builds (once) a randomly initialised Qwen3-MoE-shaped model in bf16 (about 1.1B parameters with
the defaults) saved by ``save_pretrained`` as sharded safetensors, then runs ``lightning-moe fit``
on it with 2 gloo ranks on CPU, ``bf16-true``, ``ModelParallelStrategy`` (FSDP2), one step, once
with ``meta_init: false`` (the whole model loaded by every rank, then sharded) and once with
``meta_init: true`` (built on meta, each rank reading its shards). Each rank reports, from the
kernel (``VmHWM``, the peak resident set size of the process):

- ``load``: the peak from launch until the model is sharded and filled, before the first forward;
- ``step``: the peak through the first optimizer step; ``to_step_s``: wall time from launch;
- ``state``: its bytes of parameters + gradients + AdamW's two states (the sharded training state).

The ``meta`` run saves a distributed checkpoint, which ``lightning-moe export`` then writes
into 500 MB shards; the export's peak RSS and time are measured too, with the largest shard.
``interpreter`` is the peak of a process that only imports what a rank imports.

    nice python benchmarks/hf_load_memory.py                     # ~1.1B parameters, ~10 minutes on 2 cores
    python benchmarks/hf_load_memory.py --layers 2 --experts 8   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import lightning as L

GB = 10**9
_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
HERE = os.path.dirname(os.path.abspath(__file__))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS(L.Callback):
    """Writes this rank's peak RSS when training starts (the model loaded and sharded) and after the first step."""

    def __init__(self, out_dir: str, started: float) -> None:
        self.out_dir, self.started, self.record = out_dir, started, {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record["load"] = status_kib("VmHWM") * 1024

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "step" in self.record:
            return
        self.record["step"] = status_kib("VmHWM") * 1024
        self.record["to_step_s"] = time.time() - self.started
        optimizer = trainer.optimizers[0]

        def local_bytes(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = [p for p in pl_module.parameters() if p.requires_grad]
        state = sum(local_bytes(p) for p in pl_module.parameters())
        state += sum(local_bytes(p.grad) for p in params if p.grad is not None)
        state += sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel")
                     and v.dim() > 0)
        self.record["state"] = state
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(self.record, fh)


def build_model(folder: str, layers: int, experts: int, hidden: int, expert_hidden: int, vocab: int) -> int:
    """A random Qwen3-MoE-shaped model saved in bf16 sharded safetensors; returns its bytes."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, intermediate_size=4 * hidden, moe_intermediate_size=expert_hidden, num_experts=experts,
        num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fit_config(folder: str, work: str, meta_init: bool, corpus: str) -> str:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lightning_moe.hf.HFMoELanguageModel",
            "init_args": {"pretrained": folder, "estimator": "topk", "meta_init": meta_init, "learning_rate": 1e-5},
        },
        "data": {
            "class_path": "lightning_moe.data.TextDataModule",
            "init_args": {"source": corpus, "seq_len": 64, "batch_size": 2, "cache_dir": os.path.join(work, "cache")},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "precision": "bf16-true",
            "max_steps": 1,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": work,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1,
                              "save_distributed_checkpoint": True},
            },
            "callbacks": [
                {"class_path": "hf_load_memory.PeakRSS", "init_args": {"out_dir": work, "started": time.time()}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": os.path.join(work, "checkpoints"), "save_last": True}},
            ],
        },
    }
    path = os.path.join(work, "config.json")  # JSON is YAML
    with open(path, "w") as fh:
        json.dump(config, fh)
    return path


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``command``, read by a fresh wrapper from its own children only."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.time(); subprocess.run(sys.argv[1:], check=True);"
        " print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, check=True, capture_output=True, text=True)
    seconds, peak = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak)


def interpreter_bytes() -> int:
    code = "import torch, lightning, transformers, lightning_moe.hf.module; print(open('/proc/self/status').read())"
    text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "lightning-moe-qwen3-moe-bench"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        build_model(args.folder, args.layers, args.experts, args.hidden, args.expert_hidden, args.vocab)
    from safetensors import safe_open

    shards = [os.path.join(args.folder, f) for f in os.listdir(args.folder) if f.endswith(".safetensors")]
    model_bytes = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                tensor = fh.get_slice(key)
                model_bytes += math.prod(tensor.get_shape()) * _DTYPE_BYTES[tensor.get_dtype()]
    interpreter = interpreter_bytes()
    results = {"model_bytes": model_bytes, "interpreter": interpreter, "world_size": 2}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.txt")
        with open(corpus, "w") as fh:
            fh.write("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
        for name, meta_init in (("whole", False), ("meta", True)):
            run_dir = os.path.join(work, name)
            os.makedirs(run_dir)
            config = fit_config(args.folder, run_dir, meta_init, corpus)
            start = time.time()
            subprocess.run(["lightning-moe", "fit", "--config", config], env=env, check=True)
            ranks = []
            for rank in range(2):
                with open(os.path.join(run_dir, f"rank{rank}.json")) as fh:
                    ranks.append(json.load(fh))
            results[name] = {"ranks": ranks, "fit_s": time.time() - start}
        checkpoint = os.path.join(work, "meta", "checkpoints", "last.ckpt")
        output = os.path.join(work, "exported")
        seconds, peak = run_measured(
            ["lightning-moe", "export", checkpoint, "--output", output, "--max_shard_size", "500MB"], env
        )
        largest = max(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output) if f.endswith(".safetensors"))
        results["export"] = {"seconds": seconds, "peak": peak, "largest_shard": largest}
    report(results)


def report(results: dict) -> None:
    model, interp, world = results["model_bytes"], results["interpreter"], results["world_size"]
    arithmetic = 4 * model / world  # parameters, gradients, exp_avg, exp_avg_sq: all bf16 under bf16-true
    print(json.dumps(results, indent=1))
    print(f"model {model / GB:.2f} GB; interpreter {interp / GB:.2f} GB; sharded training state per rank"
          f" 4 x model / {world} = {arithmetic / GB:.2f} GB")
    for name in ("whole", "meta"):
        for rank, r in enumerate(results[name]["ranks"]):
            print(f"{name:5s} rank {rank}: load peak {r['load'] / GB:.2f} GB (goal {(0.6 * model + interp) / GB:.2f});"
                  f" first-step peak {r['step'] / GB:.2f} GB (state measured {r['state'] / GB:.2f} GB);"
                  f" to first step {r['to_step_s']:.0f} s")
    e = results["export"]
    print(f"export: peak {e['peak'] / GB:.2f} GB, {e['seconds']:.0f} s; largest shard {e['largest_shard'] / GB:.2f} GB"
          f" (goal {(1.3 * e['largest_shard'] + interp) / GB:.2f} GB)")


if __name__ == "__main__":
    main()
