"""Reports layer: protocol deviations, the quarantine, the traceability matrix and the
publication of the whole output set (atomically, only after every blocking check passed)."""


import json
from datetime import datetime, timezone

import dagster as dg
from dagster import AssetExecutionContext
import pandas as pd

from pipeline import findings, metadata
from pipeline.assets.checks import eligibility_result, eligibility_spec
from pipeline.assets.common import OWNERS, findings_counts, findings_table_schema, markdown_table
from pipeline.assets.raw import INGEST_FINDINGS_KEY, INVENTORY_KEY, RANDOMIZATION_KEY
from pipeline.assets.sdtm import column_lineage, sdtm_datasets, sdtm_key
from pipeline.assets.validated import FINDINGS_KEY, VALIDATED_KEYS, VALIDATED_RANDOMIZATION_KEY
from pipeline.publication import publish_outputs
from pipeline.resources import StudySettings
from pipeline.sdtm_datasets import dataset_schema
from pipeline.validation import protocol_ranges

PROTOCOL_FINDINGS_KEY = dg.AssetKey(["reports", "protocol_findings"])
ELIGIBILITY_KEY = dg.AssetKey(["reports", "eligibility_deviations"])
QUARANTINE_KEY = dg.AssetKey(["reports", "quarantine"])
TRACEABILITY_KEY = dg.AssetKey(["reports", "traceability"])
PUBLICATION_KEY = dg.AssetKey(["reports", "publication"])


@dg.multi_asset(
    name="protocol_ranges",
    outs={
        "protocol_findings": dg.AssetOut(key=PROTOCOL_FINDINGS_KEY, group_name="reports", owners=OWNERS,
                                         kinds={"pandera", "pandas"},
                                         description="Protocol deviations of enrolled subjects (WARNING)."),
        "eligibility_deviations": dg.AssetOut(key=ELIGIBILITY_KEY, group_name="reports", owners=OWNERS,
                                              kinds={"parquet", "pandas"},
                                              description="Enrolled subjects who break an eligibility criterion."),
    },
    ins={"dm": dg.AssetIn(sdtm_key("dm")), "lb": dg.AssetIn(sdtm_key("lb")), "qs": dg.AssetIn(sdtm_key("qs")),
         "ex": dg.AssetIn(sdtm_key("ex")), "enrol": dg.AssetIn(VALIDATED_KEYS["enrol"])},
    check_specs=[eligibility_spec(ELIGIBILITY_KEY)],
    can_subset=False,
)
def protocol_ranges_asset(dm: pd.DataFrame, lb: pd.DataFrame, qs: pd.DataFrame, ex: pd.DataFrame,
                          enrol: pd.DataFrame):
    protocol_findings, listing = protocol_ranges.evaluate(protocol_ranges.prepare_frames(dm, lb, qs, ex, enrol))
    yield dg.Output(protocol_findings, output_name="protocol_findings", metadata={
        "dagster/row_count": len(protocol_findings), "dagster/column_schema": findings_table_schema(),
        **findings_counts(protocol_findings)})
    yield dg.Output(listing, output_name="eligibility_deviations", metadata={
        "dagster/row_count": len(listing), "subjects": int(listing["USUBJID"].nunique()),
        "listing": markdown_table(listing, 50)})
    yield eligibility_result(ELIGIBILITY_KEY, listing)


@dg.asset(key=QUARANTINE_KEY, group_name="reports", owners=OWNERS, kinds={"parquet", "pandas"},
          ins={"ingest": dg.AssetIn(INGEST_FINDINGS_KEY), "raw_contract": dg.AssetIn(FINDINGS_KEY),
               "protocol": dg.AssetIn(PROTOCOL_FINDINGS_KEY)},
          description="quarantine.parquet: every record held back (ERROR) or flagged (WARNING), with its reason.")
def quarantine(ingest: pd.DataFrame, raw_contract: pd.DataFrame, protocol: pd.DataFrame) -> dg.Output:
    frame = findings.combine([ingest, raw_contract, protocol])
    return dg.Output(frame, metadata={"dagster/row_count": len(frame), "dagster/column_schema": findings_table_schema(),
                                      **findings_counts(frame), "sample": markdown_table(frame, 30)})


def traceability_matrix(zone: str) -> pd.DataFrame:
    """Variable -> source columns and algorithm, for every dataset, from the mapping files."""
    rows = []
    for domain in metadata.mapping_domains():
        mapping = metadata.mapping(domain)
        lineage = column_lineage(mapping, zone)
        labels = {v["name"]: v["label"] for v in dataset_schema(mapping["dataset"])["variables"]}
        for variable, spec in mapping["variables"].items():
            sources = [f"{file}.csv {column}" if file not in ("sdtm/dm",) else f"DM.{column}"
                       for file, column in lineage.get(variable, []) if not column.startswith("ctx_")]
            rows.append({"DATASET": mapping["dataset"].upper(), "VARIABLE": variable, "LABEL": labels.get(variable),
                         "ALGORITHM": spec["algorithm"], "SOURCES": ", ".join(sources) or "(assigned)",
                         "NOTE": spec.get("note")})
        for qualifier in mapping.get("supplemental", {}).get("qualifiers", []):
            shadow = {"source": mapping["source"], "dataset": mapping["dataset"], "variables": {"QVAL": qualifier["value"]}}
            sources = [f"{file}.csv {column}" for file, column in column_lineage(shadow, zone)["QVAL"]]
            rows.append({"DATASET": mapping["supplemental"]["dataset"].upper(), "VARIABLE": f"QVAL ({qualifier['qnam']})",
                         "LABEL": qualifier["qlabel"], "ALGORITHM": qualifier["value"]["algorithm"],
                         "SOURCES": ", ".join(sources), "NOTE": None})
    return pd.DataFrame(rows).astype("str")


def build_report_assets(zone: str) -> list:
    datasets = sdtm_datasets()

    @dg.asset(key=TRACEABILITY_KEY, group_name="reports", owners=OWNERS, kinds={"html", "pandas"},
              deps=[sdtm_key(d) for d in datasets],
              description="Traceability matrix: each SDTM variable, its raw source columns and algorithm "
                          "(rendered as reports/traceability.html).")
    def traceability() -> dg.Output:
        matrix = traceability_matrix(zone)
        return dg.Output(matrix, metadata={"dagster/row_count": len(matrix), "matrix": markdown_table(matrix, 400)})

    ins = {d: dg.AssetIn(sdtm_key(d)) for d in datasets}
    ins.update(quarantine=dg.AssetIn(QUARANTINE_KEY), inventory=dg.AssetIn(INVENTORY_KEY),
               eligibility=dg.AssetIn(ELIGIBILITY_KEY), traceability=dg.AssetIn(TRACEABILITY_KEY))
    if zone == "unblinded":
        ins["randomization"] = dg.AssetIn(VALIDATED_RANDOMIZATION_KEY)
        ins["randomization_raw"] = dg.AssetIn(RANDOMIZATION_KEY)

    @dg.asset(key=PUBLICATION_KEY, group_name="reports", owners=OWNERS, kinds={"parquet"}, ins=ins,
              description="Publishes the SDTM datasets, quarantine, transfers, lineage and run.json into the "
                          "output folder with one atomic swap.")
    def publication(context: AssetExecutionContext, settings: StudySettings, **inputs: pd.DataFrame) -> dg.Output:
        sdtm = {d: inputs[d] for d in datasets}
        summary, published = publish_outputs(
            folder=settings.output, run_id=context.run_id, sdtm=sdtm, quarantine=inputs["quarantine"],
            inventory=inputs["inventory"], eligibility=inputs["eligibility"], traceability=inputs["traceability"],
            randomization=(len(inputs["randomization_raw"]), len(inputs["randomization"])) if zone == "unblinded" else None,
            finished_at=datetime.now(timezone.utc))
        context.log.info(f"published {len(published)} files to {settings.output.root}")
        return dg.Output(published, metadata={
            "dagster/row_count": len(published), "dagster/uri": settings.output.root.resolve().as_uri(),
            "files": markdown_table(published, 100), "rows": dg.MetadataValue.json(summary["rows"]),
            "not_mapped_reasons": dg.MetadataValue.json(summary["not_mapped_reasons"]),
            "records": dg.MetadataValue.json(summary["records"]),
        })

    return [traceability, publication]

