"""GPU benchmark of the expert backends: MoE-layer TFLOP/s and end-to-end training MFU.

Everything is measured side by side in one process, so the rows compare:

1. roof: a large square bf16 matmul, the dense GEMM TFLOP/s this device reaches;
2. layer: forward + backward of one ``MoELayer`` (top-k router) for each backend
   (``loop``, ``torch`` grouped GEMM, ``megablocks``) and of a dense SwiGLU FFN with the
   same active FLOPs (hidden width ``k * f``), under bf16 autocast over fp32 weights, at a
   coarse shape (d 2048, f 8192, 16 experts, top-2) and a fine-grained one (d 2048, f 1024,
   64 experts, top-8) with the same active FLOPs per token.
   Achieved TFLOP/s counts the expert matmuls only, the same for MoE and dense:
   3 projections x 2 FLOPs x (1 forward + 2 backward) = ``18 * T * k * d * f``. The
   ``torch`` rows say which kernel ran (``torch._grouped_mm`` or the per-expert fallback);
3. end to end: training tokens/s and MFU of ``MoETransformer`` (16 experts, top-2) and of
   a dense model with equal active parameters (``moe=None``, ``ffn_hidden = k * f``), with
   a plain AdamW loop under bf16 autocast. Model FLOPs per token follow PaLM (Chowdhery et
   al. 2022, app. B): ``6 * active parameters + 12 * layers * d * seq_len``; MFU divides
   the achieved rate by ``--peak-tflops`` (989 for an H100 SXM's dense bf16) or, when not
   given, by the measured matmul roof.

4. comparisons, from the rows above: each backend's TFLOP/s as a fraction of the roof and
   of the dense FFN, ``megablocks`` against ``torch`` per shape, and each MoE model's
   tokens/s as a fraction of the dense model's.

Timing uses CUDA events around each iteration after warmup iterations (median reported).
A backend that cannot run on the machine (MegaBlocks not installed, no GPU) becomes a row
that says why instead of stopping the run.

    python benchmarks/gpu_backends.py --json gpu_backends.json --peak-tflops 989   # H100
    python benchmarks/gpu_backends.py --cpu-smoke                                   # small, CPU
    python benchmarks/gpu_backends.py --dry-run --json out.json                     # tiny, CPU, seconds

``--cpu-smoke`` and ``--dry-run`` run every part with small shapes on the CPU to check that
the script works; their numbers say nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F

from lightning_moe.experts import megablocks as megablocks_backend
from lightning_moe.experts.grouped_gemm import uses_grouped_kernel
from lightning_moe.layer import MoELayer
from lightning_moe.model import FeedForward, MoEConfig, MoETransformer, TransformerConfig, default_ffn_hidden

BACKENDS = ("loop", "torch", "megablocks")
AMP_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    d: int
    f: int
    experts: int
    top_k: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        d, f, experts, top_k = (int(v) for v in text.split(","))
        return cls(d, f, experts, top_k)

    def __str__(self) -> str:
        return f"d={self.d} f={self.f} E={self.experts} k={self.top_k}"


GPU_DEFAULTS = {
    "shapes": ["2048,8192,16,2", "2048,1024,64,8"],
    "tokens": 16384,
    "roof_size": 8192,
    "warmup": 3,
    "iters": 10,
    "e2e_experts": 16,
    "e2e_top_k": 2,
    "e2e_d_model": 1024,
    "e2e_layers": 8,
    "e2e_heads": 16,
    "e2e_seq_len": 2048,
    "e2e_batch": 8,
}
CPU_SMOKE_DEFAULTS = {
    "shapes": ["64,128,8,2", "128,256,16,2"],
    "tokens": 256,
    "roof_size": 256,
    "warmup": 1,
    "iters": 3,
    "e2e_experts": 16,
    "e2e_top_k": 2,
    "e2e_d_model": 64,
    "e2e_layers": 2,
    "e2e_heads": 2,
    "e2e_seq_len": 64,
    "e2e_batch": 4,
}
DRY_RUN_DEFAULTS = {
    "shapes": ["32,64,4,2", "32,16,8,4"],
    "tokens": 32,
    "roof_size": 64,
    "warmup": 0,
    "iters": 1,
    "e2e_experts": 4,
    "e2e_top_k": 2,
    "e2e_d_model": 32,
    "e2e_layers": 1,
    "e2e_heads": 2,
    "e2e_seq_len": 16,
    "e2e_batch": 2,
}


def median_seconds(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend != "megablocks":
        return None
    try:
        megablocks_backend.load_kernels(device, AMP_DTYPE)
    except (ImportError, RuntimeError) as error:
        return first_line(error)
    return None


def matmul_roof_tflops(device: torch.device, n: int, warmup: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=AMP_DTYPE)
    b = torch.randn(n, n, device=device, dtype=AMP_DTYPE)
    seconds = median_seconds(lambda: a @ b, device, warmup, iters)
    return 2 * n**3 / seconds / 1e12


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, device: torch.device, warmup: int, iters: int) -> float:
    grad = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(device.type, dtype=AMP_DTYPE):
            y = module(x)
        y.backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None

    return median_seconds(step, device, warmup, iters)


def torch_backend_kernel(shape: Shape, device: torch.device) -> str:
    """The kernel the ``torch`` backend runs at this shape: ``torch._grouped_mm`` or its per-expert fallback."""
    x = torch.empty(1, shape.d, device=device, dtype=AMP_DTYPE)
    return "torch._grouped_mm" if uses_grouped_kernel(x, 2 * shape.f) else "per-expert mm"


def layer_rows(args, shape: Shape, device: torch.device, roof: float) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(args.tokens, shape.d, device=device, dtype=AMP_DTYPE, requires_grad=True)
    flops = 18 * args.tokens * shape.top_k * shape.d * shape.f
    rows = []
    candidates = [(backend, backend) for backend in args.backends] + [("dense", None)]
    for name, backend in candidates:
        row = {"shape": str(shape), "tokens": args.tokens, "impl": name, "flops": flops}
        if backend == "torch":
            row["kernel"] = torch_backend_kernel(shape, device)
        reason = None if backend is None else unavailable_reason(backend, device)
        if reason is not None:
            rows.append({**row, "status": f"unavailable ({reason})"})
            continue
        try:
            if backend is None:
                module = FeedForward(shape.d, shape.top_k * shape.f, "swiglu").to(device)
            else:
                module = MoELayer(shape.d, shape.f, shape.experts, shape.top_k, backend=backend).to(device)
            seconds = time_fwd_bwd(module, x, device, args.warmup, args.iters)
        except (ImportError, RuntimeError) as error:  # out of memory is a RuntimeError too
            rows.append({**row, "status": f"failed ({first_line(error)})"})
        else:
            tflops = flops / seconds / 1e12
            row.update(status="ok", ms=seconds * 1e3, tflops=tflops, fraction_of_roof=tflops / roof)
            if backend is not None:
                load = module.routing_stats.tokens_per_expert
                row["max_over_mean_load"] = (load.max() / load.mean()).item()
            rows.append(row)
        finally:
            module = None
            release_memory(device)
    dense = next((r for r in rows if r["impl"] == "dense" and r["status"] == "ok"), None)
    for row in rows:
        if dense is not None and row["status"] == "ok":
            row["time_over_dense"] = row["ms"] / dense["ms"]
    return rows


def e2e_configs(args) -> list[tuple[str, str | None, TransformerConfig]]:
    common = {
        "d_model": args.e2e_d_model,
        "n_layers": args.e2e_layers,
        "n_heads": args.e2e_heads,
        "max_seq_len": args.e2e_seq_len,
    }
    configs = []
    for backend in args.e2e_backends:
        moe = MoEConfig(
            num_experts=args.e2e_experts, top_k=args.e2e_top_k, ffn_hidden=args.e2e_expert_hidden, backend=backend
        )
        configs.append(
            (f"moe E={args.e2e_experts} k={args.e2e_top_k} {backend}", backend, TransformerConfig(**common, moe=moe))
        )
    dense_hidden = args.e2e_top_k * args.e2e_expert_hidden
    configs.append((f"dense ffn={dense_hidden}", None, TransformerConfig(**common, ffn_hidden=dense_hidden, moe=None)))
    return configs


def time_training_step(config: TransformerConfig, args, device: torch.device) -> tuple[float, int, int]:
    """Median seconds of one AdamW step under bf16 autocast; active and total parameters."""
    torch.manual_seed(0)
    model = MoETransformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, config.vocab_size, (args.e2e_batch, args.e2e_seq_len + 1), device=device)
    inputs, targets = data[:, :-1], data[:, 1:]

    def step() -> None:
        with torch.autocast(device.type, dtype=AMP_DTYPE):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, device, args.warmup, args.iters)
    return seconds, model.num_parameters(active_only=True), model.num_parameters()


def e2e_rows(args, device: torch.device, peak: float) -> list[dict]:
    rows = []
    tokens_per_step = args.e2e_batch * args.e2e_seq_len
    for name, backend, config in e2e_configs(args):
        row = {"model": name, "tokens_per_step": tokens_per_step}
        reason = None if backend is None else unavailable_reason(backend, device)
        if reason is not None:
            rows.append({**row, "status": f"unavailable ({reason})"})
            continue
        try:
            seconds, active, total = time_training_step(config, args, device)
        except (ImportError, RuntimeError) as error:  # out of memory is a RuntimeError too
            rows.append({**row, "status": f"failed ({first_line(error)})"})
            continue
        finally:
            release_memory(device)
        flops_per_token = 6 * active + 12 * config.n_layers * config.d_model * args.e2e_seq_len
        tokens_per_s = tokens_per_step / seconds
        rows.append(
            {
                **row,
                "status": "ok",
                "step_ms": seconds * 1e3,
                "tokens_per_s": tokens_per_s,
                "active_params": active,
                "total_params": total,
                "flops_per_token": flops_per_token,
                "tflops": flops_per_token * tokens_per_s / 1e12,
                "mfu": flops_per_token * tokens_per_s / 1e12 / peak,
            }
        )
    return rows


def ok_rows(rows: list[dict], key: str) -> dict[str, dict]:
    return {row[key]: row for row in rows if row["status"] == "ok"}


def comparisons(layers: list[dict], e2e: list[dict], shapes: list[str]) -> dict:
    """The ratios the rows were measured for; a ratio is None when a row it needs did not run."""
    by_shape = []
    for text in shapes:
        name = str(Shape.parse(text))
        rows = ok_rows([r for r in layers if r["shape"] == name], "impl")
        dense = rows.get("dense")
        entry = {"shape": name}
        for impl in BACKENDS:
            row = rows.get(impl)
            entry[impl] = None
            if row is not None:
                entry[impl] = {
                    "tflops": row["tflops"],
                    "fraction_of_roof": row["fraction_of_roof"],
                    "fraction_of_dense_ffn": None if dense is None else dense["ms"] / row["ms"],
                }
        both = rows.get("megablocks"), rows.get("torch")
        entry["megablocks_speedup_over_torch"] = None if None in both else both[1]["ms"] / both[0]["ms"]
        by_shape.append(entry)
    models = [r for r in e2e if r["status"] == "ok"]
    dense_lm = next((r for r in models if r["model"].startswith("dense")), None)
    lm = {
        r["model"]: None if dense_lm is None or r["status"] != "ok" else r["tokens_per_s"] / dense_lm["tokens_per_s"]
        for r in e2e
        if r["model"].startswith("moe")
    }
    return {"layer": by_shape, "moe_tokens_per_s_over_dense": lm}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for dist in ("torch", "triton", "megablocks", "stanford-stk", "grouped_gemm", "lightning"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def print_layer_table(rows: list[dict]) -> None:
    print(f"{'shape':<28} {'impl':<11} {'ms':>9} {'TFLOP/s':>8} {'% roof':>7} {'x dense':>8} {'load':>5}  status")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['shape']:<28} {r['impl']:<11} {'-':>9} {'-':>8} {'-':>7} {'-':>8} {'-':>5}  {r['status']}")
            continue
        load = f"{r['max_over_mean_load']:.2f}" if "max_over_mean_load" in r else "-"
        print(
            f"{r['shape']:<28} {r['impl']:<11} {r['ms']:>9.2f} {r['tflops']:>8.4g} {100 * r['fraction_of_roof']:>6.1f}%"
            f" {r.get('time_over_dense', float('nan')):>8.2f} {load:>5}  ok"
        )


def print_comparisons(summary: dict) -> None:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    print(f"{'shape':<28} {'impl':<11} {'of roof':>8} {'of dense FFN':>13}")
    for entry in summary["layer"]:
        for impl in BACKENDS:
            if entry[impl] is not None:
                print(
                    f"{entry['shape']:<28} {impl:<11} {percent(entry[impl]['fraction_of_roof']):>8}"
                    f" {percent(entry[impl]['fraction_of_dense_ffn']):>13}"
                )
        speedup = entry["megablocks_speedup_over_torch"]
        print(f"{entry['shape']:<28} megablocks vs torch: {'-' if speedup is None else f'{speedup:.2f}x'}")
    for model, ratio in summary["moe_tokens_per_s_over_dense"].items():
        print(f"{model}: tokens/s {percent(ratio)} of the dense model's (GRIN reports 86.6 %)")


def print_e2e_table(rows: list[dict]) -> None:
    print(f"{'model':<30} {'step ms':>9} {'tokens/s':>11} {'active':>9} {'total':>9} {'TFLOP/s':>8} {'MFU':>6}  status")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:<30} {'-':>9} {'-':>11} {'-':>9} {'-':>9} {'-':>8} {'-':>6}  {r['status']}")
            continue
        print(
            f"{r['model']:<30} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11.0f} {r['active_params'] / 1e6:>8.1f}M"
            f" {r['total_params'] / 1e6:>8.1f}M {r['tflops']:>8.4g} {100 * r['mfu']:>5.1f}%  ok"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu-smoke", action="store_true", help="small shapes on the CPU (checks the script only)")
    mode.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, one iteration (seconds)")
    parser.add_argument("--shapes", nargs="+", help="layer shapes as d,f,E,k")
    parser.add_argument("--tokens", type=int, help="tokens T per layer forward")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--roof-size", type=int, help="side of the square matmul that measures the roof")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOP/s for MFU (default: measured roof)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-backends", nargs="+", default=["torch", "megablocks"], choices=BACKENDS)
    for name in ("experts", "top-k", "d-model", "layers", "heads", "seq-len", "batch", "expert-hidden"):
        parser.add_argument(f"--e2e-{name}", type=int)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    defaults = DRY_RUN_DEFAULTS if args.dry_run else CPU_SMOKE_DEFAULTS if args.cpu_smoke else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.e2e_expert_hidden is None:  # each expert as wide as the dense FFN it replaces
        args.e2e_expert_hidden = default_ffn_hidden(args.e2e_d_model, "swiglu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_cpu = args.cpu_smoke or args.dry_run
    if on_cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("No CUDA device: the default shapes are for a GPU. Pass --cpu-smoke or --dry-run on a CPU.")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name}  torch {torch.__version__}  bf16 autocast over fp32 weights")
    if on_cpu:
        print("CPU run: small shapes to check the script; these numbers are not GPU results.")

    roof = matmul_roof_tflops(device, args.roof_size, args.warmup, args.iters)
    peak = args.peak_tflops or roof
    print(f"dense bf16 matmul roof ({args.roof_size}^3): {roof:.2f} TFLOP/s")
    print(f"MFU is relative to {'--peak-tflops' if args.peak_tflops else 'the measured roof'}: {peak:.2f} TFLOP/s\n")

    layers = []
    for text in args.shapes:
        layers += layer_rows(args, Shape.parse(text), device, roof)
    print(f"MoE layer forward+backward, T={args.tokens} (TFLOP/s counts 18*T*k*d*f; load = max/mean tokens per expert)")
    print_layer_table(layers)

    e2e = []
    if not args.skip_e2e:
        e2e = e2e_rows(args, device, peak)
        print(
            f"\nend to end: AdamW step, batch {args.e2e_batch} x seq {args.e2e_seq_len},"
            f" d={args.e2e_d_model}, {args.e2e_layers} layers, expert hidden {args.e2e_expert_hidden}"
        )
        print_e2e_table(e2e)

    summary = comparisons(layers, e2e, args.shapes)
    print("\ncomparisons (same run)")
    print_comparisons(summary)

    results = {
        "device": device_name,
        "cpu_smoke": on_cpu,
        "versions": package_versions(),
        "config": vars(args),
        "roof_tflops": roof,
        "mfu_peak_tflops": peak,
        "mfu_peak_source": "--peak-tflops" if args.peak_tflops else "measured roof",
        "layer": layers,
        "e2e": e2e,
        "comparisons": summary,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
