"""Typed, validated configuration: one frozen dataclass per service, unknown keys are errors.

Configs are built explicitly (from CLI flags or a JSON/TOML mapping) and passed down; nothing reads
environment variables at import time.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def from_mapping(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Unknown keys raise ConfigError naming the key and the allowed ones.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_mapping(hint, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def load_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a .json or .toml file (validated later by from_mapping)."""
    path = Path(path)
    text = path.read_text()
    return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)


def load_file(cls: type[T], path: str | Path) -> T:
    """Load a .json or .toml file into config class `cls`."""
    return from_mapping(cls, load_mapping(path), where=str(path))


def cache_dir() -> Path:
    """The repository's git-ignored cache (models, dev credentials, span store, audit log)."""
    return Path(__file__).resolve().parent.parent / ".cache"


def dev_token_path() -> Path:
    """Where `privlm up` keeps the development tenant's bearer token (mode 0600)."""
    return cache_dir() / "run" / "dev-token"


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (for __post_init__ validation)."""
    if not condition:
        raise ConfigError(message)
