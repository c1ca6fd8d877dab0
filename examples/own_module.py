"""MoE layers in your own LightningModule, balanced and monitored by callbacks.

A tiny byte-level language model written from scratch (no lightning_moe model code):
embeddings, a causal short convolution to mix in the previous bytes, then an MoE layer,
a dense feed-forward layer and a second MoE layer, each with a residual connection. The
``training_step`` returns only the language-modelling loss: the balancing losses reach
the gradient through the MoE layers themselves, and the routing telemetry is logged by
``RoutingMonitor``.

Run (about 15 s on a laptop CPU; the first run also tokenises a slice of the Python
standard library, which takes a second or two)::

    python examples/own_module.py
    python examples/own_module.py --balancing aux_free --estimator default_moe
    tensorboard --logdir runs/own_module

TensorBoard then shows ``train/loss``, ``val/loss``, the aux losses and, per MoE layer,
``moe/layer_00/...`` scalars, ``expert_load`` histograms and the ``moe/load_heatmap`` image.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_moe import MoELayer, available_estimators
from lightning_moe.callbacks import (
    AuxLossFreeBalancing,
    DefaultOutputEMA,
    LoadBalancingLoss,
    RouterZLoss,
    RoutingMonitor,
)
from lightning_moe.data import VOCAB_SIZE, TextDataModule

BALANCING = ("loss", "aux_free")
#: The estimators that run in this model (top-2 routing): all but SparseMixer, which is top-1 only.
ESTIMATORS = tuple(name for name in available_estimators() if name != "sparsemixer")


class ByteMoEModel(nn.Module):
    """Byte embeddings -> causal conv -> MoE -> dense FFN -> MoE -> next-byte logits."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, estimator: str, context: int = 4) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        # Depthwise over the last `context` positions, left-padded so no position sees the future.
        self.mix = nn.Conv1d(d_model, d_model, kernel_size=context, groups=d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(4))
        self.moe_in = MoELayer(d_model, 2 * d_model, num_experts, top_k, estimator=estimator)
        self.dense = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.moe_out = MoELayer(d_model, 2 * d_model, num_experts, top_k, estimator=estimator)
        self.head = nn.Linear(d_model, VOCAB_SIZE)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)  # [B, T, D]
        x = x + self.mix(F.pad(x.transpose(1, 2), (self.context - 1, 0))).transpose(1, 2)
        x = x + self.moe_in(self.norms[0](x))
        x = x + self.dense(self.norms[1](x))
        x = x + self.moe_out(self.norms[2](x))
        return self.head(self.norms[3](x))


class ByteLM(L.LightningModule):
    """The user's own LightningModule: nothing in it knows about balancing or telemetry."""

    def __init__(
        self, d_model: int = 64, num_experts: int = 8, top_k: int = 2, estimator: str = "topk", lr: float = 3e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ByteMoEModel(d_model, num_experts, top_k, estimator)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        input_ids, targets = batch
        return F.cross_entropy(self.model(input_ids).flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def make_callbacks(estimator: str, balancing: str) -> list[L.Callback]:
    if balancing not in BALANCING:
        raise ValueError(f"balancing={balancing!r} is not valid; choose one of {BALANCING}")
    callbacks: list[L.Callback] = [RouterZLoss(weight=1e-3), RoutingMonitor(dead_window=50)]
    if balancing == "loss":
        callbacks.append(LoadBalancingLoss(alpha=0.01))
    else:
        callbacks.append(AuxLossFreeBalancing(gamma=1e-3))
    if estimator == "default_moe":
        callbacks.append(DefaultOutputEMA())
    return callbacks


def main(
    max_steps: int = 200,
    root_dir: str = "runs/own_module",
    estimator: str = "topk",
    balancing: str = "loss",
    max_bytes: int = 400_000,
    cache_dir: str | None = None,
    seed: int = 0,
) -> L.Trainer:
    """Train the byte model and return the finished Trainer (TensorBoard logs under ``root_dir``)."""
    L.seed_everything(seed, verbose=False)
    data = TextDataModule(source="stdlib", seq_len=64, batch_size=16, max_bytes=max_bytes, cache_dir=cache_dir)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=min(100, max_steps),
        limit_val_batches=8,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=min(10, max_steps),
        logger=TensorBoardLogger(root_dir, name="", default_hp_metric=False),
        callbacks=make_callbacks(estimator, balancing),
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    trainer.fit(ByteLM(estimator=estimator), datamodule=data)
    return trainer


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--root-dir", default="runs/own_module")
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="topk",
        help="the router's estimator (sparsemixer is left out: it routes top-1 only, this model top-2)",
    )
    parser.add_argument(
        "--balancing",
        choices=BALANCING,
        default="loss",
        help="'loss': LoadBalancingLoss; 'aux_free': AuxLossFreeBalancing (topk or default_moe only)",
    )
    parser.add_argument("--max-bytes", type=int, default=400_000, help="bytes of the stdlib corpus to use")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    args = make_parser().parse_args()
    main(
        max_steps=args.max_steps,
        root_dir=args.root_dir,
        estimator=args.estimator,
        balancing=args.balancing,
        max_bytes=args.max_bytes,
        seed=args.seed,
    )
