"""Atomic stage outputs and their lineage: a killed or interrupted verb never leaves a partial output
that a later verb accepts, and no verb reads outputs made from another upstream."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from cxr.cli import main
from pipelines.atomic import staged_dir, staged_file, write_json
from pipelines.lineage import SHARDS_LINEAGE, StaleOutputError, current_shards, current_splits, fingerprint, recorded_made_from
from pipelines.phantoms import make_collection
from pipelines.rundir import RunDir
from pipelines.shards import SPLITS, split_dir

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the helpers alone


def test_a_staged_folder_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").exists(), "the old output stays readable while the new one is built"
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no staging or retired folder is left behind"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_staged_folder_leaves_the_old_output(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(error), staged_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise error()
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_a_killed_run_are_cleared_by_the_next(tmp_path):
    target = tmp_path / "out"
    (tmp_path / ".out.staging-deadbeef").mkdir()
    (tmp_path / ".out.retired-deadbeef").mkdir()
    with staged_dir(target) as staging:
        (staging / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [None, KeyboardInterrupt])
def test_a_staged_file_replaces_the_target_only_when_complete(tmp_path, error):
    target = tmp_path / "table.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(target)
    try:
        with staged_file(target) as tmp:
            pd.DataFrame({"a": [1, 2]}).to_parquet(tmp)
            assert len(pd.read_parquet(target)) == 1, "the old file stays readable while the new one is written"
            if error:
                raise error()
    except KeyboardInterrupt:
        pass
    assert len(pd.read_parquet(target)) == (1 if error else 2)
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"], "no temporary file is left behind"


def test_write_json_replaces_in_one_step(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_fingerprints_follow_content_not_files():
    a = pd.DataFrame({"image_id": ["x", "y"], "patient_id": ["1", "2"]})
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.assign(patient_id=["1", "3"]))
    assert fingerprint(a) != fingerprint(a.iloc[:1])


# --------------------------------------------------------------------------- stale outputs through the CLI


def _ingest(run: Path, collection) -> int:
    return main(["ingest", "--run", str(run), "--source", "nih", "--csv", str(collection.labels_csv), "--images", str(collection.images)])


def test_re_ingesting_another_collection_makes_the_old_splits_refused(tmp_path, capsys):
    first = make_collection(tmp_path / "a", n_patients=12, image_size=48, seed=1)
    second = make_collection(tmp_path / "b", n_patients=14, image_size=48, seed=2)
    run = tmp_path / "run"
    assert _ingest(run, first) == 0
    assert main(["split", "--run", str(run), "--test-frac", "0.25", "--val-frac", "0.25", "--min-positives", "0", "--warn-only"]) == 0
    splits_made_from = recorded_made_from(RunDir(run).splits)
    assert splits_made_from == {"manifest": fingerprint(pd.read_parquet(RunDir(run).manifest))}

    assert _ingest(run, first) == 0  # the same collection again: same content, the splits stay valid
    current_splits(RunDir(run), pd.read_parquet(RunDir(run).manifest))

    assert _ingest(run, second) == 0
    capsys.readouterr()
    assert main(["eda", "--run", str(run)]) == 1
    err = capsys.readouterr().err
    assert "splits.parquet was made from another manifest" in err and "cxr split" in err
    assert not (run / "eda").exists(), "a refused verb writes nothing"
    with pytest.raises(StaleOutputError):
        current_splits(RunDir(run), pd.read_parquet(RunDir(run).manifest))


def test_a_manifest_that_does_not_match_source_json_is_refused(tmp_path, capsys):
    collection = make_collection(tmp_path / "a", n_patients=8, image_size=48, seed=1)
    run = tmp_path / "run"
    assert _ingest(run, collection) == 0
    manifest = pd.read_parquet(RunDir(run).manifest)
    manifest.iloc[:-1].to_parquet(RunDir(run).manifest, index=False)  # as if a second ingest died half-way
    capsys.readouterr()
    assert main(["split", "--run", str(run)]) == 1
    assert "does not match" in capsys.readouterr().err
    # `cxr validate` is how an edited manifest is adopted: validated as it is, then used
    assert main(["validate", "--run", str(run)]) == 0
    assert "validated as it is now" in capsys.readouterr().out
    assert main(["split", "--run", str(run), "--min-positives", "0", "--warn-only"]) == 0


def test_shards_and_stats_from_different_runs_are_refused(tmp_path):
    run = RunDir(tmp_path)
    run.shards.mkdir(parents=True)
    write_json(run.shards / SHARDS_LINEAGE, {"shards": "new", "splits": "s", "manifest": "m"})
    write_json(run.stats, {"shards": "old", "mean": 0.5, "std": 0.2})
    with pytest.raises(StaleOutputError, match="different preprocess runs"):
        current_shards(run, pd.DataFrame({"image_id": ["x"]}))


# --------------------------------------------------------------------------- fault injection


def _cxr(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from cxr.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def _shard_ids(run: RunDir) -> dict[str, set[str]]:
    return {s: set(pd.read_parquet(split_dir(run.shards, s), columns=["image_id"])["image_id"]) for s in SPLITS}


def _interrupt_a_rerun(run: RunDir, how: signal.Signals) -> subprocess.CompletedProcess | None:
    """Start `cxr preprocess` again and send ``how`` once its new shards are being built; kill
    every process it started, so no raylet outlives the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "GX_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(_cxr("preprocess", "--run", str(run.root), "--image-size", "32"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    family: set[psutil.Process] = set()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            family |= set(psutil.Process(proc.pid).children(recursive=True))
            if any(p.name.startswith(".shards.staging-") for p in run.root.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the re-run ended before it could be interrupted:\n{proc.stdout.read()}"
        proc.send_signal(how)
        proc.wait(timeout=120)
    finally:
        for p in [psutil.Process(proc.pid), *family] if proc.poll() is None else family:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(family), timeout=30)
    return proc


@pytest.mark.ray
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_preprocess_rerun_leaves_the_previous_complete_shards(tmp_path, how, capsys):
    collection = make_collection(tmp_path / "a", n_patients=16, image_size=48, seed=3)
    run = RunDir(tmp_path / "run")
    assert _ingest(run.root, collection) == 0
    assert main(["split", "--run", str(run.root), "--test-frac", "0.25", "--val-frac", "0.25", "--min-positives", "0", "--warn-only"]) == 0
    env_ok = subprocess.run(_cxr("preprocess", "--run", str(run.root), "--image-size", "32"), cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert env_ok.returncode == 0, env_ok.stdout + env_ok.stderr
    before, stats_before = _shard_ids(run), json.loads(run.stats.read_text())

    proc = _interrupt_a_rerun(run, how)
    assert proc.returncode != 0

    # Either the previous complete shards remain and are accepted, or the next verb refuses.
    if run.shards.exists() and run.stats.exists():
        assert _shard_ids(run) == before
        assert current_shards(run) == stats_before
    else:
        capsys.readouterr()
        assert main(["eda", "--run", str(run.root)]) == 1
    assert how != signal.SIGINT or not any(p.name.startswith(".shards.") for p in run.root.iterdir()), "Ctrl-C cleans up its staging folder"

    # and the next complete run clears whatever the interrupted one left behind
    again = subprocess.run(_cxr("preprocess", "--run", str(run.root), "--image-size", "32"), cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _shard_ids(run) == before
    assert not any(p.name.startswith(".shards.") for p in run.root.iterdir())
