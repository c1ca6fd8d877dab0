"""Default MoE: a dense router gradient from stand-in outputs for the experts a token skipped.

Panda et al., 2025, "Dense Backpropagation Improves Training for Sparse Mixture-of-Experts".

Shape legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from lightning_moe.errors import ConfigError
from lightning_moe.estimators.base import Estimator, scored_routing
from lightning_moe.estimators.registry import register_estimator
from lightning_moe.float32_buffers import Float32Buffers
from lightning_moe.routing import Routing

if TYPE_CHECKING:
    from lightning_moe.experts import Experts, ExpertStats

WEIGHTED_NORMALIZERS = ("weight_sum", "token_count")

NO_UPDATER_MESSAGE = (
    "DefaultMoE is training, but nothing updates its default outputs: they would stay zero and the"
    " router would silently train without its dense gradient. Add"
    " `lightning_moe.callbacks.DefaultOutputEMA()` to `Trainer(callbacks=[...])`, or, in your own"
    " training loop, call `estimator.attach_updater()` once and `estimator.update_defaults()` after"
    " every optimizer step (for every MoELayer: `layer.estimator`)."
)


def check_beta(beta: float) -> float:
    """``beta`` as a float, or ``ValueError`` when it is not an EMA decay in [0, 1)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ConfigError(f"beta must be a float in [0, 1), got {beta!r}")
    return float(beta)


@register_estimator(
    "default_moe",
    description="Top-K softmax gates plus EMA default outputs for the unselected experts (dense router gradient).",
)
class DefaultMoE(Float32Buffers, Estimator):
    """Top-K routing whose unselected experts contribute an EMA of their past outputs.

    With pi = softmax(z) over all E experts and A = the top-k of pi (gates not
    renormalised), the layer output is (Panda et al., 2025, Sec. 3)::

        y = sum_{i in A} pi_i E_i(x) + sum_{i not in A} pi_i Ehat_i

    ``Ehat`` (:attr:`default_outputs`, [E, D], zero-initialised, saved in ``state_dict``,
    float32 whatever dtype the module is cast to) is a buffer, so the experts get no gradient through the second term while the router
    gets a gradient for every expert: dL/dpi_i = <dL/dy, Ehat_i> for i not in A. The
    second term is one [T, E] x [E, D] product with the chosen entries zeroed.

    Once per optimizer step, :meth:`update_defaults` moves every expert that received
    tokens in that step towards the mean of its outputs over the whole step (all
    micro-batches, all data-parallel ranks)::

        Ehat_i <- beta * Ehat_i + (1 - beta) * mean_i

    With a selection bias (aux-loss-free balancing), A is the top-k of pi + bias and
    every expert outside A, whatever its pi, gets the default term.

    Under the layer's sigmoid scoring (DeepSeek-V3 style, outside the paper) pi_i is
    sigmoid(z_i), A comes from the layer's (group-limited) selection, and both sums are
    multiplied by the routed scaling factor c: y = c * (sum_{i in A} s_i E_i(x) +
    sum_{i not in A} s_i Ehat_i), the dense mixture DenseMixer differentiates with Ehat_i
    in place of E_i(x).

    Experts without tokens keep their value. Something must call it:
    :class:`lightning_moe.callbacks.DefaultOutputEMA` does under a Lightning ``Trainer``;
    a hand-written loop calls :meth:`attach_updater` once and :meth:`update_defaults`
    after every optimizer step. A training forward with gradients and no updater attached
    raises ``RuntimeError`` rather than train with defaults that never move.

    Args:
        beta: EMA decay. The paper's reference is 0.9 for 8 experts at k = 1 or 2; sparser
            settings (more experts per selected one) see each expert less often and want a
            lower beta.
        weighted: average pi_i * E_i(x) instead of E_i(x), which keeps the defaults closer
            to the outputs the router actually weights and makes beta matter less.
        weighted_normalizer: for ``weighted=True``, divide the step's sum of
            pi_i * E_i(x) by the sum of pi_i over those pairs (``"weight_sum"``: a
            gate-weighted mean of E_i(x)) or by their count (``"token_count"``: the plain
            mean of pi_i * E_i(x)). The paper does not say; ``"weight_sum"`` is the default
            because it keeps Ehat_i on the scale of E_i(x), which is what the output term
            pi_i * Ehat_i stands in for. ``"token_count"`` applies the gate twice and so
            shrinks the defaults by roughly the expert's typical gate.
        use_defaults_in_eval: add the (frozen) default term at evaluation too, so eval
            computes the same function as training.
        forward_defaults: add the default term's value to the output. ``False`` keeps
            only its gradient (the term enters as ``c - stopgrad(c)``, which is 0): the
            router gets the same dense gradient while the forward pass is plain Top-K, a
            control that separates the method's gradient from the stale bias its defaults
            add to the forward pass. Not in the paper.
        renormalize: must stay False; renormalised top-k gates are outside the method.
    """

    needs_expert_outputs = True
    supports_selection_bias = True
    supports_scoring = True
    float32_buffers = ("default_outputs",)
    default_outputs: Tensor
    default_initialised: Tensor

    def __init__(
        self,
        beta: float = 0.9,
        weighted: bool = False,
        weighted_normalizer: str = "weight_sum",
        use_defaults_in_eval: bool = True,
        renormalize: bool = False,
        forward_defaults: bool = True,
    ) -> None:
        super().__init__()
        if renormalize:
            raise ConfigError(
                "renormalize=True is not supported by DefaultMoE: its gates are the softmax over all experts,"
                " and renormalised top-k is outside the method. Use estimator='topk' for renormalised gates."
            )
        if weighted_normalizer not in WEIGHTED_NORMALIZERS:
            raise ConfigError(
                f"weighted_normalizer={weighted_normalizer!r} is not valid; choose one of {WEIGHTED_NORMALIZERS}"
            )
        self.beta = check_beta(beta)
        self.weighted = bool(weighted)
        self.weighted_normalizer = weighted_normalizer
        self.use_defaults_in_eval = bool(use_defaults_in_eval)
        self.forward_defaults = bool(forward_defaults)
        self.updater_attached = False
        # Plain attributes, not buffers: DDP broadcasts every buffer from rank 0 before a
        # forward that follows a synchronised one, which would overwrite the other ranks'
        # partial sums whenever a step's micro-batches are not all run under no_sync.
        self._step_sums_EC: Tensor | None = None  # [E, D + 1]: output sums | normaliser
        self._weight_sum_E: Tensor | None = None  # [E] gate sums of the latest training route

    def bind(self, *, num_experts: int, top_k: int, d_model: int) -> None:
        self.register_buffer("default_outputs", torch.zeros(num_experts, d_model, dtype=torch.float32))
        self.register_buffer("default_initialised", torch.zeros(num_experts, dtype=torch.bool))

    def attach_updater(self, attached: bool = True) -> None:
        """Declare that :meth:`update_defaults` is called after every optimizer step.

        :class:`~lightning_moe.callbacks.DefaultOutputEMA` does this for you; call it
        yourself only when you drive :meth:`update_defaults` from your own loop.
        """
        self.updater_attached = attached

    def _gate_normalised(self) -> bool:
        return self.weighted and self.weighted_normalizer == "weight_sum"

    def route(self, logits_TE: Tensor, top_k: int, selection_bias: Tensor | None = None) -> Routing:
        if self.training and torch.is_grad_enabled() and not self.updater_attached:
            raise ConfigError(NO_UPDATER_MESSAGE)
        scores_TE = self.scoring.scores(logits_TE)
        chosen_TK, indices_TK = self.scoring.select(scores_TE, top_k, selection_bias)
        weights_TK = self.scoring.gates(chosen_TK, renormalize=False)
        if self.training and self._gate_normalised():
            gates_N = weights_TK.detach().reshape(-1)
            self._weight_sum_E = gates_N.new_zeros(scores_TE.shape[1]).index_add_(0, indices_TK.reshape(-1), gates_N)
        with torch.no_grad():
            telemetry = {
                "default_output_norm": self.default_outputs.float().norm(dim=1).mean(),
                "defaults_initialised_fraction": self.default_initialised.float().mean(),
            }
        return scored_routing(self.scoring, indices_TK, weights_TK, scores_TE, telemetry=telemetry)

    def output_correction(
        self, routing: Routing, x_TD: Tensor | None = None, experts: Experts | None = None
    ) -> Tensor | None:
        if not (self.training or self.use_defaults_in_eval) or not (self.forward_defaults or torch.is_grad_enabled()):
            return None
        unselected_TE = self.scoring.unselected_weights(routing, renormalize=False)
        # Float32 like the router: this term carries the router's whole dense gradient.
        with torch.autocast(device_type=unselected_TE.device.type, enabled=False):
            correction_TD = unselected_TE @ self.default_outputs.detach().float()
        if self.forward_defaults:
            return correction_TD
        return correction_TD - correction_TD.detach()

    def observe_expert_outputs(self, stats: ExpertStats) -> None:
        # Also checked here: the first forward of reentrant activation checkpointing records
        # but runs without gradients, so route() does not check it.
        if not self.updater_attached:
            raise ConfigError(NO_UPDATER_MESSAGE)
        sum_ED = stats.weighted_output_sum if self.weighted else stats.output_sum
        if sum_ED is None:
            raise ValueError("DefaultMoE needs per-expert output sums from the experts backend (ExpertStats)")
        if self._gate_normalised():
            if self._weight_sum_E is None:
                raise RuntimeError("DefaultMoE.observe_expert_outputs was called without a training route() first")
            normaliser_E, self._weight_sum_E = self._weight_sum_E, None
        else:
            normaliser_E = stats.tokens_per_expert
        step_EC = torch.cat([sum_ED.float(), normaliser_E.float()[:, None]], dim=1)
        self._step_sums_EC = step_EC if self._step_sums_EC is None else self._step_sums_EC.add_(step_EC)

    def discard_step(self) -> None:
        self._step_sums_EC, self._weight_sum_E = None, None

    @torch.no_grad()
    def update_defaults(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Apply this optimizer step's EMA update and start a new step.

        Args:
            reduce: sums a tensor over the data-parallel ranks and returns the result
                (e.g. an all-reduce with SUM). It receives the step's per-expert output
                sums and normalisers as one [E, D + 1] tensor, so the mean is over the
                global batch. Every rank must call this, even with nothing observed.
        """
        num_experts, d_model = self.default_outputs.shape
        sums_EC = self._step_sums_EC
        self._step_sums_EC = None
        if sums_EC is None:
            sums_EC = self.default_outputs.new_zeros(num_experts, d_model + 1, dtype=torch.float32)
        if reduce is not None:
            sums_EC = reduce(sums_EC)
        sum_ED, normaliser_E = sums_EC[:, :d_model], sums_EC[:, d_model]
        seen_E = normaliser_E > 0
        mean_ED = sum_ED / normaliser_E.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        current_ED = self.default_outputs.float()
        ema_ED = self.beta * current_ED + (1.0 - self.beta) * mean_ED
        self.default_outputs.copy_(torch.where(seen_E[:, None], ema_ED, current_ED))
        self.default_initialised.logical_or_(seen_E)

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, weighted={self.weighted}, weighted_normalizer={self.weighted_normalizer!r}, "
            f"use_defaults_in_eval={self.use_defaults_in_eval}, forward_defaults={self.forward_defaults}"
        )
