"""A GX-free description of one expectation, so suites can be built and inspected without paying
for the GX import; gx_runner turns each Check into the real GX expectation."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["table", "record", "flag"]


def snake_case(class_name: str) -> str:
    """``ExpectColumnValuesToBeUnique`` -> ``expect_column_values_to_be_unique`` (GX's type name)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


@dataclass(frozen=True)
class Check:
    """``expectation`` is a class name in ``great_expectations.expectations``; ``args`` is the short
    argument text of the readable name (``age, 0..120``); ``level`` says what a failure does:
    ``table`` stops the pipeline, ``record`` quarantines the unexpected rows, ``flag`` reports only.
    ``where`` restricts the rows checked to ``column == value`` (a GX row condition)."""

    expectation: str
    kwargs: dict[str, Any]
    args: str
    level: Level = "record"
    where: tuple[str, Any] | None = field(default=None)

    @property
    def name(self) -> str:
        return f"{snake_case(self.expectation)}({self.args})"

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column") or self.kwargs.get("column_A")
