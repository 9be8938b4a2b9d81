"""Patient-grouped k-fold cross-validation: the fold assignment and its leakage audit (unit, no Ray),
bad input, and ``run_cv`` end to end on a small phantom collection with a real local Ray (3 folds,
one epoch each), resumed once."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.cli import main
from cxr.cv import cv_summary, run_cv
from evaluation.baselines import fit_baselines, split_thumbnails
from evaluation.cv import mean_auroc
from evaluation.evaluate import with_meta
from evaluation.report import write_report
from pipelines.errors import UserInputError
from pipelines.folds import assign_folds, audit_folds, plan_folds
from pipelines.labels import FINDINGS
from pipelines.phantoms import make_collection
from pipelines.rundir import RunDir
from pipelines.shards import every_row
from pipelines.split import LeakageError
from tests.test_eval_fixtures import write_run
from trainers import TrainConfig


def table(n_patients: int = 40, images_per_patient: int = 2, seed: int = 0, rare: dict[str, int] | None = None) -> pd.DataFrame:
    """image_id, patient_id and the 14 findings; ``rare``: finding -> number of patients carrying it
    (on all their images); other findings are common (30% of images)."""
    rng = np.random.default_rng(seed)
    n = n_patients * images_per_patient
    frame = pd.DataFrame({"image_id": [f"{i:05d}.png" for i in range(n)], "patient_id": [f"p{i // images_per_patient}" for i in range(n)]})
    for name in FINDINGS:
        frame[name] = (rng.random(n) < 0.3).astype(np.int8)
    for name, carriers in (rare or {}).items():
        patients = rng.choice(n_patients, size=carriers, replace=False)
        frame[name] = frame["patient_id"].isin([f"p{p}" for p in patients]).astype(np.int8)
    return frame


# --------------------------------------------------------------------------- folds (no Ray)


def test_folds_are_patient_disjoint_cover_every_image_and_are_deterministic():
    data = table(60, 3)
    plan = plan_folds(data, 5, seed=1)
    held = plan.assignment
    assert sorted(held["image_id"]) == sorted(data["image_id"])  # every image held out once
    assert (held.groupby("patient_id")["fold"].nunique() == 1).all()
    assert set(held["fold"]) == {1, 2, 3, 4, 5}
    for k in range(1, 6):  # per fold: held out / train / inner val, by patient, covering everything
        part = plan.roles[plan.roles["fold"] == k]
        assert len(part) == len(data) and part["image_id"].is_unique
        assert (part.groupby("patient_id")["role"].nunique() == 1).all()
        assert set(part["role"]) == {"held_out", "train", "val"}
        val_share = (part["role"] == "val").sum() / (part["role"] != "held_out").sum()
        assert 0.05 < val_share < 0.35
    again = plan_folds(data, 5, seed=1)
    pd.testing.assert_frame_equal(plan.roles, again.roles)
    other = plan_folds(data, 5, seed=2)
    assert not held.set_index("image_id")["fold"].equals(other.assignment.set_index("image_id")["fold"])
    sizes = held.groupby("fold").size()
    assert sizes.max() - sizes.min() <= 3 * 2  # balanced within a couple of patients


def test_every_fold_holds_positives_where_possible_and_the_shortfall_is_reported():
    data = table(30, 2, rare={"Hernia": 4, "Fibrosis": 2, "Edema": 0})
    assignment, shortfalls = assign_folds(data, 4, seed=0)
    merged = assignment.merge(data, on="image_id")
    positives = (merged[list(FINDINGS)] == 1).groupby(merged["fold"]).sum()
    assert (positives["Hernia"] > 0).all()  # 4 carriers, 4 folds: one each, rarest-first
    for name in FINDINGS:
        if name not in ("Fibrosis", "Edema"):
            assert (positives[name] > 0).all(), name
    short = {s["finding"]: s for s in shortfalls}
    assert set(short) == {"Fibrosis", "Edema"}
    assert short["Fibrosis"] == {"finding": "Fibrosis", "positives": 4, "patients": 2, "folds_with_positives": 2, "folds": 4}
    assert short["Edema"]["positives"] == 0 and short["Edema"]["folds_with_positives"] == 0


def test_the_leakage_audit_fails_on_a_planted_overlap():
    data = table(20, 2)
    roles = plan_folds(data, 3, seed=0).roles
    audit_folds(roles, data)  # the real plan passes
    # A held-out patient's image also used for training in its own fold's run:
    patient = roles.loc[(roles["fold"] == 1) & (roles["role"] == "held_out"), "patient_id"].iloc[0]
    planted = roles.copy()
    row = planted.index[(planted["fold"] == 1) & (planted["patient_id"] == patient)][0]
    planted.loc[row, "role"] = "train"
    with pytest.raises(LeakageError, match="fold 1.*more than one split"):
        audit_folds(planted, data)
    # A patient held out by two folds:
    planted = roles.copy()
    image = planted.loc[(planted["fold"] == 1) & (planted["patient_id"] == patient), "image_id"].iloc[0]
    row = planted.index[(planted["fold"] == 2) & (planted["image_id"] == image)][0]
    planted.loc[row, "role"] = "held_out"
    with pytest.raises(LeakageError, match="more than one split|several"):
        audit_folds(planted, data)
    # An image held out by no fold:
    planted = roles[~((roles["role"] == "held_out") & (roles["image_id"] == image))]
    with pytest.raises(LeakageError):
        audit_folds(planted, data)


def test_bad_input_is_a_clear_user_error_before_anything_runs(tmp_path):
    data = table(4, 2)
    with pytest.raises(UserInputError, match="--folds must be an integer >= 2"):
        plan_folds(data, 1)
    with pytest.raises(UserInputError, match="--folds 5 is more than the 4 patient"):
        plan_folds(data, 5)
    with pytest.raises(UserInputError, match="--val-frac"):
        plan_folds(data, 2, val_frac=0)
    base = TrainConfig(backbone="resnet18", weights="none", freeze="none")
    empty = RunDir(tmp_path / "empty").ensure()
    with pytest.raises(UserInputError, match="--folds must be"):
        run_cv(empty, base, 1)
    with pytest.raises(UserInputError, match="no preprocessed shards.*cxr preprocess"):
        run_cv(empty, base, 3)
    assert not empty.cv.exists()


# --------------------------------------------------------------------------- end to end (real Ray)

BASE = dict(backbone="resnet18", weights="none", freeze="none", epochs=1, batch_size=8, lr=1e-3, workers=1,
            cpus_per_worker=0.5, shuffle_buffer=16)


@pytest.fixture(scope="module")
def phantom_cv_run(tmp_path_factory):
    """A small phantom run with cohorts (clinic, ward) in its manifest, as ingest --cohorts writes."""
    root = tmp_path_factory.mktemp("cv") / "run"
    collection = make_collection(root / "phantoms", n_patients=30, image_size=64, seed=3)
    run = write_run(root, collection.labels_csv, collection.images, 64, 0.25, 0.2, 3, 0)
    cohorts = pd.read_csv(collection.cohorts_csv).rename(columns={"Image Index": "image_id"})
    manifest = pd.read_parquet(run.manifest).merge(cohorts, on="image_id", how="left")
    manifest.to_parquet(run.manifest, index=False)
    return run


@pytest.mark.ray
def test_cv_end_to_end_scores_every_image_once_and_resumes(ray_local, phantom_cv_run, capsys):
    run = phantom_cv_run
    lines: list[str] = []
    from trainers.tracking import Tracker, local_store

    tracker = Tracker.open(run.root, None, "cv-test")  # the embedded MLflow store in the run directory
    result = run_cv(run, TrainConfig(**BASE), 3, seed=0, n_boot=200, progress=lines.append, verbose=True, tracker=tracker)
    out = run.cv
    assert sorted(result.trained) == [1, 2, 3] and result.resumed == []

    # MLflow: one parent run for the cross-validation, one nested run per fold with its epochs and checkpoint.
    from mlflow import MlflowClient

    client = MlflowClient(local_store(run.root)[0])
    logged = client.search_runs([client.get_experiment_by_name("cv-test").experiment_id])
    (parent,) = [r for r in logged if r.data.tags.get("cxr.stage") == "cv"]
    folds = {r.data.params["fold"]: r for r in logged if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(folds) == ["1", "2", "3"] and all(r.info.run_name == f"fold-{k}" for k, r in folds.items())
    for fold_run in folds.values():
        assert [m.step for m in client.get_metric_history(fold_run.info.run_id, "val_mean_auroc")] == [1]
        assert "best_checkpoint/model.pt" in {a.path for a in client.list_artifacts(fold_run.info.run_id, "best_checkpoint")}
    assert parent.info.status == "FINISHED" and "mean_auroc" in parent.data.metrics
    fold_lines = [line for line in lines if "held-out mean AUROC" in line]
    assert len(fold_lines) == 3 and all("/3 done in" in line for line in fold_lines)  # one line per fold, as it finished
    epochs = TrainConfig(**BASE).epochs  # --verbose: and one per epoch of every fold
    epoch_lines = [line for line in lines if line.startswith("cv: fold ") and "  epoch " in line]
    assert sorted((line.split()[2], line.split()[4]) for line in epoch_lines) == sorted((str(k), f"{e}/{epochs}") for k in (1, 2, 3) for e in range(1, epochs + 1))
    assert len(lines) == len(fold_lines) + len(epoch_lines)

    # Each fold trained in its own Ray Train run (a shared one would let a restored fold resume another's model).
    runs = [json.loads((out / "folds" / f"fold-{k}" / "config.json").read_text())["ray_path"] for k in (1, 2, 3)]
    assert [Path(p).name for p in runs] == ["fold-1", "fold-2", "fold-3"]

    # Every image of the shards scored exactly once, by the fold that held its patient out.
    oof = pd.read_parquet(out / "oof_predictions.parquet")
    shards = every_row(run.shards, ["image_id", "patient_id"])
    assert oof["image_id"].is_unique and set(oof["image_id"]) == set(shards["image_id"])
    assert (oof.groupby("patient_id")["fold"].nunique() == 1).all()
    expected = ["image_id", "patient_id", *FINDINGS, *[f"prob_{f}" for f in FINDINGS], "fold"]
    assert list(oof.columns[: len(expected)]) == expected
    roles = pd.read_parquet(out / "folds.parquet")
    held = roles[roles["role"] == "held_out"].set_index("image_id")["fold"]
    assert (oof.set_index("image_id")["fold"] == held.reindex(oof["image_id"]).to_numpy()).all()

    # Pooled per-finding AUROCs are scikit-learn's on the OOF rows.
    metrics = json.loads((out / "metrics.json").read_text())
    defined = []
    for name, f in metrics["per_finding"].items():
        y, p = oof[name].to_numpy(), oof[f"prob_{name}"].to_numpy()
        keep = y >= 0
        if len(np.unique(y[keep])) < 2:
            assert f["auroc"] is None
            continue
        defined.append(name)
        assert f["auroc"] == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-9)
        assert f["ci_low"] <= f["auroc"] <= f["ci_high"]
    assert defined and metrics["mean"]["findings"] == defined
    assert metrics["mean_auroc"] == pytest.approx(np.mean([metrics["per_finding"][f]["auroc"] for f in defined]), abs=1e-12)
    assert len(metrics["per_fold"]) == 3 and metrics["fold_mean_auroc"]["n"] == 3
    for fold in metrics["per_fold"]:
        part = oof[oof["fold"] == fold["fold"]]
        assert fold["mean_auroc"] == pytest.approx(mean_auroc(part)[0], abs=1e-12)

    # Both baselines, cross-validated: fold 2's figure is a fit on fold 2's training images only.
    assert set(metrics["baselines"]) == {"metadata", "image_statistics"}
    for b in metrics["baselines"].values():
        assert b["per_fold"]["n"] == 3 and b["diff_ci_low"] <= b["diff"] <= b["diff_ci_high"]
    train_ids = roles.loc[(roles["fold"] == 2) & (roles["role"] == "train"), "image_id"].tolist()
    held_rows = oof[oof["fold"] == 2].reset_index(drop=True)
    frame, thumbs = split_thumbnails(run.shards, train_ids + held_rows["image_id"].tolist(), 64)
    frame = with_meta(frame, run)
    where = pd.Series(range(len(frame)), index=frame["image_id"])
    tr, te = where[train_ids].to_numpy(), where[held_rows["image_id"]].to_numpy()
    refit = {b.name: b for b in fit_baselines(frame.iloc[tr], frame.iloc[tr][list(FINDINGS)].to_numpy(np.int8), thumbs[tr],
                                              frame.iloc[te], thumbs[te], 0)}
    fold2 = next(f for f in metrics["per_fold"] if f["fold"] == 2)
    for name, b in refit.items():
        assert fold2["baselines"][name] == pytest.approx(mean_auroc(held_rows, b.probs)[0], abs=1e-9)

    # Cohorts and the other subgroups, the words, the files, the lineage.
    assert set(metrics["subgroups"]["cohort"]) == {"clinic", "ward"}
    assert {"metadata", "image_statistics"} <= set(metrics["subgroups"]["cohort"]["ward"]["baselines"])
    assert "Atelectasis" in metrics["spread"]["not_in_every_fold"]  # phantoms never plant it
    results = (out / "results.md").read_text()
    for heading in ("## Pooled out-of-fold", "## Per fold", "## Baselines, cross-validated", "## By cohort", "## Where the model fails"):
        assert heading in results
    assert "shards" in json.loads((out / "lineage.json").read_text())  # which shards the CV came from
    summary = cv_summary(result)
    assert "pooled out-of-fold mean AUROC" in summary and "cohort ward" in summary and "per fold" in summary
    page = write_report(run).read_text()
    assert 'id="cv"' in page and "Pooled out-of-fold mean AUROC" in page

    # Resume: nothing is trained again, and it says so.
    model_files = {k: (out / "folds" / f"fold-{k}" / "best" / "model.pt").stat().st_mtime_ns for k in (1, 2, 3)}
    capsys.readouterr()
    # A cross-validation started before a training option existed resumes: the option takes its default.
    stored = json.loads((out / "settings.json").read_text())
    del stored["train_config"]["ema"]
    (out / "settings.json").write_text(json.dumps(stored))
    # through the command line, as a user resumes it: `cxr cv --folds 3 --resume` with the same training options
    args = ["--backbone", "resnet18", "--weights", "none", "--freeze", "none", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
            "--workers", "1", "--cpus-per-worker", "0.5", "--shuffle-buffer", "16", "--seed", "0", "--bootstrap", "200"]
    assert main(["cv", "--run", str(run.root), "--folds", "3", "--resume", *args]) == 0
    printed = capsys.readouterr().out
    assert "already finished" in printed and "held-out mean AUROC" not in printed
    assert "pooled out-of-fold mean AUROC" in printed and "resumed: fold(s) 1, 2, 3" in printed and "cxr cv: done in" in printed
    assert {k: (out / "folds" / f"fold-{k}" / "best" / "model.pt").stat().st_mtime_ns for k in (1, 2, 3)} == model_files
    assert json.loads((out / "metrics.json").read_text())["mean_auroc"] == pytest.approx(metrics["mean_auroc"])
    assert main(["cv", "--run", str(run.root), "--folds", "1", *args]) == 1  # a clear one-line error, nothing run
    assert "--folds must be at least 2" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="other settings"):
        run_cv(run, TrainConfig(**{**BASE, "lr": 3e-3}), 3, seed=0, n_boot=200, resume=True, progress=lines.append)
