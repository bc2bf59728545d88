"""Site dates and times to ISO 8601, partial dates kept partial, nothing imputed.

Sites write `DD MMM YYYY` (CDASH: `07 MAR 2026`, unknown parts `UN` / `UNK`) or ISO
`YYYY-MM-DD`, `YYYY-MM`, `YYYY`, mixed within one file. SDTM gets right-truncated ISO 8601:
`UN MAR 2026` -> `2026-03`, `UN UNK 2026` -> `2026`; a known day in an unknown month cannot be
written by truncation and keeps the year only (SDTMIG 3.4 section 4.4.4). Impossible dates
(31 FEB, month 13) are not dates: they come back null, and validation reports them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.derivations.distinct_values import on_distinct_rows, on_distinct_values, parsed_once

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
YEAR_RANGE = (1900, 2100)

# ASCII digits only ([0-9], not \d, which also matches Arabic-Indic or full-width digits) and \Z,
# not $ (which also matches before a trailing newline).
_CDASH = r"^(?P<day>[0-9]{2}|UN) (?P<month>" + "|".join(MONTHS) + r"|UNK) (?P<year>[0-9]{4})\Z"
_ISO = r"^(?P<year>[0-9]{4})(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2}))?)?\Z"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"


@on_distinct_values
@parsed_once
def site_date_to_iso(values: pd.Series) -> pd.Series:
    """ISO 8601 date (complete or right-truncated) for each site date; null when not a valid date."""
    cdash = values.str.extract(_CDASH)
    iso = values.str.extract(_ISO)
    cdash_month = cdash["month"].map({m: f"{i:02d}" for i, m in enumerate(MONTHS, start=1)})
    year = cdash["year"].fillna(iso["year"])
    month = cdash_month.where(cdash["year"].notna(), iso["month"])
    day = cdash["day"].replace("UN", pd.NA).where(cdash["year"].notna(), iso["day"])
    # A known day in an unknown month cannot be expressed by truncation: keep the year.
    day = day.where(month.notna())

    year_number = pd.to_numeric(year, errors="coerce")
    month_number = pd.to_numeric(month, errors="coerce")
    valid = year_number.between(*YEAR_RANGE) & (month.isna() | month_number.between(1, 12))
    full = year.str.cat([month, day], sep="-")
    full_ok = pd.to_datetime(full, format="%Y-%m-%d", errors="coerce").notna()
    valid &= day.isna() | full_ok

    result = year.where(month.isna(), year + "-" + month)
    result = result.where(day.isna(), full)
    return result.where(valid & year.notna()).astype("str")


@on_distinct_values
@parsed_once
def is_site_time(values: pd.Series) -> pd.Series:
    """True where the text is an HH:MM 24-hour time."""
    return values.str.fullmatch(_TIME).astype("boolean")


def is_complete_date(iso: pd.Series) -> pd.Series:
    """True where an ISO date (or datetime) has year, month and day."""
    return iso.str.len().ge(10).fillna(False).astype(bool)


def iso_datetime(date_iso: pd.Series, time_text: pd.Series | None = None) -> pd.Series:
    """`YYYY-MM-DDThh:mm` where the date is complete and a valid time was collected, else the date.

    A time on a partial date is not representable in ISO 8601 and is left out (validation warns).
    """
    if time_text is None:
        return date_iso
    return _with_time(date_iso, time_text)


@on_distinct_rows
def _with_time(date_iso: pd.Series, time_text: pd.Series) -> pd.Series:
    with_time = is_complete_date(date_iso) & is_site_time(time_text).fillna(False).astype(bool)
    return date_iso.where(~with_time, date_iso + "T" + time_text)


@on_distinct_values
@parsed_once
def date_part(iso: pd.Series) -> pd.Series:
    """The calendar date of complete ISO dates/datetimes as datetime64; NaT when partial or null."""
    return pd.to_datetime(iso.str.slice(0, 10).where(is_complete_date(iso)), format="%Y-%m-%d", errors="coerce")


def partial_date_bounds(iso: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The first and last calendar day (`YYYY-MM-DD`) a date may be: `2026-07` is 2026-07-01 to
    2026-07-31, `2025` the whole year, a complete date itself. For comparisons only: the bounds
    are never written as a date (nothing imputed)."""
    year = iso.str.slice(0, 4)
    month = iso.str.slice(5, 7).where(iso.str.len().ge(7) & iso.str.slice(4, 5).eq("-"))
    known = month.str.fullmatch(r"0[1-9]|1[0-2]").fillna(False).astype(bool)
    unreadable = month.notna() & month.ne("--") & ~known        # `2026---15`: the month is not known
    month = month.where(known)
    first = pd.to_datetime(year + "-" + month.fillna("01") + "-01", format="%Y-%m-%d", errors="coerce")
    first = first.where(~unreadable)
    last = (first + pd.offsets.MonthEnd(0)).where(month.notna(), first + pd.offsets.YearEnd(0))
    complete = is_complete_date(iso)
    text = lambda days: days.dt.strftime("%Y-%m-%d").astype("str")  # noqa: E731
    return (text(first).where(~complete, iso.str.slice(0, 10)), text(last).where(~complete, iso.str.slice(0, 10)))


@on_distinct_rows
def compare_partial(left: pd.Series, right: pd.Series) -> pd.Series:
    """-1, 0 or 1 comparing two ISO dates at their common precision; null if either is null.

    `2026-03` vs `2026-03-15` compare equal (cannot tell), `2026-02` vs `2026-03-15` is before.
    """
    left_date = left.str.slice(0, 10)
    right_date = right.str.slice(0, 10)
    common = np.minimum(left_date.str.len().fillna(0), right_date.str.len().fillna(0)).astype(int)
    left_cut = _truncate(left_date, common)
    right_cut = _truncate(right_date, common)
    result = pd.Series(np.sign((left_cut > right_cut).astype(int) - (left_cut < right_cut).astype(int)),
                       index=left.index, dtype="Int64")
    return result.where(left.notna() & right.notna())


def narrowed_bound(bound: pd.Series, date: pd.Series, known: pd.Series, later: bool) -> pd.Series:
    """A partial date's first (`later`) or last possible day moved to a known date where that is
    tighter (a partial first dose is on or before the earliest complete one; ISO text compares in
    time order); a complete date keeps its own."""
    tighter = (known > bound) if later else (known < bound)
    use = (date.notna() & ~is_complete_date(date) & tighter.fillna(False)).astype(bool)
    return bound.where(~use, known)


def certainly_ordered(left: pd.Series, right: pd.Series, order: int) -> np.ndarray:
    """Positions where `left` is certainly before (`order` -1) or after (1) `right`, at their
    common precision. Text order is necessary for it (`2026-02` < `2026-02-27`), so the exact
    comparison runs on the few rows that pass it: on a million-row column, almost none."""
    text = (left < right) if order < 0 else (left > right)
    candidates = np.flatnonzero(text.fillna(False).to_numpy(dtype=bool))
    if candidates.size:
        exact = compare_partial(left.iloc[candidates], right.iloc[candidates]).eq(order).fillna(False)
        candidates = candidates[exact.to_numpy(dtype=bool)]
    return candidates


def may_be_extreme(iso: pd.Series, groups: pd.Series, latest: bool) -> pd.Series:
    """True where a date may be its group's earliest (or `latest`) one: no other date of the group
    is certainly before (after) it. `2026-08-10` is certainly before a dose on `2026-08-11`, so a
    swapped Day 1 and Day 2 dose cannot make the later one the first; `2026-02` is not certainly
    before or after `2026-02-17T09:10`, so both stay (and the caller's tiebreak, the visit
    order, decides). Compares the bounds only: nothing is imputed."""
    complete = is_complete_date(iso)
    first_day, last_day = partial_date_bounds(iso)
    earliest = iso.where(complete, first_day)
    timed = complete & iso.str.len().gt(10)
    latest_time = iso.where(timed, last_day + "T99")      # a date alone is any time of its day
    unknown = earliest.isna() | latest_time.isna()        # an unreadable bound cannot be ruled out
    if latest:
        return unknown | (latest_time >= earliest.groupby(groups).transform("max")).fillna(False).astype(bool)
    return unknown | (earliest <= latest_time.groupby(groups).transform("min")).fillna(False).astype(bool)


def _truncate(values: pd.Series, lengths: pd.Series) -> pd.Series:
    out = values.copy()
    for length in (4, 7, 10):
        mask = lengths == length
        out = out.where(~mask, values.str.slice(0, length))
    return out.fillna("")
