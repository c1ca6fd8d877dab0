"""lightning-moe: sparse Mixture-of-Experts with swappable router gradient estimators.

The public names below are imported when first used (PEP 562 ``__getattr__``), not by
``import lightning_moe``: every submodule import runs this file first, and
``lightning-moe --help`` should not wait seconds for torch and Lightning. The first use
of any of them imports them all, as an eager import did, which also registers the
``moe_expert_parallel`` strategies with Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_moe.estimators import ESTIMATOR_REGISTRY, Estimator, available_estimators, register_estimator
    from lightning_moe.experts import Experts, ExpertStats
    from lightning_moe.layer import MoELayer, RoutingStats, moe_layers
    from lightning_moe.losses import attach_aux_loss, load_balancing_loss, router_z_loss
    from lightning_moe.routing import Router, Routing, Scoring
    from lightning_moe.strategies import ExpertParallelFSDP2Strategy, ExpertParallelStrategy

__version__ = "0.1.0"

#: Each public name and the module it comes from.
_EXPORTS = {
    "ESTIMATOR_REGISTRY": "lightning_moe.estimators",
    "Estimator": "lightning_moe.estimators",
    "ExpertParallelFSDP2Strategy": "lightning_moe.strategies",  # registers "moe_expert_parallel_fsdp2"
    "ExpertParallelStrategy": "lightning_moe.strategies",  # importing it registers "moe_expert_parallel"
    "ExpertStats": "lightning_moe.experts",
    "Experts": "lightning_moe.experts",
    "MoELayer": "lightning_moe.layer",
    "Router": "lightning_moe.routing",
    "Routing": "lightning_moe.routing",
    "Scoring": "lightning_moe.routing",
    "RoutingStats": "lightning_moe.layer",
    "attach_aux_loss": "lightning_moe.losses",
    "available_estimators": "lightning_moe.estimators",
    "load_balancing_loss": "lightning_moe.losses",
    "moe_layers": "lightning_moe.layer",
    "register_estimator": "lightning_moe.estimators",
    "router_z_loss": "lightning_moe.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for export, module in _EXPORTS.items():
        globals()[export] = getattr(importlib.import_module(module), export)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
