"""The one exception every bad input raises: a module of its own so that the lowest rooms can raise it."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, model path, run folder). The CLI prints the message on one
    line and exits with status 2; every subclass names the file, line or field at fault."""
