"""The one number formatter (pipelines/formatting.py): undefined figures never print as nan."""
from __future__ import annotations

import math

from pipelines.formatting import TERMINAL_MISSING, estimate, interval, number, percent, signed


def test_figures_are_written_one_way_and_undefined_ones_are_marked():
    assert number(0.7349) == "0.73" and number(0.7349, 3) == "0.735"
    assert signed(0.04) == "+0.04" and signed(-0.1, 3) == "-0.100"
    assert percent(0.734) == "73%"
    assert interval(0.65, 0.77) == "0.65–0.77" and interval(0.65, 0.77, 3, sep="-") == "0.650-0.770"
    assert estimate(0.71, 0.65, 0.77) == "0.71 [0.65-0.77]"
    for undefined in (None, math.nan):
        assert number(undefined) == signed(undefined) == percent(undefined) == "—"
        assert interval(0.5, undefined) == interval(undefined, 0.5) == estimate(undefined, 0.1, 0.2) == "—"
        assert number(undefined, 3, missing=TERMINAL_MISSING) == "  -  "
