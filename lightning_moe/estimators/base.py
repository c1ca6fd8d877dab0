"""The estimator interface: how routing decisions and their router gradient are made."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from lightning_moe.routing import Routing

if TYPE_CHECKING:
    from lightning_moe.experts import ExpertStats


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

    def bind(self, *, num_experts: int, top_k: int, d_model: int) -> None:
        """Called once by the owning layer: validate the combination, allocate state.

        Raise ``ValueError`` naming the bad field for combinations the estimator does not
        support (e.g. a top-1 method asked for ``top_k=2``).
        """

    def route(self, logits_TE: Tensor, top_k: int) -> Routing:
        """Pick ``top_k`` experts per token from float32 ``logits_TE``; honour ``self.training``.

        Must not modify ``logits_TE`` in place.
        """
        raise NotImplementedError

    def output_correction(self, routing: Routing) -> Tensor | None:
        """An optional [T, D] term added to the layer output (Default MoE's default outputs)."""
        return None

    def observe_expert_outputs(self, stats: ExpertStats) -> None:
        """Receives the backend's per-expert output sums when ``needs_expert_outputs``."""
