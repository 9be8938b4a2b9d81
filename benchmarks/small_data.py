"""The small-data recipe study of docs/small_data.md: one patient-grouped cross-validation per row.

``run`` cross-validates one recipe on a copy of a prepared run directory (ingested, split,
preprocessed), through the ordinary ``cxr cv`` verb, and records its wall time beside the results;
``table`` writes the study's table from the finished rows' ``cv/metrics.json``, so every number in
the page comes from a run; ``within`` splits a row's out-of-fold AUROC per cohort into "any finding
vs none" and "which finding, among images with one", the two tasks a mean AUROC mixes.

    python benchmarks/small_data.py run --base /tmp/sd/base64 --out /tmp/sd/A -- --backbone resnet18 --weights none --epochs 10
    python benchmarks/small_data.py table /tmp/sd/A /tmp/sd/B > table.md
    python benchmarks/small_data.py within /tmp/sd/A
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.atomic import write_json
from pipelines.rundir import RunDir
from trainers.config import TrainConfig

PREPARED = ("manifest", "quarantine", "source_json", "split_report", "splits", "shards", "stats", "validation")
WALL_FILE = "wall_time.json"


def copy_prepared(base: RunDir, out: RunDir) -> None:
    """The prepared inputs of ``base`` (not its cv/, train/, ...) into a fresh ``out``."""
    if out.root.exists():
        shutil.rmtree(out.root)
    out.root.mkdir(parents=True)
    for name in PREPARED:
        source = getattr(base, name)
        if source.is_dir():
            shutil.copytree(source, getattr(out, name))
        elif source.exists():
            shutil.copy2(source, getattr(out, name))


def run_row(base: Path, out: Path, cv_args: list[str]) -> int:
    from cxr.cli import main as cli

    copy_prepared(RunDir(base), RunDir(out))
    start = time.monotonic()
    code = cli(["cv", "--run", str(out), *cv_args])
    write_json(RunDir(out).cv / WALL_FILE, {"seconds": time.monotonic() - start, "cv_args": cv_args})
    return code or 0


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _cell(auc, low, high, diffs: dict) -> str:
    """``0.565 [0.536–0.594]`` and each baseline's paired difference, a win in bold."""
    parts = [f"{_f(auc)} [{_f(low)}–{_f(high)}]"]
    for name, (d, dl, dh) in diffs.items():
        text = f"{d:+.3f} [{dl:+.3f}, {dh:+.3f}]" if d is not None else "–"
        parts.append(f"**{text}**" if dl is not None and dl > 0 else text)
    return "<br>".join(parts)


def recipe_of(config: dict) -> str:
    """The settings of a row that differ from TrainConfig's defaults."""
    defaults = TrainConfig().to_dict()
    keep = {k: v for k, v in config.items() if v != defaults.get(k) and k not in ("keep_checkpoints", "max_failures")}
    return ", ".join(f"{k}={v}" for k, v in sorted(keep.items()))


def table(rows: list[Path]) -> str:
    """One line per row: the recipe, the pooled out-of-fold mean AUROC overall and per cohort with the
    paired model − baseline intervals (metadata, image statistics), per-fold spread and wall time."""
    lines = []
    for path in rows:
        run = RunDir(path)
        m = json.loads((run.cv / "metrics.json").read_text())
        settings = json.loads((run.cv / "settings.json").read_text())
        wall = json.loads((run.cv / WALL_FILE).read_text())["seconds"] if (run.cv / WALL_FILE).exists() else None
        size = json.loads(run.stats.read_text()).get("image_size")
        cells = [_cell(m["mean"]["auroc"], m["mean"]["ci_low"], m["mean"]["ci_high"],
                       {n: (b["diff"], b["diff_ci_low"], b["diff_ci_high"]) for n, b in m["baselines"].items()})]
        cohorts = m["subgroups"].get("cohort") or {}
        for value in sorted(cohorts):
            g = cohorts[value]
            cells.append(_cell(g["mean_auroc"], g["ci_low"], g["ci_high"],
                               {n: (b["diff"], b["diff_ci_low"], b["diff_ci_high"]) for n, b in g["baselines"].items()}))
        spread = m["fold_mean_auroc"]
        lines.append(f"| {path.name} | {size} px; {recipe_of(settings['train_config'])} | " + " | ".join(cells)
                     + f" | {_f(spread['mean'])} ± {_f(spread['sd'])} | {'–' if wall is None else f'{wall / 60:.0f} min'} |")
    first = json.loads((RunDir(rows[0]).cv / "metrics.json").read_text())
    cohorts = sorted(first["subgroups"].get("cohort") or {})
    names = list(first["baselines"])
    head = (f"| row | recipe (settings other than the defaults) | all images | " + " | ".join(f"cohort {c}" for c in cohorts)
            + " | per fold | wall time |")
    base_lines = []
    for label, source in [("all images", first["baselines"])] + [(f"cohort {c}", first["subgroups"]["cohort"][c]["baselines"]) for c in cohorts]:
        base_lines.append(f"- {label}: " + ", ".join(f"{n} {_f(b.get('mean_auroc', b.get('auroc')))}" for n, b in source.items()))
    legend = (f"Each cell: pooled out-of-fold mean AUROC [95% patient-bootstrap interval], then model − "
              f"{' and model − '.join(names)} [paired 95% interval]; bold where the interval is above 0 (a win).")
    return "\n".join([legend, "", head, "|---|---|" + "---:|" * (len(cohorts) + 3), *lines, "",
                      "Baselines (cross-validated on the same folds; the same in every row):", "", *base_lines]) + "\n"


MIN_POSITIVES = 5  # a finding's AUROC in a subset counts only with at least this many positives


def separation(oof, manifest, findings: list[str]):
    """Per cohort (and all images): how much of the out-of-fold mean AUROC is telling sick from
    healthy, and how much is telling findings apart. Why: a cohort where half the images have no
    finding rewards a model that only learned "abnormal"; one where most have some finding asks
    which. Columns: images, share with a finding, AUROC of the mean probability for any finding vs
    none, mean per-finding AUROC on all images and among images with a finding only (findings with
    at least MIN_POSITIVES positives and one negative in that subset; their count beside)."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    probs = [f"prob_{f}" for f in findings]
    data = oof[["image_id", *probs]].merge(manifest[["image_id", "cohort", *findings]], on="image_id", validate="one_to_one")
    data["any"] = data[findings].sum(axis=1) > 0

    def mean_auroc(subset) -> tuple[float, int]:
        aucs = [roc_auc_score(subset[f], subset[f"prob_{f}"]) for f in findings
                if subset[f].sum() >= MIN_POSITIVES and subset[f].sum() < len(subset)]
        return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)

    rows = []
    for name, subset in [("all images", data), *((f"cohort {c}", g) for c, g in data.groupby("cohort", sort=True))]:
        overall, n_all = mean_auroc(subset)
        among, n_among = mean_auroc(subset[subset["any"]])
        any_auc = roc_auc_score(subset["any"], subset[probs].mean(axis=1)) if 0 < subset["any"].sum() < len(subset) else float("nan")
        rows.append({"images": name, "n": len(subset), "with a finding": float(subset["any"].mean()),
                     "any finding vs none (mean prob)": any_auc, "mean AUROC, all images": overall, "findings (all)": n_all,
                     "mean AUROC, among images with a finding": among, "findings (among)": n_among})
    return pd.DataFrame(rows)


def within(rows: list[Path]) -> str:
    import pandas as pd

    from evaluation.cv import OOF_FILE
    from pipelines.labels import FINDINGS

    parts = []
    for row in rows:
        run = RunDir(row)
        frame = separation(pd.read_parquet(run.cv / OOF_FILE), pd.read_parquet(run.manifest), list(FINDINGS))
        parts.append(f"{row.name}\n\n" + frame.to_markdown(index=False, floatfmt=".3f") + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="cross-validate one recipe on a copy of a prepared run")
    r.add_argument("--base", type=Path, required=True, help="an ingested, split and preprocessed run directory")
    r.add_argument("--out", type=Path, required=True, help="the row's run directory (replaced)")
    r.add_argument("cv_args", nargs=argparse.REMAINDER, help="after --: the cxr cv options of the recipe")
    t = sub.add_parser("table", help="the study's table from finished rows")
    t.add_argument("rows", type=Path, nargs="+")
    w = sub.add_parser("within", help="per cohort: any finding vs none, and which finding among images with one")
    w.add_argument("rows", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.action == "run":
        return run_row(args.base, args.out, [a for a in args.cv_args if a != "--"])
    print((table if args.action == "table" else within)(args.rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
