"""Metadata helpers shared by the asset layers (what an auditor sees on each asset)."""

from __future__ import annotations

from collections import Counter

import dagster as dg
import pandas as pd

from pipeline import findings

OWNERS = ["team:data-management"]


def markdown_table(frame: pd.DataFrame, limit: int = 20) -> dg.MetadataValue:
    """A small table for the Dagster UI (failing-row samples, counts)."""
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    shown = frame.head(limit)

    def cell(value) -> str:
        return "" if value is None or value is pd.NA or value != value else str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(map(str, shown.columns)) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False))
    more = f"\n\n_{len(frame) - limit} more rows_" if len(frame) > limit else ""
    return dg.MetadataValue.md(header + body + more)


def findings_counts(frame: pd.DataFrame) -> dict:
    """Counts per rule and per site (with severity), the figures a data manager scans first."""
    if frame.empty:
        return {"findings": 0}
    severity = frame["SEVERITY"].tolist()
    by_rule = Counter(zip(frame["RULE"].tolist(), severity))
    by_site = Counter(zip(frame["SITEID"].fillna("(none)").tolist(), severity))

    def table(counts: Counter, first: str) -> dg.MetadataValue:
        rows = pd.DataFrame([(k, s, n) for (k, s), n in sorted(counts.items())], columns=[first, "SEVERITY", "count"])
        return markdown_table(rows, 100)

    return {
        "findings": int(len(frame)),
        "findings_error": severity.count("ERROR"),
        "findings_warning": severity.count("WARNING"),
        "findings_by_rule": table(by_rule, "RULE"),
        "findings_by_site": table(by_site, "SITEID"),
    }


def findings_table_schema() -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(c, "int64" if c == "ROW" else "string") for c in findings.COLUMNS])


def frame_column_schema(frame: pd.DataFrame) -> dg.TableSchema:
    """Column names and types of a report frame (listings whose columns are not SDTM variables)."""
    return dg.TableSchema(columns=[dg.TableColumn(str(c), str(t)) for c, t in frame.dtypes.items()])
