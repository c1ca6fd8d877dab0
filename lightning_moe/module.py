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

from lightning_moe.data.packing import position_ids_of
from lightning_moe.errors import ConfigError
from lightning_moe.layer import labelled_tokens
from lightning_moe.lm_training import IGNORE_INDEX, CausalLMTraining, check_optimizer_args, warmup_cosine_factor
from lightning_moe.model import MoEConfig, MoETransformer, TransformerConfig

__all__ = ["IGNORE_INDEX", "MoELanguageModel", "warmup_cosine_factor"]


def _with_estimator(moe: MoEConfig | None, estimator: str | None, estimator_args: dict | None) -> MoEConfig | None:
    """``moe`` with the top-level ``estimator`` / ``estimator_args`` of :class:`MoELanguageModel`, where given."""
    if estimator is None and estimator_args is None:
        return moe
    if moe is None:
        given = " and ".join(
            f"model.{name}={value!r}" for name, value in (("estimator", estimator), ("estimator_args", estimator_args))
            if value is not None
        )
        raise ConfigError(f"{given}: a dense model (model.moe is null) has no estimator; remove it or give model.moe")
    changes = {"estimator": estimator} if estimator is not None else {}
    if estimator_args is not None:
        changes["estimator_args"] = dict(estimator_args)
    return dataclasses.replace(moe, **changes)


#: Command-line flags of ``moe.estimator`` / ``moe.estimator_args`` and the top-level flags they stand for.
_ESTIMATOR_FLAG_ALIASES = {"--model.moe.estimator": "--model.estimator", "--model.moe.estimator_args": "--model.estimator_args"}


def canonical_estimator_flags(argv: list[str]) -> list[str]:
    """``argv`` with ``--model.moe.estimator[_args]`` spelt ``--model.estimator[_args]``.

    The alias is rewritten on the command line rather than resolved in ``__init__``: a
    recipe sets the top-level ``estimator`` (which replaces ``moe.estimator``), so a
    ``--model.moe.estimator`` override left as it is would be silently outvoted by the
    recipe it overrides.
    """
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        out.append(_ESTIMATOR_FLAG_ALIASES.get(flag, flag) + sep + value)
    return out


class MoELanguageModel(CausalLMTraining):
    """A decoder-only MoE language model with AdamW and warmup + cosine schedule.

    The architecture arguments are those of :class:`~lightning_moe.model.TransformerConfig`,
    flat so a LightningCLI config reads
    ``model: {d_model: 256, estimator: topk, moe: {num_experts: 8, top_k: 2}}``.
    ``moe`` fields not given keep their :class:`~lightning_moe.model.MoEConfig` defaults;
    ``moe: null`` (``moe=None``) builds a fully dense model. A ``dict`` of ``MoEConfig``
    fields is accepted too; ``hparams.moe`` holds that dict form.

    The estimator is chosen by ``estimator`` and ``estimator_args`` at the top level, the
    spelling :class:`~lightning_moe.hf.HFMoELanguageModel` uses too, so every recipe takes
    ``--model.estimator``. ``moe.estimator`` / ``moe.estimator_args`` still work (older
    recipes and checkpoints; on the command line ``lightning-moe`` reads ``--model.moe.estimator``
    as ``--model.estimator``, :func:`canonical_estimator_flags`); the top-level value, when
    given, replaces them, and both are saved as the estimator that was built.

    Args:
        vocab_size: number of token ids; ``lightning-moe fit`` sets it from the data's tokenizer.
        d_model: residual stream width.
        n_layers: number of transformer blocks.
        n_heads: attention heads (``d_model / n_heads`` must be even).
        max_seq_len: longest sequence the model handles (RoPE tables).
        ffn_hidden: dense feed-forward hidden width (default: ``8/3 * d_model`` rounded up to
            a multiple of 64 for ``swiglu``, ``4 * d_model`` for ``gelu``).
        activation: feed-forward activation, ``swiglu`` or ``gelu``.
        tie_embeddings: share the token embedding matrix with the output head.
        rope_base: RoPE frequency base (theta).
        moe: the MoE layers (:class:`~lightning_moe.model.MoEConfig`: ``num_experts``, ``top_k``,
            ``ffn_hidden`` of one expert, ``backend``, ``every_n_layers``, ...); ``null``: a
            dense model.
        estimator: the router gradient estimator (``topk``, ``sparsemixer``,
            ``sparsemixer_v2``, ``default_moe``, ``densemixer``, ``straight_through``, or a
            dotted path to an ``Estimator`` subclass); default: ``moe.estimator`` (``topk``).
        estimator_args: the estimator's arguments, e.g. ``{jitter_eps: 0.01}``; default:
            ``moe.estimator_args``.
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
        estimator: str | None = None,
        estimator_args: dict | None = None,
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
        moe_config = _with_estimator(moe_config, estimator, estimator_args)
        self.save_hyperparameters()
        # Saved as a plain dict so checkpoints load with `weights_only=True` and
        # hparams.yaml stays readable; `__init__` accepts the dict back. The estimator is
        # saved in both spellings as the one built, so the two never disagree on loading.
        # Set after `save_hyperparameters`, which under LightningCLI records the config as given.
        if moe_config is not None:
            self.hparams.update(
                moe=dataclasses.asdict(moe_config),
                estimator=moe_config.estimator,
                estimator_args=dict(moe_config.estimator_args),
            )
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
        if position_ids_of(batch) is not None:  # its attention is causal over the whole row
            raise ConfigError(
                "MoELanguageModel cannot keep the examples of a packed row apart (its attention spans the row);"
                " set data.packing=false, or train a Hugging Face model (HFMoELanguageModel) on packed rows"
            )
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
