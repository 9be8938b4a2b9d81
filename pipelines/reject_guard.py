"""The mass-rejection guard: one reason that would quarantine a large share of a table is a fault
of the table (a column exported differently, the wrong ``--source``), not of its records.

Quarantining row by row is right for a few bad records. When one reason takes more than
``max_frac`` of the rows (the float patient ids that once quarantined 1,297 of 1,302 NIH rows),
quarantining them hides the real problem behind a manifest that looks fine but is mostly empty:
ingest and validate stop instead, naming the reason, the column, three example records and how to
proceed, before writing any table. Rows listed but absent on disk (a partial download: NIH's label
file lists 112,120 images, a subset has 1,301) are exempt: they are neither counted against a
reason nor among the rows judged. A reason that takes one row never stops anything (one record
never aborts an ingest). ``max_frac`` 1 turns the guard off.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from pipelines.manifest import ContractError

DEFAULT_MAX_REJECT_FRAC = 0.2
EXEMPT_KINDS = frozenset({"missing file"})  # the image is not on disk: a partial download
EXAMPLES = 3


class MassRejectionError(ContractError):
    """One reason would quarantine more than the allowed share of a table; nothing was written."""


@dataclass(frozen=True)
class Rejection:
    """One row's rejection for one reason. ``where`` names the row as the user knows it (``row 17``
    of the label file, or a manifest row); ``value`` is the offending value as the file has it;
    ``exempt`` marks a row whose image is absent on disk (it is not judged)."""

    kind: str
    column: str | None
    where: str
    value: object = None
    exempt: bool = False


def check_max_reject_frac(value: float) -> float:
    """``--max-reject-frac`` must be a fraction: 0 (any reason taking two or more rows stops) .. 1 (off)."""
    if not 0 <= value <= 1:  # also rejects NaN
        raise ValueError(f"--max-reject-frac must be between 0 and 1, got {value}")
    return float(value)


def _example(r: Rejection) -> str:
    return f"{r.where}: {r.value!r}" if r.value is not None else r.where


def guard_rejections(rejections: Iterable[Rejection], rows_in: int, max_frac: float, verb: str = "ingest", report: str | None = None) -> None:
    """Raise MassRejectionError when one reason (``kind``) takes more than ``max_frac`` of the judged
    rows (``rows_in`` less the exempt ones) and more than one row. Each reason that does is named
    with its column, its count and three example records."""
    check_max_reject_frac(max_frac)
    if max_frac >= 1:
        return
    rejections = list(rejections)
    exempt = {r.where for r in rejections if r.exempt or r.kind in EXEMPT_KINDS}
    judged = rows_in - len(exempt)
    by_kind: dict[str, list[Rejection]] = defaultdict(list)
    for r in rejections:
        if r.where not in exempt:
            by_kind[r.kind].append(r)
    over = []
    for kind, rows in by_kind.items():
        n = len({r.where for r in rows})
        if n > 1 and judged > 0 and n > max_frac * judged:
            over.append((n, kind, rows))
    if not over:
        return
    over.sort(key=lambda item: (-item[0], item[1]))
    lines = [f"{verb} stopped: one reason would quarantine more than --max-reject-frac {max_frac:g} of the rows; nothing was written"]
    for n, kind, rows in over:
        columns = sorted({r.column for r in rows if r.column})
        column = f" (column {', '.join(repr(c) for c in columns)})" if columns else ""
        examples = "; ".join(_example(r) for r in rows[:EXAMPLES])
        lines.append(f"  {kind!r}{column}: {n} of {judged} rows ({n / judged:.0%}), e.g. {examples}")
    if exempt:
        lines.append(f"  ({len(exempt)} row(s) whose image is absent on disk are not counted)")
    if report:
        lines.append(f"  report: {report}")
    lines.append(
        "  a whole column rejected usually means the file was exported differently (or --source is wrong): "
        f"fix the column, or re-run with --max-reject-frac 1 to quarantine these rows and continue"
    )
    raise MassRejectionError("\n".join(lines))
