"""Command-line options built from interp.core.settings.AnalysisSettings: one typer option per field, with the
field's help text, so that every command that loads or measures a model declares its settings the same way."""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from typing import Optional

import typer

from interp.core.errors import UserError
from interp.core.models import check_device
from interp.core.settings import AnalysisSettings


def _option_type(tp):
    """typer wants Optional[X] for `X | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return Optional[args[0]]
    return tp


def with_settings(*names: str, **defaults):
    """Give a command one `--option` per named AnalysisSettings field (its help text, and its default unless
    `defaults` names another). The command takes them as keyword arguments (`**settings`) and turns them into an
    AnalysisSettings with `settings_from(settings)`."""
    hints = typing.get_type_hints(AnalysisSettings)
    by_name = {f.name: f for f in fields(AnalysisSettings)}
    unknown = [n for n in (*names, *defaults) if n not in by_name]
    if unknown:
        raise ValueError(f"no analysis setting named {unknown[0]!r}")

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        params = [p.replace(kind=p.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p for p in own]
        for name in names:
            f = by_name[name]
            flag = "--" + f.metadata.get("flag", name.replace("_", "-"))
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(hints[name]),
                                            default=typer.Option(defaults.get(name, f.default), flag,
                                                                 help=f.metadata["help"])))
        fn.__signature__ = inspect.Signature(params)
        return fn

    return decorate


def settings_from(options: dict, **fixed) -> AnalysisSettings:
    """The AnalysisSettings of a command's options (`fixed` overrides them), checked: counts at least 1, a device
    this machine has."""
    known = set(AnalysisSettings.names())
    settings = AnalysisSettings(**{**{k: v for k, v in options.items() if k in known}, **fixed})
    for name in ("batch_size", "max_examples"):
        value = getattr(settings, name)
        if name in options and value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    check_device(settings.device)
    return settings
