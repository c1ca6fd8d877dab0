"""Step time of a small MoE language model with 1 and 2 processes: DDP and expert parallelism (gloo, CPU).

    python benchmarks/scaling.py                  # d_model 128, 2 layers, 8 experts top-2
    python benchmarks/scaling.py --batch 16 --seq 256 --steps 30

Four runs of ``MoELanguageModel`` under Lightning, one intra-op thread per process:

* ``1 proc``: one process, ``batch`` sequences per step;
* ``2 procs, same per-rank batch`` (weak scaling): each rank ``batch`` sequences, so a
  step trains on twice the tokens;
* ``2 procs, same global batch`` (strong scaling): each rank ``batch / 2``;
* ``2 procs, expert parallel``: the weak-scaling run under
  ``ExpertParallelStrategy(expert_parallel_size=2)``: each rank holds half of every
  layer's experts, tokens travel by all-to-all, and only the router and dense gradients
  are all-reduced (the expert gradients stay on their owner).

It prints the median step time after warm-up (from the start of a training batch to the
end of its optimizer step, so it includes DDP's gradient all-reduce and the router
statistics' collectives) and the ratios to the one-process run. On a machine with fewer
free cores than processes the two ranks share cores and the ratios show that, not DDP's
overhead; the script prints the core count so the numbers can be read. Not a test.

The script runs on CPU only (gloo). On GPUs the same comparison would run over NCCL, where
the all-reduce of the expert gradients (the bulk of the parameters) overlaps with backward
and dominates the gap between weak-scaling step time and the one-GPU step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe.callbacks import LoadBalancingLoss, RoutingMonitor
from lightning_moe.module import MoELanguageModel
from lightning_moe.strategies import ExpertParallelStrategy


class StepTimer(L.Callback):
    """Wall time of each training step on rank 0, written to ``out`` at the end."""

    def __init__(self, out: str) -> None:
        self.out, self.times, self._start = out, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            with open(self.out, "w") as fh:
                json.dump(self.times, fh)


class RankBatches(L.LightningDataModule):
    """Random token batches; every rank draws its own ``batch`` sequences per step."""

    def __init__(self, batch: int, seq: int, steps: int) -> None:
        super().__init__()
        self.batch, self.seq, self.steps = batch, seq, steps

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.trainer.global_rank)
        tokens = torch.randint(0, 258, (self.batch * self.steps, self.seq + 1), generator=generator)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=self.batch)


def measure(args: argparse.Namespace, processes: int, batch: int, expert_parallel: bool = False) -> float:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = MoELanguageModel(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=4,
        max_seq_len=args.seq,
        moe={"num_experts": args.experts, "top_k": 2, "backend": args.backend, "estimator": args.estimator},
        warmup_steps=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        timeout = timedelta(minutes=5)
        if expert_parallel:
            strategy = ExpertParallelStrategy(expert_parallel_size=processes, start_method="fork", timeout=timeout)
        else:
            strategy = DDPStrategy(start_method="fork", timeout=timeout) if processes > 1 else "auto"
        trainer = L.Trainer(
            accelerator="cpu",
            devices=processes,
            strategy=strategy,
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[StepTimer(out), LoadBalancingLoss(scope="global"), RoutingMonitor(log_every_n_steps=5)],
            log_every_n_steps=5,
        )
        trainer.fit(model, RankBatches(batch, args.seq, args.steps))
        with open(out) as fh:
            times = json.load(fh)
    return statistics.median(times[args.warmup :])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step of the one-process run")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--estimator", default="topk")
    return parser


def main() -> None:
    args = make_parser().parse_args()

    one = measure(args, 1, args.batch)
    weak = measure(args, 2, args.batch)
    strong = measure(args, 2, args.batch // 2)
    expert_parallel = measure(args, 2, args.batch, expert_parallel=True)
    tokens = args.batch * args.seq
    print(f"\nCPU cores: {os.cpu_count()}, one intra-op thread per process, backend={args.backend}")
    print(f"model: d_model {args.d_model}, {args.layers} layers, {args.experts} experts top-2, seq {args.seq}")
    print(f"{'run':40s} {'step ms':>9s} {'ratio':>7s} {'tokens/s':>10s}")
    for name, seconds, step_tokens in (
        (f"1 proc, batch {args.batch}", one, tokens),
        (f"2 procs, batch {args.batch} each (weak)", weak, 2 * tokens),
        (f"2 procs, batch {args.batch // 2} each (strong)", strong, tokens),
        (f"2 procs expert parallel, batch {args.batch} each", expert_parallel, 2 * tokens),
    ):
        print(f"{name:40s} {1000 * seconds:9.1f} {seconds / one:7.2f} {step_tokens / seconds:10.0f}")
    print(f"\nweak-scaling throughput ratio (2 procs / 1 proc): {(2 * tokens / weak) / (tokens / one):.2f}")
    print(f"strong-scaling speed-up (1 proc / 2 procs):        {one / strong:.2f}")
    print(f"expert parallel / DDP step time (same batches):    {expert_parallel / weak:.2f}")


if __name__ == "__main__":
    main()
