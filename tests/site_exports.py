"""Writes site transfers for tests, in any style the transfer spec allows.

Tests describe rows as dicts; this module turns them into CSV bytes (RFC 4180 via the csv
module) in the requested encoding, line ending and header case, and writes the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

SPEC_COLUMNS = {
    "dm.csv": ["SUBJID", "BRTHDAT", "AGE", "SEX", "RACE", "ETHNIC", "RFICDAT"],
    "enrol.csv": ["SUBJID", "ENRLFL", "SFREASON", "PHASE", "COHORT", "RANDNO", "ABTYPE", "ONSETDAT", "DIAGDAT", "ANTICOAG"],
    "ex.csv": ["SUBJID", "VISIT", "EXYN", "EXREASND", "EXSTDAT", "EXSTTIM", "EXDOSE", "EXDOSU", "KITNO"],
    "ae.csv": ["SUBJID", "AESPID", "AETERM", "AEDECOD", "AEPTCD", "AELLT", "AELLTCD", "AEHLT", "AEHLTCD", "AEHLGT",
               "AEHLGTCD", "AEBODSYS", "AEBDSYCD", "AESOC", "AESOCCD", "AESTDAT", "AEENDAT", "AEONGO", "AETOXGR",
               "AESER", "AESDTH", "AESLIFE", "AESHOSP", "AESDISAB", "AESCONG", "AESMIE", "AEREL", "AEACN", "AEOUT",
               "AEDLT"],
    "lb.csv": ["SUBJID", "VISIT", "LBDAT", "LBTIM", "LBCAT", "LBTEST", "LBSPEC", "LBORRES", "LBORRESU", "LBORNRLO",
               "LBORNRHI", "LBSTAT", "LBREASND"],
    "mrs.csv": ["SUBJID", "VISIT", "MRSDAT", "MRSTYPE", "MRSSCORE", "MRSSTAT"],
}


def csv_bytes(rows: list[dict], columns: list[str], encoding: str = "utf-8", bom: bool = False,
              newline: str = "\n", header_case=str.upper, quoting=csv.QUOTE_MINIMAL) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=newline, quoting=quoting)
    writer.writerow([header_case(c) for c in columns])
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns])
    data = buffer.getvalue().encode(encoding)
    return (b"\xef\xbb\xbf" + data) if bom else data


def write_transfer(root: Path, site: str, name: str, tables: dict[str, list[dict]], *, encoding: str = "utf-8",
                   bom: bool = False, newline: str = "\n", header_case=str.upper,
                   columns: dict[str, list[str]] | None = None, raw_files: dict[str, bytes] | None = None,
                   manifest_changes: dict | None = None, exported_at: str | None = None) -> Path:
    """A complete transfer folder; `raw_files` replaces a file's bytes (its manifest entry follows
    the real bytes unless `manifest_changes` says otherwise)."""
    folder = root / f"site-{site}" / name
    folder.mkdir(parents=True)
    files = {}
    for file, spec_columns in SPEC_COLUMNS.items():
        cols = (columns or {}).get(file, spec_columns)
        rows = tables.get(file, [])
        data = (raw_files or {}).get(file) or csv_bytes(rows, cols, encoding, bom, newline, header_case)
        (folder / file).write_bytes(data)
        files[file] = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"site": site, "exported_at": exported_at or f"{name[:4]}-{name[4:6]}-{name[6:8]}T{name[9:11]}:{name[11:13]}:{name[13:15]}Z",
                "encoding": "gb18030" if encoding == "gb18030" else "utf-8", "files": files}
    for key, value in (manifest_changes or {}).items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def one_subject_trial(site: str = "01", subject: str = "001") -> dict[str, list[dict]]:
    """A small, valid trial of one escalation subject: the base that tests break on purpose."""
    subjid = f"{site}-{subject}"
    ex = [{"SUBJID": subjid, "VISIT": f"DAY {d}", "EXYN": "Y", "EXSTDAT": f"2026-03-{6 + d:02d}", "EXSTTIM": "09:00",
           "EXDOSE": "2.5E10", "EXDOSU": "PARTICLES"} for d in range(1, 8)]
    return {
        "dm.csv": [{"SUBJID": subjid, "BRTHDAT": "1980", "AGE": "45", "SEX": "F", "RACE": "ASIAN",
                    "ETHNIC": "NOT HISPANIC OR LATINO", "RFICDAT": "20 FEB 2026"}],
        "enrol.csv": [{"SUBJID": subjid, "ENRLFL": "Y", "PHASE": "ESCALATION", "COHORT": "1", "ABTYPE": "NMDAR",
                       "ONSETDAT": "2026-01-10", "DIAGDAT": "2026-02-01", "ANTICOAG": "N"}],
        "ex.csv": ex,
        "ae.csv": [{"SUBJID": subjid, "AESPID": "1", "AETERM": "Headache, mild", "AEDECOD": "Headache",
                    "AEPTCD": "10019211", "AESTDAT": "08 MAR 2026", "AEENDAT": "2026-03-09", "AETOXGR": "1",
                    "AESER": "N", "AEREL": "POSSIBLY RELATED", "AEACN": "DOSE NOT CHANGED",
                    "AEOUT": "RECOVERED/RESOLVED", "AEDLT": "N"}],
        "lb.csv": [{"SUBJID": subjid, "VISIT": "SCREENING", "LBDAT": "2026-02-25", "LBCAT": "HEMATOLOGY",
                    "LBTEST": "Hb", "LBSPEC": "BLOOD", "LBORRES": "13.1", "LBORRESU": "g/dL", "LBORNRLO": "11.5",
                    "LBORNRHI": "15.0"},
                   {"SUBJID": subjid, "VISIT": "DAY 1", "LBDAT": "2026-03-07", "LBTIM": "08:00", "LBCAT": "HEMATOLOGY",
                    "LBTEST": "ANC", "LBSPEC": "BLOOD", "LBORRES": "3500", "LBORRESU": "/uL", "LBORNRLO": "1800",
                    "LBORNRHI": "7700"}],
        "mrs.csv": [{"SUBJID": subjid, "VISIT": "SCREENING", "MRSDAT": "2026-02-25", "MRSTYPE": "CURRENT", "MRSSCORE": "3"},
                    {"SUBJID": subjid, "VISIT": "SCREENING", "MRSDAT": "2026-02-25", "MRSTYPE": "PRE-MORBID", "MRSSCORE": "0"},
                    {"SUBJID": subjid, "VISIT": "DAY 1", "MRSDAT": "2026-03-07", "MRSTYPE": "CURRENT", "MRSSCORE": "3"}],
    }


def edit_csv(folder: Path, file: str, edit) -> None:
    """Rewrites one file of a transfer through `edit(header, rows) -> rows` (rows are lists of
    text, header as the site wrote it) in the transfer's encoding, and fixes its manifest entry,
    as a site whose data really said so would have sent it."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    encoding = manifest["encoding"]
    data = (folder / file).read_bytes()
    bom = data.startswith(b"\xef\xbb\xbf")
    text = data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    header, rows = records[0], records[1:]
    rows = edit(header, rows)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n" if "\r\n" in text else "\n")
    writer.writerow(header)
    writer.writerows(rows)
    out = buffer.getvalue().encode(encoding)
    out = (b"\xef\xbb\xbf" + out) if bom else out
    (folder / file).write_bytes(out)
    manifest["files"][file] = {"rows": len(rows), "sha256": hashlib.sha256(out).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def column_index(header: list[str], column: str) -> int:
    return [h.strip().upper() for h in header].index(column)
