"""Raw ingest layer: the site transfers, verified against their manifests, read as text.

`exports/site_transfers` is an observable source: its data version is the hash of every site's
newest manifest, so Dagster marks everything downstream stale only when a site sent new data.
The ingest is one step (every file of the current transfers is read exactly once) with one
asset per raw file type, `raw/<file>`, as the contract names them.
"""


import hashlib
import json

import dagster as dg
import pandas as pd

from pipeline import findings, metadata, transfers
from pipeline.assets.checks import transfers_result, transfers_spec
from pipeline.assets.common import OWNERS, findings_counts, findings_table_schema, markdown_table
from pipeline.publication import INPUT_SET_ATTR, RANDOMIZATION_ATTR, input_set_of
from pipeline.resources import AssetStore, StudySettings, store_of

EXPORTS_KEY = dg.AssetKey(["exports", "site_transfers"])
RAW_KEYS = {name: dg.AssetKey(["raw", name]) for name in metadata.RAW_FILES}
INVENTORY_KEY = dg.AssetKey(["raw", "transfer_inventory"])
INGEST_FINDINGS_KEY = dg.AssetKey(["raw", "ingest_findings"])
RANDOMIZATION_KEY = dg.AssetKey(["raw", "randomization"])

INVENTORY_COLUMNS = ["SITEID", "TRANSFER", "STATUS", "REASON", "EXPORTED_AT", "FILES", "ROWS"]
INVENTORY_SCHEMA = dg.TableSchema(columns=[
    *(dg.TableColumn(c, "int64" if c in ("FILES", "ROWS") else "string") for c in INVENTORY_COLUMNS),
    dg.TableColumn("data_cutoff", "string", description="UTC date of exported_at (AEENTPT of ongoing events)"),
    dg.TableColumn("file_rows", "string", description="JSON: rows per file"),
    dg.TableColumn("file_sha256", "string", description="JSON: sha256 per file")])


def manifests_version(listing: list[transfers.Transfer]) -> str:
    """Hash of each site's transfer folder names and manifests: changes when a site sends data."""
    digest = hashlib.sha256()
    for transfer in listing:
        digest.update(f"{transfer.site}/{transfer.name}".encode())
        manifest = transfer.path / transfers.MANIFEST
        if manifest.is_file():
            digest.update(manifest.read_bytes())
    return digest.hexdigest()


@dg.observable_source_asset(
    key=EXPORTS_KEY, group_name="raw", description="Nightly site transfers under the exports root (read only).",
)
def site_transfers(settings: StudySettings) -> dg.DataVersion:
    return dg.DataVersion(manifests_version(transfers.list_transfers(settings.exports)))


def inventory_frame(all_transfers: list[transfers.Transfer]) -> pd.DataFrame:
    """transfers.parquet rows: one per transfer folder seen, with status and reason."""
    rows = []
    for t in sorted(all_transfers, key=lambda t: (t.site or "", t.name)):
        current = t.status == "CURRENT"
        rows.append({
            "SITEID": t.site, "TRANSFER": t.name, "STATUS": t.status, "REASON": t.reason, "EXPORTED_AT": t.exported_at,
            "FILES": int(len(t.files) if current else len(t.manifest_files)),
            "ROWS": int(sum(f.rows for f in t.files.values())) if current else
            int(sum(e.get("rows", 0) for e in t.manifest_files.values() if isinstance(e.get("rows"), int))),
            "data_cutoff": t.data_cutoff,
            "file_rows": {n: f.rows for n, f in t.files.items()},
            "file_sha256": {n: f.sha256 for n, f in t.files.items()},
        })
    frame = pd.DataFrame(rows, columns=[*INVENTORY_COLUMNS, "data_cutoff", "file_rows", "file_sha256"])
    for column in ["FILES", "ROWS"]:
        frame[column] = frame[column].astype("int64")
    for column in ["SITEID", "TRANSFER", "STATUS", "REASON", "EXPORTED_AT", "data_cutoff"]:
        frame[column] = frame[column].astype("str")
    # Per-file figures as JSON text: Arrow IPC stores them, the lineage sidecar and run.json use them.
    frame["file_rows"] = frame["file_rows"].map(lambda d: json.dumps(d, sort_keys=True)).astype("str")
    frame["file_sha256"] = frame["file_sha256"].map(lambda d: json.dumps(d, sort_keys=True)).astype("str")
    return frame


def content_version(code_version: str, *parts: str) -> dg.DataVersion:
    """A data version from what the value is made of, with the layer's code version: the same on a
    rerun over the same transfers, new when any part of it changed (a new folder, a new reason)."""
    return dg.DataVersion(hashlib.sha256("\x1f".join([code_version, *parts]).encode()).hexdigest())


def _raw_specs(code_version: str) -> list[dg.AssetSpec]:
    specs = [
        dg.AssetSpec(key, deps=[EXPORTS_KEY], group_name="raw", owners=OWNERS, kinds={"csv", "pandas"},
                     code_version=code_version,
                     description=f"{metadata.raw_schema(name)['file']} of every site's CURRENT transfer, as text, "
                                 "with source coordinates (site, transfer, file, row).")
        for name, key in RAW_KEYS.items()
    ]
    specs.append(dg.AssetSpec(INVENTORY_KEY, deps=[EXPORTS_KEY], group_name="raw", owners=OWNERS, kinds={"pandas"},
                              code_version=code_version,
                              description="Every transfer folder seen: CURRENT, SUPERSEDED or REJECTED."))
    specs.append(dg.AssetSpec(INGEST_FINDINGS_KEY, deps=[EXPORTS_KEY], group_name="raw", owners=OWNERS,
                              kinds={"pandas"}, code_version=code_version,
                              description="Transfer- and file-level findings of the ingest."))
    return specs


# Dagster's tag for the data version of an input, as it records it on a materialization.
EXPORTS_INPUT_VERSION_TAG = f"dagster/input_data_version/{EXPORTS_KEY.to_user_string()}"


def exports_read(context: dg.AssetExecutionContext, version: str) -> dict[str, str]:
    """The exports' version the ingest read, recorded as its input. The job observes the exports
    in its first step; a run that did not ("Materialize all" in the UI, a raw/* subset) would
    otherwise record the last observed version, another night's exports. Then this observes them
    itself, so that the catalog's newest exports version is the one read."""
    observed = context.instance.get_latest_data_version_record(EXPORTS_KEY)
    if observed is None or observed.asset_observation.tags.get("dagster/data_version") != version:
        context.log_event(dg.AssetObservation(asset_key=EXPORTS_KEY, tags={"dagster/data_version": version}))
    return {EXPORTS_INPUT_VERSION_TAG: version}


def build_raw_ingest() -> dg.AssetsDefinition:
    """The ingest step; built with the definitions, so that its code version is that of the
    metadata they load (MESAE_METADATA_ROOT)."""
    code_version = metadata.layer_code_version(metadata.RAW_LAYER_METADATA)

    @dg.multi_asset(specs=_raw_specs(code_version), name="raw_ingest", can_subset=False,
                    check_specs=[transfers_spec(INVENTORY_KEY)])
    def raw_ingest(context: dg.AssetExecutionContext, settings: StudySettings, store: AssetStore):
        store = store_of(settings, store)
        known = transfers.KnownTransfers(settings.output.state / "known_transfers.json")
        listing = transfers.list_transfers(settings.exports)
        provenance = exports_read(context, manifests_version(listing))
        all_transfers = [*transfers.select_current(listing, known), *transfers.misnamed_site_folders(settings.exports)]
        known.save()
        published = settings.output.published_inputs()
        withdrawn = transfers.withdrawals(published, all_transfers, settings.sites_withdrawn)
        unknown = transfers.unknown_withdrawals(settings.sites_withdrawn, published, all_transfers)
        if unknown:
            context.log.warning(unknown)
        gone = transfers.sites_gone(published, all_transfers, settings.sites_withdrawn)
        if gone:
            flags = " ".join(f"--without-site {site}" for site in gone)
            raise transfers.SiteGoneError(
                "; ".join(gone.values()) + ". Publishing would drop its subjects from every dataset, so nothing is "
                "published and the previous outputs stay. Restore the site's transfers, or, if the site has "
                f"closed, run once with `mesae run ... {flags}` (settings.sites_withdrawn in the launchpad)")
        inventory = inventory_frame(all_transfers)
        current = [t for t in all_transfers if t.status == "CURRENT"]
        # A transfer rejected before the site's current one is history (transfers.parquet keeps its
        # reason); the quarantine holds what is wrong in the data as it stands tonight. A folder name
        # that is no export time (`2026-11-25T220005`) cannot be placed: it stays news.
        newest = {t.site: t.name for t in current}
        pending = [t for t in all_transfers
                   if not (t.site in newest and t.status == "REJECTED" and t.name < newest[t.site]
                           and transfers.TRANSFER_FOLDER.match(t.name))]
        ingest_findings = findings.combine([
            findings.from_records([p for t in pending for p in t.problems] + withdrawn
                                  + transfers.sites_gone_back(published, all_transfers)),
            findings.from_records([f for t in current for raw in t.files.values() for f in raw.findings]),
        ])
        stamp = {INPUT_SET_ATTR: input_set_of(inventory)}
        inventory.attrs.update(stamp)
        ingest_findings.attrs.update(stamp)
        for name, key in RAW_KEYS.items():
            file = metadata.raw_schema(name)["file"]
            parts = [t.files[file].data for t in current]
            frame = transfers.stack_transfers(parts) if parts else empty_raw_frame(name)
            frame.attrs.update(stamp)
            store.save(key, frame)
            per_site = pd.DataFrame([{"site": t.site, "transfer": t.name, "rows": t.files[file].rows,
                                      "sha256": t.files[file].sha256} for t in current])
            version = content_version(code_version, *(f"{t.site}/{t.name}/{t.exported_at}/{t.files[file].sha256}"
                                                      for t in current))
            yield dg.MaterializeResult(asset_key=key, data_version=version, tags=provenance, metadata={
                "dagster/row_count": len(frame),
                "dagster/column_schema": raw_column_schema(name),
                "transfers": markdown_table(per_site, 100),
            })
        store.save(INVENTORY_KEY, inventory)
        yield dg.MaterializeResult(asset_key=INVENTORY_KEY, tags=provenance,
                                   data_version=content_version(code_version, inventory.to_json(orient="split")),
                                   metadata={"dagster/row_count": len(inventory),
                                             "dagster/column_schema": INVENTORY_SCHEMA,
                                             "transfers": markdown_table(inventory[INVENTORY_COLUMNS], 100),
                                             "rejected": int((inventory["STATUS"] == "REJECTED").sum())})
        yield transfers_result(INVENTORY_KEY, ingest_findings)
        store.save(INGEST_FINDINGS_KEY, ingest_findings)
        yield dg.MaterializeResult(asset_key=INGEST_FINDINGS_KEY, tags=provenance,
                                   data_version=content_version(code_version, ingest_findings.to_json(orient="split")),
                                   metadata={"dagster/row_count": len(ingest_findings),
                                             "dagster/column_schema": findings_table_schema(),
                                             **findings_counts(ingest_findings)})

    return raw_ingest


def raw_column_schema(name: str) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(c, "string", description="raw text as exported")
                                   for c in metadata.raw_schema(name)["columns"]])


def empty_raw_frame(name: str) -> pd.DataFrame:
    columns = metadata.raw_schema(name)["columns"]
    frame = pd.DataFrame({c: pd.Series(dtype="str") for c in columns})
    for column, dtype in [("src_site", "category"), ("src_transfer", "category"), ("src_file", "category"),
                          ("src_row", "int64"), ("src_ragged", "bool")]:
        frame.insert(len(frame.columns), column, pd.Series(dtype=dtype))
    return frame


def build_randomization_asset() -> dg.AssetsDefinition:
    """raw/randomization exists only in the unblinded zone's definitions."""
    code_version = metadata.layer_code_version(metadata.RAW_LAYER_METADATA)

    @dg.asset(key=RANDOMIZATION_KEY, group_name="raw", owners=OWNERS, kinds={"csv", "pandas"},
              code_version=code_version,
              description="IWRS randomization list (unblinded/randomization.csv), unblinded zone only.")
    def randomization(settings: StudySettings, store: AssetStore) -> dg.MaterializeResult:
        store = store_of(settings, store)
        frame, problems = transfers.read_randomization(settings.exports)
        frame.attrs.update({"ingest_findings": problems, RANDOMIZATION_ATTR: frame.attrs["sha256"]})
        store.save(RANDOMIZATION_KEY, frame)
        return dg.MaterializeResult(data_version=content_version(code_version, frame.attrs["sha256"]), metadata={
            "dagster/row_count": len(frame), "ingest_findings": len(problems),
            "file": "/".join(transfers.RANDOMIZATION_PATH), "sha256": frame.attrs["sha256"]})

    return randomization
