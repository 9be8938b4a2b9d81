"""The project's own error types: what the ``cxr`` command line prints as one line, without a traceback.

Every error a user can fix (a file, a record, an option, a config key that cannot be used) is a
``CxrError``; its message names what is at fault and how to fix it. Anything else that escapes a verb
is a bug and keeps its traceback (``cxr.cli.main``). ``pipelines`` is the bottom layer: every package
may import this module.
"""
from __future__ import annotations

import errno


class CxrError(Exception):
    """A user-facing error: the message names the file/record/option and the fix."""


class UserInputError(CxrError, ValueError):
    """A value the user gave (an option, a setting, a file's content) that cannot be used.

    Also a ``ValueError``, which is what such checks raised before there was a project type."""


# errno values that describe the place a path points to, not a bug: the user can fix each by
# choosing another path, freeing space or changing permissions.
_PATH_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
    errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.ETXTBSY, errno.EXDEV, errno.ENOTEMPTY,
}
_WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def is_path_error(err: BaseException) -> bool:
    """An ``OSError`` about a file or folder the user named (missing, not writable, a folder where
    a file belongs, a full disk ...), as opposed to one from deep inside a library."""
    if not isinstance(err, OSError):
        return False
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return True
    return err.errno in _PATH_ERRNOS


def describe_path_error(err: OSError) -> str:
    """One line for a path error: ``cannot write /runs/x/manifest.parquet: Read-only file system``.

    A message the project wrote itself (an ``OSError`` raised with one argument, like
    ``FileNotFoundError("config file not found: ...")``) is kept as it is."""
    if err.filename is None:  # pyarrow names the file in the message: "Failed to open local file '...'"
        return err.strerror if err.errno is not None and err.strerror else str(err)
    if err.strerror is None:
        return str(err)
    path = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    if err.errno in _WRITE_ERRNOS:
        return f"cannot write {path}: {err.strerror}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access {path}: {err.strerror} (check the permissions of the file and its folders)"
    return f"{path}: {err.strerror}"
