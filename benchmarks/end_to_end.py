"""Training throughput of the MoE language model against a dense one with the same active parameters.

One training step = forward, next-token cross-entropy, backward and an AdamW step (the fused
kernel where available, as :class:`~lightning_moe.MoELanguageModel` trains) of
:class:`~lightning_moe.model.MoETransformer` (no Lightning loop, no balancing losses), on
random token ids. Models, measured side by side in interleaved rounds (one step of every
model per round, so drift in machine load hits all alike):

* ``dense``: SwiGLU FFN of hidden ``--dense-hidden`` (the active width of the MoE models);
* ``moe``: the quickstart shape, ``--experts`` experts top-``--top-k`` of hidden ``--expert-hidden``;
* ``fine``: the fine-grained variant, ``--fine-experts`` top-``--fine-top-k`` of hidden ``--fine-hidden``;
* with ``--compile``: ``dense`` and ``moe`` again with ``compile=True`` (inductor, each block).

Every MoE layer computes ``top_k * expert_hidden = dense_hidden`` hidden units per token,
so the models have the same active parameters and FLOPs per token. Printed: tokens/s
(median over rounds) and each model's throughput over dense's, min / median / max of
the per-round ratios.

    python benchmarks/end_to_end.py                    # d 256, 4 layers, batch 16 x 256, fp32 CPU
    python benchmarks/end_to_end.py --compile --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_moe.lm_training import adamw
from lightning_moe.model import MoETransformer, TransformerConfig


#: The options giving each MoE model's (experts, top_k, expert hidden).
MOE_SHAPES = {"moe": ("experts", "top_k", "expert_hidden"), "fine": ("fine_experts", "fine_top_k", "fine_hidden")}


def moe_shape(args, kind: str) -> tuple[int, int, int]:
    """``(num_experts, top_k, ffn_hidden)`` of the MoE model ``kind``."""
    num_experts, top_k, ffn_hidden = (getattr(args, option) for option in MOE_SHAPES[kind])
    return num_experts, top_k, ffn_hidden


def make_model(args, name: str) -> MoETransformer:
    base = dict(vocab_size=258, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                max_seq_len=args.seq_len, ffn_hidden=args.dense_hidden)
    if name.endswith("compiled"):
        base["compile"] = True
    kind = name.split()[0]
    moe = None
    if kind != "dense":
        num_experts, top_k, ffn_hidden = moe_shape(args, kind)
        moe = {"num_experts": num_experts, "top_k": top_k, "ffn_hidden": ffn_hidden, "backend": "torch"}
    torch.manual_seed(0)
    return MoETransformer(TransformerConfig(**base, moe=moe)).to(args.device).train()


def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> float:
    """Seconds of one training step."""
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = model(input_ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dense-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--fine-experts", type=int, default=64)
    parser.add_argument("--fine-top-k", type=int, default=8)
    parser.add_argument("--fine-hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="also time dense and moe with compile=True")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    for kind in MOE_SHAPES:
        _, k, hidden = moe_shape(args, kind)
        if k * hidden != args.dense_hidden:
            raise SystemExit(f"{kind}: top_k * expert hidden = {k * hidden} != dense hidden {args.dense_hidden}")

    names = ["dense", "moe", "fine"] + (["dense compiled", "moe compiled"] if args.compile else [])
    models = {name: make_model(args, name) for name in names}
    optimizers = {name: adamw(model.parameters(), lr=1e-4) for name, model in models.items()}  # as the models train
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 258, (args.batch_size, args.seq_len + 1), generator=generator).to(args.device)
    tokens = args.batch_size * args.seq_len
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.warmup + args.rounds):
        for name in names:
            seconds = train_step(models[name], optimizers[name], input_ids)
            if i >= args.warmup:
                samples[name].append(seconds)

    print(f"d {args.d_model}, {args.n_layers} layers, batch {args.batch_size} x {args.seq_len}, {args.device} fp32, "
          f"{args.rounds} interleaved rounds; active hidden {args.dense_hidden} per FFN in every model")
    print(f"  {'model':<16} {'active params':>13} {'tokens/s':>9} {'/ dense tokens/s (min/med/max)':>32}")
    results = {"config": vars(args), "models": []}
    for name in names:
        base = "dense compiled" if name == "moe compiled" else "dense"
        ratios = [b / t for t, b in zip(samples[name], samples[base])]
        rate = tokens / statistics.median(samples[name])
        active = models[name].num_parameters(active_only=True)
        spread = f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"
        print(f"  {name:<16} {active:>13,} {rate:>9.0f} {spread:>32}" + (f"  (vs {base})" if base != "dense" else ""))
        results["models"].append({"model": name, "active_params": active, "tokens_per_s": rate,
                                  "throughput_ratios": ratios, "relative_to": base})
    if args.compile:
        ratios = [e / c for c, e in zip(samples["moe compiled"], samples["moe"])]
        print(f"  compiled moe / eager moe tokens/s: {min(ratios):.2f} / {statistics.median(ratios):.2f} / "
              f"{max(ratios):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
