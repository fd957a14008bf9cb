"""Frozen, typed specs and their YAML validation.

Every spec is a frozen dataclass built by `from_mapping`, which rejects unknown keys and wrong
types, collecting every problem in one pass so a user fixes a file once, not once per error. A
field typed as another spec (`ray: RaySettings`), an optional one, or a tuple / str-keyed dict of
them is built in the same pass, so a document is typed once, all the way down, and its problems
are reported together (`calibration.sampels`, `arms[2].colour`, `adapters.q.train_quant`).

A spec may name field types that live in heavy modules (torch) without importing them at class
definition: its `schema_types()` classmethod returns those names when validation resolves them, so
reading the schema (its keys, for `--help`) stays cheap.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from qeval.core.errors import QevalError, QevalErrors, did_you_mean
# every plan, suite, task and thresholds file is read by the one hardened loader (re-exported here,
# beside the specs it feeds)
from qeval.core.yaml_safe import load_yaml  # noqa: F401


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


def from_mapping(cls: type, data: Any, where: str, errors: list[QevalError], nested: bool = False) -> Any:
    """Build dataclass `cls` from `data`; append problems to `errors` and return None if any.

    `where` names `data` in messages: the document ("plan x.yaml") at the top, a key path
    ("calibration", "arms[2]") for the specs inside it (`nested`)."""
    if not isinstance(data, dict):
        errors.append(QevalError(f"{where}", type(data).__name__, f"a mapping with keys "
                                 f"{', '.join(f.name for f in dataclasses.fields(cls))}"))
        return None
    hints = field_types(cls)
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
            # a top-level document's sections are named by their key alone, as users write them
            kwargs[name] = _value(data[name], hints[name], f"{where}.{name}" if nested else name,
                                  f"{where}.{name}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(QevalError(f"{where}", "missing key", f"a {name!r} key", f"add `{name}:`"))
    if len(errors) > n_before:
        return None
    return cls(**kwargs)


def field_types(cls: type) -> dict[str, Any]:
    """`cls`'s field types, resolving the names its `schema_types()` supplies on demand."""
    extra = cls.schema_types() if hasattr(cls, "schema_types") else None
    return typing.get_type_hints(cls, localns=extra)


def _spec_type(tp: Any) -> type | None:
    """The spec class `tp` names (`X` or `X | None`), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _value(value: Any, tp: Any, path: str, label: str, errors: list[QevalError]) -> Any:
    """`value` as field type `tp`: specs (and tuples / dicts of them) built, lists as tuples; a
    type problem is appended to `errors` (`path`: where a nested spec is; `label`: this value)."""
    spec = _spec_type(tp)
    if spec is not None and isinstance(value, spec):  # built already (a Python caller's spec)
        return value
    if spec is not None and not (value is None and spec is not tp):
        return from_mapping(spec, value, path, errors, nested=True)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and _spec_type(args[0]) and isinstance(value, (list, tuple)):
        return tuple(_value(v, args[0], f"{path}[{i}]", f"{label}[{i}]", errors) for i, v in enumerate(value))
    if origin is dict and len(args) == 2 and _spec_type(args[1]) and isinstance(value, dict):
        return {k: _value(v, args[1], f"{path}.{k}", f"{label}.{k}", errors) for k, v in value.items()}
    if isinstance(value, list) and origin is tuple:
        value = tuple(value)
    if not _type_ok(value, tp):
        errors.append(QevalError(label, value, f"a value of type {_tname(tp)}"))
    return value


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def raise_if(errors: list[QevalError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise QevalErrors(errors)
