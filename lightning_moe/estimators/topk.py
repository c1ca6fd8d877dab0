"""Top-K routing: GShard / Mixtral, and Switch when k = 1."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.errors import ConfigError
from lightning_moe.estimators.base import Estimator, scored_routing
from lightning_moe.estimators.registry import register_estimator
from lightning_moe.routing import Routing


@register_estimator("topk", description="Top-K softmax gates with plain autograd (Switch for k=1).")
class TopK(Estimator):
    """Top-K softmax gating; the router gradient is plain autograd through the K chosen gates.

    Args:
        renormalize: divide the chosen gates by their sum (Mixtral); off by default, as
            in GShard / Switch, where gates are the softmax over all experts.
        jitter_eps: in training, multiply the logits by noise drawn from U(1 - eps, 1 + eps)
            before selection (Switch Transformer's router jitter, applied to the logits).

    Supports a selection bias (aux-loss-free balancing): the experts are the top-k of
    softmax + bias, the gates the unbiased softmax values of those experts. Routes with the
    layer's :class:`~lightning_moe.routing.Scoring`: under ``score_function="sigmoid"`` the
    gates are the chosen sigmoid scores (renormalised when ``renormalize``, DeepSeek-V3's
    ``norm_topk_prob``), under group-limited selection the experts come from the best
    groups, and the gates are multiplied by the routed scaling factor.
    """

    supports_selection_bias = True
    supports_scoring = True

    def __init__(self, renormalize: bool = False, jitter_eps: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= jitter_eps < 1.0:
            raise ConfigError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        self.renormalize = renormalize
        self.jitter_eps = jitter_eps

    def route(self, logits_TE: Tensor, top_k: int, selection_bias: Tensor | None = None) -> Routing:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(logits_TE).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            logits_TE = logits_TE * noise
        scores_TE = self.scoring.scores(logits_TE)
        chosen_TK, indices_TK = self.scoring.select(scores_TE, top_k, selection_bias)
        weights_TK = self.scoring.gates(chosen_TK, self.renormalize)
        return scored_routing(self.scoring, indices_TK, weights_TK, scores_TE)

