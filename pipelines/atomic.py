"""Writing stage outputs so that an interrupted or killed run never leaves a partial one behind.

Every output is first written in full beside its final place and then moved there with one
``rename`` (atomic on a POSIX file system): a reader sees the previous complete output or the new
complete one, never half of either. A folder is swapped in two renames (old aside, new in); a kill
between them leaves no output at all, which every verb reports as "run the stage first" rather
than reading something incomplete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

STAGING_MARK = ".staging-"
RETIRED_MARK = ".retired-"


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write the new file to (any writer: ``to_parquet``,
    ``copyfile``, ...); when the block ends normally it replaces ``path`` by one rename, when it
    raises the temporary file is removed and ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.replace(path)
    except OSError as err:
        if err.filename is not None and Path(err.filename) == tmp:  # name the file the user asked for
            err.filename, err.filename2 = str(path), None
        raise
    finally:
        if tmp.exists():  # (unlinking a missing file on a read-only file system fails, hiding the first error)
            tmp.unlink()


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and one rename."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Path, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def _leftovers(target: Path) -> list[Path]:
    """Staging and retired siblings of ``target`` that an earlier, killed run left behind."""
    prefixes = (f".{target.name}{STAGING_MARK}", f".{target.name}{RETIRED_MARK}")
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if p.name.startswith(prefixes)]


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """An empty folder beside ``target`` to build the new output in; when the block ends normally
    it replaces ``target``, when it raises (Ctrl-C included) it is deleted and ``target`` stays as
    it was. Leftovers of a killed earlier run are cleared first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in _leftovers(target):
        shutil.rmtree(old, ignore_errors=True)
    staging = target.with_name(f".{target.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing what was there."""
    retired = target.with_name(f".{target.name}{RETIRED_MARK}{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, retired)
    os.replace(new, target)
    shutil.rmtree(retired, ignore_errors=True)
