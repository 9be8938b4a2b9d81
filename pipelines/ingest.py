"""Ingest: a source's label file + an image root -> manifest rows and quarantined rows.

Every input row ends in exactly one of the two tables (rows in = manifest + quarantine).
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from pipelines.errors import UserInputError
from pipelines.ids import IdNormalizer
from pipelines.manifest import conform_manifest, empty_quarantine, quarantine_records
from pipelines.reject_guard import Rejection
from pipelines.sources import ADAPTERS, Reject
from pipelines.sources.chexpert import strip_dataset_folder

STAGE = "ingest"
MISSING_FILE = "missing file"
DUPLICATE_FILE = "duplicate file"
SHOWN = 5  # rows named in a duplicate-file reason


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    rows_in: int
    source_rows: list[int]  # the label file's 1-based data row of each manifest row
    files: list[str]  # every file under the image root, relative (for the "every image has a row" check)
    notes: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)  # one per quarantine row, in its order
    absent: set[int] = field(default_factory=set)  # rows (of any reason) whose listed image is not on disk
    normalized: IdNormalizer = field(default_factory=IdNormalizer)

    def reason_counts(self) -> dict[str, int]:
        """Quarantine reasons with their counts, similar reasons (unknown label 'X', row 17: age ...) grouped."""
        counts: dict[str, int] = {}
        for r in self.rejects:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def rejections(self) -> list[Rejection]:
        """The quarantined rows as the mass-rejection guard reads them (pipelines/reject_guard.py)."""
        return [
            Rejection(r.kind, r.column, f"row {r.row}", r.value, exempt=r.kind == MISSING_FILE or r.row in self.absent)
            for r in self.rejects
        ]

    def normalized_line(self) -> str:
        """How many ids ingest re-spelled (pipelines/ids.py), for the summary."""
        n = self.normalized
        if not n.counts:
            return "  ids normalized: none"
        parts = [f"{count} {column} (e.g. {n.examples[column][0]!r} -> {n.examples[column][1]!r})" for column, count in n.counts.items()]
        return "  ids normalized: " + ", ".join(parts) + "; integral floats written as integers, surrounding spaces removed"


def path_problem(relative: str | None) -> str | None:
    """Why a manifest path is unusable as a path under the image root, or None if it is fine."""
    if relative is None or pd.isna(relative) or str(relative).strip() == "":
        return "no image path"
    text = str(relative).replace("\\", "/")
    p = PurePosixPath(text)
    if p.is_absolute() or (len(text) > 1 and text[1] == ":"):
        return f"path escapes image root (absolute path {text!r})"
    if ".." in p.parts:
        return f"path escapes image root ('..' in {text!r})"
    return None


def _relative(path: str) -> str:
    """A listed path in the form ``_files_under`` lists files: POSIX, ``./`` and ``//`` collapsed."""
    return str(PurePosixPath(str(path).strip().replace("\\", "/")))


def _files_under(root: Path) -> set[str]:
    """Every file below ``root`` as a POSIX relative path: one directory walk instead of one stat
    per label row (112k rows, 1.3k files for the NIH subset).

    Linked folders are followed, but no real folder is visited twice, identified by (device,
    inode): a link to ``.`` or to an ancestor would otherwise make the walk endless. The real tree
    is walked first and linked folders after it, shallowest first, so a folder reachable both
    directly and through a link is listed under its own path (a row naming the link path is still
    found: see ``_on_disk``). A linked folder that resolves outside the root is not walked: its
    files are rejected as escaping the root whatever the listing says, and a link to ``/`` would
    make ingest walk the whole disk."""
    found: set[str] = set()
    root_real = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    links: list[tuple[str, str]] = []  # (relative prefix, path) of linked folders still to visit

    def walk(top: str, base: str) -> None:
        for directory, dirs, names in os.walk(top):  # does not descend into links: they queue below
            try:
                st = os.stat(directory)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            rel = os.path.relpath(directory, top)
            prefix = base + ("" if rel == "." else rel.replace(os.sep, "/") + "/")
            links.extend((prefix + d + "/", os.path.join(directory, d)) for d in dirs if os.path.islink(os.path.join(directory, d)))
            found.update(prefix + n for n in names)

    walk(str(root), "")
    while links:
        prefix, path = links.pop(0)
        try:
            st = os.stat(path)
        except OSError:
            continue  # a broken link
        if (st.st_dev, st.st_ino) not in seen and os.path.realpath(path).startswith(root_real + os.sep):
            walk(path, prefix)
    return found


def _on_disk(relative: str, listed: set[str], root: Path) -> bool:
    """Whether the file a row names exists: listed by the walk, or (a path through a linked folder
    the walk listed under its real name) a file when asked directly."""
    return relative in listed or os.path.isfile(os.path.join(root, relative))


def _real_path(root_real: str, relative: str, parents: dict[str, str]) -> str:
    """``os.path.realpath`` of ``root_real/relative`` for a listed file (no ``.``/``..`` parts),
    resolving each folder once: realpath stats every component of every row's path, the slowest
    step of ingest at NIH scale. Only a file that is itself a link is resolved in full."""
    head, _, name = relative.rpartition("/")
    parent = parents.get(head)
    if parent is None:
        parent = parents[head] = os.path.realpath(os.path.join(root_real, head))
    path = os.path.join(parent, name)
    return os.path.realpath(path) if os.path.islink(path) else path


def ingest(source: str, label_file: Path, images_root: Path) -> IngestResult:
    """Parse ``label_file`` with the ``source`` adapter and check every path against ``images_root``."""
    if source not in ADAPTERS:
        raise UserInputError(f"unknown source {source!r}: choose one of {', '.join(ADAPTERS)}")
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise FileNotFoundError(f"image root is not a directory: {images_root}")
    parsed = ADAPTERS[source](Path(label_file))
    rows = parsed.rows
    if source == "chexpert":
        rows["path"] = strip_dataset_folder(rows["path"].astype("string"), images_root)
    rejects: list[Reject] = list(parsed.rejects)
    on_disk = _files_under(images_root)
    root_real = os.path.realpath(images_root)
    absent = {r.row for r in rejects if r.path is not None and _absent(r.path, on_disk, images_root)}
    passed: list[tuple[dict, str, str]] = []  # rows whose path is fine, with the real file they name and the path as listed
    parents: dict[str, str] = {}  # folder -> its real path
    for rec in rows.to_dict("records"):
        problem = path_problem(rec["path"])
        if problem is None and not rec["image_id"]:
            problem = "no image_id"
        real = None
        if problem is None:
            relative = _relative(rec["path"])
            if not _on_disk(relative, on_disk, images_root):
                problem = MISSING_FILE
            else:
                real = _real_path(root_real, relative, parents)
                if not real.startswith(root_real + os.sep):
                    problem = f"path escapes image root (a link resolves outside it: {relative!r})"
        if problem:
            kind = problem.split(" (")[0].split(":")[0]  # "path escapes image root (absolute path ...)" -> "path escapes image root"
            rejects.append(Reject(int(rec["row"]), problem, rec["record"], rec["image_id"], kind=kind, column="path", value=rec["path"]))
        else:
            passed.append(({**rec, "path": relative}, real, str(rec["path"])))  # the manifest keeps the path as the walk spells it (x.png, not ./x.png)
    keep = _unique_files(passed, root_real, rejects)
    manifest = conform_manifest(pd.DataFrame(keep, columns=rows.columns).drop(columns=["row", "record"]))
    rejects.sort(key=lambda r: r.row)
    quarantine = (
        quarantine_records(
            STAGE,
            [r.reason for r in rejects],
            [r.image_id for r in rejects],
            [r.row for r in rejects],
            [r.record for r in rejects],
        )
        if rejects
        else empty_quarantine()
    )
    result = IngestResult(
        manifest, quarantine, parsed.rows_in, [int(r["row"]) for r in keep], sorted(on_disk), parsed.notes, rejects, absent, parsed.normalized
    )
    assert len(manifest) + len(quarantine) == parsed.rows_in, "ingest lost or duplicated rows"
    return result


def _absent(path: str, on_disk: set[str], root: Path) -> bool:
    """Whether an adapter-rejected row's image is absent on disk (CheXpert paths may start with the
    image root's own folder name)."""
    if path_problem(path) is not None:
        return False
    relative = _relative(path)
    first, _, rest = relative.partition("/")
    return not _on_disk(relative, on_disk, root) and not (first == root.name and _on_disk(rest, on_disk, root))


def _unique_files(passed: list[tuple[dict, str, str]], root_real: str, rejects: list[Reject]) -> list[dict]:
    """Rows whose paths resolve to the same file (``x.png`` and ``./x.png``, two ids listing one
    path, a link beside its target) are duplicates: every copy is quarantined, with a reason naming
    the rows that share the file, as duplicate ids are. The rest are returned in order."""
    by_file: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for rec, real, listed in passed:
        by_file[real].append((rec, listed))
    keep = []
    for rec, real, listed in passed:
        sharing = by_file[real]
        if len(sharing) == 1:
            keep.append(rec)
            continue
        more = f" and {len(sharing) - SHOWN} more" if len(sharing) > SHOWN else ""
        rows = ", ".join(str(int(r["row"])) for r, _ in sharing[:SHOWN]) + more
        spellings = ", ".join(dict.fromkeys(repr(p) for _, p in sharing[:SHOWN]))
        reason = f"{DUPLICATE_FILE}: rows {rows} resolve to the same file {os.path.relpath(real, root_real)!r} (listed as {spellings})"
        rejects.append(Reject(int(rec["row"]), reason, rec["record"], rec["image_id"], kind=DUPLICATE_FILE, column="path", value=listed))
    return keep
