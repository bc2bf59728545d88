"""One test per validation rule: each rule's minimal bad input is planted into its own record of
the demo trial (the rules the generator already plants are covered by test_demo_run), the trial
runs once, and each test asserts that the run exited 0, the record is not in SDTM (ERROR) or is
(WARNING), its finding names the right file, row, rule and severity, and everything else maps."""

import csv
import io
import json
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from site_exports import column_index, edit_csv

from pipeline import metadata
from pipeline.validation.raw_contract import Parsed, column_rules, record_rules

CURRENT = "20261123T220005"


@dataclass
class Defect:
    rule: str
    severity: str
    file: str
    site: str                         # preferred site; another one is used if it has no suitable row
    where: dict                       # column -> value (or callable) the chosen row must have
    change: dict                      # column -> new value ('' empties it)
    also: set = field(default_factory=set)   # other rules the same record rightly triggers
    row: int | None = None            # filled in when planted
    subjid: str | None = None


DEFECTS = [
    Defect("RAW-REQUIRED", "ERROR", "ae.csv", "01", {}, {"AETERM": ""}),
    Defect("RAW-CODELIST", "ERROR", "ae.csv", "02", {}, {"AEREL": "MAYBE"}),
    # an uncoded AE held back for another reason: its warning must not read as mapped
    Defect("RAW-CODELIST", "ERROR", "ae.csv", "04", {}, {"AEOUT": "GONE", "AEDECOD": ""}, also={"RAW-AE-UNCODED"}),
    Defect("RAW-TIME", "ERROR", "lb.csv", "01", {"LBTIM": lambda v: v != ""}, {"LBTIM": "25:10"}),
    Defect("RAW-NUMBER", "ERROR", "lb.csv", "02", {"LBORNRLO": lambda v: v != ""}, {"LBORNRLO": "low"}),
    Defect("RAW-DOSE-LABEL", "ERROR", "ex.csv", "03", {"EXDOSE": lambda v: v != ""}, {"EXDOSE": "2.5 billion"}),
    Defect("RAW-SUBJID-FORMAT", "ERROR", "mrs.csv", "04", {}, {"SUBJID": "4-0001"}, also={"RAW-SUBJID-UNKNOWN"}),
    Defect("RAW-SUBJID-SITE", "ERROR", "mrs.csv", "05", {}, {"SUBJID": "01-001"}),
    Defect("RAW-EMPTY-IF", "ERROR", "ex.csv", "01", {"EXYN": lambda v: v.upper() in ("N", "NO")},
           {"EXSTDAT": "2026-06-01"}),
    Defect("RAW-ONLY-AT-VISIT", "ERROR", "mrs.csv", "02", {"VISIT": "DAY 7"}, {"MRSTYPE": "PRE-MORBID"}),
    Defect("RAW-RESULT-STATUS", "ERROR", "lb.csv", "03", {"LBORRES": lambda v: v != ""}, {"LBSTAT": "NOT DONE"}),
    # HBV DNA may come without a unit only as `<LLOQ`: a number is not taken to be IU/mL
    Defect("RAW-LB-UNIT", "ERROR", "lb.csv", "02", {"LBTEST": "HBV DNA"}, {"LBORRES": "1500", "LBORRESU": ""}),
    Defect("RAW-LB-RESULT", "ERROR", "lb.csv", "05", {"LBTEST": lambda v: v.upper() in ("ANC", "NEUTROPHILS")},
           {"LBORRES": "high"}),
    Defect("RAW-TIME-PARTIAL-DATE", "WARNING", "lb.csv", "04", {"LBTIM": lambda v: v != "", "VISIT": "DAY 7"},
           {"LBDAT": "2026"}),
    Defect("RAW-AE-SERIOUSNESS", "WARNING", "ae.csv", "03", {"AESER": lambda v: v.upper() in ("N", "NO")},
           {"AESER": "Y"}),
    Defect("RAW-AE-DEATH", "WARNING", "ae.csv", "05", {"AESER": lambda v: v.upper() in ("N", "NO")},
           {"AESER": "Y", "AESDTH": "Y"}),
    Defect("PROT-MRS-ENROL", "WARNING", "mrs.csv", "03", {"VISIT": "SCREENING", "MRSTYPE": "CURRENT"},
           {"MRSSCORE": "1"}),
    Defect("PROT-SEROLOGY", "WARNING", "lb.csv", "01", {"LBTEST": "HIV Ab"}, {"LBORRES": "POSITIVE"}),
    Defect("RAW-VISIT-PARTIAL-DATE", "WARNING", "lb.csv", "02", {"VISIT": "DAY 7"},
           {"VISIT": "UNSCHEDULED", "LBDAT": "UN MAR 2026", "LBTIM": ""}),
    # a dose written on a blinded kit (KITNO is for the expansion only)
    Defect("RAW-EXPANSION-DOSE", "WARNING", "ex.csv", "04",
           {"KITNO": lambda v: v != "", "EXYN": lambda v: v.upper() in ("Y", "YES")}, {"EXDOSE": "5.0E10"}),
    Defect("RAW-MRS-DEATH", "WARNING", "mrs.csv", "02", {"VISIT": lambda v: v.upper().startswith("DAY"), "MRSTYPE": "CURRENT"},
           {"MRSSCORE": "6", "MRSSTAT": ""}),
    # an end date typed a year ahead: after the transfer's export, mapped as written and reported
    Defect("RAW-DATE-AFTER-EXPORT", "WARNING", "ae.csv", "03", {"AEENDAT": lambda v: v != ""}, {"AEENDAT": "2027-03-01"}),
    # a censored screening result past an exclusion limit is a deviation too (ANC < 1.5 x10^9/L)
    Defect("PROT-LAB", "WARNING", "lb.csv", "03",
           {"VISIT": "SCREENING", "LBORRESU": "10^9/L",
            "LBTEST": lambda v: v.upper() in ("ANC", "NEUTROPHILS", "ABSOLUTE NEUTROPHIL COUNT")},
           {"LBORRES": "<0.5"}),
]
VALUE_WITHHELD = {"RAW-EXPANSION-DOSE"}   # a dose on a blinded kit may differ between the arms
SUBJECT_LEVEL = ["RAW-SUBJECT-HELD", "RAW-ENROL-MISSING", "RAW-DOSE-NOT-ENROLLED", "RAW-FIELD-COUNT"]


def pick(header, rows, defect, used_subjects, planted_rows):
    columns = [h.strip().upper() for h in header]
    for number, row in enumerate(rows, start=1):
        record = dict(zip(columns, row))
        if (defect.file, defect.site, number) in planted_rows or record.get("SUBJID") in used_subjects:
            continue
        if all(test(record.get(c, "")) if callable(test) else record.get(c, "") == test
               for c, test in defect.where.items()):
            return number, record["SUBJID"]
    raise LookupError(f"no row for {defect.rule} in {defect.file}")


@pytest.fixture(scope="module")
def rules_run(tmp_path_factory):
    from pipeline.synthetic_trial import generate_trial

    root = tmp_path_factory.mktemp("rules")
    trial = generate_trial(root / "exports", subjects=50)   # enough subjects for a defect each
    subjects = trial.subjects
    planted = trial.planted
    planted_rows = {(f, s, int(r)) for f, s, r in planted[["FILE", "SITEID", "ROW"]].dropna().itertuples(index=False)}
    used = set(planted["SUBJID"].dropna())
    folder = lambda site: root / "exports" / f"site-{site}" / CURRENT  # noqa: E731

    sites = sorted(subjects["SITEID"].unique())
    for defect in DEFECTS:
        def edit(header, rows, d=defect):
            number, subjid = pick(header, rows, d, used, planted_rows)
            d.row, d.subjid = number, subjid
            for column, value in d.change.items():
                rows[number - 1][column_index(header, column)] = value
            return rows
        for site in sorted(sites, key=lambda s, d=defect: s != d.site):  # the preferred site first
            try:
                edit_csv(folder(site), defect.file, edit)
            except LookupError:
                continue
            defect.site = site
            break
        used.add(defect.subjid)

    clean = subjects[(subjects["ENRLFL"] == "Y") & ~subjects["SUBJID"].isin(used)]
    held, no_enrol = clean.iloc[0], clean.iloc[1]
    screen_failure = subjects[(subjects["ENRLFL"] == "N") & ~subjects["SUBJID"].isin(used)].iloc[0]
    extra = {}

    def blank_age(header, rows):
        i = next(i for i, r in enumerate(rows) if r[column_index(header, "SUBJID")] == held.SUBJID)
        rows[i][column_index(header, "AGE")] = ""
        extra["dm_row"] = i + 1
        return rows
    edit_csv(folder(held.SITEID), "dm.csv", blank_age)

    def drop_enrol(header, rows):
        extra["no_enrol_dm_row"] = None
        return [r for r in rows if r[column_index(header, "SUBJID")] != no_enrol.SUBJID]
    edit_csv(folder(no_enrol.SITEID), "enrol.csv", drop_enrol)

    def dose_screen_failure(header, rows):
        row = [""] * len(header)
        for column, value in {"SUBJID": screen_failure.SUBJID, "VISIT": "DAY 1", "EXYN": "Y",
                              "EXSTDAT": "2026-06-01", "EXSTTIM": "09:00"}.items():
            row[column_index(header, column)] = value
        extra["dose_row"] = len(rows) + 1
        return rows + [row]
    edit_csv(folder(screen_failure.SITEID), "ex.csv", dose_screen_failure)

    def ragged(header, rows):
        extra["ragged_row"] = len(rows) + 1
        return rows + [["02-001", "DAY 7"]]
    edit_csv(folder("02"), "mrs.csv", ragged)

    code = run_cli("run", "--exports", str(root / "exports"), "--output", str(root / "output"), home=root / "home")
    quarantine = pq.read_table(root / "output" / "quarantine.parquet").to_pandas()
    return {"code": code, "trial": trial, "output": root / "output", "exports": root / "exports",
            "quarantine": quarantine, "held": held, "no_enrol": no_enrol, "screen_failure": screen_failure,
            **extra}


def findings_at(run, site, file, row):
    q = run["quarantine"]
    return q[(q["SITEID"] == site) & (q["FILE"] == file) & (q["ROW"] == row)]


def in_sdtm(run, site, file, row) -> bool:
    dataset = {"dm.csv": "dm", "ex.csv": "ex", "ae.csv": "ae", "lb.csv": "lb", "mrs.csv": "qs"}[file]
    lineage = pq.read_table(run["output"] / "lineage" / f"{dataset}.parquet").to_pandas()
    return bool(((lineage["SITEID"] == site) & (lineage["TRANSFER"] == CURRENT) & (lineage["ROW"] == row)).any())


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.rule for d in DEFECTS])
def test_rule(rules_run, defect):
    assert rules_run["code"] == 0
    found = findings_at(rules_run, defect.site, defect.file, defect.row)
    assert set(found["RULE"]) == {defect.rule} | defect.also, found[["RULE", "MESSAGE"]].to_string()
    mine = found[found["RULE"] == defect.rule].iloc[0]
    assert mine["SEVERITY"] == defect.severity and mine["TRANSFER"] == CURRENT
    assert f"{defect.file} row {defect.row}" in mine["MESSAGE"]
    changed = [v for v in defect.change.values() if v]
    if defect.rule in VALUE_WITHHELD:
        assert not any(v in mine["MESSAGE"] for v in changed), mine["MESSAGE"]
    else:
        assert not changed or any(v in mine["MESSAGE"] for v in changed) or defect.rule.startswith("PROT-"), mine["MESSAGE"]
    assert in_sdtm(rules_run, defect.site, defect.file, defect.row) == (defect.severity == "WARNING")


def test_a_warning_on_a_held_back_row_says_the_row_is_not_mapped(rules_run):
    """WARNING means mapped and reported: on a row an ERROR holds back, RAW-AE-UNCODED said
    "mapped with AEDECOD null" of a record that is in no dataset."""
    from pipeline.findings import HELD_BACK_NOTE

    (defect,) = [d for d in DEFECTS if d.change.get("AEOUT") == "GONE"]
    found = findings_at(rules_run, defect.site, defect.file, defect.row).set_index("RULE")
    assert found.loc["RAW-AE-UNCODED", "MESSAGE"].endswith(HELD_BACK_NOTE)
    assert not found.loc["RAW-CODELIST", "MESSAGE"].endswith(HELD_BACK_NOTE)
    warnings = rules_run["quarantine"][rules_run["quarantine"]["SEVERITY"] == "WARNING"]
    noted = warnings[warnings["MESSAGE"].str.endswith(HELD_BACK_NOTE)]
    assert len(noted) < len(warnings)                    # mapped rows' warnings are left as they are
    for row in noted.itertuples():
        assert not in_sdtm(rules_run, row.SITEID, row.FILE, row.ROW)


def test_unscheduled_visit_on_a_partial_date_keeps_its_visit_name(rules_run):
    """The spec allows a partial LBDAT; an unscheduled visit on one cannot be numbered, but the
    record keeps the site's VISIT rather than losing it."""
    (defect,) = [d for d in DEFECTS if d.rule == "RAW-VISIT-PARTIAL-DATE"]
    lineage = pq.read_table(rules_run["output"] / "lineage" / "lb.parquet").to_pandas()
    origin = lineage[(lineage["SITEID"] == defect.site) & (lineage["TRANSFER"] == CURRENT)
                     & (lineage["ROW"] == defect.row)]
    lb = pq.read_table(rules_run["output"] / "sdtm" / "lb.parquet").to_pandas()
    (record,) = lb.merge(origin.rename(columns={"SEQ": "LBSEQ"})[["USUBJID", "LBSEQ"]]).itertuples(index=False)
    assert (record.VISIT, record.LBDTC) == ("UNSCHEDULED", "2026-03") and pd.isna(record.VISITNUM)


def test_a_censored_result_past_an_exclusion_limit_is_reported_and_flagged_low(rules_run):
    (defect,) = [d for d in DEFECTS if d.rule == "PROT-LAB" and d.change == {"LBORRES": "<0.5"}]
    found = findings_at(rules_run, defect.site, defect.file, defect.row)
    assert "screening NEUT = <0.5 10^9/L" in found["MESSAGE"].iloc[0]
    lineage = pq.read_table(rules_run["output"] / "lineage" / "lb.parquet").to_pandas()
    origin = lineage[(lineage["SITEID"] == defect.site) & (lineage["TRANSFER"] == CURRENT)
                     & (lineage["ROW"] == defect.row)]
    lb = pq.read_table(rules_run["output"] / "sdtm" / "lb.parquet").to_pandas()
    (record,) = lb.merge(origin.rename(columns={"SEQ": "LBSEQ"})[["USUBJID", "LBSEQ"]]).itertuples(index=False)
    assert record.LBSTRESC == "<0.5" and pd.isna(record.LBSTRESN)
    assert (None if pd.isna(record.LBNRIND) else record.LBNRIND) == ("LOW" if record.LBSTNRLO >= 0.5 else None)


def test_a_death_recorded_as_aesdth_alone_sets_the_dm_death_flag(rules_run):
    """sdtm-reference: "AESDTH="Y" implies AEOUT="FATAL" and DM.DTHFL="Y"" and DTHDTC is the end
    date of an "AE with AEOUT=FATAL / AESDTH=Y": the planted AE keeps its non-fatal outcome (and a
    RAW-AE-DEATH warning), the subject's death is still in DM."""
    (defect,) = [d for d in DEFECTS if d.rule == "RAW-AE-DEATH"]
    exports = rules_run["exports"] / f"site-{defect.site}" / CURRENT
    header, *rows = list(csv.reader(io.StringIO((exports / "ae.csv").read_text(encoding="utf-8-sig"))))
    raw = dict(zip([h.upper() for h in header], rows[defect.row - 1]))
    assert raw["AEOUT"] != "FATAL" and raw["AESDTH"] == "Y"
    dm = pq.read_table(rules_run["output"] / "sdtm" / "dm.parquet").to_pandas().set_index("USUBJID")
    subject = dm.loc[f"MESAE-{defect.subjid}"]
    assert subject["DTHFL"] == "Y"
    ae = pq.read_table(rules_run["output"] / "sdtm" / "ae.parquet").to_pandas()
    ends = ae.loc[(ae["USUBJID"] == f"MESAE-{defect.subjid}") & (ae["AESDTH"] == "Y"), "AEENDTC"].dropna()
    assert (pd.isna(subject["DTHDTC"]) and ends.empty) or subject["DTHDTC"] == ends.max()


def test_subject_with_a_held_back_dm_record_is_held_back_everywhere(rules_run):
    held = rules_run["held"]
    found = findings_at(rules_run, held.SITEID, "dm.csv", rules_run["dm_row"])
    assert list(found["RULE"]) == ["RAW-REQUIRED"] and "AGE is empty" in found["MESSAGE"].iloc[0]
    cascade = rules_run["quarantine"].query("RULE == 'RAW-SUBJECT-HELD'")
    assert set(cascade.loc[cascade["SUBJID"] == held.SUBJID, "FILE"]) >= {"enrol.csv", "lb.csv", "mrs.csv"}
    dm = pq.read_table(rules_run["output"] / "sdtm" / "dm.parquet").to_pandas()
    assert held.SUBJID not in set(dm["SUBJID"])
    for dataset in ["ex", "ae", "lb", "qs", "suppdm"]:
        frame = pq.read_table(rules_run["output"] / "sdtm" / f"{dataset}.parquet").to_pandas()
        assert f"MESAE-{held.SUBJID}" not in set(frame["USUBJID"])


def test_subject_without_enrol_record(rules_run):
    subject = rules_run["no_enrol"]
    q = rules_run["quarantine"]
    assert q.query("RULE == 'RAW-ENROL-MISSING'")["SUBJID"].tolist() == [subject.SUBJID]
    assert (q.query("RULE == 'RAW-SUBJECT-HELD'")["SUBJID"] == subject.SUBJID).any()


def test_dose_recorded_for_a_screen_failure(rules_run):
    subject = rules_run["screen_failure"]
    found = findings_at(rules_run, subject.SITEID, "ex.csv", rules_run["dose_row"])
    assert list(found["RULE"]) == ["RAW-DOSE-NOT-ENROLLED"] and found["SUBJID"].iloc[0] == subject.SUBJID
    assert not in_sdtm(rules_run, subject.SITEID, "ex.csv", rules_run["dose_row"])


def test_record_with_missing_fields(rules_run):
    found = findings_at(rules_run, "02", "mrs.csv", rules_run["ragged_row"])
    assert list(found["RULE"]) == ["RAW-FIELD-COUNT"] and "2 fields where the header has" in found["MESSAGE"].iloc[0]


def test_nothing_else_is_reported_and_accounting_closes(rules_run):
    q = rules_run["quarantine"]
    expected_rules = {d.rule for d in DEFECTS} | set().union(*(d.also for d in DEFECTS)) | set(
        rules_run["trial"].planted["RULE"]) | {"RAW-REQUIRED", "RAW-SUBJECT-HELD", *SUBJECT_LEVEL,
                                               "PROT-NOT-EVALUABLE"}   # a held-back screening result
    # A planted date (`UN MAR 2026`) may fall before its subject's informed consent: that is
    # reported, and only for such subjects.
    dated = {d.subjid for d in DEFECTS if any(c.endswith("DAT") and v for c, v in d.change.items())}
    assert set(q.loc[q["RULE"] == "PROT-CONSENT", "SUBJID"]) <= dated
    assert set(q["RULE"]) <= expected_rules | {"PROT-CONSENT"}
    planted = rules_run["trial"].planted.dropna(subset=["ROW"])
    for item in planted.itertuples(index=False):
        assert item.RULE in set(findings_at(rules_run, item.SITEID, item.FILE, item.ROW)["RULE"])
    summary = json.loads((rules_run["output"] / "run.json").read_text())
    for file, rows in summary["rows"].items():
        assert rows["read"] == rows["mapped"] + rows["held_back"] + rows["not_mapped"], file


@pytest.mark.parametrize("name", metadata.RAW_FILES)
def test_every_column_rule_passes_a_missing_value(name):
    """The schemas run column rules with Pandera's ignore_na=False, so each rule must let an
    empty value through itself (an empty required value is RAW-REQUIRED, reported once)."""
    columns = metadata.raw_schema(name)["columns"]
    frame = pd.DataFrame({c: pd.Series([None, None], dtype="str") for c in columns})
    rules = column_rules(columns)
    assert rules
    for rule in rules:
        assert rule.passes(Parsed(frame, columns)).tolist() == [True, True], rule.check_name


def raw_frame(name: str, rows: list[dict]) -> pd.DataFrame:
    """A raw frame as ingest makes it: every column as text, the site as a category."""
    columns = metadata.raw_schema(name)["columns"]
    frame = pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype="str") for c in columns})
    frame["src_site"] = pd.Categorical([r["site"] for r in rows])
    return frame


def duplicate_rows(name: str, rows: list[dict]) -> list[int]:
    schema = metadata.raw_schema(name)
    (rule,) = [r for r in record_rules(schema) if r.rule == "RAW-DUPLICATE"]
    passes = rule.passes(Parsed(raw_frame(name, rows), schema["columns"]))
    return [i for i, ok in enumerate(passes) if not ok]


LB_KEYS = {"SUBJID": "01-001", "VISIT": "DAY 7", "LBDAT": "07 MAR 2026", "LBTEST": "Neutrophils", "LBSPEC": "SERUM",
           "site": "01"}


@pytest.mark.parametrize("other, duplicate", [
    ({}, True),
    ({"LBDAT": "2026-03-07"}, True),                      # the same date in ISO form
    ({"LBTEST": "ANC"}, True),                            # an alias of the same test
    ({"LBDAT": "2026-03-07", "LBTEST": "ANC"}, True),
    ({"LBDAT": "08 MAR 2026"}, False),
    ({"LBTIM": "08:00"}, False),                          # a time against none
    ({"LBSPEC": "PLASMA"}, False),
    ({"LBSPEC": None}, False),
    ({"site": "02"}, False),                              # keys are unique within a site's data
    ({"LBTEST": "Platelets"}, False),
])
def test_duplicate_keys_compare_values_as_the_pipeline_reads_them(other, duplicate):
    """RAW-DUPLICATE flags both records of a key seen twice, the key's values compared as
    mapped: a date in either format, a test by any alias."""
    rows = [LB_KEYS, {**LB_KEYS, **other}, {**LB_KEYS, "LBDAT": "01 APR 2026"}]
    assert duplicate_rows("lb", rows) == ([0, 1] if duplicate else [])


def test_duplicate_keys_invalid_dates_and_missing_values_compare_as_written():
    """An impossible date cannot be read, so only the same text is the same key; two missing
    values are the same."""
    rows = [{**LB_KEYS, "LBDAT": "31 FEB 2026"}, {**LB_KEYS, "LBDAT": "31 FEB 2026"},
            {**LB_KEYS, "LBDAT": "2026-02-31"},
            {**LB_KEYS, "LBSPEC": None, "LBTIM": None}, {**LB_KEYS, "LBSPEC": None, "LBTIM": None}]
    assert duplicate_rows("lb", rows) == [0, 1, 3, 4]


def test_unscheduled_visits_are_told_apart_by_their_date():
    base = {"SUBJID": "01-001", "VISIT": "UNSCHEDULED", "MRSTYPE": "CURRENT", "site": "01"}
    rows = [{**base, "MRSDAT": "09 MAR 2026"}, {**base, "MRSDAT": "10 MAR 2026"},
            {**base, "MRSDAT": "2026-03-10"}, {**base, "VISIT": "DAY 7", "MRSDAT": "09 MAR 2026"},
            {**base, "VISIT": "DAY 7", "MRSDAT": "10 MAR 2026"}]
    assert duplicate_rows("mrs", rows) == [1, 2, 3, 4]


@pytest.mark.parametrize("other, duplicate", [("1", True), ("01", True), ("+1", True), ("001", True),
                                               ("10", False), ("1a", False), ("A1", False), (" 1", False)])
def test_event_numbers_compare_by_value(other, duplicate):
    """AESPID is the site's event number, unique within the subject: `1` and `01` were mapped as
    two adverse events. Text that is not a number compares as written."""
    base = {"SUBJID": "01-001", "AESPID": "1", "site": "01"}
    assert duplicate_rows("ae", [base, {**base, "AESPID": other}]) == ([0, 1] if duplicate else [])
    assert duplicate_rows("ae", [{**base, "AESPID": "A01"}, {**base, "AESPID": "A1"}]) == []


@pytest.mark.parametrize("date, after_first, after_second", [
    # exported 2026-11-23 (limit 2026-11-24) and 2026-12-01 (limit 2026-12-02)
    ("2026-11-23", False, False), ("23 NOV 2026", False, False),
    ("2026-11-24", False, False),                 # Beijing is a day ahead of UTC in the evening
    ("2026-11-25", True, False), ("25 NOV 2026", True, False), ("2027-01-15", True, True),
    ("2062-03-01", True, True),
    ("2026-11", False, False), ("UN NOV 2026", False, False), ("2026-12", True, False),
    ("UN UNK 2027", True, True), ("2026", False, False),
    ("2026-02-31", False, False),                 # not a date: RAW-DATE's finding
    (None, False, False),
])
def test_a_date_after_its_transfer_export_is_reported(date, after_first, after_second):
    """An AE dated 2026-12-10 in a transfer exported 2026-11-23 was mapped, and moved RFPENDTC,
    without a word. Only dates certainly after the export day plus one count, each row against
    its own transfer."""
    schema = metadata.raw_schema("ae")
    (rule,) = [r for r in record_rules(schema) if r.rule == "RAW-DATE-AFTER-EXPORT" and r.column == "AEENDAT"]
    frame = raw_frame("ae", [{"SUBJID": "01-001", "AESPID": "1", "AEENDAT": date, "site": "01"},
                             {"SUBJID": "01-002", "AESPID": "1", "AEENDAT": date, "site": "01"}])
    frame["src_transfer"] = pd.Categorical(["20261123T220005", "20261201T220005"])
    assert rule.passes(Parsed(frame, schema["columns"])).tolist() == [not after_first, not after_second]
    if after_first:
        detail = rule.describe(frame.iloc[[0]])
        assert detail["detail"].tolist() == ["2026-11-23"] and detail["value"].tolist() == [date]


@pytest.mark.parametrize("birth, consent, age, consistent", [
    ("1980-01-01", "2026-04-18", "46", True), ("1980-01-01", "2026-04-18", "33", False),
    ("1980-04-18", "2026-04-18", "46", True),                  # the birthday itself
    ("1980-04-19", "2026-04-18", "46", False), ("1980-04-19", "2026-04-18", "45", True),
    ("29 FEB 1980", "2026-02-28", "45", True), ("29 FEB 1980", "2026-03-01", "46", True),
    ("1980", "2026-04-18", "45", True), ("1980", "2026-04-18", "46", True),   # year only: either
    ("1980", "2026-04-18", "47", False), ("1980", "2026-04-18", "44", False),
    ("UN APR 1980", "2026-04-18", "45", True), ("UN APR 1980", "2026-04-18", "46", True),
    ("UN MAY 1980", "2026-04-18", "46", False),
    ("1980-01-01", "2026-04", "46", True),                     # a partial consent: cannot tell
    (None, "2026-04-18", "33", True), ("1980-01-01", "2026-04-18", "abc", True),   # RAW-INTEGER's
    ("1980-01-01", "2026-04-18", "+46", True),
])
def test_age_must_be_the_age_at_consent_from_the_birth_date(birth, consent, age, consistent):
    """AGE 33 with BRTHDAT 1980-01-01 and consent 2026-04-18 (46) was published without a word."""
    schema = metadata.raw_schema("dm")
    (rule,) = [r for r in record_rules(schema) if r.rule == "RAW-AGE-BIRTH"]
    frame = raw_frame("dm", [{"SUBJID": "01-001", "BRTHDAT": birth, "RFICDAT": consent, "AGE": age, "site": "01"}])
    assert rule.passes(Parsed(frame, schema["columns"])).tolist() == [consistent]
    if not consistent:
        detail = rule.describe(frame)["detail"].iloc[0]
        assert detail.startswith(f"BRTHDAT = '{birth}' and RFICDAT = '{consent}' give ")


@pytest.mark.parametrize("ongoing, outcome, consistent", [
    ("Y", "RECOVERED/RESOLVED", False), ("YES", "FATAL", False), ("y", "RECOVERED/RESOLVED WITH SEQUELAE", False),
    ("Y", "RECOVERING/RESOLVING", True), ("Y", "NOT RECOVERED/NOT RESOLVED", True), ("Y", "UNKNOWN", True),
    ("Y", None, True), ("N", "RECOVERED/RESOLVED", True), (None, "RECOVERED/RESOLVED", True),
    ("Y", "recovering/resolving", True), ("Y", "XYZ", True),     # not in the codelist: RAW-CODELIST's finding
])
def test_an_ongoing_event_cannot_have_resolved(ongoing, outcome, consistent):
    """AEONGO = Y with AEOUT = RECOVERED/RESOLVED was published as ONGOING and RECOVERED."""
    schema = metadata.raw_schema("ae")
    (rule,) = [r for r in record_rules(schema) if r.rule == "RAW-VALUE-IF"]
    frame = raw_frame("ae", [{"SUBJID": "01-001", "AESPID": "1", "AEONGO": ongoing, "AEOUT": outcome, "site": "01"}])
    assert rule.passes(Parsed(frame, schema["columns"])).tolist() == [consistent]


def test_a_screening_only_value_without_a_visit_is_left_to_raw_required():
    """A PRE-MORBID mRS with VISIT empty said "only collected at SCREENING, found at " (nothing)
    beside RAW-REQUIRED; it is one finding now, and a wrong visit is still caught."""
    schema = metadata.raw_schema("mrs")
    (rule,) = [r for r in record_rules(schema) if r.rule == "RAW-ONLY-AT-VISIT"]
    base = {"SUBJID": "01-001", "MRSTYPE": "PRE-MORBID", "MRSDAT": "01 MAR 2026", "site": "01"}
    rows = [{**base, "VISIT": None}, {**base, "VISIT": "DAY 7"}, {**base, "VISIT": "SCREENING"}]
    assert rule.passes(Parsed(raw_frame("mrs", rows), schema["columns"])).tolist() == [True, False, True]


def test_a_duplicate_names_every_row_holding_its_key():
    """Each copy's message lists the rows that hold the same key as mapped, however written, so
    the site can reconcile them; two keys duplicated in one file are kept apart."""
    schema = metadata.raw_schema("lb")
    rows = [LB_KEYS, {**LB_KEYS, "LBTEST": "Platelets"}, {**LB_KEYS, "LBDAT": "2026-03-07", "LBTEST": "ANC"},
            {**LB_KEYS, "LBTEST": "Platelets"}]
    frame = raw_frame("lb", rows).assign(src_row=[2, 5, 9, 14])
    (rule,) = [r for r in record_rules(schema) if r.rule == "RAW-DUPLICATE"]
    detail = rule.describe(frame)["detail"].tolist()
    assert [d.split(" (")[1] for d in detail] == ["rows 2, 9)", "rows 5, 14)", "rows 2, 9)", "rows 5, 14)"]
    assert detail[2].startswith("SUBJID / VISIT / LBTEST / LBSPEC / LBDAT / LBTIM = 01-001 / DAY 7 / ANC / SERUM / 2026-03-07 / ")


def test_a_value_with_control_characters_is_shown_on_one_line():
    """A NUL or a line break inside a raw value is escaped in the message, not copied into it."""
    from pipeline.findings import render

    message = render("RAW-CODELIST", file="lb.csv", row=3, column="LBSTAT", value="NOT\x00DONE\r\n", expected="NOT DONE")
    assert message.isprintable() and "NOT\\x00DONE\\r\\n" in message, message


@pytest.fixture(scope="module")
def clean_raw_trial(tmp_path_factory):
    """The six raw files of a small trial without planted findings, read by the real ingest."""
    from pipeline import transfers
    from pipeline.synthetic_trial import generate_trial

    root = tmp_path_factory.mktemp("doses")
    trial = generate_trial(root, subjects=12, transfers=1, plant_findings=False)
    current = [t for t in transfers.select_current(transfers.list_transfers(root)) if t.status == "CURRENT"]
    raw = {name: transfers.stack_transfers([t.files[metadata.raw_schema(name)["file"]].data for t in current])
           for name in metadata.RAW_FILES}
    return trial, raw


def doses_of(raw, subjid):
    ex = raw["ex"]
    return ex[(ex["SUBJID"] == subjid) & ex["EXYN"].str.upper().isin(["Y", "YES"])]


@pytest.mark.parametrize("visit, change, rule, whole_subject", [
    # the first dose: study day 1 and every --DY, EPOCH and baseline follow from it
    ("DAY 1", {"EXSTTIM": "9:00"}, "RAW-TIME", True),
    # the last dose: RFXENDTC, and where the follow-up epoch begins
    ("DAY 28", {"EXSTTIM": "9:00"}, "RAW-TIME", True),
    # between two mapped doses: it cannot move the reference dates
    ("DAY 3", {"EXSTTIM": "9:00"}, "RAW-TIME", False),
    # not given (a date where none belongs): it cannot be a dose given, first or last
    ("DAY 1", {"EXYN": "N"}, "RAW-EMPTY-IF", False),
    # ... unless it is the final planned one, which ends the treatment epoch given or not
    ("DAY 28", {"EXYN": "N"}, "RAW-EMPTY-IF", True),
])
def test_a_held_back_dose_that_may_be_the_first_or_last_holds_back_its_subject(
        clean_raw_trial, visit, change, rule, whole_subject):
    from pipeline.validation.raw_contract import validate_raw

    trial, clean = clean_raw_trial
    raw = {name: frame.copy() for name, frame in clean.items()}
    subjects = trial.subjects
    treated = [s for s in subjects.loc[subjects["ENRLFL"] == "Y", "SUBJID"]
               if set(doses_of(raw, s)["VISIT"]) >= {"DAY 1", "DAY 3", "DAY 28"}]
    subjid, bystander = treated[0], treated[1]
    dose = doses_of(raw, subjid)
    target = dose.index[dose["VISIT"] == visit][0]
    for column, value in change.items():
        raw["ex"].loc[target, column] = value
    validated, found = validate_raw(raw)

    bad_row = int(raw["ex"].loc[target, "src_row"])
    assert set(found.loc[(found["FILE"] == "ex.csv") & (found["ROW"] == bad_row), "RULE"]) == {rule}
    held = found[found["RULE"] == "RAW-SUBJECT-HELD"]
    for name in metadata.RAW_FILES:
        mine = raw[name]["SUBJID"] == subjid
        kept = validated[name]["SUBJID"] == subjid
        if whole_subject:
            assert mine.any() and not kept.any(), name
            rows = held[held["FILE"] == metadata.raw_schema(name)["file"]]
            expected = set(raw[name].loc[mine, "src_row"]) - ({bad_row} if name == "ex" else set())
            assert set(rows.loc[rows["SUBJID"] == subjid, "ROW"]) == expected, name
        else:
            assert kept.sum() == mine.sum() - (name == "ex"), name
        assert (validated[name]["SUBJID"] == bystander).sum() == (raw[name]["SUBJID"] == bystander).sum(), name
    if whole_subject:
        assert held["MESSAGE"].str.contains(f"its dose record at ex.csv row {bad_row} is held back").all()
    else:
        assert held.empty


def test_a_dose_recorded_for_a_screen_failure_holds_back_only_the_dose(clean_raw_trial):
    """A screen failure's ARM and ARMNRS do not depend on doses: its DM and AEs stay."""
    from pipeline.validation.raw_contract import validate_raw

    trial, clean = clean_raw_trial
    raw = {name: frame.copy() for name, frame in clean.items()}
    failure = trial.subjects.loc[trial.subjects["ENRLFL"] == "N"].iloc[0]
    ex = raw["ex"]
    dose = ex[ex["src_site"].astype("str") == failure.SITEID].iloc[[0]].copy()
    dose["SUBJID"], dose["src_row"] = failure.SUBJID, int(ex["src_row"].max()) + 1
    raw["ex"] = pd.concat([ex, dose], ignore_index=True)
    validated, found = validate_raw(raw)
    assert set(found.loc[found["SUBJID"] == failure.SUBJID, "RULE"]) == {"RAW-DOSE-NOT-ENROLLED"}
    for name in ("dm", "enrol"):
        assert (validated[name]["SUBJID"] == failure.SUBJID).sum() == 1, name


def test_a_required_text_of_spaces_alone_is_empty(clean_raw_trial):
    """Spec section 5: `Req` = present and non-empty; " " is no verbatim term."""
    from pipeline.validation.raw_contract import validate_raw

    _, clean = clean_raw_trial
    raw = {name: frame.copy() for name, frame in clean.items()}
    ae = raw["ae"]
    site = ae["src_site"].astype("str").value_counts().index[0]   # the site with the most AEs
    index = ae.index[(ae["src_site"].astype("str") == site).to_numpy()][:4]
    ae.loc[index[0], "AETERM"], ae.loc[index[1], "AESPID"] = "   ", " \t"
    ae.loc[index[2], "AETERM"] = " 头痛 "   # text with spaces around it is a value
    ae.loc[index[3], "AETERM"] = "\u200b"   # a zero-width space is blank too
    validated, found = validate_raw(raw)
    required = found[(found["RULE"] == "RAW-REQUIRED") & (found["FILE"] == "ae.csv") & (found["SITEID"] == site)]
    rows = ae.loc[index, "src_row"].tolist()
    assert sorted(zip(required["ROW"], required["MESSAGE"])) == sorted([
        (rows[0], f"ae.csv row {rows[0]}: AETERM is empty; it is required on every row"),
        (rows[1], f"ae.csv row {rows[1]}: AESPID is empty; it is required on every row"),
        (rows[3], f"ae.csv row {rows[3]}: AETERM is empty; it is required on every row")])
    kept = set(validated["ae"].index)
    assert not {index[0], index[1], index[3]} & kept and index[2] in kept
