"""Frozen, typed specs and their YAML validation.

Every spec is a frozen dataclass built by `from_mapping`, which rejects unknown keys and wrong
types, collecting every problem in one pass so a user fixes a file once, not once per error.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from qeval.core.errors import QevalError, QevalErrors, did_you_mean


def load_yaml(path: Path, what: str) -> Any:
    """Read a YAML file; missing or malformed files become one-line QevalErrors."""
    if not path.is_file():
        raise QevalError(f"{what} file", str(path), "an existing YAML file", "check the path")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise QevalError(f"malformed {what} YAML", str(path), f"valid YAML ({problem}{where})",
                         "fix the syntax at that position") from None


class _TolerantLoader(yaml.SafeLoader):
    """SafeLoader that keeps lm-eval's `!function module.name` tags as plain strings."""


_TolerantLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def from_mapping(cls: type, data: Any, where: str, errors: list[QevalError]) -> Any:
    """Build dataclass `cls` from `data`; append problems to `errors` and return None if any."""
    if not isinstance(data, dict):
        errors.append(QevalError(f"{where}", type(data).__name__, f"a mapping with keys "
                                 f"{', '.join(f.name for f in dataclasses.fields(cls))}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    n_before = len(errors)
    for key in data:
        if key not in fields:
            hint = did_you_mean(key, fields)
            errors.append(QevalError(f"unknown key in {where}", key, "one of " + ", ".join(fields),
                                     hint or "remove it"))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
                value = tuple(value)
            if not _type_ok(value, hints[name]):
                errors.append(QevalError(f"{where}.{name}", value, f"a value of type {_tname(hints[name])}"))
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(QevalError(f"{where}", "missing key", f"a {name!r} key", f"add `{name}:`"))
    if len(errors) > n_before:
        return None
    return cls(**kwargs)


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def raise_if(errors: list[QevalError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise QevalErrors(errors)
