"""The one exception every bad input raises, and the config's checks that raise it naming the field: a module of
its own so that the lowest rooms (every config section among them) can raise it."""

from __future__ import annotations

from typing import Any, Collection


class UserError(Exception):
    """Bad input from the user (config, data, model path, run folder). The CLI prints the message on one
    line and exits with status 2; every subclass names the file, line or field at fault."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range; the message names the field."""


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}': {message}")


def check_name(name: str, registry: Collection[str], field_name: str) -> None:
    """`name` is a key of `registry`, the one place its choices are declared (a config field holding a registry's
    name is a plain `str`, checked here where the registry is importable)."""
    _check(name in registry, field_name, f"unknown '{name}', choose from {list(registry)}")


def _check_pass_through(
    given: dict[str, Any], allowed: set[str], owned: dict[str, str], field_name: str, target: str
) -> None:
    """Every key of a pass-through dict must be a field of `target` that no typed field of ours sets."""
    for key in given:
        _check(key not in owned, f"{field_name}.{key}", f"set it with '{owned.get(key)}' instead")
        _check(key in allowed, f"{field_name}.{key}", f"not a field of {target}")
