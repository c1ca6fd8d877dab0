"""Forward+backward time of one MoE layer: backends vs a dense FFN, and estimator overhead.

Everything is measured side by side in one run and printed as ratios:

* backends: ``loop`` and ``torch`` vs a dense SwiGLU FFN with the same active FLOPs
  (hidden width ``top_k * ffn_hidden``), for each number of experts;
* estimators: each registered estimator vs ``topk`` on the same backend and shape.

    python benchmarks/moe_layer.py                       # CPU defaults of the issue
    python benchmarks/moe_layer.py --tokens 16384 --d-model 1024 --ffn-hidden 4096 --device cuda --dtype bfloat16
    python benchmarks/moe_layer.py --experts 64 --top-k 8 --ffn-hidden 256 --backends torch --estimators densemixer
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from lightning_moe import MoELayer, available_estimators
from lightning_moe.estimators import ESTIMATOR_REGISTRY


class DenseSwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.v1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.v1(x))


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one forward+backward."""
    grad = torch.randn_like(x)
    times = []
    for i in range(warmup + repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
            out = module(x)
        out.backward(grad)
        module.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_layer(args, num_experts: int, backend: str, estimator: str) -> MoELayer:
    top_k = 1 if estimator == "sparsemixer" else args.top_k
    layer = MoELayer(args.d_model, args.ffn_hidden, num_experts, top_k, estimator=estimator, backend=backend)
    if hasattr(layer.estimator, "attach_updater"):
        layer.estimator.attach_updater()  # Default MoE: the EMA update is a per-step callback, not timed here
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["loop", "torch"])
    parser.add_argument("--estimator-backend", default="torch")
    parser.add_argument("--estimators", nargs="+", help="estimators to time against topk (default: all registered)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    results = {"config": vars(args), "backends": [], "estimators": []}

    dense = DenseSwiGLU(args.d_model, args.top_k * args.ffn_hidden).to(device)
    dense_s = time_fwd_bwd(dense, x, args.repeats)
    print(f"T={args.tokens} d={args.d_model} f={args.ffn_hidden} k={args.top_k} on {device} {args.dtype}")
    print(f"dense SwiGLU (hidden {args.top_k * args.ffn_hidden}, same active FLOPs): {dense_s * 1e3:.1f} ms")
    print(f"{'E':>4} {'backend':>10} {'ms':>9} {'x dense':>8} {'loop/this':>10}")
    for num_experts in args.experts:
        times = {}
        for backend in args.backends:
            layer = make_layer(args, num_experts, backend, "topk").to(device)
            times[backend] = time_fwd_bwd(layer, x, args.repeats)
        for backend, seconds in times.items():
            speedup = times["loop"] / seconds if "loop" in times else float("nan")
            print(f"{num_experts:>4} {backend:>10} {seconds * 1e3:>9.1f} {seconds / dense_s:>8.2f} {speedup:>10.2f}")
            results["backends"].append(
                {"experts": num_experts, "backend": backend, "seconds": seconds, "ratio_to_dense": seconds / dense_s,
                 "loop_over_this": speedup}
            )

    num_experts = args.experts[0]
    print(f"\nestimator overhead, E={num_experts}, backend={args.estimator_backend} (time / topk time)")
    names = ["topk"] + [n for n in (args.estimators or available_estimators()) if n != "topk"]
    # Interleave the estimators over several rounds so drift in machine load hits all alike.
    layers = {n: make_layer(args, num_experts, args.estimator_backend, n).to(device) for n in names}
    samples = {n: [] for n in names}
    for _ in range(3):
        for name in names:
            samples[name].append(time_fwd_bwd(layers[name], x, args.repeats))
    base = statistics.median(samples["topk"])
    for name in names:
        seconds = statistics.median(samples[name])
        note = " (top-1)" if layers[name].top_k != args.top_k else ""
        print(f"{name:>16} {seconds * 1e3:>9.1f} ms {seconds / base:>7.3f}x{note}")
        results["estimators"].append(
            {"estimator": name, "top_k": layers[name].top_k, "seconds": seconds, "ratio_to_topk": seconds / base,
             "description": ESTIMATOR_REGISTRY[name]["description"]}
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
