"""The per-worker training loop (runs inside each Ray Train worker).

Each epoch: train on this worker's shard of the (resampled) training split, evaluate validation,
report the metrics with a checkpoint. A restarted worker group resumes from the last checkpoint:
model, optimizer, scheduler and epoch come from ``ray.train.get_checkpoint()``, and the per-epoch
sample, shuffle and augmentations are functions of (seed, epoch, rank), so epoch k after a resume
is the epoch k the lost run would have trained.

Validation: the split is read once and cached (trainers.data.validation_parts), cut into one part
per worker; each worker scores its part and the predictions are all-gathered, so every image is
scored exactly once and the compute is shared. (Ray's even split of a dataset among workers may
drop a few rows to make the shards equal: right for training, wrong for a metric.) The unwrapped
model is used, so ranks may run different numbers of batches.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipelines.errors import UserInputError
from trainers.augment import Augment, augment_batch
from trainers.checkpoint import MODEL_FILE, model_info, read_history, read_train_state, save_checkpoint
from trainers.config import TrainConfig
from trainers.inputs import StartedIterator, input_normalization, memory_batches, scale_input, to_unit
from trainers.losses import MultiLabelBCE
from trainers.metrics import auroc_metrics
from trainers.models import apply_freeze, build_model, load_initial_weights, set_train_mode
from trainers.regularize import add_head_dropout, mixup_batch, weight_average
from trainers.sampling import SamplingPlan


def val_dataset_name(rank: int) -> str:
    """Each worker's own part of the validation split."""
    return f"val_{rank}"


def train_dataset_name(epoch: int, per_epoch: bool) -> str:
    """The Train dataset of an epoch: one per epoch when the sample is redrawn each epoch."""
    return f"train_e{epoch}" if per_epoch else "train"


def _all_gather(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _maybe_fail(cfg: TrainConfig, epoch: int, rank: int, world: int) -> None:
    """Test-only fault injection (see TrainConfig.fail_at_epoch): a hard exit, like a lost node."""
    if cfg.fail_at_epoch == epoch + 1 and rank == world - 1 and not Path(cfg.fail_marker).exists():
        Path(cfg.fail_marker).write_text(f"worker {rank} exited during epoch {epoch + 1}\n")
        os._exit(1)


def _inputs(images: torch.Tensor, aug: Augment | None, generator: torch.Generator | None,
            norm: dict, channels_last: bool) -> torch.Tensor:
    """uint8 batch -> model input: augmented in [0, 1], then scaled as model.json will record."""
    x = to_unit(images)
    if aug is not None:
        x = augment_batch(x, aug, generator)
    x = scale_input(x, norm)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_epoch(model: nn.Module, batches: Iterable[dict], criterion: nn.Module, optimizer: torch.optim.Optimizer,
                aug: Augment | None, generator: torch.Generator, norm: dict, amp: bool,
                after_first_step: Callable[[], None] | None = None, mixup: float = 0.0,
                after_step: Callable[[], None] | None = None) -> tuple[float, int, float, float]:
    """One pass over ``batches``; returns (summed loss x images, images, seconds, seconds until the
    first batch arrived) for this worker. The last separates the input pipeline's start-up from
    its steady state. ``mixup`` > 0 mixes each batch (trainers.regularize); ``after_step`` runs
    after every optimizer step (the weight average's update)."""
    set_train_mode(model)
    loss_sum = torch.zeros((), dtype=torch.float64)
    images, start, first_batch = 0, time.perf_counter(), math.nan
    for batch in batches:
        if images == 0:
            first_batch = time.perf_counter() - start
        x = _inputs(batch["image"], aug, generator, norm, channels_last=amp)
        targets = batch["labels"]
        if mixup > 0:
            x, targets = mixup_batch(x, targets, mixup, generator)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum = loss_sum.to(loss.device) + loss.detach().double() * len(x)
        images += len(x)
        if images == len(x) and after_first_step is not None:
            after_first_step()
    total = float(loss_sum)  # one device sync per epoch, not per step
    return total, images, time.perf_counter() - start, first_batch


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict], norm: dict, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of ``batches``."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        x = _inputs(batch["image"], None, None, norm, channels_last=amp)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits.append(model(x).float().cpu())
        labels.append(batch["labels"].cpu())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, criterion: nn.Module, rank: int, norm: dict, amp: bool,
             batch_size: int) -> dict[str, float]:
    """Validation loss and AUROCs over the whole validation split, gathered from all workers."""
    batches = ray.train.get_dataset_shard(val_dataset_name(rank)).iter_torch_batches(batch_size=batch_size, prefetch_batches=2)
    parts = [p for p in _all_gather(predict(model, batches, norm, amp)) if len(p[0])]
    logits = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    val_loss = float(criterion(torch.from_numpy(logits), torch.from_numpy(labels)))
    scores = 1.0 / (1.0 + np.exp(-logits))
    return {"val_loss": val_loss, **auroc_metrics(labels, scores), "val_images": int(len(labels))}


def _criterion(config: dict, smoothing: float = 0.0) -> MultiLabelBCE:
    weights = config.get("class_weights")
    return MultiLabelBCE(*map(np.asarray, weights), smoothing=smoothing) if weights else MultiLabelBCE(smoothing=smoothing)


def initial_model(cfg: TrainConfig) -> nn.Module:
    """The untrained model, its random parts (the head; a from-scratch backbone) drawn from
    ``cfg.seed`` so the same seed starts every run, and every worker, from the same weights."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.backbone)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config`` is what ``trainers.trainer.build_trainer`` prepares: the
    TrainConfig as a dict, image size and normalisation, class weights, the sampling plan, the
    initial weights (an object ref) and, for ``ingest='memory'``, the preloaded training arrays."""
    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp = cfg.amp and device.type == "cuda"
    norm = input_normalization(cfg.weights, float(config["mean"]), float(config["std"]))  # what model.json records
    plan = SamplingPlan(**config["plan"])
    per_epoch = plan.mode != "none"

    model = initial_model(cfg)
    start_epoch, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True))
            state, history = read_train_state(directory), read_history(directory)
        start_epoch = int(state["epoch"])
        if "raw_model" in state:  # with --ema the checkpoint's model.pt is the average; training goes on from the raw weights
            model.load_state_dict(state["raw_model"])
    elif config.get("init_weights") is not None:
        load_initial_weights(model, cfg.backbone, ray.get(config["init_weights"]))
    apply_freeze(model, cfg.backbone, cfg.effective_freeze)
    if cfg.dropout > 0:
        add_head_dropout(model, cfg.backbone, cfg.dropout)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)  # DDP's wrapped module: for evaluation and checkpoints
    average = weight_average(core, cfg.ema) if cfg.ema > 0 else None
    if average is not None and state is not None and "ema" in state:
        average.load_state_dict(state["ema"])
    scored = average.module if average is not None else core  # what validation scores and the checkpoint holds

    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    criterion = _criterion(config, cfg.label_smoothing).to(device)
    cpu_criterion = _criterion(config)  # validation loss against the true labels, unsmoothed
    aug = Augment.from_config(cfg)
    memory = ray.get(config["memory"]) if config.get("memory") is not None else None
    num_nodes = len(set(_all_gather(ray.get_runtime_context().get_node_id())))

    def epoch_batches(epoch: int) -> StartedIterator | None:
        """This worker's training batches of ``epoch``, already starting to arrive."""
        if epoch >= cfg.epochs:
            return None
        if memory is not None:
            return StartedIterator(memory_batches(memory, plan, epoch, rank, world, cfg.batch_size, device))
        shard = ray.train.get_dataset_shard(train_dataset_name(epoch, per_epoch))
        return StartedIterator(shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 1_000_003 + epoch * 1_009 + rank,
        ))

    upcoming = epoch_batches(start_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + rank)
        batches = upcoming
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, images, seconds, first_batch = train_epoch(
            model, batches, criterion, optimizer, aug, generator, norm, amp,
            after_first_step=lambda: _maybe_fail(cfg, epoch, rank, world),  # called within this epoch
            mixup=cfg.mixup, after_step=(lambda: average.update_parameters(core)) if average is not None else None,
        )
        loss_all, images_all = _all_sum([loss_sum, images], device)
        timings = _all_gather((seconds, first_batch))
        slowest = max(t[0] for t in timings)
        if images_all == 0:
            raise UserInputError(f"no full training batch of {cfg.batch_size} reached the workers: lower --batch-size")
        upcoming = epoch_batches(epoch + 1)  # all workers are done with this epoch's data
        scheduler.step()
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_all / images_all,
            **evaluate(scored, cpu_criterion, rank, norm, amp, 2 * cfg.batch_size),
            "lr": lr,
            "train_images": int(images_all),
            "train_seconds": slowest,
            "train_images_per_s": images_all / slowest if slowest > 0 else math.nan,
            "train_first_batch_s": max(t[1] for t in timings),
            "world_size": world,
            "num_nodes": num_nodes,
            "start_epoch": start_epoch,
        }
        history.append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                summary = {**config["cfg"], "effective_loss": cfg.effective_loss, "effective_freeze": cfg.effective_freeze}
                info = model_info(summary, config["image_size"], float(config["mean"]), float(config["std"]), epoch + 1, metrics)
                train_state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "seed": cfg.seed}
                if average is not None:
                    train_state.update(raw_model=core.state_dict(), ema=average.state_dict())
                save_checkpoint(Path(tmp), scored, info, train_state, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
        else:
            ray.train.report(metrics)
        if _all_gather(epochs_without_improvement(history) >= (cfg.patience or math.inf))[0]:
            break  # rank 0's view decides, so every worker leaves the loop together


def epochs_without_improvement(history: list[dict]) -> int:
    """Epochs since validation mean AUROC last reached its best (0: the latest epoch is the best).
    An epoch whose AUROC is undefined (NaN) is never an improvement."""
    scores = [h.get("val_mean_auroc", math.nan) for h in history]
    defined = [i for i, v in enumerate(scores) if v == v]
    if not defined:
        return len(scores)
    best = max(defined, key=lambda i: (scores[i], -i))
    return len(scores) - 1 - best
