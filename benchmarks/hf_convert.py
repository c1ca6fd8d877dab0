"""Time and peak memory of converting a Hugging Face MoE model to MoELayer (from_hf) and back (to_hf).

Builds a randomly initialised OLMoE-style model (about 1B parameters with the defaults)
directly in bf16 on CPU, then converts it. The peak resident set size of each
conversion is read from the kernel (``VmHWM``, reset before each step through
``/proc/self/clear_refs``), so the model's creation does not count. The goal is a peak
below 1.15x the model's bytes: conversion must not hold the model twice.

    nice python benchmarks/hf_convert.py                  # ~1B parameters, bf16
    python benchmarks/hf_convert.py --layers 2 --experts 8 # quick check
    nice python benchmarks/hf_convert.py --family deepseek_v3 --experts 64 --top-k 8 --ffn 256  # ~1.1B, DeepSeek-V3 routing
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, OlmoeConfig

from lightning_moe.hf import from_hf, to_hf

GIB = 2**30


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measured(step, *args, **kwargs) -> tuple[float, int, int]:
    """(seconds, RSS before, peak RSS during) of ``step``, in bytes."""
    reset_peak()
    before = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    step(*args, **kwargs)
    seconds = time.perf_counter() - start
    return seconds, before, status_kib("VmHWM") * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=512, help="expert hidden width")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--estimator", default="densemixer")
    parser.add_argument("--family", default="olmoe", choices=["olmoe", "deepseek_v3"],
                        help="deepseek_v3: sigmoid routing in 8 groups (top 4), a selection bias, one shared expert")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.family == "deepseek_v3":
        config = DeepseekV3Config(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            moe_intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
            n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=0,
        )
    else:
        config = OlmoeConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, num_experts=args.experts,
            num_experts_per_tok=args.top_k,
        )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    create_s = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.3f}B parameters, {model_bytes / GIB:.3f} GiB in bf16, created in {create_s:.1f} s")

    results = {"config": vars(args), "parameters": params, "model_bytes": model_bytes}
    for name, step, step_args in (
        ("from_hf", from_hf, {"estimator": args.estimator}),
        ("to_hf", to_hf, {}),
    ):
        seconds, before, peak = measured(step, model, **step_args)
        # RSS not holding the model (interpreter, libraries): the ratio the goal is about
        # compares what conversion adds on top of it with the model's bytes.
        rest = before - model_bytes
        ratio = (peak - rest) / model_bytes
        print(
            f"{name}: {seconds:.2f} s; RSS before {before / GIB:.3f} GiB, peak {peak / GIB:.3f} GiB"
            f" (+{(peak - before) / GIB:.3f} GiB); peak without the {rest / GIB:.3f} GiB baseline ="
            f" {ratio:.3f}x the model's bytes"
        )
        results[name] = {"seconds": seconds, "rss_before": before, "peak_rss": peak, "peak_over_model_bytes": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
