"""The result table a person reads: one row per trial, its strategy, how far it got, how good it was."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipelines.atomic import staged_file, write_text
from pipelines.formatting import number
from pipelines.labels import FINDINGS

METRIC = "val_mean_auroc"
AUROC_PREFIX = "val_auroc_"
CHECKPOINT_KEY = "checkpoint_path"
STRATEGY_COLUMNS = ("sampling", "loss", "freeze", "lr", "backbone")


def _best_row(history: pd.DataFrame) -> pd.Series | None:
    if history is None or history.empty or METRIC not in history:
        return None
    scored = history[history[METRIC].notna()]
    return scored.loc[scored[METRIC].idxmax()] if len(scored) else None


def weakest_findings(row: pd.Series, n: int = 3) -> str:
    """The ``n`` findings with the lowest validation AUROC at the trial's best epoch."""
    values = {f: row.get(AUROC_PREFIX + f) for f in FINDINGS}
    defined = sorted(((v, f) for f, v in values.items() if v is not None and not math.isnan(v)))
    return ", ".join(f"{f} {number(v)}" for v, f in defined[:n])


def results_table(grid, max_epochs: int) -> pd.DataFrame:
    """One row per trial, sorted best first (trials without a score last)."""
    rows = []
    for result in grid:
        config = result.config or {}
        base = config.get("base", {})
        history = result.metrics_dataframe
        best = _best_row(history)
        epochs = int(history["training_iteration"].max()) if history is not None and len(history) else 0
        if result.error is not None:
            status = "error"
        elif epochs < max_epochs:
            status = "stopped early"
        else:
            status = "completed"
        strategy = {k: config.get(k, base.get(k)) for k in STRATEGY_COLUMNS}
        if strategy["loss"] == "auto":
            strategy["loss"] = "weighted" if strategy["sampling"] == "none" else "bce"
        rows.append(
            {
                "trial": (result.metrics or {}).get("trial_id") or Path(result.path).name,
                **strategy,
                "status": status,
                "epochs": epochs,
                "best_val_mean_auroc": float(best[METRIC]) if best is not None else math.nan,
                "best_epoch": int(best["training_iteration"]) if best is not None else None,
                "weakest_findings": weakest_findings(best) if best is not None else "",
                "error": str(result.error).splitlines()[0][:200] if result.error is not None else "",
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values("best_val_mean_auroc", ascending=False, na_position="last").reset_index(drop=True)


def write_tables(table: pd.DataFrame, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv, markdown = out / "results.csv", out / "results.md"
    with staged_file(csv) as tmp:
        table.to_csv(tmp, index=False)
    shown = table.drop(columns=["error"] if not table.get("error", pd.Series(dtype=str)).astype(bool).any() else [])
    write_text(markdown, "# Strategy search\n\nSorted by best validation mean AUROC (per-finding AUROC of the three weakest findings at that epoch).\n\n" + shown.to_markdown(index=False, floatfmt=".4g") + "\n")
    return csv, markdown


def best_checkpoint_path(grid) -> str | None:
    """The checkpoint of the best epoch of the best trial (TuneReportCallback puts its path in the metrics)."""
    best_score, best_path = -math.inf, None
    for result in grid:
        history = result.metrics_dataframe
        if history is None or CHECKPOINT_KEY not in history or METRIC not in history:
            continue
        scored = history[history[METRIC].notna() & history[CHECKPOINT_KEY].notna()]
        for score, path in zip(scored[METRIC], scored[CHECKPOINT_KEY]):
            if score > best_score and Path(path).exists():
                best_score, best_path = score, path
    return best_path


def plot_curves(grid, path: Path) -> Path | None:
    """Validation mean AUROC by epoch, one line per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = 0
    for result in grid:
        history = result.metrics_dataframe
        if history is None or METRIC not in history or history.empty:
            continue
        c = result.config or {}
        label = f"{c.get('sampling', '?')}/{c.get('loss', '?')}/{c.get('freeze', '?')} lr={c.get('lr', float('nan')):.1e}"
        ax.plot(history["training_iteration"], history[METRIC], marker="o", label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation mean AUROC")
    ax.set_title("Strategy search: validation mean AUROC by epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
