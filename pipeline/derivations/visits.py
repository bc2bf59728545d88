"""VISITNUM / VISIT from the schedule, unscheduled visit numbering, and EPOCH.

Unscheduled visits get the VISITNUM of the subject's previous scheduled visit (by date) plus
0.01, 0.02 ... per distinct unscheduled date, computed once across all domains so that a lab
draw and an mRS on the same unscheduled day share one VISITNUM (SDTMIG 3.4 section 4.4.5).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import metadata
from pipeline.derivations.distinct_values import on_distinct_rows, on_distinct_values
from pipeline.derivations.iso_dates import date_part, is_complete_date, narrowed_bound, partial_date_bounds


def schedule() -> pd.DataFrame:
    return pd.DataFrame(metadata.visits()["visits"])


@on_distinct_values
def scheduled_visit_number(visit: pd.Series) -> pd.Series:
    """VISITNUM of a scheduled visit name (float64); NaN for UNSCHEDULED or unknown names."""
    table = schedule()
    return visit.map(dict(zip(table["visit"], table["visitnum"].astype(float)))).astype("float64")


def is_known_visit(visit: pd.Series, dosing_only: bool = False) -> pd.Series:
    table = schedule()
    names = set(table.loc[table["dose"], "visit"] if dosing_only else table["visit"])
    if not dosing_only:
        names.add(metadata.visits()["unscheduled"]["visit"])
    return visit.isin(names)


def unscheduled_visit_numbers(visits: pd.DataFrame) -> pd.DataFrame:
    """One row per (SUBJID, unscheduled date) with its VISITNUM.

    `visits` holds SUBJID, VISIT and DTC (ISO) for every dated record of every domain.
    """
    unscheduled_name = metadata.visits()["unscheduled"]["visit"]
    increment = metadata.visits()["unscheduled"]["increment"]
    dated = visits.assign(DATE=date_part(visits["DTC"])).dropna(subset=["DATE"])
    scheduled = dated.assign(VISITNUM=scheduled_visit_number(dated["VISIT"])).dropna(subset=["VISITNUM"])
    anchors = (
        scheduled.groupby(["SUBJID", "VISITNUM"], as_index=False)["DATE"].min()
        .sort_values(["DATE", "SUBJID", "VISITNUM"])
    )
    # The previous scheduled visit is the latest-numbered one that took place on or before.
    anchors["VISITNUM"] = anchors.groupby("SUBJID")["VISITNUM"].cummax()
    extra = (
        dated.loc[dated["VISIT"] == unscheduled_name, ["SUBJID", "DATE"]]
        .drop_duplicates().sort_values(["DATE", "SUBJID"])
    )
    if extra.empty:
        return pd.DataFrame({"SUBJID": pd.Series(dtype="str"), "DATE": pd.Series(dtype="datetime64[us]"),
                             "VISITNUM": pd.Series(dtype="float64")})
    placed = pd.merge_asof(extra, anchors, on="DATE", by="SUBJID", direction="backward")
    placed["VISITNUM"] = placed["VISITNUM"].fillna(0.0)
    placed = placed.sort_values(["SUBJID", "DATE"])
    rank = placed.groupby(["SUBJID", "VISITNUM"]).cumcount() + 1
    placed["VISITNUM"] = np.round(placed["VISITNUM"] + increment * rank, 2)
    return placed[["SUBJID", "DATE", "VISITNUM"]].reset_index(drop=True)


def visit_number(subjid: pd.Series, visit: pd.Series, dtc: pd.Series, unscheduled: pd.DataFrame) -> pd.Series:
    """VISITNUM for each record: from the schedule, or from the unscheduled visit table."""
    scheduled = scheduled_visit_number(visit)
    keys = pd.DataFrame({"SUBJID": subjid.to_numpy(), "DATE": date_part(dtc).to_numpy()})
    found = keys.merge(unscheduled, on=["SUBJID", "DATE"], how="left")["VISITNUM"].to_numpy()
    is_unscheduled = visit == metadata.visits()["unscheduled"]["visit"]
    return scheduled.where(~is_unscheduled, pd.Series(found, index=visit.index)).astype("float64")


@on_distinct_rows
def visit_name(visit: pd.Series, visitnum: pd.Series) -> pd.Series:
    """The schedule name, or `UNSCHEDULED 8.01` (unique per VISITNUM) for unscheduled visits;
    the raw `UNSCHEDULED` as it is where no VISITNUM could be derived (a partial date)."""
    hundredths = (visitnum * 100).round().astype("Int64")
    label = (hundredths // 100).astype("str") + "." + (hundredths % 100).astype("str").str.zfill(2)
    unscheduled = metadata.visits()["unscheduled"]
    named = unscheduled["name"].split("{")[0] + label
    is_unscheduled = visit == unscheduled["visit"]
    return visit.where(~is_unscheduled, named.where(visitnum.notna(), visit)).astype("str")


@on_distinct_rows
def epoch(dtc: pd.Series, first_dose: pd.Series, last_dose: pd.Series, dosing_complete: pd.Series,
          first_dose_by: pd.Series | None = None, last_dose_from: pd.Series | None = None,
          pre_dose_on_first_dose_day: bool = False) -> pd.Series:
    """SCREENING before the first dose, TREATMENT up to the last dose of a completed dosing
    period (or onwards while dosing continues), FOLLOW-UP after.

    On the first-dose day, an event is TREATMENT (an AE of that day may follow the dose) unless
    its time is before the dose's; a finding is SCREENING (the schedule samples and scores before
    dosing on Day 1), unless its time is after the dose's: a sample at the dose's minute is
    pre-dose, as the baseline flag ("on or before the first dose") takes it.

    A partial date (of the record or of a dose) gets the epoch of every day it may be (`2025`
    before the first dose is SCREENING); null when those days span two epochs (SDTMIG: null only
    when unresolvable). The epoch moves forward with the record's date and back with the doses',
    so the earliest and latest it can be are its value at the extreme bounds. A partial first
    dose was on or before `first_dose_by` and a partial last dose on or after `last_dose_from`
    (the subject's earliest and latest complete dose dates, when given), which narrows them.
    """
    out = _epoch_of_dates(dtc, first_dose, last_dose, dosing_complete, pre_dose_on_first_dose_day)
    partial = pd.concat([s.notna() & ~is_complete_date(s) for s in (dtc, first_dose, last_dose)], axis=1).any(axis=1)
    if partial.any():
        (dtc_lo, dtc_hi), (first_lo, first_hi), (last_lo, last_hi) = (
            _bounds(s[partial]) for s in (dtc, first_dose, last_dose))
        complete = dosing_complete[partial]
        if first_dose_by is not None:
            first_hi = narrowed_bound(first_hi, first_dose[partial], first_dose_by[partial], later=False)
            last_lo = narrowed_bound(last_lo, last_dose[partial], last_dose_from[partial], later=True)
        earliest = _epoch_of_dates(dtc_lo, first_hi, last_hi, complete, pre_dose_on_first_dose_day)
        latest = _epoch_of_dates(dtc_hi, first_lo, last_lo, complete, pre_dose_on_first_dose_day)
        out[partial] = earliest.where(earliest == latest)
    return out


def _bounds(iso: pd.Series) -> tuple[pd.Series, pd.Series]:
    """A complete date as it is (its time counts); a partial one as its first and last day."""
    first, last = partial_date_bounds(iso)
    complete = is_complete_date(iso)
    return iso.where(complete, first), iso.where(complete, last)


def _epoch_of_dates(dtc: pd.Series, first_dose: pd.Series, last_dose: pd.Series, dosing_complete: pd.Series,
                    pre_dose_on_first_dose_day: bool) -> pd.Series:
    """The epoch of complete dates (the epoch only moves forward in time); null for the others."""
    names = metadata.visits()["epochs"]
    when = date_part(dtc)
    first = date_part(first_dose)
    last = date_part(last_dose)
    both_times = dtc.str.len().gt(10).fillna(False) & first_dose.str.len().gt(10).fillna(False)
    first_day = when == first
    if pre_dose_on_first_dose_day:     # findings: pre-dose unless their time is after the dose's
        before_first = (when < first) | (first_day & ~(both_times & (dtc > first_dose).fillna(False)))
    else:                              # events: after the dose unless their time is before it
        before_first = (when < first) | (first_day & both_times & (dtc < first_dose).fillna(False))
    after_last = dosing_complete.fillna(False).astype(bool) & (when > last)
    out = pd.Series(names["first_to_last_dose"], index=dtc.index, dtype="str")
    out = out.where(~after_last.fillna(False), names["after_last_dose"])
    out = out.where(~(before_first.fillna(False) | first.isna()), names["before_first_dose"])
    return out.where(is_complete_date(dtc))
