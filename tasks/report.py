"""Catalog summaries and checks as text: printed by the CLI, published by the flows as artifacts."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from storage.layout import DataRoot
from storage.queries import catalog


@dataclass
class Check:
    """One named property of the data: passed or not, a detail line, and the rows behind it."""

    name: str
    passed: bool
    detail: str
    table: pa.Table | None = None


def catalog_summary(root: DataRoot) -> dict[str, pa.Table]:
    """Images per dataset/split/country, crops per country and group, quarantine reasons."""
    with catalog(root) as cat:
        return cat.summary()


def md_table(table: pa.Table) -> str:
    if table.num_rows == 0:
        return "_(none)_"
    head = "| " + " | ".join(table.column_names) + " |"
    rule = "|" + "---|" * table.num_columns
    rows = ["| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |" for row in table.to_pylist()]
    return "\n".join([head, rule, *rows])


def summary_markdown(tables: dict[str, pa.Table]) -> str:
    return "\n\n".join(f"### {title}\n\n{md_table(t)}" for title, t in tables.items())


def checks_markdown(title: str, checks: list[Check], failed_rows_only: bool = False, show: int | None = None) -> str:
    """A checks list as markdown: one PASS/FAIL line each, then the tables behind them."""
    lines = [f"## {title}", ""]
    lines += [f"- {'PASS' if c.passed else '**FAIL**'} {c.name}: {c.detail}" for c in checks]
    for c in checks:
        if c.table is not None and c.table.num_rows and not (failed_rows_only and c.passed):
            lines += ["", f"### {c.name}" + (f" (first {show})" if show else ""), "", md_table(c.table)]
    return "\n".join(lines)
