"""``cxr score`` (Ray Data batch inference) and the OOD statistics of a checkpoint, on a phantom run
with a briefly trained ResNet18 and on real NIH images.

One phantom run is built for the module (64 px, 3 epochs: seconds), evaluated (so the run has
validation-chosen thresholds) and given OOD statistics by ``trainers.ood.record_ood``, as
``cxr train`` does when it publishes ``train/best``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.cli import main
from pipelines.labels import FINDINGS
from pipelines.rundir import INFO_FILE, MODEL_FILE, OOD_FILE, RunDir
from tests.test_eval_fixtures import train_tiny, write_run

PROBS = [f"prob_{f}" for f in FINDINGS]
SIZE = 64


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, ray_local) -> RunDir:
    """A phantom run: shards, a 3-epoch ResNet18 in train/best with ood.npz, and eval/ (thresholds)."""
    from evaluation import evaluate_run
    from trainers.ood import record_ood

    from pipelines.phantoms import make_collection

    root = tmp_path_factory.mktemp("score") / "run"
    collection = make_collection(root / "phantoms", n_patients=60, image_size=SIZE, seed=1)
    # a larger validation split than usual: it sets the OOD threshold (its 99th percentile)
    run = write_run(root, collection.labels_csv, collection.images, SIZE, 0.25, 0.35, 3, seed=1)
    train_tiny(run, epochs=3)
    record_ood(run.train_best, run)
    evaluate_run(run, n_boot=20, robustness=False)
    return run


def _images(run: RunDir, split: str) -> list[Path]:
    manifest = pd.read_parquet(run.manifest).merge(pd.read_parquet(run.splits)[["image_id", "split"]], on="image_id")
    root = Path(json.loads(run.source_json.read_text())["images"])
    return [root / p for p in manifest.loc[manifest["split"] == split, "path"]]


def _scores(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "scores").sort_values("image_id").reset_index(drop=True)


def test_score_a_folder_quarantines_bad_files_and_matches_predict(phantom, tmp_path, capsys):
    from evaluation import predict_images

    good = _images(phantom, "test")[:7]
    folder = tmp_path / "in"
    folder.mkdir()
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:400])
    (folder / "notes.png").write_text("this is a text file, not a PNG\n")
    out = tmp_path / "out"

    assert main(["score", "--checkpoint", str(phantom.train_best), "--images", str(folder), "--out", str(out), "--batch-size", "3"]) == 0
    printed, errors = capsys.readouterr()
    # Ray Data's per-dataset INFO lines and its progress-bar notice stay in its log file
    assert "Starting execution of Dataset" not in printed + errors and "Progress bars disabled" not in errors
    assert "9 in = 7 scored + 2 quarantined" in printed and "out of distribution:" in printed and "wrote" in printed

    scores = _scores(out)
    assert sorted(scores["image_id"]) == sorted(p.name for p in good)
    quarantine = pd.read_parquet(out / "quarantine.parquet").set_index("image_id")
    assert sorted(quarantine.index) == ["notes.png", "truncated.png"]
    assert (quarantine["stage"] == "score").all()
    assert "not a recognized image format" in quarantine.loc["notes.png", "reason"]
    assert "truncated" in quarantine.loc["truncated.png", "reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == summary["scored"] + summary["quarantined"] == 9
    # on CPUs by default: one actor per CPU of the (2-CPU) Ray, each decoding its own files with one torch thread
    assert (summary["actors"], summary["threads_per_actor"], summary["decoding"]) == (2, 1, "in the actors")
    assert "2 actor(s) x 1 torch thread(s), decoding in the actors" in printed
    # The checkpoint is train/best of an evaluated run: calls at its validation thresholds, written beside.
    thresholds = json.loads((out / "thresholds.json").read_text())
    metrics = json.loads(phantom.eval_metrics.read_text())
    for finding, value in thresholds["thresholds"].items():
        assert value == metrics["per_finding"][finding]["threshold"]
        assert (scores[f"pred_{finding}"] == (scores[f"prob_{finding}"] >= value)).all()
    assert scores["ood_score"].notna().all() and scores["ood"].dtype == bool

    # cxr predict, the no-Ray loop, gives the same numbers on the same files
    predicted = predict_images(phantom.train_best, sorted(folder / i for i in scores["image_id"]))
    np.testing.assert_allclose(scores[PROBS].to_numpy(), predicted[PROBS].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(scores["ood_score"].to_numpy(), predicted["ood_score"].astype(float).to_numpy(), atol=1e-4)


def test_score_a_run_split_and_a_manifest(phantom, tmp_path, capsys):
    out = tmp_path / "test-split"
    assert main(["score", "--run", str(phantom.root), "--split", "test", "--out", str(out)]) == 0
    scores = _scores(out)
    splits = pd.read_parquet(phantom.splits)
    assert sorted(scores["image_id"]) == sorted(splits.loc[splits["split"] == "test", "image_id"])
    # the same model on the same test images as cxr evaluate's predictions (read from the shards)
    evaluated = pd.read_parquet(phantom.eval_predictions).sort_values("image_id").reset_index(drop=True)
    np.testing.assert_allclose(scores[PROBS].to_numpy(), evaluated[PROBS].to_numpy(), atol=1e-5)

    # A manifest, and a checkpoint without OOD statistics (nor an evaluation): it still scores, OOD null.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (MODEL_FILE, INFO_FILE):
        shutil.copy(phantom.train_best / name, bare / name)
    files = _images(phantom, "val")[:3]
    manifest = tmp_path / "list.csv"
    pd.DataFrame({"image_id": ["a", "b", "c", "gone"], "path": [*map(str, files), "missing.png"]}).to_csv(manifest, index=False)
    # decoded by separate read-and-decode tasks (the GPU arrangement) this time: same rows, same quarantine
    assert main(["score", "--checkpoint", str(bare), "--manifest", str(manifest), "--out", str(tmp_path / "m"), "--decode", "tasks"]) == 0
    printed = capsys.readouterr().out
    assert "out of distribution: unknown; no ood.npz" in printed and "calls: none" in printed
    assert "1 actor(s) x 2 torch thread(s), decoding read-and-decode tasks on the CPUs" in printed
    scores = _scores(tmp_path / "m")
    assert list(scores["image_id"]) == ["a", "b", "c"] and scores["ood"].isna().all() and scores["ood_score"].isna().all()
    assert not any(c.startswith("pred_") for c in scores.columns) and not (tmp_path / "m" / "thresholds.json").exists()
    gone = pd.read_parquet(tmp_path / "m" / "quarantine.parquet")
    assert list(gone["image_id"]) == ["gone"] and "cannot read file" in gone["reason"].iat[0]


def test_score_refuses_two_inputs(phantom, tmp_path, capsys):
    assert main(["score", "--checkpoint", str(phantom.train_best), "--images", str(tmp_path), "--run", str(phantom.root),
                 "--out", str(tmp_path / "o")]) == 1
    assert "exactly one input" in capsys.readouterr().err


def test_score_refuses_more_actors_than_the_cluster_can_start(phantom, tmp_path, capsys):
    """Each actor takes a CPU; decoding in tasks needs one more: refused before Ray Data waits forever."""
    (tmp_path / "in").mkdir()
    shutil.copy(_images(phantom, "test")[0], tmp_path / "in" / "a.png")
    for extra, message in ((["--actors", "3"], "has 2 CPU(s), and each scoring actor takes one: use at most 2"),
                           (["--actors", "2", "--decode", "tasks"], "leaving none to read and decode the images: use at most 1")):
        assert main(["score", "--checkpoint", str(phantom.train_best), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "o"), *extra]) == 1
        assert message in capsys.readouterr().err


def test_phantom_model_flags_real_nih_images_not_held_out_phantoms(phantom, nih):
    from evaluation.predict import decode_images
    from evaluation.scoring import Scorer

    scorer = Scorer(phantom.train_best)
    meta = scorer.ood.meta
    assert meta["quantile"] == 0.99 and meta["threshold_on"] == "val" and "99th percentile" in scorer.ood_note
    held_out = scorer.score(decode_images(_images(phantom, "test"), SIZE))  # neither fit nor threshold saw these
    real = scorer.score(decode_images(sorted((nih / "images").glob("*.png"))[:24], SIZE))
    assert held_out["ood"].mean() <= 0.1, held_out["ood_score"]
    assert real["ood"].all(), real["ood_score"]
    assert np.median(real["ood_score"]) > 3 * np.median(held_out["ood_score"])


def test_a_checkpoint_without_ood_statistics_still_scores(phantom, tmp_path):
    from evaluation.scoring import Scorer
    from pipelines.imaging import decode_file

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (MODEL_FILE, INFO_FILE):
        shutil.copy(phantom.train_best / name, bare / name)
    image = decode_file(_images(phantom, "test")[0], SIZE).pixels[None]
    scores = Scorer(bare).score(image)
    assert scores["ood_score"][0] is None and scores["ood"][0] is None
    assert "no ood.npz" in Scorer(bare).ood_note
    # statistics made for other weights are not used
    shutil.copy(phantom.train_best / OOD_FILE, bare / OOD_FILE)
    other = bare / MODEL_FILE
    import torch

    state = torch.load(other, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, other)
    scorer = Scorer(bare)
    assert scorer.ood is None and "other weights" in scorer.ood_note


def test_publishing_a_checkpoint_records_its_ood_statistics(phantom, tmp_path):
    """What `cxr train` and `cxr tune` do when they publish best/: the weights, model.json and
    ood.npz computed for those weights on the run's train and val shards, swapped in together."""
    from trainers.ood import read_ood
    from trainers.publish import publish_best

    best = publish_best(phantom.train_best, tmp_path / "best", ood_from=phantom)
    assert sorted(p.name for p in best.iterdir()) == sorted([MODEL_FILE, INFO_FILE, OOD_FILE])
    stats, note = read_ood(best)
    splits = pd.read_parquet(phantom.splits)["split"].value_counts()
    assert stats.meta["train_images"] == splits["train"] and stats.meta["val_images"] == splits["val"]
    assert stats.meta["features"]["dims"] == 512 and "99th percentile" in note  # ResNet18's pooled features
    assert sorted(p.name for p in publish_best(phantom.train_best, tmp_path / "plain").iterdir()) == sorted([MODEL_FILE, INFO_FILE])
