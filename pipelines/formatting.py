"""Numbers for people: how a figure, its interval, a difference and a share are written in the
terminal summaries, the HTML report, the figures and the sentences that say where a model fails.

One module, so every place writes an AUROC the same way and an undefined figure (None, or NaN
from an empty class) never prints as ``nan``. Each caller picks only the digits and the mark for a
missing figure its medium uses (an em dash in HTML, ``-`` on a terminal). It lives in the lowest
layer because every layer above formats figures (docs/architecture.md).
"""
from __future__ import annotations

import math

MISSING = "—"  # an undefined figure in the HTML report (the default)
TERMINAL_MISSING = "  -  "  # in a terminal table, as wide as 0.000


def is_missing(value) -> bool:
    """None, or a float NaN (an undefined AUROC, an empty bootstrap)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value, digits: int = 2, missing: str = MISSING) -> str:
    """``0.73``; ``missing`` when undefined."""
    return missing if is_missing(value) else f"{value:.{digits}f}"


def signed(value, digits: int = 2, missing: str = MISSING) -> str:
    """A difference with its sign: ``+0.04``, ``-0.10``."""
    return missing if is_missing(value) else f"{value:+.{digits}f}"


def percent(value, missing: str = MISSING) -> str:
    """A share in 0..1 as a whole percentage: ``0.734`` -> ``73%``."""
    return missing if is_missing(value) else f"{100 * value:.0f}%"


def interval(low, high, digits: int = 2, missing: str = MISSING, sep: str = "–") -> str:
    """``0.65–0.77``; ``missing`` when either end is undefined."""
    if is_missing(low) or is_missing(high):
        return missing
    return f"{low:.{digits}f}{sep}{high:.{digits}f}"


def estimate(point, low, high, digits: int = 2, missing: str = MISSING) -> str:
    """A figure with its interval, for sentences: ``0.71 [0.65-0.77]``."""
    if is_missing(point):
        return missing
    return f"{number(point, digits)} [{interval(low, high, digits, missing, sep='-')}]"


def duration(seconds: float) -> str:
    """Wall time in progress lines: ``1m20s``, ``2h05m`` past an hour."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
