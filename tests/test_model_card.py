"""The model card (``cxr card``): every fact read from the run's files, every limitation derived from
its numbers, absent parts named with the command that makes them, the JSON and the Markdown saying
the same, and the report showing it.

Most tests build a run directory's files directly (no Ray, no training): the manifest, split and
checkpoint files, and an ``eval/metrics.json`` made by the evaluation's own functions
(``finding_metrics``, ``compare``, ``subgroup_table``) from synthetic scores, so its format is the
one ``cxr evaluate`` writes. One test reads the session's real evaluated phantom run.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.cli import main
from evaluation.card import build_card, stale_inputs, write_card
from evaluation.card_markdown import card_markdown
from pipelines.formatting import estimate, number
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from tests.test_eval_fixtures import evaluated_run, phantom_run  # session fixtures (built once per session)

N_BOOT = 100
# Prevalence per finding: frequent ones, a rare one (Hernia: a handful of test positives) and absent ones.
PREVALENCE = {"Cardiomegaly": 0.35, "Effusion": 0.35, "Mass": 0.3, "Nodule": 0.25, "Pneumothorax": 0.3, "Hernia": 0.04}


def _manifest(n_patients: int = 150, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        sex, age, cohort = rng.choice(["M", "F"]), int(rng.integers(20, 85)), "ward" if p % 3 == 0 else "clinic"
        for k in range(2):
            labels = {f: int(rng.random() < PREVALENCE.get(f, 0.0)) for f in FINDINGS}
            rows.append({"image_id": f"{p:05d}_{k:03d}.png", "path": f"images/{p:05d}_{k:03d}.png", "patient_id": f"{p:05d}",
                         "study": k, "age": age, "sex": sex, "view": rng.choice(["PA", "AP"]), **labels, "source": "nih", "cohort": cohort})
    frame = pd.DataFrame(rows)
    frame[list(FINDINGS)] = frame[list(FINDINGS)].astype("int8")
    return frame


def _scores(labels: np.ndarray, rng: np.random.Generator, signal: float) -> np.ndarray:
    return np.clip(signal * labels + rng.random(labels.shape) * (1 - signal), 0, 1)


def _write_metrics(run: RunDir, manifest: pd.DataFrame, splits: pd.DataFrame, checkpoint: Path) -> None:
    """``eval/metrics.json`` and ``eval/subgroups.csv`` as ``evaluate_run`` assembles them, from synthetic scores."""
    from evaluation.baselines import Baseline, compare
    from evaluation.bootstrap import bootstrap_auroc
    from evaluation.evaluate import failure_lines, finding_metrics, mean_figures
    from evaluation.subgroups import subgroup_table, subgroups_json

    rng = np.random.default_rng(1)
    frame = manifest.merge(splits[["image_id", "split"]], on="image_id")
    test, val = frame[frame["split"] == "test"].reset_index(drop=True), frame[frame["split"] == "val"]
    findings = list(FINDINGS)
    labels, val_labels = test[findings].to_numpy(np.int8), val[findings].to_numpy(np.int8)
    probs, val_probs = _scores(labels, rng, 0.25), _scores(val_labels, rng, 0.25)
    base = rng.random(labels.shape)  # a baseline that knows nothing
    test = test.assign(**{f"prob_{f}": probs[:, j] for j, f in enumerate(findings)})
    patients = test["patient_id"].to_numpy()
    reps = bootstrap_auroc(labels, probs, patients, N_BOOT, 0)
    per = {f: finding_metrics(labels[:, j], probs[:, j], reps[:, j], val_labels[:, j], val_probs[:, j]) for j, f in enumerate(findings)}
    mean = mean_figures(per, reps, findings)
    comparisons = {"metadata": compare(labels, probs, patients, findings, Baseline("metadata", base, ["age", "sex", "view"]), N_BOOT, 0)}
    groups = subgroup_table(test, findings, ["sex", "cohort"], {"metadata": base}, n_boot=N_BOOT, seed=0)
    run.eval.mkdir(parents=True, exist_ok=True)
    groups.to_csv(run.eval / "subgroups.csv", index=False)
    metrics = {"checkpoint": str(checkpoint), "backbone": "resnet18", "image_size": 64, "split": "test",
               "n_images": len(test), "n_patients": int(test["patient_id"].nunique()), "val_images": len(val),
               "bootstrap": {"unit": "patient", "n_boot": N_BOOT, "seed": 0, "level": 0.95, "method": "percentile"},
               "operating_point": {"rule": "youden", "chosen_on": "val"}, "per_finding": per, "mean": mean, "mean_auroc": mean["auroc"],
               "view_shift": None, "baselines": comparisons, "subgroups": subgroups_json(groups, ["metadata"]),
               "warnings": failure_lines(mean, comparisons, groups), "files": {}, "figures": {}}
    run.eval_metrics.write_text(json.dumps(metrics, indent=2))


def _write_robustness(run: RunDir, clean: float, blur_step: float = 0.03) -> None:
    """``eval/robustness.csv`` in ``robustness_table``'s columns: blur costs ``blur_step`` per level, the rest 0.005."""
    from evaluation.robustness import PERTURBATIONS

    rows = [{"perturbation": p.name, "label": p.label, "level": level, "strength": p.clean if level == 0 else p.strengths[level - 1],
             "mean_auroc": clean - level * (blur_step if p.name == "blur" else 0.005)}
            for p in PERTURBATIONS for level in range(len(p.strengths) + 1)]
    pd.DataFrame(rows).to_csv(run.eval / "robustness.csv", index=False)


def write_evaluated_files(root: Path) -> RunDir:
    """A run directory holding what ingest, split, train, evaluate and explain write, without running them."""
    from pipelines.split import split_patients
    from trainers.checkpoint import model_info

    run = RunDir(root).ensure()
    manifest = _manifest()
    splits = split_patients(manifest, test_frac=0.3, val_frac=0.2, min_positives=3, seed=0).splits
    manifest.to_parquet(run.manifest, index=False)
    splits.to_parquet(run.splits, index=False)
    pd.DataFrame({"stage": ["ingest"], "reason": ["missing image file"]}).to_parquet(run.quarantine, index=False)
    merged = manifest.merge(splits[["image_id", "split"]], on="image_id")
    counts = merged.groupby("split").agg(images=("image_id", "size"), patients=("patient_id", "nunique"))
    run.split_report.write_text(json.dumps({
        "seed": 0, "counts": {s: {k: int(v) for k, v in r.items()} for s, r in counts.iterrows()},
        "positives": {f: {s: int(merged.loc[merged["split"] == s, f].eq(1).sum()) for s in ("train", "val", "test")} for f in FINDINGS},
        "patients_in_two_splits": 0}))
    run.source_json.write_text(json.dumps({"source": "nih", "label_file": "/data/nih/Data_Entry_2017.csv", "images": "/data/nih"}))
    config = {"backbone": "resnet18", "weights": "imagenet", "freeze": "auto", "effective_freeze": "partial", "loss": "auto",
              "effective_loss": "weighted", "sampling": "none", "epochs": 3, "batch_size": 16, "lr": 3e-4, "seed": 0}
    run.train_best.mkdir(parents=True)
    (run.train_best / "model.pt").write_bytes(b"weights of the model")
    (run.train_best / "model.json").write_text(json.dumps(model_info(config, 64, 0.5, 0.25, 3, {"val_mean_auroc": 0.7})))
    _write_metrics(run, manifest, splits, run.train_best)
    _write_robustness(run, json.loads(run.eval_metrics.read_text())["mean"]["auroc"])
    run.explain.mkdir()
    run.explain_pointing.write_text(json.dumps({"n": 20, "hits": 12, "hit_rate": 0.6, "baseline": 0.1, "hit_rate_tolerant": 0.7,
                                                "baseline_tolerant": 0.15, "tolerance": 0.067, "splits": "val+test", "per_finding": {}}))
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return write_evaluated_files(tmp_path_factory.mktemp("card") / "run").root


@pytest.fixture
def run(built, tmp_path) -> RunDir:
    """A fresh copy of the built run for each test to change."""
    return RunDir(shutil.copytree(built, tmp_path / "run"))


def _metrics(run: RunDir) -> dict:
    return json.loads(run.eval_metrics.read_text())


def _edit_metrics(run: RunDir, change) -> None:
    metrics = _metrics(run)
    change(metrics)
    run.eval_metrics.write_text(json.dumps(metrics))


def _limits(card: dict, kind: str) -> list[str]:
    return [x["text"] for x in card["limitations"] if x["kind"] == kind]


# --------------------------------------------------------------------------- tests


def test_card_reads_the_run_files_and_a_changed_metric_shows_in_it(run):
    card = write_card(run)
    md = run.model_card.read_text()
    m = _metrics(run)
    mean = m["mean"]
    assert f"Mean AUROC **{estimate(mean['auroc'], mean['ci_low'], mean['ci_high'])}**" in md
    model = card["sections"]["model"]
    import hashlib

    assert model["sha256"] == hashlib.sha256(b"weights of the model").hexdigest() and model["sha256"] in md
    assert model["recipe"]["freeze"] == "partial" and model["recipe"]["loss"] == "weighted" and model["starting_weights"] == "imagenet"
    assert "NLP-mined from the radiology reports" in md and "90%" in md  # NIH's label source and its noise
    assert "Clinical decisions of any kind" in md and "this is a research model, not a medical device" in md
    test_count = json.loads(run.split_report.read_text())["counts"]["test"]
    assert f"| test | {test_count['images']:,} | {test_count['patients']:,} |" in md

    _edit_metrics(run, lambda x: x["mean"].update(auroc=0.4321, ci_low=0.3012, ci_high=0.5987))
    md = card_markdown(build_card(run))
    assert "Mean AUROC **0.43 [0.30-0.60]**" in md


def test_few_test_positives_is_a_limitation_only_below_the_threshold(run):
    per = _metrics(run)["per_finding"]
    assert 0 < per["Hernia"]["n_positive"] < 10 and all(per[f]["n_positive"] >= 10 for f in ("Cardiomegaly", "Effusion"))
    few = " ".join(_limits(build_card(run), "few_positives"))
    assert "Hernia (" in few and "Cardiomegaly" not in few and "No positive test image of Atelectasis" in few

    _edit_metrics(run, lambda x: x["per_finding"]["Cardiomegaly"].update(n_positive=7))
    few = " ".join(_limits(build_card(run), "few_positives"))
    assert "Cardiomegaly (7, AUROC" in few
    assert "Cardiomegaly" not in " ".join(_limits(build_card(run, min_positives=5), "few_positives"))


def test_a_baseline_the_model_does_not_beat_is_a_limitation_and_goes_when_it_does(run):
    def per_finding_lines(card: dict) -> str:
        return " ".join(t for t in _limits(card, "baseline") if t.startswith("For "))

    card = build_card(run)
    assert card["sections"]["baselines"]["baselines"]["metadata"]["beaten"]
    assert not any(t.startswith("Overall") for t in _limits(card, "baseline")) and "Mass" not in per_finding_lines(card)

    def not_beaten(m: dict) -> None:
        m["baselines"]["metadata"].update(diff=0.01, diff_ci_low=-0.02, diff_ci_high=0.04)
        m["baselines"]["metadata"]["per_finding"]["Mass"].update(diff=-0.03, diff_ci_low=-0.11, diff_ci_high=0.05)

    _edit_metrics(run, not_beaten)
    card = build_card(run)
    assert any(t.startswith("Overall, the model is not shown to beat a metadata-only baseline") and "+0.010 [-0.020, +0.040]" in t
               for t in _limits(card, "baseline"))
    assert "Mass -0.03 [-0.11, +0.05]" in per_finding_lines(card)
    assert "Mass" in card["sections"]["baselines"]["baselines"]["metadata"]["findings_not_beaten"]

    _edit_metrics(run, lambda m: m["baselines"]["metadata"].update(diff=0.2, diff_ci_low=0.001, diff_ci_high=0.4))
    _edit_metrics(run, lambda m: m["baselines"]["metadata"]["per_finding"]["Mass"].update(diff=0.2, diff_ci_low=0.05, diff_ci_high=0.3))
    card = build_card(run)
    assert not any(t.startswith("Overall") for t in _limits(card, "baseline")) and "Mass" not in per_finding_lines(card)


def test_robustness_and_pointing_limitations_follow_their_files(run):
    blur = [t for t in _limits(build_card(run), "robustness")]
    assert len(blur) == 1 and blur[0].startswith("Under blur") and "-0.12" in blur[0]
    _write_robustness(run, 0.8, blur_step=0.01)  # blur now costs 0.04: within 0.05
    assert _limits(build_card(run), "robustness") == []
    assert _limits(build_card(run), "pointing") == []
    run.explain_pointing.write_text(json.dumps({"n": 10, "hits": 1, "hit_rate": 0.1, "baseline": 0.12, "hit_rate_tolerant": 0.2,
                                                "baseline_tolerant": 0.2, "tolerance": 0.067}))
    assert "no better than a random point (12%)" in _limits(build_card(run), "pointing")[0]


def test_missing_sections_say_which_command_makes_them(run, tmp_path):
    for path in (run.eval, run.explain):
        shutil.rmtree(path)
    card = build_card(run)
    md = card_markdown(card)
    for key in ("subgroups", "baselines", "calibration", "robustness"):
        assert card["sections"][key]["missing"] == f"not evaluated: run `cxr evaluate --run {run.root}`"
    assert card["sections"]["metrics"]["cv"]["missing"] == f"not evaluated: run `cxr cv --run {run.root}`"
    assert f"_Not evaluated: run `cxr explain --run {run.root}`" in md
    assert len(re.findall(r"^## ", md, re.M)) == 11  # every section keeps its heading
    judged = next(line for line in md.splitlines() if line.startswith("- Not evaluated, so not judged: "))
    assert all(title in judged for title in ("Subgroups", "Robustness", "Pointing game", "Metrics (internal)", "Metrics (cv)"))
    # the model is the run's train/best when nothing was evaluated
    assert card["sections"]["model"]["checkpoint"] == "train/best"

    bare = RunDir(tmp_path / "bare").ensure()
    card = build_card(bare)
    assert card["sections"]["model"]["missing"].startswith("no trained model: run `cxr train")
    assert card["sections"]["training_data"]["missing"] == f"no split yet: run `cxr split --run {bare.root}`"


def test_the_json_parses_and_states_the_markdown_numbers(run):
    main(["card", "--run", str(run.root), "--min-positives", "12"])
    card = json.loads(run.model_card_json.read_text())  # strict JSON: no NaN
    md = run.model_card.read_text()
    assert card["thresholds"] == {"min_test_positives": 12, "max_robustness_drop": 0.05}
    internal = card["sections"]["metrics"]["internal"]
    assert internal["mean"]["auroc"] == _metrics(run)["mean"]["auroc"]
    for finding, m in internal["per_finding"].items():
        if m["auroc"] is not None:
            assert f"| {finding.replace('_', ' ')} | {m['n_positive']} / {m['n_negative']} | {estimate(m['auroc'], m['ci_low'], m['ci_high'])} |" in md
    for group in card["sections"]["subgroups"]["groups"]:
        assert estimate(group["auroc"], group["ci_low"], group["ci_high"]) in md
    assert f"mean {number(card['sections']['calibration']['mean_ece'], 3)}" in md
    assert card["limitations"] and all(f"- {x['text']}." in md for x in card["limitations"])
    assert "nan" not in md.lower().replace("nan ", "")  # no undefined figure printed as nan
    assert not re.search(r"\bnan\b", md, re.I)
    assert stale_inputs(run, card) == []
    _edit_metrics(run, lambda m: m["mean"].update(auroc=0.5))
    assert stale_inputs(run, card) == ["eval/metrics.json"]


def test_the_report_shows_the_card_and_says_when_it_is_missing_or_stale(run):
    from evaluation import write_report

    text = write_report(run).read_text()
    assert '<section id="card"' in text and f"No model card yet: run <code>cxr card --run {run.root}</code>" in text
    card = write_card(run)
    text = write_report(run).read_text()
    assert 'href="model_card.md"' in text and card["sections"]["model"]["sha256"] in text
    assert "Limitations (derived from the numbers)" in text and "Hernia (" in text
    _edit_metrics(run, lambda m: m["mean"].update(auroc=0.5))
    assert "This card is out of date" in write_report(run).read_text()


def test_card_on_the_real_evaluated_phantom_run(evaluated_run):
    """On the session's real run (ResNet18 trained, ``evaluate_run`` and ``explain_run`` done)."""
    run = evaluated_run.phantom.run
    assert main(["card", "--run", str(run.root)]) == 0
    card = json.loads(run.model_card_json.read_text())
    metrics = evaluated_run.evaluation.metrics
    parts = card["sections"]
    assert parts["model"]["backbone"] == "resnet18" and parts["model"]["checkpoint"] == "train/best"
    assert parts["training_data"]["collection"].startswith("synthetic phantoms")
    assert parts["metrics"]["internal"]["mean"]["auroc"] == pytest.approx(metrics["mean"]["auroc"])
    assert parts["pointing"]["status"] == "present" and parts["robustness"]["status"] == "present"
    assert parts["metrics"]["cv"]["status"] == "missing" and parts["metrics"]["external"]["status"] == "missing"
    md = run.model_card.read_text()
    assert estimate(metrics["mean"]["auroc"], metrics["mean"]["ci_low"], metrics["mean"]["ci_high"]) in md
    # the phantoms carry 5 findings: the other 9 have no positive test image, said as a limitation
    assert any(t.startswith("No positive test image of Atelectasis") for t in _limits(card, "few_positives"))


def test_subgroups_external_sets_and_cross_validation_enter_the_card(run, capsys):
    groups = pd.read_csv(run.eval / "subgroups.csv")
    ward = (groups["attribute"] == "cohort") & (groups["group"] == "ward") & (groups["finding"] == "mean")
    groups.loc[ward, ["auroc", "ci_low", "ci_high"]] = [0.41, 0.32, 0.5]
    groups.to_csv(run.eval / "subgroups.csv", index=False)
    external = _metrics(run)
    external["mean"].update(auroc=0.52, ci_low=0.44, ci_high=0.6)
    (run.external("site-b") / "eval").mkdir(parents=True)
    RunDir(run.external("site-b")).eval_metrics.write_text(json.dumps(external))
    run.cv.mkdir()
    (run.cv / "metrics.json").write_text(json.dumps({
        "folds": 3, "n_images": 300, "n_patients": 150, "mean": {"auroc": 0.71, "ci_low": 0.66, "ci_high": 0.76},
        "fold_mean_auroc": {"mean": 0.7, "sd": 0.03, "n": 3}, "warnings": ["Overall, the model is not shown to beat X"]}))

    card = build_card(run)
    md = card_markdown(card)
    assert any(t.startswith("On cohort ward (30 images") and "0.41 [0.32-0.50]" in t for t in _limits(card, "subgroup"))
    assert next(g for g in card["sections"]["subgroups"]["groups"] if g["group"] == "ward")["below_overall"]
    assert "| cohort | ward | 30 / 15 | 0.41 [0.32-0.50] |" in md and "**below overall**" in md
    assert _limits(card, "external")[0].startswith("On external set site-b") and "**site-b**: mean AUROC **0.52 [0.44-0.60]**" in md
    assert _limits(card, "cv") == ["In cross-validation: Overall, the model is not shown to beat X"]
    assert "Pooled out-of-fold mean AUROC **0.71 [0.66-0.76]**" in md and "per fold 0.70 ± 0.03" in md
    assert card["sections"]["metrics"]["external"]["status"] == card["sections"]["metrics"]["cv"]["status"] == "present"

    assert main(["card", "--run", str(run.root), "--max-drop", "2"]) == 1
    assert "--max-drop must be between 0 and 1, got 2.0" in capsys.readouterr().err


def test_cxr_run_and_the_demo_write_the_card_after_the_evaluations_and_before_the_report(tmp_path):
    from cxr.demo import demo_config
    from cxr.pipeline import build_stages, enabled_stages, upstream

    config = demo_config(str(tmp_path / "demo"))
    assert [s.name for s in build_stages(config)][-3:] == ["explain", "card", "report"]
    on = enabled_stages(config)
    assert {"evaluate", "explain"} <= set(upstream("card", on)) and "card" in upstream("report", on)
