"""The synthetic trial read back by an independent oracle: the csv module and the schema YAML files only.

`findings()` below re-derives, from the spec's rules as the schemas state them, what a transfer
should be reported for. Comparing it with `planted` proves both that every planted defect is really
in its record and that nothing else in the files would trigger a finding.
"""
from __future__ import annotations

import calendar
import csv
import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.synthetic_trial import generate_trial

SCHEMAS = Path(__file__).parents[1] / "schemas"


def _yaml(*parts):
    return yaml.safe_load(SCHEMAS.joinpath(*parts).read_text(encoding="utf-8"))


RAW = {spec["file"]: spec for spec in (_yaml("raw", p.name) for p in sorted((SCHEMAS / "raw").glob("*.yaml")))}
CODELISTS = _yaml("terminology", "codelists.yaml")
LAB = _yaml("terminology", "lab_tests.yaml")
VISITS = _yaml("terminology", "visits.yaml")
ARMS = _yaml("terminology", "arms.yaml")
PROTOCOL = _yaml("protocol.yaml")
RULE_CATALOGUE = _yaml("rules.yaml")["rules"]
FILES = ["dm.csv", "enrol.csv", "ex.csv", "ae.csv", "lb.csv", "mrs.csv"]
SITE_FILES = set(FILES) | {"manifest.json"}
ALIASES = {alias.upper(): code for code, test in LAB["tests"].items() for alias in test["aliases"]}
SCHEDULE = {v["visit"]: v for v in VISITS["visits"]}
MONTHS = {m.upper(): i for i, m in enumerate(calendar.month_abbr) if m}
COHORT_DOSE = {c["cohort"]: float(c["dose"]) for c in ARMS["escalation"]}  # YAML 1.1 reads 2.5e10 as text
INHERENT = {"RAW-AE-UNCODED", "RAW-EXTRA-COLUMN"}
REQUIRED_PLANTS = {
    "RAW-DATE", "RAW-DATE-ORDER", "RAW-LB-IMPLAUSIBLE", "RAW-LB-UNIT", "RAW-LB-TEST", "RAW-INTEGER",
    "RAW-REQUIRED-IF", "RAW-DUPLICATE", "RAW-VISIT", "RAW-SUBJID-UNKNOWN", "PROT-AGE", "PROT-LAB",
    "PROT-MRS-PREMORBID", "PROT-VISIT-WINDOW", "PROT-DIAG-DELAY", "PROT-COHORT-DOSE",
}


# --- reading -----------------------------------------------------------------------------------------
def manifest(transfer: Path) -> dict:
    return json.loads((transfer / "manifest.json").read_text(encoding="utf-8"))


def decode(transfer: Path, file: str) -> str:
    codec = {"utf-8": "utf-8-sig", "gb18030": "gb18030"}[manifest(transfer)["encoding"]]
    return (transfer / file).read_bytes().decode(codec)


def read(transfer: Path, file: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header as written, and records keyed by upper-case column name (names are case-insensitive)."""
    header, *records = list(csv.reader(io.StringIO(decode(transfer, file), newline="")))
    names = [h.upper() for h in header]
    return header, [dict(zip(names, r)) for r in records]


def transfers(exports: Path) -> list[Path]:
    return sorted(p for p in exports.glob("site-*/*") if p.is_dir())


def complete(exports: Path) -> list[Path]:
    return [t for t in transfers(exports) if all((t / f).exists() for f in FILES)]


def current(exports: Path) -> list[Path]:
    """The newest complete transfer of each site."""
    newest = {}
    for t in complete(exports):
        newest[t.parent.name] = t
    return sorted(newest.values())


# --- values ------------------------------------------------------------------------------------------
def parse_date(value: str):
    """(year, month or None, day or None) for the spec's date forms, None when not a valid date."""
    m = re.fullmatch(r"(\d{2}|UN) ([A-Z]{3}|UNK) (\d{4})", value)
    if m:
        day, mon, year = m.groups()
        if mon == "UNK" and day != "UN" or mon != "UNK" and mon not in MONTHS:
            return None
        parts = (int(year), None if mon == "UNK" else MONTHS[mon], None if day == "UN" else int(day))
    else:
        m = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", value)
        if not m:
            return None
        parts = tuple(None if g is None else int(g) for g in m.groups())
    year, month, day = parts
    if month is not None and not 1 <= month <= 12:
        return None
    if day is not None and not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    return parts


def full_date(value: str) -> date | None:
    parts = parse_date(value)
    return date(*parts) if parts and parts[2] is not None else None


def before(a, b) -> bool:
    """a < b compared only as far as both dates are known (right truncation)."""
    n = min(sum(p is not None for p in a), sum(p is not None for p in b))
    return a[:n] < b[:n]


def yes(value: str) -> bool:
    return value.upper() in ("Y", "YES")


def in_codelist(value: str, name: str) -> bool:
    codelist = CODELISTS[name]
    allowed = codelist["values"]
    return value.upper() in allowed if codelist.get("case_insensitive") else value in allowed


def dose_particles(label: str) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:[eE](\d+)|x10\^(\d+))?", label)
    if not m:
        return None
    return float(m.group(1)) * 10 ** int(m.group(2) or m.group(3) or 0)


def lab_result_ok(test: dict, result: str) -> bool:
    kind = test["result"]
    number = re.fullmatch(r"<?\s*\d+(\.\d+)?", result)
    if kind == "numeric":
        return bool(number)
    if kind == "numeric_or_below_lloq":
        return bool(number or re.fullmatch(LAB["below_lloq_pattern"], result))
    titre = re.fullmatch(LAB["titre"]["pattern"], result)
    if kind == "titre_or_qualitative" and titre:
        return LAB["titre"]["min"] <= int(titre.group(1)) <= LAB["titre"]["max"]
    return result in test["values"]


def standard(test: dict, value: str, unit: str) -> float | None:
    """A plain number converted to the standard unit (None for censored or text results)."""
    return float(value) * test["units"][unit] if re.fullmatch(r"\d+(\.\d+)?", value) else None


# --- the oracle --------------------------------------------------------------------------------------
def findings(transfer: Path) -> set[tuple[str, int | None, str]]:
    """(file, 1-based row or None, rule) for everything the transfer spec and protocol say to report."""
    export_day = date.fromisoformat(manifest(transfer)["exported_at"][:10])
    site = transfer.parent.name.removeprefix("site-")
    data = {file: read(transfer, file) for file in FILES}
    found: set[tuple[str, int | None, str]] = set()
    held: set[tuple[str, int]] = set()

    def flag(file, row, rule):
        found.add((file, row, rule))
        if row is not None and RULE_CATALOGUE[rule]["severity"] == "ERROR":
            held.add((file, row))

    dm_subjects = {r["SUBJID"] for r in data["dm.csv"][1]}
    for file, (header, records) in data.items():
        spec = RAW[file]
        columns = spec["columns"]
        assert set(columns) <= {h.upper() for h in header}, f"{transfer}/{file} lacks spec columns"
        for name in header:
            if name.upper() not in columns:
                flag(file, None, "RAW-EXTRA-COLUMN")
        for row, r in enumerate(records, 1):
            for col, c in columns.items():
                value, kind = r[col], c["kind"]
                if value == "":
                    if c.get("required"):
                        flag(file, row, "RAW-REQUIRED")
                    continue
                if kind == "subjid":
                    if not re.fullmatch(r"\d{2}-\d{3}", value):
                        flag(file, row, "RAW-SUBJID-FORMAT")
                    elif value[:2] != site:
                        flag(file, row, "RAW-SUBJID-SITE")
                    elif file != "dm.csv" and value not in dm_subjects:
                        flag(file, row, "RAW-SUBJID-UNKNOWN")
                elif kind == "code" and not in_codelist(value, c["codelist"]):
                    flag(file, row, "RAW-CODELIST")
                elif kind == "date":
                    parts = parse_date(value)
                    if parts is None:
                        flag(file, row, "RAW-DATE")
                    elif before((export_day.year, export_day.month, export_day.day), parts):
                        flag(file, row, "FUTURE-DATE")  # not a rule: the generator must never write one
                elif kind == "time":
                    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
                        flag(file, row, "RAW-TIME")
                    elif parse_date(r[c["date"]]) and full_date(r[c["date"]]) is None:
                        flag(file, row, "RAW-TIME-PARTIAL-DATE")
                elif kind == "integer":
                    if not re.fullmatch(r"-?\d+", value) or not c.get("min", -1e18) <= int(value) <= c.get("max", 1e18):
                        flag(file, row, "RAW-INTEGER")
                elif kind == "number" and not re.fullmatch(r"-?\d+(\.\d+)?", value):
                    flag(file, row, "RAW-NUMBER")
                elif kind == "dose_label" and dose_particles(value) is None:
                    flag(file, row, "RAW-DOSE-LABEL")
                elif kind == "visit":
                    allowed = ({v for v, s in SCHEDULE.items() if s["dose"]} if c.get("dosing_only")
                               else {*SCHEDULE, VISITS["unscheduled"]["visit"]})
                    if value not in allowed:
                        flag(file, row, "RAW-VISIT")
                elif kind == "lab_test" and value.upper() not in ALIASES:
                    flag(file, row, "RAW-LB-TEST")
            for rule in spec.get("record_rules", []):
                check_record_rule(file, row, r, rule, flag)
        keys = defaultdict(list)
        for row, r in enumerate(records, 1):
            keys[tuple(r[k].upper() for k in spec["keys"])].append(row)
        for rows in keys.values():
            if len(rows) > 1:
                for row in rows:
                    flag(file, row, "RAW-DUPLICATE")

    check_protocol(data, held, flag)
    check_after_death(data, flag)
    return found


def submission_value(file, column, value):
    """A coded raw value as its codelist's submission value (YES -> Y), so conditions compare alike."""
    c = RAW[file]["columns"][column]
    if c["kind"] != "code":
        return value
    codelist = CODELISTS[c["codelist"]]
    return codelist["values"].get(value.upper() if codelist.get("case_insensitive") else value, value)


def check_record_rule(file, row, r, rule, flag):
    """One `record_rules` entry of the file's schema, applied to one record."""
    kind = rule["rule"]
    if kind in ("RAW-REQUIRED-IF", "RAW-EMPTY-IF"):
        applies = all(submission_value(file, col, r[col]) == v for col, v in rule["when"].items())
        if applies and (r[rule["column"]] == "") == (kind == "RAW-REQUIRED-IF"):
            flag(file, row, kind)
    elif kind == "RAW-DATE-ORDER":
        start, end = parse_date(r[rule["start"]]), parse_date(r[rule["end"]])
        if start and end and before(end, start):
            flag(file, row, kind)
    elif kind == "RAW-RESULT-STATUS":
        if (r[rule["result"]] == "") == (r[rule["status"]] == ""):
            flag(file, row, kind)
    elif kind == "RAW-ONLY-AT-VISIT":
        if r[rule["column"]] == rule["value"] and r["VISIT"] != rule["visit"]:
            flag(file, row, kind)
    elif kind == "RAW-AE-UNCODED" and r["AEDECOD"] == "":
        flag(file, row, kind)
    elif kind == "RAW-AE-SERIOUSNESS":
        if yes(r["AESER"]) != any(yes(r[c]) for c in ("AESDTH", "AESLIFE", "AESHOSP", "AESDISAB", "AESCONG", "AESMIE")):
            flag(file, row, kind)
    elif kind == "RAW-AE-DEATH":
        fatal = r["AEOUT"] == "FATAL"
        if yes(r["AESDTH"]) != fatal or (r["AETOXGR"] == "5") != fatal or (fatal and r["AEENDAT"] == ""):
            flag(file, row, kind)
    elif kind in ("RAW-LB-UNIT", "RAW-LB-RESULT", "RAW-LB-IMPLAUSIBLE"):
        test = LAB["tests"].get(ALIASES.get(r["LBTEST"].upper()))
        if test is None or r["LBSTAT"]:
            return
        # spec section 6, HBV DNA: `IU/mL`, or `<LLOQ` style text (which needs no unit)
        unitless_text = r["LBORRESU"] == "" and "unitless" in test and re.fullmatch(r"<\s*LLOQ", r["LBORRES"])
        if kind == "RAW-LB-UNIT" and r["LBORRESU"] not in test["units"] and not unitless_text:
            flag(file, row, kind)
        elif kind == "RAW-LB-RESULT" and not lab_result_ok(test, r["LBORRES"]):
            flag(file, row, kind)
        elif kind == "RAW-LB-IMPLAUSIBLE" and r["LBORRESU"] in test["units"] and "plausible" in test:
            value = standard(test, r["LBORRES"], r["LBORRESU"])
            if value is not None and not test["plausible"][0] <= value <= test["plausible"][1]:
                flag(file, row, kind)


def check_protocol(data, held, flag):
    """Eligibility and conduct (protocol.yaml), for enrolled subjects, on records not held back."""
    enrol = {r["SUBJID"]: (row, r) for row, r in enumerate(data["enrol.csv"][1], 1)}
    enrolled = {s for s, (_, r) in enrol.items() if yes(r["ENRLFL"])}
    anticoag = {s for s, (_, r) in enrol.items() if yes(r["ANTICOAG"])}
    for row, r in enumerate(data["dm.csv"][1], 1):
        if r["SUBJID"] in enrolled and not 18 <= int(r["AGE"]) <= 65:
            flag("dm.csv", row, "PROT-AGE")
    for subject in enrolled:
        row, r = enrol[subject]
        onset, diagnosis = full_date(r["ONSETDAT"]), full_date(r["DIAGDAT"])
        limit = onset and date(onset.year + (onset.month + 2) // 12, (onset.month + 2) % 12 + 1,
                               min(onset.day, 28))
        if onset and diagnosis and diagnosis > limit:
            flag("enrol.csv", row, "PROT-DIAG-DELAY")
    for row, r in enumerate(data["mrs.csv"][1], 1):
        if r["SUBJID"] in enrolled and r["VISIT"] == "SCREENING" and ("mrs.csv", row) not in held and r["MRSSCORE"]:
            score = int(r["MRSSCORE"])
            if r["MRSTYPE"] == "CURRENT" and score < 2:
                flag("mrs.csv", row, "PROT-MRS-ENROL")
            if r["MRSTYPE"] == "PRE-MORBID" and score > 1:
                flag("mrs.csv", row, "PROT-MRS-PREMORBID")
    antibody_positive = set()
    for row, r in enumerate(data["lb.csv"][1], 1):
        code = ALIASES.get(r["LBTEST"].upper())
        if r["SUBJID"] not in enrolled or r["VISIT"] != "SCREENING" or ("lb.csv", row) in held or r["LBSTAT"]:
            continue
        test, result = LAB["tests"][code], r["LBORRES"]
        if code in ("NMDARAB", "LGI1AB") and result != "NEGATIVE":
            antibody_positive.add(r["SUBJID"])
        if code in ("HBSAG", "HCAB", "TPALLAB", "HIV12AB", "HBCAB") and result == "POSITIVE":
            flag("lb.csv", row, "PROT-SEROLOGY")
        value = standard(test, result, r["LBORRESU"]) if test["result"] == "numeric" else None
        on_anticoag = r["SUBJID"] in anticoag
        for e in PROTOCOL["eligibility"]:
            if e.get("test") != code or value is None:
                continue
            uln = float(r["LBORNRHI"]) * test["units"][r["LBORRESU"]] if r["LBORNRHI"] else None
            if (e["kind"] == "lab_min" and value < e["min"]
                    or e["kind"] == "lab_max" and value > (e.get("max_on_anticoagulant") if on_anticoag
                                                           and "max_on_anticoagulant" in e else e["max"])
                    or e["kind"] == "lab_max_uln" and uln and value > uln * (
                        e.get("max_uln_on_anticoagulant") if on_anticoag and "max_uln_on_anticoagulant" in e
                        else e["max_uln"])):
                flag("lb.csv", row, e["rule"])
    for subject in enrolled - antibody_positive:
        flag("enrol.csv", enrol[subject][0], "PROT-ANTIBODY")
    first_dose = {r["SUBJID"]: full_date(r["EXSTDAT"]) for r in data["ex.csv"][1] if r["VISIT"] == "DAY 1"}
    for row, r in enumerate(data["ex.csv"][1], 1):
        if r["SUBJID"] not in enrolled or ("ex.csv", row) in held or not yes(r["EXYN"]):
            continue
        day = (full_date(r["EXSTDAT"]) - first_dose[r["SUBJID"]]).days + 1
        low, high = SCHEDULE[r["VISIT"]]["window"]
        if not low <= day <= high:
            flag("ex.csv", row, "PROT-VISIT-WINDOW")
        _, e = enrol[r["SUBJID"]]
        if e["PHASE"] == "ESCALATION" and dose_particles(r["EXDOSE"]) != COHORT_DOSE[e["COHORT"]]:
            flag("ex.csv", row, "PROT-COHORT-DOSE")
        if e["PHASE"] == "EXPANSION" and r["EXDOSE"]:
            flag("ex.csv", row, "RAW-EXPANSION-DOSE")


def check_after_death(data, flag):
    """A subject who died has no record dated after the death (not a rule: the generator must not write one)."""
    deaths = {r["SUBJID"]: full_date(r["AEENDAT"]) for r in data["ae.csv"][1] if r["AEOUT"] == "FATAL"}
    for file, column in (("ex.csv", "EXSTDAT"), ("lb.csv", "LBDAT"), ("mrs.csv", "MRSDAT"), ("ae.csv", "AESTDAT")):
        for row, r in enumerate(data[file][1], 1):
            when = full_date(r[column])
            if r["SUBJID"] in deaths and when and when > deaths[r["SUBJID"]]:
                flag(file, row, "AFTER-DEATH")


# --- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    return generate_trial(tmp_path_factory.mktemp("planted") / "exports")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return generate_trial(tmp_path_factory.mktemp("clean") / "exports", plant_findings=False)


def planted_in(planted, transfer: Path) -> set[tuple[str, int | None, str]]:
    rows = planted[(planted.SITEID == transfer.parent.name[5:]) & (planted.TRANSFER == transfer.name)]
    return {(r.FILE, None if pd.isna(r.ROW) else int(r.ROW), r.RULE) for r in rows.itertuples()}


def records(exports: Path, file: str, transfers_=None) -> list[dict[str, str]]:
    """Records of `file` over the CURRENT transfers, each with its SITE."""
    out = []
    for t in transfers_ or current(exports):
        out += [{**r, "SITE": t.parent.name[5:]} for r in read(t, file)[1]]
    return out


# --- layout and manifests ----------------------------------------------------------------------------
def test_layout_is_the_specs(trial):
    exports = trial.exports
    assert sorted(p.name for p in exports.iterdir()) == ["site-01", "site-02", "site-03", "site-04", "site-05",
                                                         "unblinded"]
    assert [p.name for p in (exports / "unblinded").iterdir()] == ["randomization.csv"]
    for site in exports.glob("site-*"):
        folders = sorted(p.name for p in site.iterdir())
        assert all(re.fullmatch(r"\d{8}T\d{6}", f) for f in folders)
        assert folders[:2] == ["20261116T220005", "20261123T220005"]
    for t in transfers(exports):
        assert {p.name for p in t.iterdir()} <= SITE_FILES
        m = manifest(t)
        assert list(m) == ["site", "exported_at", "encoding", "files"] and list(m["files"]) == FILES
        assert m["site"] == t.parent.name[5:]
        assert m["exported_at"] == f"{t.name[:4]}-{t.name[4:6]}-{t.name[6:11]}:{t.name[11:13]}:{t.name[13:]}Z"


def test_newest_transfer_of_the_last_site_is_still_being_copied(trial):
    in_flight = [t for t in transfers(trial.exports) if t not in complete(trial.exports)]
    assert [(t.parent.name, t.name) for t in in_flight] == [("site-05", "20261124T220005")]
    assert not (in_flight[0] / "mrs.csv").exists() and "mrs.csv" in manifest(in_flight[0])["files"]
    rejected = trial.planted[trial.planted.RULE == "TRF-MISSING-FILE"]
    assert rejected[["SITEID", "TRANSFER", "FILE"]].values.tolist() == [["05", "20261124T220005", "mrs.csv"]]
    assert rejected.ROW.isna().all() and rejected.SUBJID.isna().all()


def test_manifests_match_their_files(trial):
    for t in transfers(trial.exports):
        for file, entry in manifest(t)["files"].items():
            if not (t / file).exists():
                continue
            data = (t / file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], (t, file)
            assert len(read(t, file)[1]) == entry["rows"], (t, file)


def test_encodings_are_as_declared(trial):
    encodings = {}
    for t in current(trial.exports):
        encodings[t.parent.name] = manifest(t)["encoding"]
        raw = b"".join((t / f).read_bytes() for f in FILES)
        if encodings[t.parent.name] == "gb18030":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")  # Chinese terms in gb18030 bytes
        for f in FILES:
            decode(t, f)
    assert encodings == {"site-01": "utf-8", "site-02": "gb18030", "site-03": "utf-8", "site-04": "utf-8",
                         "site-05": "utf-8"}
    boms = {t.parent.name for t in current(trial.exports) if (t / "dm.csv").read_bytes().startswith(b"\xef\xbb\xbf")}
    assert boms == {"site-03"}


# --- conformance: the oracle against the planted findings ---------------------------------------------
def test_clean_trial_has_only_inherent_findings(clean):
    for t in complete(clean.exports):
        assert {rule for _, _, rule in findings(t)} <= INHERENT, t
    assert set(clean.planted.RULE) == INHERENT | {"TRF-MISSING-FILE"}
    for t in current(clean.exports):
        assert findings(t) == planted_in(clean.planted, t), t


def test_current_transfers_report_exactly_the_planted_findings(trial):
    for t in current(trial.exports):
        assert findings(t) == planted_in(trial.planted, t), t
    assert set(trial.planted.TRANSFER) == {"20261123T220005", "20261124T220005"}


def test_default_trial_plants_every_required_finding_once_per_kind(trial):
    counts = Counter(trial.planted.RULE)
    assert REQUIRED_PLANTS <= set(counts)
    assert counts["RAW-DUPLICATE"] == 2 and counts["RAW-DATE"] == 2
    assert all(counts[rule] == 1 for rule in REQUIRED_PLANTS - {"RAW-DUPLICATE", "RAW-DATE"})
    assert counts["RAW-EXTRA-COLUMN"] == 6 and counts["RAW-AE-UNCODED"] >= 2
    for r in trial.planted.itertuples():
        assert r.SEVERITY == RULE_CATALOGUE[r.RULE]["severity"]
    record_level = trial.planted[trial.planted.ROW.notna()]
    assert set(record_level.SITEID) == {"01", "02", "03", "04", "05"}
    planted_subjects = record_level[~record_level.RULE.isin(["RAW-AE-UNCODED", "RAW-SUBJID-UNKNOWN"])]
    assert planted_subjects.groupby("SUBJID").RULE.nunique().max() == 1  # one planted finding per subject
    assert not set(trial.planted.FILE[trial.planted.FILE.isin(["dm.csv", "enrol.csv"])
                                      & (trial.planted.SEVERITY == "ERROR")])


def test_planted_rows_hold_their_defects(trial):
    t_of = {t.parent.name[5:]: t for t in current(trial.exports)}
    for p in trial.planted[trial.planted.ROW.notna()].itertuples():
        t = t_of[p.SITEID]
        rows = read(t, p.FILE)[1]
        r = rows[p.ROW - 1]
        assert r["SUBJID"] == p.SUBJID
        enrolled = {e["SUBJID"]: e for e in read(t, "enrol.csv")[1]}
        if p.RULE == "RAW-DATE":
            value = r["LBDAT"] if p.FILE == "lb.csv" else r["MRSDAT"]
            assert re.fullmatch(r"31 (FEB|APR|JUN|SEP|NOV) \d{4}|\d{4}-13-\d{2}", value)
        elif p.RULE == "RAW-DATE-ORDER":
            assert full_date(r["AEENDAT"]) < full_date(r["AESTDAT"])
        elif p.RULE == "RAW-LB-IMPLAUSIBLE":
            assert (ALIASES[r["LBTEST"].upper()], r["LBORRES"], r["LBORRESU"]) == ("HGB", "900", "g/L")
        elif p.RULE == "RAW-LB-UNIT":
            assert r["LBORRESU"] not in LAB["tests"][ALIASES[r["LBTEST"].upper()]]["units"]
        elif p.RULE == "RAW-LB-TEST":
            assert r["LBTEST"] == "Ferritin"
        elif p.RULE == "RAW-INTEGER":
            assert r["MRSSCORE"] == "7"
        elif p.RULE == "RAW-REQUIRED-IF":
            assert yes(r["EXYN"]) and r["EXSTDAT"] == ""
        elif p.RULE == "RAW-DUPLICATE":
            twins = [i for i, o in enumerate(rows, 1) if (o["SUBJID"], o["AESPID"]) == (r["SUBJID"], r["AESPID"])]
            assert len(twins) == 2 and p.ROW in twins
        elif p.RULE == "RAW-VISIT":
            assert r["VISIT"] == "DAY 10"
        elif p.RULE == "RAW-SUBJID-UNKNOWN":
            assert r["SUBJID"] not in {d["SUBJID"] for d in read(t, "dm.csv")[1]}
        elif p.RULE == "PROT-AGE":
            assert r["AGE"] == "66" and yes(enrolled[r["SUBJID"]]["ENRLFL"])
        elif p.RULE == "PROT-LAB":
            test = LAB["tests"]["NEUT"]
            assert r["VISIT"] == "SCREENING" and standard(test, r["LBORRES"], r["LBORRESU"]) == pytest.approx(1.2)
        elif p.RULE == "PROT-MRS-PREMORBID":
            assert (r["MRSTYPE"], r["MRSSCORE"]) == ("PRE-MORBID", "2")
        elif p.RULE == "PROT-VISIT-WINDOW":
            day1 = next(full_date(o["EXSTDAT"]) for o in rows if o["SUBJID"] == r["SUBJID"] and o["VISIT"] == "DAY 1")
            assert r["VISIT"] == "DAY 14" and (full_date(r["EXSTDAT"]) - day1).days + 1 == 18
        elif p.RULE == "PROT-DIAG-DELAY":
            assert (full_date(r["DIAGDAT"]) - full_date(r["ONSETDAT"])).days > 120
        elif p.RULE == "PROT-COHORT-DOSE":
            assert enrolled[r["SUBJID"]]["COHORT"] == "1" and dose_particles(r["EXDOSE"]) == 5.0e10
        elif p.RULE == "RAW-AE-UNCODED":
            assert r["AEDECOD"] == "" and r["AESOC"] == ""


# --- realism -----------------------------------------------------------------------------------------
def test_headers_line_endings_and_extra_column_vary_by_site(trial):
    headers, endings = {}, {}
    for t in current(trial.exports):
        header = read(t, "lb.csv")[0]
        headers[t.parent.name] = header
        endings[t.parent.name] = b"\r\n" in (t / "lb.csv").read_bytes()
        for f in FILES:
            names = [h.upper() for h in read(t, f)[0]]
            assert sorted(set(names) - {"SITE_COMMENT"}) == sorted(RAW[f]["columns"]) and len(set(names)) == len(names)
            assert ("SITE_COMMENT" in names) == (t.parent.name == "site-04")
    cases = Counter("upper" if all(h.isupper() for h in hs) else "lower" if all(h.islower() for h in hs)
                    else "mixed" for hs in headers.values())
    assert cases == {"upper": 3, "lower": 1, "mixed": 1}
    assert len({tuple(h.upper() for h in hs) for hs in headers.values()}) == 5  # column order differs by site
    assert set(endings.values()) == {True, False}


def test_dates_come_in_both_forms_with_partial_dates(trial):
    cdash = re.compile(r"(\d{2}|UN) ([A-Z]{3}|UNK) \d{4}")
    for file, column in (("lb.csv", "LBDAT"), ("ae.csv", "AESTDAT")):
        mixed = [t for t in current(trial.exports)
                 if {bool(cdash.fullmatch(r[column])) for r in read(t, file)[1] if r[column]} == {True, False}]
        assert mixed, f"no {file} mixes both date forms"
    births = [r["BRTHDAT"] for r in records(trial.exports, "dm.csv")]
    assert sum(bool(re.fullmatch(r"\d{4}|UN UNK \d{4}", b)) for b in births) > len(births) / 3
    starts = [r["AESTDAT"] for r in records(trial.exports, "ae.csv")]
    assert any(re.fullmatch(r"UN [A-Z]{3} 2026", s) for s in starts)
    assert any(re.fullmatch(r"2026-\d{2}", s) for s in starts)
    assert starts.count("UN UNK 2026") == 1


def test_every_alias_and_unit_is_used(clean):
    lb = records(clean.exports, "lb.csv")
    names = {r["LBTEST"].upper() for r in lb}
    spec_aliases = {a.upper() for test in LAB["tests"].values() for a in test["aliases"]} | {"APTT"}
    assert spec_aliases <= names
    used = defaultdict(set)
    for r in lb:
        if r["LBTEST"].upper() in ALIASES and not r["LBSTAT"]:
            used[ALIASES[r["LBTEST"].upper()]].add(r["LBORRESU"])
    for code, test in LAB["tests"].items():
        assert set(test["units"]) | ({""} if "unitless" in test else set()) == used[code], code
    assert {"aPTT", "APTT"} <= {r["LBTEST"] for r in lb}


def test_free_text_needs_quoting_and_holds_chinese(trial):
    raw = b"".join((t / f).read_bytes() for t in current(trial.exports) for f in FILES)
    assert b'"Headache, frontal"' in raw and b'"Nasal ""burning"" after dosing"' in raw
    for file, column in (("ae.csv", "AETERM"), ("enrol.csv", "SFREASON"), ("ex.csv", "EXREASND"),
                         ("lb.csv", "LBREASND")):
        values = [r[column] for r in records(trial.exports, file)]
        assert any("\n" in v for v in values) and any("," in v or '"' in v for v in values), column
    terms = [r["AETERM"] for r in records(trial.exports, "ae.csv")]
    assert {"头痛", "鼻腔不适", "发热"} & set(terms) and any(re.search(r"[\u4e00-\u9fff]", t) for t in terms)
    gb = [r["AETERM"] for r in records(trial.exports, "ae.csv") if r["SITE"] == "02"]
    assert gb and all(re.search(r"[\u4e00-\u9fff]", t) for t in gb)


def test_screen_failures_missed_doses_and_unscheduled_visits(trial):
    enrol = records(trial.exports, "enrol.csv")
    failures = {r["SUBJID"] for r in enrol if not yes(r["ENRLFL"])}
    assert len(failures) == 6 and all(r["SFREASON"] for r in enrol if r["SUBJID"] in failures)
    assert not failures & {r["SUBJID"] for r in records(trial.exports, "ex.csv")}
    assert {r["VISIT"] for f in ("lb.csv", "mrs.csv") for r in records(trial.exports, f)
            if r["SUBJID"] in failures} == {"SCREENING"}
    missed = [r for r in records(trial.exports, "ex.csv") if not yes(r["EXYN"])]
    assert len(missed) >= 4 and all(r["EXREASND"] and not (r["EXSTDAT"] or r["EXDOSE"] or r["KITNO"]) for r in missed)
    for file in ("lb.csv", "mrs.csv"):
        assert any(r["VISIT"] == "UNSCHEDULED" for r in records(trial.exports, file))


def test_unscheduled_visits_fall_between_scheduled_ones(trial):
    for file, column in (("lb.csv", "LBDAT"), ("mrs.csv", "MRSDAT")):
        visits = defaultdict(dict)
        for r in records(trial.exports, file):
            visits[r["SUBJID"]].setdefault(r["VISIT"], full_date(r[column]))
        for subject, v in visits.items():
            if "UNSCHEDULED" in v and v["UNSCHEDULED"]:
                scheduled = sorted(d for k, d in v.items() if k != "UNSCHEDULED" and d)
                assert v["UNSCHEDULED"] not in scheduled and scheduled[0] < v["UNSCHEDULED"]


def test_lab_results_are_realistic(trial):
    lb = records(trial.exports, "lb.csv")
    assert sum(r["LBSTAT"] == "NOT DONE" for r in lb) >= 5
    assert all(r["LBREASND"] and not (r["LBORRES"] or r["LBORRESU"]) for r in lb if r["LBSTAT"])
    assert any(re.fullmatch(r"<\d+(\.\d+)?", r["LBORRES"]) for r in lb if ALIASES.get(r["LBTEST"].upper()) == "BILI")
    assert {r["LBORRES"] for r in lb if r["LBTEST"] == "HBV DNA"} >= {"<LLOQ"}
    titres = [r for r in lb if re.fullmatch(r"1:\d+", r["LBORRES"])]
    assert {r["LBSPEC"] for r in titres} == {"SERUM", "CEREBROSPINAL FLUID"}
    assert {"POSITIVE", "NEGATIVE"} <= {r["LBORRES"] for r in lb}
    enrol = {r["SUBJID"]: r for r in records(trial.exports, "enrol.csv")}
    for r in titres:
        assert r["LBTEST"] == {"NMDAR": "anti-NMDAR Ab", "LGI1": "anti-LGI1 Ab"}[enrol[r["SUBJID"]]["ABTYPE"]]
    serology = [r for r in lb if ALIASES.get(r["LBTEST"].upper()) in ("HBSAG", "HBCAB", "HCAB", "TPALLAB", "HIV12AB")]
    assert {r["LBORRES"] for r in serology if yes(enrol[r["SUBJID"]]["ENRLFL"])} == {"NEGATIVE"}
    assert all(r["LBORNRLO"] and r["LBORNRHI"] for r in lb
               if LAB["tests"].get(ALIASES.get(r["LBTEST"].upper()), {}).get("result") == "numeric"
               and r["LBTEST"] != "Ferritin" and not r["LBSTAT"])


def test_labs_follow_the_schedule(trial):
    sex = {r["SUBJID"]: r["SEX"][0] for r in records(trial.exports, "dm.csv")}
    panels = {"SCREENING": {"NEUT", "LYM", "WBC", "HGB", "PLAT", "AST", "ALT", "BILI", "CREAT", "GLUC", "INR",
                            "APTT", "HBSAG", "HBCAB", "HCAB", "TPALLAB", "HIV12AB", "HBVDNA", "NMDARAB", "LGI1AB"}}
    haem_chem = {"NEUT", "LYM", "WBC", "HGB", "PLAT", "AST", "ALT", "BILI", "CREAT", "GLUC"}
    panels["DAY 1"] = panels["DAY 28"] = panels["DAY 49 (END OF STUDY)"] = haem_chem | {"INR", "APTT"}
    panels["DAY 7"] = panels["DAY 14"] = haem_chem
    seen = defaultdict(set)
    for r in records(trial.exports, "lb.csv"):
        if r["LBTEST"].upper() in ALIASES:
            seen[r["SUBJID"], r["VISIT"]].add(ALIASES[r["LBTEST"].upper()])
    for (subject, visit), tests in seen.items():
        if visit in panels:
            expected = panels[visit] | ({"HCG"} if visit == "SCREENING" and sex[subject] == "F" else set())
            assert tests == expected, (subject, visit)
    lb_times = {(r["SUBJID"], r["LBDAT"]): r["LBTIM"] for r in records(trial.exports, "lb.csv") if r["VISIT"] == "DAY 1"}
    for r in records(trial.exports, "ex.csv"):
        if r["VISIT"] == "DAY 1":
            assert lb_times[r["SUBJID"], r["EXSTDAT"]] < r["EXSTTIM"]


def test_doses_and_kits(trial):
    ex = records(trial.exports, "ex.csv")
    enrol = {r["SUBJID"]: r for r in records(trial.exports, "enrol.csv")}
    escalation = [r for r in ex if r["SUBJID"] in enrol and enrol[r["SUBJID"]]["PHASE"] == "ESCALATION" and r["EXDOSE"]]
    assert {re.sub(r"[\d.]+", "N", r["EXDOSE"]) for r in escalation} == {"NEN", "NeN", "N", "NxN^N"}
    assert {r["EXDOSU"] for r in escalation} == {"PARTICLES"} and not any(r["KITNO"] for r in escalation)
    expansion = [r for r in ex if r["SUBJID"] in enrol and enrol[r["SUBJID"]]["PHASE"] == "EXPANSION" and yes(r["EXYN"])]
    assert not any(r["EXDOSE"] or r["EXDOSU"] for r in expansion)
    kits = [r["KITNO"] for r in expansion]
    assert len(set(kits)) == len(kits) and len({re.sub(r"\d", "9", k) for k in kits}) == 1
    arm = {s: t for s, t in zip(trial.subjects.SUBJID, trial.subjects.TRTGRP)}
    ranges = {g: sorted(int(r["KITNO"][1:]) for r in expansion if arm[r["SUBJID"]] == g) for g in ("EXOSOME", "PLACEBO")}
    assert ranges["EXOSOME"][0] < ranges["PLACEBO"][-1] and ranges["PLACEBO"][0] < ranges["EXOSOME"][-1]


def test_adverse_events(trial):
    ae = records(trial.exports, "ae.csv")
    enrol = {r["SUBJID"]: r for r in records(trial.exports, "enrol.csv")}
    fatal = [r for r in ae if r["AEOUT"] == "FATAL"]
    assert len(fatal) == 1 and yes(fatal[0]["AESDTH"]) and full_date(fatal[0]["AEENDAT"])
    assert any(yes(r["AEONGO"]) and not r["AEENDAT"] for r in ae)
    assert any(r["AEDECOD"] for r in ae) and sum(not r["AEDECOD"] for r in ae) < len(ae) / 3
    for r in ae:
        assert bool(r["AEDLT"]) == (enrol[r["SUBJID"]]["PHASE"] == "ESCALATION")
    dead = fatal[0]["SUBJID"]
    assert not any(r["VISIT"] == "DAY 49 (END OF STUDY)" for r in records(trial.exports, "mrs.csv")
                   if r["SUBJID"] == dead)


def test_rankin_schedule(trial):
    enrol = {r["SUBJID"]: r for r in records(trial.exports, "enrol.csv")}
    by_subject = defaultdict(dict)
    for r in records(trial.exports, "mrs.csv"):
        by_subject[r["SUBJID"]][r["VISIT"], r["MRSTYPE"]] = r["MRSSCORE"]
    for subject, scores in by_subject.items():
        assert {v for v, kind in scores if kind == "PRE-MORBID"} == {"SCREENING"}
        assert {v for v, _ in scores} <= {"SCREENING", "DAY 1", "DAY 7", "DAY 14", "DAY 28",
                                         "DAY 49 (END OF STUDY)", "UNSCHEDULED"}
        if yes(enrol[subject]["ENRLFL"]) and subject not in set(trial.planted.SUBJID.dropna()):
            assert int(scores["SCREENING", "CURRENT"]) >= 2 and int(scores["SCREENING", "PRE-MORBID"]) <= 1
    complete_ = [s for s in by_subject.values() if ("DAY 49 (END OF STUDY)", "CURRENT") in s]
    assert complete_ and len(complete_) < len(by_subject)  # some subjects are mid-study at export


def test_older_transfers_are_snapshots(trial):
    grown = 0
    for site in trial.exports.glob("site-*"):
        older, newer = sorted(site.iterdir())[:2]
        for file in FILES:
            old, new = read(older, file)[1], read(newer, file)[1]
            assert 0 < len(old) <= len(new)
            grown += len(new) - len(old)
        assert all(full_date(r["LBDAT"]) <= date(2026, 11, 16) for r in read(older, "lb.csv")[1]
                   if full_date(r["LBDAT"]))
    assert grown > 0


# --- randomization and subjects ------------------------------------------------------------------------
def test_randomization_is_balanced_and_matches_enrol(trial):
    header, *rows = list(csv.reader(io.StringIO((trial.exports / "unblinded" / "randomization.csv")
                                                .read_text(encoding="utf-8"), newline="")))
    assert header == list(RAW["randomization.csv"]["columns"])
    rand = [dict(zip(header, r)) for r in rows]
    assert [r["RANDNO"] for r in rand] == [f"R{i:03d}" for i in range(1, len(rand) + 1)]
    assert Counter(r["TRTGRP"] for r in rand) == {"EXOSOME": 10, "PLACEBO": 10}
    assert {(r["TRTGRP"], r["DOSE"]) for r in rand} == {("EXOSOME", "5.0E10"), ("PLACEBO", "0")}
    enrol = {r["SUBJID"]: r for r in records(trial.exports, "enrol.csv")}
    assert {r["SUBJID"]: r["RANDNO"] for r in rand} == {s: e["RANDNO"] for s, e in enrol.items() if e["RANDNO"]}
    truth = trial.subjects.set_index("SUBJID")
    for r in rand:
        assert truth.loc[r["SUBJID"], "TRTGRP"] == r["TRTGRP"] and truth.loc[r["SUBJID"], "RANDNO"] == r["RANDNO"]
        assert full_date(r["RANDDAT"]) <= date(2026, 11, 23)


def test_subjects_frame_is_the_truth(trial):
    s = trial.subjects
    assert list(s.columns) == ["SUBJID", "SITEID", "ENRLFL", "PHASE", "COHORT", "RANDNO", "TRTGRP", "DOSE"]
    assert (s.ENRLFL == "Y").sum() == 38 and (s.ENRLFL == "N").sum() == 6
    assert s[s.PHASE == "ESCALATION"].COHORT.value_counts().to_dict() == {"1": 6, "2": 6, "3": 6}
    assert (s.PHASE == "EXPANSION").sum() == 20
    assert s[s.TRTGRP == "EXOSOME"].DOSE.eq(5.0e10).all() and s[s.TRTGRP == "PLACEBO"].DOSE.eq(0).all()
    assert s[s.ENRLFL == "N"].DOSE.isna().all() and s[s.ENRLFL == "N"].PHASE.isna().all()
    enrol = {r["SUBJID"]: r for r in records(trial.exports, "enrol.csv")}
    assert set(s.SUBJID) == set(enrol)
    for r in s.itertuples():
        e = enrol[r.SUBJID]
        assert e["PHASE"] == ("" if pd.isna(r.PHASE) else r.PHASE)
        assert e["COHORT"] == ("" if pd.isna(r.COHORT) else r.COHORT)


# --- determinism, sizes, arguments -------------------------------------------------------------------
def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = generate_trial(tmp_path / "a", subjects=12, sites=3, seed=7)
    again = generate_trial(tmp_path / "b", subjects=12, sites=3, seed=7)
    other = generate_trial(tmp_path / "c", subjects=12, sites=3, seed=8)
    assert tree(first.exports) == tree(again.exports)
    assert first.planted.equals(again.planted) and first.subjects.equals(again.subjects)
    assert tree(first.exports) != tree(other.exports)


@pytest.mark.parametrize("subjects, sites, transfers", [(5, 1, 1), (9, 2, 3), (60, 7, 2)])
def test_other_sizes_report_exactly_the_planted_findings(tmp_path, subjects, sites, transfers):
    trial = generate_trial(tmp_path / "x", subjects=subjects, sites=sites, transfers=transfers, seed=3)
    assert len(list((tmp_path / "x").glob("site-*"))) == sites
    assert (trial.subjects.ENRLFL == "Y").sum() == subjects
    for t in current(trial.exports):
        assert findings(t) == planted_in(trial.planted, t), t
    assert ("TRF-MISSING-FILE" in set(trial.planted.RULE)) == (sites >= 2 and transfers >= 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"subjects": 4}, "subjects"), ({"sites": 0}, "sites"), ({"sites": 100}, "sites"),
    ({"transfers": 0}, "transfers"), ({"seed": -1}, "seed"), ({"subjects": 5000, "sites": 5}, "sites >= "),
    ({"subjects": 10.0}, "whole number"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_trial(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        generate_trial(tmp_path)
