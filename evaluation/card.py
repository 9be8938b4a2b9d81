"""``cxr card``: the model card of a run, after "Model Cards for Model Reporting" (Mitchell et al.,
FAT* 2019): model details, intended use, training and evaluation data, metrics with intervals,
subgroups, baselines, calibration, robustness, the pointing game and the limitations.

Every fact is read from the run's files (the checkpoint's ``model.json``, ``split_report.json``,
``eval/metrics.json``, ``eval/subgroups.csv``, ``eval/robustness.csv``, ``explain/pointing.json``,
``cv/metrics.json``, each external set's ``eval/metrics.json``), and every limitation sentence is
made from those numbers by the rules below, never typed by hand: a card must change when the model
does. A section whose files are absent says which command makes them instead of disappearing.
``build_card`` returns the facts as one dict; ``model_card.json`` is that dict, and
``model_card.md`` (evaluation/card_markdown.py) and the report's card section render it.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.baselines import WORDS, not_shown_to_beat, verdict
from evaluation.card_markdown import card_markdown
from evaluation.external import below_internal, external_metrics
from evaluation.metrics import nan_to_none
from evaluation.subgroups import MEAN, below_overall, not_beating_baselines
from pipelines.atomic import write_json, write_text
from pipelines.errors import UserInputError
from pipelines.formatting import estimate, number, percent, signed
from pipelines.lineage import file_sha256
from pipelines.rundir import INFO_FILE, MODEL_FILE, RunDir

FORMAT = "cxr-model-card/1"
MIN_TEST_POSITIVES = 10  # fewer positive test images than this: the finding's AUROC is too uncertain to trust
MAX_ROBUSTNESS_DROP = 0.05  # a perturbation costing more mean AUROC than this is a limitation
SPLITS = ("train", "val", "test")
# What the checkpoint folder's training settings say about the recipe, in the card's order.
RECIPE = ("freeze", "loss", "sampling", "uncertain", "epochs", "patience", "batch_size", "lr", "weight_decay", "augment", "workers", "seed")
PHANTOMS = "phantoms"  # where `source: phantoms` (cxr demo) makes its collection inside the run


def build_card(run: RunDir, min_positives: int = MIN_TEST_POSITIVES, max_drop: float = MAX_ROBUSTNESS_DROP) -> dict[str, Any]:
    """The model card's facts and its limitations, read from the run directory."""
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    if min_positives < 1 or not 0 < max_drop < 1:
        raise UserInputError(f"--min-positives must be >= 1 and --max-drop between 0 and 1, got {min_positives} and {max_drop}")
    metrics = _read_json(run.eval_metrics)
    cv = _read_json(run.cv / "metrics.json")
    externals = external_metrics(run)
    model = _model(run, metrics)
    training = _training_data(run)
    sections = {
        "model": model,
        "intended_use": _intended_use(model, training),
        "training_data": training,
        "evaluation_data": _evaluation_data(run, metrics, externals, cv),
        "metrics": _metrics(run, metrics, externals, cv),
        "subgroups": _subgroups(run, metrics),
        "baselines": _baselines(run, metrics),
        "calibration": _calibration(run, metrics),
        "robustness": _robustness(run, metrics, max_drop),
        "pointing": _pointing(run),
    }
    card = {
        "format": FORMAT,
        "run": str(run.root),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "thresholds": {"min_test_positives": min_positives, "max_robustness_drop": max_drop},
        "inputs": input_digests(run, metrics),
        "sections": sections,
        "limitations": limitations(run, sections, metrics, externals, cv, min_positives, max_drop),
    }
    return _json_safe(card)


def write_card(run: RunDir, min_positives: int = MIN_TEST_POSITIVES, max_drop: float = MAX_ROBUSTNESS_DROP) -> dict[str, Any]:
    """Write ``<run>/model_card.json`` and ``<run>/model_card.md`` (each by one rename); returns the card."""
    card = build_card(run, min_positives, max_drop)
    write_json(run.model_card_json, card)
    write_text(run.model_card, card_markdown(card))
    return card


def read_card(run: RunDir) -> dict[str, Any] | None:
    """``model_card.json`` as written, or None when the run has none (or it is not a card)."""
    card = _read_json(run.model_card_json)
    return card if card and card.get("format") == FORMAT else None


def stale_inputs(run: RunDir, card: dict[str, Any]) -> list[str]:
    """The input files that changed, appeared or went away since the card was made."""
    now = input_digests(run, _read_json(run.eval_metrics))
    then = card.get("inputs", {})
    return sorted(name for name in set(now) | set(then) if now.get(name) != then.get(name))


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserInputError(f"{path} is not valid JSON ({err}): re-run the command that wrote it") from None


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _checkpoint(run: RunDir, metrics: dict | None) -> Path | None:
    """The model the card describes: the one evaluated, else the one the run's later stages would use."""
    if metrics and metrics.get("checkpoint"):
        return Path(metrics["checkpoint"])
    return run.find_best_checkpoint()


def _inputs(run: RunDir, metrics: dict | None) -> list[Path]:
    checkpoint = _checkpoint(run, metrics)
    paths = [run.source_json, run.manifest, run.splits, run.split_report, run.eval_metrics, run.eval / "subgroups.csv",
             run.eval / "robustness.csv", run.explain_pointing, run.cv / "metrics.json"]
    if checkpoint is not None:
        paths.append(checkpoint / INFO_FILE)
    if run.externals.is_dir():
        paths += [RunDir(p).eval_metrics for p in sorted(run.externals.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [p for p in paths if p.is_file()]


def input_digests(run: RunDir, metrics: dict | None) -> dict[str, str]:
    """SHA-256 of every file the card reads (relative to the run where it lies inside it)."""
    return {_rel(p, run): file_sha256(p) for p in _inputs(run, metrics)}


def _rel(path: Path, run: RunDir) -> str:
    path = Path(path).resolve()
    return path.relative_to(run.root).as_posix() if path.is_relative_to(run.root) else str(path)


def _missing(text: str) -> dict[str, str]:
    return {"status": "missing", "missing": text}


def _json_safe(value: Any) -> Any:
    """NaN (an undefined figure) as null, numpy scalars as Python ones: the card is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _not_evaluated(run: RunDir, command: str) -> str:
    return f"not evaluated: run `cxr {command} --run {run.root}`"


# --------------------------------------------------------------------------- sections


def _model(run: RunDir, metrics: dict | None) -> dict:
    checkpoint = _checkpoint(run, metrics)
    if checkpoint is None:
        return _missing(f"no trained model: run `cxr train --run {run.root}` (or `cxr tune`)")
    if not (checkpoint / INFO_FILE).is_file():
        return _missing(f"the evaluated checkpoint {checkpoint} has no {INFO_FILE} any more: re-run `cxr evaluate --run {run.root}`")
    info = json.loads((checkpoint / INFO_FILE).read_text())
    cfg = info.get("train_config") or {}
    recipe = {"freeze": cfg.get("effective_freeze", cfg.get("freeze")), "loss": cfg.get("effective_loss", cfg.get("loss"))}
    recipe |= {k: cfg[k] for k in RECIPE if k not in recipe and cfg.get(k) is not None}
    made_by = {run.tune_best.resolve(): "cxr tune (the strategy search's best trial)", run.train_best.resolve(): "cxr train"}
    weights = checkpoint / MODEL_FILE
    return {
        "status": "present",
        "checkpoint": _rel(checkpoint, run),
        "made_by": made_by.get(checkpoint.resolve(), "given with --checkpoint"),
        "backbone": info.get("backbone"),
        "starting_weights": cfg.get("weights"),
        "image_size": info.get("image_size"),
        "findings": list(info.get("findings") or []),
        "normalization": info.get("normalization"),
        "recipe": {k: v for k, v in recipe.items() if v is not None},
        "epoch": info.get("epoch"),
        "val_mean_auroc": (info.get("metrics") or {}).get("val_mean_auroc"),
        "trained": (datetime.fromtimestamp(weights.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                    if weights.is_file() else None),
        "sha256": file_sha256(weights) if weights.is_file() else None,
        "size_bytes": weights.stat().st_size if weights.is_file() else None,
    }


def _label_note(source: dict, run: RunDir) -> tuple[str, str]:
    """(collection, where its labels come from and their known noise)."""
    from pipelines.phantoms import LABEL_NOTE as PHANTOM_NOTE
    from pipelines.sources import LABEL_NOTES

    label_file = Path(source.get("label_file") or "")
    if source.get("label_file") and label_file.resolve().is_relative_to(run.root / PHANTOMS):
        return "synthetic phantoms (cxr demo)", PHANTOM_NOTE
    name = source.get("source")
    return f"{name} ({label_file.name})" if name else "unknown", LABEL_NOTES.get(name, "not recorded (no source.json)")


def _training_data(run: RunDir) -> dict:
    report = _read_json(run.split_report)
    if report is None:
        return _missing(f"no split yet: run `cxr split --run {run.root}`")
    source = _read_json(run.source_json) or {}
    collection, note = _label_note(source, run)
    counts = {s: report["counts"][s] for s in SPLITS if s in report.get("counts", {})}
    positives = {f: {s: int(by.get(s, 0)) for s in SPLITS} for f, by in (report.get("positives") or {}).items()}
    out = {"status": "present", "collection": collection, "label_source": note, "splits": counts, "positives": positives,
           "patients_in_two_splits": report.get("patients_in_two_splits"), "split_seed": report.get("seed")}
    if run.quarantine.is_file():
        out["quarantined"] = int(len(pd.read_parquet(run.quarantine, columns=["stage"])))
    if run.manifest.is_file() and run.splits.is_file():
        manifest = pd.read_parquet(run.manifest)
        frame = manifest.merge(pd.read_parquet(run.splits)[["image_id", "split"]], on="image_id")
        if "cohort" in frame:
            out["cohorts"] = {s: frame.loc[frame["split"] == s, "cohort"].astype(str).value_counts().sort_index().to_dict() for s in SPLITS}
        train = frame[frame["split"] == "train"]
        people: dict[str, Any] = {}
        if "age" in train and pd.to_numeric(train["age"], errors="coerce").notna().any():
            age = pd.to_numeric(train["age"], errors="coerce").dropna()
            people["age"] = {"min": int(age.min()), "median": float(age.median()), "max": int(age.max())}
        for column in ("sex", "view"):
            if column in train:
                people[column] = train[column].astype(str).value_counts().sort_index().to_dict()
        out["train_population"] = people
    return out


def _intended_use(model: dict, training: dict) -> dict:
    """The purpose is the project's; the boundaries (findings, views, ages, cohorts) come from the data."""
    findings = model.get("findings") or []
    trained_on = []
    people = training.get("train_population") or {}
    if people.get("view"):
        trained_on.append(f"views other than {', '.join(people['view'])}")
    if people.get("age"):
        trained_on.append(f"patients younger than {people['age']['min']} or older than {people['age']['max']} years")
    cohorts = sorted({c for by in (training.get("cohorts") or {}).values() for c in by})
    if cohorts:
        trained_on.append(f"collections and sites other than {', '.join(cohorts)} (unless scored under external validation below)")
    elif training.get("collection"):
        trained_on.append(f"collections other than {training['collection']} (unless scored under external validation below)")
    out_of_scope = [
        "Clinical decisions of any kind (diagnosis, triage, screening, ruling a finding out): this is a research model, "
        "not a medical device; it has not been validated prospectively, on a clinical population, or by any regulator",
        *([f"Findings other than the {len(findings)} it scores"] if findings else []),
        *([f"Images unlike those it was trained on: {'; '.join(trained_on)}"] if trained_on else []),
    ]
    if str(training.get("collection", "")).startswith("synthetic"):
        out_of_scope.append("Any real radiograph: the model learned synthetic phantoms and demonstrates the pipeline only")
    return {
        "status": "present",
        "primary": ("research: to study how well a chest X-ray classifier trained this way separates "
                    + (f"{len(findings)} findings ({', '.join(f.replace('_', ' ') for f in findings)})" if findings else "the findings")
                    + " on these data, for whom it works less well, and where it looks"),
        "users": "machine-learning researchers and engineers, reading it with the limitations below",
        "out_of_scope": out_of_scope,
    }


def _evaluation_data(run: RunDir, metrics: dict | None, externals: dict[str, dict], cv: dict | None) -> dict:
    if not metrics and not externals and not cv:
        return _missing(_not_evaluated(run, "evaluate"))
    out: dict[str, Any] = {"status": "present"}
    if metrics:
        out["internal_test"] = {"n_images": metrics["n_images"], "n_patients": metrics["n_patients"],
                                "thresholds_chosen_on": f"validation split ({metrics.get('val_images', '?')} images)",
                                "positives": {f: m["n_positive"] for f, m in metrics["per_finding"].items()}}
    else:
        out["internal_test"] = _missing(_not_evaluated(run, "evaluate"))
    sets = {}
    for name, m in externals.items():
        source = _read_json(RunDir(run.external(name)).source_json) or {}
        sets[name] = {"n_images": m["n_images"], "n_patients": m["n_patients"], "source": source.get("source"),
                      "label_file": Path(source.get("label_file") or "").name or None}
    out["external"] = sets
    if cv:
        out["cv"] = {"folds": cv["folds"], "n_images": cv["n_images"], "n_patients": cv["n_patients"]}
    return out


def _figures(m: dict | None) -> dict | None:
    return None if m is None else {k: m.get(k) for k in ("auroc", "ci_low", "ci_high", "ap", "n_positive", "n_negative", "note") if k in m}


def _metrics(run: RunDir, metrics: dict | None, externals: dict[str, dict], cv: dict | None) -> dict:
    out: dict[str, Any] = {}
    if metrics:
        out["internal"] = {"status": "present", "n_images": metrics["n_images"], "n_patients": metrics["n_patients"],
                           "bootstrap": metrics.get("bootstrap"), "mean": _figures(metrics["mean"]),
                           "per_finding": {f: _figures(m) for f, m in metrics["per_finding"].items()}}
    else:
        out["internal"] = _missing(_not_evaluated(run, "evaluate"))
    if externals:
        out["external"] = {"status": "present", "sets": {
            name: {"n_images": m["n_images"], "n_patients": m["n_patients"], "mean": _figures(m["mean"]),
                   "per_finding": {f: _figures(x) for f, x in m["per_finding"].items() if x.get("auroc") is not None}}
            for name, m in externals.items()}}
    else:
        out["external"] = _missing(f"not evaluated: no external set; run `cxr external --run {run.root} --name NAME --source ... --csv ... --images ...`")
    if cv:
        out["cv"] = {"status": "present", "folds": cv["folds"], "n_images": cv["n_images"], "n_patients": cv["n_patients"],
                     "mean": _figures(cv["mean"]), "fold_mean_auroc": cv.get("fold_mean_auroc")}
    else:
        out["cv"] = _missing(_not_evaluated(run, "cv"))
    return out


def _subgroup_rows(run: RunDir) -> pd.DataFrame | None:
    table = _read_csv(run.eval / "subgroups.csv")
    return None if table is None or table.empty else table


def _subgroups(run: RunDir, metrics: dict | None) -> dict:
    if not metrics:
        return _missing(_not_evaluated(run, "evaluate"))
    table = _subgroup_rows(run)
    if table is None:
        return _missing(f"not evaluated: the test split has no subgroup column (sex, age, view, cohort); "
                        f"run `cxr evaluate --run {run.root} --subgroups COL`")
    overall = metrics["mean"]["auroc"]
    rows = []
    for r in table[table["finding"] == MEAN].itertuples():
        rows.append({"attribute": r.attribute, "group": str(r.group), "n_images": int(r.n_images), "n_patients": int(r.n_patients),
                     **{k: nan_to_none(float(getattr(r, k))) for k in ("auroc", "ci_low", "ci_high", "gap", "gap_ci_low", "gap_ci_high")},
                     "below_overall": bool(overall is not None and not math.isnan(r.ci_high) and r.ci_high < overall)})
    return {"status": "present", "overall_mean_auroc": overall, "groups": rows}


def _baselines(run: RunDir, metrics: dict | None) -> dict:
    if not metrics:
        return _missing(_not_evaluated(run, "evaluate"))
    baselines = metrics.get("baselines") or {}
    if not baselines:
        return _missing("not evaluated: no baseline could be fit (the manifest has no age, sex or view, and the train split no images)")
    out = {}
    for name, b in baselines.items():
        not_beaten = {f: {k: x.get(k) for k in ("diff", "diff_ci_low", "diff_ci_high")}
                      for f, x in b["per_finding"].items() if x.get("diff") is not None and not_shown_to_beat(x)}
        out[name] = {"words": WORDS.get(name, name), "features": b.get("features"), "mean_auroc": b["mean_auroc"],
                     "ci_low": b["ci_low"], "ci_high": b["ci_high"], "diff": b["diff"], "diff_ci_low": b["diff_ci_low"],
                     "diff_ci_high": b["diff_ci_high"], "beaten": not not_shown_to_beat(b), "findings_not_beaten": not_beaten}
    return {"status": "present", "model_mean_auroc": metrics["mean"]["auroc"], "baselines": out}


def _calibration(run: RunDir, metrics: dict | None) -> dict:
    if not metrics:
        return _missing(_not_evaluated(run, "evaluate"))
    ece = {f: m["ece"] for f, m in metrics["per_finding"].items() if m.get("auroc") is not None and m.get("ece") is not None}
    if not ece:
        return _missing("not evaluated: no finding has both positive and negative test images")
    worst = max(ece, key=ece.get)
    return {"status": "present", "per_finding": ece, "mean_ece": sum(ece.values()) / len(ece), "worst": {"finding": worst, "ece": ece[worst]}}


def _robustness(run: RunDir, metrics: dict | None, max_drop: float) -> dict:
    if not metrics:
        return _missing(_not_evaluated(run, "evaluate"))
    table = _read_csv(run.eval / "robustness.csv")
    if table is None or table.empty:
        return _missing(f"not evaluated: run `cxr evaluate --run {run.root}` without --no-robustness")
    rows = []
    for name, part in table.groupby("perturbation", sort=False):
        clean = part.loc[part["level"] == 0, "mean_auroc"]
        degraded = part[part["level"] > 0].dropna(subset=["mean_auroc"])
        if clean.empty or degraded.empty or pd.isna(clean.iloc[0]):
            continue
        worst = degraded.loc[degraded["mean_auroc"].idxmin()]
        drop = float(clean.iloc[0] - worst["mean_auroc"])
        rows.append({"perturbation": name, "label": part["label"].iloc[0], "clean": float(clean.iloc[0]),
                     "worst_level": int(worst["level"]), "worst_strength": float(worst["strength"]),
                     "worst_auroc": float(worst["mean_auroc"]), "drop": drop, "over_limit": drop > max_drop})
    return {"status": "present", "perturbations": rows}


def _pointing(run: RunDir) -> dict:
    pointing = _read_json(run.explain_pointing)
    if not pointing:
        return _missing(f"not evaluated: run `cxr explain --run {run.root}` (needs radiologist boxes beside the label file)")
    keys = ("n", "hits", "hit_rate", "baseline", "hit_rate_tolerant", "baseline_tolerant", "tolerance", "splits")
    return {"status": "present", **{k: pointing.get(k) for k in keys},
            "per_finding": {f: {k: p.get(k) for k in ("n", "hit_rate", "baseline")} for f, p in (pointing.get("per_finding") or {}).items()}}


# --------------------------------------------------------------------------- limitations, from the numbers


def _name(finding: str) -> str:
    return finding.replace("_", " ")


def limitations(run: RunDir, sections: dict, metrics: dict | None, externals: dict[str, dict], cv: dict | None,
                min_positives: int, max_drop: float) -> list[dict[str, str]]:
    """Where the model fails or the evidence is too thin, one sentence each, from the numbers."""
    out: list[dict[str, str]] = []

    def add(kind: str, text: str) -> None:
        out.append({"kind": kind, "text": text})

    training = sections["training_data"]
    unseen = [f for f, by in (training.get("positives") or {}).items() if by.get("train", 0) == 0]
    if unseen:
        add("training_data", f"The training split holds no positive image of {', '.join(map(_name, unseen))}: "
                             "the model cannot have learned these findings")
    if metrics:
        per = metrics["per_finding"]
        none = [f for f, m in per.items() if m["n_positive"] == 0]
        few = [f for f, m in per.items() if 0 < m["n_positive"] < min_positives]
        if none:
            add("few_positives", f"No positive test image of {', '.join(map(_name, none))}: the model's performance on "
                                 f"{'it' if len(none) == 1 else 'them'} is not measured at all")
        if few:
            add("few_positives", f"Fewer than {min_positives} positive test images of "
                                 + ", ".join(f"{_name(f)} ({per[f]['n_positive']}, AUROC {estimate(per[f]['auroc'], per[f]['ci_low'], per[f]['ci_high'])})" for f in few)
                                 + ": these figures rest on too few cases to trust")
        beaten_overall = []
        for name, b in (metrics.get("baselines") or {}).items():
            overall = verdict(name, b)
            if overall:
                add("baseline", f"Overall, the model is {overall}")
            else:
                beaten_overall.append(name)
            not_beaten = sections["baselines"]["baselines"][name]["findings_not_beaten"]
            if not_beaten:
                add("baseline", f"For {', '.join(map(_name, not_beaten))} the model is not shown to beat {WORDS.get(name, name)}: "
                                "the paired interval of model - baseline AUROC includes 0 or lies below it ("
                                + "; ".join(f"{_name(f)} {signed(d['diff'])} [{signed(d['diff_ci_low'])}, {signed(d['diff_ci_high'])}]"
                                            for f, d in not_beaten.items()) + ")")
        groups = _subgroup_rows(run)
        if groups is not None:
            for line in below_overall(groups, metrics["mean"]["auroc"]):
                add("subgroup", line)
            for line in not_beating_baselines(groups, beaten_overall, WORDS):
                add("subgroup", line)
    for name, m in externals.items():
        line = below_internal(name, m, metrics)
        if line:
            add("external", line)
    if cv:
        for line in cv.get("warnings") or []:
            add("cv", f"In cross-validation: {line}")
    for p in (sections["robustness"].get("perturbations") or []):
        if p["over_limit"]:
            add("robustness", f"Under {p['perturbation']} at level {p['worst_level']} ({p['label']}: {p['worst_strength']:g}) the mean AUROC "
                              f"falls from {number(p['clean'])} to {number(p['worst_auroc'])} ({signed(-p['drop'])}), "
                              f"more than the {max_drop:g} allowed: images of that quality will be misread more often")
    pointing = sections["pointing"]
    if pointing.get("status") == "present" and pointing.get("hit_rate") is not None and pointing["hit_rate"] <= pointing["baseline"]:
        add("pointing", f"Grad-CAM's peak fell inside the radiologist's box for {percent(pointing['hit_rate'])} of {pointing['n']} "
                        f"boxed findings, no better than a random point ({percent(pointing['baseline'])}): the heatmaps do not show "
                        "that the model looks at the finding")
    return out
