"""Writes one complete output set into staging, checks that every raw row is accounted for,
and publishes it with one atomic swap (see output_folder.py)."""

from __future__ import annotations

import hashlib
import html
import json
from datetime import datetime

import pandas as pd
import pyarrow as pa

from pipeline import findings, metadata
from pipeline.derivations.distinct_values import as_text, on_distinct_rows
from pipeline.output_folder import OutputFolder
from pipeline.sdtm_datasets import sdtm_table, to_table, writes_in_background
from pipeline.transfers import RANDOMIZATION_PATH, folder_times

QUARANTINE_LABELS = {
    "SITEID": "Study Site Identifier", "TRANSFER": "Transfer Folder", "FILE": "Raw File",
    "ROW": "Data Row in Raw File (1-based)", "SUBJID": "Subject Identifier for the Study", "RULE": "Rule Identifier",
    "SEVERITY": "ERROR held back, WARNING mapped", "MESSAGE": "What, where, value and what was expected",
}
TRANSFER_LABELS = {
    "SITEID": "Study Site Identifier", "TRANSFER": "Transfer Folder", "STATUS": "CURRENT, SUPERSEDED or REJECTED",
    "REASON": "Why the Transfer Was Rejected", "EXPORTED_AT": "Export Time (manifest)", "FILES": "Number of Files",
    "ROWS": "Number of Data Rows",
}
ELIGIBILITY_LABELS = {
    "USUBJID": "Unique Subject Identifier", "SITEID": "Study Site Identifier", "RULE": "Rule Identifier",
    "CRITERION": "Eligibility Criterion (registry)", "OBSERVED": "Observed Value", "TRANSFER": "Transfer Folder",
    "FILE": "Raw File",
    "ROW": "Data Row in Raw File (1-based)",
}
LINEAGE_LABELS = {
    "USUBJID": "Unique Subject Identifier", "SEQ": "Sequence Number of the Record", "QNAM": "Qualifier Variable Name",
    "SITEID": "Study Site Identifier", "TRANSFER": "Transfer Folder", "FILE": "Raw File",
    "ROW": "Data Row in Raw File (1-based)", "SHA256": "sha256 of the Raw File",
}


class AccountingError(RuntimeError):
    """Row accounting does not close: a raw row would be lost. A pipeline bug; nothing is published."""


class MixedInputsError(RuntimeError):
    """The datasets to publish come from other transfers than the current ones (a partial
    re-materialization in the UI): publishing them would mix two nights in one set."""


BEHIND = pd.Timedelta(hours=24)   # nightly exports: a day older than the newest site's is a missed night


def sites_behind(inventory: pd.DataFrame) -> list[dict]:
    """Sites whose current data is a night or more older than the newest site's, or that sent a
    newer transfer that was rejected: the sites a data manager chases in the morning. Times are
    the transfer folders' (the export time, UTC, by the spec)."""
    sites = inventory[inventory["SITEID"].notna() & inventory["SITEID"].ne("None")].assign(
        WHEN=lambda f: folder_times(f["TRANSFER"]))
    current = sites[sites["STATUS"] == "CURRENT"].set_index("SITEID")
    if current.empty:
        return []
    newest = current["WHEN"].max()
    out = []
    for site, row in current.sort_index().iterrows():
        later = (sites["WHEN"] > row["WHEN"]) | sites["WHEN"].isna()   # a name that is no time cannot be placed
        rejected = sites[(sites["SITEID"] == site) & (sites["STATUS"] == "REJECTED") & later]
        hours = (newest - row["WHEN"]) / pd.Timedelta(hours=1)
        if hours >= BEHIND / pd.Timedelta(hours=1) or len(rejected):
            out.append({"site": site, "current": row["TRANSFER"], "hours_behind_newest": round(float(hours), 1),
                        "newer_rejected": sorted(rejected["TRANSFER"])})
    return out


def check_one_input_set(sdtm: dict[str, pd.DataFrame], quarantine: pd.DataFrame, inventory: pd.DataFrame) -> None:
    """Every record and finding to publish comes from a CURRENT transfer of the inventory."""
    current = inventory.loc[inventory["STATUS"] == "CURRENT", ["SITEID", "TRANSFER"]]
    allowed = set(zip(current["SITEID"], current["TRANSFER"]))
    sources = {(f"sdtm/{name}", s, t) for name, frame in sdtm.items()
               for s, t in frame[["src_site", "src_transfer"]].drop_duplicates().astype("str").itertuples(index=False)}
    rows = quarantine[quarantine["ROW"].notna() & quarantine["SITEID"].notna()]
    sources |= {("quarantine", s, t) for s, t in rows[["SITEID", "TRANSFER"]].drop_duplicates().itertuples(index=False)
                if t != "unblinded"}
    stale = sorted(f"{what} from site {s} transfer {t}" for what, s, t in sources if (s, t) not in allowed)
    if stale:
        raise MixedInputsError(
            "the outputs would mix transfers: " + "; ".join(stale[:5]) + f" (current: {sorted(allowed)}); "
            "materialize the whole job (mesae run, or mesae_nightly in the UI) instead of reports/* alone")


INPUT_SET_ATTR = "input_set"   # key of the digest of the raw files a stored value was built from
RANDOMIZATION_ATTR = "randomization_sha256"   # the IWRS list an unblinded value was built from


def input_set_of(inventory: pd.DataFrame) -> str:
    """Digest of the CURRENT transfers' files (site, transfer, sha256 of each file): what the raw
    step read. A same-name re-send with other bytes is another input set."""
    current = inventory[inventory["STATUS"] == "CURRENT"].sort_values(["SITEID", "TRANSFER"])
    text = "\n".join(f"{s}/{t}/{sha}" for s, t, sha in zip(current["SITEID"], current["TRANSFER"],
                                                           current["file_sha256"]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def one_input_set(frames: dict[str, pd.DataFrame], attr: str = INPUT_SET_ATTR) -> str:
    """The input set the given stored values were all built from. Steps stamp what they store with
    it, so that a partial re-materialization (raw/* after a same-name re-send, then reports/*)
    cannot publish datasets of the old files beside the new files' checksums. In the unblinded
    zone the IWRS list is stamped and checked the same way (`RANDOMIZATION_ATTR`)."""
    stamps = {name: frame.attrs.get(attr) for name, frame in frames.items()}
    if len(set(stamps.values())) > 1:
        groups: dict[str, list[str]] = {}
        for name, stamp in sorted(stamps.items()):
            groups.setdefault(str(stamp), []).append(name)
        raise MixedInputsError(
            "the outputs would mix values built from different "
            + ("IWRS lists: " if attr == RANDOMIZATION_ATTR else "transfer files: ")
            + "; ".join(f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} from {stamp}"
                        for stamp, names in groups.items())
            + "; materialize the whole job (mesae run, or mesae_nightly in the UI) instead of part of it")
    return next(iter(stamps.values()), None)


def check_one_code_version(frames: dict[str, pd.DataFrame], version: str) -> None:
    """Every value to publish was built by this code: after a code change, a run of reports/* alone
    would otherwise publish the old derivations under the new code version."""
    stamp = metadata.CODE_VERSION_ATTR
    other = sorted(f"{name} ({frame.attrs.get(stamp, 'unknown')})" for name, frame in frames.items()
                   if frame.attrs.get(stamp) != version)
    if other:
        raise MixedInputsError(
            f"the outputs would mix code versions: {', '.join(other[:5])} built by another version than this "
            f"run's {version}; materialize the whole job (mesae run, or mesae_nightly in the UI) instead of "
            "reports/* alone")


def _variables(labels: dict[str, str], types: dict[str, str] | None = None) -> list[dict]:
    types = types or {}
    return [{"name": n, "label": l, "type": "Char", "arrow": types.get(n, "string")} for n, l in labels.items()]


def _labelled(frame: pd.DataFrame, labels: dict[str, str], label: str, types: dict[str, str]) -> pa.Table:
    return to_table(frame, _variables(labels, types), {"label": label, "studyid": metadata.study()["studyid"]})


def lineage_frame(dataset: str, frame: pd.DataFrame, sha: dict[tuple, str]) -> pd.DataFrame:
    """Keys of each SDTM record and the raw row it came from, with that file's sha256."""
    seq = next((c for c in frame.columns if c.endswith("SEQ") and not c.startswith("src_")), None)
    out = pd.DataFrame({"USUBJID": frame["USUBJID"]})
    if dataset.startswith("supp"):
        out["SEQ"] = pd.to_numeric(frame["IDVARVAL"], errors="coerce").astype("Int64")
        out["QNAM"] = frame["QNAM"]
    else:
        out["SEQ"] = frame[seq] if seq else pd.Series(pd.NA, index=frame.index, dtype="Int64")
    out["SITEID"] = as_text(frame["src_site"])
    out["TRANSFER"] = as_text(frame["src_transfer"])
    out["FILE"] = as_text(frame["src_file"])
    out["ROW"] = frame["src_row"].astype("int64")
    out["SHA256"] = _file_sha256(out["SITEID"], out["TRANSFER"], out["FILE"], sha=sha)
    return out


@on_distinct_rows
def _file_sha256(site: pd.Series, transfer: pd.Series, file: pd.Series, sha: dict[tuple, str]) -> pd.Series:
    return pd.Series([sha.get(key) for key in zip(site, transfer, file)], dtype="str")


def accounting(sdtm: dict[str, pd.DataFrame], quarantine: pd.DataFrame, inventory: pd.DataFrame,
               randomization: tuple[int, int] | None) -> tuple[dict, dict]:
    """rows per file (read, mapped, held_back, not_mapped) and not-mapped reasons; raises
    AccountingError when read != mapped + held_back + not_mapped or SDTM disagrees."""
    current = inventory[inventory["STATUS"] == "CURRENT"]
    read: dict[str, int] = {}
    for counts in current["file_rows"]:
        for file, n in json.loads(counts).items():
            read[file] = read.get(file, 0) + n
    errors = quarantine[(quarantine["SEVERITY"] == "ERROR") & quarantine["ROW"].notna()]
    held = errors.drop_duplicates(["SITEID", "TRANSFER", "FILE", "ROW"]).groupby("FILE").size().to_dict()
    reasons: dict[str, dict[str, int]] = {}
    expected_mapped: dict[str, int] = {}
    for dataset, frame in sdtm.items():
        source = frame.attrs.get("source_file")
        if dataset.startswith("supp") or source is None:
            continue
        for reason, n in frame.attrs.get("not_mapped", {}).items():
            reasons.setdefault(source, {})[reason] = reasons.get(source, {}).get(reason, 0) + n
        expected_mapped[source] = len(frame)
        for joined in metadata.mapping(dataset).get("join", []):
            expected_mapped[metadata.raw_schema(joined)["file"]] = len(frame)
    if randomization is not None:
        read["randomization.csv"], expected_mapped["randomization.csv"] = randomization
    rows = {}
    for file in sorted(set(read) | set(expected_mapped)):
        not_mapped = sum(reasons.get(file, {}).values())
        entry = {"read": read.get(file, 0), "held_back": int(held.get(file, 0)), "not_mapped": not_mapped}
        entry["mapped"] = entry["read"] - entry["held_back"] - not_mapped
        if file in expected_mapped and entry["mapped"] != expected_mapped[file]:
            raise AccountingError(
                f"row accounting does not close for {file}: read {entry['read']} - held back {entry['held_back']} - "
                f"not mapped {not_mapped} = {entry['mapped']}, but SDTM has {expected_mapped[file]} records from it")
        rows[file] = {k: entry[k] for k in ("read", "mapped", "held_back", "not_mapped")}
    return rows, reasons


def traceability_html(matrix: pd.DataFrame, records: dict[str, int], summary: dict, run_id: str) -> str:
    """A page an auditor opens without code: each variable, its sources and algorithm. The run is
    named, not linked: the page is opened from disk, where a link to the UI's /runs/ has no host."""
    def table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape('' if pd.isna(v) else str(v))}</td>" for v in row) + "</tr>"
                       for row in frame.itertuples(index=False))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    counts = pd.DataFrame([{"dataset": k.upper(), "records": v} for k, v in records.items()])
    rows = pd.DataFrame([{"file": f, **v} for f, v in summary["rows"].items()])
    sections = [f"<h2 id='{html.escape(d)}'>{html.escape(d)}</h2>" + table(g.drop(columns="DATASET"))
                for d, g in matrix.groupby("DATASET", sort=False)]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>MESAE SDTM traceability</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#eee}</style>"
            "</head><body><h1>MESAE SDTM traceability</h1>"
            f"<p>Zone: <b>{html.escape(summary['zone'])}</b>. Code version {html.escape(summary['code_version'])}. "
            f"Dagster run <code>{html.escape(run_id)}</code> (Runs in the Dagster UI, or its address + "
            f"<code>/runs/{html.escape(run_id)}</code>). "
            "Row-level lineage: <code>lineage/&lt;dataset&gt;.parquet</code> or "
            "<code>mesae trace USUBJID DOMAIN SEQ</code>.</p>"
            "<h2>Records per dataset</h2>" + table(counts) + "<h2>Raw rows accounted for</h2>" + table(rows)
            + "".join(sections) + "</body></html>")


def publish_outputs(folder: OutputFolder, run_id: str, sdtm: dict[str, pd.DataFrame], quarantine: pd.DataFrame,
                    inventory: pd.DataFrame, eligibility: pd.DataFrame, traceability: pd.DataFrame,
                    randomization: tuple[int, int, str] | None, finished_at: datetime) -> tuple[dict, pd.DataFrame]:
    """`randomization` is (rows read, rows used, sha256) of the IWRS list in the unblinded zone."""
    check_one_input_set(sdtm, quarantine, inventory)
    rows, reasons = accounting(sdtm, quarantine, inventory, randomization[:2] if randomization else None)
    staging = folder.new_staging(run_id)
    current = inventory[inventory["STATUS"] == "CURRENT"]
    sha: dict[tuple, str] = {}
    inputs = {}
    for transfer in current.itertuples(index=False):
        shas = json.loads(transfer.file_sha256)
        inputs[transfer.SITEID] = {"transfer": transfer.TRANSFER, "sha256": dict(sorted(shas.items()))}
        sha.update({(transfer.SITEID, transfer.TRANSFER, f): s for f, s in shas.items()})

    # Each file named once, in the order of the published listing.
    dataset_files = {(kind, d): staging / kind / f"{d}.parquet" for d in sdtm for kind in ("sdtm", "lineage")}
    quarantine_file, transfers_file = staging / "quarantine.parquet", staging / "transfers.parquet"
    eligibility_file = staging / "reports" / "eligibility_deviations.parquet"
    lineage_types = {"SEQ": "int64", "ROW": "int64"}
    with writes_in_background() as write_file:
        # Largest first: LB's encoding then overlaps the building of every other table.
        for dataset in sorted(sdtm, key=lambda d: len(sdtm[d]), reverse=True):
            frame = sdtm[dataset]
            write_file(sdtm_table(dataset, frame), dataset_files["sdtm", dataset])
            labels = {k: v for k, v in LINEAGE_LABELS.items() if k != "QNAM" or dataset.startswith("supp")}
            write_file(_labelled(lineage_frame(dataset, frame, sha), labels, f"Row-level lineage of {dataset.upper()}",
                                 lineage_types), dataset_files["lineage", dataset])
        write_file(_labelled(findings.normalize(quarantine), QUARANTINE_LABELS, "Quarantine", {"ROW": "int64"}),
                   quarantine_file)
        write_file(_labelled(inventory[list(TRANSFER_LABELS)], TRANSFER_LABELS, "Transfers",
                             {"FILES": "int64", "ROWS": "int64"}), transfers_file)
        write_file(_labelled(eligibility, ELIGIBILITY_LABELS, "Eligibility deviations", {"ROW": "int64"}),
                   eligibility_file)
    written = [*dataset_files.values(), quarantine_file, transfers_file, eligibility_file]

    records = {d: len(f) for d, f in sdtm.items()}
    summary = {
        "zone": folder.zone, "studyid": metadata.study()["studyid"], "inputs": dict(sorted(inputs.items())),
        **({"randomization": {"file": "/".join(RANDOMIZATION_PATH), "sha256": randomization[2]}}
           if randomization else {}),
        "rows": rows, "not_mapped_reasons": {f: dict(sorted(r.items())) for f, r in sorted(reasons.items())},
        "code_version": metadata.code_version(), "finished_at": finished_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": run_id, "records": records,
        "subjects": int(sdtm["dm"]["USUBJID"].nunique()) if "dm" in sdtm else 0,
        "held_back": int(sum(r["held_back"] for r in rows.values())),
        "transfers": inventory["STATUS"].value_counts().sort_index().to_dict(),
        "sites_behind": sites_behind(inventory),
        "findings_by_rule": quarantine.groupby(["RULE", "SEVERITY"]).size().rename("n").reset_index()
        .to_dict(orient="records"),
        "findings_by_site": quarantine.fillna({"SITEID": "(none)"}).groupby(["SITEID", "SEVERITY"]).size()
        .rename("n").reset_index().to_dict(orient="records"),
    }
    page = traceability_html(traceability, records, summary, run_id)
    (staging / "reports").mkdir(parents=True, exist_ok=True)
    (staging / "reports" / "traceability.html").write_text(page, encoding="utf-8")
    (staging / "run.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written += [staging / "reports" / "traceability.html", staging / "run.json"]
    release = folder.publish(staging)
    listing = pd.DataFrame([{
        "path": p.relative_to(staging).as_posix(),
        "sha256": hashlib.sha256((release / p.relative_to(staging)).read_bytes()).hexdigest(),
    } for p in written])
    return summary, listing
