"""Checks shared by the dataclass configs (GRPOConfig, LoraConfig): unknown keys and field types.

Each message names the field and what was expected, e.g. "learning_rate: expected a float, got 'fast' (str)" or
"unknown LoraConfig field(s): 'rank' (did you mean 'r'?)".
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def check_known_fields(owner: str, values: Mapping[str, Any], known: Iterable[str]) -> None:
    """ValueError naming every key of `values` that is not a field of `owner`, with close matches."""
    known = sorted(known)
    unknown = [key for key in values if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(key))
        listing = f"; expected some of {known}" if len(known) <= 12 else ""
        raise ValueError(f"unknown {owner} field(s): {'; '.join(hints)}{listing}")


def check_field_types(config: Any) -> None:
    """TypeError for the first field whose value does not match its annotation (int is accepted for float,
    bool never for a number)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, expected = getattr(config, field.name), hints[field.name]
        if not _matches(value, expected):
            raise TypeError(f"{field.name}: expected {_describe(expected)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(item, args[0]) for item in value)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if expected is type(None):
        return "None"
    name = {float: "float", int: "int", bool: "bool (true/false)", str: "string"}.get(expected, expected.__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"
