"""Findings: what is wrong, where, and how sure we are that it is wrong.

One row per record held back (ERROR) or flagged (WARNING), in the columns of the contract's
`quarantine.parquet`. Messages come from the rule catalogue (`schemas/rules.yaml`) so that the
wording of a rule lives in one place.
"""

from __future__ import annotations

import string

import pandas as pd

from pipeline import metadata

COLUMNS = ["SITEID", "TRANSFER", "FILE", "ROW", "SUBJID", "RULE", "SEVERITY", "MESSAGE"]


class _Blank(dict):
    def __missing__(self, key):
        return ""


def printable(text: str) -> str:
    """Text for a one-line message: control characters (line breaks, NUL) escaped as `\\n`, `\\x00`."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(rule: str, **fields) -> str:
    template = metadata.rules()[rule]["message"]
    values = _Blank({k: "" if v is None or (isinstance(v, float) and v != v) else printable(v) if isinstance(v, str)
                     else v for k, v in fields.items()})
    return string.Formatter().vformat(template, (), values)


def severity(rule: str) -> str:
    return metadata.rules()[rule]["severity"]


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="Int64" if c == "ROW" else "str") for c in COLUMNS})


def single(rule: str, site=None, transfer=None, file=None, row=None, subjid=None, **fields) -> dict:
    """A finding as a dict (transfer- and file-level findings, where there is one at a time)."""
    return {
        "SITEID": site, "TRANSFER": transfer, "FILE": file, "ROW": row, "SUBJID": subjid,
        "RULE": rule, "SEVERITY": severity(rule),
        "MESSAGE": render(rule, file=file, row=row, **fields),
    }


def from_records(records: list[dict]) -> pd.DataFrame:
    if not records:
        return empty()
    return normalize(pd.DataFrame.from_records(records))


def for_rows(rule: str, rows: pd.DataFrame, column: str | None = None, value=None, expected=None,
             detail=None) -> pd.DataFrame:
    """Findings for the raw records in `rows` (which carry src_* coordinates and SUBJID).

    `value`, `expected` and `detail` are scalars or Series aligned with `rows`.
    """
    if rows.empty:
        return empty()

    def aligned(item):
        if isinstance(item, pd.Series):
            return item.reindex(rows.index).astype("object").tolist()
        return [item] * len(rows)

    values, expecteds, details = aligned(value), aligned(expected), aligned(detail)
    files = rows["src_file"].tolist()
    numbers = rows["src_row"].tolist()
    messages = [
        render(rule, file=f, row=r, column=column, value=v, expected=e, detail=d)
        for f, r, v, e, d in zip(files, numbers, values, expecteds, details)
    ]
    subjid = rows["SUBJID"] if "SUBJID" in rows.columns else pd.Series(pd.NA, index=rows.index)
    return normalize(pd.DataFrame({
        "SITEID": rows["src_site"].to_numpy(), "TRANSFER": rows["src_transfer"].to_numpy(),
        "FILE": files, "ROW": numbers, "SUBJID": subjid.to_numpy(), "RULE": rule,
        "SEVERITY": severity(rule), "MESSAGE": messages,
    }))


HELD_BACK_NOTE = " (not mapped after all: an ERROR on this row holds it back)"


def note_held_back(found: pd.DataFrame, held: pd.DataFrame) -> pd.DataFrame:
    """A WARNING means mapped and reported; on a row that an ERROR holds back it says so, so that
    no one reads an uncoded AE on a held-back row as mapped. `held`: src_* coordinates."""
    keys = ["SITEID", "TRANSFER", "FILE", "ROW"]
    rows = pd.DataFrame({"SITEID": held["src_site"].astype("str"), "TRANSFER": held["src_transfer"].astype("str"),
                         "FILE": held["src_file"].astype("str"), "ROW": held["src_row"].astype("Int64"), "_held": True})
    held_row = found[keys].merge(rows.drop_duplicates(keys), on=keys, how="left")["_held"].fillna(False)
    marked = held_row.to_numpy(bool) & (found["SEVERITY"] == "WARNING").to_numpy()
    if not marked.any():
        return found
    out = found.copy()
    out.loc[marked, "MESSAGE"] = out.loc[marked, "MESSAGE"] + HELD_BACK_NOTE
    return out


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.reindex(columns=COLUMNS)
    for column in COLUMNS:
        out[column] = out[column].astype("Int64" if column == "ROW" else "str")
    return out


def combine(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """All findings in a stable order: site, transfer, file, row, rule, then message."""
    frames = [f for f in frames if f is not None and not f.empty]
    if not frames:
        return empty()
    out = pd.concat(frames, ignore_index=True)
    out = out.sort_values(["SITEID", "TRANSFER", "FILE", "ROW", "RULE", "MESSAGE"], na_position="first",
                          kind="stable").reset_index(drop=True)
    return normalize(out)
