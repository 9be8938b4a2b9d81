"""Scoring a whole collection with Ray Data: paths -> read + decode -> score (an actor pool, each
actor loading the checkpoint once) -> Parquet.

The input is a table of ``image_id`` and ``path`` (a folder's files, a manifest, or a run's split).
Each file's bytes are read and decoded exactly as preprocessing did, at the checkpoint's size
(``Scorer.decode``); a file that is missing, unreadable or not an image becomes a row with its
reason instead of an error, so one bad file never stops the run. The actors score the decoded rows
(``evaluation.scoring.Scorer``: probabilities, thresholded calls, OOD fields) and pass the bad rows
through. ``write_parquet`` partitions by ``status``: the scored rows become ``<out>/scores/``, the
others ``<out>/quarantine.parquet`` (stage ``score``, with the reason). Rows in = scored +
quarantined, checked.

Where decoding runs depends on where the model runs. On CPUs every actor reads, decodes and scores
its own blocks, one actor per CPU with one torch thread each: decoding and the forward pass then
both run on every core (measured on 2 cores: 1.51x the ``cxr predict`` loop's throughput at 224 px,
where separate decode tasks beside one actor gave 1.25x; docs/benchmarks.md, "Scoring a
collection"). With GPUs the actors only score, and read-and-decode tasks on the CPUs feed them, so
the GPUs never wait on PNG decoding.

Memory stays flat as the collection grows: Ray Data's streaming executor holds a bounded number of
blocks of at most ``IMAGES_PER_BLOCK_MAX`` images in flight; nothing collects the images (measured
in benchmarks/score.py at 1x and 4x the files).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.scoring import Scorer, Thresholds
from pipelines.atomic import staged_dir, write_json
from pipelines.errors import UserInputError
from pipelines.imaging import DecodeError
from pipelines.manifest import quarantine_records, write_table
from pipelines.preprocess import default_blocks

STAGE = "score"
SCORES = "scores"  # <out>/scores/: the Parquet files of scored rows
QUARANTINE = "quarantine.parquet"
THRESHOLDS = "thresholds.json"
SUMMARY = "summary.json"
SCORED, QUARANTINED = "scored", "quarantined"
DECODE_CPUS = 0.5  # with GPU actors: two single-threaded decode tasks share a CPU
WRITE_CPUS = 0.0  # writing Parquet is light I/O; CPU actors hold every CPU, and a write task must still start
# (one writer at a time: a 0-CPU task has no CPU limit, and concurrent writes started extra worker processes:
# 53 s instead of 46 s for 1,200 images on 2 cores)


def read_and_decode(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """A Ray Data task: read and decode each path; never raises for a bad file (``reason`` says why)."""
    from pipelines.imaging import decode_bytes

    images, reasons = [], []
    for path in batch["path"]:
        path = str(path)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            images.append(decode_bytes(data, image_size, os.path.basename(path)).pixels.tobytes())
            reasons.append("")
        except OSError as err:
            images.append(b""); reasons.append(f"cannot read file: {err.strerror or err}")
        except DecodeError as err:
            images.append(b""); reasons.append(f"cannot decode: {err}")
    return {"image_id": np.asarray(batch["image_id"], dtype=object), "path": np.asarray(batch["path"], dtype=object),
            "image": np.array(images, dtype=object), "reason": np.array(reasons, dtype=object)}


class ScoreBatch:
    """The Ray Data actor: loads the checkpoint once (``Scorer``), then scores each batch's decoded
    rows; rows with a ``reason`` are passed through unscored, with ``status`` quarantined."""

    def __init__(self, checkpoint: str, thresholds: Thresholds | None, use_gpu: bool, threads: int, decode: bool) -> None:
        import torch

        torch.set_num_threads(threads)  # Ray sets the actor's OMP threads to its CPU reservation (1)
        self.scorer = Scorer(Path(checkpoint), thresholds, device="cuda" if use_gpu else None)
        self.decode = decode  # True: the batch holds paths, read and decoded here (CPU actors)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode:
            batch = read_and_decode(batch, self.scorer.image_size)
        n, size = len(batch["image_id"]), self.scorer.image_size
        good = np.array([not r for r in batch["reason"]], dtype=bool)
        pixels = np.stack([np.frombuffer(b, np.uint8).reshape(size, size) for b in batch["image"][good]]) if good.any() \
            else np.zeros((0, size, size), np.uint8)
        scores = self.scorer.score(pixels)
        out = {"image_id": batch["image_id"], "path": batch["path"]}
        for name, values in scores.items():
            column = np.full(n, None, dtype=object) if values.dtype == object else np.zeros(n, values.dtype)
            column[good] = values
            if values.dtype.kind == "f":
                column[~good] = np.nan
            out[name] = column
        out["reason"] = batch["reason"]
        out["status"] = np.where(good, SCORED, QUARANTINED).astype(object)
        return out


@dataclass
class ScoreResult:
    out: Path
    scored: int
    quarantined: int
    flagged: int | None  # images flagged out of distribution (None: no OOD statistics)
    summary: dict


def default_actors(in_actors: bool, gpus_per_actor: float, cpus: float) -> int:
    """Scoring actors when ``--actors`` is not given: one per CPU of the cluster when CPU actors
    decode (one torch thread each); else one (``--actors N`` for N GPUs)."""
    return max(1, int(cpus)) if in_actors and gpus_per_actor == 0 else 1


def actor_threads(actors: int, gpus_per_actor: float) -> int:
    """Torch threads per scoring actor: on GPUs 1; on CPUs the smallest node's CPUs shared among the
    actors (at least 1), so that fewer actors than CPUs still use every core for the forward pass."""
    import ray

    if gpus_per_actor > 0:
        return 1
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    return max(1, int(min(node_cpus, default=1)) // max(1, actors))


DECODE_PLACES = ("auto", "actors", "tasks")


def decodes_in_actors(decode: str, gpus_per_actor: float) -> bool:
    """``auto``: in the actors on CPUs, in separate tasks with GPUs (module docstring)."""
    if decode not in DECODE_PLACES:
        raise UserInputError(f"--decode {decode!r}: choose one of {', '.join(DECODE_PLACES)}")
    return gpus_per_actor == 0 if decode == "auto" else decode == "actors"


def check_actors(actors: int, in_actors: bool, cpus: float) -> None:
    """Refuse an actor pool this cluster cannot start, before Ray Data waits on it forever."""
    if in_actors and actors > cpus:
        raise UserInputError(f"--actors {actors}: this Ray cluster has {cpus:g} CPU(s), and each scoring actor takes one: "
                             f"use at most {int(cpus)}")
    if not in_actors and actors >= cpus:  # the actors take a CPU each; the read-and-decode tasks need the rest
        raise UserInputError(f"--actors {actors} would take every CPU of this Ray cluster ({cpus:g}), leaving none to read and "
                             f"decode the images: use at most {max(int(cpus) - 1, 1) if cpus > 1 else 0} actor(s)"
                             + ("" if cpus > 1 else ", on a cluster with at least 2 CPUs"))


def score_collection(inputs: pd.DataFrame, checkpoint: Path, out: Path, thresholds: Thresholds | None = None,
                     batch_size: int = 32, actors: int | None = None, gpus_per_actor: float = 0.0,
                     source: str = "", threads_per_actor: int | None = None, decode: str = "auto") -> ScoreResult:
    """Score every row of ``inputs`` (``image_id``, absolute ``path``) on the connected Ray cluster;
    ``out`` is built in a staging folder and swapped in whole (complete or absent)."""
    import ray  # evaluation stays importable without Ray machinery

    from trainers.checkpoint import read_info
    from trainers.ood import read_ood

    if inputs.empty:
        raise UserInputError(f"nothing to score: {source or 'the input'} lists no image")
    duplicated = inputs["image_id"][inputs["image_id"].duplicated()]
    if len(duplicated):
        raise UserInputError(f"image_id {duplicated.iat[0]!r} appears {int((inputs['image_id'] == duplicated.iat[0]).sum())} times "
                             f"in {source or 'the input'}: ids must be unique")
    info = read_info(Path(checkpoint))
    ood, ood_note = read_ood(Path(checkpoint))  # checked here, before any actor starts
    cpus = ray.cluster_resources().get("CPU", 1)
    decode_in_actors = decodes_in_actors(decode, gpus_per_actor)
    actors = actors or default_actors(decode_in_actors, gpus_per_actor, cpus)
    check_actors(actors, decode_in_actors, cpus)
    threads = threads_per_actor or actor_threads(actors, gpus_per_actor)
    blocks = default_blocks(len(inputs), cpus)
    table = inputs[["image_id", "path"]].astype(str).reset_index(drop=True)
    chunks = [table.iloc[index] for index in np.array_split(np.arange(len(table)), blocks) if len(index)]
    ds = ray.data.from_pandas(chunks)
    if not decode_in_actors:
        # The decode tasks' reservation differs from the actors', so Ray Data does not fuse them into the actors.
        ds = ds.map_batches(read_and_decode, batch_size=None, batch_format="numpy", num_cpus=DECODE_CPUS,
                            fn_kwargs={"image_size": int(info["image_size"])})
    ds = ds.map_batches(ScoreBatch, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                        num_gpus=gpus_per_actor or None,
                        fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).resolve()), "thresholds": thresholds,
                                               "use_gpu": gpus_per_actor > 0, "threads": threads, "decode": decode_in_actors})
    out = Path(out)
    with staged_dir(out) as staging:
        written = staging / ".written"
        ds.write_parquet(str(written), partition_cols=["status"], ray_remote_args={"num_cpus": WRITE_CPUS}, concurrency=1)
        scored_dir, failed_dir = written / f"status={SCORED}", written / f"status={QUARANTINED}"
        scores_dir = staging / SCORES
        if scored_dir.is_dir():
            shutil.move(str(scored_dir), str(scores_dir))
        else:
            scores_dir.mkdir()
        failed = pd.read_parquet(failed_dir, columns=["image_id", "path", "reason"]) if failed_dir.is_dir() else \
            pd.DataFrame(columns=["image_id", "path", "reason"])
        shutil.rmtree(written)
        counted = pd.read_parquet(scores_dir, columns=["image_id", *(["ood"] if ood is not None else [])]) if any(scores_dir.iterdir()) \
            else pd.DataFrame(columns=["image_id", "ood"])
        if len(counted) + len(failed) != len(inputs):
            raise RuntimeError(f"score lost or duplicated images: {len(inputs)} in, {len(counted)} scored + {len(failed)} quarantined")
        quarantine = quarantine_records(STAGE, list(failed["reason"]), list(failed["image_id"]), [None] * len(failed),
                                        [{"image_id": i, "path": p} for i, p in zip(failed["image_id"], failed["path"])])
        write_table(quarantine, staging / QUARANTINE)
        if thresholds is not None:
            write_json(staging / THRESHOLDS, thresholds.to_json())
        flagged = int(counted["ood"].astype(bool).sum()) if ood is not None else None
        summary = {
            "checkpoint": str(Path(checkpoint).resolve()), "backbone": info["backbone"], "image_size": int(info["image_size"]),
            "source": source, "rows_in": int(len(inputs)), "scored": int(len(counted)), "quarantined": int(len(failed)),
            "ood_flagged": flagged, "ood": ood.meta if ood is not None else None, "ood_note": ood_note,
            "thresholds": THRESHOLDS if thresholds is not None else None,
            "files": {"scores": f"{SCORES}/", "quarantine": QUARANTINE},
            "actors": actors, "batch_size": batch_size, "gpus_per_actor": gpus_per_actor, "threads_per_actor": threads,
            "decoding": "in the actors" if decode_in_actors else "read-and-decode tasks on the CPUs",
        }
        write_json(staging / SUMMARY, summary)
    return ScoreResult(out, int(len(counted)), int(len(failed)), flagged, summary)


def folder_inputs(folder: Path) -> pd.DataFrame:
    """Every file under ``folder`` (recursively, hidden ones skipped): ``image_id`` is its path
    relative to the folder (the file name for a flat folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return pd.DataFrame({"image_id": [str(p.relative_to(folder)) for p in files], "path": [str(p.resolve()) for p in files]})


def manifest_inputs(manifest: Path) -> pd.DataFrame:
    """A CSV or Parquet table with ``path`` (absolute, or relative to the table's folder) and
    optionally ``image_id`` (default: the path as given)."""
    manifest = Path(manifest)
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UserInputError(f"--manifest {manifest}: expected a .csv or .parquet file")
    table = pd.read_parquet(manifest) if suffix == ".parquet" else pd.read_csv(manifest, dtype=str)
    if "path" not in table.columns:
        raise UserInputError(f"--manifest {manifest}: no 'path' column (found {', '.join(map(str, table.columns))})")
    paths = table["path"].astype(str)
    ids = table["image_id"].astype(str) if "image_id" in table.columns else paths
    root = manifest.resolve().parent
    return pd.DataFrame({"image_id": ids.to_numpy(), "path": [str(root / p) for p in paths]})
