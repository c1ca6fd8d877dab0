"""MoETransformer: a small decoder-only language model built from a dataclass config.

Pre-norm blocks (RMSNorm), rotary position embeddings, causal self-attention through
``F.scaled_dot_product_attention`` and, per block, either a dense feed-forward network or
an :class:`~lightning_moe.layer.MoELayer`. With ``TransformerConfig(moe=None)`` the model is
fully dense: the baseline an MoE run is compared against.

Shape legend: B batch, T sequence length, D model width, H heads, Dh head width
(D / H), V vocabulary size, F feed-forward hidden width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_moe.errors import ConfigError
from lightning_moe.experts import ACTIVATIONS, init_std_for_depth
from lightning_moe.layer import MoELayer
from lightning_moe.routing import Scoring


def _require_positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"`{name}` must be > 0, got {value!r}.")


def _require_activation(name: str, value: str) -> None:
    if value not in ACTIVATIONS:
        raise ConfigError(f"`{name}` must be one of {ACTIVATIONS}, got {value!r}.")


#: The values of ``TransformerConfig.activation_checkpointing`` that turn it on.
CHECKPOINTING_MODES = ("non_reentrant", "reentrant")


def default_ffn_hidden(d_model: int, activation: str) -> int:
    """The dense feed-forward width used when ``ffn_hidden`` is not given.

    ``gelu``: ``4 * d_model`` (GPT-2). ``swiglu``: ``8/3 * d_model`` rounded up to a
    multiple of 64, which keeps the parameter count of the three SwiGLU matrices equal
    to that of the two GELU ones (LLaMA, Shazeer 2020 "GLU Variants Improve Transformer").
    """
    if activation == "gelu":
        return 4 * d_model
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class MoEConfig:
    """Which blocks get a mixture-of-experts feed-forward layer, and how it is built.

    Args:
        num_experts: experts per MoE layer.
        top_k: experts each token is sent to.
        ffn_hidden: hidden width of one expert; ``None`` uses the model's dense
            feed-forward width (``TransformerConfig.ffn_hidden`` after its default is
            resolved), so each expert is as large as the FFN it replaces.
        estimator: registry name of the router gradient estimator (``"topk"``,
            ``"sparsemixer"``, ``"sparsemixer_v2"``, ``"default_moe"``, ...).
        estimator_args: keyword arguments for the estimator's constructor.
        backend: expert backend name (``"auto"``, ``"torch"``, ``"loop"``, ``"megablocks"``).
        activation: expert activation, ``"swiglu"`` or ``"gelu"``; ``None`` uses the
            model's ``TransformerConfig.activation``.
        input_jitter: GRIN's multiplicative input jitter delta (0 disables it).
        every_n_layers: block ``i`` (0-based) is MoE when ``i % every_n_layers ==
            every_n_layers - 1``. 1 makes every block MoE; 2 makes blocks 1, 3, 5, ...
            MoE (the GShard / Switch "every other layer" layout).
        dense_first_layer: keep block 0 dense even when the rule above selects it
            (DeepSeek-MoE keeps the first layer dense).
        score_function, n_group, topk_group, routed_scaling_factor: how the router's
            logits become scores, which experts they choose and the gates' scale
            (``MoELayer``'s arguments of these names, :class:`~lightning_moe.routing.Scoring`):
            ``score_function: sigmoid`` with groups and a scaling factor routes as DeepSeek-V3.
    """

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden: int | None = None
    estimator: str = "topk"
    estimator_args: dict = field(default_factory=dict)
    backend: str = "auto"
    activation: str | None = None
    input_jitter: float = 0.0
    every_n_layers: int = 1
    dense_first_layer: bool = False
    score_function: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        _require_positive("moe.num_experts", self.num_experts)
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"`moe.top_k` must be between 1 and `moe.num_experts` ({self.num_experts}), got {self.top_k}."
            )
        if self.ffn_hidden is not None:
            _require_positive("moe.ffn_hidden", self.ffn_hidden)
        if self.activation is not None:
            _require_activation("moe.activation", self.activation)
        if not 0.0 <= self.input_jitter < 1.0:
            raise ConfigError(f"`moe.input_jitter` must be in [0, 1), got {self.input_jitter}.")
        if self.every_n_layers < 1:
            raise ConfigError(f"`moe.every_n_layers` must be >= 1, got {self.every_n_layers}.")
        try:
            self.scoring.check(self.num_experts, self.top_k)
        except ConfigError as err:  # the same checks as MoELayer's, naming the recipe's fields
            raise ConfigError(f"moe.{err}") from None

    @property
    def scoring(self) -> Scoring:
        """The MoE layers' :class:`~lightning_moe.routing.Scoring`."""
        return Scoring(self.score_function, self.n_group, self.topk_group, self.routed_scaling_factor)

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` (0-based) gets an MoE feed-forward layer."""
        if self.dense_first_layer and index == 0:
            return False
        return index % self.every_n_layers == self.every_n_layers - 1


@dataclass
class TransformerConfig:
    """Architecture of :class:`MoETransformer`.

    Args:
        vocab_size: number of token ids (258 = the byte-level vocabulary of
            :mod:`lightning_moe.data`: 256 bytes plus two special tokens).
        d_model: residual stream width.
        n_layers: number of transformer blocks.
        n_heads: attention heads; must divide ``d_model`` into an even head width (RoPE
            rotates pairs of channels).
        max_seq_len: longest sequence the RoPE tables cover.
        ffn_hidden: dense feed-forward hidden width; ``None`` picks
            :func:`default_ffn_hidden` (``8/3 * d_model`` rounded up to a multiple of 64
            for ``swiglu``, ``4 * d_model`` for ``gelu``).
        activation: dense feed-forward activation, ``"swiglu"`` or ``"gelu"`` (also the
            expert activation unless ``moe.activation`` says otherwise).
        tie_embeddings: share the token embedding matrix with the output head.
        rope_base: RoPE frequency base (theta).
        norm_eps: RMSNorm epsilon.
        moe: MoE settings; ``None`` builds a fully dense model. A plain ``dict`` is
            accepted and turned into :class:`MoEConfig`.
        activation_checkpointing: recompute each block's activations during backward
            instead of keeping them from the forward (less memory, one more forward of
            every block): ``False`` (off), ``"non_reentrant"`` (``True`` means this) or
            ``"reentrant"`` (``torch.utils.checkpoint``'s two modes). Gradients are
            those without checkpointing, and every MoE layer records its routing
            statistics once per forward in either mode. Not part of the architecture:
            checkpoints load whatever it is set to.
        compile: compile each transformer block with ``torch.compile`` (dynamic shapes, so
            varying batch and sequence sizes do not recompile every step): ``False``,
            ``True`` (the ``inductor`` backend) or a backend name. Not part of the
            architecture either.
    """

    vocab_size: int = 258
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 1024
    ffn_hidden: int | None = None
    activation: str = "swiglu"
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    activation_checkpointing: bool | str = False
    compile: bool | str = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "rope_base", "norm_eps"):
            _require_positive(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"`d_model` ({self.d_model}) must be divisible by `n_heads` ({self.n_heads});"
                f" valid `n_heads` divide {self.d_model}."
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"The head width `d_model / n_heads` = {self.d_model // self.n_heads} must be even for"
                " rotary embeddings; change `d_model` or `n_heads`."
            )
        _require_activation("activation", self.activation)
        if self.activation_checkpointing is True:
            self.activation_checkpointing = "non_reentrant"
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ConfigError(f"compile={self.compile!r} is not valid; use false, true or a torch.compile backend name")
        if self.activation_checkpointing is not False and self.activation_checkpointing not in CHECKPOINTING_MODES:
            raise ConfigError(
                f"activation_checkpointing={self.activation_checkpointing!r} is not valid; use false,"
                f" {' or '.join(repr(mode) for mode in CHECKPOINTING_MODES)}"
            )
        if self.ffn_hidden is None:
            self.ffn_hidden = default_ffn_hidden(self.d_model, self.activation)
        _require_positive("ffn_hidden", self.ffn_hidden)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"`moe` must be a MoEConfig, a dict or None, got {type(self.moe).__name__}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` (0-based) gets an MoE feed-forward layer."""
        return self.moe is not None and self.moe.is_moe_layer(index)


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables ``[seq_len, head_dim]`` (float32) for :func:`apply_rope`.

    Frequencies ``base ** (-2i / head_dim)`` as in Su et al. 2021 (RoFormer, eq. 15); each
    frequency is repeated for the two halves that :func:`apply_rope` rotates together.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(j, j + Dh/2)`` of ``x [..., T, Dh]`` by position-dependent angles.

    Computed in float32 and returned in ``x.dtype``, so bf16 activations do not lose the
    angle precision. The dot product of two rotated vectors depends only on the
    difference of their positions.
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.n_heads, D // self.n_heads)
        q_BHTDh, k_BHTDh, v_BHTDh = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTDh = apply_rope(q_BHTDh, cos, sin)
        k_BHTDh = apply_rope(k_BHTDh, cos, sin)
        y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHTDh, v_BHTDh, is_causal=True)
        return self.proj(y_BHTDh.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """Dense feed-forward network: SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU MLP."""

    def __init__(self, d_model: int, ffn_hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        _require_activation("activation", activation)
        self.activation = activation
        self.up = nn.Linear(d_model, ffn_hidden, bias=False)
        self.gate = nn.Linear(d_model, ffn_hidden, bias=False) if activation == "swiglu" else None
        self.down = nn.Linear(ffn_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            return self.down(F.gelu(self.up(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, config: TransformerConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn: nn.Module
        if config.is_moe_layer(index):
            moe = config.moe
            self.ffn = MoELayer(
                d_model=config.d_model,
                ffn_hidden=moe.ffn_hidden or config.ffn_hidden,
                num_experts=moe.num_experts,
                top_k=moe.top_k,
                estimator=moe.estimator,
                backend=moe.backend,
                activation=moe.activation or config.activation,
                input_jitter=moe.input_jitter,
                estimator_args=dict(moe.estimator_args),
                score_function=moe.score_function,
                n_group=moe.n_group,
                topk_group=moe.topk_group,
                routed_scaling_factor=moe.routed_scaling_factor,
            )
        else:
            self.ffn = FeedForward(config.d_model, config.ffn_hidden, config.activation)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class MoETransformer(nn.Module):
    """Decoder-only language model: ``forward(input_ids [B, T]) -> logits [B, T, V]``.

    Weights are drawn from N(0, 0.02); the projections that write into the residual
    stream (attention output, FFN and expert down projections) use
    ``0.02 / sqrt(2 * n_layers)`` so the residual variance does not grow with depth
    (GPT-2, Radford et al. 2019 §2.3). Routers keep their own initialisation.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if config.compile:
            backend = "inductor" if config.compile is True else config.compile
            for block in self.blocks:
                block.compile(backend=backend, dynamic=None)

    def reset_parameters(self) -> None:
        std = 0.02
        residual_std = init_std_for_depth(self.config.n_layers, std)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            if isinstance(block.ffn, FeedForward):
                for linear in (block.ffn.up, block.ffn.gate):
                    if linear is not None:
                        nn.init.normal_(linear.weight, std=std)
                nn.init.normal_(block.ffn.down.weight, std=residual_std)
            else:
                block.ffn.experts.reset_parameters(std=std, out_std=residual_std)

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must be an integer tensor, got dtype {input_ids.dtype}.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"`input_ids` has sequence length {input_ids.shape[1]}, longer than"
                f" `max_seq_len` ({self.config.max_seq_len})."
            )
        if input_ids.numel() and input_ids.device.type != "cpu":
            # Checked on the device (a bad id fails as a device-side assertion): reading the
            # range back to the host would stall it on every forward.
            torch._assert_async(((input_ids >= 0) & (input_ids < self.config.vocab_size)).all())
        elif input_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"`input_ids` must lie in [0, {self.config.vocab_size}) (`vocab_size`),"
                    f" got values in [{low}, {high}]."
                )

    def forward(self, input_ids: Tensor) -> Tensor:
        self._check_input_ids(input_ids)
        T = input_ids.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x_BTD = self.embed(input_ids)
        mode = self.config.activation_checkpointing
        for block in self.blocks:
            if mode and torch.is_grad_enabled():
                # The checkpoint keeps the RNG state, so sampled routing and input jitter
                # replay identically in the recompute.
                x_BTD = checkpoint(block, x_BTD, cos, sin, use_reentrant=mode == "reentrant")
            else:
                x_BTD = block(x_BTD, cos, sin)
        return self.lm_head(self.norm(x_BTD))

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers of the model, in block order."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def num_parameters(self, active_only: bool = False) -> int:
        """Number of parameters (tied weights counted once).

        With ``active_only`` the parameters of each MoE layer's experts count
        ``top_k / num_experts`` of their size: the parameters one token actually uses,
        for comparing MoE and dense models at equal compute per token.
        """
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        for layer in self.moe_layers():
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            total -= expert_params - expert_params * layer.top_k // layer.num_experts
        return total
