"""What each output of a run directory was made from, so that no verb reads stale inputs.

Re-ingesting another collection into a finished run directory must not leave the old splits,
shards and statistics in use. Each output therefore records the fingerprint of the inputs it was
made from, and every verb checks that record against what the run directory holds now before it
reads anything:

- ``source.json`` holds the fingerprint of ``manifest.parquet`` (ingest and validate write both);
- ``splits.parquet`` carries the manifest's fingerprint in its Parquet metadata;
- ``shards/_lineage.json`` and ``stats.json`` share one id, and the lineage names the manifest
  and splits the shards were cut from;
- ``train/lineage.json`` and ``tune/lineage.json`` name the shards a model was trained on.

Fingerprints are of content, not of files: re-ingesting the same collection keeps every
downstream output valid. Outputs written by other tools (a split file from elsewhere) carry no
record and are accepted as they are.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.atomic import staged_file, write_json
from pipelines.manifest import ContractError, read_table
from pipelines.rundir import RunDir

METADATA_KEY = b"cxr.made_from"
SHARDS_LINEAGE = "_lineage.json"  # leading underscore: Parquet dataset readers skip it


class StaleOutputError(ContractError):
    """An output was made from other inputs than the run directory now holds."""


def fingerprint(table: pd.DataFrame) -> str:
    """A content hash of a table: same rows and columns, same fingerprint, whatever the file."""
    digest = hashlib.sha256(json.dumps([str(c) for c in table.columns]).encode())
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def write_parquet(table: pd.DataFrame, path: Path, made_from: dict[str, str] | None = None) -> None:
    """Write ``table`` atomically, recording ``made_from`` in the file's own metadata (so the
    record can never be separated from the data it describes)."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if made_from:
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), METADATA_KEY: json.dumps(made_from).encode()})
    with staged_file(path) as tmp:
        pq.write_table(arrow, tmp)


def recorded_made_from(path: Path) -> dict[str, str] | None:
    """What a Parquet file says it was made from; None when it says nothing."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def manifest_is_recorded(run: RunDir, manifest: pd.DataFrame) -> bool:
    """Whether ``manifest`` is the one the last ingest or validate wrote (or no record exists)."""
    want = _read_json(run.source_json).get("manifest_fingerprint")
    return not want or fingerprint(manifest) == want


def current_manifest(run: RunDir) -> pd.DataFrame:
    """The manifest, refused when it is not the one the last ingest or validate wrote (an
    interrupted ingest can replace one of its files and not the others; `cxr validate` adopts a
    manifest edited by hand)."""
    manifest = read_table(run.manifest, "manifest", f"run `cxr ingest --run {run.root}` first")
    if not manifest_is_recorded(run, manifest):
        raise StaleOutputError(f"{run.manifest} does not match {run.source_json} (an ingest was interrupted or the file was replaced): re-run `cxr ingest --run {run.root}`, or `cxr validate` to adopt it as it is")
    return manifest


def current_splits(run: RunDir, manifest: pd.DataFrame) -> pd.DataFrame:
    """The splits, refused when they were drawn from another manifest than ``manifest``."""
    splits = read_table(run.splits, "splits", f"run `cxr split --run {run.root}` first")
    made_from = recorded_made_from(run.splits) or {}
    if made_from.get("manifest") not in (None, fingerprint(manifest)):
        raise StaleOutputError(f"{run.splits} was made from another manifest (the collection was re-ingested or re-validated since): re-run `cxr split --run {run.root}`")
    return splits


def shards_made_from(manifest: pd.DataFrame, splits: pd.DataFrame) -> dict[str, str]:
    """A new shards id and the inputs it is cut from; goes into ``_lineage.json`` and ``stats.json``."""
    return {"shards": uuid.uuid4().hex[:16], "manifest": fingerprint(manifest), "splits": fingerprint(splits)}


def write_shards_lineage(shards: Path, lineage: dict[str, str]) -> None:
    write_json(Path(shards) / SHARDS_LINEAGE, lineage)


def current_shards(run: RunDir, splits: pd.DataFrame | None = None) -> dict:
    """``stats.json`` of shards that are complete and cut from the run's current splits; refused
    otherwise. ``splits``: the current splits, when the caller has already read and checked them."""
    remedy = f"re-run `cxr preprocess --run {run.root}`"
    if not run.stats.exists() or not run.shards.is_dir():
        raise FileNotFoundError(f"preprocessed shards not found at {run.shards} (or {run.stats} missing): run `cxr preprocess --run {run.root}` first")
    stats = _read_json(run.stats)
    lineage = _read_json(run.shards / SHARDS_LINEAGE)
    if not lineage and "shards" not in stats:
        return stats  # made by a tool (or an older cxr) that keeps no record
    if lineage.get("shards") != stats.get("shards"):
        raise StaleOutputError(f"{run.stats} and {run.shards} come from different preprocess runs (one was interrupted): {remedy}")
    if splits is None:
        splits = current_splits(run, current_manifest(run))
    if lineage.get("splits") != fingerprint(splits):
        raise StaleOutputError(f"{run.shards} were cut from other splits than {run.splits} (split or ingest ran again since): {remedy}")
    return stats


def write_model_lineage(folder: Path, stats: dict) -> None:
    """Record which shards a training or search output learned from."""
    write_json(Path(folder) / "lineage.json", {"shards": stats.get("shards")})


def check_model_lineage(run: RunDir, checkpoint: Path, stats: dict) -> None:
    """Refuse the run's own checkpoint when it was trained on other shards than the current ones;
    a checkpoint from elsewhere (``--checkpoint``) is the user's deliberate choice and not checked."""
    checkpoint = Path(checkpoint).resolve()
    for folder, verb in ((run.train, "train"), (run.tune, "tune")):
        if folder.resolve() in checkpoint.parents:
            trained_on = _read_json(folder / "lineage.json").get("shards")
            if trained_on and stats.get("shards") and trained_on != stats["shards"]:
                raise StaleOutputError(f"{checkpoint} was trained on other shards than {run.shards} hold now (preprocess ran again since): re-run `cxr {verb} --run {run.root}`, or pass --checkpoint to use it anyway")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (a checkpoint's weights, a card's inputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(run: RunDir) -> dict[str, object]:
    """What a model was made from, in a few values a tracker records beside its settings: the
    manifest's row count, the split's seed and a hash of ``splits.parquet``, the shards' id and
    image size. A missing part is left out."""
    found: dict[str, object] = {}
    if run.manifest.is_file():
        found["manifest_rows"] = pq.ParquetFile(run.manifest).metadata.num_rows
    if run.split_report.is_file():
        found["split_seed"] = _read_json(run.split_report).get("seed")
    if run.splits.is_file():
        found["splits_sha256"] = file_sha256(run.splits)
    if run.stats.is_file():
        stats = _read_json(run.stats)
        found.update(shards=stats.get("shards"), image_size=stats.get("image_size"))
    return found
