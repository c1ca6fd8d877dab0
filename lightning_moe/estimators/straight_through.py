"""Straight-through Top-K: unit gates in the forward pass, the softmax gate's gradient backward.

A control for the estimator study: it has the forward scale of SparseMixer-v2 at
``jitter_eps=0.01`` (most of whose gates are exactly 1, a hard top-k) and the router
gradient of plain Top-K, so a difference between the two that this estimator shares is
a forward-scale effect, not a gradient-quality one.

Shape legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from torch import Tensor

from lightning_moe.estimators.base import Estimator, scored_routing
from lightning_moe.estimators.registry import register_estimator
from lightning_moe.routing import Routing


@register_estimator(
    "straight_through",
    description="Top-K with unit forward gates and the softmax gates' gradient (straight-through).",
)
class StraightThroughTopK(Estimator):
    """Top-K routing with forward gates 1 and the router gradient of the softmax gates.

    With pi = softmax(z) and D_j the j-th of the top-k experts, the gate is
    ``w_j = 1 + pi_{D_j} - stopgrad(pi_{D_j})``: its value is exactly 1 (every chosen
    expert's output enters unscaled) and ``dL/dz = sum_j G_j * d pi_{D_j} / dz``, the
    gradient plain (unrenormalised) Top-K gives its gates, with ``G_j = dL/dw_j``.
    Expert gradients are not scaled by a gate. Supports a selection bias and the layer's
    :class:`~lightning_moe.routing.Scoring` like ``topk``; under sigmoid scoring pi is the
    sigmoid scores. The forward gates stay exactly 1 (no routed scaling factor: unit
    gates are what this control is).
    """

    supports_selection_bias = True
    supports_scoring = True

    def route(self, logits_TE: Tensor, top_k: int, selection_bias: Tensor | None = None) -> Routing:
        scores_TE = self.scoring.scores(logits_TE)
        gates_TK, indices_TK = self.scoring.select(scores_TE, top_k, selection_bias)
        weights_TK = 1.0 + (gates_TK - gates_TK.detach())
        return scored_routing(self.scoring, indices_TK, weights_TK, scores_TE)
