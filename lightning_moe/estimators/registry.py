"""Estimators chosen by name, modelled on Lightning's ``StrategyRegistry``."""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any, Callable

from lightning_moe.errors import ConfigError
from lightning_moe.estimators.base import Estimator


def _construct(name: str, cls: type[Estimator], kwargs: dict[str, Any]) -> Estimator:
    """``cls(**kwargs)``, or a one-line :class:`ConfigError` naming the estimator and the bad argument.

    The one place estimator arguments are checked: unknown names and wrong types here, from
    the constructor's signature and annotations (so a new estimator gets the checks by
    annotating its arguments), and the range checks each constructor makes, prefixed here
    with the estimator's name. A wrong type would otherwise surface as a ``TypeError`` deep
    inside the constructor (``0.0 <= '0.1'``), or not at all.
    """
    prefix = f"estimator_args for estimator={name!r}"
    parameters = {
        arg: param
        for arg, param in inspect.signature(cls).parameters.items()
        if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)  # nn.Module's own (*args, **kwargs)
    }
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        takes = f"takes {', '.join(parameters)}" if parameters else "takes no arguments"
        raise ConfigError(f"{prefix}: unknown argument {', '.join(unknown)}; {cls.__name__} {takes}")
    hints = typing.get_type_hints(cls.__init__)
    for arg, value in kwargs.items():
        expected = hints.get(arg, Any)
        if not _is_instance(value, expected):
            raise ConfigError(f"{prefix}: {arg} must be {_type_words(expected)}, got {_value_words(value)}")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a constructor's range check: say which estimator it is about
        raise ConfigError(f"{prefix}: {err}") from None


def _is_instance(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits the annotation ``expected`` (a YAML/JSON value: no implicit conversions).

    An ``int`` is a ``float`` (``0`` for ``0.0``); a ``bool`` is neither an ``int`` nor a ``float``.
    """
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if expected is None or expected is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, option) for option in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    cls = origin or expected
    return not isinstance(cls, type) or isinstance(value, cls)


def _type_words(expected: Any) -> str:
    words = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "null"}
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(option) for option in typing.get_args(expected))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(option) for option in typing.get_args(expected))
    if expected in words:
        return words[expected]
    return f"a {getattr(origin or expected, '__name__', expected)}"


def _value_words(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r} (a {type(value).__name__})"


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
