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
                         "AGE": 40, **coordinates(n, "dm.csv")})


def screening_labs(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["VISIT"] = "SCREENING"
    for column in ["LBSTRESC", "LBSTRESU", "LBNRIND"]:
        frame[column] = frame.get(column, pd.Series([None] * len(frame))).astype("str")
    frame["LBSTRESN"] = pd.to_numeric(frame["LBSTRESC"], errors="coerce")
    frame["LBSTNRHI"] = frame.get("LBSTNRHI", pd.Series([None] * len(frame))).astype("float64")
    return frame.assign(**coordinates(len(frame), "lb.csv"))


def run(dm: pd.DataFrame, lb: pd.DataFrame | None = None, enrol: pd.DataFrame | None = None) -> pd.DataFrame:
    empty_lb = screening_labs([{"USUBJID": dm["USUBJID"].iloc[0], "LBTESTCD": "WBC", "LBSTRESC": "6"}])
    qs = pd.DataFrame({"USUBJID": pd.Series(dtype="str"), "VISIT": pd.Series(dtype="str")})
    ex = pd.DataFrame({"USUBJID": pd.Series(dtype="str")})
    no_enrol = pd.DataFrame({"SUBJID": pd.Series(dtype="str")})
    frames = prepare_frames(dm, empty_lb if lb is None else lb, qs, ex, no_enrol if enrol is None else enrol)
    return evaluate({name: frames[name] for name in (["lb"] if lb is not None else ["enrol"])})[0]


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
    found = run(dm, lb)
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
    found = run(dm, screening_labs(rows))
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
    found = run(dm, enrol=enrol)
    assert (found["RULE"] == "PROT-DIAG-DELAY").any() == breach, found["MESSAGE"].tolist()
