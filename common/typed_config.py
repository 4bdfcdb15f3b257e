"""Typed dataclass configs from TOML, with errors that name the file and the key.

A config is data, never code: TOML is parsed with :mod:`tomllib` and mapped onto dataclasses
field by field.  Unknown keys, wrong types and impossible values are errors that say where they
are (``demo.toml: [model].n_layers: expected int, got str 'four'``).  Dataclasses validate their
own values in ``__post_init__`` by raising :class:`ConfigError`; this module adds the location.

This module is torch-free so that both ``tokenizer`` and ``engine`` can use it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible.  The message names where."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: no type of {_type_name(tp)} fits")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        # TOML writes 1 for 1.0 often enough; accept ints where a float is wanted, but not bools.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys of {where or cls.__name__}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain dicts and lists (for JSON manifests and logs); None values dropped."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is not None:
                out[f.name] = to_dict(v)
        return out
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, naming the file in any syntax error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def to_toml(data: dict[str, Any]) -> str:
    """Write plain dicts (as produced by :func:`to_dict`) as TOML.

    Tables of scalars become ``[section]`` blocks, lists of tables become inline tables on one
    line each (readable for attribute lists), so a schema round-trips through this function.
    """
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            if v and all(isinstance(x, dict) for x in v):
                return "[\n" + "".join(f"  {inline(x)},\n" for x in v) + "]"
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return inline(v)
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def inline(d: dict[str, Any]) -> str:
        return "{ " + ", ".join(f"{k} = {scalar(v)}" for k, v in d.items()) + " }"

    def table(name: str, d: dict[str, Any]) -> None:
        simple = {k: v for k, v in d.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in d.items() if isinstance(v, dict)}
        if simple or not nested:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {scalar(v)}" for k, v in simple.items())
            lines.append("")
        for k, v in nested.items():
            table(f"{name}.{k}", v)

    top = {k: v for k, v in data.items() if not isinstance(v, dict | list) or _is_scalar_list(v)}
    lines.extend(f"{k} = {scalar(v)}" for k, v in top.items())
    if top:
        lines.append("")
    for k, v in data.items():
        if isinstance(v, dict):
            table(k, v)
        elif isinstance(v, list) and not _is_scalar_list(v):
            for item in v:
                lines.append(f"[[{k}]]")
                lines.extend(f"{ik} = {scalar(iv)}" for ik, iv in item.items())
                lines.append("")
    return "\n".join(lines)


def _is_scalar_list(v: Any) -> bool:
    return isinstance(v, list) and not any(isinstance(x, dict) for x in v)
