"""lightning-moe: sparse Mixture-of-Experts with swappable router gradient estimators."""

from lightning_moe.estimators import ESTIMATOR_REGISTRY, Estimator, available_estimators, register_estimator
from lightning_moe.experts import Experts, ExpertStats
from lightning_moe.layer import MoELayer, RoutingStats, moe_layers
from lightning_moe.losses import attach_aux_loss, load_balancing_loss, router_z_loss
from lightning_moe.routing import Router, Routing
from lightning_moe.strategies import ExpertParallelStrategy  # registers "moe_expert_parallel"

__version__ = "0.1.0"

__all__ = [
    "ESTIMATOR_REGISTRY",
    "Estimator",
    "ExpertParallelStrategy",
    "ExpertStats",
    "Experts",
    "MoELayer",
    "Router",
    "Routing",
    "RoutingStats",
    "attach_aux_loss",
    "available_estimators",
    "load_balancing_loss",
    "moe_layers",
    "register_estimator",
    "router_z_loss",
]
