"""Command-line options generated from settings dataclasses (as Ray's release benchmarks generate
argparse options from their config model): one field, one option, with the field's default, help
text and choices. The values come back as the same dataclass, so a verb hands its stage the very
object ``cxr run`` builds from YAML.

Spelling: ``image_size`` is ``--image-size``; a bool that defaults to True is turned off with
``--no-NAME``, one that defaults to False turned on with ``--NAME``; a list is comma-separated
(``--subgroups sex,view``); ``flag`` in the field's metadata overrides the name (``--lr-range``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable

from pipelines.errors import UserInputError
from pipelines.options import SettingError, meta


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except an on/off flag's (its name says what it changes)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help or "" if action.nargs == 0 else super()._get_help_string(action)


def flag_of(f: dataclasses.Field) -> str:
    """The option that sets field ``f``."""
    m = meta(f)
    if m["flag"]:
        return m["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def cli_fields(cls: type, exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if meta(f)["cli"] and f.name not in skip]


def _base_type(hint: Any) -> Any:
    """``int | None`` -> int; ``list[float]`` stays a list hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _list_parser(item: type, flag: str):
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return [item(p) for p in parts]
        except ValueError:
            raise UserInputError(f"{flag} expects comma-separated {'numbers' if item is float else 'values'}, got {text!r}") from None
    return parse


def _shown(value: Any) -> Any:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) else value


def add_options(parser: argparse.ArgumentParser, cls: type, key: str, exclude: Iterable[str] = ()) -> None:
    """One option per CLI field of ``cls``, stored as ``<key>.<field>`` in the namespace."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls, exclude):
        m, hint = meta(f), _base_type(hints[f.name])
        dest = f"{key}.{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        required = default is dataclasses.MISSING
        kwargs: dict[str, Any] = {"help": m["help"] or argparse.SUPPRESS}
        if m["positional"]:
            parser.add_argument(dest, metavar=f.name, type=_scalar(hint), nargs="+" if typing.get_origin(hint) is list else None, **kwargs)
            continue
        if hint is bool:
            parser.add_argument(flag_of(f), dest=dest, action="store_false" if default is True else "store_true", **kwargs)
            continue
        if typing.get_origin(hint) is list and m["nargs"]:
            kwargs.update(type=typing.get_args(hint)[0], nargs=m["nargs"])
        elif typing.get_origin(hint) is list:
            kwargs["type"] = str  # parsed by from_args: a bad item is an error of the project's own type
        else:
            kwargs["type"] = hint
            if m["choices"]:
                kwargs["choices"] = m["choices"]
        if m["metavar"] or "choices" not in kwargs:
            kwargs["metavar"] = m["metavar"] or f.name.upper()
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = _shown(default) if typing.get_origin(hint) is list and not m["nargs"] else default
        parser.add_argument(flag_of(f), dest=dest, **kwargs)


def _scalar(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint


def from_args(args: argparse.Namespace, cls: type, key: str, exclude: Iterable[str] = (), **fixed: Any) -> Any:
    """The ``cls`` the options of :func:`add_options` describe (``fixed`` fills fields the verb sets
    itself). A rule the settings break is reported with the options' own spelling."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(fixed)
    for f in cli_fields(cls, exclude):
        dest = f"{key}.{f.name}"
        if hasattr(args, dest):
            value = getattr(args, dest)
            if typing.get_origin(_base_type(hints[f.name])) is list and isinstance(value, str):  # comma-separated text
                value = _list_parser(typing.get_args(_base_type(hints[f.name]))[0], flag_of(f))(value)
            values[f.name] = value
    flags = {f.name: flag_of(f) for f in dataclasses.fields(cls)}
    try:
        return cls(**values)
    except SettingError as err:
        raise UserInputError(err.render(lambda name: flags.get(name, name))) from None
