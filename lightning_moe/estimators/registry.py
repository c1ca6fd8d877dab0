"""Estimators chosen by name, modelled on Lightning's ``StrategyRegistry``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from lightning_moe.errors import ConfigError
from lightning_moe.estimators.base import Estimator


def _construct(name: str, cls: type[Estimator], kwargs: dict[str, Any]) -> Estimator:
    """``cls(**kwargs)``, or a :class:`ConfigError` naming the arguments ``cls`` does not take."""
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise ConfigError(
            f"estimator_args for estimator={name!r}: {err};"
            f" {cls.__name__} takes {', '.join(accepted) or 'no arguments'}"
        ) from None
    return cls(**kwargs)


class EstimatorRegistry(dict):
    """Maps a name to an estimator class, its description and default init arguments.

    ``get`` also accepts a dotted import path (``"my_pkg.estimators.MyEstimator"``), so a
    recipe can name an estimator that lives outside this package without registering it.
    """

    def register(
        self,
        name: str,
        estimator: type[Estimator] | None = None,
        description: str | None = None,
        override: bool = False,
        **init_params: Any,
    ) -> Callable | type[Estimator]:
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty str, got {name!r}")
        if name in self and not override:
            raise ValueError(
                f"Estimator {name!r} is already registered; pass override=True to replace it."
            )

        def do_register(cls: type[Estimator]) -> type[Estimator]:
            if not (isinstance(cls, type) and issubclass(cls, Estimator)):
                raise TypeError(f"{cls!r} is not a subclass of lightning_moe.estimators.Estimator")
            self[name] = {
                "estimator": cls,
                "description": description or (cls.__doc__ or "").strip().split("\n")[0],
                "init_params": init_params,
            }
            return cls

        if estimator is not None:
            return do_register(estimator)
        return do_register

    def get(self, name: str, **overrides: Any) -> Estimator:
        """A new estimator instance for ``name`` (registry name or dotted class path)."""
        if name in self:
            entry = self[name]
            return _construct(name, entry["estimator"], {**entry["init_params"], **overrides})
        if "." in name:
            module_name, _, class_name = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as err:
                raise ConfigError(f"estimator={name!r}: cannot import it ({err}).") from err
            if not (isinstance(cls, type) and issubclass(cls, Estimator)):
                raise ConfigError(f"estimator={name!r} is not an Estimator subclass.")
            return _construct(name, cls, overrides)
        raise ConfigError(
            f"Unknown estimator={name!r}. Valid names: {', '.join(self.available_estimators())}"
            " (or a dotted path to an Estimator subclass)."
        )

    def remove(self, name: str) -> None:
        self.pop(name)

    def available_estimators(self) -> list[str]:
        return sorted(self.keys())

    def __str__(self) -> str:
        return "Registered estimators: " + ", ".join(self.available_estimators())


ESTIMATOR_REGISTRY = EstimatorRegistry()
register_estimator = ESTIMATOR_REGISTRY.register
