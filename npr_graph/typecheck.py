"""Values read from files and command lines checked against a dataclass's field annotations, so
a wrong type is refused where it is read, naming the field, not deep inside a run."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection
from typing import Any

UNIONS = (typing.Union, types.UnionType)


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type: ints are not bools, floats are finite numbers
    (ints included), tuples are lists or tuples (of exactly their length unless ``tuple[X, ...]``)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in UNIONS:
        return any(fits(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(item, args[0]) for item in value)
        return len(value) == len(args) and all(
            fits(item, arg) for item, arg in zip(value, args, strict=True)
        )
    if origin is list:
        return isinstance(value, list) and all(fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            fits(k, args[0]) and fits(v, args[1]) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"no type check for {hint}")


def describe(hint: Any) -> str:
    """``hint`` in words, for error messages."""
    if typing.get_origin(hint) in UNIONS:
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} finite numbers"
    if typing.get_origin(hint) is list:
        return f"a list of {describe(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(hint) is dict:
        return "a table"
    names = {type(None): "null", bool: "true or false", int: "an integer", str: "a string"}
    if hint in names or hint is float:
        return names.get(hint, "a finite number")
    return f"a {getattr(hint, '__name__', hint)}"


def type_problems(instance: Any, skip: Collection[str] = ()) -> list[str]:
    """One line per field of the dataclass ``instance`` (except those in ``skip``, which the
    caller checks its own way) whose value is not of its annotated type: ``"name must be an
    integer, got 1.5"``."""
    hints = typing.get_type_hints(type(instance))
    return [
        f"{f.name} must be {describe(hints[f.name])}, got {getattr(instance, f.name)!r}"
        for f in dataclasses.fields(instance)
        if f.name not in skip and not fits(getattr(instance, f.name), hints[f.name])
    ]


def has_shape(value: Any, shape: Any) -> bool:
    """Whether a JSON ``value`` has ``shape``: a type (an int is not a bool), a tuple of
    alternatives, or a dict of the keys it must have with their shapes."""
    if isinstance(shape, tuple):
        return any(has_shape(value, option) for option in shape)
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(
            key in value and has_shape(value[key], inner) for key, inner in shape.items()
        )
    if isinstance(value, bool) and shape is not bool:
        return False
    return isinstance(value, shape)


def check_at_least(name: str, value: object, least: int) -> None:
    """ValueError unless ``value`` is an integer (not a bool) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def setting_changes(before: dict[str, Any], now: dict[str, Any], keys: Collection[str]) -> str:
    """``"n 2 -> 3, sampling.top_p 0.95 -> 1.0"``: the ``keys`` whose value differs (a missing
    key is None; in settings that are dicts on both sides, each inner key that differs), or
    ``""`` when none does; what a refused resume tells the user."""
    return ", ".join(_changes(before, now, keys))


def _changes(before: dict[str, Any], now: dict[str, Any], keys: Collection[str]) -> list[str]:
    changes = []
    for key in sorted(keys):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            inner = _changes(old, new, old.keys() | new.keys())
            changes += [f"{key}.{change}" for change in inner]
        else:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes
