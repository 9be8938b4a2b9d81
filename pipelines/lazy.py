"""Packages whose public names are imported on first use (PEP 562 module ``__getattr__``), so that
importing the package stays cheap: ``cxr --help`` does not pay for torch, and Ray Data's worker
processes import ``trainers.data`` without torchvision and Ray Train."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and ``__getattr__`` for ``package``, each name of ``exports`` read from its module::

        __all__, __getattr__ = lazy_exports(__name__, {"fit": "trainers.trainer"})
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(exports), __getattr__
