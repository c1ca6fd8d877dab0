"""MoELayer: router + estimator + dropless experts, with aux losses and routing statistics.

Shape legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lightning_moe.errors import ConfigError
from lightning_moe.estimators import ESTIMATOR_REGISTRY, Estimator
from lightning_moe.experts import ACTIVATIONS, BACKENDS, Experts, merge_gate_and_up
from lightning_moe.float32_buffers import Float32Buffers
from lightning_moe.losses import GradScale, attach_aux_loss
from lightning_moe.routing import Router, Routing, Scoring


#: What :attr:`MoELayer.check_finite` may be: which tensors training forwards check for NaN/inf.
FINITE_CHECKS = ("off", "logits", "all")
#: The entries of :attr:`MoELayer.nonfinite`, in order.
NONFINITE_TENSORS = ("input", "router logits", "output")


class AuxLossTerm(Protocol):
    """An auxiliary loss computed from one forward's routing (registered by callbacks)."""

    def __call__(self, routing: Routing, logits_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor: ...


@dataclass
class RoutingStats:
    """Running sums (no grad) over the training forwards of one optimizer step.

    Callbacks read these in ``on_before_optimizer_step`` and then call
    :meth:`MoELayer.finish_step`; the next training forward starts a fresh record
    (every field ``None`` until then). Tensors stay on the device, so recording never
    synchronises with the host. The two counters are int64 tensors rather than Python
    ints: a compiled layer would otherwise treat them as constants of the graph and
    compile again on every step as they grow.
    """

    num_forwards: Tensor | None = None  # [] int64 training forwards recorded
    num_tokens: Tensor | None = None  # [] int64 tokens routed by them
    tokens_per_expert: Tensor | None = None  # [E] (token, slot) pairs per expert
    probs_sum: Tensor | None = None  # [E] sum over tokens of the plain softmax
    token_entropy_sum: Tensor | None = None  # [] sum over tokens of H(softmax)
    gate_sum: Tensor | None = None  # [] sum over tokens of the summed top-k weights
    logit_norm_sum: Tensor | None = None  # [] sum over tokens of ||z||_2
    # [num_labels, E] (token, slot) pairs per token label and expert; only with MoELayer.token_labels
    label_expert_counts: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # sums over forwards
    telemetry: dict[str, Tensor] = field(default_factory=dict)  # sums over forwards

    def add(self, routing: Routing, logits_TE: Tensor, tokens_per_expert_E: Tensor, aux: dict[str, Tensor]) -> None:
        probs_TE = routing.probs.detach()
        entropy = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum()
        values = {
            "num_forwards": probs_TE.new_ones((), dtype=torch.int64),  # filled on the device, no host copy
            "num_tokens": probs_TE.new_full((), logits_TE.shape[0], dtype=torch.int64),
            "tokens_per_expert": tokens_per_expert_E.detach().float(),
            "probs_sum": probs_TE.sum(dim=0),
            "token_entropy_sum": entropy,
            "gate_sum": routing.weights.detach().float().sum(),
            "logit_norm_sum": logits_TE.detach().norm(dim=-1).sum(),
        }
        for name, value in values.items():
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)
        for store, new in ((self.aux_losses, aux), (self.telemetry, routing.telemetry)):
            for name, value in new.items():
                value = value.detach().float()
                store[name] = store[name] + value if name in store else value

    def add_label_counts(self, labels_T: Tensor, indices_TK: Tensor, num_labels: int, num_experts: int) -> None:
        """Count the (token, slot) pairs per (token label, expert), e.g. (domain, expert)."""
        pairs_N = (labels_T.to(indices_TK.device)[:, None] * num_experts + indices_TK).reshape(-1)
        counts_LE = torch.bincount(pairs_N, minlength=num_labels * num_experts).view(num_labels, num_experts).float()
        current = self.label_expert_counts
        self.label_expert_counts = counts_LE if current is None else current + counts_LE


def _in_backward() -> bool:
    """True while autograd runs a backward pass, e.g. an activation-checkpoint recompute.

    Never while compiling: a compiled checkpoint's recompute is part of the compiled
    backward graph and does not run this Python code again.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _in_reentrant_checkpoint_forward() -> bool:
    """True inside the first forward of reentrant activation checkpointing.

    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` (also FSDP's
    ``checkpoint_wrapper`` with ``CheckpointImpl.REENTRANT``) runs that forward under
    ``no_grad`` inside ``CheckpointFunction.forward`` and the recompute, with gradients,
    inside backward. Nothing else marks it, so look for that function on the call stack;
    called only for training forwards with gradients disabled, which are rare.
    """
    if torch.compiler.is_compiling():
        return False
    target = torch.utils.checkpoint.CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False


class MoELayer(Float32Buffers):
    """A sparse Mixture-of-Experts feed-forward layer with a swappable router gradient.

    ``forward(x[..., d_model]) -> y[..., d_model]``; add the residual yourself.

    Args:
        d_model: input/output width.
        ffn_hidden: hidden width of each expert.
        num_experts: number of experts E.
        top_k: experts per token K (1 <= K <= E).
        estimator: a registered name (see ``available_estimators()``), a dotted path to an
            ``Estimator`` subclass, or an ``Estimator`` instance (copied, so each layer
            owns its state).
        backend: ``"auto"``, ``"torch"``, ``"loop"`` or ``"megablocks"``.
        activation: ``"swiglu"`` or ``"gelu"``.
        input_jitter: in training, multiply the hidden states by noise from
            U(1 - delta, 1 + delta) before router and experts (GRIN uses 0.01).
        estimator_args: keyword arguments for a named estimator.
        score_function: ``"softmax"`` (default) or ``"sigmoid"`` (DeepSeek-V3 and its
            descendants): how logits become the scores that choose the experts and give
            the gates (:class:`~lightning_moe.routing.Scoring`).
        n_group, topk_group: group-limited selection: only the experts of the
            ``topk_group`` best of ``n_group`` equal groups compete (a group scores the sum
            of its two best selection scores). ``n_group=1``: plain top-k.
        routed_scaling_factor: multiplies the gates (after renormalisation).
        router_bias: the router adds a learned bias [E] to its logits (gpt-oss).

    Estimators other than softmax top-k ones run only the default scoring (softmax,
    one group, scale 1); SparseMixer and SparseMixer-v2 are refused anything else.
    During training (and outside activation-checkpoint recomputation) each forward adds
    to :attr:`routing_stats`; auxiliary losses registered in :attr:`aux_losses` (by the
    balancing callbacks) are attached to the output so they reach the gradient.
    :attr:`check_finite` (``"logits"`` by default, ``"all"`` or ``"off"``) says which tensors
    recorded forwards check for NaN/inf: the router logits, or also the layer's input and
    output. The check is one reduction per tensor with no host synchronisation; its
    result is OR-ed into :attr:`nonfinite` (bool [3]: input, router logits, output) for
    :class:`~lightning_moe.callbacks.NonFiniteGuard` to act on.
    :attr:`selection_bias` ([E], in ``state_dict``) is added to the scores that choose
    the experts, not to the gate weights, when :attr:`use_selection_bias` is True and the
    estimator has ``supports_selection_bias`` (aux-loss-free balancing). The switch is
    saved with the bias (``selection_bias_enabled``), so a loaded model routes as it was
    trained; a ``state_dict`` without it (older checkpoints) loads with the bias off. The
    bias stays float32 whatever dtype the module is cast to.
    While :attr:`token_labels` holds a label per token (e.g. its domain; set it with
    :func:`labelled_tokens`), recorded forwards also count the (label, expert) pairs in
    ``routing_stats.label_expert_counts``.
    """

    float32_buffers = ("selection_bias",)

    def __init__(
        self,
        d_model: int,
        ffn_hidden: int,
        num_experts: int,
        top_k: int = 2,
        estimator: str | Estimator = "topk",
        backend: str = "auto",
        activation: str = "swiglu",
        input_jitter: float = 0.0,
        estimator_args: dict[str, Any] | None = None,
        score_function: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        router_bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("ffn_hidden", ffn_hidden), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r} is not valid; choose one of {ACTIVATIONS}")
        if not 0.0 <= input_jitter < 1.0:
            raise ConfigError(f"input_jitter must be in [0, 1), got {input_jitter!r}")

        self.scoring = Scoring(score_function, n_group, topk_group, routed_scaling_factor)
        self.scoring.check(num_experts, top_k)

        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.input_jitter = input_jitter
        self.router = Router(d_model, num_experts, bias=router_bias)
        self.estimator = self._build_estimator(estimator, estimator_args or {})
        self.estimator.use_scoring(self.scoring)
        self.estimator.bind(num_experts=num_experts, top_k=top_k, d_model=d_model)
        self.experts = Experts(d_model, ffn_hidden, num_experts, activation=activation, backend=backend)

        self.aux_losses: dict[str, AuxLossTerm] = {}
        self.aux_grad_scale: GradScale = 1.0
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias on the selection scores,
        # moved by :class:`~lightning_moe.callbacks.AuxLossFreeBalancing`. Always registered,
        # so checkpoints have the same keys with or without it; used only while
        # ``use_selection_bias`` is set and the estimator supports it.
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        # The switch is a buffer too: it belongs to the trained model, and the forward uses
        # it on the device without asking the host.
        self.register_buffer("selection_bias_enabled", torch.zeros((), dtype=torch.bool))
        self.routing_stats = RoutingStats()
        self._step_finished = False
        self.check_finite = "logits"
        self.nonfinite: Tensor | None = None
        self.token_labels: Tensor | None = None  # int64, one label in [0, num_token_labels) per token of x
        self.num_token_labels = 0

    @staticmethod
    def _build_estimator(estimator: str | Estimator, estimator_args: dict[str, Any]) -> Estimator:
        if isinstance(estimator, Estimator):
            if estimator_args:
                raise ConfigError("estimator_args are only used with an estimator name, not an instance")
            return copy.deepcopy(estimator)
        if isinstance(estimator, str):
            return ESTIMATOR_REGISTRY.get(estimator, **estimator_args)
        raise TypeError(f"estimator must be a registered name or an Estimator instance, got {type(estimator).__name__}")

    @property
    def use_selection_bias(self) -> bool:
        """Whether :attr:`selection_bias` steers routing (saved as ``selection_bias_enabled``)."""
        return bool(self.selection_bias_enabled)

    @use_selection_bias.setter
    def use_selection_bias(self, enabled: bool) -> None:
        self.selection_bias_enabled.fill_(bool(enabled))

    def add_missing_state(self, state_dict: dict[str, Any], prefix: str = "") -> None:
        """Bring a ``state_dict`` saved by an older version to this one, in place.

        Before ``selection_bias_enabled`` existed: the switch, off. Before SwiGLU's gate and
        up were one parameter: ``experts.w1`` and ``experts.v1`` merged into ``experts.w1``.
        """
        if prefix + "selection_bias" in state_dict and prefix + "selection_bias_enabled" not in state_dict:
            state_dict[prefix + "selection_bias_enabled"] = torch.zeros((), dtype=torch.bool)
        merge_gate_and_up(self.experts, state_dict, prefix + "experts.")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.add_missing_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def finish_step(self) -> None:
        """Mark :attr:`routing_stats` as consumed: the next training forward starts anew."""
        self._step_finished = True

    def discard_step(self) -> None:
        """Forget what this optimizer step's training forwards recorded (the step is skipped)."""
        self.routing_stats, self._step_finished = RoutingStats(), False
        self.estimator.discard_step()

    def _record_nonfinite(self, x_TD: Tensor, logits_TE: Tensor, y_TD: Tensor) -> None:
        if self.check_finite not in FINITE_CHECKS:
            raise ValueError(f"MoELayer.check_finite={self.check_finite!r} is not valid; choose one of {FINITE_CHECKS}")
        checked = (x_TD, logits_TE, y_TD) if self.check_finite == "all" else (None, logits_TE, None)
        no = torch.zeros((), dtype=torch.bool, device=logits_TE.device)
        flags = torch.stack([no if t is None else ~t.detach().isfinite().all() for t in checked])
        self.nonfinite = flags if self.nonfinite is None else self.nonfinite | flags

    def _recording(self) -> bool:
        """Whether this forward records statistics: a training forward, once per forward.

        Of the two forwards of activation checkpointing, the first records and the
        recompute inside backward does not; reentrant checkpointing runs that first
        forward without gradients, so it is recognised explicitly.
        """
        if not self.training or _in_backward():
            return False
        return torch.is_grad_enabled() or _in_reentrant_checkpoint_forward()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer input x has last dimension {x.shape[-1]}, expected d_model={self.d_model}")
        x_TD = x.reshape(-1, self.d_model)
        if self.training and self.input_jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1 - self.input_jitter, 1 + self.input_jitter)
            x_TD = x_TD * noise

        logits_TE = self.router(x_TD)
        if self.estimator.supports_selection_bias:
            # Switched on the device: a zero bias chooses exactly what no bias does.
            bias_E = torch.where(self.selection_bias_enabled, self.selection_bias, 0.0)
            routing = self.estimator.route(logits_TE, self.top_k, selection_bias=bias_E)
        else:
            routing = self.estimator.route(logits_TE, self.top_k)
        # A forward with no tokens (possible on one data-parallel rank) records nothing: its
        # per-token means would be NaN.
        recording = self._recording() and x_TD.shape[0] > 0
        y_TD, expert_stats = self.experts(
            x_TD,
            routing.indices,
            routing.weights,
            return_output_sums=recording and self.estimator.needs_expert_outputs,
        )
        correction_TD = self.estimator.output_correction(routing, x_TD, self.experts)
        if correction_TD is not None:
            y_TD = y_TD + correction_TD.to(y_TD.dtype)

        aux: dict[str, Tensor] = {}
        attach = self.training and torch.is_grad_enabled()
        if self.aux_losses and (attach or recording):
            aux = {name: term(routing, logits_TE, expert_stats.tokens_per_expert) for name, term in self.aux_losses.items()}
        if aux and attach:
            y_TD = attach_aux_loss(y_TD, torch.stack(list(aux.values())).sum(), self.aux_grad_scale)

        if recording and self.check_finite != "off":
            self._record_nonfinite(x_TD, logits_TE, y_TD)
        if recording:
            if self._step_finished:
                self.routing_stats, self._step_finished = RoutingStats(), False
            self.routing_stats.add(routing, logits_TE, expert_stats.tokens_per_expert, aux)
            if self.token_labels is not None:
                labels_T = self.token_labels.reshape(-1)
                if labels_T.shape[0] != x_TD.shape[0]:
                    raise ValueError(
                        f"MoELayer.token_labels has {labels_T.shape[0]} labels for {x_TD.shape[0]} tokens"
                    )
                self.routing_stats.add_label_counts(labels_T, routing.indices, self.num_token_labels, self.num_experts)
            if self.estimator.needs_expert_outputs:
                self.estimator.observe_expert_outputs(expert_stats)
        return y_TD.reshape(*x.shape[:-1], self.d_model)

    def extra_repr(self) -> str:
        scoring = "" if self.scoring.is_softmax_top_k else f", scoring={self.scoring}"
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k},"
            f" input_jitter={self.input_jitter}{scoring}"
        )


def moe_layers(module: nn.Module) -> list[tuple[str, MoELayer]]:
    """All ``MoELayer``s inside ``module``, with their qualified names, in module order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoELayer)]


def add_missing_layer_state(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Complete, in place, a ``state_dict`` of ``module`` saved by an older version.

    ``load_state_dict`` does this by itself; call it before comparing the keys of a
    checkpoint with the module's (as ``MoELanguageModel.on_load_checkpoint`` does).
    """
    for name, layer in moe_layers(module):
        layer.add_missing_state(state_dict, f"{name}." if name else "")


@contextlib.contextmanager
def labelled_tokens(module: nn.Module, labels: Tensor, num_labels: int) -> Iterator[None]:
    """Within the block, every MoELayer in ``module`` counts its routing per token label.

    ``labels`` (int64 in ``[0, num_labels)``) has one entry per token of the batch the
    block runs through ``module`` (e.g. ``[B, S]`` for ``input_ids [B, S]``).
    """
    layers = [layer for _, layer in moe_layers(module)]
    for layer in layers:
        layer.token_labels, layer.num_token_labels = labels, num_labels
    try:
        yield
    finally:
        for layer in layers:
            layer.token_labels = None
