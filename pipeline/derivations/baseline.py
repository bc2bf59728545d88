"""--LOBXFL: last observation before exposure (SDTMIG 3.4; --BLFL is kept only for 3.3 readers).

Per subject and test (plus any grouping such as the CSF specimen), the flag goes on the last record
with a result (ORRES present, STAT not NOT DONE) whose date/time is on or before the first
dose (RFXSTDTC). When both carry a time they compare as datetimes; a date-only record on the
day of the first dose counts as pre-dose (sampling precedes dosing on Day 1). Partial record
dates cannot be placed and never carry the flag. A partial first dose (`2026-04`) still places
the records before every day it may be: the last of them is flagged, unless a record of the
group falls within the dose's possible days, as it may be the real last one (nothing guessed).
"""

from __future__ import annotations

import pandas as pd

from pipeline.derivations.iso_dates import date_part, is_complete_date, narrowed_bound, partial_date_bounds


def last_observation_before_exposure(
    frame: pd.DataFrame, dtc: str, reference_dtc: str, has_result: pd.Series, group: list[str],
    reference_by: str | None = None,
) -> pd.Series:
    """"Y" on the qualifying record of each group, null elsewhere. `reference_by`: a column with
    a complete date the partial reference is on or before (the subject's earliest complete
    dose), which narrows its possible days as it does EPOCH's."""
    when = frame[dtc]
    ref = frame[reference_dtc]
    both_times = when.str.len().gt(10).fillna(False) & ref.str.len().gt(10).fillna(False)
    before_by_time = both_times & (when <= ref)
    before_by_date = ~both_times & (date_part(when) <= date_part(ref)).fillna(False)
    placed = has_result & is_complete_date(when)
    eligible = placed & (before_by_time | before_by_date)
    partial_reference = ref.notna() & ~is_complete_date(ref)
    if partial_reference.any():
        first_day, last_day = partial_date_bounds(ref[partial_reference])
        if reference_by is not None:
            by_day = frame.loc[partial_reference, reference_by].str.slice(0, 10)
            last_day = narrowed_bound(last_day, ref[partial_reference], by_day, later=False)
        day = when[partial_reference].str.slice(0, 10)
        eligible[partial_reference] = placed[partial_reference] & (day <= first_day).fillna(False)
        undecided = placed[partial_reference] & (day > first_day).fillna(False) & (day <= last_day).fillna(False)
        groups = frame.loc[partial_reference].groupby(group, sort=False, dropna=False).ngroup()
        blocked = undecided.groupby(groups).transform("any")
        eligible[partial_reference] &= ~blocked

    candidates = frame.loc[eligible, [*group, dtc]].copy()
    candidates["_order"] = candidates.index
    candidates = candidates.sort_values([*group, dtc, "_order"], kind="stable")
    last = candidates.groupby(group, sort=False, dropna=False).tail(1).index
    flag = pd.Series(pd.NA, index=frame.index, dtype="str")
    flag.loc[last] = "Y"
    return flag


def apart_values(values: pd.Series, apart: list[str]) -> pd.Series:
    """A grouping key that separates only the listed values: each of them is a group of its own,
    every other value and null share one. The reference keeps CSF antibodies apart from serum
    ones; a blood sample whose specimen the site left empty is still the same test's baseline."""
    return values.where(values.isin(apart))
