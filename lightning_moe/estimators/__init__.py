"""Gradient estimators for the router, chosen by name through :data:`ESTIMATOR_REGISTRY`.

Every module in this package is imported here, so adding an estimator means adding one
file that registers itself.
"""

import importlib
import pkgutil

from lightning_moe.estimators.base import Estimator
from lightning_moe.estimators.registry import ESTIMATOR_REGISTRY, EstimatorRegistry, register_estimator

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

available_estimators = ESTIMATOR_REGISTRY.available_estimators

__all__ = ["ESTIMATOR_REGISTRY", "Estimator", "EstimatorRegistry", "available_estimators", "register_estimator"]
