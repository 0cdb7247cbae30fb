"""Typed reading of settings tables (a TOML study file, a JSON record) against a dataclass's own fields.

The dataclass is the one source of truth: each key is checked against its field's type hint, so a field added later
is checked without a line here. Integers are integers (not 1.5, not true), floats are finite numbers, booleans are
true or false (never the string "no"), strings hold no NUL, lists hold what their hint says. Every mistake is a
one-line UserError naming the key and the value.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields
from functools import lru_cache

from interp.core.errors import UserError

# The largest integer any setting may hold: beyond it numpy, torch and JSON readers disagree (2**53 is the largest
# integer a JavaScript reader of the results holds exactly).
MAX_INT = 2**53
MAX_TEXT = 10_000


def show(value) -> str:
    """A value for an error message: short, on one line."""
    if isinstance(value, (list, dict)):
        kind = "a list" if isinstance(value, list) else "a table"
        return f"{kind} ({len(value)} entries)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a table"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def check_value(value, tp, key: str):
    """`value` as the type hint `tp` wants it (an int for a float field becomes a float), or a UserError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return check_value(value, a, key)
            except UserError:
                if len(options) == 1:
                    raise
        raise UserError(f"'{key}' must be {describe(tp)} (got {show(value)})")
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise UserError(f"'{key}' must be {describe(tp)} (got {show(value)})")
    if tp is bool:
        if type(value) is not bool:
            raise UserError(f"'{key}' must be true or false (got {show(value)})")
        return value
    if tp is int:
        if type(value) is not int:
            raise UserError(f"'{key}' must be an integer (got {show(value)})")
        if abs(value) > MAX_INT:
            raise UserError(f"'{key}' is out of range (got {show(value)}); settings stay within ±2**53")
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise UserError(f"'{key}' must be a number (got {show(value)})")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise UserError(f"'{key}' is out of range (got {show(value)}); settings stay within ±2**53")
        if not math.isfinite(value):
            raise UserError(f"'{key}' must be a finite number (got {show(value)})")
        return float(value)
    if tp is str:
        if type(value) is not str:
            raise UserError(f"'{key}' must be a string (got {show(value)})")
        if "\x00" in value or len(value) > MAX_TEXT:
            raise UserError(f"'{key}' holds a NUL character or is over {MAX_TEXT} characters long (got {show(value)})")
        return value
    if origin is list or tp is list:
        if type(value) is not list:
            raise UserError(f"'{key}' must be {describe(tp)} (got {show(value)})")
        return [check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if type(value) is not dict:
            raise UserError(f"'{key}' must be a table (got {show(value)})")
        return value
    return value  # a type this reader does not know: the dataclass's own check() has the last word


@lru_cache(maxsize=None)
def field_types(cls) -> dict:
    """Field name -> resolved type hint."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def check_fields(cls, table, where: str, *, exclude: tuple[str, ...] = (), extra: dict | None = None) -> dict:
    """The entries of `table` checked against `cls`'s fields (minus `exclude`) and `extra` (name -> type): a dict of
    checked values. An unknown key, or a value of the wrong type, is a one-line UserError starting with `where`."""
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of settings (got {show(table)})")
    known = {k: v for k, v in field_types(cls).items() if k not in exclude} | (extra or {})
    out = {}
    for key, value in table.items():
        if key not in known:
            raise UserError(f"{where}: unknown setting {show(key)}; known: {', '.join(sorted(known))}")
        try:
            out[key] = check_value(value, known[key], key)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    return out


__all__ = ["check_value", "check_fields", "field_types", "describe", "show", "MAX_INT"]
