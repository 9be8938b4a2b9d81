"""The documented 5-fold cross-validation on the shared NIH subset (docs/cv_nih.md).

Builds nothing itself: the run directory comes from the ordinary CLI (``cxr ingest`` with
``--cohorts``, ``cxr split``, ``cxr preprocess``); this calls :func:`cxr.cv.run_cv` on it on an
embedded local Ray, prints one line per finished fold and the closing summary, and writes the wall
time beside ``<run>/cv/metrics.json``.

    nice -n 10 .venv/bin/python benchmarks/cv_nih.py --run /tmp/cvnih --folds 5 --epochs 5

``--doc PATH`` trains nothing: it writes the tables of docs/cv_nih.md from the finished run's
``cv/metrics.json`` and ``cv/wall_time.json``, so every number in the page comes from the run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr.cv import cv_summary, run_cv
from cxr.runtime import ray_session
from pipelines.atomic import write_json
from pipelines.rundir import RunDir
from trainers import TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--workers", type=int, default=1, help="Train workers per fold (1: two folds train side by side on 2 CPUs)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--doc", type=Path, help="write the results page from the finished run instead of running")
    args = parser.parse_args(argv)
    if args.doc:
        args.doc.write_text(results_page(RunDir(args.run)))
        print(f"wrote {args.doc}")
        return
    base = TrainConfig(backbone=args.backbone, weights="none", freeze="none", epochs=args.epochs, workers=args.workers, seed=args.seed)
    run = RunDir(args.run)
    start = time.monotonic()
    with ray_session():
        result = run_cv(run, base, args.folds, seed=args.seed, resume=args.resume, n_boot=args.bootstrap,
                        progress=lambda line: print(line, flush=True))
    seconds = time.monotonic() - start
    print(cv_summary(result))
    print(f"wall time {seconds / 60:.1f} min")
    write_json(run.cv / "wall_time.json", {"seconds": seconds, "command": sys.argv, "train_config": json.loads(json.dumps(base.to_dict()))})


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _d(v) -> str:
    return "–" if v is None else f"{v:+.3f}"


def _judge(diff_low) -> str:
    return "beats it" if diff_low is not None and diff_low > 0 else "is **not shown to beat it**"


def results_page(run: RunDir) -> str:
    """The numbers of docs/cv_nih.md, every one read from ``<run>/cv/metrics.json``."""
    m = json.loads((run.cv / "metrics.json").read_text())
    wall = json.loads((run.cv / "wall_time.json").read_text()) if (run.cv / "wall_time.json").exists() else {}
    names = list(m["baselines"])
    rows = [("all images", m["n_images"], m["n_patients"], m["mean"]["auroc"], m["mean"]["ci_low"], m["mean"]["ci_high"],
             {n: (b["mean_auroc"], b["diff"], b["diff_ci_low"], b["diff_ci_high"]) for n, b in m["baselines"].items()})]
    for value, g in (m["subgroups"].get("cohort") or {}).items():
        rows.append((f"cohort {value}", g["n_images"], g["n_patients"], g["mean_auroc"], g["ci_low"], g["ci_high"],
                     {n: (b["auroc"], b["diff"], b["diff_ci_low"], b["diff_ci_high"]) for n, b in g["baselines"].items()}))
    out = [f"Wall time of the cross-validation (`run_cv`, all {m['folds']} folds, scoring, baselines, bootstrap): "
           f"**{wall.get('seconds', float('nan')) / 60:.1f} min**.", "",
           "### Pooled out-of-fold mean AUROC, overall and per cohort, beside both baselines", "",
           "| set | patients / images | model mean AUROC [95% CI] | " + " | ".join(f"{n} AUROC | model − {n} [paired 95% CI]" for n in names) + " |",
           "|---|---:|---:|" + "---:|---:|" * len(names)]
    for label, n_img, n_pat, auc, low, high, base in rows:
        cells = " | ".join(f"{_f(base[n][0])} | {_d(base[n][1])} [{_d(base[n][2])}, {_d(base[n][3])}]" for n in names)
        out.append(f"| {label} | {n_pat} / {n_img} | **{_f(auc)}** [{_f(low)}–{_f(high)}] | {cells} |")
    out += ["", "In words (the paired interval of model − baseline decides; an interval that includes 0 is not a win):", ""]
    for label, n_img, _, auc, low, high, base in rows:
        verdicts = "; ".join(f"against {n} ({_f(base[n][0])}) it {_judge(base[n][2])} ({_d(base[n][1])} [{_d(base[n][2])}, {_d(base[n][3])}])"
                             for n in names)
        out.append(f"- {label} ({n_img} images): {_f(auc)} [{_f(low)}–{_f(high)}]; {verdicts}.")
    spread = m["fold_mean_auroc"]
    out += ["", f"### Per fold (mean ± sd over folds: **{_f(spread['mean'])} ± {_f(spread['sd'])}**)", "",
            "| fold | held-out images / patients | model mean AUROC | " + " | ".join(names) + " | best epoch | inner-val mean AUROC |",
            "|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
    for f in m["per_fold"]:
        out.append(f"| {f['fold']} | {f['n_images']} / {f['n_patients']} | {_f(f['mean_auroc'])} | "
                   + " | ".join(_f(f["baselines"].get(n)) for n in names) + f" | {f.get('best_epoch')} | {_f(f.get('val_mean_auroc'))} |")
    for n, b in m["baselines"].items():
        out.append(f"\n{n} baseline per fold: {_f(b['per_fold']['mean'])} ± {_f(b['per_fold']['sd'])}.")
    out += ["", "### Per finding (pooled out-of-fold)", "", "| finding | AUROC [95% CI] | positives |", "|---|---:|---:|"]
    for name, f in m["per_finding"].items():
        out.append(f"| {name} | {_f(f['auroc'])} [{_f(f['ci_low'])}–{_f(f['ci_high'])}] | {f['n_positive']} |" if f["auroc"] is not None
                   else f"| {name} | undefined ({f['note']}) | {f['n_positive']} |")
    out += ["", "### Where the model fails (the run's own verdicts, `cv/metrics.json` → `warnings`)", ""]
    out += [f"- {w}." for w in m["warnings"]] or ["- (none flagged)"]
    if m.get("spread", {}).get("lines"):
        out += ["", "Findings that could not be spread over every fold:", "", *[f"- {s}." for s in m["spread"]["lines"]]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
