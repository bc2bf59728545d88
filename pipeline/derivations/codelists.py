"""Recode raw values to CDISC submission values with a codelist from `schemas/terminology`."""

from __future__ import annotations

import pandas as pd

from pipeline import metadata
from pipeline.derivations.distinct_values import on_distinct_values


def codelist_map(name: str) -> dict[str, str]:
    """Raw value -> submission value; keys upper-cased for case-insensitive codelists."""
    codelist = metadata.codelists()[name]
    values = codelist["values"]
    if codelist.get("case_insensitive"):
        return {str(k).upper(): str(v) for k, v in values.items()}
    return {str(k): str(v) for k, v in values.items()}


@on_distinct_values
def recode(values: pd.Series, codelist: str) -> pd.Series:
    """Submission value for each raw value; null when the raw value is null or not in the list."""
    mapping = codelist_map(codelist)
    key = values.str.upper() if metadata.codelists()[codelist].get("case_insensitive") else values
    return key.map(mapping).astype("str")


def is_in_codelist(values: pd.Series, codelist: str) -> pd.Series:
    """True where a non-null raw value is allowed by the codelist (nulls count as allowed)."""
    return values.isna() | recode(values, codelist).notna()


def allowed_values(codelist: str) -> list[str]:
    return [str(k) for k in metadata.codelists()[codelist]["values"]]
