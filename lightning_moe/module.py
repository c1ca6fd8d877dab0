"""MoELanguageModel: the LightningModule that trains :class:`~lightning_moe.model.MoETransformer`.

Batches are ``(input_ids [B, T] int64, targets [B, T] int64)``; targets equal to
``IGNORE_INDEX`` do not count towards the loss. A third entry, ``domains [B, T]`` (the
testbed corpus's), makes the MoE layers count routing per domain when the datamodule
reports ``num_domains``. MoE auxiliary losses are attached inside the MoE layers, so the
steps here compute only the language-modelling loss (:mod:`lightning_moe.lm_training`, shared
with the Hugging Face models' module).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from lightning_moe.errors import ConfigError
from lightning_moe.layer import labelled_tokens
from lightning_moe.lm_training import IGNORE_INDEX, CausalLMTraining, check_optimizer_args, warmup_cosine_factor
from lightning_moe.model import MoEConfig, MoETransformer, TransformerConfig

__all__ = ["IGNORE_INDEX", "MoELanguageModel", "warmup_cosine_factor"]


class MoELanguageModel(CausalLMTraining):
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
        check_optimizer_args(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio)
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

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard with FSDP2: each block, then the whole model."""
        self.shard_with_fsdp2(list(self.model.blocks), self.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokenizer_state = checkpoint.get("tokenizer", self.tokenizer_state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `lightning-moe sample` decodes with the tokenizer the model was trained with.
        if self.tokenizer_state is not None:
            checkpoint["tokenizer"] = self.tokenizer_state

    def logits(self, batch: tuple[Tensor, ...]) -> Tensor:
        input_ids, _, *domains = batch
        if domains and self.num_domains:
            with labelled_tokens(self.model, domains[0], self.num_domains):
                return self(input_ids)
        return self(input_ids)

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
