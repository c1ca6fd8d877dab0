"""The estimator interface: how routing decisions and their router gradient are made."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from lightning_moe.errors import ConfigError
from lightning_moe.routing import Routing, Scoring

if TYPE_CHECKING:
    from lightning_moe.experts import Experts, ExpertStats


class Estimator(nn.Module):
    """Turns router logits into a :class:`Routing` whose ``weights`` carry the gradient.

    An estimator is an ``nn.Module`` so that any state it holds (EMA buffers, learnable
    scales) is placed on the right device and saved in ``state_dict``. Each ``MoELayer``
    owns its own instance. To add one: subclass, implement :meth:`route`, and register it
    with ``@register_estimator("name")`` in a new file of this package.
    """

    #: Set by estimators that need per-expert sums of expert outputs (no grad) from the
    #: experts backend on every training forward (Default MoE's EMA statistics).
    needs_expert_outputs: ClassVar[bool] = False

    #: Set by estimators whose :meth:`route` accepts ``selection_bias`` (aux-loss-free
    #: balancing). Sampling-based estimators leave it False: a bias on the scores would
    #: change the distribution their gradient estimate is derived for.
    supports_selection_bias: ClassVar[bool] = False

    #: Set by estimators whose :meth:`route` takes its scores, expert choice and gates from
    #: :attr:`scoring` (sigmoid scores, group-limited selection, a routed scaling factor).
    #: The others run only softmax top-k and are refused anything else.
    supports_scoring: ClassVar[bool] = False
    #: Why an estimator without ``supports_scoring`` runs softmax top-k only (for its refusal).
    softmax_only_reason: ClassVar[str] = "it computes its routing from a softmax of the logits itself"

    #: How the owning layer scores and selects experts (:meth:`use_scoring`); softmax top-k by default.
    scoring: Scoring = Scoring()

    def use_scoring(self, scoring: Scoring) -> None:
        """Called by the owning layer before :meth:`bind`: route with ``scoring`` from now on.

        ``ConfigError`` naming the field when the estimator runs softmax top-k only and
        ``scoring`` is anything else.
        """
        if not (self.supports_scoring or scoring.is_softmax_top_k):
            # topk_group <= n_group, so a scoring other than the default differs in one of these.
            field = next(f for f in ("score_function", "n_group", "routed_scaling_factor")
                         if getattr(scoring, f) != getattr(Scoring(), f))
            raise ConfigError(
                f"{field}={getattr(scoring, field)!r}: estimator {type(self).__name__} is defined for softmax top-k"
                f" routing only ({self.softmax_only_reason}); use topk, straight_through, densemixer or default_moe"
            )
        self.scoring = scoring

    def bind(self, *, num_experts: int, top_k: int, d_model: int) -> None:
        """Called once by the owning layer: validate the combination, allocate state.

        Raise ``ValueError`` naming the bad field for combinations the estimator does not
        support (e.g. a top-1 method asked for ``top_k=2``).
        """

    def route(self, logits_TE: Tensor, top_k: int, selection_bias: Tensor | None = None) -> Routing:
        """Pick ``top_k`` experts per token from float32 ``logits_TE``; honour ``self.training``.

        Must not modify ``logits_TE`` in place. ``selection_bias`` ([E]) is passed only to
        estimators with :attr:`supports_selection_bias`; they add it to the scores that
        choose the experts and take the weights from the unbiased scores
        (:func:`select_top_k`).
        """
        raise NotImplementedError

    def output_correction(
        self, routing: Routing, x_TD: Tensor | None = None, experts: Experts | None = None
    ) -> Tensor | None:
        """An optional [T, D] term added to the layer output.

        Default MoE adds its default outputs here; DenseMixer adds a term whose value is 0
        and whose backward runs the unselected ``experts`` on ``x_TD`` (the layer's
        router/expert input) for the router's dense gradient.
        """
        return None

    def observe_expert_outputs(self, stats: ExpertStats) -> None:
        """Receives the backend's per-expert output sums when ``needs_expert_outputs``."""

    def discard_step(self) -> None:
        """Forget what this optimizer step's training forwards accumulated (the step is skipped)."""


def scored_routing(scoring: Scoring, indices_TK: Tensor, weights_TK: Tensor, scores_TE: Tensor, **kwargs) -> Routing:
    """The :class:`Routing` of gates taken from ``scores_TE``: ``probs`` per :meth:`Scoring.routing_probs`."""
    probs_TE = scoring.routing_probs(scores_TE)
    return Routing(
        indices=indices_TK, weights=weights_TK, probs=probs_TE, scores=None if probs_TE is scores_TE else scores_TE, **kwargs
    )
