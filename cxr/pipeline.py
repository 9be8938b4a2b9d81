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
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from cxr.config import Config, ConfigError, is_uri
from pipelines.rundir import RunDir

STAGES = ("ingest", "validate", "split", "preprocess", "eda", "train", "tune", "evaluate", "external", "explain", "report")
# What each stage reads: a disabled dependency is replaced by its own dependencies.
DEPS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "validate": ("ingest",),
    "split": ("validate",),
    "preprocess": ("split",),
    "eda": ("preprocess",),
    "train": ("preprocess",),
    "tune": ("preprocess",),
    "evaluate": ("train", "tune"),
    "external": ("evaluate",),  # the model, and the internal figure its summary compares with
    "explain": ("train", "tune"),
    "report": ("eda", "evaluate", "external", "explain"),
}
RAY_STAGES = frozenset({"preprocess", "train", "tune", "evaluate", "external", "explain"})
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


# --------------------------------------------------------------------------- storage


def local_path(uri: str) -> Path | None:
    """The local folder a plain path or ``file://`` URI names; None for remote URIs."""
    if not is_uri(uri):
        return Path(uri)
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        raise ConfigError(f"run.dir {uri!r}: a file:// URI names a local path (file:///abs/path), not host {parsed.netloc!r}")
    return Path(unquote(parsed.path))


class Mirror:
    """A remote run directory (any URI pyarrow filesystems read) worked on through a local copy:
    pulled before the first stage, pushed after each one, both ways as a mirror (a file the source
    lacks is deleted), so a stage that rewrites its outputs leaves no stale files behind. Files are
    compared by size and modification time, so a push sends only what changed."""

    def __init__(self, uri: str, local: Path) -> None:
        import pyarrow.fs as pafs  # noqa: PLC0415

        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.local = Path(local)
        self.local_fs = pafs.LocalFileSystem()

    def pull(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        _sync(self.fs, self.root, self.local_fs, str(self.local.resolve()), keep_mtime=True)

    def push(self) -> None:
        _sync(self.local_fs, str(self.local.resolve()), self.fs, self.root, keep_mtime=False)


def _listing(fs, root: str) -> dict[str, Any]:
    import pyarrow.fs as pafs  # noqa: PLC0415

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    base = root.rstrip("/") + "/"
    return {i.path[len(base):]: i for i in infos if i.type == pafs.FileType.File}


def _sync(src_fs, src_root: str, dst_fs, dst_root: str, keep_mtime: bool) -> None:
    import pyarrow.fs as pafs  # noqa: PLC0415

    src, dst = _listing(src_fs, src_root), _listing(dst_fs, dst_root)
    for rel, info in src.items():
        old = dst.get(rel)
        if old is not None and old.size == info.size and (old.mtime_ns or 0) >= (info.mtime_ns or 0):
            continue
        target = f"{dst_root.rstrip('/')}/{rel}"
        dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(info.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
        if keep_mtime:  # a local copy carries the remote time, so the next push skips it
            os.utime(target, ns=(info.mtime_ns, info.mtime_ns))
    for rel in dst.keys() - src.keys():
        dst_fs.delete_file(f"{dst_root.rstrip('/')}/{rel}")


@contextlib.contextmanager
def open_run(uri: str, scratch: str | None = None) -> Iterator[tuple[RunDir, Callable[[], None]]]:
    """The run directory to hand the stages, and the function that publishes their outputs.

    A local path or ``file://`` URI is used in place, unless ``scratch`` is given: then the stages
    work in ``scratch`` and a :class:`Mirror` keeps ``uri`` up to date (a slow shared mount, say).
    Remote URIs always go through a mirror (default scratch: one folder per URI under the temp folder)."""
    path = local_path(uri)
    if path is not None and scratch is None:
        yield RunDir(path), lambda: None
        return
    local = Path(scratch) if scratch else Path(tempfile.gettempdir()) / "cxr-runs" / hashlib.sha1(uri.encode()).hexdigest()[:12]
    store = Mirror(str(path) if path is not None else uri, local)
    store.pull()
    yield RunDir(local), store.push


# --------------------------------------------------------------------------- the stages


def _section(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(obj).items() if k != "enabled"}


def _stage_function(name: str) -> Callable[..., str]:
    """Stages that later issues add to ``cxr.stages`` are looked up when the run is built."""
    from cxr import stages  # noqa: PLC0415

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
    """The enabled stages in order, each with its settings, action and output check."""
    from cxr import stages  # noqa: PLC0415

    on = enabled_stages(config)
    d, v, s, p, e, t = config.data, config.validate, config.split, config.preprocess, config.eda, config.tune
    cfg, trial_base = config.train.config, config.tune_base()

    def ingest(run: RunDir, resume: bool) -> str:
        if d.source != "phantoms":
            return stages.ingest_stage(run, d.source, Path(d.csv), Path(d.images), warn_only=d.warn_only, max_reject_frac=d.max_reject_frac,
                                       cohort=d.cohort, cohorts=Path(d.cohorts) if d.cohorts else None)
        from pipelines.phantoms import make_collection  # noqa: PLC0415

        run.ensure()
        made = make_collection(run.root / "phantoms", n_patients=d.patients, image_size=d.phantom_size, seed=d.seed)
        head = f"phantoms: {made.n_images} synthetic images of {made.n_patients} patients in {made.root}"
        return head + "\n" + stages.ingest_stage(run, "nih", made.labels_csv, made.images, warn_only=d.warn_only, max_reject_frac=d.max_reject_frac,
                                                 cohorts=made.cohorts_csv)

    def ingest_check(run: RunDir) -> str | None:
        if d.source == "phantoms":
            return _mismatch(run.source_json, {"source": "nih", "images": str((run.root / "phantoms" / "images").resolve())})
        return _mismatch(run.source_json, {"source": d.source, "label_file": str(Path(d.csv).resolve()), "images": str(Path(d.images).resolve())})

    ingest_params: dict[str, Any] = {"data": dataclasses.asdict(d)}
    if d.csv and Path(d.csv).is_file():  # a replaced label file re-runs ingest
        st = Path(d.csv).stat()
        ingest_params["label_file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def tune(run: RunDir, resume: bool) -> str:
        from tuning.space import default_space, load_space  # noqa: PLC0415

        space = load_space(Path(t.space)) if t.space else default_space(lr=(t.lr[0], t.lr[1]), sampling=t.sampling, loss=t.loss, freeze=t.freeze)
        return stages.tune_stage(run, trial_base, space, t.num_samples, asha=t.asha, resume=resume and _can_restore_search(run), grace_period=t.grace_period)

    def checkpoint(run: RunDir, given: str | None) -> Path | None:
        """The configured one, else what this run trained (tune's best before train's), else the stage's default."""
        made = [run.tune / "best"] * ("tune" in on) + [run.train / "best"] * ("train" in on)
        return Path(given) if given else next((c for c in made if c.exists()), None)

    table = {
        "ingest": Stage("ingest", ingest_params, ingest, ingest_check),
        "validate": Stage("validate", {"validate": _section(v)}, lambda run, r: stages.validate_stage(run, warn_only=v.warn_only, max_reject_frac=v.max_reject_frac)),
        "split": Stage(
            "split",
            {"split": _section(s)},
            lambda run, r: stages.split_stage(run, s.test_frac, s.val_frac, s.min_positives, s.seed, warn_only=s.warn_only),
            lambda run: _mismatch(run.split_report, {"test_frac": s.test_frac, "val_frac": s.val_frac, "min_positives": s.min_positives, "seed": s.seed}),
        ),
        "preprocess": Stage(
            "preprocess",
            {"preprocess": _section(p)},
            lambda run, r: stages.preprocess_stage(run, p.image_size, num_blocks=p.blocks),
            lambda run: _mismatch(run.stats, {"image_size": p.image_size}),
        ),
        "eda": Stage("eda", {"eda": _section(e)}, lambda run, r: stages.eda_stage(run, sample_size=e.sample_size, seed=e.seed)),
        "train": Stage("train", {"train": cfg.to_dict()}, lambda run, r: stages.train_stage(run, cfg), lambda run: _mismatch(run.train / "config.json", cfg.to_dict())),
        "tune": Stage("tune", {"tune": _section(t), "trial_base": trial_base.to_dict(), "space_file": Path(t.space).read_text() if t.space and Path(t.space).is_file() else None}, tune),
    }
    extra = {"evaluate": {"subgroups": config.evaluate.subgroups}, "explain": {}}
    for name in ("evaluate", "explain"):
        if name in on:
            fn, given = _stage_function(name), getattr(config, name).checkpoint
            table[name] = Stage(name, {name: _section(getattr(config, name))},
                                lambda run, r, fn=fn, given=given, kw=extra[name]: fn(run, checkpoint=checkpoint(run, given), **kw))
    if "external" in on:
        given = config.evaluate.checkpoint
        table["external"] = Stage("external", {"external": [dataclasses.asdict(x) for x in config.external], "checkpoint": given},
                                  lambda run, r: "\n".join(_external_set(run, x, checkpoint(run, given)) for x in config.external))
    if "report" in on:
        report = _stage_function("report")
        table["report"] = Stage("report", {}, lambda run, r: report(run))
    return [table[name] for name in STAGES if name in on]


def _external_set(run: RunDir, x, checkpoint: Path | None) -> str:
    """``cxr external`` for one set of the config's ``external:`` list."""
    from cxr import stages  # noqa: PLC0415

    return stages.external_stage(run, x.name, x.source, Path(x.csv), Path(x.images), cohort=x.cohort,
                                 cohorts=Path(x.cohorts) if x.cohorts else None, checkpoint=checkpoint, drop_overlap=x.drop_overlap)


def _can_restore_search(run: RunDir) -> bool:
    from ray import tune  # noqa: PLC0415
    from tuning.search import SEARCH_NAME  # noqa: PLC0415

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
    from cxr.runtime import quiet_environment, ray_session  # noqa: PLC0415

    quiet_environment()
    started = time.monotonic()
    with open_run(config.run.dir, config.run.scratch) as (run, publish):
        run.ensure()
        steps = plan(config, run, force)
        echo(f"run {config.run.dir}: plan\n{format_plan(steps)}")
        on = enabled_stages(config)
        tokens: dict[str, str] = {}
        needs_ray = any(s.reason and s.stage.name in RAY_STAGES for s in steps)
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
    if (run.root / "report.html").exists():
        lines.append(f"report: {config.run.dir.rstrip('/')}/report.html")
    return "\n".join(lines)


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
    _write_stamp(path, stamp)
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
    _write_stamp(path, {**stamp, "status": "done", "token": token, "outputs": outputs,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - t0, 1)})
    publish()
    echo(f"{summary}\n{tag}: done in {time.monotonic() - t0:.1f}s")
    return token


def plan_pipeline(config: Config, force: bool = False) -> str:
    """What ``run_pipeline`` would do, without doing it (``cxr run --dry-run``)."""
    with open_run(config.run.dir, config.run.scratch) as (run, _):
        return f"run {config.run.dir}: plan\n{format_plan(plan(config, run, force))}"


def _write_stamp(path: Path, stamp: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, default=str) + "\n")
    tmp.replace(path)
