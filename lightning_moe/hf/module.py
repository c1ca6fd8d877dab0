"""HFMoELanguageModel: post-train a Hugging Face MoE causal LM, converted to MoELayer, in Lightning.

The model is loaded with ``transformers`` (a Hub name or a local folder; or built from a
config, randomly initialised), its sparse-MoE blocks are converted by :func:`~lightning_moe.hf.from_hf`
with the chosen estimator and backend, and it trains as :class:`~lightning_moe.MoELanguageModel`
does (:class:`~lightning_moe.lm_training.CausalLMTraining`): same batches, loss, optimizer,
schedule and self-added callbacks, so every router callback of this library applies.
:func:`~lightning_moe.hf.export.export_pretrained` writes the result back as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_moe.data.tokenizers import load_transformers_tokenizer
from lightning_moe.errors import ConfigError
from lightning_moe.hf.convert import HFMoEBlock, from_hf
from lightning_moe.hf.loading import _STORED_MODEL, STORED_MODEL, PendingWeights, load_causal_lm, stored_model
from lightning_moe.hf.weights import fill_from_checkpoint, materialize_empty
from lightning_moe.layer import moe_layers
from lightning_moe.lm_training import CausalLMTraining, check_optimizer_args

#: Which parameters train (``trainable``); the rest are frozen (``requires_grad=False``).
TRAINABLE = ("all", "router", "experts", "all_but_router")
_CHECKPOINTING = {False: None, True: False, "non_reentrant": False, "reentrant": True}


def check_router_aux_loss_args(router_aux_loss: bool | None, router_aux_loss_coef: float | None) -> None:
    coef = router_aux_loss_coef
    if coef is not None and (isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0):
        raise ConfigError(f"`router_aux_loss_coef` must be a number >= 0 (or null: the config's), got {coef!r}")
    if router_aux_loss not in (None, True, False):
        raise ConfigError(f"`router_aux_loss` must be true, false or null (the config's), got {router_aux_loss!r}")


def family_aux_loss_weight(config: Any, router_aux_loss: bool | None, router_aux_loss_coef: float | None) -> float | None:
    """The weight of the family's own load-balancing loss in training, ``None`` when it is off
    (see :class:`HFMoELanguageModel`'s ``router_aux_loss`` and ``router_aux_loss_coef``, checked
    by :func:`check_router_aux_loss_args` before the model is loaded)."""
    coef = router_aux_loss_coef
    if not (getattr(config, "output_router_logits", False) if router_aux_loss is None else router_aux_loss):
        return None
    family = getattr(config, "model_type", type(config).__name__)
    if not hasattr(config, "output_router_logits"):
        raise ConfigError(
            f"`router_aux_loss`: {family} has no load-balancing loss of its own (no output_router_logits);"
            " use the LoadBalancingLoss callback"
        )
    coef = getattr(config, "router_aux_loss_coef", None) if coef is None else coef
    if coef is None:
        raise ConfigError(f"`router_aux_loss_coef`: {family}'s config has none; give one")
    return float(coef)


def _router_parameters(model: nn.Module) -> set[int]:
    return {id(p) for _, layer in moe_layers(model) for p in layer.router.parameters()}


def _expert_parameters(model: nn.Module) -> set[int]:
    ids = {id(p) for _, layer in moe_layers(model) for p in layer.experts.parameters()}
    for block in model.modules():
        if isinstance(block, HFMoEBlock) and block.shared_expert is not None:
            ids |= {id(p) for p in block.shared_expert.parameters()}
            ids |= {id(p) for p in block.shared_expert_gate.parameters()}
        if isinstance(block, HFMoEBlock) and block.shared_experts is not None:  # DeepSeek-V3's, ungated
            ids |= {id(p) for p in block.shared_experts.parameters()}
    return ids


def set_trainable(model: nn.Module, trainable: str) -> None:
    """Freeze what ``trainable`` leaves out (see :class:`HFMoELanguageModel`)."""
    if trainable not in TRAINABLE:
        raise ConfigError(f"`trainable` must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    router, experts = _router_parameters(model), _expert_parameters(model)
    keep = {
        "all": lambda p: True,
        "router": lambda p: id(p) in router,
        "experts": lambda p: id(p) in experts,
        "all_but_router": lambda p: id(p) not in router,
    }[trainable]
    for param in model.parameters():
        param.requires_grad_(keep(param))



def _refuse_aux_loss_under_reentrant_checkpointing() -> None:
    raise ConfigError(
        "`router_aux_loss` needs `activation_checkpointing` false or 'non_reentrant', not 'reentrant': the"
        " router logits would be recorded in its no-grad forward and the loss would not reach the routers"
    )


class HFMoELanguageModel(CausalLMTraining):
    """A Hugging Face MoE causal LM post-trained with any estimator of this library.

    Supported families (by structure, :func:`~lightning_moe.hf.from_hf`): Mixtral, PhiMoE
    (GRIN MoE), OLMoE, Qwen2-MoE, Qwen3-MoE, Jamba and siblings built from the same blocks.

    Args:
        pretrained: a Hub name or a local folder, loaded with
            ``AutoModelForCausalLM.from_pretrained``; its tokenizer is the data's default (:attr:`tokenizer_source`).
        config: instead of ``pretrained``, the fields of a ``transformers`` config with
            ``model_type`` (a randomly initialised model, for experiments and tests).
        estimator: router-gradient estimator of every MoE block (``topk``, ``densemixer``,
            ``sparsemixer_v2``, ``default_moe``, ...); ``None`` keeps the family's own routing
            (``topk`` with its renormalisation, ``sparsemixer_v2`` for PhiMoE).
        estimator_args: the estimator's arguments.
        backend: expert backend (``auto``, ``torch``, ``loop``, ``megablocks``).
        trainable: ``all``; ``router`` (only the routers train); ``experts`` (only the
            routed experts and the shared experts: Qwen2-MoE's with its gate, DeepSeek-V3's);
            ``all_but_router`` (routers frozen, the usual post-training choice for stability).
        dtype: the weights' dtype when loaded (``auto``: the checkpoint's own).
        attn_implementation: passed to ``transformers`` (``None``: its default).
        meta_init: build the model's parameters on the meta device and fill them in
            :meth:`configure_model`, after FSDP2 has sharded them (``ModelParallelStrategy``):
            each rank then reads only its shard of each tensor from ``pretrained``'s
            safetensors, so no rank ever holds the whole model (other strategies fill the
            whole model there, once per process). ``None``: on in processes launched as
            ranks of a distributed run (``WORLD_SIZE`` > 1). Outside a ``Trainer`` call
            :meth:`configure_model` before using the model. A ``config`` model is always
            built whole (it has no checkpoint to read).
        activation_checkpointing: ``False``, ``"non_reentrant"`` (or ``True``) or
            ``"reentrant"``: ``transformers``' gradient checkpointing of each decoder layer.
        router_aux_loss: train with the family's own load-balancing loss (``transformers``'
            ``output_router_logits``: Switch's loss over all layers together, from our routers'
            logits): the training loss is the task loss plus ``router_aux_loss_coef`` times it
            (logged as ``train/router_aux_loss``). ``None``: on where the model's config has
            ``output_router_logits`` on. This library's ``LoadBalancingLoss`` callback is the
            per-layer alternative; using both adds both.
        router_aux_loss_coef: its weight; ``None``: the config's ``router_aux_loss_coef``.
        learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW and the
            warmup + cosine schedule, as :class:`~lightning_moe.MoELanguageModel`.

    Batches are ``(input_ids [B, T], targets [B, T])`` with targets already shifted and -100
    where no loss is taken (:class:`~lightning_moe.data.TextDataModule`, or the post-training
    data module for chat SFT). A local ``pretrained`` folder is recorded as an absolute path.
    Checkpoints carry the model's ``transformers`` config and tokenizer (:data:`STORED_MODEL`),
    so :meth:`load_from_checkpoint` (``lightning-moe sample`` and ``export``) needs neither
    ``pretrained`` nor the network; resuming a run (``fit(ckpt_path=...)``) loads
    ``pretrained`` again, then the checkpoint's weights over it.
    """

    # The tokenizer's files for checkpoints (name -> bytes), read from `tokenizer_source` at the
    # first save or restored from a loaded checkpoint; {} when there is none.
    _stored_tokenizer: dict[str, bytes] | None = None
    # The data's tokenizer, for a model built from a config (see `tokenizer_source`).
    _data_tokenizer: str | None = None
    # Where a ``meta_init`` model's parameters are still to come from (None once filled, or when built whole).
    _pending_weights: PendingWeights | None = None

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        estimator: str | None = None,
        estimator_args: dict[str, Any] | None = None,
        backend: str = "auto",
        trainable: str = "all",
        dtype: str = "auto",
        attn_implementation: str | None = None,
        meta_init: bool | None = None,
        activation_checkpointing: bool | str = False,
        router_aux_loss: bool | None = None,
        router_aux_loss_coef: float | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        check_optimizer_args(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio)
        if activation_checkpointing not in _CHECKPOINTING:
            raise ConfigError(
                "`activation_checkpointing` must be false, true, 'non_reentrant' or 'reentrant',"
                f" got {activation_checkpointing!r}"
            )
        if trainable not in TRAINABLE:
            raise ConfigError(f"`trainable` must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
        check_router_aux_loss_args(router_aux_loss, router_aux_loss_coef)  # before the model loads
        if pretrained is not None and os.path.isdir(pretrained):
            pretrained = os.path.abspath(pretrained)  # so its checkpoints load from any working directory
        self.save_hyperparameters()
        if meta_init is None:
            meta_init = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if router_aux_loss and activation_checkpointing == "reentrant":
            _refuse_aux_loss_under_reentrant_checkpointing()  # asked for explicitly: before the model loads
        model, self._pending_weights = load_causal_lm(pretrained, config, dtype, attn_implementation, meta_init)
        self._router_aux_loss_weight = family_aux_loss_weight(model.config, router_aux_loss, router_aux_loss_coef)
        if self._router_aux_loss_weight is not None and activation_checkpointing == "reentrant":
            _refuse_aux_loss_under_reentrant_checkpointing()  # on by the family's config
        self._router_aux_loss: Tensor | None = None  # of the last training forward (see logits)
        self.model = from_hf(model, estimator=estimator, backend=backend, **(estimator_args or {}))
        self.model.config.use_cache = False  # training: no key/value cache
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's
        # mode: without this, training would run with evaluation routing (no sampling, no jitter).
        self.model.train()
        use_reentrant = _CHECKPOINTING[activation_checkpointing]
        if use_reentrant is not None:
            kwargs = {"use_reentrant": use_reentrant}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        set_trainable(self.model, trainable)

    @property
    def tokenizer_source(self) -> str | None:
        """Where the model's own tokenizer is: ``pretrained``; for a model built from a config, the
        tokenizer of the data it trains on (``data.tokenizer``, once :meth:`setup` has seen it), so
        that its checkpoints and export carry the tokenizer its token ids mean; else ``None``."""
        return self.hparams.pretrained or self._data_tokenizer

    def load_tokenizer(self) -> Any:
        """The model's own ``transformers`` tokenizer: the one its checkpoint carried, else from
        :attr:`tokenizer_source`; ``None`` for a model built from a config."""
        if self._stored_tokenizer:
            with tempfile.TemporaryDirectory() as folder:
                write_files(folder, self._stored_tokenizer)
                return load_transformers_tokenizer(folder, field="the checkpoint's tokenizer")
        if self.tokenizer_source is None:
            return None
        return load_transformers_tokenizer(self.tokenizer_source, field="tokenizer_source")

    def tokenizer_files(self) -> dict[str, bytes]:
        """The files of the model's own tokenizer (name -> bytes; empty when it has none), read once.

        A tokenizer that cannot be loaded (a Hub model without one, say) is warned about, not
        raised: a checkpoint must not fail for it, only its export will need ``--tokenizer``.
        """
        if self._stored_tokenizer is None:
            self._stored_tokenizer = {}
            try:
                tokenizer = self.load_tokenizer()
            except ConfigError as err:
                rank_zero_warn(f"checkpoints will carry no tokenizer ({err}); give one to export with --tokenizer")
                tokenizer = None
            if tokenizer is not None:
                with tempfile.TemporaryDirectory() as folder:
                    tokenizer.save_pretrained(folder)
                    self._stored_tokenizer = _read_files(folder)
        return self._stored_tokenizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Export and sample build the model from these, so the base model may move or go.
        super().on_save_checkpoint(checkpoint)
        checkpoint[STORED_MODEL] = {
            "config": json.loads(self.model.config.to_json_string(use_diff=False)),
            "generation_config": json.loads(self.model.generation_config.to_json_string(use_diff=False)),
            "tokenizer": self.tokenizer_files(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get(STORED_MODEL)
        if isinstance(stored, dict) and isinstance(stored.get("tokenizer"), dict):
            self._stored_tokenizer = stored["tokenizer"]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> HFMoELanguageModel:
        """Lightning's ``load_from_checkpoint``; a checkpoint that carries its model (:data:`STORED_MODEL`)
        is built from it without reading ``pretrained``, unless ``pretrained`` or ``config`` is passed."""
        stored = None if {"pretrained", "config"} & kwargs.keys() else stored_model(checkpoint_path)
        token = _STORED_MODEL.set(stored)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _STORED_MODEL.reset(token)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding (token ids must be below it)."""
        return self.model.get_input_embeddings().weight.shape[0]

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def logits(self, batch: tuple[Tensor, ...]) -> Tensor:
        # The family's aux loss comes out of the same forward as the logits; training_step adds
        # it to the loss it returns, so Lightning scales it as the task loss (accumulation, AMP).
        wanted = self.training and self._router_aux_loss_weight is not None
        from lightning_moe.hf.packed import packed_forward  # packed rows: each example attends to itself

        out = packed_forward(self.model, batch, use_cache=False, output_router_logits=wanted)
        self._router_aux_loss = out.aux_loss if wanted else None
        return out.logits

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        aux, self._router_aux_loss = self._router_aux_loss, None
        if aux is None:
            return loss
        self.log("train/router_aux_loss", aux.detach(), batch_size=batch[0].shape[0])
        return loss + self._router_aux_loss_weight * aux

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        data_tokenizer = getattr(getattr(datamodule, "tokenizer", None), "name", None)
        if self.hparams.pretrained is None and isinstance(data_tokenizer, str) and data_tokenizer != "bytes":
            # A model pretrained from a config: its token ids are the data tokenizer's.
            local = os.path.expanduser(data_tokenizer)
            self._data_tokenizer = os.path.abspath(local) if os.path.exists(local) else data_tokenizer
        data_vocab_size = getattr(datamodule, "vocab_size", None)
        if data_vocab_size is not None and data_vocab_size > self.vocab_size:
            raise ConfigError(
                f"the data's tokenizer has {data_vocab_size} ids but the model's embedding only {self.vocab_size};"
                " use the model's own tokenizer (leave `data.tokenizer` unset, or point it at the model's folder)"
            )

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard with FSDP2: each decoder layer, then the model.

        The decoder layers are the modules of the classes the model lists in
        ``_no_split_modules`` (``transformers``' own unit of sharding). A ``meta_init`` model
        is then filled, each rank its own shards (under any other strategy: whole).
        """
        unit_names = set(getattr(self.model, "_no_split_modules", None) or ())
        self.shard_with_fsdp2([m for m in self.model.modules() if type(m).__name__ in unit_names], self.model)
        self._fill_pending_weights()

    def _fill_pending_weights(self) -> None:
        """Allocate the parameters a ``meta_init`` model left on the meta device (each rank its
        FSDP2 shards) and fill them from ``pretrained``'s safetensors; a no-op once done.

        A model being loaded from a Lightning checkpoint gets empty tensors: the checkpoint fills them.
        """
        pending, self._pending_weights = self._pending_weights, None
        if pending is None:
            return
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        device = strategy.root_device if isinstance(strategy, ModelParallelStrategy) else torch.device("cpu")
        names = materialize_empty(self.model, device)
        if pending.folder is not None:
            fill_from_checkpoint(self.model, pending.plan, pending.folder, names)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # A state dict copied into meta tensors would be lost without a word.
        if self._pending_weights is not None:
            self._pending_weights.folder = None
            self._fill_pending_weights()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def sample_text(
        self, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None
    ) -> str:
        """Continue ``prompt`` with the model's own tokenizer and ``generate``; return prompt + continuation.

        ``temperature=0`` decodes greedily. Needs the model's tokenizer (:meth:`load_tokenizer`:
        a model loaded from ``pretrained``, or from its checkpoint).
        """
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ConfigError(
                f"max_new_tokens and temperature must be >= 0 and top_k None or >= 1, got {max_new_tokens},"
                f" {temperature}, {top_k}"
            )
        tokenizer = self.load_tokenizer()
        if tokenizer is None:
            raise ConfigError("sample_text needs the model's tokenizer: this model was built from `config`, not `pretrained`")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        sampling = {"do_sample": False}  # temperature 0: greedy
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k}
        was_training = self.training
        self.eval()
        try:
            out = self.model.generate(
                ids, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        finally:
            self.train(was_training)
        return tokenizer.decode(out[0], skip_special_tokens=True)


def write_files(folder: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ConfigError(f"the checkpoint's tokenizer has a file named {name!r}, not a plain file name")
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)


def _read_files(folder: str) -> dict[str, bytes]:
    files = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            files[name] = fh.read()
    return files
