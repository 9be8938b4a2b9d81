"""The evaluation figures, in one visual language: the model in blue with its 95% interval as a
light band, chance and baselines in grey dashes, the Okabe-Ito colour-blind-safe palette for
categories. Every function writes one PNG and returns its path."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen first
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from evaluation.calibration import reliability_table
from evaluation.metrics import known
from pipelines.formatting import number

MODEL = "#1f5fa8"
BASELINE = "#8a8f98"
ALERT = "#c0392b"
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#7f7f7f", "#000000")
DPI = 110
NA = "n/a"  # an undefined figure on a plot

plt.rcParams.update({
    "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "figure.facecolor": "white",
})


def _grid(n: int, cols: int = 4, cell: float = 2.7) -> tuple[plt.Figure, np.ndarray]:
    rows = max(1, math.ceil(n / cols))
    cols = min(cols, max(n, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.4, cell * rows + 0.3), dpi=DPI, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _unit_axes(ax: plt.Axes, xlabel: str, ylabel: str) -> None:
    """Axes of a per-finding panel whose both axes are rates or probabilities."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def roc_grid(frame: pd.DataFrame, findings: list[str], per_finding: dict, path: Path) -> Path:
    """ROC curve per finding with its AUROC and interval; the operating point chosen on validation
    is marked where there is one."""
    fig, axes = _grid(len(findings))
    for ax, name in zip(axes, findings):
        y, s = known(frame[name].to_numpy(), frame[f"prob_{name}"].to_numpy())
        fpr, tpr, _ = roc_curve(y, s)
        m = per_finding[name]
        ax.plot([0, 1], [0, 1], ls="--", color=BASELINE, lw=1)
        ax.plot(fpr, tpr, color=MODEL, lw=1.8)
        if m.get("sensitivity") is not None and m.get("specificity") is not None:
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=ALERT, ms=5, label="operating point")
        ax.set_title(name.replace("_", " "))
        ax.text(0.97, 0.05, f"AUROC {number(m['auroc'], missing=NA)}\n({number(m['ci_low'], missing=NA)}–{number(m['ci_high'], missing=NA)})",
                ha="right", va="bottom", transform=ax.transAxes, fontsize=8.5,
                bbox={"boxstyle": "round", "fc": "white", "ec": "#dddddd"})
        _unit_axes(ax, "1 − specificity", "sensitivity")
    return _save(fig, path)


def pr_grid(frame: pd.DataFrame, findings: list[str], per_finding: dict, path: Path) -> Path:
    """Precision-recall per finding; the grey line is the prevalence (a random model's precision)."""
    fig, axes = _grid(len(findings))
    for ax, name in zip(axes, findings):
        y, s = known(frame[name].to_numpy(), frame[f"prob_{name}"].to_numpy())
        precision, recall, _ = precision_recall_curve(y, s)
        m = per_finding[name]
        ax.axhline(m["prevalence"], ls="--", color=BASELINE, lw=1)
        ax.step(recall, precision, where="post", color=MODEL, lw=1.8)
        ax.set_title(name.replace("_", " "))
        ax.text(0.97, 0.95, f"AP {number(m['ap'], missing=NA)}\nprevalence {number(m['prevalence'], missing=NA)}", ha="right", va="top",
                transform=ax.transAxes, fontsize=8.5, bbox={"boxstyle": "round", "fc": "white", "ec": "#dddddd"})
        _unit_axes(ax, "recall (sensitivity)", "precision (PPV)")
    return _save(fig, path)


def reliability_grid(frame: pd.DataFrame, findings: list[str], per_finding: dict, path: Path) -> Path:
    """Reliability diagram per finding: observed frequency against mean predicted probability per
    bin (dot area = images in the bin); on the diagonal is perfectly calibrated."""
    fig, axes = _grid(len(findings))
    for ax, name in zip(axes, findings):
        table = reliability_table(frame[name].to_numpy(), frame[f"prob_{name}"].to_numpy())
        filled = table[table["count"] > 0]
        ax.plot([0, 1], [0, 1], ls="--", color=BASELINE, lw=1)
        ax.plot(filled["mean_predicted"], filled["observed"], color=MODEL, lw=1.2)
        ax.scatter(filled["mean_predicted"], filled["observed"], s=12 + 120 * filled["count"] / filled["count"].max(),
                   color=MODEL, alpha=0.8, zorder=3)
        ax.set_title(name.replace("_", " "))
        ax.text(0.05, 0.95, f"ECE {number(per_finding[name].get('ece'), 3, missing=NA)}", ha="left", va="top", transform=ax.transAxes,
                fontsize=8.5, bbox={"boxstyle": "round", "fc": "white", "ec": "#dddddd"})
        _unit_axes(ax, "predicted probability", "observed frequency")
    return _save(fig, path)


def robustness_plot(table: pd.DataFrame, path: Path) -> Path:
    """Mean AUROC against perturbation strength, one panel per perturbation; the clean figure is
    the dashed line."""
    names = list(dict.fromkeys(table["perturbation"]))
    fig, axes = _grid(len(names), cols=4, cell=2.6)
    clean = float(table.loc[table["level"] == 0, "mean_auroc"].iloc[0])
    low = min(0.45, float(table["mean_auroc"].min()) - 0.03)
    for ax, name, color in zip(axes, names, PALETTE):
        part = table[table["perturbation"] == name].sort_values("level")
        ax.axhline(clean, ls="--", color=BASELINE, lw=1)
        ax.axhline(0.5, ls=":", color=BASELINE, lw=1)
        ax.plot(part["level"], part["mean_auroc"], marker="o", color=color, lw=1.8)
        ax.set_xticks(part["level"], [f"{v:g}" for v in part["strength"]])
        ax.set_title(name)
        ax.set_xlabel(part["label"].iloc[0], fontsize=7.5)
        ax.set_ylabel("mean AUROC")
        ax.set_ylim(low, 1.0)
    return _save(fig, path)


def subgroup_plot(table: pd.DataFrame, overall: dict, path: Path) -> Path:
    """Forest plot of mean AUROC per subgroup with its interval, against the whole test set."""
    rows = table[table["finding"] == "mean"].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.2), dpi=DPI)
    if overall.get("ci_low") is not None:
        ax.axvspan(overall["ci_low"], overall["ci_high"], color=MODEL, alpha=0.1, lw=0)
    if overall.get("auroc") is not None:
        ax.axvline(overall["auroc"], color=MODEL, ls="--", lw=1, label="all test images")
    attributes = list(dict.fromkeys(rows["attribute"]))
    y = np.arange(len(rows))[::-1]
    for i, row in rows.iterrows():
        color = PALETTE[attributes.index(row["attribute"]) % len(PALETTE)]
        if not math.isnan(row["ci_low"]):
            ax.plot([row["ci_low"], row["ci_high"]], [y[i], y[i]], color=color, lw=2)
        ax.plot(row["auroc"], y[i], "o", color=color, ms=7)
    ax.set_yticks(y, [f"{r.attribute}: {r.group}  (n={r.n_images})" for r in rows.itertuples()])
    ax.set_xlabel("mean AUROC (95% CI, patient bootstrap)")
    ax.grid(axis="y", alpha=0)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def training_curves(history: pd.DataFrame, path: Path) -> Path:
    """Loss (train and validation) and validation mean AUROC by epoch."""
    has_auroc = "val_mean_auroc" in history and history["val_mean_auroc"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_auroc else 1, figsize=(9 if has_auroc else 5, 3.2), dpi=DPI, squeeze=False)
    ax = axes[0, 0]
    for column, color, label in (("train_loss", MODEL, "training"), ("val_loss", PALETTE[1], "validation")):
        if column in history:
            ax.plot(history["epoch"], history[column], marker="o", ms=3, color=color, label=label)
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    if has_auroc:
        ax = axes[0, 1]
        ax.plot(history["epoch"], history["val_mean_auroc"], marker="o", ms=3, color=MODEL)
        ax.set_ylabel("validation mean AUROC")
        ax.set_title("Validation mean AUROC")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def pointing_plot(summary: dict, path: Path) -> Path:
    """Pointing-game hit rate per finding (and overall): Grad-CAM against the random-point baseline."""
    per = summary["per_finding"]
    names = [*per, "all"]
    hits = [per[n]["hit_rate"] for n in per] + [summary["hit_rate"]]
    base = [per[n]["baseline"] for n in per] + [summary["baseline"]]
    counts = [per[n]["n"] for n in per] + [summary["n"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(names) + 1.5), 3.4), dpi=DPI)
    ax.bar(x - 0.2, hits, 0.4, color=MODEL, label="Grad-CAM peak in box")
    ax.bar(x + 0.2, base, 0.4, color=BASELINE, label="random point (expected)")
    ax.set_xticks(x, [f"{n.replace('_', ' ')}\n(n={c})" for n, c in zip(names, counts)], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of boxes hit")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)
