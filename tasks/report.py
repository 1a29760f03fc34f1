"""Catalog summaries through DuckDB: printed by the CLI, published as Prefect artifacts."""

from __future__ import annotations

import pyarrow as pa

from storage.catalog import connect
from storage.layout import DataRoot

SUMMARY_QUERIES = {
    "Images per dataset and split": """
        SELECT dataset, split, count(*) AS images, count(DISTINCT country) AS countries
        FROM images GROUP BY ALL ORDER BY ALL""",
    "Images per country": """
        SELECT dataset, country, any_value(country_name) AS country_name, any_value(continent) AS continent,
               count(*) AS images,
               count(*) FILTER (WHERE split = 'train') AS train,
               count(*) FILTER (WHERE split = 'val') AS val,
               count(*) FILTER (WHERE split = 'test') AS test
        FROM images GROUP BY dataset, country ORDER BY dataset, images DESC, country""",
    "Crops per country and group": """
        SELECT segmenter, country,
               count(*) FILTER (WHERE "group" = 'ground') AS ground,
               count(*) FILTER (WHERE "group" = 'structure') AS structure,
               count(*) FILTER (WHERE "group" = 'vegetation') AS vegetation,
               count(*) FILTER (WHERE "group" = 'vehicle') AS vehicle,
               count(*) FILTER (WHERE "group" = 'furniture') AS furniture,
               count(DISTINCT image_id) AS images, bool_or(untrained) AS untrained
        FROM features GROUP BY ALL ORDER BY segmenter, country""",
    "Quarantine by reason": """
        SELECT dataset, reason, count(*) AS inputs, min(detail) AS example
        FROM quarantine GROUP BY ALL ORDER BY dataset, inputs DESC, reason""",
}


def catalog_summary(root: DataRoot) -> dict[str, pa.Table]:
    con = connect(root)
    try:
        return {title: con.sql(sql).to_arrow_table() for title, sql in SUMMARY_QUERIES.items()}
    finally:
        con.close()


def md_table(table: pa.Table) -> str:
    if table.num_rows == 0:
        return "_(none)_"
    head = "| " + " | ".join(table.column_names) + " |"
    rule = "|" + "---|" * table.num_columns
    rows = ["| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |" for row in table.to_pylist()]
    return "\n".join([head, rule, *rows])


def summary_markdown(tables: dict[str, pa.Table]) -> str:
    return "\n\n".join(f"### {title}\n\n{md_table(t)}" for title, t in tables.items())
