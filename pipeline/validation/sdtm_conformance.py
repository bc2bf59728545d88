"""SDTM conformance of our own outputs, as Pandera schemas generated from `schemas/sdtm/`.

These run as blocking asset checks: every variable present in SDTMIG order with its type, Req
variables populated, controlled terms valid, --DTC in ISO 8601, unique keys, unique --SEQ per
subject, no --DY of 0, every subject in DM, standard lab units, labels present and short.
Failing any of them means the mapping is wrong, so the domain is not published.
"""

from __future__ import annotations

import re

import pandas as pd
import pandera.pandas as pa

from pipeline import metadata
from pipeline.derivations import lab_unit_conversions as labs
from pipeline.derivations.distinct_values import in_set
from pipeline.sdtm_datasets import arrow_type, dataset_schema

ISO8601 = r"[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?)?)?)?"
NAME = r"^[A-Z][A-Z0-9]{0,7}$"


def submission_values(codelist: str) -> set[str]:
    if codelist == "LBTESTCD":
        return set(metadata.lab_tests()["tests"])
    if codelist == "LBSTRESU":
        return {t["standard_unit"] for t in metadata.lab_tests()["tests"].values() if t.get("standard_unit")}
    return {str(v) for v in metadata.codelists()[codelist]["values"].values()}


def _type_ok(series: pd.Series, kind: str) -> bool:
    if kind == "int64":
        return str(series.dtype) == "Int64"
    if kind == "float64":
        return str(series.dtype) == "float64"
    return pd.api.types.is_string_dtype(series.dtype)


def build_schema(dataset: str, dm_subjects: pd.Series | None) -> pa.DataFrameSchema:
    """Checks pass nulls themselves (ignore_na=False): Pandera's own null handling copies each
    column without its nulls, and for a frame check computes isna() over the whole frame, which
    cost a second per run on a million LB rows. Required variables are Pandera's `nullable`."""
    schema = dataset_schema(dataset)
    columns = {}
    for variable in schema["variables"]:
        name, kind = variable["name"], arrow_type(variable)
        checks = [pa.Check(lambda s, k=kind: _type_ok(s, k), name=f"SDTM-TYPE@{name}", element_wise=False,
                           ignore_na=False)]
        if variable.get("codelist"):
            allowed = submission_values(variable["codelist"])
            checks.append(pa.Check(lambda s, a=allowed: s.isna() | s.isin(a), name=f"SDTM-CODELIST@{name}",
                                   ignore_na=False))
        if variable.get("format") == "iso8601":
            checks.append(pa.Check(lambda s: s.isna() | s.str.fullmatch(ISO8601), name=f"SDTM-ISO8601@{name}",
                                   ignore_na=False))
        if variable.get("max_length"):
            checks.append(pa.Check(lambda s, n=variable["max_length"]: s.isna() | (s.str.len() <= n),
                                   name=f"SDTM-LENGTH@{name}", ignore_na=False))
        if variable.get("nonzero"):
            checks.append(pa.Check(lambda s: s.ne(0).fillna(True).astype(bool), name=f"SDTM-DY-ZERO@{name}",
                                   ignore_na=False))
        required = variable["core"] == "Req" and not variable.get("null_reported_by")
        columns[name] = pa.Column(nullable=not required, checks=checks, required=True)
    frame_checks = [pa.Check(lambda f, u=schema["unique"]: ~f[u].duplicated(keep=False), name="SDTM-UNIQUE-KEYS",
                             ignore_na=False)]
    sequence = [v["name"] for v in schema["variables"] if v["name"].endswith("SEQ") and v["name"] != "SEQ"]
    for name in sequence:
        frame_checks.append(pa.Check(lambda f, n=name: ~f[["USUBJID", n]].duplicated(keep=False), name=f"SDTM-SEQ@{name}",
                                     ignore_na=False))
    if dm_subjects is not None:
        frame_checks.append(pa.Check(lambda f: in_set(f["USUBJID"], dm_subjects), name="SDTM-DM-SUBJECT", ignore_na=False))
    if dataset == "lb":
        frame_checks.append(pa.Check(_standard_unit_ok, name="SDTM-STD-UNIT", ignore_na=False))
    return pa.DataFrameSchema(columns, checks=frame_checks, ordered=True, name=dataset)


def _standard_unit_ok(frame: pd.DataFrame) -> pd.Series:
    expected = labs.test_attribute(frame["LBTESTCD"], "standard_unit")
    return frame["LBSTRESU"].isna() | frame["LBSTRESU"].eq(expected).fillna(False)


def label_problems(dataset: str) -> list[str]:
    """SDTM-LABEL: names <= 8 upper-case characters, labels present and <= 40 characters."""
    schema = dataset_schema(dataset)
    problems = []
    if not schema.get("label") or len(schema["label"]) > 40:
        problems.append(f"dataset label {schema.get('label')!r} missing or longer than 40")
    for variable in schema["variables"]:
        if not re.fullmatch(NAME, variable["name"]):
            problems.append(f"variable name {variable['name']} is not 1-8 upper-case letters/digits")
        if not variable.get("label") or len(variable["label"]) > 40:
            problems.append(f"label of {variable['name']} missing or longer than 40 characters")
    return problems


def conformance_failures(dataset: str, frame: pd.DataFrame, dm_subjects: pd.Series | None) -> pd.DataFrame:
    """One row per failing (rule, column, row) with the offending value; empty when conformant."""
    schema_vars = [v["name"] for v in dataset_schema(dataset)["variables"]]
    sdtm = frame[[c for c in frame.columns if not c.startswith(("src_", "ctx_"))]]
    rows = []
    if list(sdtm.columns) != schema_vars:
        rows.append({"rule": "SDTM-VARIABLES", "column": None, "row": None,
                     "value": ", ".join(sdtm.columns), "expected": ", ".join(schema_vars)})
        return pd.DataFrame(rows)
    for problem in label_problems(dataset):
        rows.append({"rule": "SDTM-LABEL", "column": None, "row": None, "value": problem, "expected": None})
    try:
        build_schema(dataset, dm_subjects).validate(sdtm, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        for case in cases.itertuples(index=False):
            check = str(case.check)
            rule = "SDTM-REQUIRED" if check == "not_nullable" else check.split("@")[0]
            rows.append({"rule": rule, "column": case.column, "row": None if pd.isna(case.index) else int(case.index),
                         "value": None if pd.isna(case.failure_case) else str(case.failure_case), "expected": None})
    return pd.DataFrame(rows, columns=["rule", "column", "row", "value", "expected"]).drop_duplicates()
