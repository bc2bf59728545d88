"""Synthetic MESAE site exports: the raw transfers the sites would send, for demos, tests and benchmarks.

`generate_trial` writes an exports root that follows site-export-spec.md to the letter, using every
date form, unit, test name, encoding and CSV quirk the spec allows, and plants the protocol deviations
and data errors the pipeline must report, recording the exact file and row of each, so a test can
demand that the pipeline finds exactly those and nothing else. The same arguments give the same bytes:
randomness comes from one seeded PCG64 stream and time from constants, never from the clock. Records
are built as whole numpy columns, never row by row, so benchmark-size trials generate in seconds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd

TEXT = np.dtypes.StringDType()
DAY = np.timedelta64(1, "D")
NO_DATE = np.datetime64("NaT", "D")

STUDY_START = np.datetime64("2026-01-05")
CURRENT_EXPORT = np.datetime64("2026-11-23T22:00:05")  # the newest complete transfer of every site
TRANSFER_INTERVAL = np.timedelta64(7, "D")
IN_FLIGHT_EXPORT = CURRENT_EXPORT + np.timedelta64(1, "D")  # the next night's transfer, still being copied
CURRENT_DAY = CURRENT_EXPORT.astype("datetime64[D]")
LAST_DAY = IN_FLIGHT_EXPORT.astype("datetime64[D]")
DEFAULT_SITES = 5
MAX_SUBJECTS_PER_SITE = 990  # SUBJID SS-NNN has three digits; a few numbers stay free for planted unknown subjects

COLUMNS = {
    "dm.csv": ["SUBJID", "BRTHDAT", "AGE", "SEX", "RACE", "ETHNIC", "RFICDAT"],
    "enrol.csv": ["SUBJID", "ENRLFL", "SFREASON", "PHASE", "COHORT", "RANDNO", "ABTYPE", "ONSETDAT",
                  "DIAGDAT", "ANTICOAG"],
    "ex.csv": ["SUBJID", "VISIT", "EXYN", "EXREASND", "EXSTDAT", "EXSTTIM", "EXDOSE", "EXDOSU", "KITNO"],
    "ae.csv": ["SUBJID", "AESPID", "AETERM", "AEDECOD", "AEPTCD", "AELLT", "AELLTCD", "AEHLT", "AEHLTCD",
               "AEHLGT", "AEHLGTCD", "AEBODSYS", "AEBDSYCD", "AESOC", "AESOCCD", "AESTDAT", "AEENDAT",
               "AEONGO", "AETOXGR", "AESER", "AESDTH", "AESLIFE", "AESHOSP", "AESDISAB", "AESCONG", "AESMIE",
               "AEREL", "AEACN", "AEOUT", "AEDLT"],
    "lb.csv": ["SUBJID", "VISIT", "LBDAT", "LBTIM", "LBCAT", "LBTEST", "LBSPEC", "LBORRES", "LBORRESU",
               "LBORNRLO", "LBORNRHI", "LBSTAT", "LBREASND"],
    "mrs.csv": ["SUBJID", "VISIT", "MRSDAT", "MRSTYPE", "MRSSCORE", "MRSSTAT"],
}
FILES = tuple(COLUMNS)
EXTRA_COLUMN = "SITE_COMMENT"
# Columns that may hold a comma, quote or line break; every other column is written from vocabularies
# and formats without them, so only these need the (costly) quoting check.
FREE_TEXT = {"AETERM", "AEDECOD", "AELLT", "AEHLT", "AEHLGT", "AEBODSYS", "AESOC", "SFREASON", "EXREASND",
             "LBREASND", EXTRA_COLUMN}
SITE_COMMENTS = ["", "SDV done", "Query answered, see EDC", "数据已核查"]

# Every finding this generator can plant; the `_plant` column of a record holds an index into RULES.
SEVERITY = {
    "TRF-MISSING-FILE": "ERROR", "RAW-EXTRA-COLUMN": "WARNING", "RAW-AE-UNCODED": "WARNING",
    "RAW-DATE": "ERROR", "RAW-DATE-ORDER": "ERROR", "RAW-LB-IMPLAUSIBLE": "ERROR", "RAW-LB-UNIT": "ERROR",
    "RAW-LB-TEST": "ERROR", "RAW-INTEGER": "ERROR", "RAW-REQUIRED-IF": "ERROR", "RAW-DUPLICATE": "ERROR",
    "RAW-VISIT": "ERROR", "RAW-SUBJID-UNKNOWN": "ERROR",
    "PROT-AGE": "WARNING", "PROT-LAB": "WARNING", "PROT-MRS-PREMORBID": "WARNING",
    "PROT-VISIT-WINDOW": "WARNING", "PROT-DIAG-DELAY": "WARNING", "PROT-COHORT-DOSE": "WARNING",
}
RULES = list(SEVERITY)
UNCODED = RULES.index("RAW-AE-UNCODED")

MONTHS = np.array(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
                  dtype=TEXT)
DOSE_VISITS = np.array(["DAY 1", "DAY 2", "DAY 3", "DAY 4", "DAY 5", "DAY 6", "DAY 7", "DAY 14", "DAY 21",
                        "DAY 28"], dtype=TEXT)
ASSESSMENT_VISITS = np.array(["SCREENING", "DAY 1", "DAY 7", "DAY 14", "DAY 28", "DAY 49 (END OF STUDY)",
                              "UNSCHEDULED"], dtype=TEXT)
SCREENING, BASELINE, WEEK1, DAY14, DAY28, END_OF_STUDY, UNSCHEDULED = range(7)

# Dose labels as printed on the kits: one row per escalation dose, one column per label form.
COHORT_DOSES = np.array([2.5e10, 5.0e10, 1.0e11])
DSMB_DOSE = 5.0e10
DOSE_LABELS = np.array([["2.5E10", "2.5e10", "25000000000", "2.5x10^10"],
                        ["5.0E10", "5.0e10", "50000000000", "5.0x10^10"],
                        ["1.0E11", "1.0e11", "100000000000", "1.0x10^11"]], dtype=TEXT)

# --- laboratory -------------------------------------------------------------------------------------
LAB_TESTS = ("NEUT", "LYM", "WBC", "HGB", "PLAT", "AST", "ALT", "BILI", "CREAT", "GLUC", "INR", "APTT",
             "HBSAG", "HBCAB", "HCAB", "TPALLAB", "HIV12AB", "HBVDNA", "NMDARAB", "LGI1AB", "HCG")
T = {code: i for i, code in enumerate(LAB_TESTS)}
N_NUMERIC = T["APTT"] + 1
HAEMATOLOGY, CHEMISTRY, COAGULATION = range(0, 5), range(5, 10), range(10, 12)
SEROLOGY = range(T["HBSAG"], T["HBVDNA"] + 1)
CATEGORY = np.array(["HEMATOLOGY"] * 5 + ["CHEMISTRY"] * 5 + ["COAGULATION"] * 2 + ["SEROLOGY"] * 6
                    + ["IMMUNOLOGY"] * 2 + ["CHEMISTRY"], dtype=TEXT)
SPECIMENS = np.array(["BLOOD", "SERUM", "PLASMA", "CEREBROSPINAL FLUID"], dtype=TEXT)
BLOOD, SERUM, PLASMA, CSF = range(4)
TEST_SPECIMEN = [BLOOD] * 5 + [SERUM] * 5 + [PLASMA] * 2 + [SERUM] * 9
# Results in standard units: mean, sd, and the bounds drawn values stay in. The bounds sit inside the
# plausible ranges and inside the protocol limits against every local lab's ULN below, so no enrolled
# subject breaks an eligibility criterion unless one is planted.
GENERATION = np.array([
    [3.8, 1.2, 1.8, 8.0], [1.8, 0.5, 0.8, 3.5], [6.2, 1.5, 3.6, 10.5], [138, 13, 105, 170],
    [230, 55, 120, 400], [24, 8, 10, 60], [26, 10, 8, 70], [10, 4, 3.0, 22], [72, 14, 45, 120],
    [5.2, 0.8, 3.6, 9.0], [1.0, 0.08, 0.85, 1.35], [31, 3.5, 24, 42]])
# Each local lab prints its own test names and units (spec section 6): name, unit, reference range in
# that unit, decimals reported. Between them the five labs use every alias and every unit of the spec.
LOCAL_LABS = {
    "NEUT": [("Neutrophils", "10^9/L", "1.8", "6.3", 2), ("ANC", "10^3/uL", "2.0", "7.0", 2),
             ("Absolute neutrophil count", "/uL", "1800", "6300", 0), ("Neutrophils", "10^9/L", "2.0", "7.5", 2),
             ("ANC", "10^9/L", "1.8", "6.3", 2)],
    "LYM": [("Lymphocytes", "10^9/L", "1.1", "3.2", 2), ("Lymphocytes", "10^3/uL", "0.8", "4.0", 2),
            ("Lymphocytes", "10^9/L", "1.1", "3.2", 2), ("Lymphocytes", "10^9/L", "1.0", "3.3", 2),
            ("LYMPHOCYTES", "10^3/uL", "1.0", "4.0", 2)],
    "WBC": [("WBC", "10^9/L", "3.5", "9.5", 2), ("White blood cells", "10^3/uL", "4.0", "10.0", 2),
            ("WBC", "10^9/L", "3.5", "9.5", 2), ("White blood cells", "10^9/L", "4.0", "10.0", 2),
            ("WBC", "10^3/uL", "4.0", "11.0", 2)],
    "HGB": [("Hemoglobin", "g/L", "130", "175", 0), ("Hb", "g/dL", "12.0", "16.0", 1),
            ("Haemoglobin", "g/L", "115", "150", 0), ("Hb", "g/L", "120", "160", 0),
            ("Hemoglobin", "g/dL", "11.5", "16.5", 1)],
    "PLAT": [("Platelets", "10^9/L", "125", "350", 0), ("PLT", "10^3/uL", "150", "400", 0),
             ("PLT", "10^9/L", "125", "350", 0), ("Platelets", "10^9/L", "100", "300", 0),
             ("PLT", "10^3/uL", "150", "450", 0)],
    "AST": [("AST", "U/L", "15", "40", 0), ("SGOT", "IU/L", "10", "40", 0), ("AST", "IU/L", "13", "35", 0),
            ("AST", "U/L", "15", "40", 0), ("SGOT", "U/L", "10", "40", 0)],
    "ALT": [("ALT", "U/L", "9", "50", 0), ("SGPT", "IU/L", "7", "40", 0), ("ALT", "U/L", "7", "40", 0),
            ("ALT", "IU/L", "9", "50", 0), ("SGPT", "U/L", "10", "55", 0)],
    "BILI": [("Total bilirubin", "umol/L", "3.4", "20.5", 1), ("TBIL", "mg/dL", "0.20", "1.20", 2),
             ("TBIL", "umol/L", "5.1", "19.0", 1), ("Total bilirubin", "umol/L", "3.4", "17.1", 1),
             ("Total bilirubin", "mg/dL", "0.10", "1.20", 2)],
    "CREAT": [("Creatinine", "umol/L", "57", "111", 0), ("Creatinine", "mg/dL", "0.60", "1.20", 2),
              ("Creatinine", "umol/L", "44", "97", 0), ("Creatinine", "umol/L", "53", "97", 0),
              ("CREATININE", "mg/dL", "0.50", "1.10", 2)],
    "GLUC": [("Glucose", "mmol/L", "3.9", "6.1", 1), ("Glucose", "mg/dL", "70", "110", 0),
             ("Glucose", "mmol/L", "3.9", "6.1", 1), ("Glucose", "mmol/L", "3.9", "6.1", 1),
             ("Glucose", "mg/dL", "70", "100", 0)],
    "INR": [("INR", "", "0.80", "1.20", 2), ("INR", "ratio", "0.80", "1.20", 2), ("INR", "", "0.85", "1.15", 2),
            ("INR", "ratio", "0.80", "1.20", 2), ("INR", "", "0.90", "1.10", 2)],
    "APTT": [("APTT", "s", "25.0", "37.0", 1), ("aPTT", "sec", "28.0", "40.0", 1), ("APTT", "sec", "26.0", "36.0", 1),
             ("APTT", "s", "25.0", "37.0", 1), ("aPTT", "s", "24.0", "36.0", 1)],
}
UNIT_FACTOR = {("NEUT", "/uL"): 0.001, ("HGB", "g/dL"): 10.0, ("BILI", "mg/dL"): 17.1,
               ("CREAT", "mg/dL"): 88.4, ("GLUC", "mg/dL"): 0.0555}  # to the standard unit; others 1
QUALITATIVE_NAMES = {"HBSAG": "HBsAg", "HBCAB": "HBcAb", "HCAB": "HCV Ab", "TPALLAB": "T. pallidum Ab",
                     "HIV12AB": "HIV Ab", "HBVDNA": "HBV DNA", "NMDARAB": "anti-NMDAR Ab",
                     "LGI1AB": "anti-LGI1 Ab"}
PREGNANCY_TEST_NAMES = ["Pregnancy test", "hCG", "Pregnancy test", "hCG", "Pregnancy test"]
HBV_DNA_UNDETECTED = [("<LLOQ", ""), ("<20", "IU/mL"), ("<LLOQ", ""), ("<10", "IU/mL"), ("<LLOQ", "")]
BILIRUBIN_BELOW_LLOQ = {"umol/L": "<1.7", "mg/dL": "<0.1"}
TITRES = np.array(["1:10", "1:20", "1:40", "1:80", "1:160", "1:320"], dtype=TEXT)
N_LABS = 5


def _local_lab_tables():
    """Per (local lab, test): printed name, unit, range, decimals and factor, as arrays for vectorised lookup."""
    shape = (N_LABS, len(LAB_TESTS))
    name, unit, low, high = (np.full(shape, "", dtype=TEXT) for _ in range(4))
    decimals, factor = np.zeros(shape, dtype=np.int64), np.ones(shape)
    below_lloq = np.full(shape, "", dtype=TEXT)
    for test, labs in LOCAL_LABS.items():
        for lab, (printed, lab_unit, lo, hi, places) in enumerate(labs):
            t = T[test]
            name[lab, t], unit[lab, t], low[lab, t], high[lab, t] = printed, lab_unit, lo, hi
            decimals[lab, t], factor[lab, t] = places, UNIT_FACTOR.get((test, lab_unit), 1.0)
            below_lloq[lab, t] = BILIRUBIN_BELOW_LLOQ.get(lab_unit, "") if test == "BILI" else ""
    for test, printed in QUALITATIVE_NAMES.items():
        name[:, T[test]] = printed
    name[:, T["HCG"]] = PREGNANCY_TEST_NAMES
    unit[:, T["HBVDNA"]] = [u for _, u in HBV_DNA_UNDETECTED]
    return name, unit, low, high, decimals, factor, below_lloq


LAB_NAME, LAB_UNIT, LAB_LOW, LAB_HIGH, LAB_DECIMALS, LAB_FACTOR, LAB_BELOW_LLOQ = _local_lab_tables()
HBV_DNA_RESULT = np.array([r for r, _ in HBV_DNA_UNDETECTED], dtype=TEXT)
G_PER_L_LABS = np.flatnonzero(LAB_UNIT[:, T["HGB"]] == "g/L")

# (visit, test, specimen) of every sample in the schedule of assessments (spec section 2).
_ROUTINE = {SCREENING: [*HAEMATOLOGY, *CHEMISTRY, *COAGULATION], BASELINE: [*HAEMATOLOGY, *CHEMISTRY, *COAGULATION],
            WEEK1: [*HAEMATOLOGY, *CHEMISTRY], DAY14: [*HAEMATOLOGY, *CHEMISTRY],
            DAY28: [*HAEMATOLOGY, *CHEMISTRY, *COAGULATION], END_OF_STUDY: [*HAEMATOLOGY, *CHEMISTRY, *COAGULATION],
            UNSCHEDULED: [*HAEMATOLOGY]}
LAB_SCHEDULE = np.array(
    [(SCREENING, t, TEST_SPECIMEN[t]) for t in _ROUTINE[SCREENING]]
    + [(SCREENING, t, SERUM) for t in SEROLOGY]
    + [(SCREENING, T[ab], spec) for ab in ("NMDARAB", "LGI1AB") for spec in (SERUM, CSF)]
    + [(SCREENING, T["HCG"], SERUM)]
    + [(v, t, TEST_SPECIMEN[t]) for v, tests in _ROUTINE.items() if v != SCREENING for t in tests])

# --- adverse events ----------------------------------------------------------------------------------
# weight, English verbatim terms (the third needs CSV quoting), Chinese verbatim, MedDRA coding:
# PT, PT code, LLT, LLT code, HLT, HLT code, HLGT, HLGT code, SOC, SOC code. MedDRA-style codes for
# synthetic data; check them against a licensed MedDRA release before any real use.
_NERVOUS = ("Nervous system disorders", 10029205)
_RESPIRATORY = ("Respiratory, thoracic and mediastinal disorders", 10038738)
_GENERAL = ("General disorders and administration site conditions", 10018065)
_NASAL = ("Nasal disorders NEC", 10028739, "Upper respiratory tract disorders (excl infections)", 10046304)
_SEIZURES = ("Seizures and seizure disorders NEC", 10039910, "Seizures (incl subtypes)", 10039911)
AE_TERMS = [
    (18, ("Headache", "Mild headache", "Headache, frontal"), "头痛",
     ("Headache", 10019211, "Headache", 10019211, "Headaches NEC", 10019233, "Headaches", 10019231, *_NERVOUS)),
    (16, ("Nasal discomfort", "Nasal irritation", 'Nasal "burning" after dosing'), "鼻腔不适",
     ("Nasal discomfort", 10028735, "Nasal discomfort", 10028735, *_NASAL, *_RESPIRATORY)),
    (12, ("Fever", "Low grade fever", "Fever\n38.3 C in the evening"), "发热",
     ("Pyrexia", 10037660, "Fever", 10016558, "Febrile disorders", 10016286, "Body temperature conditions",
      10005908, *_GENERAL)),
    (8, ("Epistaxis", "Nosebleed", "Nosebleed, left nostril"), "鼻出血",
     ("Epistaxis", 10015090, "Nosebleed", 10029617, *_NASAL, *_RESPIRATORY)),
    (8, ("Runny nose", "Rhinorrhoea", "Runny nose"), "流涕",
     ("Rhinorrhoea", 10039101, "Runny nose", 10039424, *_NASAL, *_RESPIRATORY)),
    (6, ("Nausea", "Nausea", "Nausea"), "恶心",
     ("Nausea", 10028813, "Nausea", 10028813, "Nausea and vomiting symptoms", 10028817,
      "Gastrointestinal signs and symptoms", 10018012, "Gastrointestinal disorders", 10017947)),
    (6, ("Dizziness", "Dizzy", "Dizziness"), "头晕",
     ("Dizziness", 10013573, "Dizziness", 10013573, "Neurological signs and symptoms NEC", 10029306,
      "Neurological disorders NEC", 10029305, *_NERVOUS)),
    (6, ("Insomnia", "Difficulty sleeping", "Insomnia"), "失眠",
     ("Insomnia", 10022437, "Insomnia", 10022437, "Disturbances in initiating and maintaining sleep", 10013509,
      "Sleep disorders and disturbances", 10040991, "Psychiatric disorders", 10037175)),
    (6, ("Fatigue", "Tiredness", "Fatigue"), "乏力",
     ("Fatigue", 10016256, "Fatigue", 10016256, "Asthenic conditions", 10003550, "General system disorders NEC",
      10018073, *_GENERAL)),
    (5, ("ALT increased", "Elevated ALT", "ALT increased"), "谷丙转氨酶升高",
     ("Alanine aminotransferase increased", 10001551, "ALT increased", 10001551, "Liver function analyses",
      10024690, "Hepatobiliary investigations", 10019805, "Investigations", 10022891)),
    (5, ("Upper respiratory tract infection", "Common cold", "Upper respiratory tract infection"), "上呼吸道感染",
     ("Upper respiratory tract infection", 10046306, "Upper respiratory tract infection", 10046306,
      "Upper respiratory tract infections", 10046309, "Infections - pathogen unspecified", 10021879,
      "Infections and infestations", 10021881)),
    (4, ("Seizure", "Focal seizure", "Seizure"), "癫痫发作",
     ("Seizure", 10039906, "Seizure", 10039906, *_SEIZURES, *_NERVOUS)),
    (0, ("Status epilepticus", "Status epilepticus", "Status epilepticus"), "癫痫持续状态",
     ("Status epilepticus", 10041962, "Status epilepticus", 10041962, *_SEIZURES, *_NERVOUS)),
]
FATAL_TERM = len(AE_TERMS) - 1
TERM_WEIGHTS = np.array([w for w, *_ in AE_TERMS[:FATAL_TERM]], dtype=float)
TERM_WEIGHTS /= TERM_WEIGHTS.sum()
VERBATIM = np.array([[*english, chinese] for _, english, chinese, _ in AE_TERMS], dtype=TEXT)
CHINESE_VERBATIM, QUOTED_VERBATIM = 3, 2
_CODING_COLUMNS = ["AEDECOD", "AEPTCD", "AELLT", "AELLTCD", "AEHLT", "AEHLTCD", "AEHLGT", "AEHLGTCD", "AESOC",
                   "AESOCCD"]
CODING = {col: np.array([str(coding[i]) for *_, coding in AE_TERMS], dtype=TEXT)
          for i, col in enumerate(_CODING_COLUMNS)}
CODING["AEBODSYS"], CODING["AEBDSYCD"] = CODING["AESOC"], CODING["AESOCCD"]
RELATIONS = np.array(["NOT RELATED", "UNLIKELY RELATED", "POSSIBLY RELATED", "PROBABLY RELATED", "RELATED"],
                     dtype=TEXT)
ACTIONS = np.array(["DOSE NOT CHANGED", "UNKNOWN", "NOT APPLICABLE"], dtype=TEXT)
OUTCOMES = np.array(["RECOVERED/RESOLVED", "RECOVERED/RESOLVED WITH SEQUELAE", "NOT RECOVERED/NOT RESOLVED",
                     "RECOVERING/RESOLVING", "FATAL"], dtype=TEXT)

# Screen failure reasons: what the site writes (English, Chinese) and what the screening data then show.
SF_REASONS = [
    ("antibody", "Anti-NMDAR and anti-LGI1 antibodies negative,\nin serum and CSF", "抗NMDAR及抗LGI1抗体阴性,\n血清及脑脊液"),
    ("mrs", "mRS 1 at screening; inclusion needs 2 or more", "筛选期mRS评分1分"),
    ("anc", "ANC 1.1 x10^9/L, below 1.5", "中性粒细胞绝对值1.1 x10^9/L, 低于1.5"),
    ("hbsag", "HBsAg positive", "乙肝表面抗原阳性"),
    ("age", "Age 67, above the limit of 65", "年龄67岁, 超过65岁"),
    ("consent", 'Withdrew consent: "does not want nasal dosing"', '撤回知情同意:"不愿意鼻腔给药"'),
]
SF = {code: i for i, (code, *_) in enumerate(SF_REASONS)}
SF_TEXT = np.array([[english, chinese] for _, english, chinese in SF_REASONS], dtype=TEXT)
DOSE_NOT_GIVEN = np.array(["Nasal congestion, dose withheld by investigator", 'Subject declined: "felt unwell"',
                           "Missed visit\nno transport available", "患者拒绝给药"], dtype=TEXT)
LAB_NOT_DONE = np.array(["Sample haemolysed", "Insufficient sample volume, not repeated",
                         'Sample "clotted" on arrival', "Courier delay\nsample rejected by the laboratory",
                         "标本溶血"], dtype=TEXT)


@dataclass(frozen=True)
class SyntheticTrial:
    """What `generate_trial` wrote and the truth the pipeline's outputs are judged against."""

    exports: Path
    planted: pd.DataFrame
    subjects: pd.DataFrame


@dataclass(frozen=True)
class _SiteStyle:
    """How one site's EDC writes its export: the spec allows all of these, so the pipeline must too."""

    siteid: str
    codec: str  # Python codec of the file bytes (utf-8-sig = UTF-8 with BOM)
    encoding: str  # what the manifest declares
    newline: str
    header_case: str  # upper, lower or mixed
    date_style: int  # 0 ISO, 1 DD MMM YYYY, 2 both, record by record
    yes: str
    no: str
    no_as_empty: bool  # the site leaves "N" answers empty
    long_sex: bool  # MALE / FEMALE rather than M / F
    no_specimen: bool  # LBSPEC left empty for routine samples
    extra_column: bool
    shuffled: bool  # column order differs from the spec's


GB18030_SITE, BOM_SITE = 1, 2


def _site_styles(n_sites: int) -> list[_SiteStyle]:
    """Sites 01-05 each have their own habits (gb18030 at 02, BOM at 03, lower-case headers at 04 ...)."""
    extra_site = min(3, n_sites - 2) if n_sites >= 2 else 0  # never the site whose newest transfer is in flight
    yes_no = [("Y", "N"), ("Y", "N"), ("YES", "NO"), ("Y", "N"), ("Yes", "No")]
    return [_SiteStyle(
        siteid=f"{i + 1:02d}",
        codec={GB18030_SITE: "gb18030", BOM_SITE: "utf-8-sig"}.get(i, "utf-8"),
        encoding="gb18030" if i == GB18030_SITE else "utf-8",
        newline="\r\n" if i % 5 in (1, 3) else "\n",
        header_case={3: "lower", 4: "mixed"}.get(i, "upper"),
        date_style=(2, 1, 0, 1, 0)[i % 5],
        yes=yes_no[i % 5][0], no=yes_no[i % 5][1],
        no_as_empty=i % 5 in (1, 4),
        long_sex=i % 5 == 2,
        no_specimen=i % 5 == 4,
        extra_column=i == extra_site,
        shuffled=i > 0,
    ) for i in range(n_sites)]


def minimum_sites(subjects: int) -> int:
    """Sites needed so that no site has more subjects than SUBJID SS-NNN can number."""
    return -(-(subjects + _screen_failures(subjects)) // MAX_SUBJECTS_PER_SITE)


def generate_trial(out: Path, subjects: int = 38, sites: int | None = None, transfers: int = 2, seed: int = 0,
                   plant_findings: bool = True) -> SyntheticTrial:
    """Write a synthetic MESAE exports root at `out` and return what was planted in it.

    `subjects` counts enrolled subjects; about 15% screen failures come on top. `sites` defaults
    to 5, or to as many as SUBJID numbering needs for a large trial. Every site gets
    `transfers` full snapshots a week apart; with two or more transfers and sites, the last site also
    gets a newer transfer still being copied (mrs.csv missing), which the pipeline must reject.
    """
    out = Path(out)
    if sites is None and isinstance(subjects, (int, np.integer)) and not isinstance(subjects, bool):
        sites = max(DEFAULT_SITES, minimum_sites(subjects))
    _check_arguments(out, subjects, sites, transfers, seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    styles = _site_styles(sites)
    subj = _consented_subjects(rng, subjects, sites)
    schedule = _schedule(rng, subj)
    truth = {
        "dm.csv": _per_subject(subj),
        "enrol.csv": _per_subject(subj),
        "ex.csv": _doses(rng, subj, schedule),
        "ae.csv": _adverse_events(rng, subj, styles),
        "lb.csv": _lab_samples(rng, subj, schedule),
        "mrs.csv": _rankin(rng, subj, schedule),
    }
    edits = _Planter(rng, subj, truth, styles).plant(1 + subjects // 2500) if plant_findings else []
    text = {
        "dm.csv": _dm_text(rng, subj, truth["dm.csv"], styles),
        "enrol.csv": _enrol_text(rng, subj, truth["enrol.csv"], styles),
        "ex.csv": _ex_text(rng, subj, truth["ex.csv"], styles),
        "ae.csv": _ae_text(subj, truth["ae.csv"], styles),
        "lb.csv": _lb_text(rng, subj, truth["lb.csv"], styles),
        "mrs.csv": _mrs_text(rng, subj, truth["mrs.csv"], styles),
    }
    _apply_edits(text, edits, subj)
    out.mkdir(parents=True, exist_ok=True)
    planted = _write_sites(out, rng, styles, text, subj, transfers)
    _write_randomization(out, subj)
    return SyntheticTrial(exports=out, planted=planted, subjects=_subjects_frame(subj))


def _check_arguments(out: Path, subjects, sites, transfers, seed) -> None:
    """Refuse arguments that would give a trial the spec cannot express, before writing anything."""
    for name, value in (("subjects", subjects), ("sites", sites), ("transfers", transfers), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if subjects < 5:
        raise ValueError(f"subjects must be at least 5 (3 escalation cohorts and 2 randomized), got {subjects}")
    if not 1 <= sites <= 99:
        raise ValueError(f"sites must be between 1 and 99 (SITEID is two digits), got {sites}")
    if transfers < 1:
        raise ValueError(f"transfers must be at least 1, got {transfers}")
    if seed < 0:
        raise ValueError(f"seed must not be negative, got {seed}")
    per_site = -(-(subjects + _screen_failures(subjects)) // sites)
    if per_site > MAX_SUBJECTS_PER_SITE:
        raise ValueError(f"{subjects} subjects over {sites} sites is {per_site} consented subjects per site, but "
                         f"SUBJID SS-NNN allows at most {MAX_SUBJECTS_PER_SITE}: use sites >= {minimum_sites(subjects)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; refusing to write exports into it")


def _screen_failures(n_enrolled: int) -> int:
    return max(1, round(0.15 * n_enrolled))


# --- subjects and their schedule ---------------------------------------------------------------------
def _consented_subjects(rng, n_enrolled: int, n_sites: int) -> dict[str, np.ndarray]:
    """Every consented subject, one entry per SUBJID in file order, with the truth behind their records.

    Escalation cohorts open 70 days apart (the last subject's 49-day follow-up, then the DSMB); the
    expansion opens after cohort 3 and recruits until the night before the export, so some subjects
    are mid-study. Screen failures are screened throughout.
    """
    n_sf = _screen_failures(n_enrolled)
    cohort_size = min(6, max(1, round(6 * n_enrolled / 38)), (n_enrolled - 2) // 3)
    n_esc, n = 3 * cohort_size, n_enrolled + n_sf
    n_exp = n_enrolled - n_esc
    phase = np.concatenate([np.full(n_esc, 1), np.full(n_exp, 2), np.zeros(n_sf, np.int64)])
    cohort = np.concatenate([np.repeat([1, 2, 3], cohort_size), np.zeros(n_exp + n_sf, np.int64)])

    followers = np.sort(rng.integers(7, 29, (3, cohort_size - 1)), axis=1)  # after each cohort's sentinel
    esc_offsets = np.concatenate([np.zeros((3, 1), np.int64), followers], axis=1) + 17 + 70 * np.arange(3)[:, None]
    expansion_opens = STUDY_START + 245 * DAY
    span = int((CURRENT_DAY - DAY - expansion_opens) / DAY)
    exp_offsets = np.sort(rng.integers(0, span + 1, n_exp))
    exp_offsets[-1] = span
    day1 = np.concatenate([STUDY_START + esc_offsets.ravel() * DAY, expansion_opens + exp_offsets * DAY,
                           np.full(n_sf, NO_DATE)])
    screening = np.empty(n, "datetime64[D]")
    screening[:n_enrolled] = day1[:n_enrolled] - rng.integers(2, 15, n_enrolled) * DAY
    sf_first, sf_last = STUDY_START + 2 * DAY, CURRENT_DAY - 6 * DAY
    screening[n_enrolled:] = sf_first + rng.integers(0, int((sf_last - sf_first) / DAY) + 1, n_sf) * DAY
    consent = screening - rng.integers(0, 3, n) * DAY
    decision = day1.copy()  # the day the subject enters the site's files: Day 1, or the screen failure
    decision[n_enrolled:] = screening[n_enrolled:] + rng.integers(1, 6, n_sf) * DAY

    # Sites take subjects round-robin in consent order, each block of sites in a random order.
    by_consent = np.lexsort((np.arange(n), consent))
    blocks = -(-n // n_sites)
    site_seq = rng.permuted(np.tile(np.arange(n_sites), (blocks, 1)), axis=1).ravel()[:n]
    counts = np.bincount(site_seq, minlength=n_sites)
    number_seq = np.empty(n, np.int64)
    number_seq[np.argsort(site_seq, kind="stable")] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts) + 1
    site, number = np.empty(n, np.int64), np.empty(n, np.int64)
    site[by_consent], number[by_consent] = site_seq, number_seq
    order = np.lexsort((number, site))
    subj = {"site": site, "number": number, "phase": phase, "cohort": cohort, "day1": day1,
            "screening": screening, "consent": consent, "decision": decision}
    subj = {key: value[order] for key, value in subj.items()}
    subj["subjid"] = _join(np.strings.zfill((subj["site"] + 1).astype(TEXT), 2), "-",
                           np.strings.zfill(subj["number"].astype(TEXT), 3))

    _randomize(rng, subj)
    _describe(rng, subj, n_sites)
    return subj


def _randomize(rng, subj) -> None:
    """Expansion subjects get RANDNO in Day 1 order and an arm from permuted blocks of 4 (1:1, balanced)."""
    expansion = np.flatnonzero(subj["phase"] == 2)
    in_order = expansion[np.lexsort((expansion, subj["day1"][expansion]))]
    n = in_order.size
    arms = rng.permuted(np.tile([True, True, False, False], (n // 4, 1)), axis=1).ravel()
    if n % 4 >= 2:
        arms = np.concatenate([arms, rng.permutation([True, False])])
    if n % 2:
        arms = np.concatenate([arms, [rng.random() < 0.5]])
    width = max(3, len(str(n)))
    subj["randno"] = np.full(subj["site"].size, "", dtype=TEXT)
    subj["randno"][in_order] = np.strings.add("R", np.strings.zfill(np.arange(1, n + 1).astype(TEXT), width))
    subj["exosome"] = np.zeros(subj["site"].size, bool)
    subj["exosome"][in_order] = arms


def _describe(rng, subj, n_sites: int) -> None:
    """Demographics, disease history, local lab and the truth the files will show for each subject."""
    n = subj["site"].size
    enrolled, sf = subj["phase"] > 0, subj["phase"] == 0
    sf_reason = np.full(n, -1)
    sf_reason[sf] = rng.permuted(np.tile(np.arange(len(SF_REASONS)), (-(-sf.sum() // len(SF_REASONS)), 1)),
                                 axis=1).ravel()[:sf.sum()]
    subj["sf_reason"] = sf_reason

    female = rng.random(n) < 0.45
    for site in range(n_sites):  # every site screens at least one woman, so its pregnancy test name occurs
        at_site = np.flatnonzero(subj["site"] == site)
        if at_site.size and not female[at_site].any():
            female[at_site[0]] = True
    subj["female"] = female
    age = np.where(sf, rng.integers(19, 71, n), rng.integers(19, 65, n))
    age[sf_reason == SF["age"]] = 67
    subj["birth"] = _birth_date(rng, subj["consent"], age)
    subj["diagnosis"] = subj["consent"] - rng.integers(1, 21, n) * DAY
    subj["onset"] = subj["diagnosis"] - rng.integers(3, 50, n) * DAY
    subj["abtype"] = np.where(rng.random(n) < 0.7, 1, 2) * (sf_reason != SF["antibody"])
    subj["anticoag"] = rng.random(n) < 0.08
    subj["lab"] = _variant(subj["site"], subj["number"], n_sites, N_LABS)
    subj["label_form"] = _variant(subj["site"], subj["number"], n_sites, DOSE_LABELS.shape[1])

    current = np.where(enrolled, rng.choice([2, 3, 4, 5], n, p=[0.25, 0.35, 0.28, 0.12]), rng.integers(1, 6, n))
    current[sf_reason == SF["mrs"]] = 1
    subj["premorbid"] = rng.choice([0, 1], n, p=[0.75, 0.25])
    recovery = np.cumsum(rng.random((n, 4)) < [0.2, 0.3, 0.35, 0.4], axis=1)
    scores = np.column_stack([current, current, current[:, None] - recovery, current])
    subj["mrs"] = np.maximum(scores, subj["premorbid"][:, None])  # by ASSESSMENT_VISITS; unscheduled set later

    subj["death"] = np.full(n, NO_DATE)
    fatal = rng.choice(np.flatnonzero(subj["phase"] == 1))
    subj["death"][fatal] = subj["day1"][fatal] + rng.integers(30, 43) * DAY  # after the last dose, before Day 49


def _birth_date(rng, consent, age):
    """A birth date giving exactly `age` whole years at consent."""
    return consent - (np.floor(age * 365.25).astype(np.int64) + rng.integers(30, 330, age.size)) * DAY


def _age(birth, on):
    """Whole years between two date arrays."""
    yb, mb, db = _date_parts(birth)
    yo, mo, do = _date_parts(on)
    return yo - yb - ((mo * 100 + do) < (mb * 100 + db))


def _variant(site, number, n_sites: int, n_variants: int):
    """Which local lab or label form a subject's records use: one per site when there are enough sites,
    else each site shares out several over its subjects, so every variant still occurs."""
    if n_sites >= n_variants:
        return site % n_variants
    return site + n_sites * (number % (-(-(n_variants - site) // n_sites)))


def _schedule(rng, subj) -> dict[str, np.ndarray]:
    """Dates and times of every planned dose and assessment; absent (NaT) when it never happens."""
    n = subj["site"].size
    day1 = subj["day1"]
    window = rng.choice([-2, -1, 0, 1, 2], (n, 3), p=[0.1, 0.2, 0.4, 0.2, 0.1])
    dose_offset = np.column_stack([np.tile(np.arange(7), (n, 1)), [13, 20, 27] + window])
    early = rng.random(n) < 0.5  # unscheduled visit between Day 7 and 14, else between Day 28 and 49
    unscheduled = np.where(early, rng.integers(7, 10, n), rng.integers(32, 42, n))
    has_unscheduled = rng.random(n) < 0.25
    offsets = np.column_stack([np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, 6), dose_offset[:, 7],
                               dose_offset[:, 9], 48 + rng.integers(-3, 4, n), unscheduled])
    visit_dates = day1[:, None] + offsets * DAY
    visit_dates[:, SCREENING] = subj["screening"]
    enrolled = subj["phase"] > 0
    alive = np.isnat(subj["death"])
    forced = np.flatnonzero(enrolled & alive & (day1 + 45 * DAY <= CURRENT_DAY))
    if not (has_unscheduled & (visit_dates[:, UNSCHEDULED] <= CURRENT_DAY)).any() and forced.size:
        has_unscheduled[forced[-1]] = True
    visit_dates[~has_unscheduled, UNSCHEDULED] = NO_DATE
    visit_dates[visit_dates > subj["death"][:, None]] = NO_DATE  # nothing after death (doses all end before)
    subj["mrs"][:, UNSCHEDULED] = np.where(early, subj["mrs"][:, WEEK1], subj["mrs"][:, DAY28])
    return {"dose_dates": day1[:, None] + dose_offset * DAY,
            "dose_minutes": 540 + 5 * rng.integers(0, 36, (n, 10)),  # 09:00-11:55, after the morning samples
            "visit_dates": visit_dates,
            "sample_minutes": 420 + 5 * rng.integers(0, 24, (n, 7))}


def _at_least(rng, mask, candidates, k: int):
    """Force `k` occurrences of a realism feature when chance gave fewer, so small trials still show it."""
    missing = k - int((mask & candidates).sum())
    pool = np.flatnonzero(candidates & ~mask)
    if missing > 0 and pool.size:
        mask[rng.choice(pool, min(missing, pool.size), replace=False)] = True
    return mask


def _records(subject, date, **columns) -> dict[str, np.ndarray]:
    """A record table: visible columns plus `_subject`, `_date` (the snapshot cut-off) and `_plant`."""
    return {"_subject": subject, "_date": date, "_plant": np.full(subject.size, -1, np.int64), **columns}


def _in_file_order(table, *keys) -> dict[str, np.ndarray]:
    order = np.lexsort(keys[::-1])
    return {key: value[order] for key, value in table.items()}


# --- records -----------------------------------------------------------------------------------------
def _per_subject(subj) -> dict[str, np.ndarray]:
    n = subj["site"].size
    return _records(np.arange(n), subj["decision"])


def _doses(rng, subj, schedule) -> dict[str, np.ndarray]:
    """One ex.csv record per planned dose due by the export; a few missed; expansion kits from one series."""
    enrolled = np.flatnonzero(subj["phase"] > 0)
    s, visit = np.repeat(enrolled, 10), np.tile(np.arange(10), enrolled.size)
    date = schedule["dose_dates"][s, visit]
    candidates = (visit > 0) & (date <= CURRENT_DAY)  # Day 1 is always given: it defines study day 1
    missed = _at_least(rng, (rng.random(s.size) < 0.03) & candidates, candidates, len(DOSE_NOT_GIVEN))
    reason = np.full(s.size, -1)
    reason[rng.permutation(np.flatnonzero(missed))] = np.arange(missed.sum()) % len(DOSE_NOT_GIVEN)
    level = np.where(subj["phase"][s] == 1, subj["cohort"][s] - 1, -1)
    # Blinded kits: one shuffled series handed out in dispensing order, whatever the arm.
    kitted = np.flatnonzero((subj["phase"][s] == 2) & ~missed)
    kitted = kitted[np.lexsort((s[kitted], date[kitted]))]
    kit = np.full(s.size, -1)
    kit[kitted] = 10001 + rng.permutation(kitted.size)
    return _records(s, date, visit=visit, minutes=schedule["dose_minutes"][s, visit], missed=missed,
                    reason=reason, level=level, kit=kit)


def _adverse_events(rng, subj, styles) -> dict[str, np.ndarray]:
    """AEs of enrolled subjects; the same rates whatever the arm. One fatal event ends one subject's data."""
    enrolled = np.flatnonzero(subj["phase"] > 0)
    s = np.repeat(enrolled, rng.poisson(1.8, enrolled.size))
    n = s.size
    start = subj["day1"][s] + rng.integers(0, 53, n) * DAY
    grade = rng.choice([1, 2, 3, 4], n, p=[0.62, 0.28, 0.08, 0.02])
    serious = ((grade >= 3) & (rng.random(n) < 0.6)) | (rng.random(n) < 0.02)
    relation = rng.choice(len(RELATIONS), n, p=[0.3, 0.25, 0.25, 0.12, 0.08])
    ae = {
        "_subject": s, "_date": start, "_end": start + np.minimum(1 + rng.geometric(0.15, n), 90) * DAY,
        "term": rng.choice(FATAL_TERM, n, p=TERM_WEIGHTS),
        "variant": rng.integers(0, 3, n), "grade": grade, "serious": serious,
        "hospital": serious & (rng.random(n) < 0.9), "relation": relation,
        "action": np.where(start - subj["day1"][s] > 27 * DAY, 2, rng.choice(2, n, p=[0.93, 0.07])),
        "outcome": rng.choice(2, n, p=[0.9, 0.1]), "ongoing_outcome": rng.choice([2, 3], n),
        "dlt": (subj["phase"][s] == 1) & (grade >= 3) & (relation >= 2) & (rng.random(n) < 0.5),
        "fatal": np.zeros(n, bool),
    }
    dead = np.flatnonzero(~np.isnat(subj["death"]))[0]
    death = subj["death"][dead]
    fatal_start = death - rng.integers(2, 7) * DAY
    keep = (s != dead) | (ae["_end"] < fatal_start)
    ae = {key: value[keep] for key, value in ae.items()}
    fatal = {"_subject": dead, "_date": fatal_start, "_end": death, "term": FATAL_TERM, "variant": 0, "grade": 5,
             "serious": True, "hospital": True, "relation": 0, "action": 2, "outcome": 4, "ongoing_outcome": 2,
             "dlt": False, "fatal": True}
    ae = {key: np.append(value, np.array(fatal[key], dtype=value.dtype)) for key, value in ae.items()}
    s, n = ae["_subject"], ae["_subject"].size
    site = subj["site"][s]
    # Features are forced only onto events of surviving subjects, so nothing is moved past the death.
    visible = (ae["_date"] <= CURRENT_DAY) & np.isnat(subj["death"][s])

    ae["variant"][(site == GB18030_SITE) | (rng.random(n) < 0.1)] = CHINESE_VERBATIM
    english_rows = np.flatnonzero(visible & (site != GB18030_SITE))
    for term, row in zip((0, 1, 2), rng.choice(english_rows, min(3, english_rows.size), replace=False)):
        ae["term"][row], ae["variant"][row] = term, QUOTED_VERBATIM  # a comma, a quote, a newline
    ae["uncoded"] = _at_least(rng, (rng.random(n) < 0.12) & ~ae["fatal"], visible, 2)

    ongoing = visible & (ae["_end"] > CURRENT_DAY)
    if ongoing.sum() < 2:
        latest = np.flatnonzero(visible)[np.argsort(ae["_date"][visible], kind="stable")[-2:]]
        ae["_end"][latest] = LAST_DAY + 30 * DAY
    # Partial start dates only where the end falls in a later month (or never), so no comparison of a
    # partial start with the end can look reversed.
    ae["start_cdash"] = _date_forms(rng, styles, site)
    open_ended = ae["_end"] > LAST_DAY
    partial_ok = visible & ((ae["_end"].astype("datetime64[M]") > ae["_date"].astype("datetime64[M]")) | open_ended)
    precision = np.where((rng.random(n) < 0.08) & partial_ok, 1, 0)
    for form in (True, False):
        precision[_at_least(rng, precision == 1, partial_ok & (ae["start_cdash"] == form), 1)] = 1
    unknown_month = visible & ae["start_cdash"] & (precision == 0)
    if unknown_month.any():
        pool = np.flatnonzero(unknown_month & open_ended)
        row = rng.choice(pool if pool.size else np.flatnonzero(unknown_month))
        ae["_end"][row], precision[row] = max(ae["_end"][row], LAST_DAY + 60 * DAY), 2  # UN UNK 2026, ongoing
    ae["precision"] = precision

    ae = _in_file_order(ae, s, ae["_date"], np.arange(n))
    s = ae["_subject"]
    first_of_subject = np.searchsorted(s, s)
    ae["spid"] = np.arange(s.size) - first_of_subject + 1
    ae["_plant"] = np.where(ae["uncoded"], UNCODED, -1)
    return ae


def _lab_samples(rng, subj, schedule) -> dict[str, np.ndarray]:
    """lb.csv records: the schedule's panels at each visit, results drawn in standard units."""
    n_subj, n_tpl = subj["site"].size, len(LAB_SCHEDULE)
    s, k = np.repeat(np.arange(n_subj), n_tpl), np.tile(np.arange(n_tpl), n_subj)
    visit, test, specimen = LAB_SCHEDULE[k, 0], LAB_SCHEDULE[k, 1], LAB_SCHEDULE[k, 2]
    date = schedule["visit_dates"][s, visit]
    keep = ~np.isnat(date) & ((test != T["HCG"]) | subj["female"][s])
    s, k, visit, test, specimen, date = s[keep], k[keep], visit[keep], test[keep], specimen[keep], date[keep]
    n = s.size
    numeric = test < N_NUMERIC
    mean, sd, low, high = (GENERATION[np.minimum(test, N_NUMERIC - 1), c] for c in range(4))
    subject_level = rng.standard_normal((n_subj, N_NUMERIC))[s, np.minimum(test, N_NUMERIC - 1)]
    value = np.clip(mean + sd * (0.8 * subject_level + 0.6 * rng.standard_normal(n)), low, high)
    value[~numeric] = np.nan
    sf_reason = subj["sf_reason"][s]
    value[(sf_reason == SF["anc"]) & (test == T["NEUT"])] = 1.1

    result = np.full(n, "", dtype=TEXT)
    result[(test >= T["HBSAG"]) | (test == T["HCG"])] = "NEGATIVE"
    result[(sf_reason == SF["hbsag"]) & (test == T["HBSAG"])] = "POSITIVE"
    lab = subj["lab"][s]
    result[test == T["HBVDNA"]] = HBV_DNA_RESULT[lab[test == T["HBVDNA"]]]
    abtype = subj["abtype"][s]
    positive = ((test == T["NMDARAB"]) & (abtype == 1)) | ((test == T["LGI1AB"]) & (abtype == 2))
    titre = np.where(specimen == CSF, rng.integers(0, 4, n), rng.integers(0, 6, n))
    result[positive] = np.where((lab[positive] == 4) & (specimen[positive] == SERUM), "POSITIVE",
                                TITRES[titre[positive]])

    visible = date <= CURRENT_DAY
    follow_up = numeric & (visit != SCREENING) & visible  # screening results decide eligibility: always done
    not_done = _at_least(rng, (rng.random(n) < 0.01) & follow_up, follow_up, len(LAB_NOT_DONE))
    reason = np.full(n, -1)
    reason[rng.permutation(np.flatnonzero(not_done))] = np.arange(not_done.sum()) % len(LAB_NOT_DONE)
    bilirubin = follow_up & (test == T["BILI"]) & ~not_done
    censored = _at_least(rng, (rng.random(n) < 0.05) & bilirubin, bilirubin, 2)
    table = _records(s, date, visit=visit, test=test, specimen=specimen, lab=lab, value=value, result=result,
                     not_done=not_done, reason=reason, censored=censored,
                     minutes=schedule["sample_minutes"][s, visit])
    return _in_file_order(table, s, date, k)


def _rankin(rng, subj, schedule) -> dict[str, np.ndarray]:
    """mrs.csv records: CURRENT at each assessment visit, PRE-MORBID at screening only."""
    template = np.array([(v, 0) for v in range(7)] + [(SCREENING, 1)])
    n_subj = subj["site"].size
    s, k = np.repeat(np.arange(n_subj), len(template)), np.tile(np.arange(len(template)), n_subj)
    visit, premorbid = template[k, 0], template[k, 1] == 1
    keep = ~np.isnat(schedule["visit_dates"][s, visit])
    s, k, visit, premorbid = s[keep], k[keep], visit[keep], premorbid[keep]
    date = schedule["visit_dates"][s, visit]
    score = np.where(premorbid, subj["premorbid"][s], subj["mrs"][s, visit])
    candidates = ~premorbid & ~np.isin(visit, [SCREENING, BASELINE, UNSCHEDULED]) & (date <= CURRENT_DAY)
    not_done = _at_least(rng, (rng.random(s.size) < 0.02) & candidates, candidates, 1)  # never the baseline
    order = np.where(premorbid, 0.5, k)
    return _in_file_order(_records(s, date, visit=visit, premorbid=premorbid, score=score, not_done=not_done),
                          s, date, order)


# --- planted findings --------------------------------------------------------------------------------
@dataclass
class _Edit:
    """A change made to a formatted record, or to a copy of it appended to the file (`copy`)."""

    file: str
    row: int
    changes: dict
    copy: bool = False
    at_end: bool = False
    rule: int = -1


class _Planter:
    """Chooses the records that carry planted findings, spread over sites and subjects, and plants them.

    Each finding goes on a clean record (no partial date, no NOT DONE, not uncoded, not the fatal
    subject) of a CURRENT transfer, on its own subject where possible, so each triggers its one rule.
    Value changes are made here, before formatting; text changes come back as `_Edit`s.
    """

    def __init__(self, rng, subj, truth, styles):
        self.rng, self.subj, self.truth, self.styles = rng, subj, truth, styles
        self.used = ~np.isnat(subj["death"])  # subjects to keep clean where possible
        self.fatal = self.used.copy()
        self.edits: list[_Edit] = []
        self.turn = 0
        self.unknown_numbers = np.bincount(subj["site"], minlength=len(styles))

    def plant(self, reps: int) -> list[_Edit]:
        findings = [self.impossible_date, self.month_13, self.end_before_start, self.implausible_haemoglobin,
                    self.unit_not_for_test, self.unknown_test, self.mrs_out_of_range, self.dose_without_date,
                    self.duplicate_event_number, self.visit_off_schedule, self.unknown_subject,
                    self.age_over_65, self.low_neutrophils, self.premorbid_disability, self.late_day14_dose,
                    self.late_diagnosis, self.wrong_cohort_dose]
        for _ in range(reps):
            for finding in findings:
                finding()
        return self.edits

    def pick(self, file: str, candidates, rule: str | None):
        """A clean record among `candidates`, preferably at this turn's site and of an untouched subject."""
        table = self.truth[file]
        subject = table["_subject"]
        site = self.subj["site"][subject]
        candidates = (candidates & (table["_plant"] < 0) & (table["_date"] <= CURRENT_DAY)
                      & (self.subj["phase"][subject] > 0) & ~self.fatal[subject])
        preferred = self.turn % len(self.styles)
        self.turn += 1
        for pool in (candidates & (site == preferred) & ~self.used[subject], candidates & ~self.used[subject],
                     candidates):
            rows = np.flatnonzero(pool)
            if rows.size:
                row = int(self.rng.choice(rows))
                self.used[subject[row]] = True
                if rule:
                    table["_plant"][row] = RULES.index(rule)
                return row
        return None

    def edit(self, file, row, rule=None, copy=False, at_end=False, **changes):
        self.edits.append(_Edit(file, row, changes, copy, at_end, RULES.index(rule) if rule else -1))

    def _lab_rows(self, *tests):
        lb = self.truth["lb.csv"]
        return (np.isin(lb["test"], tests) & ~lb["not_done"] & ~lb["censored"]
                & np.isin(lb["visit"], [BASELINE, WEEK1, DAY14, DAY28, END_OF_STUDY]))

    def _site_date(self, row_subject, date) -> str:
        style = self.styles[self.subj["site"][row_subject]]
        return str(_date_text(np.array([date]), np.array([style.date_style == 1]))[0])

    def impossible_date(self):
        """RAW-DATE: 31 FEB 2026 (or 31 of another short month) as a lab collection date."""
        lb = self.truth["lb.csv"]
        _, month, _ = _date_parts(lb["_date"])
        short = np.isin(month, [2, 4, 6, 9, 11]) & self._lab_rows(*range(N_NUMERIC))
        row = self.pick("lb.csv", short & (month == 2) if (short & (month == 2)).any() else short, "RAW-DATE")
        if row is not None:
            year, month, _ = _date_parts(lb["_date"][row:row + 1])
            self.edit("lb.csv", row, LBDAT=f"31 {MONTHS[month[0] - 1]} {year[0]}", LBTIM="")

    def month_13(self):
        """RAW-DATE: an ISO date with month 13 on an mRS assessment."""
        mrs = self.truth["mrs.csv"]
        row = self.pick("mrs.csv", ~mrs["premorbid"] & ~mrs["not_done"] & ~np.isin(mrs["visit"], [SCREENING, UNSCHEDULED]),
                        "RAW-DATE")
        if row is not None:
            year, _, day = _date_parts(mrs["_date"][row:row + 1])
            self.edit("mrs.csv", row, MRSDAT=f"{year[0]}-13-{day[0]:02d}")

    def end_before_start(self):
        """RAW-DATE-ORDER: an AE that ends days before it starts."""
        ae = self.truth["ae.csv"]
        row = self.pick("ae.csv", ~ae["uncoded"] & (ae["precision"] == 0) & (ae["_end"] <= CURRENT_DAY),
                        "RAW-DATE-ORDER")
        if row is not None:
            ae["_end"][row] = ae["_date"][row] - self.rng.integers(2, 9) * DAY

    def implausible_haemoglobin(self):
        """RAW-LB-IMPLAUSIBLE: haemoglobin 900 g/L."""
        lb = self.truth["lb.csv"]
        row = self.pick("lb.csv", self._lab_rows(T["HGB"]) & np.isin(lb["lab"], G_PER_L_LABS), "RAW-LB-IMPLAUSIBLE")
        if row is not None:
            lb["value"][row] = 900.0

    def unit_not_for_test(self):
        """RAW-LB-UNIT: haemoglobin in mmol/L, a real unit the spec does not list."""
        lb = self.truth["lb.csv"]
        row = self.pick("lb.csv", self._lab_rows(T["HGB"]), "RAW-LB-UNIT")
        if row is not None:
            mmol = _decimal_text(lb["value"][row:row + 1] * 0.06206, np.array([1]))[0]
            self.edit("lb.csv", row, LBORRES=str(mmol), LBORRESU="mmol/L", LBORNRLO="7.4", LBORNRHI="10.9")

    def unknown_test(self):
        """RAW-LB-TEST: a ferritin result the spec has no test for, beside a glucose of the same sample."""
        row = self.pick("lb.csv", self._lab_rows(T["GLUC"]), None)
        if row is not None:
            self.edit("lb.csv", row, "RAW-LB-TEST", copy=True, LBTEST="Ferritin",
                      LBORRES=str(self.rng.integers(40, 300)), LBORRESU="ug/L", LBORNRLO="30", LBORNRHI="400")

    def mrs_out_of_range(self):
        """RAW-INTEGER: mRS score 7 (the scale stops at 6)."""
        mrs = self.truth["mrs.csv"]
        row = self.pick("mrs.csv", ~mrs["premorbid"] & ~mrs["not_done"] & ~np.isin(mrs["visit"], [SCREENING, UNSCHEDULED]),
                        "RAW-INTEGER")
        if row is not None:
            mrs["score"][row] = 7

    def dose_without_date(self):
        """RAW-REQUIRED-IF: EXYN = Y with no administration date (never Day 1, which fixes study day 1)."""
        ex = self.truth["ex.csv"]
        row = self.pick("ex.csv", ~ex["missed"] & np.isin(ex["visit"], range(1, 6)), "RAW-REQUIRED-IF")
        if row is not None:
            self.edit("ex.csv", row, EXSTDAT="", EXSTTIM="")

    def duplicate_event_number(self):
        """RAW-DUPLICATE: two AEs of one subject with the same AESPID; both records are findings."""
        ae = self.truth["ae.csv"]
        clean = ~ae["uncoded"] & ~ae["fatal"] & (ae["_plant"] < 0) & (ae["_date"] <= CURRENT_DAY)
        second = np.zeros(clean.size, bool)
        second[1:] = clean[1:] & clean[:-1] & (ae["_subject"][1:] == ae["_subject"][:-1])
        row = self.pick("ae.csv", second, "RAW-DUPLICATE")
        if row is not None:
            ae["_plant"][row - 1] = RULES.index("RAW-DUPLICATE")
            self.edit("ae.csv", row, AESPID=str(ae["spid"][row - 1]))

    def visit_off_schedule(self):
        """RAW-VISIT: a glucose sample labelled DAY 10, a visit the schedule does not have."""
        lb = self.truth["lb.csv"]
        day10 = self.subj["day1"][lb["_subject"]] + 9 * DAY
        row = self.pick("lb.csv", self._lab_rows(T["GLUC"]) & (lb["visit"] == WEEK1) & (day10 <= CURRENT_DAY), None)
        if row is not None:
            date = day10[row]
            self.edit("lb.csv", row, "RAW-VISIT", copy=True, VISIT="DAY 10",
                      LBDAT=self._site_date(lb["_subject"][row], date), _date=date)

    def unknown_subject(self):
        """RAW-SUBJID-UNKNOWN: a dose recorded under a SUBJID the site's dm.csv does not have."""
        ex = self.truth["ex.csv"]
        row = self.pick("ex.csv", ~ex["missed"] & (ex["level"] >= 0), None)
        if row is not None:
            site = self.subj["site"][ex["_subject"][row]]
            self.unknown_numbers[site] += 1  # numbers after the site's last consented subject
            subjid = f"{site + 1:02d}-{self.unknown_numbers[site]:03d}"
            self.edit("ex.csv", row, "RAW-SUBJID-UNKNOWN", copy=True, at_end=True, SUBJID=subjid)

    def age_over_65(self):
        """PROT-AGE: an enrolled subject aged 66 at consent."""
        row = self.pick("dm.csv", np.ones(self.subj["site"].size, bool), "PROT-AGE")
        if row is not None:
            self.subj["birth"][row] = _birth_date(self.rng, self.subj["consent"][row:row + 1], np.array([66]))[0]

    def low_neutrophils(self):
        """PROT-LAB: screening ANC 1.2 x10^9/L (exclusion below 1.5)."""
        lb = self.truth["lb.csv"]
        row = self.pick("lb.csv", (lb["test"] == T["NEUT"]) & (lb["visit"] == SCREENING), "PROT-LAB")
        if row is not None:
            lb["value"][row] = 1.2

    def premorbid_disability(self):
        """PROT-MRS-PREMORBID: pre-morbid mRS 2 (exclusion from 2)."""
        row = self.pick("mrs.csv", self.truth["mrs.csv"]["premorbid"], "PROT-MRS-PREMORBID")
        if row is not None:
            self.truth["mrs.csv"]["score"][row] = 2

    def late_day14_dose(self):
        """PROT-VISIT-WINDOW: the DAY 14 dose given on study day 18 (window 12-16)."""
        ex = self.truth["ex.csv"]
        day18 = self.subj["day1"][ex["_subject"]] + 17 * DAY
        row = self.pick("ex.csv", ~ex["missed"] & (ex["visit"] == 7) & (day18 <= CURRENT_DAY), "PROT-VISIT-WINDOW")
        if row is not None:
            ex["_date"][row] = day18[row]

    def late_diagnosis(self):
        """PROT-DIAG-DELAY: diagnosis more than 4 months after onset (inclusion: within 3)."""
        row = self.pick("enrol.csv", np.ones(self.subj["site"].size, bool), "PROT-DIAG-DELAY")
        if row is not None:
            self.subj["onset"][row] = self.subj["diagnosis"][row] - self.rng.integers(125, 140) * DAY

    def wrong_cohort_dose(self):
        """PROT-COHORT-DOSE: a cohort 1 subject dosed from a 5.0E10 kit."""
        ex = self.truth["ex.csv"]
        row = self.pick("ex.csv", ~ex["missed"] & (ex["level"] == 0) & (ex["visit"] > 0), "PROT-COHORT-DOSE")
        if row is not None:
            ex["level"][row] = 1


def _apply_edits(text, edits: list[_Edit], subj) -> None:
    """Put planted text changes into the formatted tables; copies go right after their source record,
    or after the last record of its site."""
    for file in FILES:
        table = text[file]
        for e in edits:
            if e.file == file and not e.copy:
                for column, value in e.changes.items():
                    table[column][e.row] = value
        copies = [e for e in edits if e.file == file and e.copy]
        if not copies:
            continue
        site = subj["site"][table["_subject"]]
        rows = np.array([e.row for e in copies])
        where = np.where([e.at_end for e in copies], np.searchsorted(site, site[rows], side="right"), rows + 1)
        added = {key: value[rows].copy() for key, value in table.items()}
        for i, e in enumerate(copies):
            added["_plant"][i] = e.rule
            for column, value in e.changes.items():
                added[column][i] = value
        for key in table:
            table[key] = np.insert(table[key], where, added[key])


# --- formatting --------------------------------------------------------------------------------------
def _date_parts(dates):
    """Year, month (1-12) and day of a datetime64[D] array (NaT gives nonsense, mask it)."""
    months = dates.astype("datetime64[M]")
    year = dates.astype("datetime64[Y]").astype(np.int64) + 1970
    month = months.astype(np.int64) % 12 + 1
    day = (dates - months.astype("datetime64[D]")).astype(np.int64) + 1
    return year, month, day


def _date_forms(rng, styles, site):
    """Per record: True to write DD MMM YYYY, False for ISO, following each site's habit."""
    style = np.array([st.date_style for st in styles])[site]
    return (style == 1) | ((style == 2) & (rng.random(site.size) < 0.5))


def _join(*parts):
    text = parts[0]
    for part in parts[1:]:
        text = np.strings.add(text, part)
    return text


def _date_text(dates, cdash, precision=None):
    """Dates as the spec writes them; precision 1 = day unknown, 2 = day and month unknown; NaT -> empty."""
    text = np.full(dates.size, "", dtype=TEXT)
    if precision is None:
        precision = np.zeros(dates.size, np.int64)
    present = ~np.isnat(dates)
    for form in (True, False):
        rows = present & (cdash == form)
        year, month, day = _date_parts(dates[rows])
        known = precision[rows]
        yyyy, dd = year.astype(TEXT), np.strings.zfill(day.astype(TEXT), 2)
        if form:
            text[rows] = _join(np.where(known == 0, dd, "UN"), " ", np.where(known == 2, "UNK", MONTHS[month - 1]),
                               " ", yyyy)
        else:
            iso = np.where(known == 2, yyyy, _join(yyyy, "-", np.strings.zfill(month.astype(TEXT), 2)))
            text[rows] = np.where(known == 0, _join(iso, "-", dd), iso)
    return text


def _time_text(minutes):
    return _join(np.strings.zfill((minutes // 60).astype(TEXT), 2), ":",
                 np.strings.zfill((minutes % 60).astype(TEXT), 2))


def _decimal_text(values, decimals):
    """Numbers with a fixed count of decimals per record, as a lab report prints them."""
    text = np.full(values.size, "", dtype=TEXT)
    for places in np.unique(decimals):
        rows = decimals == places
        scaled = np.rint(values[rows] * 10 ** places).astype(np.int64)
        if places == 0:
            text[rows] = scaled.astype(TEXT)
        else:
            text[rows] = _join((scaled // 10 ** places).astype(TEXT), ".",
                               np.strings.zfill((scaled % 10 ** places).astype(TEXT), int(places)))
    return text


def _site_values(styles, site, field):
    return np.array([getattr(st, field) for st in styles], dtype=TEXT)[site]


def _answers(styles, site, flag):
    """Y/N answers in the site's spelling; `no` is empty where the site leaves N answers blank."""
    yes = _site_values(styles, site, "yes")
    no = np.where(np.array([st.no_as_empty for st in styles])[site], "", _site_values(styles, site, "no"))
    return np.where(flag, yes, no)


def _text_table(table, subj, **columns) -> dict[str, np.ndarray]:
    hidden = {key: value for key, value in table.items() if key in ("_subject", "_date", "_plant", "_end")}
    return {"SUBJID": subj["subjid"][table["_subject"]], **columns, **hidden}


def _dm_text(rng, subj, dm, styles):
    site = subj["site"]
    n = site.size
    birth_precision = rng.choice([0, 2, 3], n, p=[0.35, 0.6, 0.05])  # year only is common; 3 = not collected
    birth = np.where(birth_precision == 3, NO_DATE, subj["birth"])
    long_sex = np.array([st.long_sex for st in styles])[site]
    sex = np.where(subj["female"], np.where(long_sex, "FEMALE", "F"), np.where(long_sex, "MALE", "M"))
    race = np.where(rng.random(n) < 0.97, "ASIAN", "OTHER")
    race = np.where(site % 5 == 4, "", race)
    ethnic = np.where(np.isin(site % 5, [1, 3]), "", "NOT HISPANIC OR LATINO")
    return _text_table(dm, subj,
                       BRTHDAT=_date_text(birth, _date_forms(rng, styles, site), np.minimum(birth_precision, 2)),
                       AGE=_age(subj["birth"], subj["consent"]).astype(TEXT), SEX=sex.astype(TEXT),
                       RACE=race.astype(TEXT), ETHNIC=ethnic.astype(TEXT),
                       RFICDAT=_date_text(subj["consent"], _date_forms(rng, styles, site)))


def _enrol_text(rng, subj, enrol, styles):
    site, phase = subj["site"], subj["phase"]
    reason = subj["sf_reason"]
    sfreason = np.where(reason >= 0, SF_TEXT[np.maximum(reason, 0), (site == GB18030_SITE).astype(int)], "")
    return _text_table(
        enrol, subj,
        ENRLFL=np.where(phase > 0, _site_values(styles, site, "yes"), _site_values(styles, site, "no")),
        SFREASON=sfreason,
        PHASE=np.array(["", "ESCALATION", "EXPANSION"], dtype=TEXT)[phase],
        COHORT=np.where(subj["cohort"] > 0, subj["cohort"].astype(TEXT), ""),
        RANDNO=subj["randno"],
        ABTYPE=np.array(["", "NMDAR", "LGI1"], dtype=TEXT)[subj["abtype"]],
        ONSETDAT=_date_text(subj["onset"], _date_forms(rng, styles, site)),
        DIAGDAT=_date_text(subj["diagnosis"], _date_forms(rng, styles, site)),
        ANTICOAG=_answers(styles, site, subj["anticoag"]))


def _ex_text(rng, subj, ex, styles):
    s = ex["_subject"]
    site = subj["site"][s]
    given = ~ex["missed"]
    escalation = given & (ex["level"] >= 0)
    label = DOSE_LABELS[np.maximum(ex["level"], 0), subj["label_form"][s]]
    kit_width = max(5, len(str(ex["kit"].max(initial=0))))
    kit = np.strings.add("K", np.strings.zfill(np.maximum(ex["kit"], 0).astype(TEXT), kit_width))
    return _text_table(
        ex, subj,
        VISIT=DOSE_VISITS[ex["visit"]],
        EXYN=np.where(given, _site_values(styles, site, "yes"), _site_values(styles, site, "no")),
        EXREASND=np.where(ex["missed"], DOSE_NOT_GIVEN[np.maximum(ex["reason"], 0)], ""),
        EXSTDAT=_date_text(np.where(given, ex["_date"], NO_DATE), _date_forms(rng, styles, site)),
        EXSTTIM=np.where(given, _time_text(ex["minutes"]), ""),
        EXDOSE=np.where(escalation, label, ""),
        EXDOSU=np.where(escalation, "PARTICLES", ""),
        KITNO=np.where(given & (ex["kit"] >= 0), kit, ""))


def _ae_text(subj, ae, styles):
    s = ae["_subject"]
    site = subj["site"][s]
    term, coded = ae["term"], ~ae["uncoded"]
    coding = {col: np.where(coded, values[term], "") for col, values in CODING.items()}
    criteria = {"AESDTH": ae["fatal"], "AESLIFE": ae["fatal"], "AESHOSP": ae["hospital"],
                "AESDISAB": np.zeros(s.size, bool), "AESCONG": np.zeros(s.size, bool),
                "AESMIE": ae["serious"] & ~ae["hospital"]}
    columns = {
        "AESPID": ae["spid"].astype(TEXT), "AETERM": VERBATIM[term, ae["variant"]],
        **{col: coding[col] for col in COLUMNS["ae.csv"][3:15]},
        "AESTDAT": _date_text(ae["_date"], ae["start_cdash"], ae["precision"]),
        "AEENDAT": _date_text(ae["_end"], ae["start_cdash"]),
        "AEONGO": _answers(styles, site, np.zeros(s.size, bool)),
        "AETOXGR": ae["grade"].astype(TEXT),
        "AESER": np.where(ae["serious"], _site_values(styles, site, "yes"), _site_values(styles, site, "no")),
        **{col: _answers(styles, site, flag) for col, flag in criteria.items()},
        "AEREL": RELATIONS[ae["relation"]], "AEACN": ACTIONS[ae["action"]], "AEOUT": OUTCOMES[ae["outcome"]],
        "AEDLT": np.where(subj["phase"][s] == 1,
                          np.where(ae["dlt"], _site_values(styles, site, "yes"), _site_values(styles, site, "no")), ""),
    }
    table = _text_table(ae, subj, **columns)
    table["_ongoing_outcome"] = OUTCOMES[ae["ongoing_outcome"]]
    table["_fatal"] = ae["fatal"]
    return table


def _lb_text(rng, subj, lb, styles):
    s, test, lab = lb["_subject"], lb["test"], lb["lab"]
    site = subj["site"][s]
    numeric = test < N_NUMERIC
    done = ~lb["not_done"]
    reported = lb["value"] / LAB_FACTOR[lab, test]
    result = np.where(numeric, _decimal_text(np.nan_to_num(reported), np.where(numeric, LAB_DECIMALS[lab, test], 0)),
                      lb["result"])
    result = np.where(lb["censored"], LAB_BELOW_LLOQ[lab, test], result)
    antibody = np.isin(test, [T["NMDARAB"], T["LGI1AB"]])
    no_specimen = np.array([st.no_specimen for st in styles])[site] & ~antibody
    return _text_table(
        lb, subj,
        VISIT=ASSESSMENT_VISITS[lb["visit"]],
        LBDAT=_date_text(lb["_date"], _date_forms(rng, styles, site)),
        LBTIM=_time_text(lb["minutes"]),
        LBCAT=CATEGORY[test], LBTEST=LAB_NAME[lab, test],
        LBSPEC=np.where(no_specimen, "", SPECIMENS[lb["specimen"]]),
        LBORRES=np.where(done, result, ""),
        LBORRESU=np.where(done, LAB_UNIT[lab, test], ""),
        LBORNRLO=np.where(done, LAB_LOW[lab, test], ""),
        LBORNRHI=np.where(done, LAB_HIGH[lab, test], ""),
        LBSTAT=np.where(done, "", "NOT DONE"),
        LBREASND=np.where(done, "", LAB_NOT_DONE[np.maximum(lb["reason"], 0)]))


def _mrs_text(rng, subj, mrs, styles):
    site = subj["site"][mrs["_subject"]]
    done = ~mrs["not_done"]
    return _text_table(
        mrs, subj,
        VISIT=ASSESSMENT_VISITS[mrs["visit"]],
        MRSDAT=_date_text(mrs["_date"], _date_forms(rng, styles, site)),
        MRSTYPE=np.where(mrs["premorbid"], "PRE-MORBID", "CURRENT").astype(TEXT),
        MRSSCORE=np.where(done, mrs["score"].astype(TEXT), ""),
        MRSSTAT=np.where(done, "", "NOT DONE").astype(TEXT))


# --- writing -----------------------------------------------------------------------------------------
def _csv_field(values):
    """RFC 4180 quoting, only where a field holds a comma, quote or line break."""
    special = np.zeros(values.size, bool)
    for char in (",", '"', "\n", "\r"):
        special |= np.strings.find(values, char) >= 0
    if not special.any():
        return values
    quoted = _join('"', np.strings.replace(values, '"', '""'), '"')
    return np.where(special, quoted, values)


def _csv_lines(table, names):
    """One CSV record per row of `table`, fields in the order of `names`."""
    fields = [_csv_field(table[name]) if name in FREE_TEXT else table[name] for name in names]
    line = fields[0]
    for field in fields[1:]:
        line = _join(line, ",", field)
    return line


def _header_name(name: str, case: str) -> str:
    return {"upper": name, "lower": name.lower(), "mixed": name.capitalize()}[case]


def _ongoing_at(table, day, style):
    """The AE records as the site's EDC showed them on `day`: events not yet ended are ongoing."""
    ongoing = table["_end"] > day
    if not ongoing.any():
        return table
    table = dict(table)
    no = "" if style.no_as_empty else style.no
    table["AEENDAT"] = np.where(ongoing, "", table["AEENDAT"])
    table["AEONGO"] = np.where(ongoing, style.yes, table["AEONGO"])
    table["AEOUT"] = np.where(ongoing, table["_ongoing_outcome"], table["AEOUT"])
    dying = ongoing & table["_fatal"]  # before the death the event was a grade 4, not yet fatal
    table["AESDTH"] = np.where(dying, no, table["AESDTH"])
    table["AETOXGR"] = np.where(dying, "4", table["AETOXGR"])
    return table


def _write_sites(out: Path, rng, styles, text, subj, n_transfers: int) -> pd.DataFrame:
    """Every site's transfer folders with manifests; returns the findings planted in CURRENT transfers."""
    n_sites = len(styles)
    exports = [CURRENT_EXPORT - (n_transfers - 1 - i) * TRANSFER_INTERVAL for i in range(n_transfers)]
    bounds = {file: np.searchsorted(subj["site"][text[file]["_subject"]], np.arange(n_sites + 1)) for file in FILES}
    planted = []
    for s, style in enumerate(styles):
        in_flight = n_transfers >= 2 and n_sites >= 2 and s == n_sites - 1
        layouts, tables, lines = {}, {}, {}
        for file in FILES:
            lo, hi = bounds[file][s:s + 2]
            table = {key: value[lo:hi] for key, value in text[file].items()}
            columns = list(COLUMNS[file])
            if style.shuffled:
                columns = [columns[i] for i in rng.permutation(len(columns))]
            if style.extra_column:
                columns.insert(int(rng.integers(0, len(columns) + 1)), EXTRA_COLUMN)
                table[EXTRA_COLUMN] = rng.choice(np.array(SITE_COMMENTS, dtype=TEXT), hi - lo,
                                                 p=[0.8, 0.1, 0.05, 0.05])
            layouts[file], tables[file] = columns, table
            if file != "ae.csv":  # AE records change with the export day (ongoing events)
                lines[file] = _csv_lines(table, columns)
        for export in exports + ([IN_FLIGHT_EXPORT] if in_flight else []):
            folder = str(export).replace("-", "").replace(":", "")
            transfer = out / f"site-{style.siteid}" / folder
            transfer.mkdir(parents=True)
            day = export.astype("datetime64[D]")
            files = {}
            for file in FILES:
                table = tables[file]
                keep = (table["_date"] <= day) & (subj["decision"][table["_subject"]] <= day)
                if file == "ae.csv":
                    shown = _ongoing_at({k: v[keep] for k, v in table.items()}, day, style)
                    records = _csv_lines(shown, layouts[file])
                else:
                    records = lines[file][keep]
                header = ",".join(_header_name(c, style.header_case) for c in layouts[file])
                body = style.newline.join([header, *records.tolist()]) + style.newline
                data = body.encode(style.codec)
                files[file] = {"rows": int(records.size), "sha256": hashlib.sha256(data).hexdigest()}
                if export == IN_FLIGHT_EXPORT and file == "mrs.csv":
                    planted.append((style.siteid, folder, file, pd.NA, pd.NA, "TRF-MISSING-FILE"))
                    continue  # listed in the manifest, still being copied
                (transfer / file).write_bytes(data)
                if export == CURRENT_EXPORT:
                    codes = table["_plant"][keep]
                    rows = np.flatnonzero(codes >= 0)
                    planted.extend(zip(repeat(style.siteid), repeat(folder), repeat(file), (rows + 1).tolist(),
                                       table["SUBJID"][keep][rows].tolist(), np.array(RULES)[codes[rows]].tolist()))
                    if style.extra_column:
                        planted.append((style.siteid, folder, file, pd.NA, pd.NA, "RAW-EXTRA-COLUMN"))
            manifest = {"site": style.siteid, "exported_at": f"{export}Z", "encoding": style.encoding,
                        "files": files}
            (transfer / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    frame = pd.DataFrame(planted, columns=["SITEID", "TRANSFER", "FILE", "ROW", "SUBJID", "RULE"])
    frame = frame.astype({"SITEID": "string", "TRANSFER": "string", "FILE": "string", "ROW": "Int64",
                          "SUBJID": "string", "RULE": "string"})
    frame["SEVERITY"] = frame["RULE"].map(SEVERITY).astype("string")
    return frame.sort_values(["SITEID", "TRANSFER", "FILE", "ROW", "RULE"], na_position="first",
                             ignore_index=True)


def _write_randomization(out: Path, subj) -> None:
    """The IWRS list, for the unblinded team: one row per randomized subject, in RANDNO order."""
    rows = np.flatnonzero(subj["randno"] != "")
    rows = rows[np.argsort(subj["randno"][rows])]
    exosome = subj["exosome"][rows]
    table = {"RANDNO": subj["randno"][rows], "SUBJID": subj["subjid"][rows],
             "TRTGRP": np.where(exosome, "EXOSOME", "PLACEBO").astype(TEXT),
             "DOSE": np.where(exosome, "5.0E10", "0").astype(TEXT),
             "RANDDAT": np.datetime_as_string(subj["day1"][rows]).astype(TEXT)}
    body = "\n".join([",".join(table), *_csv_lines(table, list(table)).tolist()]) + "\n"
    (out / "unblinded").mkdir()
    (out / "unblinded" / "randomization.csv").write_bytes(body.encode("utf-8"))


def _subjects_frame(subj) -> pd.DataFrame:
    """The truth per consented subject, for tests that check what the outputs may reveal."""
    phase, cohort = subj["phase"], subj["cohort"]
    dose = np.where(phase == 1, COHORT_DOSES[np.maximum(cohort - 1, 0)],
                    np.where(subj["exosome"], DSMB_DOSE, 0.0))
    frame = pd.DataFrame({
        "SUBJID": subj["subjid"].tolist(),
        "SITEID": np.strings.zfill((subj["site"] + 1).astype(TEXT), 2).tolist(),
        "ENRLFL": np.where(phase > 0, "Y", "N"),
        "PHASE": np.array([None, "ESCALATION", "EXPANSION"], dtype=object)[phase],
        "COHORT": np.where(cohort > 0, cohort.astype(str), None),
        "RANDNO": np.where(phase == 2, subj["randno"].astype(object), None),
        "TRTGRP": np.where(phase == 2, np.where(subj["exosome"], "EXOSOME", "PLACEBO"), None),
        "DOSE": np.where(phase > 0, dose, np.nan),
    })
    return frame.astype({c: "string" for c in frame.columns if c != "DOSE"})
