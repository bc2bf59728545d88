"""Metadata helpers shared by the asset layers (what an auditor sees on each asset)."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from pipeline import findings

OWNERS = ["team:data-management"]


def markdown_table(frame: pd.DataFrame, limit: int = 20) -> dg.MetadataValue:
    """A small table for the Dagster UI (failing-row samples, counts)."""
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    shown = frame.head(limit).astype("object").where(frame.head(limit).notna(), "")
    header = "| " + " | ".join(map(str, shown.columns)) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "\n".join("| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
                     for row in shown.itertuples(index=False))
    more = f"\n\n_{len(frame) - limit} more rows_" if len(frame) > limit else ""
    return dg.MetadataValue.md(header + body + more)


def findings_counts(frame: pd.DataFrame) -> dict:
    """Counts per rule and per site (with severity), the figures a data manager scans first."""
    if frame.empty:
        return {"findings": 0}
    by_rule = frame.groupby(["RULE", "SEVERITY"], dropna=False).size().reset_index(name="count")
    by_site = frame.groupby(["SITEID", "SEVERITY"], dropna=False).size().reset_index(name="count")
    return {
        "findings": int(len(frame)),
        "findings_error": int((frame["SEVERITY"] == "ERROR").sum()),
        "findings_warning": int((frame["SEVERITY"] == "WARNING").sum()),
        "findings_by_rule": markdown_table(by_rule, 100),
        "findings_by_site": markdown_table(by_site.fillna({"SITEID": "(none)"}), 100),
    }


def findings_table_schema() -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(c, "int64" if c == "ROW" else "string") for c in findings.COLUMNS])
