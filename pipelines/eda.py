"""Exploratory data analysis of a run: the course's seven steps as PNG figures plus a Markdown and an
HTML summary in one folder.

Tables come from the whole manifest (vectorized pandas, so 112k rows take well under a second);
pixels come from a small seeded sample of images, read from the preprocessed shards when the run
has them and from disk otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import eda_figures as figures
from pipelines.eda_figures import plural
from pipelines.eda_pixels import PixelSample, moments, pooled, read_disk_sample, read_shard_sample, standardized_moments
from pipelines.eda_summary import Section, to_html, to_markdown
from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS, NEGATIVE, NO_FINDING, POSITIVE, UNCERTAIN
from pipelines.manifest import ContractError
from pipelines.shards import SPLITS

FIGURES = {
    "prevalence": "2_label_prevalence.png",
    "cooccurrence": "2_label_cooccurrence.png",
    "images_per_patient": "3_images_per_patient.png",
    "split_labels": "4_labels_per_split.png",
    "examples": "5_example_images.png",
    "intensity": "6_pixel_intensity.png",
    "standardized": "7_standardized_intensity.png",
}
GRID_ROWS, GRID_COLS = 3, 4
NO_SPLIT = "no split"


@dataclass
class PixelSummary:
    """What the pixel steps (6, 7) measured, and on what."""

    source: str  # "shards" or "disk"
    images: int  # images read
    skipped: list[tuple[str, str]]  # (image_id, reason) for sampled files that could not be read
    raw_mean: float | None  # 0..255, pooled over the sample
    raw_std: float | None
    norm_mean: float | None  # 0..1, what standardization subtracts
    norm_std: float | None
    norm_source: str
    standardized: dict[str, tuple[float, float, int]]  # group (split) -> (mean, std, images)


@dataclass
class EdaResult:
    out_dir: Path
    figures: dict[str, Path]
    summary_md: Path
    summary_html: Path
    n_images: int
    n_unique_ids: int
    duplicates: int  # rows whose image_id already appeared
    n_patients: int
    patients_with_several_images: int
    prevalence: dict[str, int]  # positives per finding
    uncertain: dict[str, int]
    no_finding: int
    cooccurrence: pd.DataFrame  # 14x14, images positive for both findings
    split_counts: pd.DataFrame | None  # positives per finding (and No Finding) x split
    pixels: PixelSummary
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- tables (whole manifest)


def column_overview(manifest: pd.DataFrame) -> pd.DataFrame:
    """Step 1: dtype, nulls and distinct values of every manifest column."""
    nulls = manifest.isna().sum()
    n = max(len(manifest), 1)
    return pd.DataFrame(
        {
            "column": manifest.columns,
            "dtype": manifest.dtypes.astype(str).to_numpy(),
            "non-null": (len(manifest) - nulls).to_numpy(),
            "null": nulls.to_numpy(),
            "null %": (100 * nulls / n).round(2).to_numpy(),
            "unique": manifest.nunique().to_numpy(),
        }
    )


def label_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Step 2: positive and uncertain images per finding, index = finding."""
    labels = manifest[list(FINDINGS)]
    out = pd.DataFrame({"positive": (labels == POSITIVE).sum(), "uncertain": (labels == UNCERTAIN).sum()})
    out["prevalence %"] = (100 * out["positive"] / max(len(manifest), 1)).round(2)
    out.index.name = "finding"
    return out.astype({"positive": "int64", "uncertain": "int64"})


def no_finding_count(labels: pd.DataFrame) -> int:
    """Images negative for every finding (an uncertain label is not 'No Finding')."""
    return int((labels[list(FINDINGS)] == NEGATIVE).all(axis=1).sum())


def cooccurrence_matrix(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images positive for both findings; symmetric, with the positives per finding on the diagonal."""
    positive = (manifest[list(FINDINGS)].to_numpy() == POSITIVE).astype(np.int64)
    return pd.DataFrame(positive.T @ positive, index=list(FINDINGS), columns=list(FINDINGS))


def top_pairs(matrix: pd.DataFrame, k: int = 5) -> list[tuple[str, str, int]]:
    """The ``k`` most frequent pairs of different findings, with their counts (zero counts left out)."""
    upper = matrix.where(np.triu(np.ones(matrix.shape, dtype=bool), 1)).stack()
    upper = upper[upper > 0].sort_values(ascending=False, kind="stable").head(k)
    return [(a, b, int(v)) for (a, b), v in upper.items()]


def images_per_patient(manifest: pd.DataFrame) -> pd.Series:
    return manifest.groupby("patient_id", dropna=True).size()


def id_checks(manifest: pd.DataFrame, per_patient: pd.Series) -> dict[str, int]:
    """Step 3: the counts that reveal duplicated rows and how many patients repeat (the leakage risk
    a patient-level split removes)."""
    return {
        "images (rows)": len(manifest),
        "unique image_ids": int(manifest["image_id"].nunique()),
        "duplicate image_ids": int(manifest["image_id"].duplicated().sum()),
        "duplicate paths": int(manifest["path"].duplicated().sum()),
        "patients": len(per_patient),
        "patients with more than one image": int((per_patient > 1).sum()),
        "images without patient_id": int(manifest["patient_id"].isna().sum()),
    }


def split_order(names) -> list[str]:
    present = set(names)
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def split_label_counts(manifest: pd.DataFrame, splits: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Step 4: positives per finding (and No Finding) per split, and images per split."""
    labeled = splits[["image_id", "split"]].merge(manifest[["image_id", *FINDINGS]], on="image_id", how="inner")
    order = split_order(labeled["split"].astype(str))
    by = labeled["split"].astype(str)
    labels = labeled[list(FINDINGS)]
    counts = (labels == POSITIVE).groupby(by).sum().T
    counts.loc[NO_FINDING] = (labels == NEGATIVE).all(axis=1).groupby(by).sum()
    counts = counts.reindex(columns=order, fill_value=0).astype("int64")
    counts.index.name = "finding"
    return counts, by.value_counts().reindex(order)


def _isin(values: pd.Series, other: pd.Series) -> np.ndarray:
    """``values.isin(other)``: the same answer, but ``isin`` on Arrow-backed strings took 0.9 s for 112k
    rows here, a hash lookup 0.02 s."""
    return pd.Index(other).unique().get_indexer(values) >= 0


def split_checks(manifest: pd.DataFrame, splits: pd.DataFrame) -> dict[str, int]:
    """Leakage and coverage: a patient in two splits inflates evaluation."""
    return {
        "patients in more than one split": int((splits.groupby("patient_id")["split"].nunique() > 1).sum()),
        "manifest images in no split": int((~_isin(manifest["image_id"], splits["image_id"])).sum()),
        "split rows not in the manifest": int((~_isin(splits["image_id"], manifest["image_id"])).sum()),
    }


# ----------------------------------------------------------------------------- pixels (a sample)


def _standardization(sample: PixelSample, stats: dict | None) -> tuple[float | None, float | None, str]:
    """Mean/std (0..1) to standardize with: stats.json's train statistics, or, for a run that was
    not preprocessed, the sample's train images (the whole sample when nothing is assigned to train)."""
    if stats is not None:
        return float(stats["mean"]), float(stats["std"]), "train split, from stats.json"
    train = [h for h, s in zip(sample.hists, sample.splits) if s == "train"]
    basis = train or sample.hists
    if not basis:
        return None, None, "no image could be read"
    mean, std = moments(pooled(basis))
    if std == 0:
        return None, None, "the sampled images are all one intensity"
    what = (plural(len(basis), "sampled train image") if train
            else f"all {plural(len(basis), 'sampled image')} (no train split)")
    return mean / 255.0, std / 255.0, f"computed on {what}; the run is not preprocessed"


def _groups(sample: PixelSample, has_splits: bool) -> dict[str, tuple[np.ndarray, int]]:
    """Pooled histogram and image count per split of the sample."""
    names = [s if s is not None else (NO_SPLIT if has_splits else "all sampled") for s in sample.splits]
    out = {}
    for name in split_order(names):
        hists = [h for h, g in zip(sample.hists, names) if g == name]
        out[name] = (pooled(hists), len(hists))
    return out


def _label_text(row: pd.Series) -> str:
    values = row[list(FINDINGS)]
    parts = [f.replace("_", " ") for f in FINDINGS if values[f] == POSITIVE]
    parts += [f"{f.replace('_', ' ')} (?)" for f in FINDINGS if values[f] == UNCERTAIN]
    return ", ".join(parts) if parts else NO_FINDING


# ----------------------------------------------------------------------------- the run


def _check_inputs(manifest: pd.DataFrame, splits: pd.DataFrame | None, shards: Path | None, stats: dict | None,
                  sample_size: int) -> None:
    missing = [c for c in ("image_id", "path", "patient_id", *FINDINGS) if c not in manifest.columns]
    if missing:
        raise ContractError(f"manifest is missing column(s): {', '.join(missing)}")
    if manifest.empty:
        raise UserInputError("manifest is empty: nothing to explore (did ingest quarantine every row?)")
    if splits is not None:
        missing = [c for c in ("image_id", "patient_id", "split") if c not in splits.columns]
        if missing:
            raise ContractError(f"splits is missing column(s): {', '.join(missing)}")
    if shards is not None and not Path(shards).is_dir():
        raise FileNotFoundError(f"shards folder not found: {shards} (pass shards=None for a run not preprocessed)")
    if stats is not None and not (float(stats.get("std", 0)) > 0 and "mean" in stats):
        raise UserInputError(f"stats needs 'mean' and a positive 'std' (0..1 units), got {stats}")
    if sample_size < 1:
        raise UserInputError(f"sample_size must be at least 1, got {sample_size}")


@dataclass
class _Out:
    """Where the steps write: the folder, the figures made so far, and notes for the summary."""

    dir: Path
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def path(self, key: str) -> Path:
        return self.dir / FIGURES[key]


def _step_columns(manifest: pd.DataFrame) -> Section:
    return Section("1. Manifest columns: dtypes and nulls", [f"{len(manifest):,} rows, {manifest.shape[1]} columns."],
                   [("Columns", column_overview(manifest))])


def _step_labels(manifest: pd.DataFrame, counts: pd.DataFrame, no_finding: int, matrix: pd.DataFrame,
                 out: _Out) -> Section:
    n = len(manifest)
    out.figures["prevalence"] = figures.prevalence(counts, no_finding, n, out.path("prevalence"))
    out.figures["cooccurrence"] = figures.cooccurrence(matrix, out.path("cooccurrence"))
    text = [f"No Finding: {plural(no_finding, 'image')} ({100 * no_finding / n:.1f}%)."]
    zero = [f for f in FINDINGS if counts.loc[f, "positive"] == 0]
    if zero:
        text.append(f"No positive image for: {', '.join(zero)} (a model cannot learn these from this data).")
    pairs = top_pairs(matrix)
    if pairs:
        text.append("Most frequent pairs: " + "; ".join(f"{a} + {b} ({v:,})" for a, b, v in pairs) + ".")
    shown = counts if counts["uncertain"].any() else counts.drop(columns="uncertain")
    return Section("2. Label prevalence and co-occurrence", text, [("Images per finding", shown)],
                   [("Label prevalence", FIGURES["prevalence"]), ("Label co-occurrence", FIGURES["cooccurrence"])])


def _step_patients(per_patient: pd.Series, checks: dict[str, int], out: _Out) -> Section:
    shown = []
    if len(per_patient):
        out.figures["images_per_patient"] = figures.images_per_patient(per_patient, out.path("images_per_patient"))
        shown = [("Images per patient", FIGURES["images_per_patient"])]
    if checks["duplicate image_ids"]:
        out.notes.append(f"{checks['duplicate image_ids']:,} duplicate image_ids in the manifest.")
    text = [f"{plural(len(per_patient), 'patient')}; {checks['patients with more than one image']:,} with more than "
            "one image, so the split must keep each patient in one split."]
    return Section("3. Patients and image IDs", text, [("ID checks", _key_values(checks, "check"))], shown)


def _key_values(values: dict, key: str) -> pd.DataFrame:
    return pd.DataFrame({key: list(values), "value": list(values.values())})


def _step_splits(manifest: pd.DataFrame, splits: pd.DataFrame | None, out: _Out) -> tuple[Section, pd.DataFrame | None]:
    if splits is None:
        return Section("4. Labels per split", ["No splits yet (run cxr split): step skipped."]), None
    counts, sizes = split_label_counts(manifest, splits)
    percent = (100 * counts / sizes.replace(0, np.nan)).fillna(0).round(2)
    out.figures["split_labels"] = figures.split_labels(percent, sizes, out.path("split_labels"))
    table = pd.concat([counts, percent.add_suffix(" %")], axis=1)[[x for c in counts.columns for x in (c, f"{c} %")]]
    patients = splits.groupby(splits["split"].astype(str))["patient_id"].nunique().reindex(sizes.index)
    size_table = pd.DataFrame({"split": sizes.index, "images": sizes.to_numpy(), "patients": patients.to_numpy(),
                               "% of images": (100 * sizes / sizes.sum()).round(1).to_numpy()})
    leak = split_checks(manifest, splits)
    if leak["patients in more than one split"]:
        leaked = leak["patients in more than one split"]
        out.notes.append(f"{plural(leaked, 'patient')} in more than one split (leakage).")
    text = ["Percentages are of each split's images, so splits of different sizes compare."]
    return Section("4. Labels per split", text,
                   [("Split sizes", size_table), ("Leakage and coverage checks", _key_values(leak, "check")),
                    ("Positives per split", table)],
                   [("Labels per split", FIGURES["split_labels"])]), counts


def _step_examples(manifest: pd.DataFrame, grid: PixelSample, seed: int, out: _Out) -> Section:
    size = GRID_ROWS * GRID_COLS
    unique = manifest.drop_duplicates("image_id")
    by_id = unique.set_index(unique["image_id"].astype(str))
    ids = grid.image_ids[:size]
    out.figures["examples"] = figures.examples(
        grid.images[:size], [_label_text(by_id.loc[i]) for i in ids],
        [i + (f" ({s})" if s else "") for i, s in zip(ids, grid.splits[:size])],
        out.path("examples"), GRID_ROWS, GRID_COLS)
    text = [f"{plural(len(ids), 'image')} drawn at random (seed {seed}) from disk, shown at display size; "
            "title = positive findings, (?) = uncertain."]
    return Section("5. Example images", text,
                   figures=[("Example images", FIGURES["examples"])])


def _step_intensity(sample: PixelSample, out: _Out) -> tuple[Section, float | None, float | None]:
    where = (f"{plural(len(sample), 'image')} sampled from the preprocessed shards, 8-bit and resized"
             if sample.source == "shards"
             else f"{plural(len(sample), 'raw image')} sampled from disk, 8-bit grayscale at full resolution")
    hist = pooled(sample.hists) if len(sample) else None
    mean, std = moments(hist) if hist is not None else (None, None)
    out.figures["intensity"] = figures.intensity(sample.images[0] if len(sample) else None,
                                                 sample.hists[0] if len(sample) else None, hist, len(sample), where,
                                                 out.path("intensity"))
    text = [f"Source: {where}; each image weighs the same."]
    if mean is not None:
        text.append(f"Sample pixel mean {mean:.1f}, std {std:.1f} (0-255), i.e. {mean / 255:.4f} / {std / 255:.4f} "
                    "in 0..1 units.")
    return Section("6. Pixel intensities before standardization", text,
                   figures=[("Pixel intensity", FIGURES["intensity"])]), mean, std


def _step_standardized(sample: PixelSample, stats: dict | None, has_splits: bool, out: _Out
                       ) -> tuple[Section, float | None, float | None, str, dict[str, tuple[float, float, int]]]:
    mean01, std01, source = _standardization(sample, stats)
    groups = _groups(sample, has_splits) if len(sample) else {}
    result = ({g: (*standardized_moments(h, mean01, std01), k) for g, (h, k) in groups.items()}
              if mean01 is not None else {})
    out.figures["standardized"] = figures.standardized(sample.hists[0] if len(sample) else None, groups, mean01,
                                                       std01, source, out.path("standardized"))
    if mean01 is None:
        text = [f"Not standardized: {source}."]
    else:
        text = [f"Standardized as (x/255 - {mean01:.4f}) / {std01:.4f}: {source}.",
                "Train images should come out with mean near 0 and std near 1; val/test use the same train "
                "statistics, so small offsets there are expected and are not leakage."]
    table = pd.DataFrame([{"group": g, "images": k, "mean": m, "std": s} for g, (m, s, k) in result.items()])
    section = Section("7. After standardization", text, [("Standardized sample", table)] if len(table) else [],
                      [("Standardized intensity", FIGURES["standardized"])])
    return section, mean01, std01, source, result


def run_eda(
    manifest: pd.DataFrame,
    images_root: Path,
    out_dir: Path,
    splits: pd.DataFrame | None = None,
    shards: Path | None = None,
    stats: dict | None = None,
    sample_size: int = 64,
    seed: int = 0,
) -> EdaResult:
    """Write the EDA figures and summaries to ``out_dir`` and return the key numbers.

    ``shards``/``stats`` are the preprocessed shards folder and ``stats.json`` contents, or None for a
    run not preprocessed yet (the pixel steps then read ``sample_size`` images from ``images_root``).
    """
    _check_inputs(manifest, splits, shards, stats, sample_size)
    out = _Out(Path(out_dir))
    out.dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES.values():  # a figure from an earlier run (e.g. splits since removed) must not linger
        (out.dir / name).unlink(missing_ok=True)

    counts, matrix = label_counts(manifest), cooccurrence_matrix(manifest)
    no_finding = no_finding_count(manifest)
    per_patient = images_per_patient(manifest)
    checks = id_checks(manifest, per_patient)
    split_section, split_counts = _step_splits(manifest, splits, out)
    sections = [_step_columns(manifest), _step_labels(manifest, counts, no_finding, matrix, out),
                _step_patients(per_patient, checks, out), split_section]

    candidates = manifest[["image_id", "path"]].sample(n=min(sample_size, len(manifest)), random_state=seed)
    if splits is not None:
        split_of = splits[["image_id", "split"]].drop_duplicates("image_id")
        candidates = candidates.merge(split_of, on="image_id", how="left")
    if shards is not None:
        sample = read_shard_sample(Path(shards), sample_size, seed)
        grid = read_disk_sample(candidates, images_root, limit=GRID_ROWS * GRID_COLS)
    else:
        sample = grid = read_disk_sample(candidates, images_root)
    if grid.skipped:
        listed = ", ".join(f"{i} ({why})" for i, why in grid.skipped[:10]) + (" ..." if len(grid.skipped) > 10 else "")
        out.notes.append(f"{len(grid.skipped)} sampled image file(s) could not be read and were skipped: {listed}.")
    sections.append(_step_examples(manifest, grid, seed, out))
    section, raw_mean, raw_std = _step_intensity(sample, out)
    sections.append(section)
    section, mean01, std01, norm_source, standardized = _step_standardized(
        sample, stats, splits is not None or sample.source == "shards", out)
    sections.append(section)
    if sample.source == "disk" and stats is None:
        out.notes.append("The run is not preprocessed: pixel statistics come from a sample of raw images on disk.")
    if out.notes:
        sections.append(Section("Notes", out.notes))

    title = f"Exploratory data analysis: {plural(len(manifest), 'image')}"
    summary_md, summary_html = out.dir / "eda.md", out.dir / "eda.html"
    summary_md.write_text(to_markdown(title, sections), encoding="utf-8")
    summary_html.write_text(to_html(title, sections), encoding="utf-8")
    return EdaResult(
        out_dir=out.dir,
        figures=out.figures,
        summary_md=summary_md,
        summary_html=summary_html,
        n_images=len(manifest),
        n_unique_ids=checks["unique image_ids"],
        duplicates=checks["duplicate image_ids"],
        n_patients=checks["patients"],
        patients_with_several_images=checks["patients with more than one image"],
        prevalence={f: int(counts.loc[f, "positive"]) for f in FINDINGS},
        uncertain={f: int(counts.loc[f, "uncertain"]) for f in FINDINGS},
        no_finding=no_finding,
        cooccurrence=matrix,
        split_counts=split_counts,
        pixels=PixelSummary(sample.source, len(sample), grid.skipped, raw_mean, raw_std, mean01, std01, norm_source,
                            standardized),
        notes=out.notes,
    )
