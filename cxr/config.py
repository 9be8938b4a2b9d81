"""The one typed config behind ``cxr run``: every stage's settings in one YAML file.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import CxrError, UserInputError
from pipelines.external import check_name
from pipelines.imaging import MAX_IMAGE_SIZE
from trainers.config import FREEZE_CHOICES, LOSS_CHOICES, SAMPLING_CHOICES, TrainConfig

SOURCES = ("nih", "chexpert", "manifest", "phantoms")


class ConfigError(CxrError, ValueError):
    """A config file (or a ``--set`` override) that cannot describe a run; the message says where."""


@dataclass
class RunSection:
    dir: str  # local path, file:// URI, or any URI pyarrow filesystems read (s3://, gs://)
    address: str | None = None  # Ray address; None: RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int | None = None  # CPUs of the embedded local Ray (None: all)
    scratch: str | None = None  # where the stages work when run.dir is mirrored: always for a remote URI
    # (None: a folder under the temp folder); given for a local run.dir, that folder is mirrored too


@dataclass
class DataSection:
    source: str  # nih | chexpert | manifest | phantoms (a synthetic NIH-style collection, like `cxr demo`)
    csv: str | None = None  # the label file (not for phantoms)
    images: str | None = None  # the image root (not for phantoms)
    patients: int = 120  # phantoms only
    phantom_size: int = 256  # phantoms only: side of the rendered PNGs
    seed: int = 0  # phantoms only
    warn_only: bool = False  # table-level manifest-suite failures warn instead of stopping
    max_reject_frac: float = 0.2  # one reason quarantining more of the rows stops ingest (1: off)
    cohort: str | None = None  # every image's cohort (the manifest's cohort column)
    cohorts: str | None = None  # a CSV of image id, cohort (phantoms: written with the collection)


@dataclass
class ValidateSection:
    enabled: bool = True
    warn_only: bool = False
    max_reject_frac: float = 0.2  # as data.max_reject_frac, for the manifest suite's re-run


@dataclass
class SplitSection:
    test_frac: float = 0.15
    val_frac: float = 0.15
    min_positives: int = 10
    seed: int = 0
    warn_only: bool = False


@dataclass
class PreprocessSection:
    enabled: bool = True
    image_size: int = 224
    blocks: int | None = None  # Ray Data read blocks (None: the preprocess default)


@dataclass
class EdaSection:
    enabled: bool = True
    sample_size: int = 64
    seed: int = 0


@dataclass
class TrainSection:
    """``enabled`` plus any TrainConfig field, flat: ``train: {backbone: resnet18, epochs: 3}``.
    These are also what every tune trial starts from (with ``tune.base`` on top)."""

    enabled: bool = True
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TuneSection:
    enabled: bool = False  # with train enabled too, both run (like `cxr demo`); evaluate takes tune/best
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ for trials, e.g. {workers: 1}
    num_samples: int = 1  # samples of the continuous axes (lr) per grid point
    asha: bool = True
    grace_period: int = 1
    space: str | None = None  # a YAML search space (tuning/space.py) replacing the grid below
    sampling: list[str] = field(default_factory=lambda: list(SAMPLING_CHOICES))
    loss: list[str] = field(default_factory=lambda: ["bce", "weighted"])
    freeze: list[str] = field(default_factory=lambda: list(FREEZE_CHOICES))
    lr: list[float] = field(default_factory=lambda: [1e-4, 3e-3])  # log-uniform range [low, high]


@dataclass
class EvaluateSection:
    enabled: bool = True
    checkpoint: str | None = None  # None: tune/best when tune ran, else train/best
    subgroups: list[str] | None = None  # None: every one of sex, age_band, view, cohort present


@dataclass
class ExternalSet:
    """One external validation set (``cxr external``), scored after evaluate."""

    name: str
    source: str
    csv: str
    images: str
    cohort: str | None = None
    cohorts: str | None = None
    drop_overlap: bool = False  # quarantine patients/images the run trained or validated on, instead of refusing


@dataclass
class ExplainSection:
    enabled: bool = True
    checkpoint: str | None = None  # None: as evaluate


@dataclass
class ReportSection:
    enabled: bool = True


@dataclass
class Config:
    run: RunSection
    data: DataSection
    validate: ValidateSection = field(default_factory=ValidateSection)
    split: SplitSection = field(default_factory=SplitSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    eda: EdaSection = field(default_factory=EdaSection)
    train: TrainSection = field(default_factory=TrainSection)
    tune: TuneSection = field(default_factory=TuneSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    explain: ExplainSection = field(default_factory=ExplainSection)
    report: ReportSection = field(default_factory=ReportSection)
    external: list[ExternalSet] = field(default_factory=list)

    def tune_base(self) -> TrainConfig:
        """What every trial starts from: the train section with ``tune.base`` on top."""
        return TrainConfig(**{**self.train.config.to_dict(), **self.tune.base})


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
    """Cross-field rules the types cannot say."""
    d, s, t = config.data, config.split, config.tune
    if not config.run.dir.strip():
        raise ConfigError("run.dir must not be empty")
    if d.source not in SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(SOURCES)}, got {d.source!r}")
    if d.cohort is not None and d.cohorts is not None:
        raise ConfigError("data.cohort and data.cohorts exclude each other: name one cohort for all, or a file")
    names = [x.name for x in config.external]
    for i, x in enumerate(config.external):
        if x.source not in SOURCES or x.source == "phantoms":
            raise ConfigError(f"external[{i}].source must be one of nih, chexpert, manifest, got {x.source!r}")
        if x.cohort is not None and x.cohorts is not None:
            raise ConfigError(f"external[{i}].cohort and external[{i}].cohorts exclude each other")
        if names.count(x.name) > 1:
            raise ConfigError(f"external[{i}].name {x.name!r} is used twice: each set needs its own folder")
        try:
            check_name(x.name)
        except UserInputError as err:
            raise ConfigError(f"external[{i}].name: {err}") from None
    if d.source == "phantoms":
        for name in ("csv", "images", "cohort", "cohorts"):
            if getattr(d, name) is not None:
                raise ConfigError(f"data.{name} is not used with data.source phantoms (it makes its own collection): remove it")
        if d.patients < 1 or d.phantom_size < 32:
            raise ConfigError(f"data.patients must be >= 1 and data.phantom_size >= 32, got {d.patients} and {d.phantom_size}")
    else:
        for name in ("csv", "images"):
            if not getattr(d, name):
                raise ConfigError(f"data.{name} is required with data.source {d.source}")
    for name in ("test_frac", "val_frac"):
        if not 0 < getattr(s, name) < 1:
            raise ConfigError(f"split.{name} must be between 0 and 1, got {getattr(s, name)}")
    if s.test_frac + s.val_frac >= 1:
        raise ConfigError(f"split.test_frac + split.val_frac must leave images for training, got {s.test_frac} + {s.val_frac}")
    if s.min_positives < 0:
        raise ConfigError(f"split.min_positives must be >= 0, got {s.min_positives}")
    for key, value in (("data.max_reject_frac", d.max_reject_frac), ("validate.max_reject_frac", config.validate.max_reject_frac)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key} must be between 0 and 1 (1 turns the mass-rejection guard off), got {value}")
    if not 8 <= config.preprocess.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"preprocess.image_size must be between 8 and {MAX_IMAGE_SIZE}, got {config.preprocess.image_size}")
    if config.preprocess.blocks is not None and config.preprocess.blocks < 1:
        raise ConfigError(f"preprocess.blocks must be >= 1, got {config.preprocess.blocks}")
    if config.eda.sample_size < 1:
        raise ConfigError(f"eda.sample_size must be >= 1, got {config.eda.sample_size}")
    if t.num_samples < 1 or t.grace_period < 1:
        raise ConfigError(f"tune.num_samples and tune.grace_period must be >= 1, got {t.num_samples} and {t.grace_period}")
    if len(t.lr) != 2 or not 0 < t.lr[0] < t.lr[1]:
        raise ConfigError(f"tune.lr must be [low, high] with 0 < low < high, got {t.lr}")
    # tune.base: checked like the train section, on top of it
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    _reject_unknown(set(t.base) - set(train_fields), train_fields, "tune.base")
    trial = _build(TrainConfig, {**config.train.config.to_dict(), **t.base}, "tune.base")
    t.base = {k: getattr(trial, k) for k in t.base}  # coerced (1e-3 as a float, ...)
    for name, choices in (("sampling", SAMPLING_CHOICES), ("loss", LOSS_CHOICES), ("freeze", FREEZE_CHOICES)):
        values = getattr(t, name)
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise ConfigError(f"tune.{name} must list values among {', '.join(choices)}, got {values}")


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
    weights = config.train.config.weights
    if weights not in ("imagenet", "none"):  # a local state_dict file
        config.train.config.weights = _resolve(weights, base)


# --------------------------------------------------------------------------- the demo


def demo_config(run_dir: str, patients: int = 120, image_size: int = 112, seed: int = 0, tune: bool = True) -> Config:
    """What ``cxr demo`` runs, as a Config (``configs/demo.yaml`` is this with the defaults; a test
    keeps the two equal): the synthetic collection and every stage the demo runs, with its settings."""
    from cxr.demo import DEMO_TRAIN, DEMO_TUNE  # noqa: PLC0415 - the demo's own numbers, so the two cannot drift

    return Config(
        run=RunSection(dir=run_dir),
        data=DataSection(source="phantoms", patients=patients, phantom_size=256, seed=seed),
        validate=ValidateSection(enabled=False),  # ingest and split run their suites themselves
        split=SplitSection(test_frac=0.2, val_frac=0.2, min_positives=5, seed=seed),
        preprocess=PreprocessSection(image_size=image_size),
        eda=EdaSection(sample_size=64, seed=seed),
        train=TrainSection(config=TrainConfig(**DEMO_TRAIN, seed=seed)),
        tune=TuneSection(enabled=tune, base={"workers": 1}, num_samples=1, asha=True, grace_period=1,
                         **{k: [float(x) for x in v] if k == "lr" else list(v) for k, v in DEMO_TUNE.items()}),
        evaluate=EvaluateSection(enabled=True),
        explain=ExplainSection(enabled=True),
        report=ReportSection(enabled=True),
    )
