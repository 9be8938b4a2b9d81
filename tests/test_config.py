"""The typed run config and the run it drives (``cxr run``): loading and its errors, which stages
re-run and why (stage functions replaced by fast fakes), the ``file://`` and mirrored run
directories, a real ingest + split, and ``cxr run`` of the demo config against ``cxr demo``."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr import pipeline, stages, storage
from cxr.config import ConfigError, load_config
from cxr.demo import demo_config
from cxr.settings import DemoSettings
from cxr.pipeline import plan, run_pipeline
from cxr.storage import Mirror, open_run
from pipelines.rundir import RunDir
from trainers.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# --------------------------------------------------------------------------- loading


def test_defaults_match_the_single_stage_verbs(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", {"run": {"dir": "run"}, "data": {"source": "phantoms"}}))
    assert (config.split.test_frac, config.split.val_frac, config.split.min_positives, config.split.seed) == (0.15, 0.15, 10, 0)
    assert config.preprocess.image_size == 224 and config.preprocess.blocks is None
    assert config.eda.sample_size == 64
    assert config.train.enabled and config.train.config == TrainConfig()
    assert not config.tune.enabled and config.tune.lr == [1e-4, 3e-3]
    assert config.validate.enabled and config.evaluate.enabled and config.explain.enabled and config.report.enabled
    assert config.run.address is None and config.data.patients == 120


@pytest.mark.parametrize(("raw", "message"), [
    ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?); valid keys at the top level: run, data"),
    ({"split": {"sed": 1}}, "unknown key 'split.sed' (did you mean 'seed'?); valid keys under 'split': test_frac, val_frac, min_positives, seed, warn_only"),
    ({"train": {"backbon": "resnet18"}}, "unknown key 'train.backbon' (did you mean 'backbone'?); valid keys under 'train': enabled, backbone"),
    ({"tune": {"base": {"wrkers": 1}}}, "unknown key 'tune.base.wrkers' (did you mean 'workers'?)"),
    ({"run": {"dir": "r", "adress": "auto"}}, "unknown key 'run.adress' (did you mean 'address'?)"),
])
def test_an_unknown_key_at_any_level_is_named_with_its_dotted_path(tmp_path, raw, message):
    base = {"run": {"dir": "r"}, "data": {"source": "phantoms"}}
    for section, values in raw.items():
        base[section] = {**base.get(section, {}), **values}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "c.yaml", base))
    assert message in str(err.value) and str(tmp_path / "c.yaml") in str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("split.seed=one", "split.seed must be an integer, got str 'one'"),
    ("split.seed=true", "split.seed must be an integer, got bool True"),
    ("eda.enabled=1", "eda.enabled must be a bool, got int 1"),
    ("train.lr=fast", "train.lr must be a number, got str 'fast'"),
    ("train.backbone=vgg", "unknown backbone 'vgg'"),
    ("tune.sampling=none", "tune.sampling must be a list, got str 'none'"),
    ("tune.loss=[bce, focal]", "tune.loss must list values among auto, bce, weighted"),
    ("tune.base.workers=0", "workers must be an integer >= 1"),
    ("preprocess=224", "preprocess must be a mapping, got int 224"),
    ("split.test_frac=0.9", "split.test_frac + split.val_frac must leave images for training"),
    ("data.csv=labels.csv", "data.csv is not used with data.source phantoms"),
    ("data.source=nih", "data.csv is required with data.source nih"),
    ("data.source=kaggle", "data.source must be one of nih, chexpert, manifest, phantoms"),
])
def test_wrong_values_say_which_key_and_what_was_given(tmp_path, override, message):
    path = write(tmp_path / "c.yaml", {"run": {"dir": "r"}, "data": {"source": "phantoms"}})
    with pytest.raises(ConfigError, match=None) as err:
        load_config(path, [override])
    assert message in str(err.value)


def test_required_sections_and_numbers_written_the_yaml_way(tmp_path):
    with pytest.raises(ConfigError, match="run.dir is required"):
        load_config(write(tmp_path / "a.yaml", {"run": {}, "data": {"source": "phantoms"}}))
    with pytest.raises(ConfigError, match="data is required"):
        load_config(write(tmp_path / "b.yaml", {"run": {"dir": "r"}}))
    # YAML 1.1 reads 1e-4 (no dot) as a string; a number field takes it as the number it means.
    config = load_config(write(tmp_path / "c.yaml", {"run": {"dir": "r"}, "data": {"source": "phantoms"}, "train": {"lr": "1e-4"}, "tune": {"lr": ["1e-5", 1]}}))
    assert config.train.config.lr == 1e-4 and config.tune.lr == [1e-5, 1.0]
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(tmp_path / "c.yaml", ["train.epochs"])
    (tmp_path / "d.yaml").write_text("run: {dir: r}\ndata: {source: phantoms}\ntrain:\n")  # an empty section
    assert load_config(tmp_path / "d.yaml", ["train.epochs=3"]).train.config.epochs == 3


def test_relative_paths_resolve_against_the_config_folder_not_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "configs" / "c.yaml", {
        "run": {"dir": "../runs/x"},
        "data": {"source": "nih", "csv": "../data/labels.csv", "images": "/abs/images"},
        "tune": {"space": "space.yaml"},
    })
    config = load_config(path)
    assert config.run.dir == str(tmp_path / "runs" / "x")
    assert config.data.csv == str(tmp_path / "data" / "labels.csv") and config.data.images == "/abs/images"
    assert config.tune.space == str(tmp_path / "configs" / "space.yaml")
    for uri in ("file:///srv/runs/x", "s3://bucket/runs/x", "gs://bucket/x"):
        assert load_config(path, [f"run.dir={uri}"]).run.dir == uri


def test_the_shipped_configs_load_and_demo_yaml_is_what_cxr_demo_runs():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo == demo_config(str(REPO / "runs" / "demo"))
    nih = load_config(REPO / "configs" / "nih.yaml")
    # resolved on both sides: ../shared may be a symbolic link (the config loader resolves paths)
    assert nih.data.source == "nih" and Path(nih.data.csv).resolve() == (REPO.parent / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz").resolve()
    assert nih.run.dir == str(REPO / "runs" / "nih")
    for path in (REPO / "configs").glob("*.yaml"):
        load_config(path)


# --------------------------------------------------------------------------- which stages run (fast fakes)


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


class FakeStages:
    """Every stage function replaced by one that writes the files the real one writes (the ones the
    run's checks read), and records its call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail_tune_once = False

    def _log(self, name: str, **kw) -> str:
        self.calls.append((name, kw))
        return f"{name}: done"

    def ingest_stage(self, run, data):
        run.ensure()
        pd.DataFrame({"image_id": ["a"]}).to_parquet(run.manifest)
        run.source_json.write_text(json.dumps({"source": data.source, "label_file": str(Path(data.csv).resolve()), "images": str(Path(data.images).resolve())}))
        return self._log("ingest", source=data.source)

    def validate_stage(self, run, settings):
        (run.validation).mkdir(exist_ok=True)
        (run.validation / "summary.json").write_text("{}")
        return self._log("validate")

    def split_stage(self, run, s):
        pd.DataFrame({"image_id": ["a"], "split": ["train"]}).to_parquet(run.splits)
        run.split_report.write_text(json.dumps({"test_frac": s.test_frac, "val_frac": s.val_frac, "min_positives": s.min_positives, "seed": s.seed}))
        return self._log("split", seed=s.seed)

    def preprocess_stage(self, run, settings):
        (run.shards / "split=train").mkdir(parents=True, exist_ok=True)
        (run.shards / "split=train" / "part-0.parquet").write_bytes(b"x")
        run.stats.write_text(json.dumps({"image_size": settings.image_size}))
        return self._log("preprocess", image_size=settings.image_size)

    def eda_stage(self, run, settings):
        run.eda.mkdir(exist_ok=True)
        (run.eda / "summary.md").write_text(str(settings.sample_size))
        return self._log("eda")

    def train_stage(self, run, cfg, tracking):
        assert tracking.enabled and tracking.experiment == "cxr"  # the config's tracking section reaches the training stages
        (run.train / "best").mkdir(parents=True, exist_ok=True)
        (run.train / "best" / "model.json").write_text("{}")
        (run.train / "config.json").write_text(json.dumps({**cfg.to_dict(), "ray_path": "x"}))
        return self._log("train", lr=cfg.lr)

    def tune_stage(self, run, settings, base, tracking):
        if self.fail_tune_once:
            self.fail_tune_once = False
            (run.tune).mkdir(exist_ok=True)
            raise KeyboardInterrupt
        (run.tune / "best").mkdir(parents=True, exist_ok=True)
        (run.tune / "best" / "model.json").write_text("{}")
        (run.tune / "results.csv").write_text("trial\n")
        return self._log("tune", resume=settings.resume, workers=base.workers)

    def cv_stage(self, run, settings, base, tracking):
        run.cv.mkdir(exist_ok=True)
        (run.cv / "metrics.json").write_text("{}")
        return self._log("cv", folds=settings.folds, resume=settings.resume)

    def evaluate_stage(self, run, settings, tracking):
        run.eval.mkdir(exist_ok=True)
        (run.eval / "metrics.json").write_text("{}")
        return self._log("evaluate", checkpoint=_path(settings.checkpoint))

    def external_stage(self, run, x):
        (run.external(x.name) / "eval").mkdir(parents=True, exist_ok=True)
        (run.external(x.name) / "eval" / "metrics.json").write_text("{}")
        return self._log("external", set=x.name, checkpoint=_path(x.checkpoint), drop_overlap=x.drop_overlap)

    def explain_stage(self, run, settings):
        (run.root / "explain").mkdir(exist_ok=True)
        (run.root / "explain" / "gallery.png").write_bytes(b"x")
        return self._log("explain", checkpoint=_path(settings.checkpoint))

    def card_stage(self, run, settings):
        run.model_card.write_text(f"min positives {settings.min_positives}")
        run.model_card_json.write_text("{}")
        return self._log("card", min_positives=settings.min_positives)

    def report_stage(self, run):
        (run.root / "report.html").write_text("<html>")
        return self._log("report")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Fake stages (no GX, no Ray) and a config with every stage on, tune included."""
    fakes = FakeStages()
    for name in pipeline.STAGES:
        monkeypatch.setattr(stages, f"{name}_stage", getattr(fakes, f"{name}_stage"), raising=False)
    monkeypatch.setattr("cxr.runtime.ray_session", lambda *a, **k: contextlib.nullcontext())
    (tmp_path / "labels.csv").write_text("image_id,path,patient_id\n")
    write(tmp_path / "c.yaml", {
        "run": {"dir": "run"},
        "data": {"source": "manifest", "csv": "labels.csv", "images": "."},
        "train": {"backbone": "resnet18", "weights": "none"},
        "tune": {"enabled": True, "base": {"workers": 1}},
        "cv": {"enabled": True, "folds": 3},
        "external": [{"name": "site-b", "source": "manifest", "csv": "labels.csv", "images": "."}],
    })
    return fakes


def ran(fakes: FakeStages, config, **kw) -> list[str]:
    fakes.calls.clear()
    run_pipeline(config, echo=lambda text: None, **kw)
    return [name for name, _ in fakes.calls]


def test_a_second_run_skips_everything_and_force_reruns_everything(fake, tmp_path):
    config = load_config(tmp_path / "c.yaml")
    assert ran(fake, config) == list(pipeline.STAGES)
    assert ran(fake, config) == []
    assert all(not step.reason for step in plan(config, RunDir(config.run.dir)))
    assert ran(fake, config, force=True) == list(pipeline.STAGES)
    stamp = json.loads((Path(config.run.dir) / ".stages" / "split.json").read_text())
    assert stamp["status"] == "done" and stamp["params"]["split"]["seed"] == 0 and "splits.parquet" in stamp["outputs"]


@pytest.mark.parametrize(("override", "expected"), [
    ("split.seed=1", ["split", "preprocess", "eda", "train", "tune", "cv", "evaluate", "external", "explain", "card", "report"]),
    ("preprocess.image_size=128", ["preprocess", "eda", "train", "tune", "cv", "evaluate", "external", "explain", "card", "report"]),
    ("train.lr=0.001", ["train", "tune", "cv", "evaluate", "external", "explain", "card", "report"]),  # trials and folds start from train's settings
    ("tune.num_samples=2", ["tune", "evaluate", "external", "explain", "card", "report"]),
    ("cv.folds=4", ["cv", "card", "report"]),
    ("external=[{name: site-b, source: manifest, csv: labels.csv, images: ., drop_overlap: true}]", ["external", "card", "report"]),
    ("eda.sample_size=8", ["eda", "report"]),
    ("card.min_positives=5", ["card", "report"]),
    ("report.enabled=false", []),
])
def test_a_changed_setting_reruns_its_stage_and_everything_after_it(fake, tmp_path, override, expected):
    ran(fake, load_config(tmp_path / "c.yaml"))
    changed = load_config(tmp_path / "c.yaml", [override])
    steps = plan(changed, RunDir(changed.run.dir))
    assert [s.stage.name for s in steps if s.reason] == expected
    if expected:
        assert override.split("=")[0] in steps[[s.stage.name for s in steps].index(expected[0])].reason
    assert ran(fake, changed) == expected


def test_missing_or_disagreeing_outputs_rerun_the_stage(fake, tmp_path):
    config = load_config(tmp_path / "c.yaml")
    ran(fake, config)
    run = RunDir(config.run.dir)
    run.stats.unlink()
    assert plan(config, run)[3].reason == "output missing: stats.json"
    ran(fake, config)
    report = json.loads(run.split_report.read_text())  # as if `cxr split --seed 7` ran by hand since
    run.split_report.write_text(json.dumps({**report, "seed": 7}))
    split = plan(config, run)[2]
    assert split.stage.name == "split" and "split_report.json has seed=7, the config says 0" in split.reason
    assert ran(fake, config)[0] == "split"


def test_an_interrupted_run_resumes_where_it_stopped(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_can_restore_search", lambda run: True)  # as Tune says after a real interruption
    config = load_config(tmp_path / "c.yaml")
    fake.fail_tune_once = True
    with pytest.raises(KeyboardInterrupt):
        ran(fake, config)
    assert [n for n, _ in fake.calls] == ["ingest", "validate", "split", "preprocess", "eda", "train"]
    stamp = json.loads((Path(config.run.dir) / ".stages" / "tune.json").read_text())
    assert stamp["status"] == "started"
    assert ran(fake, config) == ["tune", "cv", "evaluate", "external", "explain", "card", "report"]
    assert fake.calls[0][1] == {"resume": True, "workers": 1}  # Tune restores its own search; trials use tune.base


def test_evaluate_takes_the_checkpoint_this_run_made(fake, tmp_path):
    config = load_config(tmp_path / "c.yaml")
    ran(fake, config)
    root = Path(config.run.dir)
    assert dict(fake.calls)["evaluate"]["checkpoint"] == root / "tune" / "best"
    assert dict(fake.calls)["external"] == {"set": "site-b", "checkpoint": root / "tune" / "best", "drop_overlap": False}
    config = load_config(tmp_path / "c.yaml", ["tune.enabled=false", "explain.checkpoint=/models/mine"])
    ran(fake, config, force=True)
    assert dict(fake.calls)["evaluate"]["checkpoint"] == root / "train" / "best"
    assert dict(fake.calls)["explain"]["checkpoint"] == Path("/models/mine")


def test_a_stage_missing_from_this_build_is_an_error_before_anything_runs(fake, tmp_path, monkeypatch):
    monkeypatch.delattr(stages, "explain_stage")
    with pytest.raises(ConfigError, match="explain is enabled, but this build of cxr has no explain stage"):
        ran(fake, load_config(tmp_path / "c.yaml"))
    assert fake.calls == []
    assert "explain" not in ran(fake, load_config(tmp_path / "c.yaml", ["explain.enabled=false"]))


def test_a_mirrored_run_dir_is_published_after_each_stage_and_pulled_on_the_next_run(fake, tmp_path):
    """run.dir as a file:// URI with a scratch folder takes the same pyarrow path as s3:// or gs://."""
    remote = tmp_path / "remote"
    config = load_config(tmp_path / "c.yaml", [f"run.dir=file://{remote}", f"run.scratch={tmp_path / 'scratch'}"])
    assert ran(fake, config) == list(pipeline.STAGES)
    assert (remote / "report.html").exists() and (remote / ".stages" / "report.json").exists()
    elsewhere = load_config(tmp_path / "c.yaml", [f"run.dir=file://{remote}", f"run.scratch={tmp_path / 'scratch2'}"])
    assert ran(fake, elsewhere) == []  # a fresh scratch (another machine) pulls the stamps and skips


def test_mirror_push_and_pull_copy_changes_and_delete_what_the_source_lacks(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "local"
    mirror = Mirror(f"file://{remote}", local)
    mirror.pull()
    (local / "shards").mkdir()
    (local / "shards" / "a.parquet").write_text("a")
    (local / "stats.json").write_text("{}")
    mirror.push()
    assert (remote / "shards" / "a.parquet").read_text() == "a"
    (local / "shards" / "a.parquet").unlink()  # a stage rewrote its outputs under new names
    (local / "shards" / "b.parquet").write_text("b")
    mirror.push()
    assert sorted(p.name for p in (remote / "shards").iterdir()) == ["b.parquet"]
    other = Mirror(f"file://{remote}", tmp_path / "other")
    other.pull()
    assert (tmp_path / "other" / "shards" / "b.parquet").read_text() == "b" and (tmp_path / "other" / "stats.json").exists()
    stamp = (tmp_path / "other" / "stats.json").stat().st_mtime_ns
    other.pull()  # unchanged files are not copied again
    assert (tmp_path / "other" / "stats.json").stat().st_mtime_ns == stamp


def test_run_dir_forms(tmp_path):
    assert storage.local_path("runs/x") == Path("runs/x")
    assert storage.local_path(f"file://{tmp_path}/r") == tmp_path / "r"
    assert storage.local_path("s3://bucket/runs/x") is None
    with pytest.raises(ConfigError, match="names a local path"):
        storage.local_path("file://otherhost/r")
    with open_run(f"file://{tmp_path}/r") as (run, publish):
        assert run.root == tmp_path / "r"


# --------------------------------------------------------------------------- real stages


def test_real_ingest_and_split_on_a_file_uri_run_dir_skip_and_rerun(tmp_path):
    """The cheap real stages (phantoms, ingest with its GX suite, split) through a file:// run dir."""
    run_dir = tmp_path / "run"
    path = write(tmp_path / "c.yaml", {
        "run": {"dir": f"file://{run_dir}"},
        "data": {"source": "phantoms", "patients": 12, "phantom_size": 64, "seed": 0},
        "validate": {"enabled": False},
        "split": {"test_frac": 0.2, "val_frac": 0.2, "min_positives": 1, "seed": 0},
        **{name: {"enabled": False} for name in ("preprocess", "eda", "train", "evaluate", "explain", "card", "report")},
    })
    log: list[str] = []
    summary = run_pipeline(load_config(path), echo=log.append)
    assert "2 stage(s) run (ingest, split)" in summary
    assert (run_dir / "manifest.parquet").exists() and (run_dir / "splits.parquet").exists()
    assert any(text.startswith("phantoms: ") for text in log)
    first = pd.read_parquet(run_dir / "splits.parquet")
    assert "0 stage(s) run (none), 2 skipped" in run_pipeline(load_config(path), echo=log.append)
    assert "1 stage(s) run (split)" in run_pipeline(load_config(path, ["split.seed=5"]), echo=log.append)
    assert json.loads((run_dir / "split_report.json").read_text())["seed"] == 5
    assert "2 stage(s) run (ingest, split)" in run_pipeline(load_config(path), force=True, echo=log.append)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "splits.parquet"), first)  # same seed, same split


def test_cxr_demo_is_cxr_run_of_the_demo_config(tmp_path, monkeypatch):
    """`cxr demo` runs exactly demo_config() through run_pipeline, so its outputs are `cxr run`'s."""
    import cxr.pipeline
    from cxr.demo import run_demo

    seen = []
    monkeypatch.setattr(cxr.pipeline, "run_pipeline", lambda config, force=False: seen.append((config, force)) or "ok")
    demo = DemoSettings(patients=60, image_size=32, seed=3, tune=False)
    run_demo(RunDir(tmp_path / "demo"), demo)
    assert seen == [(demo_config(str(RunDir(tmp_path / "demo").root), demo), True)]


def test_cxr_demo_ends_with_the_command_that_serves_its_model(tmp_path, monkeypatch):
    import cxr.pipeline
    from cxr.demo import run_demo

    run = RunDir(tmp_path / "demo")
    monkeypatch.setattr(cxr.pipeline, "run_pipeline", lambda config, force=False: "pipeline summary")
    assert run_demo(run, DemoSettings(tune=False)) == "pipeline summary"  # no model: no command
    (run.root / "phantoms" / "images").mkdir(parents=True)
    (run.root / "phantoms" / "images" / "00000001_000.png").write_bytes(b"")
    for stage in ("train", "tune"):  # the search's winner when there is one, as every later stage takes
        run.best(stage).mkdir(parents=True)
        (run.best(stage) / "model.json").write_text("{}")
        lines = run_demo(run, DemoSettings(tune=False)).splitlines()
        assert lines[1] == f"serve the model: cxr serve {run.best(stage)}"
        assert lines[2].endswith(f"curl --data-binary @{run.root / 'phantoms' / 'images' / '00000001_000.png'} http://127.0.0.1:8000/predict")
