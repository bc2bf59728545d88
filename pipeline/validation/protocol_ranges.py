"""Protocol ranges from the registry record (schemas/protocol.yaml) as Pandera checks.

Evaluated on the mapped data in standard units for ENROLLED subjects (screen failures are
expected to miss criteria): a breach is a WARNING: the record is mapped and the deviation
reported at the raw row that carries the value. Eligibility breaches also form the
eligibility-deviation listing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa

from pipeline import findings, metadata
from pipeline.derivations.distinct_values import in_set, lookup
from pipeline.derivations.iso_dates import certainly_ordered, partial_date_bounds, site_date_to_iso
from pipeline.derivations.lab_unit_conversions import (censored_beyond, censored_parts, format_number,
                                                        significant)
from pipeline.derivations.sequence import sort_by_keys
from pipeline.derivations.visits import schedule
from pipeline.validation.pandera_failures import placed_failures

SCREENING = "SCREENING"
LISTING_COLUMNS = ["USUBJID", "SITEID", "RULE", "CRITERION", "OBSERVED", "TRANSFER", "FILE", "ROW"]


@dataclass
class ProtocolCheck:
    item: dict
    frame: str                                   # which prepared frame it looks at
    breach: Callable[[pd.DataFrame], pd.Series]  # True where the protocol is not met
    observed: Callable[[pd.DataFrame], pd.Series]


def _fmt(values: pd.Series) -> pd.Series:
    return format_number(values).fillna("")


def as_reported(limit: pd.Series) -> pd.Series:
    """A computed limit at the precision of LBSTRESN: a result of exactly 1.5 x ULN is not above it."""
    return pd.Series(significant(limit), index=limit.index)


def _lab_checks(item: dict) -> ProtocolCheck:
    test, kind = item["test"], item["kind"]

    def rows(f):
        return f["LBTESTCD"].eq(test)

    def limit(f, base_key, anticoag_key):
        base = pd.Series(float(item.get(base_key, np.nan)), index=f.index)
        if anticoag_key in item:
            base = base.where(~f["ctx_anticoag"].eq("Y").fillna(False), float(item[anticoag_key]))
        return base

    def beyond(f, low, high):
        """A number past the limit, or a censored result (`<0.5`) whose bound is past it."""
        below, above = censored_beyond(f["ctx_censored_operator"], f["ctx_censored_bound"], low, high)
        return (f["LBSTRESN"] < low).fillna(False) | below, (f["LBSTRESN"] > high).fillna(False) | above

    no_limit = np.nan
    if kind == "lab_min":
        breach = lambda f: rows(f) & beyond(f, limit(f, "min", "min_on_anticoagulant"), no_limit)[0]  # noqa: E731
    elif kind == "lab_max":
        breach = lambda f: rows(f) & beyond(f, no_limit, limit(f, "max", "max_on_anticoagulant"))[1]  # noqa: E731
    elif kind == "lab_max_uln":
        breach = lambda f: rows(f) & beyond(  # noqa: E731
            f, no_limit, as_reported(limit(f, "max_uln", "max_uln_on_anticoagulant") * f["LBSTNRHI"]))[1]
    elif kind == "lab_negative":
        breach = lambda f: rows(f) & f["LBSTRESC"].eq("POSITIVE")  # noqa: E731
    elif kind == "hbv_core_with_dna":
        def breach(f):
            # Above the upper limit of quantification (`>1.7E8`) is detected too; `<LLOQ` is not.
            above = f["ctx_censored_operator"].isin([">", ">="]).fillna(False).astype(bool)
            detectable = f["LBTESTCD"].eq(item["dna_test"]) & ((f["LBSTRESN"] > 0).fillna(False) | above)
            with_dna = f.loc[detectable.fillna(False), "USUBJID"]
            return rows(f) & f["LBSTRESC"].eq("POSITIVE") & in_set(f["USUBJID"], with_dna)
    else:
        raise ValueError(f"unknown lab criterion kind {kind}")

    def observed(f):
        value = f["LBSTRESC"].fillna("") + " " + f["LBSTRESU"].fillna("")
        uln = np.where(f["LBSTNRHI"].notna(), " (ULN " + _fmt(f["LBSTNRHI"]) + ")", "")
        anticoag = np.where(f["ctx_anticoag"].eq("Y").fillna(False), ", on anticoagulant", "")
        return "screening " + f["LBTESTCD"] + " = " + value.str.strip() + uln + anticoag

    return ProtocolCheck(item, "lb", lambda f: breach(f).fillna(False).astype(bool), observed)


def build_checks() -> list[ProtocolCheck]:
    config = metadata.protocol()
    checks = []
    for item in config["eligibility"]:
        kind = item["kind"]
        if kind == "range":
            checks.append(ProtocolCheck(
                item, item["source"],
                lambda f, i=item: ~pd.to_numeric(f[i["column"]], errors="coerce").between(i["min"], i["max"]).fillna(True),
                lambda f, i=item: i["column"] + " = " + f[i["column"]].astype("str")))
        elif kind == "mrs":
            def breach(f, i=item):
                selected = _of_mrstype(f, i["mrstype"])
                low = f["QSSTRESN"] < i.get("min", -np.inf)
                high = f["QSSTRESN"] > i.get("max", np.inf)
                return (selected & (low | high)).fillna(False)
            checks.append(ProtocolCheck(item, "qs", breach, lambda f, i=item: (
                "screening " + ("pre-morbid" if i["mrstype"] == "PRE-MORBID" else "current") + " mRS = "
                + f["QSORRES"].astype("str"))))
        elif kind == "diagnosis_delay":
            def breach(f, i=item):
                # Partial dates count only when every day they may be breaks the limit (nothing imputed):
                # the earliest diagnosis after the latest onset plus the allowed months.
                latest_onset = partial_date_bounds(site_date_to_iso(f["ONSETDAT"]))[1]
                earliest_diagnosis = partial_date_bounds(site_date_to_iso(f["DIAGDAT"]))[0]
                allowed = pd.to_datetime(latest_onset, format="%Y-%m-%d", errors="coerce") + pd.DateOffset(months=i["max_months"])
                return (pd.to_datetime(earliest_diagnosis, format="%Y-%m-%d", errors="coerce") > allowed).fillna(False)
            checks.append(ProtocolCheck(item, "enrol", breach, lambda f: (
                "onset " + site_date_to_iso(f["ONSETDAT"]).fillna("?") + ", diagnosis "
                + site_date_to_iso(f["DIAGDAT"]).fillna("?"))))
        elif kind == "antibody_positive":
            checks.append(ProtocolCheck(
                item, "enrol_antibody", lambda f: ~f["ctx_antibody_positive"],
                lambda f, i=item: pd.Series("no positive " + " / ".join(i["tests"]) + " result at screening"
                                            " in SDTM LB (records held back are not counted: see the quarantine)",
                                            index=f.index)))
        else:
            checks.append(_lab_checks(item))
    checks.append(ProtocolCheck(
        {"rule": "PROT-NOT-EVALUABLE", "criterion": "Lab and mRS eligibility criteria"}, "enrol",
        lambda f: f["ctx_not_evaluable"].notna(), lambda f: (
            "not all can be evaluated: no screening value in SDTM for " + f["ctx_not_evaluable"]
            + " (records held back are not counted: see the quarantine)")))
    for item in config["conduct"]:
        if item["kind"] == "visit_window":
            checks.append(ProtocolCheck(item, f"{item['source']}_visits", lambda f, i=item: _outside_window(f, i["day"]),
                                        lambda f, i=item: _window_observed(f, i["day"], i["record"])))
        elif item["kind"] == "before_consent":
            checks.append(ProtocolCheck(item, "dm_consent", lambda f: f["ctx_before_consent"].notna(), lambda f: (
                "informed consent on " + f["RFICDTC"].astype("str") + ", after " + f["ctx_before_consent"])))
        elif item["kind"] == "cohort_dose":
            checks.append(ProtocolCheck(item, "ex", _wrong_cohort_dose, lambda f: (
                "cohort " + f["ctx_cohort"].astype("str") + " dose " + _fmt(f["EXDOSE"]) + " particles, planned "
                + _fmt(f["ctx_planned_dose"]))))
    return checks


def _of_mrstype(qs: pd.DataFrame, mrstype: str) -> pd.Series:
    """The mRS records of one MRSTYPE: PRE-MORBID ones carry QSEVINTX, CURRENT ones none."""
    pre = qs["QSEVINTX"].eq("PRE-MORBID").fillna(False).astype(bool)
    return pre if mrstype == "PRE-MORBID" else ~pre


def _needed(item: dict) -> str | None:
    """What a lab or mRS criterion reads at screening; None for the criteria that need nothing
    more than their own record (age, dates) or report a missing result themselves (antibodies)."""
    kind = item["kind"]
    if kind == "mrs":
        return f"{item['mrstype'].lower()} mRS"
    if kind == "lab_max_uln":
        return f"{item['test']} with the lab's ULN"
    if kind in ("lab_min", "lab_max", "lab_negative"):
        return item["test"]
    return None


def _not_evaluable(subjects: pd.Series, lb_screening: pd.DataFrame, qs_screening: pd.DataFrame) -> pd.Series:
    """Per subject, the screening values its lab and mRS criteria need and SDTM lacks (a result
    held back or never sent, an ULN criterion without the lab's upper limit, an mRS not done), as
    one text; null when every criterion can be evaluated. One finding per subject, not per test."""
    missing: dict[str, pd.Series] = {}
    for item in metadata.protocol()["eligibility"]:
        needed = _needed(item)
        if needed is None or needed in missing:
            continue
        if item["kind"] == "mrs":
            kept = _of_mrstype(qs_screening, item["mrstype"]) & qs_screening["QSSTRESN"].notna()
            with_value = qs_screening.loc[kept.to_numpy(), "USUBJID"]
        else:
            kept = lb_screening["LBTESTCD"].eq(item["test"]) & lb_screening["LBSTRESC"].notna()
            if item["kind"] == "lab_max_uln":
                kept &= lb_screening["LBSTNRHI"].notna()
            with_value = lb_screening.loc[kept.fillna(False).to_numpy(), "USUBJID"]
        missing[needed] = ~in_set(subjects, with_value)
    text = pd.Series("", index=subjects.index, dtype="str")
    for needed, lacking in missing.items():
        text = text + np.where(lacking, needed + ", ", "")
    return text.str.removesuffix(", ").replace("", None)


def _window(visit: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The first and last study day of each record's scheduled visit; NaN for UNSCHEDULED, which
    has no window."""
    table = schedule()
    bounds = pd.DataFrame(table["window"].tolist(), index=table["visit"], dtype="float64")
    return lookup(visit, bounds[0]), lookup(visit, bounds[1])


def _outside_window(f: pd.DataFrame, day: str) -> pd.Series:
    days, (low, high) = f[day].astype("float64"), _window(f["VISIT"])
    return ((days < low) | (days > high)).fillna(False).astype(bool)


def _window_observed(f: pd.DataFrame, day: str, record: str) -> pd.Series:
    low, high = (bound.astype("Int64").astype("str") for bound in _window(f["VISIT"]))
    return f["VISIT"] + f" {record} on study day " + f[day].astype("str") + "; window " + low + " to " + high


def _wrong_cohort_dose(f: pd.DataFrame) -> pd.Series:
    return (f["ctx_phase"].eq("ESCALATION") & f["EXDOSE"].notna()
            & ~np.isclose(f["EXDOSE"].astype("float64"), f["ctx_planned_dose"].astype("float64"))).fillna(False)


def prepare_frames(dm: pd.DataFrame, lb: pd.DataFrame, qs: pd.DataFrame, ex: pd.DataFrame,
                   enrol: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The enrolled subjects' records each criterion looks at, with subject facts joined."""
    enrolled = dm[dm["ARMNRS"].ne("SCREEN FAILURE").fillna(True)]
    subject = enrolled.set_index("USUBJID")
    facts = ["ctx_anticoag", "ctx_phase", "ctx_cohort", "SITEID"]

    def with_facts(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[in_set(frame["USUBJID"], subject.index)].copy()
        for column in facts:
            frame[column] = lookup(frame["USUBJID"], subject[column])
        return frame

    planned = {str(row["cohort"]): float(row["dose"]) for row in metadata.arms()["escalation"]}
    ex_frame = with_facts(ex)
    ex_frame["ctx_planned_dose"] = ex_frame["ctx_cohort"].map(planned).astype("float64")
    lb_screening = with_facts(lb[lb["VISIT"].eq(SCREENING)])
    lb_screening["ctx_censored_operator"], lb_screening["ctx_censored_bound"] = censored_parts(lb_screening["LBSTRESC"])
    enrol_frame = enrol.assign(USUBJID=metadata.study()["usubjid_prefix"] + enrol["SUBJID"])
    enrol_frame = with_facts(enrol_frame)
    antibody_tests = [i for i in metadata.protocol()["eligibility"] if i["kind"] == "antibody_positive"]
    tests = [test for item in antibody_tests for test in item["tests"]]
    hits = lb_screening["LBTESTCD"].isin(tests) & lb_screening["LBNRIND"].eq("ABNORMAL")
    enrol_antibody = enrol_frame.assign(
        ctx_antibody_positive=in_set(enrol_frame["USUBJID"], lb_screening.loc[hits.fillna(False), "USUBJID"]))
    qs_screening = qs[qs["VISIT"].eq(SCREENING)]
    enrol_frame["ctx_not_evaluable"] = _not_evaluable(enrol_frame["USUBJID"], lb_screening, qs_screening)
    # Every dose, sample and assessment (a screen failure's have no study day: no window to miss),
    # with only the columns the window check reads, not a copy of a million-row LB.
    coordinates = ["USUBJID", "VISIT", "src_site", "src_transfer", "src_file", "src_row"]
    by_source = {"ex": ex, "lb": lb, "qs": qs}
    visits = {f"{i['source']}_visits": by_source[i["source"]][[*coordinates, i["day"]]]
              for i in metadata.protocol()["conduct"] if i["kind"] == "visit_window"}
    # Consent binds every subject, screen failures first of all (screening is where it is missed).
    consent = [i for i in metadata.protocol()["conduct"] if i["kind"] == "before_consent"]
    consented = {"dm_consent": dm.assign(ctx_before_consent=_before_consent(dm, by_source, consent[0]["records"]))
                 } if consent else {}
    return {"dm": with_facts(dm), "lb": lb_screening, "qs": with_facts(qs_screening),
            "ex": ex_frame, "enrol": enrol_frame, "enrol_antibody": enrol_antibody, **visits, **consented}


def _before_consent(dm: pd.DataFrame, by_source: dict[str, pd.DataFrame], records: dict) -> pd.Series:
    """Per subject, how many doses, samples and assessments are dated before its informed consent
    (at their common precision: only what is certainly before) and the earliest of them; one
    finding per subject, as a wrong consent date would otherwise repeat on every record."""
    consent = dm.set_index("USUBJID")["RFICDTC"]
    parts = []
    for source, (column, record) in records.items():
        frame = by_source[source]
        before = certainly_ordered(frame[column], lookup(frame["USUBJID"], consent), -1)
        hits = frame[["USUBJID", column, "src_file", "src_row"]].iloc[before].set_axis(
            ["USUBJID", "DTC", "FILE", "ROW"], axis=1)
        parts.append(hits.assign(RECORD=record))
    hits = sort_by_keys(pd.concat(parts, ignore_index=True).astype({"FILE": "str"}), ["USUBJID", "DTC", "FILE", "ROW"])
    # Counted per kind: one blood draw is some twenty lab results, not twenty procedures.
    counts = hits.groupby(["USUBJID", "RECORD"], sort=True).size()
    kinds = (counts.astype("str") + " " + counts.index.get_level_values("RECORD") + np.where(counts > 1, "s", "")
             ).groupby(level="USUBJID").agg(", ".join)
    first = hits.drop_duplicates("USUBJID").set_index("USUBJID")
    text = (kinds.reindex(first.index) + " dated before it; the earliest: " + first["RECORD"] + " on "
            + first["DTC"] + " (" + first["FILE"] + " row " + first["ROW"].astype("str") + ")")
    return lookup(dm["USUBJID"], text.astype("str"))



def evaluate(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(protocol findings, eligibility-deviation listing)."""
    checks = build_checks()
    out, listing = [], []
    for name, frame in frames.items():
        mine = [(i, c) for i, c in enumerate(checks) if c.frame == name]
        if not mine or frame.empty:
            continue
        schema = pa.DataFrameSchema(checks=[
            pa.Check(lambda f, c=c: ~c.breach(f), name=f"{c.item['rule']}#{i}", ignore_na=False) for i, c in mine])
        try:
            schema.validate(frame, lazy=True)
            continue
        except pa.errors.SchemaErrors as errors:
            cases = placed_failures(errors, f"protocol ranges on {name}").drop_duplicates(subset=["check", "index"])
        for i, check in mine:
            hit = cases.loc[cases["check"] == f"{check.item['rule']}#{i}", "index"].astype(int).unique()
            if not len(hit):
                continue
            rows = frame.loc[np.sort(hit)]
            detail = check.item["criterion"] + ": " + check.observed(rows) + " (" + rows["USUBJID"] + ")"
            out.append(findings.for_rows(check.item["rule"], _with_subjid(rows), detail=detail))
            if check.item in metadata.protocol()["eligibility"]:
                listing.append(pd.DataFrame({
                    "USUBJID": rows["USUBJID"].to_numpy(), "SITEID": rows["SITEID"].to_numpy(),
                    "RULE": check.item["rule"], "CRITERION": check.item["criterion"],
                    "OBSERVED": check.observed(rows).to_numpy(),
                    "TRANSFER": rows["src_transfer"].astype("str").to_numpy(),
                    "FILE": rows["src_file"].astype("str").to_numpy(),
                    "ROW": rows["src_row"].to_numpy()}))
    listing_frame = (pd.concat(listing, ignore_index=True) if listing
                     else pd.DataFrame({c: pd.Series(dtype="str") for c in LISTING_COLUMNS}))
    listing_frame["ROW"] = listing_frame["ROW"].astype("Int64")
    listing_frame = sort_by_keys(listing_frame.astype({c: "str" for c in LISTING_COLUMNS if c != "ROW"}),
                                 ["USUBJID", "RULE", "CRITERION", "TRANSFER", "FILE", "ROW"])
    return findings.combine(out), listing_frame


def _with_subjid(rows: pd.DataFrame) -> pd.DataFrame:
    prefix = metadata.study()["usubjid_prefix"]
    return rows.assign(SUBJID=rows["USUBJID"].str.removeprefix(prefix))
