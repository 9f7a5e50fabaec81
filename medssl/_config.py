"""Checking config overrides (from notebooks, plans and the command line) against the dataclass fields."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields
from typing import Any

__all__ = ["check_overrides"]


def check_overrides(config_cls: type, overrides: dict[str, Any], owner: str) -> None:
    """Raise a ``TypeError`` naming the field when a key is unknown or a value has the wrong type.

    ``-t epochs abc`` must fail here with "TrainConfig.epochs expects int, got 'abc' (str)", not
    deep inside training. ints are accepted for floats; bools are not accepted for ints.
    """
    known = {f.name for f in fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
            raise TypeError(f"{owner} has no setting {key!r} ({hint})")
        if not _matches(value, hints.get(key, Any)):
            raise TypeError(f"{owner}.{key} expects {_name(hints[key])}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
