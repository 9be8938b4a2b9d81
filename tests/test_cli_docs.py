"""The README documents the CLI the settings generate: every option a usage line in README.md shows
exists on that verb, and an optional one written with a value (``[--bootstrap 1000]``) shows the
verb's real default. Also: every verb has its own README section."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cxr.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
OPTION = re.compile(r"(--[a-z][a-z0-9-]*)(?:[ =]([^\s\[\]|]+))?")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def usage_lines() -> list[str]:
    """Each ``cxr ...`` command in the README's bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith("cxr "):
                lines.append(command)
    return lines


def _verb_options(line: str) -> tuple[str, dict[str, argparse.Action]]:
    """The verb a usage line shows and its options (``cxr jobs list|logs ...``: those of any action named)."""
    words = line.split()
    parser = _subparsers(build_parser())[words[1]]
    if words[1] != "jobs":
        return words[1], parser._option_string_actions
    actions = _subparsers(parser)
    return "jobs", {k: v for name in actions if name in line for k, v in actions[name]._option_string_actions.items()}


def _placeholder(value: str) -> bool:
    return value.upper() == value and any(c.isalpha() for c in value) or value.startswith("{")


def _same(documented: str, default) -> bool:
    """Equal as numbers (``1e-4,3e-3`` is ``0.0001,0.003``), else as text."""
    try:
        return [float(v) for v in documented.split(",")] == [float(v) for v in str(default).split(",")]
    except ValueError:
        return documented == str(default)


def test_the_readme_shows_usage_lines_for_every_verb():
    shown = {line.split()[1] for line in usage_lines()}
    assert set(_subparsers(build_parser())) <= shown, f"verbs without a README usage line: {set(_subparsers(build_parser())) - shown}"


@pytest.mark.parametrize("line", usage_lines())
def test_every_documented_option_exists_with_the_documented_default(line):
    verb, actions = _verb_options(line)
    optional = {f for f, _ in OPTION.findall(" ".join(re.findall(r"\[([^\]]*)\]", line)))}  # whole flags: --weights is not --weights-dir
    for flag, value in OPTION.findall(line):
        assert flag in actions, f"README shows `cxr {verb} {flag}`, which --help does not list"
        action = actions[flag]
        if value and flag in optional and action.nargs != 0 and action.default not in (None, []) and not _placeholder(value):
            assert _same(value, action.default), f"README shows [{flag} {value}] but the default of `cxr {verb} {flag}` is {action.default!r}"


def test_every_option_of_a_verb_has_help_and_a_default_in_its_help():
    """Generated options carry the settings' help text; --help shows each default."""
    for verb, parser in _subparsers(build_parser()).items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"cxr {verb} {action.option_strings[0]} has no help text"
        text = parser.format_help()
        if verb == "split":
            assert "(default: 0.15)" in text and "(default: 10)" in text
