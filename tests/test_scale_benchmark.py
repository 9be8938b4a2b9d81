"""The scale benchmark, small: its collection builder on 2,000 rows of the real label file and every
data stage through the CLI, so the benchmark cannot rot. No timing assertions: the rows add up, the
split is patient-disjoint, the shards hold every image the quarantine does not."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.scale import EVAL_STAGES, ROOT, STAGES, Collection, Options, build_collection, pick_rows, stage_commands

pytestmark = [pytest.mark.ray, pytest.mark.realdata]


def test_pick_rows_keeps_patients_whole():
    table = pd.DataFrame({"Image Index": [f"{p:08d}_{i:03d}.png" for p, n in ((1, 3), (2, 2), (3, 4)) for i in range(n)],
                          "Patient ID": [str(p) for p, n in ((1, 3), (2, 2), (3, 4)) for _ in range(n)]})
    assert list(pick_rows(table, 6)["Patient ID"].unique()) == ["1", "2"]  # patient 3 would be cut: left out
    assert len(pick_rows(table, 5)) == 5
    assert len(pick_rows(table, None)) == len(pick_rows(table, 100)) == 9


def test_eval_stages_follow_the_data_stages_with_their_options(tmp_path):
    collection = Collection(tmp_path / "labels.csv.gz", tmp_path / "images", 100, 10)
    commands = stage_commands(tmp_path / "run", collection, [224, 64], [*STAGES, *EVAL_STAGES],
                              Options(("--test-frac", "0.75", "--val-frac", "0.1"), epochs=1, backbone="resnet18"))
    labels = [label for label, _ in commands]
    assert labels == ["ingest", "validate", "split", "preprocess 224", "preprocess 64", "eda", "train", "evaluate", "explain"]
    args = dict(commands)
    assert args["split"][-4:] == ["--test-frac", "0.75", "--val-frac", "0.1"]
    train = args["train"]
    assert train[:3] == ["train", "--run", str(tmp_path / "run")]
    assert train[train.index("--epochs") + 1] == "1" and train[train.index("--weights") + 1] == "none"
    assert train[train.index("--backbone") + 1] == "resnet18" and train[train.index("--workers") + 1] == "1"
    assert all(a[2] == str(tmp_path / "run") for _, a in commands)  # every stage on the one run
    assert [label for label, _ in stage_commands(tmp_path / "run", collection, [64], list(STAGES))][-1] == "eda"  # --eval is opt-in


def test_builder_links_each_row_to_a_real_image(nih, tmp_path):
    collection = build_collection(tmp_path / "c", 300, label_file=nih / "Data_Entry_2017_v2020.csv.gz", images=nih / "images")
    names = pd.read_csv(collection.label_file, dtype=str)["Image Index"]
    files = sorted(collection.images.iterdir())
    assert len(names) == len(files) == collection.rows <= 300
    assert all(not f.is_symlink() and f.stat().st_nlink >= 2 for f in files)  # hard links into the pool
    again = build_collection(tmp_path / "c", 300, label_file=nih / "Data_Entry_2017_v2020.csv.gz", images=nih / "images")
    assert [f.stat().st_ino for f in sorted(again.images.iterdir())] == [f.stat().st_ino for f in files]  # deterministic


def test_scale_benchmark_on_2000_rows(nih, tmp_path):
    out = tmp_path / "scale"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sizes", "2000", "--image-sizes", "64", "--out", str(out), "--keep"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = pd.read_csv(out / "results.csv")
    assert list(results["stage"]) == [s if s != "preprocess" else "preprocess 64" for s in STAGES]
    assert (results["peak RSS (MiB)"] > 0).all() and (results["written (MiB)"] > 0).all()
    assert (out / "results.md").exists() and (out / "scale.png").stat().st_size > 0

    run = out / "work" / "2000" / "run"
    rows_in = len(pd.read_csv(out / "work" / "2000" / "Data_Entry.csv.gz"))
    assert rows_in == results["rows"].iloc[0] <= 2000
    manifest, quarantine = pd.read_parquet(run / "manifest.parquet"), pd.read_parquet(run / "quarantine.parquet")
    ingest_rejects = quarantine[quarantine["stage"] != "preprocess"]
    assert len(manifest) + len(ingest_rejects) == rows_in

    splits = pd.read_parquet(run / "splits.parquet")
    assert set(splits["image_id"]) == set(manifest["image_id"])
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()

    shards = pd.read_parquet(run / "shards", columns=["image_id"])
    dropped = quarantine[quarantine["stage"] == "preprocess"]
    assert len(shards) + len(dropped) == len(manifest)
    assert shards["image_id"].is_unique
    assert (run / "eda" / "eda.md").exists()
