"""--LOBXFL: last observation before exposure (SDTMIG 3.4; --BLFL is kept only for 3.3 readers).

Per subject and test (plus any grouping such as the CSF specimen), the flag goes on the last record
with a result (ORRES present, STAT not NOT DONE) whose date/time is on or before the first
dose (RFXSTDTC). When both carry a time they compare as datetimes; a date-only record on the
day of the first dose counts as pre-dose (sampling precedes dosing on Day 1). Partial dates
cannot be placed and never carry the flag.
"""

from __future__ import annotations

import pandas as pd

from pipeline.derivations.iso_dates import date_part, is_complete_date


def last_observation_before_exposure(
    frame: pd.DataFrame, dtc: str, reference_dtc: str, has_result: pd.Series, group: list[str]
) -> pd.Series:
    """"Y" on the qualifying record of each group, null elsewhere."""
    when = frame[dtc]
    ref = frame[reference_dtc]
    both_times = when.str.len().gt(10).fillna(False) & ref.str.len().gt(10).fillna(False)
    before_by_time = both_times & (when <= ref)
    before_by_date = ~both_times & (date_part(when) <= date_part(ref)).fillna(False)
    eligible = has_result & is_complete_date(when) & (before_by_time | before_by_date)

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
