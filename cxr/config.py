"""Reading ``cxr run``'s YAML config into the sections of ``cxr/settings.py`` (which declare every setting).

Loading checks the file where it enters, the way the CLI checks flags: an unknown key at any level
is an error naming the full dotted key and the valid ones; a value of the wrong type names the key,
the expected type and what was given. Relative paths are resolved against **the folder of the
config file** (not the working directory), so ``cxr run configs/nih.yaml`` means the same from
anywhere. A run directory that is a URI (``file://``, ``s3://``, ``gs://``) is kept as written.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cxr.settings import (  # re-exported: the sections are the config's parts
    SOURCES, CardSection, Config, CvSection, DataSection, EdaSection, EvaluateSection, ExplainSection, ExternalSet, PreprocessSection,
    ReportSection, RunSection, SplitSection, TrainSection, TuneSection, ValidateSection,
)
from pipelines.errors import CxrError
from pipelines.options import SettingError, meta
from trainers.config import TrainConfig

__all__ = [
    "SOURCES", "CardSection", "Config", "ConfigError", "CvSection", "DataSection", "EdaSection", "EvaluateSection", "ExplainSection", "ExternalSet",
    "PreprocessSection", "ReportSection", "RunSection", "SplitSection", "TrainSection", "TuneSection", "ValidateSection", "load_config",
]


class ConfigError(CxrError, ValueError):
    """A config file (or a ``--set`` override) that cannot describe a run; the message says where."""


# --------------------------------------------------------------------------- loading


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``KEY=VALUE`` overrides (dotted keys, YAML values), check it."""
    path = Path(path)
    return from_raw(read_raw(path, overrides), base_dir=path.resolve().parent, origin=str(path))


def read_raw(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The config file as a plain mapping with the overrides merged in, nothing checked yet."""
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, data, ...), got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``train.epochs=3`` sets ``raw['train']['epochs'] = 3`` (the value is parsed as YAML; a relative
    path is, like the file's own, relative to the config file's folder). The value is read with
    ``yaml.safe_load``: a ``!!python/...`` tag is refused, never constructed."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {key.strip()}: {value.strip()!r} is not a plain YAML value ({' '.join(problem.split())}); "
                          "give a number, a string, a list or a mapping") from None
    node = raw
    *parents, last = key.strip().split(".")
    for i, part in enumerate(parents):
        if node.get(part) is None:  # absent, or an empty section (`train:`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a section")
        node = child
    node[last] = parsed


def from_raw(raw: dict[str, Any], base_dir: Path, origin: str = "config") -> Config:
    """Build and check a Config from a mapping; relative paths resolve against ``base_dir``."""
    try:
        config = _build(Config, raw, "")
        _check(config)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    _resolve_paths(config, Path(base_dir))
    return config


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    if cls is TrainSection:  # TrainConfig's fields, flat, beside `enabled`
        rest = {k: v for k, v in raw.items() if k != "enabled"}
        enabled = _coerce(bool, raw.get("enabled", True), f"{prefix}.enabled")
        return TrainSection(enabled=enabled, config=_build(TrainConfig, rest, prefix))
    fields = {f.name: f for f in dataclasses.fields(cls) if meta(f)["config"]}
    valid = ["enabled", *fields] if cls is TrainConfig else list(fields)
    _reject_unknown(set(raw) - set(fields), valid, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}".lstrip(".")
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key} is required")
    try:
        return cls(**values)
    except SettingError as err:  # the section's own rules name settings as {field}
        raise ConfigError(err.render(lambda name: f"{prefix}.{name}".lstrip("."))) from None
    except (TypeError, ValueError) as err:  # TrainConfig's own checks start with the field's name
        message = str(err)
        field_name = message.split(" ", 1)[0]
        if prefix and field_name in fields:
            raise ConfigError(f"{prefix}.{message}") from None  # "train.lr must be > 0, got -1.0"
        raise ConfigError(f"{where}: {message}") from None


def _reject_unknown(unknown: set[str], valid: list[str], prefix: str) -> None:
    if not unknown:
        return
    key = sorted(unknown)[0]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"under {prefix!r}" if prefix else "at the top level"
    raise ConfigError(f"unknown key {f'{prefix}.{key}'.lstrip('.')!r}{hint}; valid keys {where}: {', '.join(valid)}")


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint`` or a ConfigError naming ``key``. Ints are accepted for floats, and
    numeric strings too (YAML 1.1 reads ``1e-4``, without a dot, as a string)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN and infinity pass every range check below
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise AssertionError(f"config type {hint} of {key} is not handled")
    raise ConfigError(f"{key} must be {'a number' if hint is float else 'an integer' if hint is int else f'a {hint.__name__}'}, got {type(value).__name__} {value!r}")


def _check(config: Config) -> None:
    """Rules across sections (each section checks its own fields when it is built)."""
    names = [x.name for x in config.external]
    for i, x in enumerate(config.external):
        if names.count(x.name) > 1:
            raise ConfigError(f"external[{i}].name {x.name!r} is used twice: each set needs its own folder")
    # tune.base: checked like the train section, on top of it
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    t = config.tune
    _reject_unknown(set(t.base) - set(train_fields), train_fields, "tune.base")
    trial = _build(TrainConfig, {**config.train.config.to_dict(), **t.base}, "tune.base")
    t.base = {k: getattr(trial, k) for k in t.base}  # coerced (1e-3 as a float, ...)


def is_uri(text: str) -> bool:
    """``scheme://...`` (a single letter before ':' would be a Windows drive, not a scheme)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").isalnum()


def _resolve(text: str, base: Path) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(config: Config, base: Path) -> None:
    """Relative paths are relative to the config file's folder; URIs stay as written."""
    if not is_uri(config.run.dir):
        config.run.dir = _resolve(config.run.dir, base)
    for section, name in (("run", "scratch"), ("data", "csv"), ("data", "images"), ("data", "cohorts"), ("tune", "space"), ("evaluate", "checkpoint"), ("explain", "checkpoint")):
        owner = getattr(config, section)
        value = getattr(owner, name)
        if value is not None:
            setattr(owner, name, _resolve(value, base))
    for x in config.external:
        x.csv, x.images = _resolve(x.csv, base), _resolve(x.images, base)
        x.cohorts = _resolve(x.cohorts, base) if x.cohorts is not None else None
        x.checkpoint = _resolve(x.checkpoint, base) if x.checkpoint is not None else None
    train = config.train.config
    if train.weights not in ("imagenet", "none") and not train.weights.startswith("xrv:"):  # a local state_dict file
        train.weights = _resolve(train.weights, base)
    if train.weights_dir is not None:
        train.weights_dir = _resolve(train.weights_dir, base)
