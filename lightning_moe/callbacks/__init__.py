"""Router callbacks for ``Trainer(callbacks=[...])`` on any LightningModule with MoELayers."""

from lightning_moe.callbacks.aux_loss import AuxLossCallback
from lightning_moe.callbacks.aux_loss_free import AuxLossFreeBalancing
from lightning_moe.callbacks.default_output_ema import DefaultOutputEMA
from lightning_moe.callbacks.gradient_fidelity import RouterGradientFidelity
from lightning_moe.callbacks.guards import NonFiniteGuard
from lightning_moe.callbacks.load_balancing import LoadBalancingLoss
from lightning_moe.callbacks.routing_monitor import RoutingMonitor
from lightning_moe.callbacks.z_loss import RouterZLoss
from lightning_moe.checkpointing import PreemptionCheckpoint, ResumableEpochEnd, ResumableRNG

__all__ = [
    "AuxLossCallback",
    "AuxLossFreeBalancing",
    "DefaultOutputEMA",
    "LoadBalancingLoss",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "ResumableEpochEnd",
    "ResumableRNG",
    "RouterGradientFidelity",
    "RouterZLoss",
    "RoutingMonitor",
]
