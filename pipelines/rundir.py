"""Where each stage's files live inside a run directory: the only channel between stages."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def ensure(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def source_json(self) -> Path:
        """Where ingest records the image root and source, so later stages can find the pixels."""
        return self.root / "source.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def split_report(self) -> Path:
        return self.root / "split_report.json"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def preprocess_failures(self) -> Path:
        return self.root / "preprocess" / "failures"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def eda(self) -> Path:
        return self.root / "eda"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def external(self, name: str) -> Path:
        """An external validation set's own run-shaped folder (manifest, quarantine, validation,
        shards, eval), scored by this run's model: ``RunDir(run.external(name))``."""
        return self.root / "external" / name

    @property
    def cv(self) -> Path:
        """Patient-grouped cross-validation (``cxr cv``): out-of-fold predictions, metrics, per-fold runs."""
        return self.root / "cv"
