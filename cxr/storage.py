"""A run directory on remote storage (any URI pyarrow filesystems read), worked on through a local mirror.

``cxr run`` hands the stages a local :class:`~pipelines.rundir.RunDir`; for ``s3://``, ``gs://`` (or
a local run directory with ``run.scratch``) a :class:`Mirror` pulls it first and pushes it after
each stage.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from cxr.config import ConfigError, is_uri
from pipelines.rundir import RunDir


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
        import pyarrow.fs as pafs

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
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    base = root.rstrip("/") + "/"
    return {i.path[len(base):]: i for i in infos if i.type == pafs.FileType.File}


def _sync(src_fs, src_root: str, dst_fs, dst_root: str, keep_mtime: bool) -> None:
    import pyarrow.fs as pafs

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
