"""Config files: YAML or JSON, `key=value` overrides with dotted keys, strict dataclass binding.

A typo'd key is an error that names the file, the key and the nearest valid name; it is never ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and how to fix it."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a YAML/JSON config (or start empty) and apply `a.b.c=value` overrides (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return data


def apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. instruct.lr=2e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _unknown_key_message(where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}"


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def bind(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields. Unknown keys raise."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} ({data!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(where, key, list(fields)))
        tp = _strip_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = bind(tp, value, f"{where}.{key}")
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif tp is float and isinstance(value, str):
            # YAML 1.1 reads `2e-5` (no dot) as a string; accept every spelling Python's float() does.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}") from None
        elif tp in (int, float, str, bool) and value is not None and not isinstance(value, tp):
            raise ConfigError(f"{where}.{key}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        kwargs[key] = value
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested containers of them) to plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
