"""Raw ingest against the transfer spec's wording (site-export-spec.md sections 3 and 4)."""

import codecs
import csv
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline import transfers
from pipeline.automation import complete_new_transfers
from site_exports import SPEC_COLUMNS, csv_bytes, one_subject_trial, write_transfer

OLD, NEW = "20261122T220000", "20261123T220005"


def statuses(root):
    return {(t.site, t.name): (t.status, t.reason) for t in transfers.select_current(transfers.list_transfers(root))}


def current(root, site="01"):
    return next(t for t in transfers.select_current(transfers.list_transfers(root)) if t.status == "CURRENT"
                and t.site == site)


def snapshot(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in root.rglob("*"))


def test_newest_complete_transfer_is_current_and_older_superseded(tmp_path):
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    write_transfer(tmp_path, "01", NEW, one_subject_trial())
    assert statuses(tmp_path) == {("01", OLD): ("SUPERSEDED", None), ("01", NEW): ("CURRENT", None)}


def _break_file(folder, name, data):
    (folder / name).write_bytes(data)


@pytest.mark.parametrize("breakage, rule, words", [
    ("missing_file", "TRF-MISSING-FILE", "listed in manifest.json but absent"),
    ("unlisted_file", "TRF-MISSING-FILE", "not listed in manifest.json"),
    ("wrong_rows", "TRF-ROWS", "data rows, the manifest says"),
    ("wrong_sha256", "TRF-SHA256", "does not match the manifest"),
    ("bad_json", "TRF-MANIFEST", "not readable JSON"),
    ("no_manifest", "TRF-MANIFEST", "manifest.json is missing"),
    ("missing_key", "TRF-MANIFEST", "missing key(s) encoding"),
    ("undecodable", "TRF-DECODE", "bytes are not valid utf-8"),
    ("bad_encoding", "TRF-ENCODING", "is not allowed"),
    ("utf8_declared_gb18030", "TRF-DECODE", "reads as UTF-8 Chinese ('上呼吸道感染')"),
    ("utf8_bom_declared_gb18030", "TRF-DECODE", "starts with a UTF-8 byte-order mark"),
    ("site_mismatch", "TRF-SITE", "does not match the folder site"),
    ("missing_column", "TRF-COLUMNS", "required column(s) AGE missing"),
    ("duplicate_column", "TRF-COLUMNS", "appear more than once"),
    ("empty_file", "TRF-CSV", "the file is empty"),
])
def test_rejected_newest_transfer_leaves_previous_current(tmp_path, breakage, rule, words):
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial())
    manifest = json.loads((folder / "manifest.json").read_text())

    def rewrite(name, data):
        (folder / name).write_bytes(data)
        manifest["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()

    if breakage == "missing_file":
        (folder / "mrs.csv").unlink()
    elif breakage == "unlisted_file":
        del manifest["files"]["ae.csv"]
    elif breakage == "wrong_rows":
        manifest["files"]["lb.csv"]["rows"] = 3
    elif breakage == "wrong_sha256":
        (folder / "ex.csv").write_bytes((folder / "ex.csv").read_bytes()[:-20])
    elif breakage == "bad_json":
        (folder / "manifest.json").write_text('{"site": "01", ')
    elif breakage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif breakage == "missing_key":
        del manifest["encoding"]
    elif breakage == "undecodable":
        rewrite("ae.csv", csv_bytes(one_subject_trial()["ae.csv"], SPEC_COLUMNS["ae.csv"]).replace(b"mild", b"m\xffld"))
    elif breakage == "bad_encoding":
        manifest["encoding"] = "latin-1"
    elif breakage in ("utf8_declared_gb18030", "utf8_bom_declared_gb18030"):
        # UTF-8 read as gb18030 decodes without error into other Chinese: 上呼吸道感染 became
        # 涓婂懠鍚搁亾鎰熸煋 in AETERM, and a BOM became part of the first column's name.
        manifest["encoding"] = "gb18030"
        data = (folder / "ae.csv").read_bytes().replace(b"mild", "上呼吸道感染".encode())
        rewrite("ae.csv", data if breakage == "utf8_declared_gb18030" else codecs.BOM_UTF8 + data)
    elif breakage == "site_mismatch":
        manifest["site"] = "02"
    elif breakage == "missing_column":
        rewrite("dm.csv", csv_bytes(one_subject_trial()["dm.csv"], [c for c in SPEC_COLUMNS["dm.csv"] if c != "AGE"]))
    elif breakage == "duplicate_column":
        rewrite("dm.csv", b"SUBJID,subjid,AGE,SEX,RFICDAT\n01-001,01-001,45,F,2026-02-20\n")
    elif breakage == "empty_file":
        rewrite("mrs.csv", b"")
        manifest["files"]["mrs.csv"]["rows"] = 0
    if breakage not in ("bad_json", "no_manifest"):
        (folder / "manifest.json").write_text(json.dumps(manifest))

    result = statuses(tmp_path)
    assert result[("01", OLD)] == ("CURRENT", None)
    status, reason = result[("01", NEW)]
    assert status == "REJECTED"
    assert words in reason
    rejected = next(t for t in transfers.select_current(transfers.list_transfers(tmp_path)) if t.name == NEW)
    assert rule in {p["RULE"] for p in rejected.problems}


def test_transfer_folder_must_be_an_export_time(tmp_path):
    write_transfer(tmp_path, "01", "latest", one_subject_trial())
    assert statuses(tmp_path)[("01", "latest")][0] == "REJECTED"


def test_gb18030_bom_crlf_lower_case_header_and_any_column_order(tmp_path):
    trial = one_subject_trial("02")
    trial["ae.csv"][0]["AETERM"] = '鼻腔不适, "轻度"\n持续两天'
    shuffled = {f: list(reversed(c)) for f, c in SPEC_COLUMNS.items()}
    write_transfer(tmp_path, "02", NEW, trial, encoding="gb18030", newline="\r\n", header_case=str.lower,
                   columns=shuffled)
    write_transfer(tmp_path, "03", NEW, one_subject_trial("03"), bom=True, header_case=str.title)
    gb = current(tmp_path, "02")
    assert gb.files["ae.csv"].data.loc[0, "AETERM"] == '鼻腔不适, "轻度"\n持续两天'
    assert list(gb.files["dm.csv"].data.columns[:4]) == ["src_site", "src_transfer", "src_file", "src_row"]
    assert gb.files["dm.csv"].data.loc[0, "SUBJID"] == "02-001"
    bom = current(tmp_path, "03")
    assert bom.files["dm.csv"].data.loc[0, "SUBJID"] == "03-001"   # the BOM is not part of the first header


def test_every_value_stays_text_with_its_coordinates(tmp_path):
    trial = one_subject_trial()
    trial["dm.csv"][0]["AGE"] = "045"
    write_transfer(tmp_path, "01", NEW, trial)
    dm = current(tmp_path).files["dm.csv"].data
    assert dm.loc[0, "AGE"] == "045" and dm.loc[0, "SUBJID"] == "01-001"
    assert (dm.loc[0, "src_site"], dm.loc[0, "src_transfer"], dm.loc[0, "src_file"], dm.loc[0, "src_row"]) == (
        "01", NEW, "dm.csv", 1)
    lb = current(tmp_path).files["lb.csv"].data
    assert list(lb["src_row"]) == [1, 2]


def test_empty_field_is_null_and_text_like_NA_is_kept(tmp_path):
    trial = one_subject_trial()
    trial["ae.csv"][0]["AETERM"] = "NA"
    write_transfer(tmp_path, "01", NEW, trial)
    ae = current(tmp_path).files["ae.csv"].data
    assert ae.loc[0, "AETERM"] == "NA"
    assert ae["AELLT"].isna().all()


def test_header_only_file_is_valid_and_empty(tmp_path):
    trial = one_subject_trial()
    trial["ae.csv"] = []
    write_transfer(tmp_path, "01", NEW, trial)
    assert current(tmp_path).files["ae.csv"].data.empty


def test_optional_column_may_be_absent_and_unknown_column_is_reported(tmp_path):
    columns = dict(SPEC_COLUMNS)
    columns["dm.csv"] = [c for c in SPEC_COLUMNS["dm.csv"] if c != "ETHNIC"] + ["SITE_COMMENT"]
    write_transfer(tmp_path, "01", NEW, one_subject_trial(), columns=columns)
    raw = current(tmp_path).files["dm.csv"]
    assert raw.data["ETHNIC"].isna().all()
    assert "SITE_COMMENT" not in raw.data.columns
    assert [(f["RULE"], f["SEVERITY"]) for f in raw.findings] == [("RAW-EXTRA-COLUMN", "WARNING")]
    assert "SITE_COMMENT" in raw.findings[0]["MESSAGE"]


def test_repeated_unknown_columns_are_reported_once_and_ignored(tmp_path):
    """Spec section 4: unknown extra columns are reported and ignored, whatever their names; the
    trailing commas of a spreadsheet export make several columns with an empty name."""
    data = (b"SUBJID,BRTHDAT,AGE,SEX,RACE,ETHNIC,RFICDAT,Note,NOTE,,\n"
            b"01-001,1980,45,F,ASIAN,,2026-02-20,a,b,,\n")
    write_transfer(tmp_path, "01", NEW, one_subject_trial(), raw_files={"dm.csv": data})
    raw = current(tmp_path).files["dm.csv"]
    assert raw.data.loc[0, "SUBJID"] == "01-001" and raw.data.loc[0, "RFICDAT"] == "2026-02-20"
    assert [f["RULE"] for f in raw.findings] == ["RAW-EXTRA-COLUMN", "RAW-EXTRA-COLUMN"]
    assert [f["MESSAGE"] for f in raw.findings] == [
        "dm.csv: column NOTE is not in the transfer spec; ignored (2 columns of that name)",
        "dm.csv: column (empty name) is not in the transfer spec; ignored (2 columns of that name)"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_empty_lines_between_records_are_reported(tmp_path, newline):
    """An empty line was skipped without a word, so every ROW after it was one less than the
    line the site counts. An empty line inside a quoted field is text, and trailing ones at the
    end of the file change no numbering."""
    lines = [b"SUBJID,AESPID,AETERM,AESTDAT,AETOXGR,AESER,AEREL", b"01-001,1,Headache,2026-03-01,1,N,NOT RELATED", b"",
             b'01-001,2,"Fever' + newline + newline + b'38.3 C",2026-03-02,1,N,NOT RELATED', b"",
             b"01-001,3,Rash,2026-03-03,1,N,NOT RELATED", b"", b""]
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial(), raw_files={"ae.csv": newline.join(lines)})
    rewrite_manifest(folder, lambda m: m["files"]["ae.csv"].update(rows=3))
    raw = current(tmp_path).files["ae.csv"]
    assert raw.data["AETERM"].tolist() == ["Headache", "Fever\n\n38.3 C" if newline == b"\n" else "Fever\r\n\r\n38.3 C",
                                           "Rash"]
    (finding,) = [f for f in raw.findings if f["RULE"] == "RAW-EMPTY-LINE"]
    assert finding["SEVERITY"] == "WARNING" and finding["ROW"] is None
    assert finding["MESSAGE"].startswith("ae.csv: 2 empty line(s) skipped (line 3, 7); ROW numbers the data records")
    assert transfers._empty_lines(newline * 2 + newline.join(lines), 4) == [1, 2, 5, 9]   # before the header too


def test_a_file_without_empty_lines_has_no_finding(tmp_path):
    write_transfer(tmp_path, "01", NEW, one_subject_trial())
    assert not [f for raw in current(tmp_path).files.values() for f in raw.findings if f["RULE"] == "RAW-EMPTY-LINE"]


def test_unterminated_quote_is_refused_with_the_line_it_starts_on(tmp_path):
    data = b'SUBJID,BRTHDAT,AGE,SEX,RACE,ETHNIC,RFICDAT\n01-001,1980,45,F,ASIAN,,2026-02-20\n"01-002,1981,46,M,,,\n'
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    write_transfer(tmp_path, "01", NEW, one_subject_trial(), raw_files={"dm.csv": data})
    status, reason = statuses(tmp_path)[("01", NEW)]
    assert status == "REJECTED"
    assert "dm.csv: not a readable CSV file: line 3: a quoted field starts here and is never closed" in reason


def test_record_with_wrong_field_count_is_kept_and_reported(tmp_path):
    data = (b"SUBJID,BRTHDAT,AGE,SEX,RACE,ETHNIC,RFICDAT\n01-001,1980,45,F,ASIAN,,2026-02-20\n"
            b"01-002,1981,46,M\n\"01-003\",\"1982\",\"47\",\"F\",\"\",\"\",\"2026-02-21\"\n")
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial(), raw_files={"dm.csv": data})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["dm.csv"]["rows"] = 3
    (folder / "manifest.json").write_text(json.dumps(manifest))
    raw = current(tmp_path).files["dm.csv"]
    assert raw.rows == 3 and list(raw.data["src_row"]) == [1, 2, 3]
    assert list(raw.data["src_ragged"]) == [False, True, False]
    assert [(f["RULE"], f["ROW"]) for f in raw.findings] == [("RAW-FIELD-COUNT", 2)]
    assert raw.data.loc[2, "SUBJID"] == "01-003"


def test_quoted_fields_per_rfc4180(tmp_path):
    trial = one_subject_trial()
    trial["ex.csv"][0]["EXREASND"] = 'said "no", then\r\nagreed'
    write_transfer(tmp_path, "01", NEW, trial, newline="\r\n")
    folder = tmp_path / "site-01" / NEW
    assert list(csv.reader(open(folder / "ex.csv", newline="", encoding="utf-8")))[1][3] == 'said "no", then\r\nagreed'
    ex = current(tmp_path).files["ex.csv"].data
    assert ex.loc[0, "EXREASND"] == 'said "no", then\r\nagreed'
    assert current(tmp_path).files["ex.csv"].rows == 7


def test_ingest_never_writes_in_the_exports_root(tmp_path):
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    write_transfer(tmp_path, "01", NEW, one_subject_trial())
    before = snapshot(tmp_path)
    transfers.select_current(transfers.list_transfers(tmp_path))
    assert snapshot(tmp_path) == before


def test_unblinded_folder_is_never_listed(tmp_path):
    write_transfer(tmp_path, "01", NEW, one_subject_trial())
    (tmp_path / "unblinded").mkdir()
    os.chmod(tmp_path / "unblinded", 0)
    try:
        found = transfers.list_transfers(tmp_path)
    finally:
        os.chmod(tmp_path / "unblinded", 0o755)
    assert [t.site for t in found] == ["01"]


def test_missing_exports_root_is_refused(tmp_path):
    with pytest.raises(transfers.ExportsRootError, match="does not exist"):
        transfers.list_transfers(tmp_path / "nowhere")


_OPENED: list[list[str]] = []


def _record_opens(event, args):
    if _OPENED and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED[-1].append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


@contextmanager
def opened_files():
    """The paths this process opens inside the block (Python's audit hook)."""
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


def rewrite_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_cannot_name_a_file_outside_its_transfer_folder(tmp_path):
    """Contract section 5: blinded outputs never read unblinded/. A manifest file name with a path
    would reach it (or another site's folder): the transfer is REJECTED and the file never opened."""
    secret = tmp_path / "unblinded" / "randomization.csv"
    secret.parent.mkdir()
    secret.write_text("RANDNO,SUBJID,TRTGRP,DOSE,RANDDAT\n")
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial())
    rewrite_manifest(folder, lambda m: m["files"].update(
        {"../../unblinded/randomization.csv": {"rows": 0, "sha256": "0" * 64}}))
    with opened_files() as opened:
        result = statuses(tmp_path)
    assert result[("01", OLD)] == ("CURRENT", None)
    status, reason = result[("01", NEW)]
    assert status == "REJECTED" and 'file name(s) "../../unblinded/randomization.csv" are not plain names' in reason
    assert not [f for f in opened if "randomization" in f]


@pytest.mark.parametrize("linked", ["ae.csv", "manifest.json"])
@pytest.mark.parametrize("newest", [True, False])
def test_a_transfer_file_that_is_a_symbolic_link_is_never_followed(tmp_path, linked, newest):
    """A link planted in a transfer led a blinded run into unblinded/: it opened the IWRS list
    and published its header in the rejection reason. Links are refused unopened, in the newest
    transfer and in an older one (whose checksums are verified every run)."""
    secret = tmp_path / "unblinded" / "randomization.csv"
    secret.parent.mkdir()
    secret.write_text("RANDNO,SUBJID,TRTGRP,DOSE,RANDDAT\n")
    folders = {name: write_transfer(tmp_path, "01", name, one_subject_trial()) for name in (OLD, NEW)}
    folder = folders[NEW if newest else OLD]
    target = folder / linked
    target.unlink()
    target.symlink_to(os.path.relpath(secret, folder))
    if linked == "ae.csv":
        rewrite_manifest(folder, lambda m: m["files"]["ae.csv"].update(
            {"rows": 0, "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}))
    with opened_files() as opened:
        result = statuses(tmp_path)
    status, reason = result[("01", folder.name)]
    assert status == "REJECTED" and "symbolic link" in reason and "links are never followed" in reason
    assert "RANDNO" not in reason and "randomization" not in reason
    assert result[("01", OLD if newest else NEW)][0] == "CURRENT"
    assert not [f for f in opened if "randomization" in f]


def test_older_transfers_are_hashed_again_only_when_their_files_changed(tmp_path):
    """Every run checks every older transfer against its manifest; a file unchanged on disk since
    it was hashed is not read again (the nightly cost must not grow with the transfer history)."""
    exports = tmp_path / "exports"
    write_transfer(exports, "01", OLD, one_subject_trial())
    write_transfer(exports, "01", NEW, one_subject_trial())

    def run():
        known = transfers.KnownTransfers(tmp_path / "known_transfers.json")
        found = transfers.select_current(transfers.list_transfers(exports), known)
        known.save()
        return {(t.site, t.name): (t.status, t.reason) for t in found}

    first = run()
    with opened_files() as opened:
        second = run()
    assert first == second == {("01", OLD): ("SUPERSEDED", None), ("01", NEW): ("CURRENT", None)}
    assert not [f for f in opened if OLD in f and f.endswith(".csv")]
    assert [f for f in opened if NEW in f and f.endswith(".csv")]          # the current one is read
    older = exports / "site-01" / OLD / "ae.csv"
    stat, data = older.stat(), older.read_bytes()
    older.write_bytes(data.replace(b"mild", b"MILD"))                      # same size, same mtime
    os.utime(older, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    status, reason = run()[("01", OLD)]
    assert status == "REJECTED" and "ae.csv: sha256" in reason and "does not match the manifest" in reason


def test_a_rejected_transfer_stays_rejected_when_a_newer_one_arrives(tmp_path):
    """Spec section 3: a wrong row count rejects a transfer whole. An older transfer is read in
    full once (its verdict kept while its manifest, folder and the code stay the same), so last
    night's rejection and its reason do not turn into SUPERSEDED when tonight's transfer arrives."""
    exports = tmp_path / "exports"
    bad = write_transfer(exports, "01", OLD, one_subject_trial())
    rewrite_manifest(bad, lambda m: m["files"]["lb.csv"].update(rows=m["files"]["lb.csv"]["rows"] + 5))

    def run():
        known = transfers.KnownTransfers(tmp_path / "known_transfers.json")
        found = transfers.select_current(transfers.list_transfers(exports), known)
        known.save()
        return {(t.site, t.name): (t.status, t.reason) for t in found}

    alone = run()[("01", OLD)]
    assert alone[0] == "REJECTED" and "lb.csv:" in alone[1] and "the manifest says" in alone[1]
    write_transfer(exports, "01", NEW, one_subject_trial())
    assert run() == {("01", OLD): alone, ("01", NEW): ("CURRENT", None)}
    with opened_files() as opened:                                           # the verdict is remembered
        assert run()[("01", OLD)] == alone
    assert not [f for f in opened if OLD in f and f.endswith(".csv")]


@pytest.mark.parametrize("exported_at, cutoff", [
    ("2026-11-23T22:00:05Z", "2026-11-23"),
    ("2026-11-23T22:00:05.250+00:00", "2026-11-23"),
    ("20261123T220005Z", "2026-11-23"),                   # ISO 8601 basic format
    ("2026-11-24T06:00:05+08:00", "2026-11-23"),          # the same moment in Beijing: the UTC date
    ("2026-11-23T22:00:05", "2026-11-23"),                # no offset: UTC, as the folder names are
    ("yesterday", None),
    ("2026-11-23", None),                                 # a date is not a time of export
    (1764021605, None),
])
def test_exported_at_is_an_iso_8601_time_and_gives_the_utc_cutoff(tmp_path, exported_at, cutoff):
    """AEENTPT of ongoing events is the data cut-off: the UTC date of exported_at, never its text."""
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial())
    rewrite_manifest(folder, lambda m: m.update(exported_at=exported_at))
    status, reason = statuses(tmp_path)[("01", NEW)]
    if cutoff is None:
        assert status == "REJECTED" and "is not an ISO 8601 date and time" in reason
    else:
        assert status == "CURRENT" and current(tmp_path).data_cutoff == cutoff


@pytest.mark.parametrize("exported_at, accepted", [
    ("2026-11-23T22:40:00Z", True),                       # an export may take a while
    ("2026-11-23T21:00:05Z", True),
    ("2062-11-23T22:00:05Z", False),                      # a mistyped year
    ("2026-11-24T06:00:05", False),                       # Beijing time without its offset: 8 hours off
])
def test_exported_at_must_agree_with_the_folder_name(tmp_path, exported_at, accepted):
    """Both are the UTC time of the export (spec section 3). A folder named 20621123T220005 would
    otherwise stay CURRENT for decades over every later transfer of the site."""
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial())
    rewrite_manifest(folder, lambda m: m.update(exported_at=exported_at))
    status, reason = statuses(tmp_path)[("01", NEW)]
    assert status == ("CURRENT" if accepted else "REJECTED"), reason
    if not accepted:
        assert f"exported_at \"{exported_at}\" is not the export time of the folder name {NEW}" in reason
        assert "2026-11-23T22:00:05Z UTC" in reason and statuses(tmp_path)[("01", OLD)][0] == "CURRENT"


@pytest.mark.parametrize("site, accepted", [("01", True), (1, True), ("1", False), (2, False), (True, False)])
def test_manifest_site_is_the_folder_site_as_text_or_number(tmp_path, site, accepted):
    write_transfer(tmp_path, "01", NEW, one_subject_trial())
    folder = tmp_path / "site-01" / NEW
    rewrite_manifest(folder, lambda m: m.update(site=site))
    status, reason = statuses(tmp_path)[("01", NEW)]
    assert status == ("CURRENT" if accepted else "REJECTED")
    if not accepted:
        assert f"manifest site {json.dumps(site)} does not match the folder site 01" in reason


def test_a_file_name_in_another_case_is_named_in_the_reason(tmp_path):
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial())
    (folder / "dm.csv").rename(folder / "DM.csv")
    rewrite_manifest(folder, lambda m: m["files"].update({"DM.csv": m["files"].pop("dm.csv")}))
    status, reason = statuses(tmp_path)[("01", NEW)]
    assert status == "REJECTED"
    assert "dm.csv: not listed in manifest.json (it lists DM.csv: file names are case-sensitive)" in reason


@pytest.mark.parametrize("name", ["site-1", "site-001", "Site-01", "site_02", "site-01 ", "site-01 (1)",
                                  "site-01 - Copy", "site-01.bak", ".site-01", "site-01-old", "site-01\n", "site-٠١",
                                  ".site-01.partial", "site-01.zip"])
def test_a_folder_named_like_a_site_but_not_site_two_digits_is_reported(tmp_path, name):
    write_transfer(tmp_path, "01", NEW, one_subject_trial())
    (tmp_path / "site-01").rename(tmp_path / name)
    if name.endswith(".zip"):   # a site's export zipped, not unpacked
        shutil.make_archive(str(tmp_path / name), "zip", tmp_path / name)
        shutil.rmtree(tmp_path / name)
        (tmp_path / f"{name}.zip").rename(tmp_path / name)
    write_transfer(tmp_path, "03", NEW, one_subject_trial("03"))
    for other in ("notes", "website2026", "Site_Documentation_v2", "sitefiles"):   # not a site's
        (tmp_path / other).mkdir()
    assert [t.site for t in transfers.list_transfers(tmp_path)] == ["03"]
    (rejected,) = transfers.misnamed_site_folders(tmp_path)
    assert (rejected.site, rejected.name, rejected.status) == (None, name, "REJECTED")
    shown = name.replace("\n", "\\n")    # a control character is escaped in the reason
    assert rejected.reason == (f"'{shown}' at the exports root is not a folder site-<SITEID> with a two-digit SITEID; "
                               "nothing in it is read")


def test_an_unreadable_file_rejects_its_transfer_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """The operating system refuses one CSV (permissions; root would read it anyway, so the refusal
    is injected at the file system call): the transfer is REJECTED with the reason, not the run."""
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    folder = write_transfer(tmp_path, "01", NEW, one_subject_trial())
    refused = folder / "lb.csv"
    real_read_bytes, real_open = Path.read_bytes, Path.open

    def read_bytes(self):
        if self == refused:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    def open_(self, *args, **kwargs):
        if self == refused:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "open", open_)
    result = statuses(tmp_path)
    assert result[("01", OLD)] == ("CURRENT", None)
    assert result[("01", NEW)] == ("REJECTED", "lb.csv: cannot be read: Permission denied")


def test_a_misnamed_site_folder_is_a_rejected_row_of_transfers_parquet(tmp_path):
    """End to end: the run publishes the good sites and lists the misnamed folder as REJECTED."""
    exports = tmp_path / "exports"
    write_transfer(exports, "01", NEW, one_subject_trial())
    write_transfer(exports, "03", NEW, one_subject_trial("03"))
    (exports / "site-03").rename(exports / "site-3")
    assert run_cli("run", "--exports", str(exports), "--output", str(tmp_path / "out"), home=tmp_path / "home") == 0
    inventory = pq.read_table(tmp_path / "out" / "transfers.parquet").to_pandas()
    misnamed = inventory[inventory["TRANSFER"] == "site-3"]
    assert list(misnamed["STATUS"]) == ["REJECTED"] and misnamed["SITEID"].isna().all()
    assert "'site-3' at the exports root is not a folder site-<SITEID>" in misnamed["REASON"].iloc[0]
    quarantine = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pandas()
    assert "TRF-SITE-FOLDER" in set(quarantine["RULE"])
    assert list(inventory.loc[inventory["STATUS"] == "CURRENT", "SITEID"]) == ["01"]


@pytest.mark.parametrize("encoding, data, words", [
    ("utf-8", "SUBJID,AETERM\n01-001,发热\n".encode("gb18030"),
     "line 2, byte 21 (b'\\xb7\\xa2\\xc8\\xc8') invalid start byte (it reads as gb18030: the manifest must say so)"),
    ("utf-8", codecs.BOM_UTF8 + b"SUBJID\n\n01-001\xff\n",
     "line 3, byte 17 (b'\\xff\\n') invalid start byte"),   # the BOM counts: byte offsets are the file's
    ("gb18030", b"SUBJID\n\x81\x30\xff\xff\n", "line 2, byte 7"),
])
def test_an_undecodable_file_names_the_line_and_the_likely_encoding(encoding, data, words):
    transfer = transfers.Transfer(site="01", name=NEW, path=Path("."), encoding=encoding)
    assert transfers.decode(transfer, "ae.csv", data) is None
    assert words in transfer.problems[0]["MESSAGE"], transfer.problems[0]["MESSAGE"]


def test_the_iwrs_list_is_not_told_to_fix_a_manifest_it_does_not_have():
    transfer = transfers.Transfer(site=None, name="unblinded", path=Path("."), encoding="utf-8")
    assert transfers.decode(transfer, "randomization.csv", "RANDNO,TRTGRP\n1,安慰剂\n".encode("gb18030")) is None
    message = transfer.problems[0]["MESSAGE"]
    assert "(it reads as gb18030)" in message and "manifest" not in message, message


@pytest.mark.parametrize("line, near", [
    ('01-002,1981,46,M,"ASIAN" ,,2026-02-21', '"ASIAN" ,'),      # text after a closing quote
    ('01-002,1981,46,M,AS"IAN,,2026-02-21', 'AS"IAN'),           # a quote in a field that is not quoted
    ('01-002,1981,46,M, "ASIAN",,2026-02-21', ' "ASIAN"'),       # a space before the opening quote
    ('01-002,1981,46,M,"AS""IAN""" x,,2026-02-21', '""" x'),     # text after a doubled quote and the closing one
    ('01-002,1981,46,M,AS""IAN,,2026-02-21', 'AS""IAN'),         # a doubled quote in a field that is not quoted
])
def test_a_stray_quote_rejects_the_transfer_instead_of_changing_a_value(tmp_path, line, near):
    """RFC 4180 (spec section 4): Arrow's reader took `"ASIAN" ,` for `ASIAN ` and `AS"IAN` as it is."""
    data = f"SUBJID,BRTHDAT,AGE,SEX,RACE,ETHNIC,RFICDAT\n01-001,1980,45,F,ASIAN,,2026-02-20\n{line}\n".encode()
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    write_transfer(tmp_path, "01", NEW, one_subject_trial(), raw_files={"dm.csv": data})
    status, reason = statuses(tmp_path)[("01", NEW)]
    assert status == "REJECTED" and statuses(tmp_path)[("01", OLD)][0] == "CURRENT"
    assert "dm.csv: not a readable CSV file: line 3: a quote inside a field that is not quoted" in reason
    assert "(near '" in reason and near in reason.split("(near '")[1]


@pytest.mark.parametrize("ahead, accepted", [
    (timedelta(minutes=-5), True), (timedelta(minutes=50), True),   # a site clock a little fast
    (timedelta(hours=2), False), (timedelta(days=365), False),
])
def test_a_transfer_dated_ahead_of_the_clock_is_rejected(tmp_path, ahead, accepted):
    """Spec section 3: the folder is the UTC time of an export. One dated next year would
    otherwise stay CURRENT over every real transfer of the site until then."""
    name = (datetime.now(timezone.utc) + ahead).strftime("%Y%m%dT%H%M%S")
    write_transfer(tmp_path, "01", OLD, one_subject_trial())
    write_transfer(tmp_path, "01", name, one_subject_trial())
    status, reason = statuses(tmp_path)[("01", name)]
    assert status == ("CURRENT" if accepted else "REJECTED"), reason
    if not accepted:
        assert reason == (f"transfer folder {name} names an export time more than 60 minutes ahead of the clock when "
                          "it was read; expected the UTC time of an export that has happened (a folder dated ahead "
                          "would stay CURRENT, and date every ongoing AE, until then)")
        assert statuses(tmp_path)[("01", OLD)][0] == "CURRENT"
        (ahead_of_clock,) = [t for t in transfers.select_current(transfers.list_transfers(tmp_path)) if t.name == name]
        assert len(ahead_of_clock.manifest_files) == 6   # transfers.parquet FILES and ROWS come from its manifest
        _, found, waiting = complete_new_transfers(tmp_path, {})
        assert found == [f"01/{OLD}"] and waiting == [f"site-01/{name} ({reason})"]


def test_a_transfer_rejected_before_the_current_one_leaves_the_quarantine(tmp_path):
    """Site 05's broken transfers of two nights were reported as ERRORs every night after it had
    sent a good one. A rejection older than the site's current transfer is history: it stays in
    transfers.parquet; one newer than it is still news."""
    exports = tmp_path / "exports"
    broken = write_transfer(exports, "01", OLD, one_subject_trial())
    rewrite_manifest(broken, lambda m: m["files"]["ae.csv"].update(rows=7))
    write_transfer(exports, "01", NEW, one_subject_trial())
    later = write_transfer(exports, "01", "20261124T220000", one_subject_trial())
    rewrite_manifest(later, lambda m: m["files"]["lb.csv"].update(rows=9))
    shutil.copytree(later, exports / "site-01" / "2026-11-25T220005")   # a name that is no export time
    assert run_cli("run", "--exports", str(exports), "--output", str(tmp_path / "out"), home=tmp_path / "home") == 0
    inventory = pq.read_table(tmp_path / "out" / "transfers.parquet").to_pandas().set_index("TRANSFER")
    assert inventory["STATUS"].to_dict() == {OLD: "REJECTED", NEW: "CURRENT", "20261124T220000": "REJECTED",
                                             "2026-11-25T220005": "REJECTED"}
    quarantine = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pandas()
    rows = quarantine[quarantine["RULE"] == "TRF-ROWS"]
    assert list(rows["TRANSFER"]) == ["20261124T220000"] and "lb.csv" in rows["MESSAGE"].iloc[0]
    assert list(quarantine.loc[quarantine["RULE"] == "TRF-FOLDER", "TRANSFER"]) == ["2026-11-25T220005"]
