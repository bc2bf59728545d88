"""Table-driven tests of the derivation library: each case is worked out by hand from the
SDTMIG rule or the transfer spec, not produced by the code under test."""

import numpy as np
import pandas as pd
import pytest

from pipeline.derivations import codelists
from pipeline.derivations import lab_unit_conversions as labs
from pipeline.derivations.baseline import apart_values, last_observation_before_exposure
from pipeline.derivations.distinct_values import combined_rank, distinct_rows, in_set
from pipeline.derivations.dose_labels import dose_particles
from pipeline.derivations.iso_dates import (compare_partial, iso_datetime, is_site_time, may_be_extreme,
                                            partial_date_bounds, site_date_to_iso)
from pipeline.derivations.sequence import sequence_number, sort_by_keys
from pipeline.derivations.study_day import study_day
from pipeline.derivations.visits import epoch, unscheduled_visit_numbers, visit_name, visit_number


def values(series):
    return [None if pd.isna(v) else v for v in series]


@pytest.mark.parametrize("raw, iso", [
    ("07 MAR 2026", "2026-03-07"),
    ("2026-03-07", "2026-03-07"),
    ("UN MAR 2026", "2026-03"),          # unknown day: truncated, never imputed
    ("UN UNK 2026", "2026"),
    ("07 UNK 2026", "2026"),             # a day without a month cannot be written by truncation
    ("2026-03", "2026-03"),
    ("2026", "2026"),
    ("29 FEB 2024", "2024-02-29"),       # leap year
    ("29 FEB 2025", None),               # not a leap year
    ("31 FEB 2026", None),               # impossible date
    ("31 APR 2026", None),
    ("2026-13-02", None),                # month 13
    ("2026-00", None),
    ("07 Mar 2026", None),               # month must be English capitals
    ("7 MAR 2026", None),                # day is two digits
    ("UNK MAR 2026", None),              # unknown day is UN
    ("2026/03/07", None),
    ("1899", None),                      # outside the plausible years
    ("", None),
    (None, None),
])
def test_site_date_to_iso(raw, iso):
    assert values(site_date_to_iso(pd.Series([raw], dtype="str"))) == [iso]


@pytest.mark.parametrize("date, time, expected", [
    ("07 MAR 2026", "08:30", "2026-03-07T08:30"),
    ("2026-03-07", None, "2026-03-07"),
    ("UN MAR 2026", "08:30", "2026-03"),   # no time on a partial date
    ("2026-03-07", "24:00", "2026-03-07"),  # not a time
    ("2026-03-07", "8:30", "2026-03-07"),
])
def test_iso_datetime(date, time, expected):
    result = iso_datetime(site_date_to_iso(pd.Series([date])), pd.Series([time], dtype="str"))
    assert values(result) == [expected]


@pytest.mark.parametrize("text, ok", [("00:00", True), ("23:59", True), ("24:00", False), ("12:60", False),
                                      ("8:30", False), ("08:30:00", False)])
def test_is_site_time(text, ok):
    assert bool(is_site_time(pd.Series([text])).iloc[0]) is ok


@pytest.mark.parametrize("left, right, expected", [
    ("2026-03-05", "2026-03-07", -1),
    ("2026-03-07", "2026-03-07T08:00", 0),    # compared at the common (day) precision
    ("2026-02", "2026-03-15", -1),
    ("2026-03", "2026-03-15", 0),             # cannot tell
    ("2027", "2026-12-31", 1),
    (None, "2026", None),
])
def test_compare_partial(left, right, expected):
    assert values(compare_partial(pd.Series([left], dtype="str"), pd.Series([right], dtype="str"))) == [expected]


@pytest.mark.parametrize("dtc, reference, day", [
    ("2026-03-07", "2026-03-07", 1),           # the reference day is day 1
    ("2026-03-08T10:00", "2026-03-07T09:00", 2),
    ("2026-03-06", "2026-03-07", -1),           # no day 0
    ("2026-02-25", "2026-03-07", -10),
    ("2026-12-31", "2026-01-01", 365),
    ("2026-03", "2026-03-07", None),            # partial date: null
    ("2026-03-07", "2026-03", None),
    ("2026-03-07", None, None),                 # not treated
])
def test_study_day(dtc, reference, day):
    result = study_day(pd.Series([dtc], dtype="str"), pd.Series([reference], dtype="str"))
    assert values(result) == [day]


@pytest.mark.parametrize("label, particles", [
    ("2.5E10", 2.5e10), ("2.5e10", 2.5e10), ("25000000000", 2.5e10), ("2.5x10^10", 2.5e10),
    ("5.0E10", 5.0e10), ("1.0E11", 1.0e11), ("1x10^11", 1.0e11),
    ("2.5 E10", None), ("2,5E10", None), ("two", None), ("2.5X10^10", None), (None, None),
    ("5.0E+10", 5.0e10), ("2.5e+10", 2.5e10),         # the E notation of number formatters and the IWRS
    ("5.0E-10", None), ("5.0E++10", None), ("-5E10", None),
])
def test_dose_particles(label, particles):
    assert values(dose_particles(pd.Series([label], dtype="str"))) == [particles]


@pytest.mark.parametrize("codelist, raw, submission", [
    ("NY", "y", "Y"), ("NY", "Yes", "Y"), ("NY", "NO", "N"), ("NY", "maybe", None),
    ("SEX", "MALE", "M"), ("SEX", "F", "F"), ("SEX", "male", None),   # only Y/N fields are case-free
    ("RACE", "OTHER", "OTHER"),
])
def test_recode(codelist, raw, submission):
    assert values(codelists.recode(pd.Series([raw]), codelist)) == [submission]


@pytest.mark.parametrize("name, code", [
    ("ANC", "NEUT"), ("absolute neutrophil count", "NEUT"), ("Hb", "HGB"), ("HAEMOGLOBIN", "HGB"),
    ("SGPT", "ALT"), ("TBIL", "BILI"), ("aPTT", "APTT"), ("T. pallidum Ab", "TPALLAB"), ("HIV Ab", "HIV12AB"),
    ("Pregnancy test", "HCG"), ("anti-LGI1 Ab", "LGI1AB"), ("Ferritin", None),
])
def test_lab_test_code(name, code):
    assert values(labs.lab_test_code(pd.Series([name]))) == [code]


@pytest.mark.parametrize("code, orres, unit, lo, hi, stresc, stresn, stresu, stnrlo, stnrhi, nrind", [
    ("HGB", "12.3", "g/dL", "11.5", "15.0", "123", 123.0, "g/L", 115.0, 150.0, "NORMAL"),
    ("HGB", "130", "g/L", "115", "150", "130", 130.0, "g/L", 115.0, 150.0, "NORMAL"),
    ("NEUT", "1500", "/uL", "1800", "7700", "1.5", 1.5, "10^9/L", 1.8, 7.7, "LOW"),
    ("NEUT", "4.2", "10^3/uL", "1.8", "7.7", "4.2", 4.2, "10^9/L", 1.8, 7.7, "NORMAL"),
    ("BILI", "0.8", "mg/dL", "0.2", "1.2", "13.68", 13.68, "umol/L", 3.42, 20.52, "NORMAL"),
    ("CREAT", "1.0", "mg/dL", "0.6", "1.2", "88.4", 88.4, "umol/L", 53.04, 106.08, "NORMAL"),
    ("GLUC", "180", "mg/dL", "70", "110", "9.99", 9.99, "mmol/L", 3.885, 6.105, "HIGH"),
    ("ALT", "30", "IU/L", "0", "40", "30", 30.0, "U/L", 0.0, 40.0, "NORMAL"),
    ("APTT", "31.5", "s", "25", "35", "31.5", 31.5, "sec", 25.0, 35.0, "NORMAL"),
    ("INR", "1.1", None, "0.8", "1.2", "1.1", 1.1, None, 0.8, 1.2, "NORMAL"),
    ("NEUT", "<0.5", "10^9/L", None, None, "<0.5", None, "10^9/L", None, None, None),   # censored: text only
    # a censored result against the range: LOW/HIGH only where the bound settles it
    ("BILI", "<0.1", "mg/dL", "0.2", "1.2", "<1.71", None, "umol/L", 3.42, 20.52, "LOW"),
    ("BILI", "<0.2", "mg/dL", "0.2", "1.2", "<3.42", None, "umol/L", 3.42, 20.52, "LOW"),     # below the limit itself
    ("BILI", "<=0.2", "mg/dL", "0.2", "1.2", "<=3.42", None, "umol/L", 3.42, 20.52, None),  # may equal it
    ("BILI", "<1.7", "umol/L", "1.5", "20", "<1.7", None, "umol/L", 1.5, 20.0, None),      # low or normal
    ("ALT", ">200", "U/L", "0", "40", ">200", None, "U/L", 0.0, 40.0, "HIGH"),
    ("ALT", ">=40", "U/L", "0", "40", ">=40", None, "U/L", 0.0, 40.0, None),
    ("ALT", ">30", "U/L", "0", "40", ">30", None, "U/L", 0.0, 40.0, None),
    ("HBSAG", "Negative", None, None, None, "NEGATIVE", None, None, None, None, "NORMAL"),
    ("HIV12AB", "POSITIVE", None, None, None, "POSITIVE", None, None, None, None, "ABNORMAL"),
    ("NMDARAB", "1:32", None, None, None, "1:32", None, None, None, None, "ABNORMAL"),
    ("HBVDNA", "<LLOQ", "IU/mL", None, None, "<LLOQ", None, "IU/mL", None, None, None),
    ("HGB", None, None, None, None, None, None, None, None, None, None),                # not done
])
def test_standard_results(code, orres, unit, lo, hi, stresc, stresn, stresu, stnrlo, stnrhi, nrind):
    result = labs.standard_results(pd.Series([code]), pd.Series([orres], dtype="str"), pd.Series([unit], dtype="str"),
                                   pd.Series([lo], dtype="str"), pd.Series([hi], dtype="str")).iloc[0]
    assert (None if pd.isna(result["LBSTRESC"]) else result["LBSTRESC"]) == stresc
    for column, expected in [("LBSTRESN", stresn), ("LBSTNRLO", stnrlo), ("LBSTNRHI", stnrhi)]:
        assert (pd.isna(result[column]) and expected is None) or result[column] == pytest.approx(expected)
    assert (None if pd.isna(result["LBSTRESU"]) else result["LBSTRESU"]) == stresu
    assert (None if pd.isna(result["LBNRIND"]) else result["LBNRIND"]) == nrind


@pytest.mark.parametrize("code, unit, factor", [
    ("NEUT", "/uL", 0.001), ("HGB", "g/dL", 10.0), ("GLUC", "mg/dL", 0.0555), ("INR", None, 1.0),
    ("HGB", "mmol/L", None), ("NEUT", None, None),   # a unit is never guessed
])
def test_unit_factor(code, unit, factor):
    assert values(labs.unit_factor(pd.Series([code]), pd.Series([unit], dtype="str"))) == [factor]


def test_format_number_removes_float_noise():
    assert values(labs.format_number(pd.Series([0.1 + 0.2, 12.3 * 10, 1500 * 0.001, 0.0, -2.5, np.nan]))) == [
        "0.3", "123", "1.5", "0", "-2.5", None]


def test_sequence_after_sorting_by_keys():
    frame = pd.DataFrame({"USUBJID": ["B", "A", "A", "B"], "TESTCD": ["X", "Y", "X", "X"], "DTC": ["2", "1", "3", "1"]})
    ordered = sort_by_keys(frame, ["USUBJID", "TESTCD", "DTC"])
    assert list(zip(ordered["USUBJID"], ordered["TESTCD"], ordered["DTC"])) == [
        ("A", "X", "3"), ("A", "Y", "1"), ("B", "X", "1"), ("B", "X", "2")]
    assert values(sequence_number(ordered["USUBJID"])) == [1, 2, 1, 2]


@pytest.mark.parametrize("keys, expected_rows", [
    (["TEXT"], [2, 4, 0, 3, 1]),               # text ascending, nulls last, ties in input order
    (["TEXT", "NUMBER"], [4, 2, 3, 0, 1]),     # a second key breaks the ties; NaN sorts last
    (["EMPTY", "NUMBER"], [3, 4, 0, 2, 1]),    # a key with no value at all (every code is null)
    (["SITE", "NUMBER"], [4, 2, 1, 3, 0]),     # categorical: by the category text
])
def test_sort_by_keys_orders_codes_like_values(keys, expected_rows):
    frame = pd.DataFrame({
        "TEXT": pd.Series(["b", None, "a", "b", "a"], dtype="str"),
        "NUMBER": [2.0, np.nan, 3.0, 1.0, 1.5],
        "EMPTY": pd.Series([None] * 5, dtype="str"),
        "SITE": pd.Categorical(["02", "01", "01", "02", "01"]),
        "ROW": [0, 1, 2, 3, 4],
    })
    assert sort_by_keys(frame, keys)["ROW"].tolist() == expected_rows
    assert sort_by_keys(frame.iloc[:0], keys).empty


@pytest.mark.parametrize("columns, codes, first", [
    # SUBJID, VISIT, date of visit records: a repeated record is one combination, first seen first
    ([["001", "001", "002", "001"], ["V1", "V1", "V1", "V2"], ["2026-03-07"] * 4], [0, 0, 1, 2], [0, 2, 3]),
    # missing values equal each other and differ from every value
    ([["001", "001", "001", "001"], [None, "V1", None, None], [None, None, None, "2026-03-07"]], [0, 1, 0, 2], [0, 1, 3]),
    # the same texts in other columns are other combinations
    ([["001", "V1"], ["V1", "001"]], [0, 1], [0, 1]),
    ([[]], [], []),
])
def test_distinct_rows(columns, codes, first):
    combined, positions = distinct_rows([pd.Series(c, dtype="str") for c in columns])
    assert combined.tolist() == codes and positions.tolist() == first


def _chunked(texts):
    """Arrow-backed text in two chunks, as pd.concat of two sites' columns gives."""
    half = len(texts) // 2
    return pd.concat([pd.Series(texts[:half], dtype="str"), pd.Series(texts[half:], dtype="str")], ignore_index=True)


@pytest.mark.parametrize("members", [
    pd.Series(["03-001", "03-002", "03-002", None], dtype="str"),   # duplicates and a null member
    pd.Index(["03-002", "03-001"]),
    pd.Series(["03-001", "03-002"], dtype="object"),
    _chunked(["03-001", None, "03-002", "03-002"]),
])
@pytest.mark.parametrize("make_values", [lambda t: pd.Series(t, dtype="str"), _chunked,
                                         lambda t: pd.Series(t, dtype="object")])
def test_in_set(members, make_values):
    subjects = make_values(["03-001", None, "03-003", "03-002", "3-001", "03-001 "])
    subjects.index = subjects.index + 10
    found = in_set(subjects, members)
    assert found.dtype == bool and list(found.index) == list(subjects.index)
    # A missing subject is never a member, even when a member is missing; matching is exact.
    assert found.tolist() == [True, False, False, True, False, False]


def test_in_set_with_no_members():
    assert in_set(pd.Series(["03-001", None], dtype="str"), pd.Series([], dtype="str")).tolist() == [False, False]


@pytest.mark.parametrize("bounds", [
    [3],                                   # one key
    [2, 5, 7],                             # small keys: one mixed-radix number
    [601] * 9,                             # 601**9 > 2**62: renumbered densely on the way
    [601, 1, 601, 601, 1] * 3,             # keys without values (bound 1) among them
])
def test_combined_rank_orders_like_lexsort(bounds):
    """A key's rank is below its bound, and a bound is at most the row count plus one (null)."""
    generator = np.random.default_rng(7)
    ranks = [(generator.integers(0, b, 600), b) for b in bounds]
    expected = np.lexsort([r for r, _ in ranks][::-1])
    assert np.array_equal(np.argsort(combined_rank(ranks), kind="stable"), expected)


def test_baseline_flag_last_result_on_or_before_first_dose():
    frame = pd.DataFrame({
        "USUBJID": ["A"] * 5 + ["B"],
        "TESTCD": ["HGB"] * 5 + ["HGB"],
        "DTC": ["2026-02-25", "2026-03-07T08:00", "2026-03-07T10:00", "2026-03", "2026-03-08", "2026-03-07"],
        "REF": ["2026-03-07T09:00"] * 5 + ["2026-03-07T09:00"],
    })
    has_result = pd.Series([True, True, True, True, True, True])
    flag = last_observation_before_exposure(frame, "DTC", "REF", has_result, ["USUBJID", "TESTCD"])
    # A: the 08:00 pre-dose sample, not the 10:00 post-dose one, never the partial date.
    # B: a date-only sample on the first-dose day counts as pre-dose.
    assert values(flag) == [None, "Y", None, None, None, "Y"]


def test_baseline_flag_with_a_partial_first_dose_places_what_it_can():
    """A first dose dated `2026-04` removed every baseline flag of its subject: a sample of
    2026-03-31 is before every day the dose may be. A sample within April may be the real last
    one, so its group gets no flag; after April is after the dose."""
    rows = [("A", "2026-03-31", "2026-04"), ("A", "2026-04-10", "2026-04"),            # blocked
            ("B", "2026-03-20", "2026-04"), ("B", "2026-03-31", "2026-04"), ("B", "2026-05-02", "2026-04"),
            ("C", "2026-04-01", "2026-04"),                                              # its first day
            ("D", "2025-12-31", "2026"), ("D", "2026-01-02", "2026"),                    # blocked
            ("E", "2025-12-31", "2026"), ("E", "2027-01-01", "2026"),
            ("F", "2026-03-31", "2026-04-03"), ("F", "2026-04-10", "2026-04-03")]        # complete: as before
    frame = pd.DataFrame(rows, columns=["USUBJID", "DTC", "REF"]).assign(TESTCD="HGB")
    flag = last_observation_before_exposure(frame, "DTC", "REF", pd.Series(True, index=frame.index),
                                            ["USUBJID", "TESTCD"])
    assert values(flag) == [None, None, None, "Y", None, "Y", None, None, "Y", None, "Y", None]


def test_baseline_flag_with_a_partial_first_dose_narrowed_by_a_complete_dose():
    """A Day 1 dose `UN FEB 2026` with the Day 2 dose on 02-05: the first dose was on or before
    02-05, so samples of 02-10 and 02-13 are after it and do not block the 01-30 baseline (EPOCH
    called them TREATMENT while the flag waited on them)."""
    frame = pd.DataFrame({"USUBJID": "A", "TESTCD": "HGB", "DTC": ["2026-01-30", "2026-02-10", "2026-02-13"],
                          "REF": "2026-02", "BY": "2026-02-05T11:50"})
    has_result = pd.Series(True, index=frame.index)
    assert values(last_observation_before_exposure(frame, "DTC", "REF", has_result, ["USUBJID", "TESTCD"],
                                                   reference_by="BY")) == ["Y", None, None]
    assert values(last_observation_before_exposure(frame, "DTC", "REF", has_result, ["USUBJID", "TESTCD"])) == [
        None, None, None]                                    # without the bound: 02-10 may be before the dose
    frame.loc[1, "DTC"] = "2026-02-04"                       # before the Day 2 dose: may be before the first
    assert values(last_observation_before_exposure(frame, "DTC", "REF", has_result, ["USUBJID", "TESTCD"],
                                                   reference_by="BY")) == [None, None, None]


def test_baseline_flag_skips_records_without_result():
    frame = pd.DataFrame({"USUBJID": ["A", "A"], "TESTCD": ["HGB", "HGB"], "DTC": ["2026-03-01", "2026-03-05"],
                          "REF": ["2026-03-07", "2026-03-07"]})
    flag = last_observation_before_exposure(frame, "DTC", "REF", pd.Series([True, False]), ["USUBJID", "TESTCD"])
    assert values(flag) == ["Y", None]


def test_unscheduled_visit_numbers_follow_previous_visit_by_date():
    visits = pd.DataFrame({
        "SUBJID": ["01-001"] * 6,
        "VISIT": ["SCREENING", "DAY 1", "DAY 7", "UNSCHEDULED", "UNSCHEDULED", "UNSCHEDULED"],
        "DTC": ["2026-02-25", "2026-03-07", "2026-03-13", "2026-03-10", "2026-03-11", "2026-03-10"],
    })
    table = unscheduled_visit_numbers(visits)
    assert sorted(zip(table["DATE"].dt.strftime("%Y-%m-%d"), table["VISITNUM"])) == [
        ("2026-03-10", 2.01), ("2026-03-11", 2.02)]
    number = visit_number(pd.Series(["01-001", "01-001"]), pd.Series(["UNSCHEDULED", "DAY 7"]),
                          pd.Series(["2026-03-11T10:00", "2026-03-13"]), table)
    assert values(number) == [2.02, 8.0]
    assert values(visit_name(pd.Series(["UNSCHEDULED", "DAY 7"]), number)) == ["UNSCHEDULED 2.02", "DAY 7"]
    partial = visit_number(pd.Series(["01-001"]), pd.Series(["UNSCHEDULED"]), pd.Series(["2026-03"]), table)
    assert values(partial) == [None]
    assert values(visit_name(pd.Series(["UNSCHEDULED"]), partial)) == ["UNSCHEDULED"]   # kept, not lost


@pytest.mark.parametrize("iso, earliest, latest", [
    ("2026-07", "2026-07-01", "2026-07-31"),
    ("2024-02", "2024-02-01", "2024-02-29"),          # leap year
    ("2026-02", "2026-02-01", "2026-02-28"),
    ("2025", "2025-01-01", "2025-12-31"),
    ("2026---15", "2026-01-01", "2026-12-31"),        # day known, month not: the year
    ("2026-03-07", "2026-03-07", "2026-03-07"),
    ("2026-03-07T09:00", "2026-03-07", "2026-03-07"),
    ("2026-13", None, None),
    (None, None, None),
])
def test_partial_date_bounds(iso, earliest, latest):
    first, last = partial_date_bounds(pd.Series([iso], dtype="str"))
    assert (values(first), values(last)) == ([earliest], [latest])


@pytest.mark.parametrize("dates, earliest, latest", [
    # complete dates: exactly the earliest and the latest (ties both)
    (["2026-08-11T09:00", "2026-08-10T09:00", "2026-08-12"], [False, True, False], [False, False, True]),
    (["2026-08-10T09:00", "2026-08-10T09:00"], [True, True], [True, True]),
    # a date alone is any time of its day: not certainly before or after a dose that day
    (["2026-08-10", "2026-08-10T09:00", "2026-08-11T08:00"], [True, True, False], [False, False, True]),
    # a partial date overlapping the first dose's day may be the earliest, one certainly later may not
    (["2026-02-17T09:10", "2026-02", "2026-03-03"], [True, True, False], [False, False, True]),
    (["2026-02-17T09:10", "2026-03", "2026"], [True, False, True], [False, True, True]),
    # the year alone overlaps everything; an unreadable bound is kept (cannot be ruled out)
    (["2025", "2026-01-05"], [True, False], [False, True]),
    (["2026-13", "2026-01-05"], [True, True], [True, True]),
])
def test_may_be_extreme(dates, earliest, latest):
    """A date may be the earliest (latest) unless another is certainly before (after) it."""
    iso, groups = pd.Series(dates, dtype="str"), pd.Series(["01-001"] * len(dates))
    assert may_be_extreme(iso, groups, latest=False).tolist() == earliest
    assert may_be_extreme(iso, groups, latest=True).tolist() == latest
    # per group: another subject's dates do not rule a date out
    other = pd.Series(["1999-01-01", "2099-01-01"], dtype="str")
    both = pd.concat([iso, other], ignore_index=True)
    assert may_be_extreme(both, pd.Series(["01-001"] * len(dates) + ["01-002"] * 2), latest=False).tolist()[:len(dates)] == earliest


@pytest.mark.parametrize("dtc, first, last, complete, expected", [
    ("2026-02-25", "2026-03-07", "2026-04-04", "Y", "SCREENING"),
    ("2026-03-07T08:00", "2026-03-07T09:00", "2026-04-04", "Y", "SCREENING"),   # pre-dose on day 1
    ("2026-03-07", "2026-03-07T09:00", "2026-04-04", "Y", "TREATMENT"),         # date only: the dosing day
    ("2026-03-07T09:00", "2026-03-07T09:00", "2026-04-04", "Y", "TREATMENT"),   # an event at the dose's minute
    ("2026-04-04", "2026-03-07", "2026-04-04", "Y", "TREATMENT"),
    ("2026-04-10", "2026-03-07", "2026-04-04", "Y", "FOLLOW-UP"),
    ("2026-03-20", "2026-03-07", "2026-03-13", None, "TREATMENT"),               # dosing not finished yet
    ("2026-03-20", None, None, None, "SCREENING"),                                # never treated
    ("2026-03", "2026-03-07", "2026-04-04", "Y", None),                           # partial, spans two epochs
    ("2026-04", "2026-03-07", "2026-04-04", "Y", None),                           # last-dose month
    ("2026-02", "2026-03-07", "2026-04-04", "Y", "SCREENING"),                    # partial, all before dosing
    ("2025", "2026-03-07T09:00", "2026-04-04", "Y", "SCREENING"),
    ("2026-05", "2026-03-07", "2026-04-04", "Y", "FOLLOW-UP"),                    # all after the last dose
    ("2026-05", "2026-03-07", "2026-04-04", None, "TREATMENT"),                   # dosing not finished yet
    ("2026-03", "2026-02-20", "2026-04-04", "Y", "TREATMENT"),                    # inside the treatment
    ("2026-02", "2026-02-01", "2026-04-04", "Y", "TREATMENT"),                    # events: day 1 is TREATMENT
    ("2026-02", "2026-02-02", "2026-04-04", "Y", None),                           # the first-dose day is in it
    ("2026", "2026-03-07", "2026-04-04", "Y", None),
    ("2026-03", None, None, None, "SCREENING"),                                   # never treated
    ("2026-13", "2026-03-07", "2026-04-04", "Y", None),                           # not a month: no bounds
    # a partial dose date: the record's epoch is whatever day the dose was, or null
    ("2026-05-02", "2026-03-07", "2026-04", "Y", "FOLLOW-UP"),                    # after any day of April
    ("2026-04-20", "2026-03-07", "2026-04", "Y", None),                           # the last dose may be later
    ("2026-03-20", "2026-03-07", "2026-04", "Y", "TREATMENT"),                    # before any day of April
    ("2026-03-20", "2026-03", "2026-04-04", "Y", None),                           # the first dose may be later
    ("2026-04-01", "2026-03", "2026-04-04", "Y", "TREATMENT"),                    # after any day of March
    ("2026-02-27", "2026-03", "2026-04-04", "Y", "SCREENING"),
    ("2026-04", "2026-03", "2026-04-04", "Y", None),                              # both partial
])
def test_epoch(dtc, first, last, complete, expected):
    """A partial date gets an epoch only when every day it may be has the same one (SDTMIG)."""
    result = epoch(pd.Series([dtc], dtype="str"), pd.Series([first], dtype="str"), pd.Series([last], dtype="str"),
                   pd.Series([complete == "Y"]))
    assert values(result) == [expected]


@pytest.mark.parametrize("dtc, first, expected", [
    ("2026-03-07", "2026-03-07T09:00", "SCREENING"),       # a Day 1 score without a time: pre-dose
    ("2026-03-07T08:00", "2026-03-07", "SCREENING"),       # the dose without a time
    ("2026-03-07T10:00", "2026-03-07T09:00", "TREATMENT"),  # both times: compared
    ("2026-03-07T09:00", "2026-03-07T09:00", "SCREENING"),  # at the dose's minute: pre-dose, as baseline
    ("2026-03-08", "2026-03-07T09:00", "TREATMENT"),
    ("2026-03-06", "2026-03-07", "SCREENING"),
    ("2026-03", "2026-03-31", "SCREENING"),                 # every day of it is on or before the first dose
    ("2026-03", "2026-03-30", None),
])
def test_epoch_of_findings_on_the_first_dose_day(dtc, first, expected):
    """Findings follow the baseline flag's rule: on the first-dose day, a record without a time
    (or a dose without one) is pre-dose."""
    result = epoch(pd.Series([dtc], dtype="str"), pd.Series([first], dtype="str"),
                   pd.Series(["2026-04-04"], dtype="str"), pd.Series([True]), pre_dose_on_first_dose_day=True)
    assert values(result) == [expected]


@pytest.mark.parametrize("dtc, first, last, by, since, expected", [
    # last dose (Day 28) partial, Day 21 given complete on 04-24: a Day 7 / Day 14 sample is treatment
    ("2026-04-08", "2026-04-03T09:00", "2026-04", "2026-04-03T09:00", "2026-04-24T11:15", "TREATMENT"),
    ("2026-04-15", "2026-04-03T09:00", "2026-04", "2026-04-03T09:00", "2026-04-24T11:15", "TREATMENT"),
    ("2026-04-24", "2026-04-03T09:00", "2026-04", "2026-04-03T09:00", "2026-04-24T11:15", "TREATMENT"),
    ("2026-04-30", "2026-04-03T09:00", "2026-04", "2026-04-03T09:00", "2026-04-24T11:15", None),   # either side
    ("2026-05-02", "2026-04-03T09:00", "2026-04", "2026-04-03T09:00", "2026-04-24T11:15", "FOLLOW-UP"),
    ("2026-04-08", "2026-04-03T09:00", "2026-04", None, None, None),            # without the bounds, as before
    # first dose (Day 1) partial, Day 2 given complete on 04-04: Day 7 is treatment, 03-31 screening
    ("2026-04-10", "2026-04", "2026-05-01", "2026-04-04T09:00", "2026-05-01", "TREATMENT"),
    ("2026-04-05", "2026-04", "2026-05-01", "2026-04-04T09:00", "2026-05-01", "TREATMENT"),
    ("2026-04-02", "2026-04", "2026-05-01", "2026-04-04T09:00", "2026-05-01", None),
    ("2026-03-31", "2026-04", "2026-05-01", "2026-04-04T09:00", "2026-05-01", "SCREENING"),
    # a complete dose keeps its own date even if another dose is dated out of order
    ("2026-04-20", "2026-04-03", "2026-04-18", "2026-04-01", "2026-04-25", "FOLLOW-UP"),
])
def test_epoch_with_a_partial_dose_date_narrowed_by_the_complete_ones(dtc, first, last, by, since, expected):
    """A partial Day 28 dose nulled EPOCH on Day 7 and Day 14 records, although complete doses on
    later days prove they are treatment; the subject's complete dose dates narrow the partial one."""
    text = lambda v: pd.Series([v], dtype="str")   # noqa: E731
    result = epoch(text(dtc), text(first), text(last), pd.Series([True]), text(by), text(since),
                   pre_dose_on_first_dose_day=True)
    assert values(result) == [expected]


@pytest.mark.parametrize("value, key", [
    ("CEREBROSPINAL FLUID", "CEREBROSPINAL FLUID"), ("SERUM", None), ("BLOOD", None), (None, None),
])
def test_apart_values_separate_only_the_listed_values(value, key):
    out = apart_values(pd.Series([value], dtype="str"), ["CEREBROSPINAL FLUID"])
    assert values(out) == [key]


@pytest.mark.parametrize("code, result, unit, known", [
    ("HBVDNA", "<LLOQ", None, True),      # no number, so no unit needed
    ("HBVDNA", "1500", None, False),      # a number without its unit is never given IU/mL
    ("HBVDNA", "<20", None, False),       # a censored number needs its unit as well
    ("HBVDNA", "1500", "IU/mL", True),
    ("HBVDNA", "1500", "copies/mL", False),
    ("INR", "1.1", None, True),           # INR is reported without a unit
    ("HGB", "135", None, False),
])
def test_a_unit_is_known_only_where_listed_or_not_needed(code, result, unit, known):
    kinds = labs.parse_result(pd.Series([result], dtype="str"))["kind"]
    assert values(labs.unit_is_known(pd.Series([code]), pd.Series([unit], dtype="str"), kinds)) == [known]


@pytest.mark.parametrize("left, right, before, after", [
    ("2026-02-28", "2026-03-01", True, False), ("2026-02", "2026-02-27", False, False),
    ("2026-01", "2026-02-27", True, False), ("2026-03-01T08:00", "2026-03-01", False, False),
    ("2027", "2026-12-31", False, True), ("2026-12", "2026-12-02", False, False), (None, "2026-01-01", False, False),
])
def test_certainly_ordered_at_the_common_precision(left, right, before, after):
    from pipeline.derivations.iso_dates import certainly_ordered

    pair = pd.Series([left], dtype="str"), pd.Series([right], dtype="str")
    assert (len(certainly_ordered(*pair, -1)), len(certainly_ordered(*pair, 1))) == (int(before), int(after))
