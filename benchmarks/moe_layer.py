"""One MoE layer against a dense FFN of the same active FLOPs: forward+backward time and activation memory.

Everything is measured side by side in one run and printed as ratios to a dense SwiGLU
FFN with hidden width ``top_k * ffn_hidden`` (the same active FLOPs) on the same input:

* time: forward + backward of the layer, in interleaved rounds (one sample of every
  module per round, so drift in machine load hits all alike); the ratio to dense is
  taken within each round and reported as min / median / max over the rounds;
* saved: the bytes of the tensors autograd keeps for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` during one training forward as unique
  storages (a tensor saved twice, or two views of one buffer, count once;
  :func:`lightning_moe.experts.fused.saved_activation_bytes`). Parameters and the
  layer's input are excluded: a dense FFN and the MoE layer both keep those anyway.

Rows: our ``torch`` backend (renormalised top-k, as Qwen3-MoE and Mixtral route), any
``--backends`` asked for, and, when ``transformers`` is installed, its Qwen3-MoE sparse
block with the ``grouped_mm`` and ``eager`` experts implementations, given our router
and expert weights (so the same renormalised top-k routing). A second table times and
measures every estimator against ``topk`` on the torch backend.

    python benchmarks/moe_layer.py                       # CPU defaults: T 4096, d 512, fp32, the four shapes
    python benchmarks/moe_layer.py --shapes 64:8:256 --estimator-shapes 64:8:256 --estimators topk densemixer
    python benchmarks/moe_layer.py --shapes --estimator-shapes 64:8:128 --estimators topk densemixer \
        --tokens 1024 --d-model 256 --score-function sigmoid --n-group 8 --topk-group 4 --routed-scaling-factor 2.5
    python benchmarks/moe_layer.py --tokens 16384 --d-model 1024 --shapes 8:2:4096 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_moe import MoELayer, available_estimators
from lightning_moe.experts.fused import saved_activation_bytes


class DenseSwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.v1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.v1(x))


def fwd_bwd_seconds(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one forward + backward (with the device synchronised around it)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        out = module(x)
    out.backward(grad)
    module.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward, parameters and ``x`` excluded."""

    def forward():
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
            return module(x)

    saved = saved_activation_bytes(forward, [*module.parameters(), x])
    module.zero_grad(set_to_none=True)
    return saved


def interleaved(modules: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per forward+backward of each module, one sample per module per round."""
    grad = torch.randn_like(x)
    samples: dict[str, list[float]] = {name: [] for name in modules}
    for i in range(warmup + rounds):
        for name, module in modules.items():
            seconds = fwd_bwd_seconds(module, x, grad)
            if i >= warmup:
                samples[name].append(seconds)
    return samples


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"


def make_layer(args, shape: tuple[int, int, int], backend: str, estimator: str, **estimator_args) -> MoELayer:
    num_experts, top_k, ffn_hidden = shape
    top_k = 1 if estimator == "sparsemixer" else top_k  # SparseMixer (v1) is top-1 only
    layer = MoELayer(
        args.d_model, ffn_hidden, num_experts, top_k, estimator=estimator, backend=backend,
        estimator_args=estimator_args or None, score_function=args.score_function, n_group=args.n_group,
        topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
    )
    if hasattr(layer.estimator, "attach_updater"):
        layer.estimator.attach_updater()  # Default MoE: the EMA update is a per-step callback, not timed here
    return layer.to(args.device).train()


def hf_qwen3_moe_block(layer: MoELayer, implementation: str) -> nn.Module | None:
    """transformers' Qwen3-MoE sparse block with ``layer``'s router and expert weights, or None."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    experts = layer.experts
    config = Qwen3MoeConfig(
        hidden_size=experts.d_model, moe_intermediate_size=experts.ffn_hidden, num_experts=experts.num_experts,
        num_experts_per_tok=layer.top_k, norm_topk_prob=True, hidden_act="silu",
    )
    config._experts_implementation = implementation  # transformers >= 5: "eager", "grouped_mm", ...
    block = Qwen3MoeSparseMoeBlock(config).to(layer.router.weight.device)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        # Theirs: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]; ours [E, D, 2F] and [E, F, D].
        block.experts.gate_up_proj.copy_(experts.w1.transpose(1, 2))
        block.experts.down_proj.copy_(experts.w2.transpose(1, 2))
    return _Batched(block).train()


class _Batched(nn.Module):
    """Feeds [T, D] as the [1, T, D] batch a Hugging Face block expects."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x[None])[0]


def parse_shape(text: str) -> tuple[int, int, int]:
    num_experts, top_k, ffn_hidden = (int(v) for v in text.split(":"))
    return num_experts, top_k, ffn_hidden


def run_table(
    title: str, modules: dict[str, nn.Module], base: str, x: torch.Tensor, rounds: int, report: Callable
) -> list[dict]:
    samples = interleaved(modules, x, rounds)
    saved_by_name = {name: saved_bytes(module, x) for name, module in modules.items()}
    base_saved = saved_by_name[base]
    rows = []
    print(title)
    header = f"{'time / ' + base + ' (min/med/max)':>30} {'saved MB':>9} {'saved / ' + base:>14}"
    print(f"  {'module':<22} {'median ms':>9} {header}")
    for name, saved in saved_by_name.items():
        ratios = [t / b for t, b in zip(samples[name], samples[base])]
        ms = statistics.median(samples[name]) * 1e3
        print(f"  {name:<22} {ms:>9.1f} {spread(ratios):>30} {saved / 2**20:>9.1f} {saved / base_saved:>14.2f}")
        rows.append(report(name, ms, ratios, saved, base_saved))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--shapes", nargs="*", default=["8:2:1024", "32:2:1024", "64:8:256", "128:8:256"],
                        help="experts:top_k:ffn_hidden per shape")
    parser.add_argument("--estimator-shapes", nargs="*", default=["8:2:1024", "64:8:256"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (samples per module)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["torch"], help="our backends to time (loop, torch, ...)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' Qwen3-MoE block")
    parser.add_argument("--estimators", nargs="+", help="estimators to time against topk (default: all registered)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--score-function", default="softmax", choices=["softmax", "sigmoid"],
                        help="MoELayer's scoring, e.g. sigmoid with --n-group 8 --topk-group 4 (DeepSeek-V3)")
    parser.add_argument("--n-group", type=int, default=1)
    parser.add_argument("--topk-group", type=int, default=1)
    parser.add_argument("--routed-scaling-factor", type=float, default=1.0)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    results: dict = {"config": vars(args), "layers": [], "estimators": []}
    print(f"T={args.tokens} d={args.d_model} on {device} {args.dtype}, {args.rounds} interleaved rounds; "
          f"ratios are min / median / max over rounds; saved = activations kept for backward")

    for text in args.shapes:
        shape = parse_shape(text)
        num_experts, top_k, ffn_hidden = shape
        modules: dict[str, nn.Module] = {"dense": DenseSwiGLU(args.d_model, top_k * ffn_hidden).to(device)}
        ours = None
        for backend in args.backends:
            modules[backend] = make_layer(args, shape, backend, "topk", renormalize=True)
            ours = ours or modules[backend]
        if ours is not None and not args.no_hf:
            for implementation in ("grouped_mm", "eager"):
                block = hf_qwen3_moe_block(ours, implementation)
                if block is not None:
                    modules[f"hf qwen3 {implementation}"] = block

        def report(name, ms, ratios, saved, base_saved, shape=shape):
            return {"shape": shape, "module": name, "median_ms": ms, "time_ratios_to_dense": ratios,
                    "saved_bytes": saved, "saved_ratio_to_dense": saved / base_saved}

        title = f"\nE{num_experts} k{top_k} f{ffn_hidden} vs dense SwiGLU hidden {top_k * ffn_hidden}"
        results["layers"] += run_table(title, modules, "dense", x, args.rounds, report)

    names = ["topk"] + [n for n in (args.estimators or available_estimators()) if n != "topk"]
    for text in args.estimator_shapes:
        shape = parse_shape(text)
        modules = {name: make_layer(args, shape, "torch", name) for name in names}

        def report(name, ms, ratios, saved, base_saved, shape=shape):
            return {"shape": shape, "estimator": name, "top_k": modules[name].top_k, "median_ms": ms,
                    "time_ratios_to_topk": ratios, "saved_bytes": saved, "saved_ratio_to_topk": saved / base_saved}

        title = f"\nestimators, E{shape[0]} k{shape[1]} f{shape[2]}, torch backend (sparsemixer is top-1)"
        results["estimators"] += run_table(title, modules, "topk", x, args.rounds, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
