"""The estimator interface: how routing decisions and their router gradient are made."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from lightning_moe.routing import Routing

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


def select_top_k(probs_TE: Tensor, top_k: int, selection_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(weights [T, K], indices [T, K])``: the ``top_k`` experts of ``probs_TE + selection_bias``.

    The weights are gathered from the unbiased ``probs_TE``, so the bias changes which
    experts are chosen but never the gates or their gradient. The bias is added to the
    softmax scores, as DeepSeek-V3 adds it to its affinity scores (Sec. 2.1.2), so
    ``gamma`` is on the scale of a routing probability.
    """
    if selection_bias is None:
        return probs_TE.topk(top_k, dim=-1)
    indices_TK = (probs_TE.detach() + selection_bias).topk(top_k, dim=-1).indices
    return probs_TE.gather(1, indices_TK), indices_TK
