"""Protocol ranges at their limits, on small mapped frames: the expected breaches come from the
spec's wording ("> 1.5 x ULN", "within 3 months of onset", "HBcAb positive with detectable HBV
DNA"), worked out by hand or in exact decimal arithmetic, never from the code under test."""

from decimal import Decimal

import pandas as pd
import pytest

from pipeline.validation.protocol_ranges import evaluate, prepare_frames


def coordinates(n: int, file: str) -> dict:
    return {"src_site": ["01"] * n, "src_transfer": ["20261123T220005"] * n, "src_file": [file] * n,
            "src_row": list(range(1, n + 1))}


def subjects(n: int, anticoagulant: list[str] | None = None) -> pd.DataFrame:
    ids = [f"MESAE-01-{i:03d}" for i in range(1, n + 1)]
    return pd.DataFrame({"USUBJID": ids, "SITEID": "01", "ARMNRS": pd.Series([None] * n, dtype="str"),
                         "ctx_anticoag": anticoagulant or ["N"] * n, "ctx_phase": "ESCALATION", "ctx_cohort": "1",
                         "AGE": 40, "RFICDTC": "2026-02-20", **coordinates(n, "dm.csv")})


def screening_labs(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["VISIT"] = "SCREENING"
    for column in ["LBSTRESC", "LBSTRESU", "LBNRIND"]:
        frame[column] = frame.get(column, pd.Series([None] * len(frame))).astype("str")
    frame["LBSTRESN"] = pd.to_numeric(frame["LBSTRESC"], errors="coerce")
    frame["LBSTNRHI"] = frame.get("LBSTNRHI", pd.Series([None] * len(frame))).astype("float64")
    frame["LBDY"] = pd.array([-3] * len(frame), dtype="Int64")
    return frame.assign(**coordinates(len(frame), "lb.csv"))


def no_records(day: str, **columns) -> pd.DataFrame:
    return pd.DataFrame({"USUBJID": pd.Series(dtype="str"), "VISIT": pd.Series(dtype="str"),
                         day: pd.Series(dtype="Int64"), **{c: pd.Series(dtype="str") for c in columns},
                         **{c: pd.Series(dtype="str") for c in ["src_site", "src_transfer", "src_file"]},
                         "src_row": pd.Series(dtype="int64")})


def dated(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The record's --DTC, undated where a case does not need it."""
    return frame if column in frame else frame.assign(**{column: pd.Series([None] * len(frame), dtype="str",
                                                                           index=frame.index)})


def run(dm: pd.DataFrame, frame: str, lb=None, qs=None, enrol=None, ex=None) -> pd.DataFrame:
    """The findings of the checks on one of prepare_frames' frames."""
    frames = prepare_frames(
        dm, dated(no_records("LBDY", LBTESTCD=1, LBSTRESC=1, LBNRIND=1, LBSTNRHI=1) if lb is None else lb, "LBDTC"),
        dated(no_records("QSDY", QSEVINTX=1, QSSTRESN=1) if qs is None else qs, "QSDTC"),
        dated(no_records("EXSTDY") if ex is None else ex, "EXSTDTC"),
        pd.DataFrame({"SUBJID": pd.Series(dtype="str")}) if enrol is None else enrol)
    return evaluate({frame: frames[frame]})[0]


ULN_CASES = [   # test, ULN, result, on anticoagulant, factor (site-export-spec.md section 1)
    ("BILI", "17.2", "25.8", "N", "1.5"), ("BILI", "17.2", "25.81", "N", "1.5"),
    ("CREAT", "97.24", "145.86", "N", "1.5"), ("CREAT", "97.24", "145.87", "N", "1.5"),
    ("CREAT", "15.2", "22.8", "N", "1.5"), ("CREAT", "20.4", "30.6", "N", "1.5"),
    ("APTT", "36.4", "54.6", "Y", "1.5"), ("APTT", "36.4", "54.61", "Y", "1.5"),
    ("APTT", "36.4", "45.5", "N", "1.25"), ("APTT", "36.4", "45.51", "N", "1.25"),
    ("AST", "40", "100", "N", "2.5"), ("ALT", "50", "125.1", "N", "2.5"),
]


def test_a_result_exactly_at_a_multiple_of_the_uln_is_not_above_it():
    dm = subjects(len(ULN_CASES), [c[3] for c in ULN_CASES])
    lb = screening_labs([{"USUBJID": s, "LBTESTCD": t, "LBSTNRHI": uln, "LBSTRESC": result}
                         for s, (t, uln, result, _, _) in zip(dm["USUBJID"], ULN_CASES)])
    found = run(dm, "lb", lb=lb)
    expected = {row for row, (_, uln, result, _, factor) in enumerate(ULN_CASES, start=1)
                if Decimal(result) > Decimal(factor) * Decimal(uln)}
    assert set(found.loc[found["RULE"] == "PROT-LAB", "ROW"]) == expected
    assert expected == {2, 4, 8, 10, 12}   # the table above has a breach just past each limit


HBV_CASES = [   # HBcAb, HBV DNA (LBSTRESC), excluded?
    ("POSITIVE", ">170000000", True),   # above the upper limit of quantification: detected
    ("POSITIVE", ">=170000000", True),
    ("POSITIVE", "25", True),
    ("POSITIVE", "<20", False),         # below the lower limit of quantification
    ("POSITIVE", "<LLOQ", False),
    ("POSITIVE", "0", False),
    ("NEGATIVE", ">170000000", False),
    ("POSITIVE", None, False),
]


def test_hbcab_positive_with_hbv_dna_above_quantification_is_an_exclusion():
    dm = subjects(len(HBV_CASES))
    rows = []
    for subject, (core, dna, _) in zip(dm["USUBJID"], HBV_CASES):
        rows += [{"USUBJID": subject, "LBTESTCD": "HBCAB", "LBSTRESC": core},
                 {"USUBJID": subject, "LBTESTCD": "HBVDNA", "LBSTRESC": dna, "LBSTRESU": "IU/mL"}]
    found = run(dm, "lb", lb=screening_labs(rows))
    flagged = set(found.loc[found["RULE"] == "PROT-SEROLOGY", "ROW"])
    assert flagged == {2 * i + 1 for i, case in enumerate(HBV_CASES) if case[2]}   # the HBcAb rows


DELAY_CASES = [   # onset, diagnosis (as sites write them), certainly more than 3 months apart?
    ("2026-07-19", "2026-10-19", False), ("2026-07-19", "20 OCT 2026", True),
    ("2026-06", "2026-09-30", False),    # onset may be 30 JUN
    ("2026-06", "2026-10-03", True),     # even from 30 JUN, 3 months end on 30 SEP
    ("UN JUN 2026", "03 OCT 2026", True),
    ("2026", "2027-03-31", False), ("UN UNK 2026", "2027-04-01", True),
    ("2026-06-15", "2026-09", False), ("2026-06-15", "2026-10", True),
    ("2026-11-30", "2027-02-28", False), ("2026-11-30", "2027-03-01", True),
    ("", "2027-03-01", False), ("2026-06", "", False),
]


@pytest.mark.parametrize("onset, diagnosis, breach", DELAY_CASES)
def test_diagnosis_delay_with_partial_dates_counts_only_certain_breaches(onset, diagnosis, breach):
    dm = subjects(1)
    enrol = pd.DataFrame({"SUBJID": ["01-001"], "ONSETDAT": [onset or None], "DIAGDAT": [diagnosis or None],
                          **coordinates(1, "enrol.csv")}).astype({"ONSETDAT": "str", "DIAGDAT": "str"})
    found = run(dm, "enrol", enrol=enrol)
    assert (found["RULE"] == "PROT-DIAG-DELAY").any() == breach, found["MESSAGE"].tolist()


WINDOW_CASES = [   # visit, study day, outside its window? (site-export-spec.md section 2, by hand)
    ("SCREENING", -14, False), ("SCREENING", -15, True), ("SCREENING", -1, False),
    ("SCREENING", 3, True),                     # "screening" labs drawn after dosing began
    ("DAY 1", 1, False), ("DAY 7", 8, True), ("DAY 14", 12, False), ("DAY 14", 16, False), ("DAY 14", 17, True),
    ("DAY 28", 25, True), ("DAY 49 (END OF STUDY)", 52, False), ("DAY 49 (END OF STUDY)", 58, True),
    ("UNSCHEDULED", 100, False),                # no window
    ("DAY 14", None, False),                    # a partial date has no study day: cannot tell
]


@pytest.mark.parametrize("dataset, day", [("lb", "LBDY"), ("qs", "QSDY")])
def test_assessments_outside_their_visit_window_are_deviations(dataset, day):
    """The schedule's windows hold for samples and mRS assessments as for doses: a Day 49 safety
    assessment on day 58 or screening labs on day 3 are reported (WARNING), each record once."""
    dm = subjects(1)
    records = pd.DataFrame({"USUBJID": dm["USUBJID"].iloc[0], "VISIT": [v for v, _, _ in WINDOW_CASES],
                            day: pd.array([d for _, d, _ in WINDOW_CASES], dtype="Int64"),
                            "LBTESTCD": "WBC", "LBSTRESC": "6", "LBNRIND": "NORMAL", "LBSTNRHI": 10.0,
                            "QSEVINTX": pd.Series([None] * len(WINDOW_CASES), dtype="str"), "QSSTRESN": 3.0,
                            **coordinates(len(WINDOW_CASES), f"{'mrs' if dataset == 'qs' else dataset}.csv")})
    found = run(dm, f"{dataset}_visits", **{dataset: records})
    flagged = found.loc[found["RULE"] == "PROT-VISIT-WINDOW"]
    assert sorted(flagged["ROW"]) == [row for row, case in enumerate(WINDOW_CASES, start=1) if case[2]]
    assert (flagged["SEVERITY"] == "WARNING").all()
    first = flagged.iloc[0]["MESSAGE"]
    what = "Lab sample taken" if dataset == "lb" else "mRS assessed"
    assert f"{what} outside its visit window (site-export-spec.md section 2): SCREENING " in first
    assert "on study day -15; window -14 to -1 (MESAE-01-001)" in first


def test_criteria_without_their_screening_values_are_reported_as_not_evaluable():
    """An exclusion that cannot be checked passed in silence: a screening AST without the lab's
    upper limit of normal, an mRS not done, or no result at all (held back, or never sent). One
    finding per subject names every value missing."""
    dm = subjects(4)
    ids = dm["USUBJID"].tolist()
    lb = screening_labs([{"USUBJID": ids[0], "LBTESTCD": "AST", "LBSTRESC": "30", "LBSTNRHI": "40"},
                         {"USUBJID": ids[1], "LBTESTCD": "AST", "LBSTRESC": "500"},           # no ULN
                         {"USUBJID": ids[3], "LBTESTCD": "AST", "LBSTRESC": None, "LBSTNRHI": "40"}])  # not done
    qs = pd.DataFrame({"USUBJID": ids[:2], "VISIT": "SCREENING", "QSDY": pd.array([-3, -3], dtype="Int64"),
                       "QSEVINTX": pd.Series([None, None], dtype="str"), "QSSTRESN": [3.0, None],
                       "QSORRES": ["3", None], **coordinates(2, "mrs.csv")})
    enrol = pd.DataFrame({"SUBJID": [i.removeprefix("MESAE-") for i in ids], "ONSETDAT": "2026-07-01",
                          "DIAGDAT": "2026-07-20", **coordinates(4, "enrol.csv")})
    found = run(dm, "enrol", lb=lb, qs=qs, enrol=enrol)
    missing = found[found["RULE"] == "PROT-NOT-EVALUABLE"].set_index("ROW")["MESSAGE"]
    assert sorted(missing.index) == [1, 2, 3, 4] and found.loc[found["RULE"] == "PROT-NOT-EVALUABLE", "SEVERITY"].eq(
        "WARNING").all()
    prefix = "enrol.csv row {}: Lab and mRS eligibility criteria: not all can be evaluated: no screening value in SDTM for "
    for row, message in missing.items():
        assert message.startswith(prefix.format(row)) and message.endswith(f"(MESAE-01-{row:03d})"), message
        assert "pre-morbid mRS, NEUT, PLAT, HGB," in message and ", HIV12AB (records held back" in message, message
    assert "AST" not in missing[1] and "current mRS" not in missing[1]
    for row in (2, 3, 4):
        assert "current mRS" in missing[row] and "AST with the lab's ULN" in missing[row], missing[row]


def test_procedures_before_informed_consent_are_reported_once_per_subject():
    """A subject dosed 6 days before its consent date was published without a word (ICH E6
    4.8.8: consent before participation). Only what is certainly before counts (a date at its
    common precision with the consent's); one finding per subject names the count and the
    earliest record, as a wrong consent date would otherwise repeat on every record."""
    dm = subjects(4)
    dm["RFICDTC"] = ["2026-07-05", "2026-03-01", "2026-03", "2026-03-10"]
    dm.loc[3, "ARMNRS"] = "SCREEN FAILURE"            # consent binds screen failures too
    ids = dm["USUBJID"].tolist()
    ex = pd.DataFrame({"USUBJID": [ids[0], ids[0], ids[1]], "VISIT": "DAY 1",
                       "EXSTDY": pd.array([1, 2, 1], dtype="Int64"),
                       "EXSTDTC": ["2026-06-29T11:15", "2026-07-05T09:00", "2026-03-02"], **coordinates(3, "ex.csv")})
    lb = screening_labs([{"USUBJID": ids[0], "LBTESTCD": "HGB", "LBSTRESC": "130", "LBDTC": "2026-06-28"},
                         {"USUBJID": ids[3], "LBTESTCD": "HGB", "LBSTRESC": "130", "LBDTC": "2026-03-02"},
                         {"USUBJID": ids[3], "LBTESTCD": "PLAT", "LBSTRESC": "200", "LBDTC": "2026-03-02"},
                         {"USUBJID": ids[1], "LBTESTCD": "HGB", "LBSTRESC": "130", "LBDTC": "2026-03-01T08:00"},
                         {"USUBJID": ids[2], "LBTESTCD": "HGB", "LBSTRESC": "130", "LBDTC": "2026-03-15"},
                         {"USUBJID": ids[2], "LBTESTCD": "PLAT", "LBSTRESC": "200", "LBDTC": "2026-02"}])
    qs = pd.DataFrame({"USUBJID": [ids[0], ids[2]], "VISIT": "SCREENING", "QSDY": pd.array([-3, -3], dtype="Int64"),
                       "QSEVINTX": pd.Series([None, None], dtype="str"), "QSSTRESN": [3.0, 3.0], "QSORRES": ["3", "3"],
                       "QSDTC": ["2026-07", "2026-02-27"], **coordinates(2, "mrs.csv")})
    found = run(dm, "dm_consent", lb=lb, qs=qs, ex=ex)
    consent = found[found["RULE"] == "PROT-CONSENT"].set_index("ROW")["MESSAGE"]
    assert sorted(consent.index) == [1, 3, 4]
    assert "after 2 lab results dated before it; the earliest: lab result on 2026-03-02 (lb.csv row 2)" in consent[4]
    assert consent[1] == ("dm.csv row 1: Study procedures only after informed consent (ICH E6 4.8.8): informed consent "
                          "on 2026-07-05, after 1 dose, 1 lab result dated before it; the earliest: lab result on "
                          "2026-06-28 (lb.csv row 1) (MESAE-01-001)")
    assert "after 1 lab result, 1 mRS score dated before it; the earliest: lab result on 2026-02 (lb.csv row 6)" in consent[3]
    assert (found.loc[found["RULE"] == "PROT-CONSENT", "SEVERITY"] == "WARNING").all()


def test_the_eligibility_listing_names_the_transfer_of_the_raw_row():
    """ROW without TRANSFER was ambiguous when a stale site's data came from an older transfer."""
    dm = subjects(2)
    dm["AGE"] = [17, 40]
    dm["src_transfer"] = ["20261120T220000", "20261123T220005"]
    frames = prepare_frames(dm, dated(no_records("LBDY", LBTESTCD=1, LBSTRESC=1, LBNRIND=1, LBSTNRHI=1), "LBDTC"),
                            dated(no_records("QSDY", QSEVINTX=1, QSSTRESN=1), "QSDTC"),
                            dated(no_records("EXSTDY"), "EXSTDTC"), pd.DataFrame({"SUBJID": pd.Series(dtype="str")}))
    listing = evaluate({"dm": frames["dm"]})[1]
    assert list(listing.columns) == ["USUBJID", "SITEID", "RULE", "CRITERION", "OBSERVED", "TRANSFER", "FILE", "ROW"]
    assert listing[["USUBJID", "RULE", "TRANSFER", "FILE", "ROW"]].values.tolist() == [
        ["MESAE-01-001", "PROT-AGE", "20261120T220000", "dm.csv", 1]]
