"""Name registries for pluggable functions (rewards, advantage estimators, losses, aggregations)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions by name: ``@registry.register("name")``, ``registry.get("name")``, ``names()``.
    A later registration under a taken name replaces the earlier one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            self._functions[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> F:
        """The function registered as ``name``; a KeyError listing the known names otherwise."""
        try:
            return self._functions[name]
        except KeyError:
            known = ", ".join(self.names())
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def unregister(self, name: str) -> None:
        self._functions.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._functions)
