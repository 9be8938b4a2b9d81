"""How a setting is declared once: its default, help text and choices live on a dataclass field.

Every stage's settings are a dataclass whose fields are made with :func:`option`. The ``cxr`` CLI
generates each verb's options from those fields (``cxr/options.py``) and ``cxr run`` reads the same
fields from YAML (``cxr/config.py``), so a default or a help text is written in one place only.
``pipelines`` is the bottom layer, so ``trainers`` may declare ``TrainConfig`` this way too.

Cross-field rules live in the dataclass too (``Settings.check``); they raise :class:`SettingError`
with ``{field}`` placeholders, which each front end fills with its own spelling of the setting
(``--test-frac`` on the command line, ``split.test_frac`` in a config).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import MISSING, field
from typing import Any, Callable, Sequence

from pipelines.errors import UserInputError


def option(default: Any = MISSING, help: str = "", *, choices: Sequence[Any] | None = None, flag: str | None = None,
           metavar: str | None = None, cli: bool = True, config: bool = True, positional: bool = False, nargs: str | None = None) -> Any:
    """A settings field. ``flag`` overrides the generated ``--name`` (``--sampling-grid``); ``cli=False``
    keeps it out of the command line (``enabled``, test hooks); ``config=False`` out of YAML (``--resume``);
    ``positional`` makes it a positional argument. A list default is copied per instance."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "metavar": metavar,
                "cli": cli, "config": config, "positional": positional, "nargs": nargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=_copier(default), metadata=metadata)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def _copier(value: list | dict) -> Callable[[], Any]:
    return lambda: type(value)(value)


def meta(f: dataclasses.Field) -> dict[str, Any]:
    """A field's option metadata (defaults for fields declared without :func:`option`)."""
    base = {"help": "", "choices": None, "flag": None, "metavar": None, "cli": True, "config": True, "positional": False, "nargs": None}
    return {**base, **dict(f.metadata)}


class SettingError(UserInputError):
    """A setting, or a combination of settings, that cannot be used. The message names settings as
    ``{field}``; :meth:`render` spells them for the front end that read them."""

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self.template = template

    def render(self, spell: Callable[[str], str]) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: spell(m.group(1)), self.template)

    def __str__(self) -> str:
        return self.render(lambda name: name)


class Settings:
    """Base of every stage's settings dataclass: checks declared choices, then the class's own rules."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices, value = meta(f)["choices"], getattr(self, f.name)
            if choices is None or value is None:
                continue
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
            if bad or value == []:
                listed = "list values among" if isinstance(value, list) else "be one of"
                raise SettingError(f"{{{f.name}}} must {listed} {', '.join(map(str, choices))}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules across fields (override); raise :class:`SettingError`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def require(condition: bool, template: str) -> None:
    """Raise a :class:`SettingError` with ``template`` unless ``condition`` holds."""
    if not condition:
        raise SettingError(template)
