"""Name registries for pluggable functions (rewards, advantage estimators, losses, aggregations).

Besides the registered names, a registry takes an import path, ``module:function``: settings and
command lines can then name a function of the user's own (``reward = "my_rewards:exact"``, with
``my_rewards`` importable, on ``PYTHONPATH`` say)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from npr_graph.typecheck import type_problems

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions by name: ``@registry.register("name")``, ``registry.get("name")``, ``names()``.
    A later registration under a taken name replaces the earlier one. ``returns``: the type a
    function of the user's own (an import path) must return; its calls are checked."""

    def __init__(self, kind: str, returns: type | None = None) -> None:
        self.kind = kind
        self.returns = returns
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            self._functions[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> F:
        """The function registered as ``name``, or imported from ``module:function``; a KeyError
        that says why otherwise."""
        if name in self._functions:
            return self._functions[name]
        module, colon, attribute = name.partition(":")
        if not colon:
            known = ", ".join(self.names())
            raise KeyError(
                f"unknown {self.kind} {name!r}; known: {known} (or an import path, module:function)"
            )
        try:
            function = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise KeyError(f"{self.kind} {name!r} cannot be imported: {error}") from None
        if not callable(function):
            raise KeyError(f"{self.kind} {name!r} is not a function")
        return function if self.returns is None else self._checked(name, function)

    def _checked(self, name: str, function: F) -> F:
        """``function``, raising a ValueError that names it when it returns something else
        than ``returns``, or one with a field of the wrong type (used as one, it failed later,
        far from the cause: a ``correct`` of 0 was dropped as a malformed sample)."""
        expected = self.returns
        fields = (
            ", ".join(f.name for f in dataclasses.fields(expected))
            if dataclasses.is_dataclass(expected)
            else ""
        )
        spelled = f"{expected.__module__}.{expected.__qualname__}" + (
            f"({fields})" if fields else ""
        )

        @functools.wraps(function)
        def checked(*args, **kwargs):
            result = function(*args, **kwargs)
            if not isinstance(result, expected):
                raise ValueError(
                    f"{self.kind} {name!r} returned {type(result).__name__}, expected {spelled}"
                )
            if dataclasses.is_dataclass(expected) and (problems := type_problems(result)):
                raise ValueError(
                    f"{self.kind} {name!r} returned a {spelled}: {'; '.join(problems)}"
                )
            return result

        return checked  # type: ignore[return-value]

    def unregister(self, name: str) -> None:
        self._functions.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._functions)
