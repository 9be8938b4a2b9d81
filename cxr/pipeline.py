"""``cxr run``: every stage in order from one Config, skipping what is already done.

A stage is *done* when its stamp ``<run>/.stages/<stage>.json`` says it finished with the same
settings on top of the same upstream runs, the files it wrote are all still there, and (where a
cheap one exists) its outputs agree with the config (``source.json`` names the configured label
file, ``split_report.json`` the split parameters, ``stats.json`` the image size, ``train/config.json``
the training settings). Anything else re-runs it and every stage downstream of it, so re-running
after an interruption finishes the job, and changing ``split.seed`` re-runs split and what follows
but not ingest. ``force`` re-runs everything. Ray Train and Tune resume from their own checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cxr.config import Config, ConfigError
from cxr.settings import RAY_STAGES
from cxr.storage import open_run
from pipelines.atomic import write_json
from pipelines.rundir import CHECKPOINT_ORDER, RunDir

TRAINING_STAGES = ("train", "tune", "cv")  # the stages that load starting weights

STAGES = ("ingest", "validate", "split", "preprocess", "eda", "train", "tune", "cv", "evaluate", "external", "explain", "card", "report")
# What each stage reads: a disabled dependency is replaced by its own dependencies.
DEPS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "validate": ("ingest",),
    "split": ("validate",),
    "preprocess": ("split",),
    "eda": ("preprocess",),
    "train": ("preprocess",),
    "tune": ("preprocess",),
    "cv": ("preprocess",),
    "evaluate": ("train", "tune"),
    "external": ("evaluate",),  # the model, and the internal figure its summary compares with
    "explain": ("train", "tune"),
    "card": ("cv", "evaluate", "external", "explain"),  # its facts; the model and the split come through them
    "report": ("eda", "cv", "evaluate", "external", "explain", "card"),
}
STAMP_DIR = ".stages"


@dataclass
class Stage:
    name: str
    params: dict[str, Any]  # the config values the stage's outputs depend on
    action: Callable[[RunDir, bool], str]  # (run, resume) -> summary
    check: Callable[[RunDir], str | None] = lambda run: None  # why existing outputs disagree with the config


@dataclass
class Step:
    stage: Stage
    reason: str | None  # why it runs; None: done earlier, skipped


# --------------------------------------------------------------------------- the stages


def _section(obj: Any) -> dict[str, Any]:
    """The settings a stage's outputs depend on: switching it on, or printing more, changes nothing made."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if k not in ("enabled", "verbose")}


def _stage_function(name: str) -> Callable[..., str]:
    """Stages that later issues add to ``cxr.stages`` are looked up when the run is built."""
    from cxr import stages

    fn = getattr(stages, f"{name}_stage", None)
    if fn is None:
        raise ConfigError(f"{name} is enabled, but this build of cxr has no {name} stage (cxr.stages.{name}_stage): set {name}.enabled: false")
    return fn


def enabled_stages(config: Config) -> set[str]:
    """Ingest and split always run; external runs when it lists sets; every other stage has
    ``enabled`` in its section."""
    return {name for name in STAGES if name in ("ingest", "split") or (bool(config.external) if name == "external" else getattr(config, name).enabled)}


def upstream(name: str, on: set[str]) -> list[str]:
    """The enabled stages ``name`` reads from, looking through disabled ones."""
    found: list[str] = []
    for dep in DEPS[name]:
        for u in [dep] if dep in on else upstream(dep, on):
            if u not in found:
                found.append(u)
    return found


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mismatch(path: Path, expected: dict[str, Any]) -> str | None:
    found = _read_json(path) or {}
    for key, want in expected.items():
        if found.get(key) != want:
            return f"{path.name} has {key}={found.get(key)!r}, the config says {want!r}"
    return None


def build_stages(config: Config) -> list[Stage]:
    """The enabled stages in order, each with its settings, action and output check. Every action
    hands a stage function its config section: the same call the stage's own verb makes."""
    from cxr import stages

    on = enabled_stages(config)
    d, s, p, cfg = config.data, config.split, config.preprocess, config.train.config
    trial_base = config.tune_base()

    def checkpoint(run: RunDir, given: str | None) -> str | None:
        """The configured one, else what this run trained (tune's best before train's), else the stage's default."""
        made = run.find_best_checkpoint([s for s in CHECKPOINT_ORDER if s in on])
        return given or (str(made) if made else None)

    def ingest_check(run: RunDir) -> str | None:
        if d.source == "phantoms":
            return _mismatch(run.source_json, {"source": "nih", "images": str((run.root / "phantoms" / "images").resolve())})
        return _mismatch(run.source_json, {"source": d.source, "label_file": str(Path(d.csv).resolve()), "images": str(Path(d.images).resolve())})

    ingest_params: dict[str, Any] = {"data": dataclasses.asdict(d)}
    if d.csv and Path(d.csv).is_file():  # a replaced label file re-runs ingest
        st = Path(d.csv).stat()
        ingest_params["label_file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def tune(run: RunDir, resume: bool) -> str:
        settings = dataclasses.replace(config.tune, resume=resume and _can_restore_search(run))
        return stages.tune_stage(run, settings, trial_base, config.tracking)

    def with_checkpoint(section: Any, given: str | None) -> Callable[[RunDir], Any]:
        return lambda run: dataclasses.replace(section, checkpoint=checkpoint(run, given))

    t = config.tune
    table = {
        "ingest": Stage("ingest", ingest_params, lambda run, r: stages.ingest_stage(run, d), ingest_check),
        "validate": Stage("validate", {"validate": _section(config.validate)}, lambda run, r: stages.validate_stage(run, config.validate)),
        "split": Stage("split", {"split": _section(s)}, lambda run, r: stages.split_stage(run, s),
                       lambda run: _mismatch(run.split_report, {"test_frac": s.test_frac, "val_frac": s.val_frac, "min_positives": s.min_positives, "seed": s.seed})),
        "preprocess": Stage("preprocess", {"preprocess": _section(p)}, lambda run, r: stages.preprocess_stage(run, p),
                            lambda run: _mismatch(run.stats, {"image_size": p.image_size})),
        "eda": Stage("eda", {"eda": _section(config.eda)}, lambda run, r: stages.eda_stage(run, config.eda)),
        "train": Stage("train", {"train": cfg.to_dict()}, lambda run, r: stages.train_stage(run, cfg, config.tracking), lambda run: _mismatch(run.train_config, cfg.to_dict())),
        "tune": Stage("tune", {"tune": _section(t), "trial_base": trial_base.to_dict(),
                               "space_file": Path(t.space).read_text() if t.space and Path(t.space).is_file() else None}, tune),
    }
    if "cv" in on:
        cv = _stage_function("cv")
        table["cv"] = Stage("cv", {"cv": _section(config.cv), "trial_base": cfg.to_dict()},
                            lambda run, r: cv(run, dataclasses.replace(config.cv, resume=r and _can_resume_cv(run)), cfg, config.tracking))
    for name in ("evaluate", "explain"):
        if name in on:
            fn, section = _stage_function(name), getattr(config, name)
            resolved = with_checkpoint(section, section.checkpoint)
            extra = (config.tracking,) if name == "evaluate" else ()
            table[name] = Stage(name, {name: _section(section)}, lambda run, r, fn=fn, resolved=resolved, extra=extra: fn(run, resolved(run), *extra))
    if "external" in on:
        given = config.evaluate.checkpoint
        sets = [(x, with_checkpoint(x, x.checkpoint or given)) for x in config.external]
        table["external"] = Stage("external", {"external": [dataclasses.asdict(x) for x in config.external], "checkpoint": given},
                                  lambda run, r: "\n".join(stages.external_stage(run, resolved(run)) for _, resolved in sets))
    if "card" in on:
        card = _stage_function("card")
        table["card"] = Stage("card", {"card": _section(config.card)}, lambda run, r: card(run, config.card))
    if "report" in on:
        report = _stage_function("report")
        table["report"] = Stage("report", {}, lambda run, r: report(run))
    return [table[name] for name in STAGES if name in on]


def _can_resume_cv(run: RunDir) -> bool:
    from cxr.cv import can_resume

    return can_resume(run)


def _can_restore_search(run: RunDir) -> bool:
    from ray import tune
    from tuning.search import SEARCH_NAME

    return tune.Tuner.can_restore(str(run.tune / "ray" / SEARCH_NAME))


# --------------------------------------------------------------------------- stamps and the plan


def _stamp_path(run: RunDir, name: str) -> Path:
    return run.root / STAMP_DIR / f"{name}.json"


def _key(params: dict[str, Any], tokens: dict[str, str]) -> str:
    text = json.dumps({"params": params, "upstream": tokens}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str) for c in _changes(old.get(k), new.get(k), f"{prefix}.{k}".lstrip("."))]
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not (folder == str(root) and x == STAMP_DIR)]
        for n in names:
            path = Path(folder, n)
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                files[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return files


def plan(config: Config, run: RunDir, force: bool = False) -> list[Step]:
    """Which stages run and why; a stage re-runs when anything it reads re-runs."""
    on = enabled_stages(config)
    tokens: dict[str, str] = {}
    steps = []
    for stage in build_stages(config):
        ups = upstream(stage.name, on)
        stamp = _read_json(_stamp_path(run, stage.name))
        reason = None
        if force:
            reason = "--force"
        elif any(u not in tokens for u in ups):
            reason = f"{next(u for u in ups if u not in tokens)} re-runs"
        elif stamp is None:
            reason = "not run yet"
        elif stamp.get("status") != "done":
            reason = "unfinished last time (interrupted or failed)"
        elif stamp.get("key") != _key(stage.params, {u: tokens[u] for u in ups}):
            changed = _changes(stamp.get("params"), stage.params)
            reason = "changed: " + "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "") if changed else "upstream outputs were re-made"
        else:
            missing = [o for o in stamp.get("outputs", []) if not (run.root / o).exists()]
            reason = f"output missing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "") if missing else stage.check(run)
        if reason is None:
            tokens[stage.name] = stamp["token"]
        steps.append(Step(stage, reason))
    return steps


def format_plan(steps: list[Step]) -> str:
    return "\n".join(f"  {s.stage.name:<10} {'run: ' + s.reason if s.reason else 'skip: done and valid'}" for s in steps)


def run_pipeline(config: Config, force: bool = False, echo: Callable[[str], None] = lambda text: print(text, flush=True)) -> str:
    """Run every enabled stage in order, skipping the ones already done (all of them re-run with
    ``force``). Stage summaries go to ``echo`` as each stage ends (a job's log shows them live);
    the return value is the closing summary."""
    from cxr.runtime import quiet_environment, ray_session

    quiet_environment()
    started = time.monotonic()
    with open_run(config.run.dir, config.run.scratch) as (run, publish):
        run.ensure()
        steps = plan(config, run, force)
        echo(f"run {config.run.dir}: plan\n{format_plan(steps)}")
        on = enabled_stages(config)
        tokens: dict[str, str] = {}
        needs_ray = any(s.reason and s.stage.name in RAY_STAGES for s in steps)
        if any(s.reason and s.stage.name in TRAINING_STAGES for s in steps):  # missing starting weights fail before Ray starts
            from trainers.weights import check_available

            for cfg in (config.train.config, config.tune_base()):
                check_available(cfg.weights, cfg.backbone, cfg.weights_dir)
        with ray_session(config.run.address, config.run.num_cpus) if needs_ray else contextlib.nullcontext():
            for i, step in enumerate(steps, 1):
                name = step.stage.name
                if step.reason is None:
                    tokens[name] = _read_json(_stamp_path(run, name))["token"]
                    continue
                tag = f"[{i}/{len(steps)}] {name}"
                echo(f"{tag}: running ({step.reason})")
                tokens[name] = _run_stage(step.stage, run, {u: tokens[u] for u in upstream(name, on)}, force, publish, echo, tag)
    ran = [s.stage.name for s in steps if s.reason]
    skipped = [s.stage.name for s in steps if not s.reason]
    lines = [f"run: {len(ran)} stage(s) run ({', '.join(ran) or 'none'}), {len(skipped)} skipped as done ({', '.join(skipped) or 'none'}) in {time.monotonic() - started:.1f}s",
             f"outputs in {config.run.dir}"]
    if run.model_card.exists():
        lines.append(f"model card: {config.run.dir.rstrip('/')}/{run.model_card.name}")
    if run.report.exists():
        lines.append(f"report: {config.run.dir.rstrip('/')}/report.html")
    lines += _tracking_line(config, run)
    return "\n".join(lines)


def _tracking_line(config: Config, run: RunDir) -> list[str]:
    """Where the run's MLflow runs went: the UI command for the embedded local store."""
    from trainers.tracking import ui_command

    if not config.tracking.enabled:
        return []
    if run.mlflow_db.exists() and not (config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return [f"MLflow runs: {ui_command(Path(config.run.dir))}  (then open http://127.0.0.1:5000)"]
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return [f"MLflow runs: experiment {config.tracking.experiment!r} at {uri}"] if uri else []


def _run_stage(stage: Stage, run: RunDir, ups: dict[str, str], force: bool, publish: Callable[[], None],
               echo: Callable[[str], None], tag: str) -> str:
    """One stage between a 'started' stamp and a 'done' one (with the files it wrote); publishes the
    run directory after it, finished or not. Returns the stage's new token."""
    path = _stamp_path(run, stage.name)
    key = _key(stage.params, ups)
    previous = _read_json(path) or {}
    resume = previous.get("status") == "started" and previous.get("key") == key and not force
    stamp = {"stage": stage.name, "status": "started", "key": key, "params": stage.params, "upstream": ups,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, stamp)
    before, t0 = _snapshot(run.root), time.monotonic()
    try:
        summary = stage.action(run, resume)
    except BaseException:
        echo(f"{tag}: failed after {time.monotonic() - t0:.1f}s")
        publish()
        raise
    # Two levels deep (train/best, validation/data_docs): files inside them come and go (GX docs,
    # Ray checkpoints) without the outputs going missing.
    outputs = sorted({"/".join(Path(f).parts[:2]) for f, sig in _snapshot(run.root).items() if before.get(f) != sig})
    token = uuid.uuid4().hex
    write_json(path, {**stamp, "status": "done", "token": token, "outputs": outputs,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - t0, 1)})
    publish()
    echo(f"{summary}\n{tag}: done in {time.monotonic() - t0:.1f}s")
    return token


def plan_pipeline(config: Config, force: bool = False) -> str:
    """What ``run_pipeline`` would do, without doing it (``cxr run --dry-run``)."""
    with open_run(config.run.dir, config.run.scratch) as (run, _):
        return f"run {config.run.dir}: plan\n{format_plan(plan(config, run, force))}"
