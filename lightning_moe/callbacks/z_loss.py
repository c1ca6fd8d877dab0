"""The router z-loss as a callback."""

from __future__ import annotations

from torch import Tensor

from lightning_moe.callbacks.aux_loss import AuxLossCallback
from lightning_moe.losses import router_z_loss
from lightning_moe.routing import Routing


class RouterZLoss(AuxLossCallback):
    """Adds ``beta_z * mean_t (logsumexp z_t)^2`` to every MoELayer (ST-MoE eq. 5).

    Keeps router logits small, which keeps the float32 softmax well conditioned.
    ST-MoE uses ``weight=1e-3``.
    """

    name = "router_z_loss"

    def __init__(self, weight: float = 1e-3) -> None:
        super().__init__(weight)

    def loss(self, routing: Routing, logits_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        return router_z_loss(logits_TE=logits_TE)
