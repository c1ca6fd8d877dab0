"""MoELanguageModel: the LightningModule that trains :class:`~lightning_moe.model.MoETransformer`.

Batches are ``(input_ids [B, T] int64, targets [B, T] int64)``; targets equal to
``IGNORE_INDEX`` do not count towards the loss. A third entry, ``domains [B, T]`` (the
testbed corpus's), makes the MoE layers count routing per domain when the datamodule
reports ``num_domains``. MoE auxiliary losses are attached inside the MoE layers, so the
steps here compute only the language-modelling loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from lightning_moe.errors import ConfigError
from lightning_moe.layer import add_missing_layer_state, labelled_tokens
from lightning_moe.model import MoEConfig, MoETransformer, TransformerConfig

IGNORE_INDEX = -100


def warmup_cosine_factor(
    step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    With ``s = step + 1`` steps taken: linear warmup ``s / warmup_steps`` while
    ``s <= warmup_steps``, then cosine decay
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1], so the
    first step already trains, the last warmup step is at the peak and the last step
    (``step = total_steps - 1``) is at ``min_lr_ratio``. An infinite ``total_steps``
    keeps the peak after warmup.
    """
    taken = step + 1
    if taken <= warmup_steps:
        return taken / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, max(0.0, (taken - warmup_steps) / max(1.0, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MoELanguageModel(L.LightningModule):
    """A decoder-only MoE language model with AdamW and warmup + cosine schedule.

    The architecture arguments are those of :class:`~lightning_moe.model.TransformerConfig`,
    flat so a LightningCLI config reads
    ``model: {d_model: 256, moe: {num_experts: 8, top_k: 2, estimator: topk}}``.
    ``moe`` fields not given keep their :class:`~lightning_moe.model.MoEConfig` defaults;
    ``moe: null`` (``moe=None``) builds a fully dense model. A ``dict`` of ``MoEConfig``
    fields is accepted too; ``hparams.moe`` holds that dict form.

    Args:
        learning_rate: peak learning rate, reached at the end of warmup.
        weight_decay: AdamW decoupled weight decay for matrices; norms, biases,
            embeddings (and the head tied to them) are not decayed.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup.
        min_lr_ratio: final learning rate as a fraction of ``learning_rate``, reached by
            cosine decay at ``trainer.estimated_stepping_batches``.
        activation_checkpointing: ``False``, ``"non_reentrant"`` (or ``True``) or
            ``"reentrant"``: recompute each transformer block in backward instead of
            keeping its activations (see :class:`~lightning_moe.model.TransformerConfig`).
        compile: ``False``, ``True`` (inductor) or a ``torch.compile`` backend name:
            compile each transformer block (see :class:`~lightning_moe.model.TransformerConfig`).
    """

    def __init__(
        self,
        vocab_size: int = 258,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        max_seq_len: int = 1024,
        ffn_hidden: int | None = None,
        activation: str = "swiglu",
        tie_embeddings: bool = True,
        rope_base: float = 10000.0,
        moe: MoEConfig | None = MoEConfig(),
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool | str = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ConfigError(f"`learning_rate` must be > 0, got {learning_rate}.")
        if weight_decay < 0:
            raise ConfigError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"`betas` must both lie in [0, 1), got {betas}.")
        if warmup_steps < 0:
            raise ConfigError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
        moe_config = MoEConfig(**moe) if isinstance(moe, dict) else copy.deepcopy(moe)
        # Saved as a plain dict so checkpoints load with `weights_only=True` and
        # hparams.yaml stays readable; `__init__` accepts the dict back.
        moe = None if moe_config is None else dataclasses.asdict(moe_config)
        self.save_hyperparameters()
        self.model = MoETransformer(
            TransformerConfig(
                vocab_size=vocab_size,
                d_model=d_model,
                n_layers=n_layers,
                n_heads=n_heads,
                max_seq_len=max_seq_len,
                ffn_hidden=ffn_hidden,
                activation=activation,
                tie_embeddings=tie_embeddings,
                rope_base=rope_base,
                moe=moe_config,
                activation_checkpointing=activation_checkpointing,
                compile=compile,
            )
        )
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.num_domains: int | None = None  # the datamodule's, set in `setup`
        # The datamodule's tokenizer (Tokenizer.state()), set in `setup` and kept in checkpoints.
        self.tokenizer_state: dict | None = None

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        data_vocab_size = getattr(datamodule, "vocab_size", None)
        self.num_domains = getattr(datamodule, "num_domains", None)
        if hasattr(getattr(datamodule, "tokenizer", None), "state"):
            self.tokenizer_state = datamodule.tokenizer.state()
        if data_vocab_size is not None and data_vocab_size != self.model.config.vocab_size:
            raise ConfigError(
                f"`model.vocab_size` ({self.model.config.vocab_size}) does not match the data's"
                f" vocabulary size (`data.vocab_size` = {data_vocab_size}); set"
                f" `model.vocab_size: {data_vocab_size}`."
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks this model trains with, each added unless the trainer has one of its kind.

        ``DefaultOutputEMA`` when a layer uses Default MoE (its EMA needs an updater),
        ``ResumableRNG`` (sampled routing resumes exactly), ``ResumableEpochEnd`` (a run stopped
        by ``max_steps`` resumes at the right batch), ``PreemptionCheckpoint`` (SIGTERM
        saves ``last.ckpt`` at the current step) and ``NonFiniteGuard`` (NaN/inf stops training
        with the layer named; impossible setups fail before any compute).
        """
        from lightning_moe.callbacks import DefaultOutputEMA, NonFiniteGuard, ResumableRNG
        from lightning_moe.checkpointing import PreemptionCheckpoint, ResumableEpochEnd
        from lightning_moe.estimators.default_moe import DefaultMoE

        wanted: list[L.Callback] = [ResumableRNG(), ResumableEpochEnd(), PreemptionCheckpoint(), NonFiniteGuard()]
        if any(isinstance(layer.estimator, DefaultMoE) for layer in self.model.moe_layers()):
            wanted.insert(0, DefaultOutputEMA())
        present = self.trainer.callbacks if self._trainer is not None else []
        return [c for c in wanted if not any(isinstance(p, type(c)) for p in present)]

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard with FSDP2 over the data-parallel mesh.

        Each block and then the whole model get ``fully_shard`` (the usual FSDP2 layout:
        one all-gather per block). Tensor parallelism is not supported. Other strategies
        leave the model as it is. Idempotent, as Lightning asks of this hook.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                "MoELanguageModel under ModelParallelStrategy shards its parameters with FSDP2 only; tensor"
                f" parallelism is not supported (tensor_parallel_size={mesh['tensor_parallel'].size()})."
                " Use ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)."
            )
        if isinstance(self.model, FSDPModule):
            return
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another architecture with one error listing what differs."""
        from lightning_moe.checkpointing import check_checkpoint_matches

        if isinstance(checkpoint.get("state_dict"), dict):  # older checkpoints lack newer switches
            add_missing_layer_state(self, checkpoint["state_dict"])
        check_checkpoint_matches(self, checkpoint, hparams=self.hparams, strict=self.strict_loading)
        self.tokenizer_state = checkpoint.get("tokenizer", self.tokenizer_state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `lightning-moe sample` decodes with the tokenizer the model was trained with.
        if self.tokenizer_state is not None:
            checkpoint["tokenizer"] = self.tokenizer_state

    def _token_loss(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy (float32) and the number of tokens it averages."""
        input_ids, targets, *domains = batch
        labelled = contextlib.nullcontext()
        if domains and self.num_domains:
            labelled = labelled_tokens(self.model, domains[0], self.num_domains)
        with labelled:
            logits = self(input_ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, (targets != IGNORE_INDEX).sum()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._token_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, num_tokens = self._token_loss(batch)
        self.val_loss.update(loss, weight=num_tokens)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, num_tokens = self._token_loss(batch)
        self.test_loss.update(loss, weight=num_tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_loss("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_loss("test", self.test_loss)

    def _log_epoch_loss(self, split: str, metric: MeanMetric) -> None:
        # Token-weighted mean over the epoch (and over ranks: MeanMetric syncs in compute),
        # so perplexity is exp of the per-token loss, not of a mean of batch means.
        loss = metric.compute()
        metric.reset()
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/ppl", loss.exp())

    def configure_optimizers(self):
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for param in self.parameters():
            if not param.requires_grad:
                continue
            if param.ndim < 2 or id(param) in embedding_weights:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [group for group in groups if group["params"]],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            rank_zero_warn(
                "The trainer has no finite number of steps (set `max_steps` or `max_epochs`);"
                " the learning rate stays at its peak after warmup."
            )
        schedule = partial(
            warmup_cosine_factor,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=self.hparams.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run builds its schedule for its own length (estimated_stepping_batches), but the
        # optimizer state brings the rate the checkpoint's schedule set for this step; with a new
        # max_steps they differ, so set this run's rate from its first step on (a no-op otherwise).
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                # LambdaLR's own formula (get_lr), which warns when called outside step().
                groups = scheduler.optimizer.param_groups
                for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids`` ([T] or [B, T]).

        Returns the prompt followed by the new tokens, with the prompt's shape
        (``[T + max_new_tokens]`` or ``[B, T + max_new_tokens]``). Runs in eval mode and
        restores the previous mode; only the last ``max_seq_len`` tokens are fed back.
        ``temperature=0`` picks the most likely token; ``top_k`` samples among the
        ``top_k`` most likely tokens only; ``generator`` (on the model's device) makes
        sampling reproducible.
        """
        if prompt_ids.dim() not in (1, 2) or prompt_ids.shape[-1] == 0:
            raise ConfigError(
                f"`prompt_ids` must have shape [T] or [B, T] with T >= 1, got {tuple(prompt_ids.shape)}."
            )
        if max_new_tokens < 0:
            raise ConfigError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}.")
        if temperature < 0:
            raise ConfigError(f"`temperature` must be >= 0 (0 = greedy), got {temperature}.")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"`top_k` must be None or >= 1, got {top_k}.")
        ids = (prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids).to(self.device)
        max_seq_len = self.model.config.max_seq_len
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self.model(ids[:, -max_seq_len:])[:, -1].float()
                if temperature == 0:
                    next_ids = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
                    next_ids = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
                ids = torch.cat([ids, next_ids], dim=1)
        finally:
            self.train(was_training)
        return ids[0] if prompt_ids.dim() == 1 else ids

    def sample_text(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """Continue ``prompt`` and return prompt + continuation, as text.

        Tokenised with the tokenizer the model was trained with (recorded in its
        checkpoint; byte-level when none was), after a start-of-document token as
        documents appear in training (so an empty prompt samples a fresh document);
        special tokens are dropped from the text and invalid UTF-8 is replaced.
        """
        from lightning_moe.data.tokenizers import tokenizer_from_state

        tokenizer = tokenizer_from_state(self.tokenizer_state)
        prompt_ids = torch.from_numpy(tokenizer.encode(prompt, bos=True).astype("int64"))
        ids = self.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
        return tokenizer.decode(ids)
