"""``cxr report``: one self-contained HTML page per run, readable by a clinician.

Everything the page shows is read from the run directory (the stages' files), figures are
embedded as base64 PNG so the page can be mailed or archived alone, and a section appears only
where the run has what it needs. Links go to the Great Expectations Data Docs and the EDA page,
which stay in the run directory beside it.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from evaluation.external import below_internal, external_metrics
from pipelines.atomic import write_text
from pipelines.formatting import interval, number, percent, signed
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from validation.report import overall, suite_status
from validation.results import FAILED, PASSED, WARNINGS, status_words

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}

CSS = """
:root { --ink:#1d2733; --muted:#5b6675; --line:#dfe4ea; --accent:#1f5fa8; --head:#12355b; --soft:#f4f7fb;
        --good:#1e7b45; --bad:#b3261e; --warn:#a15c00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--ink); background:#eef1f5; }
header { background:var(--head); color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:650; letter-spacing:.2px; }
header .sub { color:#c9d6e6; font-size:14px; }
nav { background:#fff; border-bottom:1px solid var(--line); padding:8px 40px; position:sticky; top:0; z-index:2;
      font-size:13.5px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
main { max-width:1180px; margin:0 auto; padding:22px 28px 60px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:20px 26px 22px; margin:0 0 20px; }
h2 { margin:0 0 6px; font-size:20px; color:var(--head); }
h3 { margin:18px 0 6px; font-size:16px; color:var(--head); }
p.howto { margin:0 0 14px; padding:8px 12px; background:var(--soft); border-left:4px solid var(--accent);
          color:#33414f; font-size:14px; border-radius:0 6px 6px 0; }
p.note { color:var(--muted); font-size:13.5px; }
.failures { border:1px solid var(--bad); border-left:6px solid var(--bad); border-radius:8px; padding:10px 16px; margin:14px 0; }
.failures h3 { margin:4px 0 6px; color:var(--bad); }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(200px,1fr)); gap:14px; }
.card { background:var(--soft); border:1px solid var(--line); border-radius:8px; padding:12px 16px; }
.card .label { color:var(--muted); font-size:12.5px; text-transform:uppercase; letter-spacing:.5px; }
.card .value { font-size:24px; font-weight:650; color:var(--head); }
.card .detail { color:var(--muted); font-size:13px; }
table { border-collapse:collapse; width:100%; font-size:14px; margin:6px 0 10px; }
table.compact { width:auto; min-width:420px; }
th { text-align:left; background:var(--soft); color:#33414f; font-weight:600; border-bottom:2px solid var(--line);
     padding:6px 10px; white-space:nowrap; }
td { border-bottom:1px solid var(--line); padding:5px 10px; vertical-align:middle; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.undefined td { color:var(--muted); font-style:italic; }
tr.total td { font-weight:650; border-top:2px solid var(--line); }
.badge { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12.5px; font-weight:600; color:#fff; }
.badge.pass { background:var(--good); } .badge.fail { background:var(--bad); } .badge.warn { background:var(--warn); }
.bar { position:relative; width:150px; height:14px; background:linear-gradient(90deg,#f6f7f9,#eef2f7);
       border-radius:7px; border:1px solid var(--line); }
.bar .ci { position:absolute; top:4px; height:4px; background:#9dbbe0; border-radius:2px; }
.bar .pt { position:absolute; top:1px; width:10px; height:10px; margin-left:-5px; border-radius:50%; background:var(--accent); }
.bar .half { position:absolute; top:0; bottom:0; left:50%; border-left:1px dashed #aab2bd; }
figure { margin:10px 0 14px; }
figure img { max-width:100%; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill,minmax(340px,1fr)); gap:14px; }
.gallery figure { margin:0; }
.gallery figcaption { font-size:12.5px; }
details summary { cursor:pointer; color:var(--accent); margin:6px 0; }
a { color:var(--accent); }
footer { color:var(--muted); font-size:12.5px; text-align:center; padding:10px; }
"""


# --------------------------------------------------------------------------- small helpers


def _e(value) -> str:
    return html.escape(str(value))


def _image(path: Path, alt: str, caption: str = "") -> str:
    """A PNG embedded as base64 (the page stays one file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _interval_bar(point, low, high) -> str:
    """AUROC and its interval on a 0-1 track, chance (0.5) dashed."""
    if point is None:
        return ""
    ci = "" if low is None else f'<span class="ci" style="left:{100 * low:.1f}%;width:{100 * (high - low):.1f}%"></span>'
    return f'<div class="bar"><span class="half"></span>{ci}<span class="pt" style="left:{100 * point:.1f}%"></span></div>'


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), row_classes: list[str] | None = None,
           compact: bool = False) -> str:
    head = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    cls = ' class="compact"' if compact else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(key: str, title: str, howto: str, body: str) -> str:
    return f'<section id="{key}"><h2>{_e(title)}</h2><p class="howto">{howto}</p>{body}</section>'


def _badge(ok: bool, yes: str = "passed", no: str = "failed") -> str:
    return f'<span class="badge {"pass" if ok else "fail"}">{yes if ok else no}</span>'


def _status_badge(status: str, warnings: int) -> str:
    """A validation verdict in its three levels: passed, passed with N warnings, failed."""
    cls = "pass" if status == PASSED else "fail" if status == FAILED else "warn"
    return f'<span class="badge {cls}">{_e(status_words(status, warnings))}</span>'


def _warnings_lines(summary: dict, short: bool = False) -> list[str]:
    """``splits: 27 (finding, split) pairs have no positive image: 9 findings in no split (...)`` for
    each suite whose only failures are warnings (flag-level checks); ``short`` leaves out the
    examples after the colon."""
    lines = []
    for name, suite in summary.get("suites", {}).items():
        status, warnings = suite_status(suite)
        if warnings and status != FAILED:
            note = (suite.get("warnings_note") or f"{warnings} flag-level check(s) failed").split(" -- ")[0]
            lines.append(f"{name}: {note.split(': ')[0] if short else note}")
    return lines


def _link(target: Path, root: Path, text: str) -> str:
    """A relative link from the report (at the run root) to a file of the run."""
    return f'<a href="{_e(os.path.relpath(target, root))}">{_e(text)}</a>'


def _failures_box(lines: list[str], title: str | None = "Where the model fails") -> str:
    """The red box of sentences saying where the model fails (nothing when there are none)."""
    if not lines:
        return ""
    head = f"<h3>{_e(title)}</h3>" if title else ""
    return f'<div class="failures">{head}<ul>' + "".join(f"<li>{_e(w)}.</li>" for w in lines) + "</ul></div>"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------- sections


def _data_section(run: RunDir) -> str | None:
    if not run.manifest.exists():
        return None
    manifest = pd.read_parquet(run.manifest)
    quarantine = pd.read_parquet(run.quarantine) if run.quarantine.exists() else pd.DataFrame()
    source = _read_json(run.source_json) or {}
    cards = [
        ("images", f"{len(manifest):,}", f"{manifest['patient_id'].nunique():,} patients"),
        ("quarantined", f"{len(quarantine):,}", "rows rejected at ingest, validation or decoding"),
        ("source", _e(source.get("source", "?")), _e(Path(source.get("label_file", "")).name)),
    ]
    if "view" in manifest:
        views = manifest["view"].value_counts()
        cards.append(("views", " / ".join(f"{views.get(v, 0)} {v}" for v in ("PA", "AP")), "posteroanterior / anteroposterior"))
    body = ['<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div><div class="detail">{detail}</div></div>'
        for label, value, detail in cards) + "</div>"]
    if len(quarantine):
        reasons = quarantine["reason"].astype(str).str.split(":").str[0].value_counts().head(8)
        body.append("<h3>Why rows were quarantined</h3>" + _table(
            ["reason", "rows"], [[_e(r), f"{n:,}"] for r, n in reasons.items()], numeric={1}, compact=True))
    summary = _read_json(run.validation / "summary.json")
    if summary:
        rows = []
        for name, suite in summary.get("suites", {}).items():
            page = suite.get("report_page") or suite.get("data_docs")
            rows.append([_e(name), _status_badge(*suite_status(suite)), f"{suite['rows']:,}", str(suite["failed_records"]),
                         str(suite["failed_expectations"]),
                         _link(Path(page), run.root, "Data Docs") if page and Path(page).exists() else "—"])
        body.append("<h3>Data validation (Great Expectations)</h3>" + _table(
            ["suite", "status", "rows", "records rejected", "checks failed", "details"], rows, numeric={2, 3, 4}))
        warnings = _warnings_lines(summary)
        if warnings:
            body.append('<p class="note">Warnings are flag-level checks that failed: they are reported and change '
                        "nothing (no record was rejected for them). " + "; ".join(_e(w) for w in warnings) + ".</p>")
        body.append('<p class="note">Passed: every check held. Passed with warnings: only flag-level checks failed. '
                    "Failed: a table-level check failed (the pipeline stops) or a record-level one did (those records "
                    "were quarantined and the rest went on).</p>")
        docs = run.validation / "data_docs" / "index.html"
        if docs.exists():
            body.append(f'<p class="note">All validation results: {_link(docs, run.root, "Data Docs index")}. '
                        "A suite's page lists each failed check; rejected records are in quarantine.parquet.</p>")
    eda = run.eda / "eda.html"
    if eda.exists():
        body.append(f'<p class="note">Exploratory analysis (label prevalence, co-occurrence, image intensities): '
                    f'{_link(eda, run.root, "EDA page")}.</p>')
    return _section("data", "Data and validation",
                    "What went in: how many images and patients, what was rejected and why, and whether the "
                    "automated data checks passed. Follow the links for every check's detail.", "".join(body))


def _splits_section(run: RunDir) -> str | None:
    report = _read_json(run.split_report)
    if not report:
        return None
    counts = report.get("counts", {})
    counts = {s: counts[s] for s in sorted(counts, key=lambda s: SPLIT_ORDER.get(s, len(SPLIT_ORDER)))}
    rows = [[_e(s), f"{c['images']:,}", f"{c['patients']:,}"] for s, c in counts.items()]
    body = _table(["split", "images", "patients"], rows, numeric={1, 2}, compact=True)
    positives = report.get("positives")
    if positives:
        shown = [f for f in FINDINGS if sum(positives.get(f, {}).values()) > 0]
        splits = list(counts)
        body += "<h3>Positive images per finding</h3>" + _table(
            ["finding", *splits], [[_e(f.replace("_", " ")), *[str(positives[f].get(s, 0)) for s in splits]] for f in shown],
            numeric=set(range(1, len(splits) + 1)), compact=True)
    shared = report.get("patients_in_two_splits")
    if shared is not None:
        body += f'<p class="note">Leakage audit: {_badge(shared == 0, "no patient", f"{shared} patients")} ' \
                "appears in more than one split.</p>"
    return _section("splits", "Train / validation / test split",
                    "Patients, not images, are assigned to one split each, so the test figures come from people "
                    "the model never saw. Thresholds are chosen on validation; every figure below is on test.", body)


def _training_section(run: RunDir, figures_dir: Path) -> str | None:
    from evaluation import figures  # matplotlib only when there is something to draw

    parts = []
    history_path = run.train_history
    if history_path.exists():
        history = pd.read_csv(history_path)
        if len(history) and "epoch" in history:
            parts.append(_image(figures.training_curves(history, figures_dir / "training.png"), "training curves",
                                "Loss should fall on both; a validation loss that rises while training loss falls is overfitting."))
    results = run.tune / "results.csv"
    if results.exists():
        table = pd.read_csv(results)
        columns = [c for c in ("trial", "sampling", "loss", "freeze", "lr", "backbone", "status", "epochs",
                               "best_val_mean_auroc", "weakest_findings") if c in table]
        rows = [[_e(number(v, 4) if isinstance(v, float) and c != "lr" else (f"{v:.1e}" if c == "lr" else v))
                 for c, v in zip(columns, row)] for row in table[columns].itertuples(index=False)]
        parts.append("<h3>Strategy search (Ray Tune)</h3>" + _table([c.replace("_", " ") for c in columns], rows))
        if (run.tune / "curves.png").exists():
            parts.append(_image(run.tune / "curves.png", "tune curves", "Validation mean AUROC by epoch for each trial; "
                                "trials stopped early by ASHA end sooner."))
    if not parts:
        return None
    return _section("training", "Training", "How the model learned, epoch by epoch, and which training strategy "
                    "the search chose.", "".join(parts))


def _discrimination_section(metrics: dict, eval_dir: Path) -> str:
    per, mean = metrics["per_finding"], metrics["mean"]
    rows, classes = [], []
    for name, m in per.items():
        undefined = m["auroc"] is None
        rows.append([
            _e(name.replace("_", " ")), f"{m['n_positive']} / {m['n_positive'] + m['n_negative']}", percent(m["prevalence"]),
            _e(m["note"]) if undefined else f"<b>{number(m['auroc'])}</b>", interval(m["ci_low"], m["ci_high"]),
            _interval_bar(m["auroc"], m["ci_low"], m["ci_high"]), number(m["ap"]),
        ])
        classes.append("undefined" if undefined else "")
    rows.append([f"Mean over {len(mean['findings'])} findings", "", "", f"<b>{number(mean['auroc'])}</b>",
                 interval(mean["ci_low"], mean["ci_high"]), _interval_bar(mean["auroc"], mean["ci_low"], mean["ci_high"]),
                 number(mean["ap"])])
    classes.append("total")
    boot = metrics["bootstrap"]
    body = _table(["finding", "positives / images", "prevalence", "AUROC", "95% CI", "", "average precision"],
                  rows, numeric={1, 2, 3, 4, 6}, row_classes=classes)
    body += (f'<p class="note">Intervals: {boot["n_boot"]} bootstrap replicates resampling the '
             f'{metrics["n_patients"]} test patients (all images of a drawn patient), percentile method. '
             "A finding without positive (or negative) test images has no AUROC: it is shown as undefined, not as 0.5.</p>")
    figs = metrics.get("figures", {})
    if "roc" in figs:
        body += "<h3>ROC curves</h3>" + _image(eval_dir / figs["roc"], "ROC curves",
                                               "Each curve trades sensitivity against false alarms as the threshold moves; "
                                               "the red dot is the threshold chosen on validation. Grey dashes: chance.")
    if "pr" in figs:
        body += "<h3>Precision–recall curves</h3>" + _image(
            eval_dir / figs["pr"], "precision-recall curves",
            "Precision is the share of flagged images that truly have the finding; for rare findings it is the "
            "more telling curve. Grey dashes: prevalence (what random flagging achieves).")
    return _section("discrimination", "How well the model separates findings (test split)",
                    "AUROC is the chance that the model scores a random image with the finding above one without it: "
                    "1.0 is perfect, 0.5 is a coin toss. The interval shows how much it could move with other patients.",
                    body)


BASELINE_TITLES = {"metadata": "metadata only (age, sex, view)", "image_statistics": "image statistics (32×32 thumbnail, PCA 64)"}


def _cv_section(run: RunDir) -> str | None:
    """Cross-validation (``cxr cv``): pooled out-of-fold AUROC with its interval, per fold, the
    cross-validated baselines, per cohort and subgroup beside them, and in words where it fails."""
    m = _read_json(run.cv / "metrics.json")
    if not m:
        return None
    mean, spread, baselines = m["mean"], m["fold_mean_auroc"], m.get("baselines") or {}
    sd = f" ± {spread['sd']:.2f}" if spread.get("sd") is not None else ""
    body = (f"<p>Pooled out-of-fold mean AUROC <b>{number(mean['auroc'])}</b> (95% CI {interval(mean['ci_low'], mean['ci_high'])}) over "
            f"{m['n_images']:,} images of {m['n_patients']:,} patients in {m['folds']} folds by patient; per fold "
            f"{number(spread['mean'])}{sd} (mean ± sd).</p>")
    rows = [[f"<b>the model</b>", f"<b>{number(mean['auroc'])}</b>", interval(mean["ci_low"], mean["ci_high"]), f"{number(spread['mean'])}{sd}", "", ""]]
    for name, b in baselines.items():
        beaten = b["diff_ci_low"] is not None and b["diff_ci_low"] > 0
        per = b.get("per_fold") or {}
        rows.append([_e(BASELINE_TITLES.get(name, name)), number(b["mean_auroc"]), interval(b["ci_low"], b["ci_high"]),
                     number(per.get("mean")) + (f" ± {per['sd']:.2f}" if per.get("sd") is not None else ""),
                     f"{signed(b['diff'])} [{signed(b['diff_ci_low'])}, {signed(b['diff_ci_high'])}]",
                     _badge(beaten, "beaten", "not shown to beat")])
    body += _table(["", "pooled mean AUROC", "95% CI", "per fold", "model − baseline [paired 95% CI]", ""], rows, numeric={1, 2, 3, 4})
    names = list(baselines)
    folds = [[str(f["fold"]), f"{f['n_images']} / {f['n_patients']}", number(f["mean_auroc"]),
              *[number(f["baselines"].get(n)) for n in names], str(f.get("best_epoch", "—"))] for f in m["per_fold"]]
    body += "<h3>Per fold</h3>" + _table(["fold", "held-out images / patients", "model", *[_e(BASELINE_TITLES.get(n, n)) for n in names],
                                          "best epoch"], folds, numeric=set(range(1, 4 + len(names))))
    groups = [(column, value, g) for column, values in (m.get("subgroups") or {}).items() for value, g in values.items()]
    if groups:
        def versus(g: dict, n: str) -> str:
            b = (g.get("baselines") or {}).get(n) or {}
            return f"{number(b.get('auroc'))} ({signed(b.get('diff'))} [{signed(b.get('diff_ci_low'))}, {signed(b.get('diff_ci_high'))}])"

        rows = [[_e(column), _e(value), f"{g['n_images']} / {g['n_patients']}", number(g["mean_auroc"]), interval(g["ci_low"], g["ci_high"]),
                 *[versus(g, n) for n in names]] for column, value, g in groups]
        body += "<h3>By cohort and subgroup</h3>" + _table(
            ["attribute", "group", "images / patients", "model", "95% CI", *[f"{_e(BASELINE_TITLES.get(n, n))} (model − it [CI])" for n in names]],
            rows, numeric=set(range(2, 5 + len(names))))
    failures = [*m.get("warnings", []), *[f"Not in every fold: {s}" for s in (m.get("spread") or {}).get("lines", [])]]
    body += _failures_box(failures)
    body += ('<p class="note">Every image of the run (train, validation and test pooled) was scored once, by the model of the fold '
             "that held its patient out; each fold's model chose its checkpoint on an inner validation split of its own training "
             "patients. The baselines were fit and scored on the same folds. Intervals resample patients.</p>")
    return _section("cv", "Cross-validation: the training recipe on every patient",
                    "One test split of a small collection is noisy. Cross-validation trains the same recipe once per fold and "
                    "scores every patient exactly once, by a model that never saw them.", body)


def _baseline_section(metrics: dict) -> str | None:
    baselines = metrics.get("baselines") or {}
    if not baselines:
        return None
    mean = metrics["mean"]
    rows = [[f"<b>the model</b>", f"<b>{number(mean['auroc'])}</b>", interval(mean["ci_low"], mean["ci_high"]), "", ""]]
    for name, b in baselines.items():
        beaten = b["diff_ci_low"] is not None and b["diff_ci_low"] > 0
        rows.append([_e(BASELINE_TITLES.get(name, name)), number(b["mean_auroc"]), interval(b["ci_low"], b["ci_high"]),
                     f"{signed(b['diff'])} [{signed(b['diff_ci_low'])}, {signed(b['diff_ci_high'])}]",
                     _badge(beaten, "beaten", "not shown to beat")])
    body = _table(["", "mean AUROC", "95% CI", "model − baseline [paired 95% CI]", ""], rows, numeric={1, 2, 3})
    findings = list(metrics["per_finding"])
    detail = [[_e(f.replace("_", " ")), number(metrics["per_finding"][f]["auroc"]),
               *[f"{number(b['per_finding'][f]['auroc'])} ({signed(b['per_finding'][f]['diff'])})" for b in baselines.values()]]
              for f in findings if all(b["per_finding"].get(f, {}).get("auroc") is not None for b in baselines.values())]
    if detail:
        body += ("<details><summary>Per finding: baseline AUROC (model − baseline)</summary>"
                 + _table(["finding", "model", *[_e(BASELINE_TITLES.get(n, n)) for n in baselines]], detail,
                          numeric=set(range(1, len(baselines) + 2))) + "</details>")
    body += ('<p class="note">Both baselines are logistic regressions fit on the training split and scored on the same test '
             "patients with the same bootstrap replicates as the model, so the difference has a paired interval. An interval "
             "that includes 0 means the data do not show the model to be better than the baseline.</p>")
    return _section("baselines", "The model against simple baselines (test split)",
                    "A model is only useful where it knows more than the patient's age, sex and view, or than the coarse "
                    "brightness layout of the image. If it does not beat these, it has learned the data set, not the disease.",
                    body)


def _operating_section(metrics: dict) -> str:
    rows, missing = [], []
    for name, m in metrics["per_finding"].items():
        if m["threshold"] is None or m["auroc"] is None:
            missing.append(name.replace("_", " "))
            continue
        rows.append([_e(name.replace("_", " ")), number(m["threshold"], 3), percent(m["sensitivity"]), percent(m["specificity"]),
                     percent(m["ppv"]), percent(m["npv"]), number(m["f1"]), f"{m['tp']} / {m['fn']}", f"{m['fp']} / {m['tn']}"])
    left_out = (f" Not shown ({len(missing)}): {_e(', '.join(missing))} — no threshold can be chosen or judged "
                "without positive and negative images in validation and test." if missing else "")
    rule = metrics["operating_point"]["rule"]
    rule_text = "Youden's J (sensitivity + specificity − 1 at its highest)" if rule == "youden" else "a target sensitivity"
    return _section("operating-points", "Operating points",
                    "If the model had to say yes or no: at the threshold below, how many cases it catches (sensitivity), "
                    "how many healthy images it clears (specificity), and how often a flag is right (PPV) or an all-clear "
                    "is right (NPV).",
                    _table(["finding", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1",
                            "TP / FN", "FP / TN"], rows, numeric=set(range(1, 9)))
                    + f'<p class="note">Thresholds chosen on the validation split by {rule_text}, then applied '
                      f"unchanged to test. Counts are test images.{left_out}</p>")


def _calibration_section(metrics: dict, eval_dir: Path) -> str | None:
    if "calibration" not in metrics.get("figures", {}):
        return None
    rows = [[_e(n.replace("_", " ")), number(m["ece"], 3)] for n, m in metrics["per_finding"].items() if m["auroc"] is not None]
    return _section("calibration", "Calibration",
                    "Does a predicted 30% mean the finding is present about 30% of the time? Points on the diagonal "
                    "are well calibrated; above it the model under-states risk, below it over-states. ECE is the "
                    "average gap (0 is perfect).",
                    _image(eval_dir / metrics["figures"]["calibration"], "reliability diagrams")
                    + _table(["finding", "expected calibration error"], rows, numeric={1}, compact=True))


def _robustness_section(metrics: dict, eval_dir: Path) -> str | None:
    path = eval_dir / "robustness.csv"
    if "robustness" not in metrics.get("figures", {}) or not path.exists():
        return None
    table = pd.read_csv(path)
    wide = table.pivot_table(index="perturbation", columns="level", values="mean_auroc", sort=False)
    rows = [[_e(p), *[number(v) for v in wide.loc[p]]] for p in wide.index]
    return _section("robustness", "Robustness to image quality",
                    "The test images were degraded on purpose (noise, contrast, brightness, blur, rotation, JPEG "
                    "compression, lower resolution), each at four growing strengths. A robust model's mean AUROC "
                    "stays near the clean value (dashed line); a steep fall warns that poor-quality images will be misread.",
                    _image(eval_dir / metrics["figures"]["robustness"], "robustness")
                    + _table(["perturbation", "clean", *[f"level {c}" for c in wide.columns[1:]]], rows,
                             numeric=set(range(1, len(wide.columns) + 1))))


def _subgroup_section(metrics: dict, eval_dir: Path) -> str | None:
    path = eval_dir / "subgroups.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path)
    if table.empty:
        return None
    means = table[table["finding"] == "mean"]
    def gap(r) -> str:
        if math.isnan(r.gap):
            return "—"
        ci = "" if math.isnan(getattr(r, "gap_ci_low", math.nan)) else f" [{r.gap_ci_low:+.2f}, {r.gap_ci_high:+.2f}]"
        return f"{r.gap:+.2f}{ci}"

    versus = [c[len("vs_"):] for c in table.columns if c.startswith("vs_") and not c.endswith(("_ci_low", "_ci_high"))]

    def against(r) -> list[str]:
        out = []
        for b in versus:
            diff, low, high = getattr(r, f"vs_{b}"), getattr(r, f"vs_{b}_ci_low"), getattr(r, f"vs_{b}_ci_high")
            out.append("—" if math.isnan(diff) else f"{diff:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]"))
        return out

    rows = [[_e(r.attribute), _e(r.group), f"{r.n_images} / {r.n_patients}", number(r.auroc), interval(r.ci_low, r.ci_high),
             _interval_bar(None if math.isnan(r.auroc) else r.auroc, None if math.isnan(r.ci_low) else r.ci_low,
                           None if math.isnan(r.ci_high) else r.ci_high),
             gap(r), *against(r)] for r in means.itertuples()]
    body = ""
    if "subgroups" in metrics.get("figures", {}):
        body += _image(eval_dir / metrics["figures"]["subgroups"], "subgroup forest plot",
                       "Dots: mean AUROC in the group; bars: 95% interval; the blue band is the whole test set's interval.")
    body += _table(["attribute", "group", "images / patients", "mean AUROC", "95% CI", "", "gap to all [paired CI]",
                    *[f"model − {_e(b.replace('_', ' '))} baseline" for b in versus]], rows,
                   numeric={2, 3, 4, 6, *range(7, 7 + len(versus))})
    detail = table[(table["finding"] != "mean") & table["auroc"].notna()]
    if len(detail):
        rows = [[_e(r.attribute), _e(r.group), _e(r.finding.replace("_", " ")), str(r.n_positive), number(r.auroc),
                 interval(r.ci_low, r.ci_high), f"{r.gap:+.2f}"] for r in detail.itertuples()]
        body += ("<details><summary>Per-finding AUROC by subgroup</summary>"
                 + _table(["attribute", "group", "finding", "positives", "AUROC", "95% CI", "gap"], rows, numeric={3, 4, 5, 6})
                 + "</details>")
    shift = metrics.get("view_shift")
    if shift:
        views = [v for v in ("PA", "AP") if v in shift]
        text = "; ".join(f"{v}-only test images: mean AUROC {number(shift[v]['mean_auroc'])} "
                         f"({interval(shift[v]['ci_low'], shift[v]['ci_high'])}, n={shift[v]['n_images']})" for v in views)
        body += f"<h3>View shift</h3><p>{text}.</p><p class=\"note\">{_e(shift['note'])}</p>"
    return _section("subgroups", "Subgroups: sex, age and view",
                    "The same model scored on parts of the test set. A group whose interval lies clearly below the "
                    "whole set's performs worse; small groups have wide intervals, so judge overlap, not the dot alone.",
                    body)


def _explain_section(run: RunDir) -> str | None:
    out = run.explain
    pointing, gallery_csv = _read_json(run.explain_pointing), out / "gallery.csv"
    if not pointing and not gallery_csv.exists():
        return None
    body = ""
    if pointing:
        body += (f"<h3>Pointing game</h3><p>On {pointing['n']} boxed findings in held-out images, the heatmap's "
                 f"strongest point fell inside the radiologist's box <b>{percent(pointing['hit_rate'])}</b> of the time; "
                 f"a randomly placed point would have hit {percent(pointing['baseline'])}. Allowing a margin of "
                 f"{100 * pointing['tolerance']:.1f}% of the image side (the original definition's 15 pixels at 224): "
                 f"{percent(pointing['hit_rate_tolerant'])} against {percent(pointing['baseline_tolerant'])}.</p>")
        if (out / "pointing.png").exists():
            body += _image(out / "pointing.png", "pointing game")
    if gallery_csv.exists():
        gallery = pd.read_csv(gallery_csv)
        names = {"TP": "True positives — flagged and present", "FP": "False positives — flagged but absent",
                 "FN": "False negatives — present but missed"}
        for category, title in names.items():
            part = gallery[gallery["category"] == category]
            if part.empty:
                continue
            figures_html = "".join(_image(out / r.png, f"{r.finding} {r.image_id}",
                                          f"{_e(r.finding.replace('_', ' '))} · {_e(r.image_id)} · p {r.prob:.3f} "
                                          f"(threshold {r.threshold:.3f})") for r in part.itertuples())
            body += f'<h3>{title}</h3><div class="gallery">{figures_html}</div>'
    return _section("explanations", "Where the model looks (Grad-CAM)",
                    "Red areas raised the model's score for the named finding most; they are a hint to what drove the "
                    "prediction, not a segmentation. A true positive whose heat lies outside the lungs suggests a shortcut.",
                    body)


def _external_section(metrics: dict | None, externals: dict[str, dict], flags: list[str]) -> str | None:
    """The internal test split and every external set side by side: mean and per-finding AUROC with
    intervals, and in words each external set whose interval lies wholly below the internal figure."""
    if not externals:
        return None
    sets = ({"internal test": metrics} if metrics else {}) | {f"external: {name}": m for name, m in externals.items()}

    def cell(figure: dict | None) -> str:
        if not figure or figure.get("auroc") is None:
            return "—"
        return f"<b>{number(figure['auroc'])}</b> [{interval(figure.get('ci_low'), figure.get('ci_high'))}]"

    rows = [["images / patients", *[f"{m['n_images']:,} / {m['n_patients']:,}" for m in sets.values()]],
            ["mean AUROC [95% CI]", *[cell(m["mean"]) for m in sets.values()]]]
    findings = [f for f in FINDINGS if any(m["per_finding"].get(f, {}).get("auroc") is not None for m in sets.values())]
    rows += [[_e(f.replace("_", " ")), *[cell(m["per_finding"].get(f)) for m in sets.values()]] for f in findings]
    body = _table(["", *[_e(n) for n in sets]], rows, numeric=set(range(1, len(sets) + 1)),
                  row_classes=["", "total", *[""] * len(findings)])
    body += _failures_box(flags, title=None)
    body += ('<p class="note">Each external set was ingested and validated with the run\'s own suites, checked to share no '
             "patient or image with the training and validation splits, preprocessed at the run's image size and scored "
             "with the run's thresholds (chosen on validation) and baselines (fit on training). Intervals resample patients.</p>")
    return _section("external", "External validation: other collections",
                    "A model that only works on the collection it was trained on has learned that collection. "
                    "Here the same model is scored on collections it has never seen.", body)


def _card_section(run: RunDir) -> str:
    """The model card (``cxr card``) as the report shows it: what the model is and is for, what it
    learned from, the limitations its numbers show, and links to the card's own files. Without a
    card, or with one older than the files it was made from, the section says which command to run."""
    from evaluation.card import read_card, stale_inputs
    from evaluation.card_markdown import SECTION_TITLES

    title, howto = "Model card", ("What the model is, what it is for and not for, what it learned from, and where its own "
                                  "numbers say it fails. Every line is read or derived from the run's files by <code>cxr card</code>.")
    card = read_card(run)
    if card is None:
        return _section("card", title, howto, f'<p class="note">No model card yet: run <code>cxr card --run {_e(run.root)}</code> '
                                              "to write model_card.md and model_card.json, then this report again.</p>")
    parts, body = card["sections"], []
    changed = stale_inputs(run, card)
    if changed:
        body.append(f'<div class="failures"><h3>This card is out of date</h3><p>Changed since it was made: {_e(", ".join(changed))}. '
                    f"Run <code>cxr card --run {_e(run.root)}</code> again.</p></div>")
    model = parts["model"]
    if model.get("status") == "present":
        recipe = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in model["recipe"].items()) or "not recorded"
        rows = [["checkpoint", f"<code>{_e(model['checkpoint'])}</code> ({_e(model['made_by'])})"],
                ["backbone, starting weights", f"{_e(model['backbone'])}, {_e(model.get('starting_weights') or 'not recorded')}"],
                ["recipe", _e(recipe)], ["written", _e(model.get("trained") or "—")],
                ["SHA-256 of model.pt", f"<code>{_e(model.get('sha256') or 'model.pt missing')}</code>"]]
        body.append("<h3>Model details</h3>" + _table(["", ""], rows, compact=True))
    use = parts["intended_use"]
    body.append(f"<h3>Intended use</h3><p>{_e(use['primary'][0].upper() + use['primary'][1:])}.</p><p><b>Out of scope:</b></p><ul>"
                + "".join(f"<li>{_e(x)}.</li>" for x in use["out_of_scope"]) + "</ul>")
    training = parts["training_data"]
    if training.get("status") == "present":
        body.append(f"<h3>Training data</h3><p>{_e(training['collection'])}. Labels: {_e(training['label_source'])}.</p>")
    body.append(_failures_box([x["text"] for x in card["limitations"]], "Limitations (derived from the numbers)")
                or '<p class="note">None of the card\'s rules found a limitation in the sections evaluated.</p>')
    missing = [f"{SECTION_TITLES[k]}: {v['missing']}" for k, v in parts.items() if v.get("status") == "missing"]
    missing += [f"Metrics ({k}): {v['missing']}" for k, v in parts["metrics"].items() if v.get("status") == "missing"]
    if missing:
        body.append("<h3>Not evaluated</h3><ul>" + "".join(f"<li>{_e(m)}</li>" for m in missing) + "</ul>")
    links = " · ".join(_link(p, run.root, p.name) for p in (run.model_card, run.model_card_json) if p.exists())
    body.append(f'<p class="note">The whole card, with every metric, subgroup, baseline and robustness figure: {links}; '
                f"made {_e(card['generated'])}.</p>")
    return _section("card", title, howto, "".join(body))


def _glance(metrics: dict | None, run: RunDir, external_flags: list[str] = ()) -> str:
    cards = []
    if metrics:
        mean = metrics["mean"]
        cards.append(("mean AUROC (test)", number(mean["auroc"]), f"95% CI {interval(mean['ci_low'], mean['ci_high'])}, "
                      f"{len(mean['findings'])} findings"))
        cards.append(("test set", f"{metrics['n_images']:,}", f"images of {metrics['n_patients']:,} patients"))
        cards.append(("model", _e(metrics.get("backbone") or "?"), f"{metrics.get('image_size')}×{metrics.get('image_size')} pixels"))
    pointing = _read_json(run.explain_pointing)
    if pointing:
        cards.append(("pointing game", percent(pointing["hit_rate"]), f"random point: {percent(pointing['baseline'])}"))
    summary = _read_json(run.validation / "summary.json")
    if summary and summary.get("suites"):
        top = overall(summary)
        suites = [suite_status(s) for s in summary["suites"].values()]
        counts = {status: sum(s == status for s, _ in suites) for status in (PASSED, WARNINGS, FAILED)}
        detail = ", ".join(f"{n} {status}" for status, n in counts.items() if n) + f" ({len(suites)} suites)."
        warnings = _warnings_lines(summary, short=True)
        if warnings:
            detail += " Warnings (flag-level, they change nothing): " + "; ".join(warnings) + "."
        cards.append(("data validation", _e(status_words(top["status"], top["warnings"])), _e(detail)))
    if not cards:
        return ""
    failures = [*((metrics or {}).get("warnings") or []), *external_flags]
    box = _failures_box(failures)
    return '<section id="summary"><h2>At a glance</h2>' + box + '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div><div class="detail">{detail}</div></div>'
        for label, value, detail in cards) + "</div></section>"


NAV_TITLES = {"summary": "At a glance", "card": "Model card", "data": "Data", "splits": "Splits", "training": "Training",
              "discrimination": "AUROC", "baselines": "Baselines", "operating-points": "Operating points", "calibration": "Calibration",
              "robustness": "Robustness", "subgroups": "Subgroups", "external": "External", "cv": "Cross-validation",
              "explanations": "Grad-CAM"}


def write_report(run: RunDir) -> Path:
    """Write ``<run>/report.html`` from whatever stages the run has completed; returns its path."""
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    metrics = _read_json(run.eval_metrics)
    with tempfile.TemporaryDirectory() as scratch:  # the training figure lives only inside the page
        training = _training_section(run, Path(scratch))
    externals = external_metrics(run)
    flags = [w for name, m in externals.items() if (w := below_internal(name, m, metrics))]
    sections = [_glance(metrics, run, flags), _card_section(run), _data_section(run), _splits_section(run), training]
    if metrics:
        sections += [_discrimination_section(metrics, run.eval), _baseline_section(metrics), _operating_section(metrics),
                     _calibration_section(metrics, run.eval), _robustness_section(metrics, run.eval),
                     _subgroup_section(metrics, run.eval)]
    sections.append(_external_section(metrics, externals, flags))
    sections.append(_cv_section(run))
    sections.append(_explain_section(run))
    sections = [s for s in sections if s]
    present = [key for key in NAV_TITLES if f'<section id="{key}"' in "".join(sections)]
    nav = "".join(f'<a href="#{key}">{NAV_TITLES[key]}</a>' for key in present)
    if not metrics:
        sections.append('<section id="pending"><h2>Evaluation pending</h2><p>No evaluation yet: run '
                        f"<code>cxr evaluate --run {_e(run.root)}</code> to add the model's results.</p></section>")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    checkpoint = f" · checkpoint {_e(metrics['checkpoint'])}" if metrics else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chest X-ray model report — {_e(run.root.name)}</title><style>{CSS}</style></head>
<body><header><h1>Chest X-ray model report</h1>
<div class="sub">Run {_e(run.root.name)} · generated {when}{checkpoint}</div></header>
<nav>{nav}</nav><main>{''.join(sections)}</main>
<footer>Research software: these figures describe a model on this data set and are not a clinical validation.</footer>
</body></html>
"""
    return write_text(run.report, page)
