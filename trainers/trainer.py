"""Build the TorchTrainer over the preprocessed shards, run it, and write ``<run>/train/``.

Library code: it never starts Ray. The caller connects (``ray.init``, a cluster address, or a Tune
trial's own connection) and the trainer runs on whatever cluster that is.

Outputs in ``<run>/train/``: ``best/`` (the checkpoint of the data contract: model.pt + model.json,
the epoch with the highest validation mean AUROC), ``history.csv`` (one row per epoch: losses, mean
and per-finding AUROC, throughput), ``config.json``, and ``ray/`` (Ray Train's run: the kept
checkpoints, whose latest is what a restarted or re-run training resumes from).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.atomic import staged_file, write_json
from pipelines.rundir import RunDir
from pipelines.shards import read_stats
from trainers.checkpoint import read_history
from trainers.config import TrainConfig
from trainers.data import Selection, materialize, resampled, tensor_dataset, train_label_matrix, validation_parts
from trainers.publish import publish_best
from trainers.loop import train_dataset_name, train_loop_per_worker, val_dataset_name
from trainers.progress import printed_epochs
from trainers.tracking import Tracker, clear_record, training_params, training_tags
from trainers.losses import class_weights
from trainers.sampling import make_plan
from trainers.weights import initial_state_dict
from trainers.xrv import published, xrv_name

logger = logging.getLogger(__name__)

SCORE = "val_mean_auroc"


@dataclass
class TrainResult:
    best_checkpoint_dir: Path  # <run>/train/best: model.pt + model.json
    metrics_history: pd.DataFrame  # one row per epoch
    best_metrics: dict  # the reported metrics of the best epoch
    ray_path: str  # Ray Train's run directory (all kept checkpoints)


def _run_name(cfg: TrainConfig, stats: dict) -> str:
    """Same settings on the same shards -> same name -> Ray Train resumes that run; else a new one."""
    data = hashlib.sha1(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:6]
    return f"{cfg.backbone}-{cfg.fingerprint()}-{data}"


def build_trainer(run: RunDir, cfg: TrainConfig, storage_path: str | None = None, name: str | None = None,
                  callbacks: list | None = None, selection: Selection | None = None,
                  echo: Callable[[str], None] | None = None) -> TorchTrainer:
    """The TorchTrainer for ``cfg`` over ``<run>/shards``, not yet started. Tune's trial function
    calls this and ``.fit()`` (with ``callbacks=[TuneReportCallback()]``). ``selection``: which
    rows train and validate (default the run's train and val splits; a CV fold passes image ids).
    ``echo`` gets a line saying how pretrained weights were mapped (xrv:NAME)."""
    rows = selection or Selection()
    if not ray.is_initialized():
        raise RuntimeError("connect to Ray first (ray.init(...) or a cluster address): trainers never start Ray themselves")
    stats = read_stats(run.stats)
    image_size = int(stats["image_size"])
    if cfg.weights == "none" and cfg.effective_freeze != "none":
        logger.warning("--weights none with --freeze %s trains on top of random, frozen features", cfg.effective_freeze)

    xrv_model = xrv_name(cfg.weights)
    trained_at = published(xrv_model).get("input_resolution") if xrv_model else None
    if trained_at and trained_at != image_size:
        logger.warning("%s was trained on %dx%d images; these shards are %dx%d (it still loads; preprocess at %d to match it)",
                       cfg.weights, trained_at, trained_at, image_size, image_size, trained_at)
    init = initial_state_dict(cfg.weights, cfg.backbone, cfg.weights_dir, cfg.seed, echo)  # fails here, before any worker starts
    labels = train_label_matrix(run.shards, cfg.uncertain, rows.train)
    plan = make_plan(labels, cfg.sampling, cfg.seed, cfg.over_max_repeat, cfg.under_ratio)
    weights = class_weights(labels) if cfg.effective_loss == "weighted" else None

    train = tensor_dataset(run.shards, rows.train, image_size, cfg.uncertain)
    parts = validation_parts(run.shards, image_size, cfg.uncertain, cfg.workers, rows.val)
    datasets = {val_dataset_name(rank): part for rank, part in enumerate(parts)}
    memory = None
    if cfg.ingest == "memory":
        memory = ray.put(materialize(train))
    elif plan.mode == "none":
        datasets[train_dataset_name(0, False)] = train
    else:  # the sample is redrawn every epoch: one lazy dataset per epoch, each read when its epoch comes
        datasets.update({train_dataset_name(e, True): resampled(train, plan, e) for e in range(cfg.epochs)})

    config = {
        "cfg": cfg.to_dict(),
        "image_size": image_size,
        "mean": float(stats["mean"]),
        "std": float(stats["std"]),
        "class_weights": [w.tolist() for w in weights] if weights is not None else None,
        "plan": dataclasses.asdict(plan),
        "init_weights": ray.put(init) if init is not None else None,
        "memory": memory,
    }
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    storage = storage_path or str(run.train / "ray")
    if "://" not in storage:  # Ray Train wants an absolute local path (or a URI: s3://, gs://, ...)
        storage = str(Path(storage).expanduser().resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=name or _run_name(cfg, stats),
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Training datasets are split among workers; each validation part goes to its own worker.
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train")]),
    )


def _score(metrics: dict) -> tuple[float, float]:
    auroc = metrics.get(SCORE, math.nan)
    loss = metrics.get("val_loss", math.nan)
    return (-math.inf if auroc is None or math.isnan(auroc) else auroc, -math.inf if loss is None or math.isnan(loss) else -loss)


def write_outputs(result, run: RunDir, cfg: TrainConfig, out: Path | None = None) -> TrainResult:
    """From a finished ``ray.train.Result``: ``best/``, ``history.csv`` and ``config.json`` in
    ``out`` (default ``<run>/train``; a CV fold writes its own folder, with the same names)."""
    if result.error is not None:
        raise result.error
    if not result.best_checkpoints:
        raise RuntimeError(f"training reported no checkpoint (run at {result.path})")
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda cm: _score(cm[1]))
    folder = Path(out) if out is not None else run.train
    folder.mkdir(parents=True, exist_ok=True)
    best, history_csv, config_json = (folder / path.relative_to(run.train) for path in (run.train_best, run.train_history, run.train_config))
    with best_checkpoint.as_directory() as directory:
        # A cross-validation fold (``out``) is judged, not deployed: only the run's own model gets OOD statistics.
        best_dir = publish_best(Path(directory), best, ood_from=run if out is None else None)
    with result.checkpoint.as_directory() as directory:  # the latest carries every epoch's row
        history = pd.DataFrame(read_history(directory))
    with staged_file(history_csv) as tmp:
        history.to_csv(tmp, index=False)
    write_json(config_json, {**cfg.to_dict(), "effective_loss": cfg.effective_loss, "effective_freeze": cfg.effective_freeze, "ray_path": result.path})
    return TrainResult(best_dir, history, dict(best_metrics), result.path)


def fit(run: RunDir, cfg: TrainConfig, storage_path: str | None = None, name: str | None = None,
        echo: Callable[[str], None] | None = None, tracker: Tracker | None = None) -> TrainResult:
    """Train per ``cfg`` on ``<run>/shards`` on the connected Ray cluster; write ``<run>/train/``.
    ``echo`` gets one line per epoch as it ends (trainers/progress.py); ``tracker`` logs the run to
    MLflow: settings and data fingerprint, each epoch's metrics as it ends, the best checkpoint."""
    tracker = tracker or Tracker.off()
    clear_record(run.train)
    run_id = tracker.start_run(f"train {cfg.backbone}", training_tags(run, "train"))
    tracker.log_params(run_id, training_params(run, cfg))
    log_epoch = (lambda metrics: tracker.log_metrics(run_id, metrics, step=int(metrics.get("epoch", 0)))) if run_id else None
    try:
        if echo is None and log_epoch is None:
            result = build_trainer(run, cfg, storage_path, name).fit()
        else:
            with printed_epochs(cfg.epochs, echo or (lambda line: None), log_epoch) as lines:
                result = build_trainer(run, cfg, storage_path, name, callbacks=[lines], echo=echo).fit()
        outputs = write_outputs(result, run, cfg)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.log_checkpoint(run_id, outputs.best_checkpoint_dir)
    tracker.log_files(run_id, [run.train_history, run.train_config])
    tracker.set_tags(run_id, {"cxr.best_epoch": int(outputs.best_metrics.get("epoch", 0)),
                              "cxr.best_val_mean_auroc": outputs.best_metrics.get(SCORE)})
    registered = tracker.register(run_id)
    tracker.end_run(run_id)
    tracker.record(run.train, run_id, **({"registered": registered} if registered else {}))
    return outputs
