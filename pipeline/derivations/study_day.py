"""--DY: study day of a date relative to the subject's reference start (DM.RFSTDTC).

SDTMIG 3.4 section 4.4.4: day 1 is the reference start date, the day before it is -1, there is
no day 0; null when either date is partial or missing. Times are ignored.
"""

from __future__ import annotations

import pandas as pd

from pipeline.derivations.distinct_values import on_distinct_rows
from pipeline.derivations.iso_dates import date_part


@on_distinct_rows
def study_day(dtc: pd.Series, reference_dtc: pd.Series) -> pd.Series:
    """Study day (Int64) of each ISO date/datetime against the reference ISO date/datetime."""
    delta = (date_part(dtc) - date_part(reference_dtc)).dt.days
    days = delta.where(delta < 0, delta + 1)
    return days.astype("Int64")
