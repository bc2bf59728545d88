"""Raw ingest per the site data transfer specification (site-export-spec.md section 3 and 4).

Finds `site-XX/<YYYYMMDDTHHMMSS>/` transfers, verifies each against its manifest, chooses per
site the newest complete transfer as CURRENT (older complete ones SUPERSEDED, broken ones
REJECTED with every reason found) and reads its CSV files as text with their coordinates.

Nothing here writes, moves or locks anything under the exports root, and nothing lists or
opens the `unblinded/` folder: only `site-XX` entries of the root are ever looked at.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline import findings, metadata

# Used with fullmatch: `$` would accept a trailing line break and `\d` other scripts' digits.
SITEID = re.compile(r"[0-9]{2}")
SITE_FOLDER = re.compile(rf"site-({SITEID.pattern})")
# Used with match: a sync tool's `site-03 (1)` or `.site-03.partial`, a `site-05.bak`, `Site-03`
# or a `site-04.zip` is a site's data under a wrong name or form, listed as REJECTED rather than
# skipped; `website2026` or `Site_Documentation_v2` is not.
LIKE_SITE_FOLDER = re.compile(r"\W*site[\W_]*\d", re.IGNORECASE)
TRANSFER_FOLDER = re.compile(r"^\d{8}T\d{6}$")
ENCODINGS = {"utf-8": "utf-8", "gb18030": "gb18030"}
MANIFEST = "manifest.json"


def spec_files() -> list[str]:
    return [metadata.raw_schema(name)["file"] for name in metadata.RAW_FILES]


@dataclass
class RawFile:
    """One CSV file of a transfer, read as text: spec columns upper-cased, empty fields null."""

    name: str
    sha256: str
    rows: int
    data: pd.DataFrame
    findings: list[dict] = field(default_factory=list)


@dataclass
class Transfer:
    site: str
    name: str
    path: Path
    status: str = "PENDING"
    exported_at: str | None = None
    data_cutoff: str | None = None      # the UTC date of exported_at (AEENTPT of ongoing events)
    encoding: str | None = None
    manifest_files: dict = field(default_factory=dict)
    files: dict[str, RawFile] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        return "; ".join(p["MESSAGE"] for p in self.problems if p["SEVERITY"] == "ERROR") or None

    def problem(self, rule: str, file: str | None = None, **fields) -> None:
        self.problems.append(findings.single(rule, site=self.site, transfer=self.name, file=file, **fields))


class ExportsRootError(Exception):
    """The exports root cannot be used at all (missing, not a folder, unreadable)."""


class SiteGoneError(Exception):
    """A site of the last published set has no usable transfer now: publishing would drop it."""


def withdrawals(published: dict[str, dict], transfers: list[Transfer], withdrawn: list[str]) -> list[dict]:
    """TRF-SITE-WITHDRAWN for each site of the last published set this run was told to let go,
    so that the published set itself says why its subjects left. A site to withdraw that still
    has a current transfer is refused: the run would publish it all the same."""
    usable = {t.site: t.name for t in transfers if t.status == "CURRENT"}
    present = sorted(site for site in withdrawn if site in usable)
    if present:
        raise SiteGoneError("; ".join(f"site {site} is to be withdrawn but has a current transfer ({usable[site]})"
                                      for site in present) + ": withdraw only a site that sends no usable data")
    return [findings.single("TRF-SITE-WITHDRAWN", site=site, transfer=published_transfer(published, site),
                            value=site, detail=published_transfer(published, site))
            for site in sorted(set(withdrawn) & set(published))]


def published_transfer(published: dict[str, dict], site: str) -> str | None:
    """The transfer a site was last published from (run.json `inputs`), or None."""
    inputs = published.get(site)
    transfer = inputs.get("transfer") if isinstance(inputs, dict) else None
    return transfer if isinstance(transfer, str) else None


def unknown_withdrawals(withdrawn: list[str], published: dict[str, dict], listing: list[Transfer]) -> str | None:
    """What to say when a site to withdraw is neither in the published set nor in the exports: it
    withdraws nothing (a typo, or the flag kept after the night it was needed)."""
    known = set(published) | {t.site for t in listing}
    unknown = sorted(set(withdrawn) - known)
    if not unknown:
        return None
    return (f"--without-site {' '.join(unknown)}: no such site in the published set or the exports (sites known: "
            f"{', '.join(sorted(s for s in known if s)) or 'none'}); nothing to withdraw")


def sites_gone_back(published: dict[str, dict], transfers: list[Transfer]) -> list[dict]:
    """TRF-SITE-BACK for each site whose current transfer is older than the one last published:
    that folder was deleted, or is rejected now, or the exports root is an older copy. Records
    published last night would leave SDTM with no word; each site says so, once per night."""
    current = {t.site: t.name for t in transfers if t.status == "CURRENT"}
    by_name = {(t.site, t.name): t for t in transfers}
    out = []
    for site in sorted(published):
        last = published_transfer(published, site)
        if site not in current or last is None or current[site] >= last:
            continue
        was = by_name.get((site, last))
        why = (f"is REJECTED now ({was.reason})" if was is not None and was.status == "REJECTED"
               else f"is gone from site-{site}/" if was is None else f"is {was.status}")
        out.append(findings.single("TRF-SITE-BACK", site=site, transfer=current[site], value=site, expected=last,
                                   detail=why))
    return out


def sites_gone(published: dict[str, dict], transfers: list[Transfer], withdrawn: list[str]) -> dict[str, str]:
    """Why each site of the last published set (run.json `inputs`) would drop out of this one:
    its folder is gone, or no transfer of it can be read. A site the run was told is withdrawn
    is let go."""
    usable = {t.site for t in transfers if t.status == "CURRENT"}
    rejected = {t.site: t for t in sorted(transfers, key=lambda t: t.name) if t.site and t.status == "REJECTED"}
    out = {}
    for site in sorted(set(published) - usable - set(withdrawn)):
        last = published_transfer(published, site)
        why = (f"every transfer of it is REJECTED (newest {rejected[site].name}: {rejected[site].reason})"
               if site in rejected else "its folder site-" + site + " is gone from the exports root")
        out[site] = f"site {site} (last published from transfer {last}): {why}"
    return out


def list_transfers(root: Path) -> list[Transfer]:
    """Every transfer folder of every site, oldest first per site; nothing is read yet."""
    transfers = []
    for name in _root_entries(root):
        match = SITE_FOLDER.fullmatch(name)
        if not match or not (root / name).is_dir():
            continue
        site_dir = root / name
        try:
            entries = sorted(os.listdir(site_dir))
        except OSError as error:
            raise ExportsRootError(f"site folder {site_dir} cannot be read: {error.strerror}") from None
        for entry in entries:
            if (site_dir / entry).is_dir():
                transfers.append(Transfer(site=match.group(1), name=entry, path=site_dir / entry))
    return transfers


def _root_entries(root: Path) -> list[str]:
    try:
        if not root.exists():
            raise ExportsRootError(f"exports folder {root} does not exist")
        if not root.is_dir():
            raise ExportsRootError(f"exports path {root} is not a folder")
        if not os.access(root, os.R_OK | os.X_OK):
            raise ExportsRootError(f"exports folder {root} cannot be read: permission to list and open it is needed")
        return sorted(os.listdir(root))
    except OSError as error:
        raise ExportsRootError(f"exports folder {root} cannot be read: {error.strerror}") from None


def misnamed_site_folders(root: Path) -> list[Transfer]:
    """Entries that look like a site's (`site-3`, `site-03 (1)`, `site-04.zip`) but are not a
    folder `site-<two digits>`: REJECTED with the reason, so that a site's data never vanishes
    without a word."""
    out = []
    for name in _root_entries(root):
        if SITE_FOLDER.fullmatch(name) and (root / name).is_dir():
            continue
        if LIKE_SITE_FOLDER.match(name):
            transfer = Transfer(site=None, name=name, path=root / name, status="REJECTED")
            transfer.problem("TRF-SITE-FOLDER", value=name)
            out.append(transfer)
    return out


def has_site_folders(root: Path) -> bool:
    return any(SITE_FOLDER.fullmatch(name) and (root / name).is_dir() for name in _root_entries(root))


def check_exports_root(root: Path) -> None:
    """Refuses an exports root without any site-XX folder: a wrong path, or an empty mount point,
    would publish an empty set (a first night) or fail as if every site had vanished."""
    if not has_site_folders(root):
        raise ExportsRootError(f"exports folder {root} has no site-XX folder; expected the folder that holds "
                               "site-01/, site-02/ ... (nothing was run)")


def _valid_folder_time(name: str) -> bool:
    if not TRANSFER_FOLDER.match(name):
        return False
    try:
        folder_time(name)
    except ValueError:
        return False
    return True


FOLDER_TIME = "%Y%m%dT%H%M%S"


def folder_time(name: str) -> datetime:
    """The UTC time of export a transfer folder is named after (spec section 3)."""
    return datetime.strptime(name, FOLDER_TIME).replace(tzinfo=timezone.utc)


def folder_times(names: pd.Series) -> pd.Series:
    """`folder_time` of a column of folder names (UTC, naive); NaT for a name that is no time."""
    return pd.to_datetime(names, format=FOLDER_TIME, errors="coerce")


EXPORT_TIME_TOLERANCE = timedelta(hours=1)   # between the folder name and exported_at (an export takes time)
TOLERANCE_TEXT = f"{int(EXPORT_TIME_TOLERANCE.total_seconds()) // 60} minutes"


# A transfer's files are read as themselves: a symbolic link could lead anywhere, unblinded/
# included, so it is refused without being followed (its target is neither opened nor named).
NOT_FOLLOWED = "a symbolic link, not a file of the transfer; links are never followed"


def read_manifest(transfer: Transfer) -> bool:
    """Reads and checks manifest.json; records problems; True when the files can be checked."""
    if not _valid_folder_time(transfer.name):
        transfer.problem("TRF-FOLDER", detail=transfer.name)
        return False
    path = transfer.path / MANIFEST
    if path.is_symlink():
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=f"manifest.json is {NOT_FOLLOWED}")
        return False
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail="manifest.json is missing")
        return False
    except OSError as error:
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=f"manifest.json cannot be read ({error.strerror})")
        return False
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=f"not readable JSON ({error})")
        return False
    if not isinstance(manifest, dict):
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail="expected a JSON object")
        return False
    missing = [k for k in ("site", "exported_at", "encoding", "files") if k not in manifest]
    if missing:
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=f"missing key(s) {', '.join(missing)}")
        return False
    site = manifest["site"]
    if not (site == transfer.site or (type(site) is int and f"{site:02d}" == transfer.site)):
        transfer.problem("TRF-SITE", file=MANIFEST, value=json.dumps(site, ensure_ascii=False), expected=transfer.site)
    exported = export_time(manifest["exported_at"])
    if exported is None:
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=(
            f"exported_at {json.dumps(manifest['exported_at'], ensure_ascii=False)} is not an ISO 8601 date "
            "and time; expected the UTC time of export, e.g. 2026-11-23T22:00:05Z"))
    elif abs(exported - folder_time(transfer.name)) > EXPORT_TIME_TOLERANCE:
        # A mistyped folder (20621128T...) would stay CURRENT for years; a mistyped exported_at
        # would date every ongoing AE. They name the same export, so they must agree.
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=(
            f"exported_at {json.dumps(manifest['exported_at'], ensure_ascii=False)} is not the export time of the "
            f"folder name {transfer.name} ({folder_time(transfer.name):%Y-%m-%dT%H:%M:%SZ} UTC); both name the "
            f"time of the export and must agree within {TOLERANCE_TEXT}"))
    else:
        transfer.exported_at, transfer.data_cutoff = manifest["exported_at"], exported.date().isoformat()
    encoding = str(manifest["encoding"]).lower()
    if encoding not in ENCODINGS:
        transfer.problem("TRF-ENCODING", file=MANIFEST, value=manifest["encoding"])
    else:
        transfer.encoding = ENCODINGS[encoding]
    files = manifest["files"]
    if not isinstance(files, dict):
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail="files is not an object")
        return False
    outside = [name for name in files if not _plain_file_name(name)]
    if outside:   # a path could reach another site's folder, or unblinded/: never opened
        transfer.problem("TRF-MANIFEST", file=MANIFEST, detail=(
            f"file name(s) {', '.join(json.dumps(n, ensure_ascii=False) for n in outside)} are not plain names "
            "of files in the transfer folder"))
        return False
    linked = sorted(name for name in files if (transfer.path / name).is_symlink())
    for name in linked:
        transfer.problem("TRF-UNREADABLE", file=name, detail=NOT_FOLLOWED)
    if linked:
        return False
    for name, entry in files.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("rows"), int) and not isinstance(entry.get("rows"), bool)
              and entry["rows"] >= 0 and isinstance(entry.get("sha256"), str))
        if not ok:
            transfer.problem("TRF-MANIFEST", file=MANIFEST,
                             detail=f"entry for {name} needs a whole number 'rows' and a text 'sha256'")
    transfer.manifest_files = {n: e for n, e in files.items() if isinstance(e, dict)}
    for name in spec_files():
        if name not in files:
            other_case = [n for n in files if n.lower() == name.lower()]
            hint = f" (it lists {other_case[0]}: file names are case-sensitive)" if other_case else ""
            transfer.problem("TRF-MISSING-FILE", file=name, detail=f"not listed in manifest.json{hint}")
    for name in files:
        if not (transfer.path / name).is_file():
            transfer.problem("TRF-MISSING-FILE", file=name, detail="listed in manifest.json but absent")
    if folder_time(transfer.name) > datetime.now(timezone.utc) + EXPORT_TIME_TOLERANCE:
        transfer.problem("TRF-FUTURE", value=transfer.name, expected=TOLERANCE_TEXT)
    return not any(p["SEVERITY"] == "ERROR" for p in transfer.problems)


def export_time(text) -> datetime | None:
    """exported_at as an aware UTC time, or None when it is not an ISO 8601 date and time. Without
    an offset it is read as UTC: the spec's transfer folders are the UTC time of export."""
    if not isinstance(text, str) or len(text) <= 10:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class KnownTransfers:
    """What earlier runs learnt about the transfers, kept in the output folder's state: the sha256
    of each file by path and identity (size, modification and change times, inode), and the
    verdict of each older transfer's full read. Every run checks every older transfer against its
    manifest, but a file is hashed again only when it changed on disk, and a transfer is read
    again only when its manifest, its folder listing or the code changed: without this, a run's
    cost would grow with the history of nightly transfers (a year of them at 10,000 subjects is
    24 GB to hash, 40 s or more). The transfer that becomes CURRENT is always read whole."""

    def __init__(self, path: Path | None = None):
        self.path = path
        known = {}
        if path is not None:
            try:
                known = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                known = {}
        known = known if isinstance(known, dict) else {}
        self.known_files: dict[str, list] = known.get("files", {}) if isinstance(known.get("files"), dict) else {}
        self.known_verdicts: dict[str, list] = (known.get("verdicts", {})
                                                if isinstance(known.get("verdicts"), dict) else {})
        self.seen_files: dict[str, list] = {}
        self.seen_verdicts: dict[str, list] = {}

    @staticmethod
    def _identity(stat: os.stat_result) -> list[int]:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    def sha256(self, file: Path, data: bytes | None = None) -> str:
        """The file's sha256 (of `data` when the caller has just read it)."""
        key = str(file.absolute())
        before = self._identity(file.stat())
        entry = self.known_files.get(key)
        if data is None and isinstance(entry, list) and entry[:-1] == before:
            actual = entry[-1]
        else:
            actual = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(file)
        if self._identity(file.stat()) == before:   # not changed while it was read
            self.seen_files[key] = [*before, actual]
        return actual

    @staticmethod
    def _verdict_key(transfer: Transfer) -> str:
        """Once its files match their manifest's checksums, a transfer's content is its manifest and
        folder listing: the verdict of a full read holds while they, and the code, stay the same."""
        digest = hashlib.sha256(f"{metadata.code_version()}|{transfer.path.absolute()}|".encode())
        digest.update((transfer.path / MANIFEST).read_bytes())
        digest.update("|".join(sorted(os.listdir(transfer.path))).encode())
        return digest.hexdigest()

    def rejections(self, transfer: Transfer) -> list[dict]:
        """The reasons a full read rejects an older transfer (none: SUPERSEDED), read once."""
        key = self._verdict_key(transfer)
        problems = self.known_verdicts.get(key)
        if not isinstance(problems, list):
            judged = Transfer(site=transfer.site, name=transfer.name, path=transfer.path)
            load(judged, self)
            problems = [p for p in judged.problems if p["SEVERITY"] == "ERROR"]
        self.seen_verdicts[key] = problems
        return problems

    def save(self) -> None:
        """Keeps what this run saw (a removed transfer drops out); atomic replace."""
        if self.path is None:
            return
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"files": self.seen_files, "verdicts": self.seen_verdicts}, sort_keys=True),
                             encoding="utf-8")
        os.replace(temporary, self.path)


def verify_checksums(transfer: Transfer, known: KnownTransfers | None = None) -> bool:
    """Manifest and sha256 only: enough to call an older transfer complete (SUPERSEDED)."""
    if not read_manifest(transfer):
        return False
    known = known or KnownTransfers()
    for name, entry in transfer.manifest_files.items():
        try:
            actual = known.sha256(transfer.path / name)
        except OSError as error:
            transfer.problem("TRF-UNREADABLE", file=name, detail=error.strerror)
            continue
        if actual != str(entry.get("sha256", "")).lower():
            transfer.problem("TRF-SHA256", file=name, value=actual, expected=entry.get("sha256"))
    return not transfer.problems


def load(transfer: Transfer, known: KnownTransfers | None = None) -> bool:
    """Full verification and read of a transfer that is to become CURRENT."""
    if not read_manifest(transfer):
        return False
    known = known or KnownTransfers()
    spec = {metadata.raw_schema(n)["file"]: n for n in metadata.RAW_FILES}
    for name, entry in transfer.manifest_files.items():
        try:
            data = (transfer.path / name).read_bytes()
            actual = known.sha256(transfer.path / name, data)
        except OSError as error:
            transfer.problem("TRF-UNREADABLE", file=name, detail=error.strerror)
            continue
        if actual != str(entry.get("sha256", "")).lower():
            transfer.problem("TRF-SHA256", file=name, value=actual, expected=entry.get("sha256"))
            continue
        if name not in spec:
            transfer.problem("TRF-EXTRA-FILE", file=name)
            continue
        raw = read_csv_file(transfer, name, data, metadata.raw_schema(spec[name]), sha256=actual)
        if raw is None:
            continue
        if raw.rows != entry["rows"]:
            transfer.problem("TRF-ROWS", file=name, value=raw.rows, expected=entry["rows"])
            continue
        transfer.files[name] = raw
    for extra in sorted(set(os.listdir(transfer.path)) - set(transfer.manifest_files) - {MANIFEST}):
        transfer.problem("TRF-EXTRA-FILE", file=extra)
    return not any(p["SEVERITY"] == "ERROR" for p in transfer.problems)


NEWLINE = b"\n"


def _is_gb18030(data: bytes) -> bool:
    try:
        data.decode("gb18030")
    except UnicodeDecodeError:
        return False
    return True


# A Chinese ideograph. UTF-8 Chinese text read as gb18030 decodes without error (into other
# Chinese characters), so a wrong gb18030 declaration is found by what the bytes are instead.
IDEOGRAPH = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def utf8_evidence(data: bytes) -> str | None:
    """Why bytes declared gb18030 are UTF-8: a UTF-8 byte-order mark (never the start of a CSV
    header in gb18030), or a whole file that is valid UTF-8 with Chinese in it. gb18030 Chinese
    text passes as UTF-8 only by accident (two-byte sequences decode to Greek, Hebrew ...
    letters; a valid three-byte ideograph in every place is next to impossible)."""
    if data.startswith(codecs.BOM_UTF8):
        return "it starts with a UTF-8 byte-order mark"
    if data.isascii():   # the same text in both encodings: nothing to tell apart, nothing to decode
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    found = IDEOGRAPH.search(text)
    if found is None:
        return None
    line = text.count("\n", 0, found.start()) + 1
    return f"line {line} reads as UTF-8 Chinese ({text[found.start():found.start() + 6]!r})"


def decode(transfer: Transfer, name: str, data: bytes) -> bytes | None:
    """UTF-8 bytes (BOM removed) of a file in the transfer's declared encoding, or None."""
    encoding = transfer.encoding
    try:
        if encoding == "utf-8":
            body = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
            body.decode("utf-8")
            return body
        evidence = utf8_evidence(data)
        if evidence:
            transfer.problem("TRF-DECODE", file=name, expected=encoding, detail=(
                f"the file is UTF-8: {evidence}; read as {encoding} its text would change (the manifest must say utf-8)"))
            return None
        text = data.decode(encoding)
        return text.lstrip("\ufeff").encode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start + (len(data) - len(body) if encoding == "utf-8" else 0)
        hint = ""
        if encoding == "utf-8" and _is_gb18030(data):   # a site transfer may declare gb18030; the IWRS list may not
            hint = " (it reads as gb18030: the manifest must say so)" if transfer.site else " (it reads as gb18030)"
        line = data[:offset].count(NEWLINE) + 1
        transfer.problem("TRF-DECODE", file=name, expected=encoding, detail=(
            f"line {line}, byte {offset} ({data[offset:offset + 4]!r}) {error.reason}{hint}"))
        return None


def read_csv_file(transfer: Transfer, name: str, data: bytes, schema: dict, sha256: str | None = None) -> RawFile | None:
    """Parses one file; None (with the transfer problem recorded) when it cannot be used.
    `sha256`: the file's hash when the caller has just verified it (hashing 60 MB twice costs 0.1 s)."""
    body = decode(transfer, name, data)
    if body is None:
        return None
    try:
        header, columns, ragged = _parse(body)
    except (csv.Error, ValueError) as error:
        transfer.problem("TRF-CSV", file=name, detail=str(error))
        return None
    if header is None:
        transfer.problem("TRF-CSV", file=name, detail="the file is empty; expected at least the header row")
        return None
    names = [h.strip().upper() for h in header]
    expected = schema["columns"]
    # A spec column twice is ambiguous (which one holds the data?); unknown ones are ignored anyway,
    # so repeats among them (the empty names of trailing commas from a spreadsheet) are only reported.
    duplicated = sorted({n for n in names if n in expected and names.count(n) > 1})
    if duplicated:
        transfer.problem("TRF-COLUMNS", file=name,
                         detail=f"column(s) {', '.join(map(_shown, duplicated))} appear more than once")
        return None
    missing = [c for c, spec in expected.items() if spec.get("required") and c not in names]
    if missing:
        transfer.problem("TRF-COLUMNS", file=name,
                         detail=f"required column(s) {', '.join(missing)} missing; header is {', '.join(map(_shown, header))}")
        return None
    raw = RawFile(name=name, sha256=sha256 or hashlib.sha256(data).hexdigest(), rows=len(columns[0]) if columns else 0,
                  data=pd.DataFrame())
    for extra in dict.fromkeys(n for n in names if n not in expected):
        times = names.count(extra)
        raw.findings.append(findings.single("RAW-EXTRA-COLUMN", site=transfer.site, transfer=transfer.name,
                                            file=name, column=_shown(extra),
                                            detail=f" ({times} columns of that name)" if times > 1 else None))
    count = raw.rows
    frame = {c: columns[names.index(c)] if c in names else pa.nulls(count, pa.string()) for c in expected}
    out = pa.table(frame).to_pandas()
    same = np.zeros(count, dtype=np.int8)   # one value per file: categorical codes, not a list of strings
    coordinates = pd.DataFrame({
        "src_site": pd.Categorical.from_codes(same, categories=[transfer.site]) if transfer.site else
        pd.Categorical([None] * count, categories=["_"]),
        "src_transfer": pd.Categorical.from_codes(same, categories=[transfer.name]),
        "src_file": pd.Categorical.from_codes(same, categories=[name]),
        "src_row": pd.Series(range(1, count + 1), dtype="int64"),
        "src_ragged": pd.Series(False, index=range(count)),
    })
    out = pd.concat([coordinates, out], axis=1)
    empty_lines = _empty_lines(body, count + 1)
    if empty_lines:
        raw.findings.append(findings.single("RAW-EMPTY-LINE", site=transfer.site, transfer=transfer.name, file=name,
                                            value=len(empty_lines), detail=", ".join(map(str, empty_lines[:10]))
                                            + (" ..." if len(empty_lines) > 10 else "")))
    for row, fields in ragged:
        out.loc[row - 1, "src_ragged"] = True
        raw.findings.append(findings.single("RAW-FIELD-COUNT", site=transfer.site, transfer=transfer.name, file=name,
                                            row=row, value=fields, expected=len(header)))
    raw.data = out
    return raw


CODED_COORDINATES = ("src_site", "src_transfer", "src_file")


def stack_transfers(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """One raw file across the current transfers. Its coordinates stay categorical: pandas turns
    categoricals with different categories into text, a string per row of a million-row file."""
    stacked = pd.concat([part.drop(columns=list(CODED_COORDINATES)) for part in parts], ignore_index=True)
    for position, column in enumerate(CODED_COORDINATES):
        stacked.insert(position, column, union_categoricals([part[column].array for part in parts], sort_categories=True))
    return stacked


def _shown(text: str) -> str:
    """Header text for a one-line message: control characters (line breaks, NUL) escaped, and a
    blank name said, not printed as nothing."""
    return findings.printable(text) if text.strip() else "(empty name)"


_READ = pacsv.ReadOptions(autogenerate_column_names=True, block_size=1 << 24)
_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def _parse(body: bytes) -> tuple[list[str] | None, list[pa.Array], list[tuple[int, int]]]:
    """Header, one text array per header column, and the ragged records (row, field count).

    The fast path is Arrow's CSV reader; a file it refuses (records with the wrong number of
    fields) is read again with Python's csv module, which keeps every record and its number.
    """
    if not body.strip(b"\r\n"):
        return None, [], []
    _refuse_stray_quote(body)
    width = _header_width(body)
    convert = pacsv.ConvertOptions(
        column_types={f"f{i}": pa.string() for i in range(width)},
        null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True,
    )
    try:
        table = pacsv.read_csv(io.BytesIO(body), read_options=_READ, parse_options=_PARSE, convert_options=convert)
    except pa.ArrowInvalid:
        return _parse_python(body)
    if table.num_columns != width:
        return _parse_python(body)
    header = [str(v) if v is not None else "" for v in table.slice(0, 1).to_pylist()[0].values()]
    columns = [table.column(i).slice(1).combine_chunks() for i in range(width)]
    return header, columns, []


# In RFC 4180 every quote toggles between inside and outside a quoted field (a doubled quote
# toggles twice), so the count of quotes so far tells which each one does. One that opens must
# start a field (after a comma, a line break or the start) or follow the quote it doubles; one
# that closes must end it (before a comma, a line break or the end) or precede its double.
# Anything else (`"Sore" throat`, `"" throat`, `ab"cd`) is refused: Arrow's reader keeps
# `"Sore" throat` as `Sore throat`, Python's csv module keeps `ab"cd` as it is.
_FIELD_EDGES = np.frombuffer(b',\r\n"', dtype=np.uint8)   # what may stand before an opening or after a closing quote


def _refuse_stray_quote(body: bytes) -> None:
    if b'"' not in body:
        return
    data = np.frombuffer(body, dtype=np.uint8)
    quotes = np.flatnonzero(data == ord('"'))
    opening = np.arange(quotes.size) % 2 == 0
    before = np.where(quotes > 0, data[np.maximum(quotes - 1, 0)], ord(","))
    after = np.where(quotes < data.size - 1, data[np.minimum(quotes + 1, data.size - 1)], ord(","))
    stray = quotes[np.where(opening, ~np.isin(before, _FIELD_EDGES), ~np.isin(after, _FIELD_EDGES))]
    if not stray.size and quotes.size % 2:
        line = body.count(b"\n", 0, int(quotes[-1])) + 1
        raise csv.Error(f"line {line}: a quoted field starts here and is never closed; expected its closing quote "
                        "(RFC 4180)")
    if stray.size:
        at = int(stray[0])
        line_start, line_end = body.rfind(b"\n", 0, at) + 1, body.find(b"\n", at)
        near = body[max(line_start, at - 15): min(line_end if line_end >= 0 else len(body), at + 15)]
        line = body.count(b"\n", 0, at) + 1
        raise csv.Error(f"line {line}: a quote inside a field that is not quoted, or text "
                        f"after a closing quote (near '{findings.printable(near.decode('utf-8', errors='replace'))}'); "
                        "expected a field that holds a quote to be quoted as a whole, with the quote doubled (RFC 4180)")


def _empty_lines(body: bytes, records: int) -> list[int]:
    """Lines (1-based) left empty before the header or between records, outside quoted fields
    (trailing ones change no numbering). The readers skip them,
    so from there on ROW (the data record's number) is not the line number minus one that the
    site sees. A file with one line break per record has none: all the common case costs is
    counting its line breaks (CR-only files are not looked at)."""
    data = body.rstrip(b"\r\n").lstrip(b"\r\n")
    leading = body[: len(body) - len(body.lstrip(b"\r\n"))].count(b"\n")   # before the header
    if data.count(b"\n") < records:
        return list(range(1, leading + 1))
    bytes_ = np.frombuffer(data, dtype=np.uint8)
    breaks = np.flatnonzero(bytes_ == ord("\n"))
    gap = np.diff(breaks)
    ends = breaks[1:][(gap == 1) | ((gap == 2) & (bytes_[breaks[:-1] + 1] == ord("\r")))]
    quotes = np.flatnonzero(bytes_ == ord('"'))
    outside = np.searchsorted(quotes, ends) % 2 == 0
    return list(range(1, leading + 1)) + (np.searchsorted(breaks, ends[outside]) + 1 + leading).tolist()


def _header_width(body: bytes) -> int:
    first = next(csv.reader(io.StringIO(body[: 1 << 16].decode("utf-8", errors="replace"), newline="")), [])
    return max(len(first), 1)


def _parse_python(body: bytes) -> tuple[list[str] | None, list[pa.Array], list[tuple[int, int]]]:
    # Free text has no length limit in the spec and Arrow reads any length; the csv module stops
    # at 131072 characters per field, which rejected a whole transfer only when it also had a
    # ragged row. No field is longer than the file, so that bound is enough (only ever raised).
    if csv.field_size_limit() < len(body):
        csv.field_size_limit(len(body))
    reader = csv.reader(io.StringIO(body.decode("utf-8"), newline=""), strict=True)
    records, line = [], 1
    try:
        for record in reader:
            if record:
                records.append(record)
            line = reader.line_num + 1
    except csv.Error as error:   # the csv module only knows where it stopped, not where it began
        raise csv.Error(f"{error} in the record that starts on line {line}") from error
    if not records:
        return None, [], []
    header, data = records[0], records[1:]
    width = len(header)
    ragged = [(i + 1, len(r)) for i, r in enumerate(data) if len(r) != width]
    padded = [(r + [""] * width)[:width] if len(r) != width else r for r in data]
    columns = [pa.array([r[i] or None for r in padded], type=pa.string()) for i in range(width)]
    return header, columns, ragged


def select_current(transfers: list[Transfer], known: KnownTransfers | None = None) -> list[Transfer]:
    """Status of every transfer; per site the newest complete one is fully read and CURRENT."""
    known = known or KnownTransfers()
    by_site: dict[str, list[Transfer]] = {}
    for transfer in transfers:
        by_site.setdefault(transfer.site, []).append(transfer)
    for site_transfers in by_site.values():
        current_found = False
        for transfer in sorted(site_transfers, key=lambda t: t.name, reverse=True):
            if not current_found:
                if load(transfer, known):
                    transfer.status = "CURRENT"
                    current_found = True
                else:
                    transfer.status = "REJECTED"
                    transfer.files.clear()
            elif not verify_checksums(transfer, known):
                transfer.status = "REJECTED"
            else:   # rows and columns too, as for a newest transfer: a rejection stays one
                transfer.problems += known.rejections(transfer)
                transfer.status = "REJECTED" if transfer.reason else "SUPERSEDED"
    return transfers


class RandomizationFileError(Exception):
    """unblinded/randomization.csv is missing or unreadable (unblinded zone only)."""


RANDOMIZATION_PATH = ("unblinded", "randomization.csv")


def read_randomization(root: Path) -> tuple[pd.DataFrame, list[dict]]:
    """The IWRS list as text with coordinates (file randomization.csv, transfer `unblinded`).

    Called only by the unblinded zone's definitions; the blinded ones have no code path here.
    """
    path = root.joinpath(*RANDOMIZATION_PATH)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RandomizationFileError(f"{path} cannot be read: {error.strerror}") from None
    source = Transfer(site=None, name="unblinded", path=path.parent, encoding="utf-8")
    raw = read_csv_file(source, path.name, data, metadata.raw_schema("randomization"))
    if raw is None:
        raise RandomizationFileError("; ".join(p["MESSAGE"] for p in source.problems))
    raw.data.attrs["sha256"] = raw.sha256   # it decides ARM, EXTRT and EXDOSE: run.json records it
    return raw.data, raw.findings
