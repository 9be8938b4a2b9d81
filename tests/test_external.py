"""``cxr external``: a second phantom collection scored with a run's model, as ``cxr evaluate`` scores
the run's own test split; the leakage gate; bad external inputs.

One small run (16 phantom patients at 48 px, a ResNet18 trained one epoch) is built once for the
module; the external collections are drawn with other seeds, and at 64 px so the preprocessing has
to resize them like training's images. Phantom patient ids start at 1 for every seed, so two
collections share patients unless their ids are offset (``_offset_collection``).
"""
from __future__ import annotations

import csv
import re
import html
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.cli import main
from evaluation.external import below_internal
from evaluation.inference import predict_arrays
from pipelines.imaging import decode_file
from pipelines.labels import FINDINGS
from pipelines.phantoms import make_collection
from pipelines.rundir import RunDir
from tests.test_eval_fixtures import train_tiny, write_phantom_run
from trainers.checkpoint import load_checkpoint

SIZE = 48
EXTERNAL_SIZE = 64
OFFSET = 1000


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local) -> RunDir:
    """A phantom run with a checkpoint and an internal ``eval/`` (what ``cxr external`` compares with)."""
    run = write_phantom_run(tmp_path_factory.mktemp("external") / "run", n_patients=16, image_size=SIZE, seed=0)
    train_tiny(run, epochs=1)
    assert main(["evaluate", "--run", str(run.root), "--bootstrap", "50", "--no-robustness"]) == 0
    return run


def _offset_collection(folder: Path, seed: int, keep: frozenset[str] = frozenset()) -> tuple[Path, Path]:
    """A 10-patient phantom collection at 64 px whose patient ids (and file names) are moved up by
    1000, except the patients in ``keep``, which keep the ids the run's own collection gives them."""
    collection = make_collection(folder, n_patients=10, image_size=EXTERNAL_SIZE, seed=seed)
    with collection.labels_csv.open(newline="") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        patient = row[3]
        if patient.zfill(8) in keep:
            continue
        new_id = f"{int(patient) + OFFSET:08d}_{row[0].split('_', 1)[1]}"
        (collection.images / row[0]).rename(collection.images / new_id)
        row[0], row[3] = new_id, str(int(patient) + OFFSET)
    with collection.labels_csv.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return collection.labels_csv, collection.images


def _external(run: RunDir, name: str, labels: Path, images: Path, *extra: str) -> int:
    return main(["external", "--run", str(run.root), "--name", name, "--source", "nih", "--csv", str(labels),
                 "--images", str(images), "--bootstrap", "50", *extra])


def _train_patient(run: RunDir) -> str:
    splits = pd.read_parquet(run.splits)
    return str(splits.loc[splits["split"] == "train", "patient_id"].sort_values().iat[0])


def test_external_set_is_scored_as_evaluate_scores_the_test_split(run, tmp_path, capsys):
    labels, images = _offset_collection(tmp_path / "clean", seed=1)
    assert _external(run, "clean", labels, images) == 0
    out = capsys.readouterr().out
    assert "external clean:" in out and "internal test" in out

    ext = RunDir(run.external("clean"))
    for name in ("manifest.parquet", "quarantine.parquet", "source.json", "validation/summary.json", "eval/predictions.parquet",
                 "eval/metrics.json", "eval/subgroups.csv"):
        assert (ext.root / name).is_file(), name
    assert not list(ext.root.parent.glob(".*staging*"))
    assert "staging" not in out and "staging" not in (ext.validation / "summary.json").read_text()  # paths name the final folder
    manifest = pd.read_parquet(ext.manifest)
    assert len(manifest) + len(pd.read_parquet(ext.quarantine)) == json.loads(ext.source_json.read_text())["rows_in"]

    # resized like training: 64 px files, 48 px shards
    shards = pd.read_parquet(ext.shards / "split=test")
    assert set(shards["orig_width"]) == {EXTERNAL_SIZE} and shards["image"].map(len).eq(SIZE * SIZE).all()

    # predictions: the checkpoint on the same pixels, decoded as training decodes
    predictions = pd.read_parquet(ext.eval / "predictions.parquet")
    internal = pd.read_parquet(run.eval / "predictions.parquet")
    assert list(predictions.columns[: 2 + 2 * len(FINDINGS)]) == list(internal.columns[: 2 + 2 * len(FINDINGS)])
    assert set(predictions["image_id"]) == set(manifest["image_id"])
    model, info = load_checkpoint(run.train / "best")
    pixels = np.stack([decode_file(images / p, SIZE).pixels for p in manifest.set_index("image_id").loc[predictions["image_id"], "path"]])
    expected = predict_arrays(model, info, pixels)
    assert np.allclose(predictions[[f"prob_{f}" for f in info["findings"]]].to_numpy(), expected, atol=1e-6)

    # metrics: the format of eval/, AUROCs as scikit-learn computes them, baselines fit on the run's train split
    metrics = json.loads((ext.eval / "metrics.json").read_text())
    internal_metrics = json.loads((run.eval / "metrics.json").read_text())
    assert set(metrics) == set(internal_metrics)
    assert set(metrics["baselines"]) == {"metadata", "image_statistics"}
    assert metrics["subgroups"]
    for name, m in metrics["per_finding"].items():
        y, p = predictions[name].to_numpy(), predictions[f"prob_{name}"].to_numpy()
        if len(np.unique(y[y >= 0])) < 2:
            assert m["auroc"] is None
        else:
            assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    # thresholds are the run's, chosen on its validation split
    assert {f: m["threshold"] for f, m in metrics["per_finding"].items()} == {f: m["threshold"] for f, m in internal_metrics["per_finding"].items()}

    assert main(["report", "--run", str(run.root)]) == 0
    report = run.report.read_text()
    assert "External validation" in report and "clean" in report


def test_leakage_gate_refuses_a_shared_patient_and_drop_overlap_quarantines_exactly_it(run, tmp_path, capsys):
    shared = _train_patient(run)
    labels, images = _offset_collection(tmp_path / "leaky", seed=2, keep=frozenset({shared}))
    listed = pd.read_csv(labels, dtype=str)
    theirs = set(listed.loc[listed["Patient ID"].str.zfill(8) == shared, "Image Index"])
    assert theirs

    assert _external(run, "leaky", labels, images) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "share a patient or an image id with the run's train/val split" in err and shared in err
    assert not run.external("leaky").exists() and not list(run.external("leaky").parent.glob(".leaky*"))

    assert _external(run, "leaky", labels, images, "--drop-overlap") == 0
    out = capsys.readouterr().out
    assert f"{len(theirs)} overlapping the run's train/val split" in out
    ext = RunDir(run.external("leaky"))
    quarantine = pd.read_parquet(ext.quarantine)
    moved = quarantine[quarantine["stage"] == "external"]
    assert set(moved["image_id"]) == theirs
    assert set(moved["reason"]) == {f"overlaps the run's train/val split (patient {shared})"}
    manifest = pd.read_parquet(ext.manifest)
    assert not set(manifest["image_id"]) & theirs and shared not in set(manifest["patient_id"])
    assert len(manifest) + len(quarantine) == len(listed)
    assert set(pd.read_parquet(ext.eval / "predictions.parquet")["image_id"]) == set(manifest["image_id"])


def test_a_label_file_missing_a_column_is_a_table_error_and_writes_nothing(run, tmp_path, capsys):
    labels, images = _offset_collection(tmp_path / "nocol", seed=3)
    pd.read_csv(labels, dtype=str).drop(columns=["Patient ID"]).to_csv(labels, index=False)
    assert _external(run, "nocol", labels, images) == 1
    err = capsys.readouterr().err
    assert "'Patient ID'" in err and str(labels) in err
    assert not run.external("nocol").exists()


def test_a_collection_whose_images_are_all_missing_is_refused_with_every_row_counted(run, tmp_path, capsys):
    labels, images = _offset_collection(tmp_path / "gone", seed=4)
    rows = len(pd.read_csv(labels))
    empty = tmp_path / "no-images"
    empty.mkdir()
    assert _external(run, "gone", labels, empty) == 1
    err = capsys.readouterr().err
    assert f"none of the {rows} rows" in err and f"{rows} missing file" in err
    assert not run.external("gone").exists()


def test_a_bad_name_is_refused(run, tmp_path, capsys):
    assert _external(run, "../escape", tmp_path / "x.csv", tmp_path) == 1
    assert "--name" in capsys.readouterr().err


def test_below_internal_names_a_set_whose_interval_lies_below():
    internal = {"mean": {"auroc": 0.8}}
    low = {"mean": {"auroc": 0.6, "ci_low": 0.5, "ci_high": 0.7}, "n_images": 40, "n_patients": 20}
    close = {"mean": {"auroc": 0.75, "ci_low": 0.65, "ci_high": 0.85}, "n_images": 40, "n_patients": 20}
    assert "On external set site-b (40 images, 20 patients)" in below_internal("site-b", low, internal)
    assert below_internal("site-b", close, internal) is None
    assert below_internal("site-b", low, None) is None


def test_cxr_run_configs_list_external_sets(tmp_path):
    from cxr.config import ConfigError, load_config

    base = ["run:", "  dir: run", "data:", "  source: manifest", "  csv: labels.csv", "  images: .", "external:"]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join([*base, "  - {name: site-b, source: nih, csv: b/labels.csv, images: b/images, cohort: ward}"]) + "\n")
    (site,) = load_config(path).external
    assert (site.name, site.source, site.cohort, site.drop_overlap) == ("site-b", "nih", "ward", False)
    assert site.csv == str(tmp_path / "b" / "labels.csv") and site.images == str(tmp_path / "b" / "images")
    for item, message in [("{name: b, source: phantoms, csv: x, images: y}", "external[0].source"),
                          ("{name: b, source: nih, csv: x}", "external[0].images is required"),
                          ("{name: ../b, source: nih, csv: x, images: y}", "external[0].name"),
                          ("{name: b, source: nih, csv: x, images: y, colour: red}", "unknown key 'external[0].colour'")]:
        path.write_text("\n".join([*base, f"  - {item}"]) + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path)
    path.write_text("\n".join([*base, "  - {name: b, source: nih, csv: x, images: y}", "  - {name: b, source: nih, csv: z, images: y}"]) + "\n")
    with pytest.raises(ConfigError, match="used twice"):
        load_config(path)


def test_report_flags_an_external_set_whose_interval_lies_below_the_internal_figure(run):
    from evaluation import write_report

    internal = json.loads((run.eval / "metrics.json").read_text())
    point = internal["mean"]["auroc"]
    low = {**internal, "mean": {**internal["mean"], "auroc": point - 0.2, "ci_low": point - 0.3, "ci_high": point - 0.1}}
    folder = run.external("far-site") / "eval"
    folder.mkdir(parents=True)
    try:
        (folder / "metrics.json").write_text(json.dumps(low))
        report = write_report(run).read_text()
    finally:
        shutil.rmtree(folder.parent)
    sentence = below_internal("far-site", low, internal)
    assert sentence and html.escape(sentence) in report
    assert report.index(html.escape(sentence)) < report.index('<section id="external"')  # in "At a glance" first
