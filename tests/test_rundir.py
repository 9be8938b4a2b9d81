"""RunDir is the run-directory contract in code: it and the README's table name the same paths, and
it alone knows which checkpoint a run's later stages use."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.rundir import INFO_FILE, RunDir, contract_paths

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_TITLE = "## The run directory (data contract)"
NAME = "NAME"  # the README's placeholder in external/NAME/


def readme_rows() -> dict[str, str]:
    """Each path of the README's run-directory table (first column, backticked) -> its whole row."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(TABLE_TITLE):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = line.split("|")
        if not line.startswith("| `") or len(cells) < 4:
            continue
        for name in re.findall(r"`([^`]+)`", cells[1]):
            rows[_contract_path(name)] = line
    return rows


def _contract_path(name: str) -> str:
    """``shards/split=*/`` -> ``shards``; ``external/NAME/`` -> ``external/NAME``."""
    parts = [p for p in name.strip().strip("/").split("/") if p]
    kept = []
    for part in parts:
        if "*" in part:
            break
        kept.append(part)
    return "/".join(kept)


def rundir_paths(root: Path) -> dict[str, str]:
    """Every path RunDir names, relative to the run: property name -> path."""
    run = RunDir(root)
    found = {at.name: getattr(run, at.name) for at in contract_paths()}
    found["external(NAME)"] = run.external(NAME)
    return {name: path.relative_to(run.root).as_posix() for name, path in found.items()}


def test_every_row_of_the_readme_table_has_a_rundir_path(tmp_path):
    named = set(rundir_paths(tmp_path).values())
    missing = sorted(set(readme_rows()) - named)
    assert not missing, f"README run-directory rows without a RunDir path: {missing}"


def test_every_rundir_path_is_in_the_readme_table(tmp_path):
    rows = readme_rows()
    missing = []
    for name, rel in rundir_paths(tmp_path).items():
        if rel in rows or any(row.startswith(rel + "/") for row in rows):  # a row itself, or the folder of one (external/)
            continue
        folder = max((row for row in rows if rel.startswith(row + "/")), key=len, default=None)
        inside = rel[len(folder) + 1:] if folder else None
        if inside is None or not re.search(rf"`{re.escape(inside)}/?`", rows[folder]):
            missing.append(f"{name} ({rel})")
    assert not missing, f"RunDir paths the README's run-directory table does not list: {missing}"


def test_the_readme_table_is_found_and_rundir_lists_its_paths(tmp_path):
    rows = readme_rows()
    assert {"manifest.parquet", "eval", "report.html", "external/NAME", "shards"} <= set(rows)
    assert {"manifest", "train_best", "eval_metrics", "explain", "report", "cv"} <= {at.name for at in contract_paths()}
    assert RunDir(tmp_path).train_best == RunDir(tmp_path).root / "train" / "best"


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / INFO_FILE).write_text("{}")
    return folder


def test_the_best_checkpoint_is_tune_before_train(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cxr train --run .* or `cxr tune --run .*--checkpoint PATH"):
        run.best_checkpoint()
    assert run.find_best_checkpoint() is None
    (run.tune_best).mkdir(parents=True)  # a folder without model.json is not a checkpoint
    _checkpoint(run.train_best)
    assert run.best_checkpoint() == run.train_best
    (run.tune_best / INFO_FILE).write_text("{}")
    assert run.best_checkpoint() == run.tune_best
    assert run.best_checkpoint(stages=["train"]) == run.train_best  # cxr run: only the stages it ran
    assert run.find_best_checkpoint(stages=[]) is None
    assert run.best_checkpoint("elsewhere/ckpt") == Path("elsewhere/ckpt")  # --checkpoint is taken as given


def test_a_missing_checkpoint_names_only_the_stages_asked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/best holds one") as err:
        RunDir(tmp_path).best_checkpoint(stages=("train",))
    assert "cxr tune" not in str(err.value)
    with pytest.raises(ValueError, match="no best checkpoint for stage 'eval'"):
        RunDir(tmp_path).best("eval")


def test_a_rundir_pickles_for_ray_workers(tmp_path):
    import pickle

    run = RunDir(tmp_path / "run")
    assert pickle.loads(pickle.dumps(run)) == run
    assert RunDir(str(tmp_path / "run")) == run  # a string is wrapped to the same contract
