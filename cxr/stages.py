"""One function per pipeline stage: read inputs from the run directory, do the work, write outputs,
return a short human summary. The CLI, the demo and ``cxr run`` all call these."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cxr.settings import (
    CardSection, CvSection, DataSection, EdaSection, EvaluateSection, ExplainImages, ExplainSection, ExternalSet, PredictSettings, PreprocessSection, ScoreSettings, ServeApp,
    ServeSettings, SplitSection, TrackingSection, TuneSection, ValidateSection,
)
from pipelines.atomic import staged_dir, write_json, write_text
from pipelines.labels import FINDINGS
from pipelines.errors import UserInputError
from pipelines.formatting import TERMINAL_MISSING, number, signed
from pipelines.lineage import current_manifest, current_shards, current_splits, fingerprint, manifest_is_recorded, write_parquet
from pipelines.manifest import empty_quarantine, read_table, replace_stage_quarantine, write_table
from pipelines.reject_guard import DEFAULT_MAX_REJECT_FRAC
from pipelines.rundir import INFO_FILE, RunDir
from trainers.config import TrainConfig


def echo_indented(line: str) -> None:
    """A long stage's progress line (per epoch, trial, fold or phase), indented under the stage's own
    line and flushed at once, so a job log shows it as it happens."""
    print(f"  {line}", flush=True)


def _source_info(run: RunDir) -> dict:
    if not run.source_json.exists():
        raise FileNotFoundError(f"{run.source_json} not found: run `cxr ingest --run {run.root}` first")
    return json.loads(run.source_json.read_text())


def _concat(*tables: pd.DataFrame) -> pd.DataFrame:
    """Quarantine tables one after another (pandas warns on concatenating empty frames)."""
    parts = [t for t in tables if len(t)]
    return pd.concat(parts, ignore_index=True) if parts else tables[0]


def manifest_of(run: RunDir) -> pd.DataFrame:
    return current_manifest(run)


def splits_of(run: RunDir, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The run's splits, refused when drawn from another manifest than the run holds now."""
    return current_splits(run, manifest_of(run) if manifest is None else manifest)


def _write_manifest(run: RunDir, manifest: pd.DataFrame, quarantine: pd.DataFrame, source: dict) -> None:
    """``source.json`` (naming the new manifest's fingerprint) first, the manifest last: a kill in
    between leaves a manifest that does not match ``source.json``, which every later verb refuses."""
    write_json(run.source_json, {**source, "manifest_fingerprint": fingerprint(manifest)})
    write_table(quarantine, run.quarantine)
    write_table(manifest, run.manifest)


def ingest_stage(run: RunDir, data: DataSection) -> str:
    """Ingest the collection ``data`` names; ``phantoms`` first makes a synthetic one (as ``cxr demo``)
    in ``<run>/phantoms`` with its cohorts file."""
    if data.source != "phantoms":
        return ingest_collection(run, data.source, Path(data.csv), Path(data.images), warn_only=data.warn_only, max_reject_frac=data.max_reject_frac,
                                 cohort=data.cohort, cohorts=Path(data.cohorts) if data.cohorts else None)
    from pipelines.phantoms import make_collection

    run.ensure()
    made = make_collection(run.root / "phantoms", n_patients=data.patients, image_size=data.phantom_size, seed=data.seed)
    head = f"phantoms: {made.n_images} synthetic images of {made.n_patients} patients in {made.root}"
    return head + "\n" + ingest_collection(run, "nih", made.labels_csv, made.images, warn_only=data.warn_only,
                                           max_reject_frac=data.max_reject_frac, cohorts=made.cohorts_csv)


def ingest_collection(run: RunDir, source: str, label_file: Path, images: Path, warn_only: bool = False, max_reject_frac: float = DEFAULT_MAX_REJECT_FRAC,
                      cohort: str | None = None, cohorts: Path | None = None) -> str:
    """Parse the label file, run the manifest suite, quarantine every rejected row, write the clean
    manifest. One reason rejecting more than ``max_reject_frac`` of the rows stops it before any
    table is written (pipelines/reject_guard.py). ``cohort`` names every image's cohort, or
    ``cohorts`` (a CSV of image id, cohort) each one's."""
    from pipelines.cohorts import assign_cohorts, read_cohort_file
    from pipelines.ingest import ingest
    from pipelines.reject_guard import check_max_reject_frac, guard_rejections
    from validation import drop_failed, format_summary, quarantine_from, raise_on_table_failures, validate_manifest, write_summary
    from validation.mass_rejection import suite_rejections

    check_max_reject_frac(max_reject_frac)
    if cohorts is not None:
        read_cohort_file(cohorts)  # a malformed file stops ingest before the label file is read
    result = ingest(source, Path(label_file), Path(images))
    guard_rejections(result.rejections(), result.rows_in, max_reject_frac, verb="ingest")  # before anything is written
    if cohort is not None or cohorts is not None:
        listed = pd.concat([result.manifest["image_id"], result.quarantine["image_id"]]).dropna()
        assignment = assign_cohorts(result.manifest["image_id"], listed, name=cohort, path=cohorts)
        result.manifest["cohort"] = assignment.cohorts.to_numpy()
        result.notes += assignment.notes
    run.ensure()
    suite = validate_manifest(result.manifest, run.validation, source=source, image_paths=result.files)
    table = result.manifest.assign(row=result.source_rows)
    rejected = quarantine_from(suite, table, stage="validate-manifest")
    guard_rejections([*result.rejections(), *suite_rejections(suite, table)], result.rows_in, max_reject_frac, verb="ingest", report=str(suite.report_path))
    manifest = drop_failed(suite, result.manifest)
    quarantine = _concat(result.quarantine, rejected)
    assert len(manifest) + len(quarantine) == result.rows_in, "ingest lost or duplicated rows"
    _write_manifest(
        run,
        manifest,
        quarantine,
        {
            "source": source,
            "label_file": str(Path(label_file).resolve()),
            "images": str(Path(images).resolve()),
            "rows_in": result.rows_in,
            "manifest_rows": len(manifest),
            "quarantined": len(quarantine),
        },
    )
    summary_path = write_summary([suite], run.validation)
    lines = [
        f"ingest: {result.rows_in} rows in = {len(manifest)} in the manifest + {len(quarantine)} quarantined",
        *[f"  quarantined {n:>7}  {reason}" for reason, n in result.reason_counts().items()],
        *([f"  quarantined {len(rejected):>7}  by the manifest suite (see below)"] if len(rejected) else []),
        result.normalized_line(),
        *[f"  note: {note}" for note in result.notes],
        format_summary([suite]),
        f"wrote {run.manifest}, {run.quarantine}, {summary_path}",
    ]
    raise_on_table_failures([suite], warn_only=warn_only)
    return "\n".join(lines)


def validate_stage(run: RunDir, settings: ValidateSection) -> str:
    """Re-run the suites on what the run directory holds: the manifest, and the splits if present.
    One check failing more than ``max_reject_frac`` of the manifest's rows stops it before the
    manifest or the quarantine is changed (pipelines/reject_guard.py)."""
    warn_only, max_reject_frac = settings.warn_only, settings.max_reject_frac
    from pipelines.reject_guard import check_max_reject_frac, guard_rejections
    from validation import drop_failed, format_summary, quarantine_from, raise_on_table_failures, validate_manifest, validate_splits, write_summary
    from validation.mass_rejection import suite_rejections

    check_max_reject_frac(max_reject_frac)
    manifest = read_table(run.manifest, "manifest", f"run `cxr ingest --run {run.root}` first")
    info = _source_info(run) if run.source_json.exists() else {}
    results = [validate_manifest(manifest, run.validation, source=info.get("source"))]
    lines = []
    if not manifest_is_recorded(run, manifest):
        # validate is how a manifest edited by hand (or made by another tool) enters the run:
        # it is validated as it is, and later stages read it from now on
        lines.append(f"validate: {run.manifest} is not the one ingest wrote (edited, or an ingest was interrupted): validated as it is now")
        if not results[0].failed_rows:
            write_json(run.source_json, {**info, "manifest_fingerprint": fingerprint(manifest), "manifest_rows": len(manifest)})
    if results[0].failed_rows:
        guard_rejections(suite_rejections(results[0], manifest), len(manifest), max_reject_frac, verb="validate", report=str(results[0].report_path))
        rejected = quarantine_from(results[0], manifest, stage="validate-manifest")
        kept = drop_failed(results[0], manifest)
        existing = pd.read_parquet(run.quarantine) if run.quarantine.exists() else empty_quarantine()
        _write_manifest(run, kept, _concat(existing, rejected), {**info, "manifest_rows": len(kept), "quarantined": len(existing) + len(rejected)})
        lines.append(f"validate: moved {len(rejected)} manifest row(s) to the quarantine; {len(kept)} remain")
        manifest = kept
    if run.splits.exists() and results[0].failed_rows:
        lines.append(f"validate: {run.splits} was drawn from the manifest before these rows left it: re-run `cxr split --run {run.root}`")
    elif run.splits.exists():
        report = json.loads(run.split_report.read_text()) if run.split_report.exists() else {}
        results.append(
            validate_splits(
                manifest,
                splits_of(run, manifest),
                run.validation,
                test_frac=report.get("test_frac", SplitSection.test_frac),
                val_frac=report.get("val_frac", SplitSection.val_frac),
            )
        )
    summary_path = write_summary(results, run.validation)
    lines += [format_summary(results), f"wrote {summary_path}"]
    raise_on_table_failures(results, warn_only=warn_only)
    return "\n".join(lines)


def split_stage(run: RunDir, settings: SplitSection) -> str:
    """Patient-level split with the leakage audit, then the GX split suite."""
    test_frac, val_frac, min_positives, seed = settings.test_frac, settings.val_frac, settings.min_positives, settings.seed
    from pipelines.split import split_patients
    from validation import raise_on_table_failures, validate_splits, write_summary, format_summary

    manifest = manifest_of(run)
    result = split_patients(manifest, test_frac=test_frac, val_frac=val_frac, min_positives=min_positives, seed=seed)
    suite = validate_splits(manifest, result.splits, run.validation, test_frac=test_frac, val_frac=val_frac)
    summary_path = write_summary([suite], run.validation)
    positives = result.positives_per_split(manifest)
    counts = result.splits.groupby("split").agg(images=("image_id", "size"), patients=("patient_id", "nunique")).reindex(["train", "val", "test"], fill_value=0)
    shared = int((result.splits.groupby("patient_id")["split"].nunique() > 1).sum())
    report = {
        "test_frac": test_frac,
        "val_frac": val_frac,
        "min_positives": min_positives,
        "seed": seed,
        "counts": {s: {k: int(v) for k, v in row.items()} for s, row in counts.iterrows()},
        "positives": {f: {s: int(positives.at[f, s]) for s in positives.columns} for f in FINDINGS},
        "shortfalls": result.shortfalls,
        "patients_in_two_splits": shared,
    }
    raise_on_table_failures([suite], warn_only=settings.warn_only)
    write_json(run.split_report, report)
    write_parquet(result.splits, run.splits, made_from={"manifest": fingerprint(manifest)})
    lines = [
        "split (patient-level, drawn test -> val -> train):",
        *[f"  {s:<5} {c['images']:>6} images  {c['patients']:>6} patients" for s, c in report["counts"].items()],
        f"  leakage audit: {shared} patients shared between splits",
        "  positives per split:",
        "    " + positives.to_string().replace("\n", "\n    "),
    ]
    for s in result.shortfalls:
        lines.append(f"  short: {s['split']} has {s['positives']} {s['finding']} positives (< {s['wanted']}); only {s['available']} in the collection")
    lines += [format_summary([suite]), f"wrote {run.splits}, {run.split_report}, {summary_path}"]
    return "\n".join(lines)


def preprocess_stage(run: RunDir, settings: PreprocessSection) -> str:
    """Ray Data preprocessing; undecodable images go to the quarantine; the image suite runs on the result.

    The shards are built in a staging folder and swapped in only when complete, with a lineage
    record shared with ``stats.json``: a killed or interrupted re-run leaves the previous shards
    (or, killed mid-swap, none), never a partial set that a later verb accepts."""
    from validation import format_summary, write_summary

    manifest = manifest_of(run)
    splits, info = splits_of(run, manifest), _source_info(run)
    image_size = settings.image_size
    result, quarantine, suite, lineage = _preprocess_shards(run, manifest, splits, Path(info["images"]), image_size, settings.blocks)
    stats = {**result.stats, **lineage}
    write_json(run.stats, stats)
    summary_path = write_summary([suite], run.validation)
    lines = [
        _preprocess_line(result, image_size),
        *[f"  quarantined {r.image_id}: {r.reason}" for r in quarantine.head(20).itertuples()],
        f"  train intensity: mean {result.stats['mean']:.4f}, std {result.stats['std']:.4f} (0..1 units, train split only)",
        format_summary([suite]),
        f"wrote {run.shards}, {run.stats}, {summary_path}",
    ]
    return "\n".join(lines)


def _preprocess_line(result, image_size: int) -> str:
    return (f"preprocess: {sum(result.written.values())} images at {image_size}x{image_size} "
            + ", ".join(f"{s} {n}" for s, n in result.written.items()) + f"; {len(result.quarantine)} quarantined")


def _preprocess_shards(run: RunDir, manifest: pd.DataFrame, splits: pd.DataFrame, images: Path, image_size: int,
                       num_blocks: int | None, train_stats: bool = True):
    """Ray Data into ``run.shards`` (staged, swapped in whole) with the image suite; the images it
    rejects replace the ``preprocess`` records of ``run.quarantine``. Shared by ``cxr preprocess``
    and ``cxr external``, so an external collection is decoded exactly as training's was.
    Returns the preprocess result, this stage's quarantine, the suite and the shards' lineage."""
    from pipelines.lineage import shards_made_from, write_shards_lineage
    from pipelines.preprocess import preprocess
    from validation import REJECT_FLAGS, image_checks, validate_images

    lineage = shards_made_from(manifest, splits)
    with staged_dir(run.shards) as staging:
        result = preprocess(manifest, splits, images, staging, image_size=image_size, num_blocks=num_blocks, checks=image_checks,
                            reject_flags=REJECT_FLAGS, train_stats=train_stats)
        suite = validate_images(result.image_table, run.validation, image_size=image_size)
        # The GX verdicts name the reasons; the batch flags already kept those images out of the shards.
        table = result.image_table.reset_index(drop=True)
        verdicts = {table.at[p, "image_id"]: "; ".join(r) for p, r in suite.failed_rows.items()}
        unrouted = set(verdicts) - set(result.quarantine["image_id"])
        if unrouted:
            raise RuntimeError(f"image suite rejected images the batch checks let through (thresholds disagree): {sorted(unrouted)[:5]}")
        quarantine = result.quarantine.assign(reason=[f"{verdicts[i]}: {r}" if i in verdicts else r for i, r in zip(result.quarantine["image_id"], result.quarantine["reason"])])
        replace_stage_quarantine(run.quarantine, "preprocess", quarantine)
        write_shards_lineage(staging, lineage)
    return result, quarantine, suite, lineage


def eda_stage(run: RunDir, settings: EdaSection) -> str:
    from pipelines.eda import run_eda

    manifest, info = manifest_of(run), _source_info(run)
    splits = splits_of(run, manifest) if run.splits.exists() else None
    stats = current_shards(run, splits) if run.stats.exists() and splits is not None else None
    result = run_eda(
        manifest,
        Path(info["images"]),
        run.eda,
        splits=splits,
        shards=run.shards if stats is not None else None,
        stats=stats,
        sample_size=settings.sample_size,
        seed=settings.seed,
    )
    return f"eda: {len(result.figures)} figures, summary at {result.summary_html} and {result.summary_md}"


def _auroc_lines(metrics: dict, prefix: str = "val_auroc_") -> list[str]:
    return [f"    {f:<19} {metrics.get(prefix + f, float('nan')):.3f}" for f in FINDINGS]


def open_tracker(run: RunDir, tracking: TrackingSection | None, register: bool = True):
    """The MLflow tracker a stage logs to (``trainers/tracking.py``); off when ``tracking`` is None
    (a library caller) or disabled (``--no-tracking``)."""
    from trainers.tracking import Tracker

    if tracking is None or not tracking.enabled:
        return Tracker.off()
    return Tracker.open(run.root, tracking.uri, tracking.experiment, tracking.register if register else None)


def tracking_lines(tracker, run: RunDir, record_folder: Path) -> list[str]:
    """Where the stage's MLflow run went, and how to look at it."""
    from trainers.tracking import is_local_store, read_record, ui_command

    record = read_record(record_folder)
    if not tracker.enabled or record is None:
        return ["  MLflow: " + ("off (tracking failed: see the warning above)" if tracker.warnings_given else "off")] if tracker.uri or tracker.warnings_given else []
    lines = [f"  MLflow: run {record['run_id']} in experiment {record['experiment']!r} at {record['tracking_uri']}"]
    if registered := record.get("registered"):
        lines.append(f"  registered as {registered['name']} version {registered['version']} (models:/{registered['name']}/{registered['version']})")
    if is_local_store(record["tracking_uri"], run.root):
        lines.append(f"  MLflow UI: {ui_command(run.root)}")
    return lines


def train_stage(run: RunDir, cfg: TrainConfig, tracking: TrackingSection | None = None) -> str:
    """Ray Train on the run's shards; the best epoch's checkpoint lands in ``<run>/train/best``."""
    from pipelines.lineage import write_model_lineage
    from trainers import fit

    stats = current_shards(run)
    tracker = open_tracker(run, tracking)
    print(f"train: {cfg.epochs} epoch(s) of {cfg.backbone} on {cfg.workers} worker(s); one line per epoch as it ends", flush=True)
    result = fit(run, cfg, echo=echo_indented, tracker=tracker)
    write_model_lineage(run.train, stats)
    best = result.best_metrics
    lines = [
        f"train: {cfg.backbone} (weights {cfg.weights}, freeze {cfg.effective_freeze}{' (auto)' if cfg.freeze == 'auto' else ''}, loss {cfg.effective_loss}, sampling {cfg.sampling}), "
        f"{len(result.metrics_history)} epoch(s) on {cfg.workers} worker(s)",
        *([f"  stopped early after epoch {trained}: validation mean AUROC had not improved for {cfg.patience} epoch(s) (--patience {cfg.patience})"]
          if cfg.patience and (trained := len(result.metrics_history)) < cfg.epochs else []),
        f"  best epoch {int(best.get('epoch', 0))}: validation mean AUROC {best.get('val_mean_auroc', float('nan')):.3f}, val_loss {best.get('val_loss', float('nan')):.4f}",
        "  per-finding validation AUROC (nan = undefined: one class only in validation):",
        *_auroc_lines(best),
        f"wrote {result.best_checkpoint_dir} (model.pt + model.json), {run.train_history}",
        *tracking_lines(tracker, run, run.train),
    ]
    return "\n".join(lines)


def tune_stage(run: RunDir, settings: TuneSection, base: TrainConfig, tracking: TrackingSection | None = None) -> str:
    """Ray Tune over training strategies from ``base``; table in ``<run>/tune/results.{csv,md}``, best in ``tune/best``."""
    from pipelines.lineage import write_model_lineage
    from tuning import run_search

    stats = current_shards(run)
    asha = settings.asha
    tracker = open_tracker(run, tracking)
    result = run_search(run, base, settings.search_space(), num_samples=settings.num_samples, asha=asha, resume=settings.resume,
                        grace_period=settings.grace_period, epoch_echo=echo_indented if settings.verbose else None,
                        tracker=tracker)
    write_model_lineage(run.tune, stats)
    hidden = ["backbone"] + (["error"] if not result.table.get("error", pd.Series(dtype=str)).astype(bool).any() else [])
    shown = result.table.drop(columns=[c for c in hidden if c in result.table])
    lines = [
        f"tune: {len(result.table)} trial(s), {result.trial_epochs} trial-epochs trained ({'ASHA early stopping' if asha else 'no early stopping'})",
        shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        f"wrote {result.csv}, {result.markdown}" + (f", {result.curves}" if result.curves else "") + (f", best checkpoint {result.best_dir}" if result.best_dir else " (no trial produced a checkpoint)"),
        *tracking_lines(tracker, run, run.tune),
    ]
    return "\n".join(lines)


def _pointing_line(summary: dict) -> str:
    if not summary:
        return "  pointing game: no radiologist boxes for these images"
    return (
        f"  pointing game on {summary['n']} boxed finding(s): Grad-CAM peak inside the box {summary['hit_rate']:.0%} "
        f"vs random point {summary['baseline']:.0%} (with tolerance {summary['hit_rate_tolerant']:.0%} vs {summary['baseline_tolerant']:.0%})"
    )


def evaluate_stage(run: RunDir, settings: EvaluateSection, tracking: TrackingSection | None = None) -> str:
    """Test-split metrics with patient-bootstrap intervals beside two baselines, operating points
    from validation, calibration, robustness and subgroups, in ``<run>/eval``."""
    from evaluation import evaluate_run

    checkpoint = Path(settings.checkpoint) if settings.checkpoint else None
    _check_inputs(run, checkpoint)
    from trainers.tracking import clear_record

    tracker = open_tracker(run, tracking, register=False)
    clear_record(run.eval)
    print("evaluate: one line per phase as it ends", flush=True)
    result = evaluate_run(run, checkpoint, n_boot=settings.bootstrap, robustness=settings.robustness, subgroups=settings.subgroups,
                          progress=echo_indented)
    m = result.metrics
    registered = track_evaluation(tracker, run, result, settings)
    mean = m["mean"]
    lines = [
        f"evaluate: checkpoint {m.get('checkpoint', checkpoint)}, {len(result.predictions)} test images",
        f"  mean AUROC {_fmt(mean.get('auroc'))} (95% CI {_fmt(mean.get('ci_low'))}-{_fmt(mean.get('ci_high'))}, bootstrap over patients)",
        "  per finding: AUROC [95% CI]  (undefined = no positives or no negatives in test)",
    ]
    for f, v in m["per_finding"].items():
        interval = f"[{_fmt(v.get('ci_low'))}-{_fmt(v.get('ci_high'))}]" if v.get("auroc") is not None else "undefined"
        lines.append(f"    {f:<19} {_fmt(v.get('auroc'))} {interval}")
    if m.get("baselines"):
        lines.append("  baselines (fit on train; model - baseline on the same bootstrap replicates):")
        for name, b in m["baselines"].items():
            lines.append(f"    {name:<19} {_fmt(b['mean_auroc'])} [{_fmt(b['ci_low'])}-{_fmt(b['ci_high'])}]  "
                         f"model - baseline {_signed(b['diff'])} [{_signed(b['diff_ci_low'])}, {_signed(b['diff_ci_high'])}]")
    if m.get("subgroups"):
        lines.append(f"  subgroups by {', '.join(m['subgroups'])}: eval/subgroups.csv")
    lines += [f"  ! {w}" for w in m.get("warnings", [])]
    lines.append(f"wrote {result.out_dir}: predictions.parquet, metrics.json, figures/")
    lines += tracking_lines(tracker, run, run.eval)
    if registered:
        lines.append(f"  tagged {registered['name']} version {registered['version']} with these test metrics")
    return "\n".join(lines)


def track_evaluation(tracker, run: RunDir, result, settings: EvaluateSection) -> dict | None:
    """The evaluation as an MLflow run (headline metrics, metrics.json, tables, figures), linked to
    the training run that made the checkpoint; a registered version of it gets the test metrics as tags."""
    from pipelines.lineage import data_fingerprint, file_sha256
    from trainers.tracking import headline_metrics, read_record, tag_registered, training_tags

    m = result.metrics
    checkpoint = Path(m["checkpoint"])
    trained = read_record(checkpoint.parent)
    run_id = tracker.start_run("evaluate", {**training_tags(run, "evaluate"), "cxr.checkpoint": str(checkpoint),
                                            **({"cxr.trained_by": trained["run_id"]} if trained else {})})
    model_json = checkpoint / "model.json"
    tracker.log_params(run_id, {"checkpoint": str(checkpoint), "model_json_sha256": file_sha256(model_json) if model_json.is_file() else None,
                                "backbone": m.get("backbone"), "image_size": m.get("image_size"), "bootstrap": settings.bootstrap,
                                "robustness": settings.robustness, "subgroups": settings.subgroups, "data": data_fingerprint(run)})
    tracker.log_metrics(run_id, headline_metrics(m))
    out = result.out_dir
    tracker.log_files(run_id, [out / "metrics.json", out / "robustness.csv", out / "subgroups.csv"])
    tracker.log_folder(run_id, out / "figures", "figures")
    tracker.end_run(run_id)
    tracker.record(run.eval, run_id)
    mean = m["mean"]
    tags = {"test_mean_auroc": mean.get("auroc"), "test_mean_auroc_ci": f"[{mean.get('ci_low')}, {mean.get('ci_high')}]",
            "test_images": m.get("n_images"), "test_patients": m.get("n_patients"), "evaluated_by_run": run_id or "",
            **{f"model_minus_{name}": f"{b.get('diff')} [{b.get('diff_ci_low')}, {b.get('diff_ci_high')}]" for name, b in (m.get("baselines") or {}).items()}}
    return tag_registered(trained, tags) if tracker.uri is not None else None  # --no-tracking leaves the registry alone


def _check_inputs(run: RunDir, checkpoint: Path | None) -> dict:
    """Evaluate and explain read the shards and the run's own checkpoint: both must be current.
    Returns the shards' ``stats.json``."""
    from pipelines.lineage import check_model_lineage

    stats = current_shards(run)
    if checkpoint is None:
        check_model_lineage(run, run.best_checkpoint(), stats)
    return stats


def external_stage(run: RunDir, settings: ExternalSet) -> str:
    """External validation: ingest a second collection with the run's own ingest and suites, refuse
    (or, with ``drop_overlap``, quarantine) patients and images the model trained or was selected on,
    preprocess it at the run's image size and score it as ``cxr evaluate`` scores the test split,
    into ``<run>/external/NAME/``. Built in a staging folder and swapped in only when every step
    succeeded: a refused or failed run leaves the previous ``external/NAME/``, or none."""
    from evaluation import evaluate_run
    from evaluation.external import below_internal
    from pipelines.external import check_name, drop_overlap as split_off, overlap_reasons, refuse_overlap
    from validation import ValidationFailed, format_summary, write_summary

    name, label_file, checkpoint = settings.name, Path(settings.csv), Path(settings.checkpoint) if settings.checkpoint else None
    check_name(name)
    stats = _check_inputs(run, checkpoint)
    size = _model_image_size(run.best_checkpoint(checkpoint), stats, run)
    splits = splits_of(run)
    target = run.external(name)
    with staged_dir(target) as staging:
        ext = RunDir(staging)
        try:
            ingest_lines = ingest_collection(ext, settings.source, label_file, Path(settings.images), max_reject_frac=settings.max_reject_frac,
                                             cohort=settings.cohort, cohorts=Path(settings.cohorts) if settings.cohorts else None)
        except ValidationFailed:
            _refuse_if_nothing_left(ext, name, label_file)  # every row quarantined: say that, not "the manifest is empty"
            raise
        manifest, info = current_manifest(ext), _source_info(ext)
        quarantine = pd.read_parquet(ext.quarantine)
        reasons = overlap_reasons(manifest, splits)
        if not settings.drop_overlap:
            refuse_overlap(manifest, reasons, name)
        manifest, moved = split_off(manifest, reasons)
        if len(moved):
            quarantine = _concat(quarantine, moved)
            _write_manifest(ext, manifest, quarantine, {**info, "manifest_rows": len(manifest), "quarantined": len(quarantine)})
        _refuse_if_nothing_left(ext, name, label_file)
        test = pd.DataFrame({"image_id": manifest["image_id"], "patient_id": manifest["patient_id"], "split": "test"})
        result, decoded_out, suite, _ = _preprocess_shards(ext, manifest, test, Path(info["images"]), size, None, train_stats=False)
        write_summary([suite], ext.validation)
        if result.written["test"] == 0:
            raise UserInputError(f"external set {name!r}: none of its {len(manifest)} images could be decoded "
                                 f"({_reason_counts(decoded_out)}); nothing was written")
        evaluation = evaluate_run(run, checkpoint, n_boot=settings.bootstrap, robustness=False, subgroups=settings.subgroups, data=ext)
        summary_json = ext.validation / "summary.json"  # names its Data Docs pages by absolute path: the final one
        write_text(summary_json, summary_json.read_text().replace(str(ext.root), str(target)))
    m = evaluation.metrics
    internal = json.loads(run.eval_metrics.read_text()) if run.eval_metrics.exists() else None
    quarantined = info["rows_in"] - result.written["test"]
    lines = [
        f"external {name}: {info['rows_in']} rows in = {result.written['test']} scored + {quarantined} quarantined "
        f"({len(moved)} overlapping the run's train/val split, {len(decoded_out)} not decodable)",
        *["  " + line for line in ingest_lines.splitlines()[:-1]],
        f"  mean AUROC {_fmt(m['mean']['auroc'])} (95% CI {_fmt(m['mean']['ci_low'])}-{_fmt(m['mean']['ci_high'])}) on "
        f"{m['n_images']} images of {m['n_patients']} patients"
        + (f"; internal test {_fmt(internal['mean']['auroc'])} ({_fmt(internal['mean']['ci_low'])}-{_fmt(internal['mean']['ci_high'])})"
           if internal else "; no internal figure yet (run `cxr evaluate`)"),
        "  per finding: external AUROC [95% CI]" + ("  |  internal test" if internal else "") + "  (findings undefined on both left out)",
    ]
    for f, v in m["per_finding"].items():
        theirs = internal["per_finding"].get(f, {}).get("auroc") if internal else None
        if v["auroc"] is None and theirs is None:
            continue  # undefined on both: nothing to compare
        interval = f"[{_fmt(v['ci_low'])}-{_fmt(v['ci_high'])}]" if v["auroc"] is not None else "undefined"
        lines.append(f"    {f:<19} {_fmt(v['auroc'])} {interval}" + (f"  |  {_fmt(theirs)}" if internal else ""))
    worse = below_internal(name, m, internal)
    lines += [f"  ! {w}" for w in ([worse] if worse else []) + m.get("warnings", [])]
    lines += [format_summary([suite]), f"wrote {target}: manifest.parquet, quarantine.parquet, source.json, validation/, shards/, eval/"]
    return "\n".join(lines).replace(str(ext.root), str(target))


def _model_image_size(checkpoint: Path, stats: dict, run: RunDir) -> int:
    """The image size external images are preprocessed at: the run's, which the model must share."""
    info = json.loads((Path(checkpoint) / INFO_FILE).read_text())
    if int(info["image_size"]) != int(stats["image_size"]):
        raise UserInputError(f"{checkpoint}/model.json expects {info['image_size']}x{info['image_size']} images but {run.stats} "
                             f"says the run's shards are {stats['image_size']}x{stats['image_size']}: pass a checkpoint trained on this run")
    return int(stats["image_size"])


def _refuse_if_nothing_left(ext: RunDir, name: str, label_file: Path) -> None:
    """Stop with the reasons when the external manifest (as written so far) holds no row to score."""
    if not ext.manifest.exists() or len(pd.read_parquet(ext.manifest, columns=["image_id"])):
        return
    quarantine = pd.read_parquet(ext.quarantine)
    raise UserInputError(f"external set {name!r}: none of the {len(quarantine)} rows of {label_file} can be scored; "
                         f"all were quarantined ({_reason_counts(quarantine)}); nothing was written")


def _reason_counts(quarantine: pd.DataFrame) -> str:
    counts = quarantine["reason"].str.split(r" \(|:", regex=True).str[0].value_counts()
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def _signed(value) -> str:
    return signed(value, 3, missing=TERMINAL_MISSING)


def _fmt(value) -> str:
    return number(value, 3, missing=TERMINAL_MISSING)


def explain_stage(run: RunDir, settings: ExplainSection) -> str:
    """Grad-CAM gallery (TP/FP/FN) and the pointing game against radiologist boxes, in ``<run>/explain``."""
    from evaluation import explain_run

    checkpoint = Path(settings.checkpoint) if settings.checkpoint else None
    _check_inputs(run, checkpoint)
    result = explain_run(run, checkpoint, max_images=settings.max_images)
    return "\n".join([f"explain: {len(result.images)} Grad-CAM overlay(s)", _pointing_line(result.summary), f"wrote {result.out_dir}"])


def cv_stage(run: RunDir, settings: CvSection, base: TrainConfig, tracking: TrackingSection | None = None) -> str:
    """Patient-grouped k-fold cross-validation of the training recipe ``base``: folds as concurrent
    Ray Tune trials, pooled out-of-fold metrics beside cross-validated baselines, in ``<run>/cv``."""
    from cxr.cv import cv_summary, run_cv

    print(f"cv: {settings.folds} folds by patient of {base.backbone}, {base.epochs} epoch(s) each; one line per fold as it ends", flush=True)
    tracker = open_tracker(run, tracking, register=False)
    result = run_cv(run, base, settings.folds, seed=base.seed, val_frac=settings.val_frac, resume=settings.resume,
                    n_boot=settings.bootstrap, subgroups=settings.subgroups, verbose=settings.verbose,
                    progress=echo_indented, tracker=tracker)
    return "\n".join([cv_summary(result), *tracking_lines(tracker, run, run.cv)])


def explain_images_stage(files: ExplainImages, settings: ExplainSection) -> str:
    """``cxr explain --images``: overlays for image files from a checkpoint, outside any run."""
    from evaluation import explain
    from pipelines.sources.nih import read_boxes

    if not settings.checkpoint or not files.out:
        raise UserInputError("explain --images needs --checkpoint and --out")
    result = explain(Path(settings.checkpoint), [Path(f) for f in files.images], Path(files.out),
                     boxes=read_boxes(Path(files.boxes)) if files.boxes else None)
    return "\n".join([f"explain: {len(result.images)} Grad-CAM overlay(s) in {result.out_dir}", _pointing_line(result.summary)])


def predict_stage(settings: PredictSettings) -> str:
    """``cxr predict``: the finding probabilities of image files, printed (and written to a CSV)."""
    from evaluation import format_predictions, predict_images

    frame = predict_images(Path(settings.checkpoint), [Path(f) for f in settings.images])
    if settings.csv:
        frame.to_csv(settings.csv, index=False)
    return format_predictions(frame) + (f"\nwrote {settings.csv}" if settings.csv else "")


def card_stage(run: RunDir, settings: CardSection) -> str:
    """The model card, ``<run>/model_card.md`` and ``model_card.json``: every fact read from the
    run's files, the limitations derived from its numbers, absent parts named with their command."""
    from evaluation.card import write_card

    from trainers.tracking import attach_files, read_record

    card = write_card(run, min_positives=settings.min_positives, max_drop=settings.max_drop)
    attach_files(read_record(run.eval), [run.model_card, run.model_card_json])  # the card joins the evaluation's MLflow run
    parts = {**{k: v for k, v in card["sections"].items() if k != "metrics"},
             **{f"metrics ({k})": v for k, v in card["sections"]["metrics"].items()}}
    missing = [name.replace("_", " ") for name, part in parts.items() if part.get("status") == "missing"]
    limits = card["limitations"]
    lines = [f"card: {len(parts) - len(missing)} of {len(parts)} sections from the run's files; {len(limits)} limitation(s) from the numbers",
             *[f"  ! {x['text']}" for x in limits],
             *([f"  not evaluated: {', '.join(missing)}"] if missing else []),
             f"wrote {run.model_card}, {run.model_card_json}"]
    return "\n".join(lines)


def _score_inputs(run: RunDir | None, settings: ScoreSettings) -> tuple[pd.DataFrame, str]:
    """The table of ``image_id``, absolute ``path`` to score, and where it came from, in words."""
    from evaluation.batch_score import folder_inputs, manifest_inputs

    given = [name for name, value in (("--images", settings.images), ("--manifest", settings.manifest), ("--run", run)) if value]
    if len(given) != 1:
        raise UserInputError(f"score needs exactly one input, --images DIR, --manifest CSV|PARQUET or --run DIR; got {' and '.join(given) or 'none'}")
    if settings.images:
        return folder_inputs(Path(settings.images)), f"the files under {settings.images}"
    if settings.manifest:
        return manifest_inputs(Path(settings.manifest)), f"the files {settings.manifest} lists"
    manifest = manifest_of(run)
    rows = manifest.merge(splits_of(run, manifest)[["image_id", "split"]], on="image_id")
    if settings.split != "all":
        rows = rows[rows["split"] == settings.split]
    root = Path(_source_info(run)["images"])
    return (pd.DataFrame({"image_id": rows["image_id"].astype(str).to_numpy(), "path": [str(root / p) for p in rows["path"]]}),
            f"the {settings.split} split{'s' if settings.split == 'all' else ''} of {run.root}")


def score_stage(run: RunDir | None, settings: ScoreSettings) -> str:
    """``cxr score``: a collection through the Ray Data actor pool; ``pred_<finding>`` at the
    validation-chosen thresholds when ``cxr evaluate`` scored this checkpoint."""
    from evaluation.batch_score import QUARANTINE, SCORES, SUMMARY, THRESHOLDS, score_collection
    from evaluation.scoring import read_thresholds, run_of_checkpoint
    from trainers.checkpoint import read_info

    inputs, source = _score_inputs(run, settings)
    if run is None and not settings.checkpoint:
        raise UserInputError("score needs --checkpoint DIR (or --run DIR, whose best checkpoint is used)")
    checkpoint = run.best_checkpoint(settings.checkpoint) if run is not None else Path(settings.checkpoint)
    info = read_info(checkpoint)
    thresholds = read_thresholds(run or run_of_checkpoint(checkpoint), checkpoint, list(info["findings"]))
    print(f"score: {len(inputs)} image(s), {source}; checkpoint {checkpoint} ({info['backbone']}, {info['image_size']} px); "
          f"batch {settings.batch_size}" + (f", {settings.gpus_per_actor:g} GPU per actor" if settings.gpus_per_actor else ""),
          flush=True)
    result = score_collection(inputs, checkpoint, Path(settings.out), thresholds, settings.batch_size, settings.actors,
                              settings.gpus_per_actor, source, settings.threads_per_actor, settings.decode)
    s = result.summary
    lines = [f"score: {s['rows_in']} in = {result.scored} scored + {result.quarantined} quarantined"
             + (f" (first: {_first_reason(result.out / QUARANTINE)})" if result.quarantined else ""),
             f"  {s['actors']} actor(s) x {s['threads_per_actor']} torch thread(s), decoding {s['decoding']}"]
    if result.flagged is None:
        lines.append(f"  out of distribution: unknown; {s['ood_note']}")
    else:
        lines.append(f"  out of distribution: {result.flagged} of {result.scored} flagged; {s['ood_note']}")
    lines.append(f"  calls: pred_<finding> at the {thresholds.rule} thresholds chosen on validation ({thresholds.source}), see {THRESHOLDS}"
                 if thresholds else "  calls: none (no evaluation of this checkpoint: probabilities only; `cxr evaluate` chooses thresholds)")
    lines.append(f"wrote {result.out}: {SCORES}/, {QUARANTINE}, {SUMMARY}" + (f", {THRESHOLDS}" if thresholds else ""))
    return "\n".join(lines)


def _check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, before Serve's proxy fails to bind it."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserInputError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UserInputError(f"cannot listen on {host}:{port} ({err.strerror}): another server uses it; choose another with --port") from None


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _stop_serving(app_name: str) -> None:
    """Delete the application (its replicas finish what they hold). On the embedded Ray, Serve's
    controller and proxy end with Ray itself (``serve.shutdown()`` there only adds Ray's warnings
    about the controller's own shutdown task); on a cluster Serve is shut down when no other
    application is left on it."""
    from ray import serve

    from cxr.runtime import embedded_ray

    serve.delete(app_name)
    if not embedded_ray() and not serve.status().applications:
        serve.shutdown()


def check_serve(app: ServeApp, http: ServeSettings, port: bool = True) -> dict:
    """What ``cxr serve`` can check before Ray starts: the checkpoint's ``model.json``, and with
    ``port`` (an embedded Ray, whose proxy will listen on this machine) that the port is free. On a
    cluster the proxy may be Serve's own, already listening there."""
    from trainers.checkpoint import read_info

    info = read_info(Path(app.checkpoint))
    if port:
        _check_port(http.host, http.port)
    return info


def serve_stage(app: ServeApp, http: ServeSettings) -> str:
    """``cxr serve``: the checkpoint as a Ray Serve application on the connected Ray; prints where it
    listens and how to call it, serves until Ctrl-C (or SIGTERM), then shuts Serve down and returns
    what it served."""
    import logging
    import signal
    import time

    from ray import serve

    from cxr.runtime import embedded_ray
    from evaluation.serve import APP_NAME, build_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's own lines go to Ray's log files, as other verbs' do
    info = check_serve(app, http, port=embedded_ray())
    application = build_app(app)
    url = _url(http.host, http.port)
    batching = (f"batching up to {app.max_batch_size} requests, waiting up to {app.batch_wait_ms:g} ms" if app.batching
                else "no batching (each request scored alone)")
    print(f"serve: {info['backbone']} at {info['image_size']} px from {app.checkpoint}; {app.replicas} replica(s) x "
          f"{app.cpus_per_replica:g} CPU" + (f" + {app.gpus_per_replica:g} GPU" if app.gpus_per_replica else "")
          + f"; {batching}; bodies up to {app.max_bytes:,} bytes; starting ...", flush=True)
    serve.start(http_options={"host": http.host, "port": http.port})
    started = time.monotonic()
    interrupted = False

    def _stop(signum, frame):  # SIGTERM (a supervisor, `kill`) stops as Ctrl-C does; SIGINT too where a shell ignored it
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    stats, handle = None, None
    try:
        handle = serve.run(application, name=APP_NAME, route_prefix="/")
        exposed = "" if http.host in ("127.0.0.1", "localhost", "::1") else \
            f" (listening on {http.host}: it has no authentication, put a TLS proxy with auth in front)"
        finding = "Effusion" if "Effusion" in info["findings"] else info["findings"][0]
        print("\n".join([
            f"serve: ready in {time.monotonic() - started:.1f}s at {url}{exposed}",
            f"  curl --data-binary @IMAGE.png {url}/predict",
            f"  curl --data-binary @IMAGE.png '{url}/predict?gradcam={finding}'   # + Grad-CAM overlay (base64 PNG)",
            f"  curl {url}/healthz ; curl {url}/model",
            "serve: Ctrl-C to stop"]), flush=True)
        state = "RUNNING"
        while True:
            time.sleep(2)
            now = serve.status().applications.get(APP_NAME)
            now_state = str(getattr(now, "status", "MISSING")).rsplit(".", 1)[-1]
            if now_state != state:
                print(f"serve: application {APP_NAME} is {now_state}" + (f": {now.message}" if getattr(now, "message", "") else ""), flush=True)
                state = now_state
    except KeyboardInterrupt:
        interrupted = True
        if app.replicas == 1 and handle is not None:
            try:
                stats = handle.stats.remote().result(timeout_s=10)
            except Exception:  # the summary goes on without counts
                stats = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("serve: shutting down ...", flush=True)
        _stop_serving(APP_NAME)
    lines = [f"serve: stopped after {time.monotonic() - started:.0f}s at {url}" + ("" if interrupted else " (unexpectedly)")]
    if stats:
        counts, sizes = stats["counts"], stats["batch_sizes"]
        refused = {k: v for k, v in counts.items() if k not in ("requests", "answered")}
        lines.append(f"  {counts.get('requests', 0)} request(s) to /predict: {counts.get('answered', 0)} answered, {sum(refused.values())} refused"
                     + (f" ({', '.join(f'{k} {v}' for k, v in sorted(refused.items()))})" if refused else ""))
        if sizes:
            batches = sum(sizes.values())
            images = sum(int(k) * v for k, v in sizes.items())
            lines.append(f"  {batches} forward pass(es), mean batch {number(images / batches, 2)}, largest {max(map(int, sizes))}")
    elif app.replicas > 1:
        lines.append(f"  request counts: in each replica's log ({app.replicas} replicas)")
    return "\n".join(lines)


def _first_reason(quarantine: Path) -> str:
    row = pd.read_parquet(quarantine, columns=["image_id", "reason"]).iloc[0]
    return f"{row['image_id']}: {row['reason']}"


def report_stage(run: RunDir) -> str:
    """The report, and the run's data-validation verdict in its three levels (passed, passed with
    N warnings, failed) with what any warnings are."""
    from evaluation import write_report
    from validation.report import SUMMARY_FILE, overall_line

    from trainers.tracking import attach_files, read_record

    report = write_report(run)
    attach_files(read_record(run.eval), [report])  # the report joins the evaluation's MLflow run
    lines = [f"report: {report}"]
    summary = json.loads((run.validation / SUMMARY_FILE).read_text()) if (run.validation / SUMMARY_FILE).exists() else {}
    if summary.get("suites"):
        lines.append(overall_line(summary))
    return "\n".join(lines)
