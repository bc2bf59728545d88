"""Reports layer: protocol deviations, the quarantine, the traceability matrix and the
publication of the whole output set (atomically, only after every blocking check passed).

One step produces the five report assets: it runs only after the SDTM step's blocking checks
passed, reads each SDTM dataset once, and writes Dagster's events once per asset."""


from datetime import datetime, timezone

import dagster as dg
from dagster import AssetExecutionContext
import pandas as pd

from pipeline import findings, metadata
from pipeline.assets.checks import eligibility_result, eligibility_spec
from pipeline.assets.common import OWNERS, findings_counts, findings_table_schema, frame_column_schema, markdown_table
from pipeline.assets.raw import INGEST_FINDINGS_KEY, INVENTORY_KEY, RANDOMIZATION_KEY
from pipeline.assets.sdtm import sdtm_key
from pipeline.mapping_engine import column_lineage, qualifier_lineage
from pipeline.assets.validated import FINDINGS_KEY, VALIDATED_KEYS, VALIDATED_RANDOMIZATION_KEY
from pipeline.publication import RANDOMIZATION_ATTR, check_one_code_version, one_input_set, publish_outputs
from pipeline.resources import AssetStore, StudySettings, store_of
from pipeline.sdtm_datasets import dataset_schema, sdtm_datasets
from pipeline.validation import protocol_ranges

PROTOCOL_FINDINGS_KEY = dg.AssetKey(["reports", "protocol_findings"])
ELIGIBILITY_KEY = dg.AssetKey(["reports", "eligibility_deviations"])
QUARANTINE_KEY = dg.AssetKey(["reports", "quarantine"])
TRACEABILITY_KEY = dg.AssetKey(["reports", "traceability"])
PUBLICATION_KEY = dg.AssetKey(["reports", "publication"])


def source_text(file: str, column: str) -> str:
    """Where a lineage pair comes from, as a site data manager names it."""
    if file == "sdtm/dm":
        return f"DM.{column}"
    if file == "transfer_inventory":
        return f"manifest.json {column.lower()}"
    return f"{file}.csv {column}"


def traceability_matrix(zone: str) -> pd.DataFrame:
    """Variable -> source columns and algorithm, for every dataset, from the mapping files."""
    rows = []
    for domain in metadata.mapping_domains():
        mapping = metadata.mapping(domain)
        lineage = column_lineage(mapping, zone)
        labels = {v["name"]: v["label"] for v in dataset_schema(mapping["dataset"])["variables"]}
        for variable, spec in mapping["variables"].items():
            sources = [source_text(file, column) for file, column in lineage.get(variable, [])]
            rows.append({"DATASET": mapping["dataset"].upper(), "VARIABLE": variable, "LABEL": labels.get(variable),
                         "ALGORITHM": spec["algorithm"], "SOURCES": ", ".join(sources) or "(assigned)",
                         "NOTE": spec.get("note")})
        for qualifier in mapping.get("supplemental", {}).get("qualifiers", []):
            sources = [source_text(file, column) for file, column in qualifier_lineage(mapping, qualifier, zone)]
            rows.append({"DATASET": mapping["supplemental"]["dataset"].upper(), "VARIABLE": f"QVAL ({qualifier['qnam']})",
                         "LABEL": qualifier["qlabel"], "ALGORITHM": qualifier["value"]["algorithm"],
                         "SOURCES": ", ".join(sources), "NOTE": None})
    return pd.DataFrame(rows).astype("str")


def build_report_assets(zone: str) -> dg.AssetsDefinition:
    datasets = sdtm_datasets()
    sdtm_keys = [sdtm_key(d) for d in datasets]
    protocol_inputs = [sdtm_key(d) for d in ("dm", "lb", "qs", "ex")] + [VALIDATED_KEYS["enrol"]]
    randomization = [VALIDATED_RANDOMIZATION_KEY, RANDOMIZATION_KEY] if zone == "unblinded" else []
    code_version = metadata.layer_code_version(metadata.REPORTS_LAYER_METADATA)

    def spec(key, deps, kinds, description):
        return dg.AssetSpec(key, deps=deps, group_name="reports", owners=OWNERS, kinds=kinds, description=description,
                            code_version=code_version)

    specs = [
        spec(PROTOCOL_FINDINGS_KEY, protocol_inputs, {"pandera", "pandas"},
             "Protocol deviations of enrolled subjects (WARNING)."),
        spec(ELIGIBILITY_KEY, protocol_inputs, {"parquet", "pandas"},
             "Enrolled subjects who break an eligibility criterion."),
        spec(QUARANTINE_KEY, [INGEST_FINDINGS_KEY, FINDINGS_KEY, PROTOCOL_FINDINGS_KEY], {"parquet", "pandas"},
             "quarantine.parquet: every record held back (ERROR) or flagged (WARNING), with its reason."),
        spec(TRACEABILITY_KEY, sdtm_keys, {"html", "pandas"},
             "Traceability matrix: each SDTM variable, its raw source columns and algorithm "
             "(rendered as reports/traceability.html)."),
        spec(PUBLICATION_KEY, [*sdtm_keys, QUARANTINE_KEY, INVENTORY_KEY, ELIGIBILITY_KEY, TRACEABILITY_KEY,
                               *randomization], {"parquet"},
             "Publishes the SDTM datasets, quarantine, transfers, lineage and run.json into the output folder "
             "with one atomic swap."),
    ]

    @dg.multi_asset(name="reports", specs=specs, check_specs=[eligibility_spec(ELIGIBILITY_KEY)], can_subset=False)
    def reports(context: AssetExecutionContext, settings: StudySettings, store: AssetStore):
        store = store_of(settings, store)
        loaded = {key: store.load(key) for key in [*sdtm_keys, VALIDATED_KEYS["enrol"], INGEST_FINDINGS_KEY,
                                                   FINDINGS_KEY, INVENTORY_KEY, *randomization]}
        check_one_code_version({key.to_user_string(): frame for key, frame in loaded.items()}, metadata.code_version())
        one_input_set({key.to_user_string(): frame for key, frame in loaded.items() if key != RANDOMIZATION_KEY})
        if randomization:   # the arms published were built from the IWRS list whose sha256 run.json names
            one_input_set({key.to_user_string(): loaded[key] for key in [*sdtm_keys, *randomization]},
                          RANDOMIZATION_ATTR)
        sdtm = {d: loaded[sdtm_key(d)] for d in datasets}
        protocol_findings, listing = protocol_ranges.evaluate(protocol_ranges.prepare_frames(
            sdtm["dm"], sdtm["lb"], sdtm["qs"], sdtm["ex"], loaded[VALIDATED_KEYS["enrol"]]))
        store.save(PROTOCOL_FINDINGS_KEY, protocol_findings)
        yield dg.MaterializeResult(asset_key=PROTOCOL_FINDINGS_KEY, metadata={
            "dagster/row_count": len(protocol_findings), "dagster/column_schema": findings_table_schema(),
            **findings_counts(protocol_findings)})
        store.save(ELIGIBILITY_KEY, listing)
        yield dg.MaterializeResult(asset_key=ELIGIBILITY_KEY, metadata={
            "dagster/row_count": len(listing), "dagster/column_schema": frame_column_schema(listing),
            "subjects": int(listing["USUBJID"].nunique()),
            "listing": markdown_table(listing, 50)})
        yield eligibility_result(ELIGIBILITY_KEY, listing)

        quarantine = findings.combine([loaded[INGEST_FINDINGS_KEY], loaded[FINDINGS_KEY], protocol_findings])
        store.save(QUARANTINE_KEY, quarantine)
        yield dg.MaterializeResult(asset_key=QUARANTINE_KEY, metadata={
            "dagster/row_count": len(quarantine), "dagster/column_schema": findings_table_schema(),
            **findings_counts(quarantine), "sample": markdown_table(quarantine, 30)})

        matrix = traceability_matrix(zone)
        store.save(TRACEABILITY_KEY, matrix)
        yield dg.MaterializeResult(asset_key=TRACEABILITY_KEY,
                                   metadata={"dagster/row_count": len(matrix),
                                             "dagster/column_schema": frame_column_schema(matrix),
                                             "matrix": markdown_table(matrix, 400)})

        iwrs = ((len(loaded[RANDOMIZATION_KEY]), len(loaded[VALIDATED_RANDOMIZATION_KEY]),
                 loaded[RANDOMIZATION_KEY].attrs["sha256"]) if randomization else None)
        summary, published = publish_outputs(
            folder=settings.output, run_id=context.run_id, sdtm=sdtm, quarantine=quarantine,
            inventory=loaded[INVENTORY_KEY], eligibility=listing, traceability=matrix, randomization=iwrs,
            finished_at=datetime.now(timezone.utc))
        store.save(PUBLICATION_KEY, published)
        yield dg.MaterializeResult(asset_key=PUBLICATION_KEY, metadata={
            "dagster/row_count": len(published), "dagster/uri": settings.output.root.resolve().as_uri(),
            "release_uri": settings.output.release_of(context.run_id).resolve().as_uri(),
            "code_version": summary["code_version"], "exports": str(settings.exports.absolute()),
            "files": markdown_table(published, 100), "rows": dg.MetadataValue.json(summary["rows"]),
            "not_mapped_reasons": dg.MetadataValue.json(summary["not_mapped_reasons"]),
            "records": dg.MetadataValue.json(summary["records"]),
        })

    return reports
