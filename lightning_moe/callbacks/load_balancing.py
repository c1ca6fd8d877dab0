"""The Switch / GShard load-balancing loss as a callback."""

from __future__ import annotations

from torch import Tensor

from lightning_moe.callbacks.aux_loss import AuxLossCallback
from lightning_moe.distributed import data_parallel_sum
from lightning_moe.errors import ConfigError
from lightning_moe.losses import load_balancing_loss
from lightning_moe.routing import Routing

SCOPES = ("micro_batch", "global")


class LoadBalancingLoss(AuxLossCallback):
    """Adds ``alpha * E * sum_i f_i P_i`` to every MoELayer (Switch Transformer eq. 4).

    Args:
        alpha: loss weight (Switch uses 0.01).
        scope: ``"micro_batch"`` computes the assignment shares f_i from the local
            micro-batch; ``"global"`` sums the counts over all data-parallel ranks first
            (GRIN's global balancing), while P_i stays local so gradients stay local.
    """

    name = "load_balancing_loss"

    def __init__(self, alpha: float = 0.01, scope: str = "micro_batch") -> None:
        super().__init__(alpha)
        if scope not in SCOPES:
            raise ConfigError(f"LoadBalancingLoss: scope={scope!r} is not valid; choose one of {SCOPES}")
        self.scope = scope

    def loss(self, routing: Routing, logits_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        counts_E = tokens_per_expert_E
        if self.scope == "global":
            counts_E = data_parallel_sum(counts_E.clone())
        return load_balancing_loss(probs_TE=routing.probs, tokens_per_expert_E=counts_E)
