"""Raw contract rules (site-export-spec.md) as Pandera schemas built from `schemas/raw/*.yaml`.

Each column's `kind` brings its checks (codelist, date, time, number, dose label, visit, lab
test); the file's `keys` and `record_rules` bring the cross-field checks. Validation is lazy:
every failure of every record is collected, and a record with an ERROR is held back while the
others go on. Cross-file rules (SUBJID known in dm.csv, subject-level data complete) run with
the subject lists of the same transfers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa

from pipeline import findings, metadata
from pipeline.derivations import codelists, lab_unit_conversions as labs
from pipeline.derivations.distinct_values import as_text, combined_rank, distinct_rows, in_set, lookup, null_coded
from pipeline.derivations.dose_labels import dose_particles
from pipeline.derivations.iso_dates import (certainly_ordered, compare_partial, date_part, is_complete_date,
                                            is_site_time, partial_date_bounds, site_date_to_iso)
from pipeline.transfers import folder_times
from pipeline.derivations.visits import is_known_visit, schedule, scheduled_visit_number
from pipeline.validation.pandera_failures import placed_failures

Describe = Callable[[pd.DataFrame], dict]
BLANK = r"[\s\u200b-\u200d\u2060\ufeff]+"   # white space and the invisible characters of Unicode


@dataclass
class RawRule:
    """One named check: `passes(parsed)` is True per row that satisfies it."""

    rule: str
    column: str | None
    passes: Callable[["Parsed"], pd.Series]
    describe: Describe

    @property
    def check_name(self) -> str:
        return f"{self.rule}@{self.column or ''}"


def _value(column: str) -> Describe:
    return lambda rows: {"value": rows[column]}


class Parsed:
    """Each column of one raw frame parsed once (dates to ISO, codes recoded, test names to
    LBTESTCD), shared by every rule that looks at it."""

    def __init__(self, frame: pd.DataFrame, columns: dict):
        self.frame = frame
        self.columns = columns
        self._cache: dict = {}

    def _memo(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def iso(self, column: str) -> pd.Series:
        return self._memo(("iso", column), lambda: site_date_to_iso(self.frame[column]))

    def code(self, column: str, codelist: str) -> pd.Series:
        return self._memo(("code", column, codelist), lambda: codelists.recode(self.frame[column], codelist))

    def test_code(self, column: str = "LBTEST") -> pd.Series:
        return self._memo(("test", column), lambda: labs.lab_test_code(self.frame[column]))

    def partial_date(self, column: str) -> pd.Series:
        """True where the date reads as ISO but lacks its day or month (`UN MAR 2026`, `2026`)."""
        date = self.iso(column)
        return date.notna() & ~is_complete_date(date)

    def time_ok(self, column: str) -> pd.Series:
        return self._memo(("time", column), lambda: is_site_time(self.frame[column]).fillna(False).astype(bool))

    def result(self, column: str = "LBORRES") -> pd.DataFrame:
        return self._memo(("result", column), lambda: labs.parse_result(self.frame[column]))

    def export_limit(self) -> pd.Series:
        """Per row, the last day a record of its transfer may carry: the export day (the folder
        names the UTC time) plus one for the sites' time zone."""
        def compute():
            transfers = self.frame["src_transfer"]
            names = pd.Series(pd.unique(transfers.dropna()), dtype="str")
            day = folder_times(names).dt.normalize() + pd.Timedelta(days=1)
            return lookup(transfers, pd.Series(day.dt.strftime("%Y-%m-%d").astype("str").to_numpy(), index=names))
        return self._memo(("export_limit",), compute)

    def canonical(self, column: str) -> pd.Series:
        """Values as the pipeline compares them: codes recoded, dates in ISO, unscheduled visits
        told apart by their date, test names as LBTESTCD, numbers kept as text by their value."""
        values = self.frame[column]
        spec = self.columns[column]
        kind = spec.get("kind")
        if kind == "code":
            return self.code(column, spec["codelist"]).fillna(values)
        if kind == "date":
            return self.iso(column).fillna(values)
        if kind == "lab_test":
            return self.test_code(column).fillna(values)
        if spec.get("compare_as") == "number":   # an event number: `01` and `+1` are `1`
            digits = values.str.fullmatch(r"\+?[0-9]+").fillna(False).astype(bool)
            return values.where(~digits, values.str.lstrip("+").str.lstrip("0").replace("", "0"))
        if kind == "visit" and spec.get("date"):
            unscheduled = values == metadata.visits()["unscheduled"]["visit"]
            dated = values + "@" + self.iso(spec["date"]).fillna(self.frame[spec["date"]]).fillna("")
            return values.where(~unscheduled.fillna(False), dated)
        return values

    def canonical_codes(self, column: str) -> tuple[np.ndarray, int]:
        """Integer codes of `canonical(column)` (null is "") and their count: the canonical text
        is made once per distinct raw value (with its date, for visits) and spread back by code,
        so that comparing keys over a million rows compares integers, not text."""
        spec = self.columns[column]
        sources = [column] + ([spec["date"]] if spec.get("kind") == "visit" and spec.get("date") else [])
        combination, first = distinct_rows([self.frame[c] for c in sources])
        canonical = Parsed(self.frame[sources].take(first), self.columns).canonical(column).fillna("")
        codes, uniques = pd.factorize(canonical)
        return codes[combination], len(uniques)


def _is_integer(values: pd.Series, low, high) -> pd.Series:
    number = pd.to_numeric(values.where(values.str.fullmatch(r"[+-]?[0-9]+")), errors="coerce")
    ok = number.notna()
    if low is not None:
        ok &= number >= low
    if high is not None:
        ok &= number <= high
    return ok.fillna(False)


def column_rules(columns: dict) -> list[RawRule]:
    """Value checks that follow from each column's kind (nulls pass; `required` is separate)."""
    out = []
    subjid_pattern = metadata.study()["subjid_pattern"]
    for column, spec in columns.items():
        kind = spec.get("kind")
        if kind == "code":
            codelist = spec["codelist"]
            out.append(RawRule("RAW-CODELIST", column,
                               lambda p, c=column, cl=codelist: p.frame[c].isna() | p.code(c, cl).notna(),
                               lambda rows, c=column, cl=codelist: {
                                   "value": rows[c], "expected": ", ".join(codelists.allowed_values(cl)) +
                                   (" (any case)" if metadata.codelists()[cl].get("case_insensitive") else "")}))
        elif kind == "date":
            out.append(RawRule("RAW-DATE", column, lambda p, c=column: p.frame[c].isna() | p.iso(c).notna(),
                               _value(column)))
        elif kind == "time":
            out.append(RawRule("RAW-TIME", column, lambda p, c=column: p.frame[c].isna() | p.time_ok(c),
                               _value(column)))
        elif kind == "integer":
            low, high = spec.get("min"), spec.get("max")
            bounds = f" from {low} to {high}" if high is not None else (f" >= {low}" if low is not None else "")
            out.append(RawRule("RAW-INTEGER", column,
                               lambda p, c=column, lo=low, hi=high: p.frame[c].isna() | _is_integer(p.frame[c], lo, hi),
                               lambda rows, c=column, b=bounds: {"value": rows[c], "expected": b}))
        elif kind == "number":
            out.append(RawRule("RAW-NUMBER", column,
                               lambda p, c=column: p.frame[c].isna() | p.result(c)["kind"].eq("number"),
                               _value(column)))
        elif kind == "dose_label":
            out.append(RawRule("RAW-DOSE-LABEL", column,
                               lambda p, c=column: p.frame[c].isna() | dose_particles(p.frame[c]).notna(),
                               _value(column)))
        elif kind == "subjid":
            out.append(RawRule("RAW-SUBJID-FORMAT", column,
                               lambda p, c=column: p.frame[c].isna() | p.frame[c].str.fullmatch(subjid_pattern).fillna(False),
                               _value(column)))
        elif kind == "visit":
            dosing = bool(spec.get("dosing_only"))
            table = schedule()
            names = list(table.loc[table["dose"], "visit"]) if dosing else [
                *table["visit"], metadata.visits()["unscheduled"]["visit"]]
            out.append(RawRule("RAW-VISIT", column,
                               lambda p, c=column, d=dosing: p.frame[c].isna() | is_known_visit(p.frame[c], d),
                               lambda rows, c=column, n=names: {"value": rows[c], "expected": ", ".join(n)}))
        elif kind == "lab_test":
            out.append(RawRule("RAW-LB-TEST", column, lambda p, c=column: p.frame[c].isna() | p.test_code(c).notna(),
                               _value(column)))
        elif kind == "text" and spec.get("required"):
            # Blank text is no value: a required AETERM of " " (or a zero-width space) is as empty
            # as "" (other kinds refuse blanks through their own format).
            out.append(RawRule("RAW-REQUIRED", column,
                               lambda p, c=column: ~p.frame[c].str.fullmatch(BLANK).fillna(False).astype(bool),
                               lambda rows: {}))
    return out


def _time_on_partial_date(time_column: str, date_column: str) -> RawRule:
    def passes(p: Parsed) -> pd.Series:
        return ~(p.frame[time_column].notna() & p.time_ok(time_column) & p.partial_date(date_column))

    return RawRule("RAW-TIME-PARTIAL-DATE", time_column, passes,
                   lambda rows: {"value": rows[time_column], "detail": site_date_to_iso(rows[date_column])})


def _after_export(date_column: str) -> RawRule:
    """A date after its transfer's export cannot have happened yet (a typed year, say): it is
    mapped as written and reported. The transfer folder names the export time in UTC; a day
    more allows for the sites' time zone. Only dates certainly after count (`2026-11` is not)."""
    def passes(p: Parsed) -> pd.Series:
        ok = np.ones(len(p.frame), dtype=bool)
        ok[certainly_ordered(p.iso(date_column), p.export_limit(), 1)] = False
        return pd.Series(ok, index=p.frame.index)

    return RawRule("RAW-DATE-AFTER-EXPORT", date_column, passes, lambda rows: {
        "value": rows[date_column],
        "detail": folder_times(rows["src_transfer"].astype("str")).dt.strftime("%Y-%m-%d").astype("str")})


def _unscheduled_on_partial_date(visit_column: str, date_column: str) -> RawRule:
    """An unscheduled visit is numbered from its date; a partial date cannot place it."""
    unscheduled = metadata.visits()["unscheduled"]["visit"]

    def passes(p: Parsed) -> pd.Series:
        return ~(p.frame[visit_column].eq(unscheduled).fillna(False) & p.partial_date(date_column))

    return RawRule("RAW-VISIT-PARTIAL-DATE", visit_column, passes,
                   lambda rows: {"value": rows[visit_column], "detail": f"{date_column} = '" + rows[date_column] + "'"})


def _condition(p: Parsed, when: dict) -> pd.Series:
    mask = pd.Series(True, index=p.frame.index)
    for column, value in when.items():
        mask &= p.canonical(column).eq(value).fillna(False)
    return mask


def _readable(p: Parsed, column: str) -> pd.Series:
    spec = p.columns[column]
    if spec.get("kind") == "code":
        return p.code(column, spec["codelist"]).notna()
    return p.frame[column].notna()


def _when_text(when: dict) -> str:
    return " and ".join(f"{c} = {v}" for c, v in when.items())


def _record_key(p: Parsed, keys: list[str]) -> pd.Series:
    """One integer per row for its key as mapped, within its site."""
    return pd.Series(combined_rank([p.canonical_codes(c) for c in keys] + [null_coded(p.frame["src_site"])]),
                     index=p.frame.index)


def _duplicate_detail(p: Parsed, keys: list[str]) -> pd.Series:
    """The row's key as written, and every row of its file that holds the same key as mapped
    (the copies may differ in writing: a date in either format, a test by an alias), so that
    the site knows which records to reconcile."""
    rows = p.frame
    copies = rows["src_row"].astype("str").groupby(_record_key(p, keys)).transform(", ".join)
    return (rows[keys].astype("str").fillna("").agg(" / ".join, axis=1).radd(" / ".join(keys) + " = ")
            + " (rows " + copies + ")")


def record_rules(schema: dict) -> list[RawRule]:
    """The file's cross-field rules, from its `keys` and `record_rules` (and, for columns whose
    date column is declared, times and unscheduled visits that a partial date cannot carry)."""
    columns = schema["columns"]
    out = [_time_on_partial_date(c, spec["date"]) for c, spec in columns.items()
           if spec.get("kind") == "time" and spec.get("date")]
    out += [_unscheduled_on_partial_date(c, spec["date"]) for c, spec in columns.items()
            if spec.get("kind") == "visit" and spec.get("date") and not spec.get("dosing_only")]
    out += [_after_export(c) for c, spec in columns.items() if spec.get("kind") == "date"]
    keys = schema.get("keys")
    if keys:
        out.append(RawRule("RAW-DUPLICATE", None, lambda p, k=keys: ~_record_key(p, k).duplicated(keep=False),
                           lambda rows, k=keys: {"detail": _duplicate_detail(Parsed(rows, columns), k)}))
    for item in schema.get("record_rules", []):
        rule = item["rule"]
        if rule in ("RAW-REQUIRED-IF", "RAW-EMPTY-IF"):
            column, when = item["column"], item["when"]
            want_value = rule == "RAW-REQUIRED-IF"
            out.append(RawRule(rule, column,
                               lambda p, c=column, w=when, want=want_value:
                               ~(_condition(p, w) & (p.frame[c].isna() if want else p.frame[c].notna())),
                               lambda rows, c=column, w=when, why=item["why"]:
                               {"value": rows[c], "detail": _when_text(w), "expected": why}))
        elif rule == "RAW-VALUE-IF":
            column, when, allowed = item["column"], item["when"], item["one_of"]
            out.append(RawRule(rule, column,
                               # a value outside its codelist is RAW-CODELIST's finding, not this one's
                               lambda p, c=column, w=when, a=allowed: ~(_condition(p, w) & _readable(p, c)
                                                                        & ~p.canonical(c).isin(a).fillna(False)),
                               lambda rows, c=column, w=when, a=allowed, why=item["why"]:
                               {"value": rows[c], "detail": _when_text(w), "expected": " or ".join(a) + f" ({why})"}))
        elif rule == "RAW-DATE-ORDER":
            start, end = item["start"], item["end"]
            out.append(RawRule(rule, end,
                               lambda p, s=start, e=end: ~compare_partial(p.iso(e), p.iso(s)).eq(-1).fillna(False)
                               .astype(bool),
                               lambda rows, s=start, e=end: {"value": rows[e], "detail": s + " = " + rows[s].astype("str")}))
        elif rule == "RAW-ONLY-AT-VISIT":
            column, value, visit = item["column"], item["value"], item["visit"]
            out.append(RawRule(rule, column,
                               lambda p, c=column, v=value, vi=visit:
                               # a missing VISIT is RAW-REQUIRED's finding, not "found at" nothing
                               ~(p.canonical(c).eq(v).fillna(False) & p.frame["VISIT"].notna()
                                 & p.frame["VISIT"].ne(vi)),
                               lambda rows, c=column, vi=visit: {"value": rows[c], "expected": vi, "detail": rows["VISIT"]}))
        elif rule == "RAW-RESULT-STATUS":
            result, status = item["result"], item["status"]
            out.append(RawRule(rule, result, lambda p, r=result, s=status: p.frame[r].notna() ^ p.frame[s].notna(),
                               lambda rows, r=result, s=status: {"detail": pd.Series(np.where(
                                   rows[r].notna(), f"{r} = '" + rows[r].astype("str") + f"' and {s} = NOT DONE are both given; expected one of them",
                                   f"neither {r} nor {s} = NOT DONE is given; expected one of them"), index=rows.index)}))
        elif rule in LAB_RULES or rule in AE_RULES or rule in DM_RULES:
            out.append((LAB_RULES | AE_RULES | DM_RULES)[rule]())
        else:
            raise ValueError(f"unknown record rule {rule} in {schema['file']}")
    return out


def _lab_unit_rule() -> RawRule:
    def passes(p: Parsed) -> pd.Series:
        code = p.test_code()
        checked = code.notna() & (p.frame["LBORRES"].notna() | p.frame["LBORRESU"].notna())
        return ~(checked & ~labs.unit_is_known(code, p.frame["LBORRESU"], p.result()["kind"]))

    def describe(rows):
        code = labs.lab_test_code(rows["LBTEST"])
        result = (" result '" + rows["LBORRES"] + "'").fillna("")
        return {"value": rows["LBORRESU"].fillna("(empty)"), "detail": rows["LBTEST"] + " (" + code + ")" + result,
                "expected": code.map(lambda c: ", ".join(labs.allowed_units(c)))}

    return RawRule("RAW-LB-UNIT", "LBORRESU", passes, describe)


def _lab_result_rule() -> RawRule:
    def passes(p: Parsed) -> pd.Series:
        code = p.test_code()
        checked = code.notna() & p.frame["LBORRES"].notna()
        return ~(checked & ~labs.result_is_readable(code, p.result()))

    def describe(rows):
        code = labs.lab_test_code(rows["LBTEST"])
        return {"value": rows["LBORRES"], "detail": rows["LBTEST"] + " (" + code + ")",
                "expected": labs.test_attribute(code, "kind").map(labs.EXPECTED_RESULT)}

    return RawRule("RAW-LB-RESULT", "LBORRES", passes, describe)


def _standard_value(code: pd.Series, parsed: pd.DataFrame, units: pd.Series) -> pd.Series:
    return parsed["number"].where(parsed["kind"] == "number") * labs.unit_factor(code, units)


def _lab_plausible_rule() -> RawRule:
    def passes(p: Parsed) -> pd.Series:
        code = p.test_code()
        value = _standard_value(code, p.result(), p.frame["LBORRESU"])
        low, high = labs.test_attribute(code, "plausible_low"), labs.test_attribute(code, "plausible_high")
        return ~((value < low) | (value > high)).fillna(False).astype(bool)

    def describe(rows):
        code = labs.lab_test_code(rows["LBTEST"])
        unit = labs.test_attribute(code, "standard_unit").fillna("")
        low = labs.format_number(labs.test_attribute(code, "plausible_low"))
        high = labs.format_number(labs.test_attribute(code, "plausible_high"))
        return {"value": rows["LBORRES"] + " " + rows["LBORRESU"].fillna(""), "detail": rows["LBTEST"],
                "expected": "between " + low + " and " + high + " " + unit}

    return RawRule("RAW-LB-IMPLAUSIBLE", "LBORRES", passes, describe)


def _ae_uncoded_rule() -> RawRule:
    return RawRule("RAW-AE-UNCODED", "AEDECOD", lambda p: p.frame["AEDECOD"].notna(),
                   lambda rows: {"value": rows["AETERM"]})


SERIOUSNESS = ["AESDTH", "AESLIFE", "AESHOSP", "AESDISAB", "AESCONG", "AESMIE"]


def _ae_seriousness_rule() -> RawRule:
    def passes(p: Parsed) -> pd.Series:
        criteria = pd.DataFrame({c: p.code(c, "NY").eq("Y").fillna(False) for c in SERIOUSNESS}).any(axis=1)
        serious = p.code("AESER", "NY")
        return ~((serious.eq("Y") & ~criteria) | (serious.eq("N") & criteria)).fillna(False).astype(bool)

    def describe(rows):
        serious = codelists.recode(rows["AESER"], "NY")
        return {"value": rows["AESER"], "detail": pd.Series(np.where(
            serious.eq("Y"), "none of " + ", ".join(SERIOUSNESS) + " is Y; a serious event needs at least one criterion",
            "a seriousness criterion is Y; a non-serious event has none"), index=rows.index)}

    return RawRule("RAW-AE-SERIOUSNESS", "AESER", passes, describe)


def _ae_death_rule() -> RawRule:
    def passes(p: Parsed) -> pd.Series:
        return p.code("AESDTH", "NY").eq("Y").fillna(False) == p.frame["AEOUT"].eq("FATAL").fillna(False)

    def describe(rows):
        death = codelists.recode(rows["AESDTH"], "NY").eq("Y").fillna(False)
        return {"detail": pd.Series(np.where(
            death, "AESDTH = Y but AEOUT = '" + rows["AEOUT"].fillna("").astype("str") + "'; a death has AEOUT = FATAL",
            "AEOUT = FATAL but AESDTH is not Y"), index=rows.index)}

    return RawRule("RAW-AE-DEATH", "AEOUT", passes, describe)


def _age_at_consent_rule() -> RawRule:
    """AGE is the age at consent: it must be one the birth date (partial: every day it may be)
    and the consent date allow."""
    def ages(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        first, last = (pd.to_datetime(day, format="%Y-%m-%d", errors="coerce")
                       for day in partial_date_bounds(site_date_to_iso(frame["BRTHDAT"])))
        consent = date_part(site_date_to_iso(frame["RFICDAT"]))
        return _whole_years(last, consent), _whole_years(first, consent)

    def passes(p: Parsed) -> pd.Series:
        youngest, oldest = ages(p.frame)
        age = pd.to_numeric(p.frame["AGE"].where(p.frame["AGE"].str.fullmatch(r"\+?[0-9]+").fillna(False)),
                            errors="coerce")
        return ~((age < youngest) | (age > oldest)).fillna(False).astype(bool)

    def describe(rows):
        youngest, oldest = (v.astype("Int64").astype("str") for v in ages(rows))
        span = youngest.where(youngest == oldest, youngest + " to " + oldest)
        return {"value": rows["AGE"], "detail": "BRTHDAT = '" + rows["BRTHDAT"] + "' and RFICDAT = '" + rows["RFICDAT"]
                + "' give " + span}

    return RawRule("RAW-AGE-BIRTH", "AGE", passes, describe)


def _whole_years(birth: pd.Series, at: pd.Series) -> pd.Series:
    before_birthday = (at.dt.month * 100 + at.dt.day) < (birth.dt.month * 100 + birth.dt.day)
    return (at.dt.year - birth.dt.year - before_birthday.astype("float64")).astype("float64")


DM_RULES = {"RAW-AGE-BIRTH": _age_at_consent_rule}
LAB_RULES = {"RAW-LB-UNIT": _lab_unit_rule, "RAW-LB-RESULT": _lab_result_rule, "RAW-LB-IMPLAUSIBLE": _lab_plausible_rule}
AE_RULES = {"RAW-AE-UNCODED": _ae_uncoded_rule, "RAW-AE-SERIOUSNESS": _ae_seriousness_rule, "RAW-AE-DEATH": _ae_death_rule}


def subject_rules(known_subjects: pd.Series | None) -> list[RawRule]:
    """SUBJID belongs to the transfer's site and, outside dm.csv, is known in that site's dm.csv."""
    pattern = metadata.study()["subjid_pattern"]

    def own_site(p: Parsed) -> pd.Series:
        subjid, site = p.frame["SUBJID"], as_text(p.frame["src_site"])
        checkable = subjid.notna() & p.frame["src_site"].notna() & subjid.str.fullmatch(pattern).fillna(False)
        return ~checkable | subjid.str.slice(0, 2).eq(site)

    out = [RawRule("RAW-SUBJID-SITE", "SUBJID", own_site,
                   lambda rows: {"value": rows["SUBJID"], "detail": rows["SUBJID"].str.slice(0, 2),
                                 "expected": rows["src_site"].astype("str")})]
    if known_subjects is not None:
        out.append(RawRule("RAW-SUBJID-UNKNOWN", "SUBJID",
                           lambda p: p.frame["SUBJID"].isna() | in_set(p.frame["SUBJID"], known_subjects),
                           _value("SUBJID")))
    return out


def build_schema(name: str, frame: pd.DataFrame,
                 known_subjects: pd.Series | None) -> tuple[pa.DataFrameSchema, dict[str, RawRule]]:
    """The Pandera schema of one raw file, and its rules by check name. The checks read the
    frame through one `Parsed` view so that each column is parsed once."""
    schema = metadata.raw_schema(name)
    columns = schema["columns"]
    parsed = Parsed(frame, columns)
    by_column = {c: [] for c in columns}
    frame_rules = [*subject_rules(known_subjects), *record_rules(schema)]
    registry = {}
    # ignore_na=False: every rule passes nulls itself (`required` is Pandera's `nullable`).
    # Pandera's own null handling would copy a column without its nulls for every column rule,
    # and compute isna() over the whole frame for every record rule.
    for rule in column_rules(columns):
        registry[rule.check_name] = rule
        by_column[rule.column].append(
            pa.Check(lambda s, r=rule: r.passes(parsed).reindex(s.index), name=rule.check_name, ignore_na=False))
    for rule in frame_rules:
        registry[rule.check_name] = rule
    pandera_schema = pa.DataFrameSchema(
        {c: pa.Column(nullable=not spec.get("required", False), checks=by_column[c]) for c, spec in columns.items()},
        checks=[pa.Check(lambda f, r=rule: r.passes(parsed).reindex(f.index), name=rule.check_name, ignore_na=False)
                for rule in frame_rules],
        name=schema["file"],
        strict=False,
    )
    return pandera_schema, registry


def validate_file(name: str, frame: pd.DataFrame, known_subjects: pd.Series | None) -> pd.DataFrame:
    """Findings (all severities) for one raw file; the frame is left untouched."""
    if frame.empty:
        return findings.empty()
    pandera_schema, registry = build_schema(name, frame, known_subjects)
    try:
        pandera_schema.validate(frame, lazy=True)
        return findings.empty()
    except pa.errors.SchemaErrors as errors:
        cases = placed_failures(errors, name)
    out = []
    required = cases[cases["check"] == "not_nullable"]
    for column, group in required.groupby("column", sort=True):
        rows = frame.loc[group["index"].astype(int).unique()]
        out.append(findings.for_rows("RAW-REQUIRED", rows, column=column))
    other = cases[cases["check"] != "not_nullable"].drop_duplicates(subset=["check", "index"])
    for check, group in other.groupby("check", sort=True):
        rule = registry.get(check)
        if rule is None:
            raise RuntimeError(f"Pandera reported an unknown check {check!r} on {name}")
        rows = frame.loc[np.sort(group["index"].astype(int).unique())]
        out.append(findings.for_rows(rule.rule, rows, column=rule.column, **rule.describe(rows)))
    return findings.combine(out)


def _hold_back_subjects(raw: dict[str, pd.DataFrame], held: dict[str, pd.Series], subjects: pd.Series,
                        detail: str | pd.Series) -> list[pd.DataFrame]:
    """RAW-SUBJECT-HELD on every record of `subjects` not held back yet, in every file (`held` is
    updated); `detail` is the reason, one text or one per subject (indexed by SUBJID)."""
    out = []
    for name in metadata.RAW_FILES:
        frame = raw[name]
        cascade = ~held[name] & in_set(frame["SUBJID"], subjects)
        subjids = frame.loc[cascade, "SUBJID"]
        out.append(findings.for_rows("RAW-SUBJECT-HELD", frame[cascade], value=subjids,
                                     detail=detail if isinstance(detail, str) else lookup(subjids, detail)))
        held[name] |= cascade
    return out


def _held_doses_that_may_be_first_or_last(ex: pd.DataFrame, exyn: pd.Series, held: pd.Series,
                                          subjects: pd.Series) -> pd.DataFrame:
    """Held-back ex.csv records of `subjects` (enrolled, otherwise good) that may be the first or
    last dose given, or the final planned one (recorded given or not, it ends the treatment epoch):
    RFSTDTC, every --DY and EPOCH, ACTARM and the end of treatment would be derived without them,
    as definite but wrong values. A held-back dose between two mapped ones, or one that reads as
    not given before the final visit, cannot move them and holds back only itself. A record under
    another site's SUBJID is that site's error, not the subject's."""
    own_site = ex["SUBJID"].str.slice(0, 2).eq(as_text(ex["src_site"])).fillna(False).astype(bool)
    order = scheduled_visit_number(ex["VISIT"])
    table = schedule()
    final = order.eq(float(table.loc[table["dose"], "visitnum"].max()))
    not_given = exyn.eq("N").fillna(False).astype(bool)
    candidate = held & own_site & in_set(ex["SUBJID"], subjects) & (~not_given | final)
    if not candidate.any():
        return ex.iloc[:0]
    given = ~held & exyn.eq("Y").fillna(False)
    span = order[given].groupby(ex.loc[given, "SUBJID"]).agg(["min", "max"])
    rows, position = ex[candidate.to_numpy()], order[candidate]
    first, last = lookup(rows["SUBJID"], span["min"]), lookup(rows["SUBJID"], span["max"])
    return rows[(position.isna() | first.isna() | (position <= first) | (position >= last)).to_numpy()]


def _death_without_fatal_ae(mrs: pd.DataFrame, ae: pd.DataFrame) -> pd.DataFrame:
    """An mRS of 6 (dead) should agree with DM.DTHFL (sdtm-reference section 4), which follows
    the AEs (AESDTH = Y or AEOUT = FATAL): reported, never derived from the score."""
    fatal = (codelists.recode(ae["AESDTH"], "NY").eq("Y") | ae["AEOUT"].eq("FATAL")).fillna(False).astype(bool)
    dead = pd.to_numeric(mrs["MRSSCORE"], errors="coerce").eq(6) & ~in_set(mrs["SUBJID"], ae.loc[fatal, "SUBJID"])
    return findings.for_rows("RAW-MRS-DEATH", mrs[dead.to_numpy()], value=mrs.loc[dead.to_numpy(), "SUBJID"])


def held_back_rows(frame: pd.DataFrame, file_findings: pd.DataFrame) -> pd.Series:
    """True for the rows of `frame` that have an ERROR finding (matched on site, transfer, row:
    two sites may export at the same second)."""
    errors = file_findings[(file_findings["SEVERITY"] == "ERROR") & file_findings["ROW"].notna()]
    if errors.empty:
        return pd.Series(False, index=frame.index)
    keys = pd.MultiIndex.from_arrays([errors["SITEID"].fillna("").astype("str"), errors["TRANSFER"].astype("str"),
                                      errors["ROW"].astype("int64")])
    coordinates = pd.MultiIndex.from_arrays([as_text(frame["src_site"]).fillna(""),
                                             as_text(frame["src_transfer"]), frame["src_row"].astype("int64")])
    return pd.Series(coordinates.isin(keys), index=frame.index)


def rows_where(frame: pd.DataFrame, keep: pd.Series) -> pd.DataFrame:
    """`frame[keep]`, without copying every column when every row is kept (the usual night)."""
    return frame if keep.all() else frame[keep.to_numpy()]


def validate_raw(raw: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Validated frames (records without ERROR findings) and every finding, for the six files.

    Records with the wrong number of fields were reported at ingest and are not validated.

    Subject-level data must be whole: a subject whose dm.csv or enrol.csv record is held back
    or missing is held back everywhere (RAW-SUBJECT-HELD), with the reason, so that no SDTM
    record can point to a subject missing from DM; so is a subject with a held-back dose that
    may be its first or last, from which every study day and epoch is derived.
    """
    known = raw["dm"]["SUBJID"]
    by_file, held = {}, {}
    for name in metadata.RAW_FILES:
        ragged = raw[name]["src_ragged"]
        by_file[name] = validate_file(name, rows_where(raw[name], ~ragged), known if name != "dm" else None)
        held[name] = ragged | held_back_rows(raw[name], by_file[name])
    dm, enrol = raw["dm"], raw["enrol"]

    enrolled_subjects = enrol.loc[~held["enrol"], "SUBJID"]
    no_enrol = ~held["dm"] & ~in_set(dm["SUBJID"], enrol["SUBJID"])
    extra = [findings.for_rows("RAW-ENROL-MISSING", dm[no_enrol], value=dm.loc[no_enrol, "SUBJID"])]
    enrol_held = ~held["dm"] & ~no_enrol & ~in_set(dm["SUBJID"], enrolled_subjects)
    extra.append(findings.for_rows("RAW-SUBJECT-HELD", dm[enrol_held], value=dm.loc[enrol_held, "SUBJID"],
                                   detail="its enrol.csv record is held back"))
    held["dm"] |= no_enrol | enrol_held

    good_subjects = dm.loc[~held["dm"], "SUBJID"]
    extra += _hold_back_subjects(raw, held, dm.loc[~in_set(dm["SUBJID"], good_subjects).to_numpy(), "SUBJID"],
                                 "its dm.csv or enrol.csv record is held back")

    ex = raw["ex"]
    enrolment = enrol[~held["enrol"]].drop_duplicates("SUBJID").set_index("SUBJID")
    enrolled_flag = ex["SUBJID"].map(enrolment["ENRLFL"])
    exyn = codelists.recode(ex["EXYN"], "NY")
    given = exyn.eq("Y").fillna(False)
    not_enrolled = ~held["ex"] & given & codelists.recode(enrolled_flag, "NY").ne("Y").fillna(False)
    extra.append(findings.for_rows("RAW-DOSE-NOT-ENROLLED", ex[not_enrolled], value=ex.loc[not_enrolled, "SUBJID"],
                                   detail=enrolled_flag[not_enrolled]))
    held["ex"] |= not_enrolled
    # Blinded kits carry no dose (spec, ex.csv KITNO). The value is named in no message: it may
    # differ between the arms.
    expansion = codelists.recode(ex["SUBJID"].map(enrolment["PHASE"]), "PHASE").eq("EXPANSION").fillna(False)
    dose_on_kit = ~held["ex"] & expansion & ex["EXDOSE"].notna()
    extra.append(findings.for_rows("RAW-EXPANSION-DOSE", ex[dose_on_kit], column="EXDOSE"))
    extra.append(_death_without_fatal_ae(raw["mrs"][~held["mrs"]], raw["ae"][~held["ae"]]))
    enrolled = enrolment.index[codelists.recode(enrolment["ENRLFL"], "NY").eq("Y").fillna(False).to_numpy()]
    moving = _held_doses_that_may_be_first_or_last(ex, exyn, held["ex"], good_subjects[in_set(good_subjects, enrolled)])
    if len(moving):
        rows = moving.sort_values("src_row")["src_row"].astype("str")
        extra += _hold_back_subjects(raw, held, moving["SUBJID"], (
            "its dose record at ex.csv row " + rows.groupby(moving["SUBJID"]).agg(", ".join) + " is held back and "
            "may be its first or last dose, or the final planned one, on which its reference dates, study days "
            "and epochs depend"))
    validated = {name: rows_where(raw[name], ~held[name]) for name in metadata.RAW_FILES}
    coordinates = ["src_site", "src_transfer", "src_file", "src_row"]
    held_rows = pd.concat([raw[name].loc[held[name].to_numpy(), coordinates] for name in metadata.RAW_FILES],
                          ignore_index=True)
    return validated, findings.note_held_back(findings.combine([*by_file.values(), *extra]), held_rows)
