"""The router and the routing result every estimator returns.

Shape legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.errors import ConfigError

#: What :attr:`Scoring.score_function` may be.
SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass
class Routing:
    """What an estimator decided for a batch of tokens.

    ``weights`` carry the estimator's gradient to the router; ``probs`` is a distribution
    over all experts (with grad), used by balancing losses and telemetry: the plain
    softmax of the logits under softmax scoring; under sigmoid scoring, the sigmoid scores
    normalised to sum 1 per token (DeepSeek-V3's s'_{i,t} of its sequence-wise balance
    loss, Sec. 2.1.2 eq. 19), so the Switch loss, entropies and load shares keep their
    meaning. ``scores`` are the per-expert scores the gates are taken from (the sigmoid
    scores under sigmoid scoring; ``None`` when they are ``probs``): see
    :attr:`gate_scores`. ``telemetry`` holds detached scalars the estimator wants to
    report, e.g. the share of tokens whose router gradient is exactly zero.
    """

    indices: Tensor  # [T, K] int64
    weights: Tensor  # [T, K] float32
    probs: Tensor  # [T, E] float32
    telemetry: dict[str, Tensor] = field(default_factory=dict)
    scores: Tensor | None = None  # [T, E] float32

    @property
    def gate_scores(self) -> Tensor:
        """[T, E]: the scores the gates are taken from (softmax or sigmoid of the logits), with grad."""
        return self.probs if self.scores is None else self.scores


@dataclass(frozen=True)
class Scoring:
    """How router logits become expert scores, which experts they choose, and the gates.

    The one place this logic lives: every estimator that supports it (``supports_scoring``)
    routes through it, so none copies the group selection.

    - ``score_function="softmax"`` (default): s = softmax(z), the GShard / Mixtral gates.
      ``"sigmoid"``: s_i = sigmoid(z_i), each expert's affinity on its own (DeepSeek-V3,
      Sec. 2.1.2 eq. 15); the gates are then these scores, renormalised over the chosen
      set when the estimator renormalises (``norm_topk_prob``).
    - ``n_group`` / ``topk_group``: group-limited selection (DeepSeek-V3's node-limited
      routing, as its released router computes it): the E experts form ``n_group`` equal
      groups of consecutive experts; a group's score is the sum of its two highest
      selection scores (scores + selection bias); only the experts of the ``topk_group``
      best groups compete for the top-k. ``n_group=1`` is plain top-k.
    - ``routed_scaling_factor``: multiplies the gates, after renormalisation.

    The selection bias (aux-loss-free balancing) enters the selection scores only; the
    gates are always the unbiased scores.
    """

    score_function: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def check(self, num_experts: int, top_k: int) -> None:
        """``ConfigError`` naming the bad field unless this scoring can route ``top_k`` of ``num_experts``."""
        if self.score_function not in SCORE_FUNCTIONS:
            raise ConfigError(f"score_function={self.score_function!r} is not valid; choose one of {SCORE_FUNCTIONS}")
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if num_experts % self.n_group:
            raise ConfigError(f"n_group={self.n_group} must divide num_experts={num_experts}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if top_k > self.topk_group * (num_experts // self.n_group):
            raise ConfigError(
                f"top_k={top_k} is more than the {self.topk_group * (num_experts // self.n_group)} experts of"
                f" topk_group={self.topk_group} groups of {num_experts // self.n_group}; raise topk_group"
            )
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ConfigError(f"routed_scaling_factor must be a finite number > 0, got {scale!r}")

    @property
    def is_softmax_top_k(self) -> bool:
        """Plain softmax top-k, unscaled: what every estimator computes."""
        return self == Scoring()

    def scores(self, logits_TE: Tensor) -> Tensor:
        """[T, E] float32 scores of the logits (with grad)."""
        z_TE = logits_TE.float()
        return z_TE.softmax(dim=-1) if self.score_function == "softmax" else z_TE.sigmoid()

    def routing_probs(self, scores_TE: Tensor) -> Tensor:
        """What :attr:`Routing.probs` holds for these scores: themselves, or normalised to sum 1."""
        if self.score_function == "softmax":
            return scores_TE
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def select(
        self, scores_TE: Tensor, top_k: int, selection_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(scores [T, K], indices [T, K])`` of the ``top_k`` chosen experts (gates before
        renormalisation and scaling), gathered from the unbiased ``scores_TE``."""
        if selection_bias is None and self.n_group == 1:
            return scores_TE.topk(top_k, dim=-1)
        with torch.no_grad():
            choice_TE = scores_TE.detach() if selection_bias is None else scores_TE.detach() + selection_bias
            if self.n_group > 1:
                choice_TE = self._mask_groups(choice_TE)
            indices_TK = choice_TE.topk(top_k, dim=-1).indices
        return scores_TE.gather(1, indices_TK), indices_TK

    def _mask_groups(self, choice_TE: Tensor) -> Tensor:
        """``choice_TE`` with the experts outside each token's ``topk_group`` best groups at -inf."""
        num_tokens, num_experts = choice_TE.shape
        choice_TGS = choice_TE.view(num_tokens, self.n_group, num_experts // self.n_group)
        group_TG = choice_TGS.topk(min(2, choice_TGS.shape[-1]), dim=-1).values.sum(dim=-1)
        kept_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(
            1, group_TG.topk(self.topk_group, dim=-1).indices, True
        )
        return choice_TGS.masked_fill(~kept_TG[:, :, None], float("-inf")).view(num_tokens, num_experts)

    def gates(self, chosen_TK: Tensor, renormalize: bool) -> Tensor:
        """The gate weights [T, K] of the chosen scores: renormalised if asked, then scaled.

        The renormalisation adds 1e-20 to the sum, as DeepSeek-V3's router does for sigmoid
        scores that all underflow; for softmax sums (at least K/E) it changes no bit.
        """
        if renormalize:
            chosen_TK = chosen_TK / (chosen_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            chosen_TK = chosen_TK * self.routed_scaling_factor
        return chosen_TK

    def unselected_weights(self, routing: Routing, renormalize: bool) -> Tensor:
        """[T, E]: the weight function's values for the experts a token did NOT choose (0 where chosen).

        The dense mixture's weights outside the chosen set A (DenseMixer, Default MoE):
        w_i = c * s_i / stopgrad(S) for i not in A, with S = sum_{j in A} s_j when the gates
        are renormalised (1 otherwise) and c the routed scaling factor. The normaliser is
        detached, as in DenseMixer's released code, so the chosen gates' gradient stays
        Top-K's exactly.
        """
        scores_TE = routing.gate_scores
        with torch.no_grad():
            unselected_TE = torch.ones_like(scores_TE, dtype=torch.bool).scatter(1, routing.indices, False)
            scale = self.routed_scaling_factor
            if renormalize:
                scale_T1 = scale / (scores_TE.gather(1, routing.indices).sum(dim=-1, keepdim=True) + 1e-20)
            else:
                scale_T1 = torch.full((), scale, dtype=scores_TE.dtype, device=scores_TE.device)
        return scores_TE * unselected_TE * scale_T1


class Router(nn.Module):
    """Linear map from hidden states to expert logits, always computed in float32.

    Router precision matters for every estimator (small logit gaps decide which expert
    wins and the jitter masks compare logits to within eps), so autocast is switched off
    here and the input and weight are promoted to float32.

    ``bias=True`` adds a learned per-expert bias [E] to the logits (gpt-oss's router), zero at
    first, promoted to float32 like the weight; every estimator then routes the biased logits.
    Without it :attr:`bias` is None and the logits are ``x W^T`` as before.
    """

    def __init__(self, d_model: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            bias_E = None if self.bias is None else self.bias.float()
            return F.linear(x_TD.float(), self.weight.float(), bias_E)
