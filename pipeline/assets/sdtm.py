"""SDTM layer: one asset per mapping file (plus its SUPP-- dataset), built from the mapping.

The factory reads `mappings/<domain>.yaml` to decide what each asset depends on (the raw files
it names, `sdtm/dm` for subject reference dates, the unscheduled visit table, the IWRS list in
the unblinded zone), its code version (hash of its mapping and the metadata it uses) and its
column lineage. A new domain is a new mapping file and SDTM schema; no code changes here.
"""


import json

import dagster as dg
from dagster import AssetExecutionContext
import pandas as pd

from pipeline import metadata
from pipeline.assets.checks import conformance_result, conformance_spec
from pipeline.assets.common import OWNERS, findings_counts, markdown_table
from pipeline.assets.raw import INVENTORY_KEY, RANDOMIZATION_KEY, RAW_KEYS
from pipeline.assets.validated import FINDINGS_KEY, VALIDATED_KEYS, VALIDATED_RANDOMIZATION_KEY, VISITS_KEY
from pipeline.mapping_engine import UNBLINDED_SOURCES, MappingInputs, check_mapping, column_lineage, map_domain
from pipeline.resources import StudySettings
from pipeline.sdtm_datasets import arrow_type, dataset_schema

SDTM_PREFIX = "sdtm"


def sdtm_key(dataset: str) -> dg.AssetKey:
    return dg.AssetKey([SDTM_PREFIX, dataset])


def _walk(spec, found: dict) -> None:
    """Collects references, `from` files and algorithm names of a mapping (recursively)."""
    if isinstance(spec, list):
        for item in spec:
            _walk(item, found)
        return
    if not isinstance(spec, dict):
        return
    if "algorithm" in spec:
        found["algorithms"].add(spec["algorithm"])
    source = spec.get("source", [])
    for reference in [source] if isinstance(source, str) else source:
        if "." in reference and not reference.startswith("$"):
            found["prefixes"].add(reference.split(".", 1)[0])
    files = spec.get("from")
    for file in files if isinstance(files, list) else ([files] if files else []):
        found["files"].add(file)
    for value in spec.values():
        if isinstance(value, (dict, list)):
            _walk(value, found)


def mapping_inputs(mapping: dict, zone: str) -> dict[str, dg.AssetKey]:
    found = {"algorithms": set(), "prefixes": set(), "files": set()}
    _walk(mapping, found)
    files = {mapping["source"], *mapping.get("join", []), *found["files"]}
    is_dm = mapping["dataset"] == "dm"
    files |= {p for p in found["prefixes"] if p in metadata.RAW_FILES and not (p == "dm" and not is_dm)}
    ins = {f"validated_{f}": VALIDATED_KEYS[f] for f in sorted(files)}
    if "dm" in found["prefixes"] and not is_dm:
        ins["sdtm_dm"] = sdtm_key("dm")
    if "visit_number" in found["algorithms"]:
        ins["subject_visits"] = VISITS_KEY
    if zone == "unblinded" and found["algorithms"] & set(UNBLINDED_SOURCES):
        ins["randomization"] = VALIDATED_RANDOMIZATION_KEY
    ins["transfer_inventory"] = INVENTORY_KEY
    ins["findings"] = FINDINGS_KEY
    return ins


def mapping_code_version(mapping: dict) -> str:
    """Hash of the mapping file, the SDTM schema(s) and the terminology it relies on."""
    root = metadata.metadata_root()
    paths = [root / "mappings" / f"{mapping['dataset']}.yaml", root / "schemas" / "sdtm" / f"{mapping['dataset']}.yaml"]
    if "supplemental" in mapping:
        paths.append(root / "schemas" / "sdtm" / "supp.yaml")
    paths += sorted((root / "schemas" / "terminology").glob("*.yaml"))
    paths += [root / "schemas" / "study.yaml"]
    return metadata.files_digest(paths, root)[:16]


def lineage_asset(file_or_asset: str) -> dg.AssetKey:
    if file_or_asset == "sdtm/dm":
        return sdtm_key("dm")
    if file_or_asset == "randomization":
        return RANDOMIZATION_KEY
    return RAW_KEYS[file_or_asset]


def column_metadata(dataset: str, lineage: dict[str, list[tuple[str, str]]]) -> dict:
    schema = dataset_schema(dataset)
    table_schema = dg.TableSchema(columns=[
        dg.TableColumn(v["name"], arrow_type(v), description=v["label"],
                       tags={"core": v["core"], "sdtm_type": v["type"]})
        for v in schema["variables"]])
    deps = {}
    for variable in schema["variables"]:
        sources = []
        for file, column in lineage.get(variable["name"], []):
            if column.startswith("ctx_"):
                continue
            sources.append(dg.TableColumnDep(asset_key=lineage_asset(file), column_name=column))
        if sources:
            deps[variable["name"]] = sources
    return {"dagster/column_schema": table_schema, "dagster/column_lineage": dg.TableColumnLineage(deps_by_column=deps)}


def _supp_lineage(mapping: dict, zone: str) -> dict[str, list[tuple[str, str]]]:
    config = mapping["supplemental"]
    sources = {}
    for qualifier in config["qualifiers"]:
        shadow = {"source": mapping["source"], "dataset": mapping["dataset"],
                  "variables": {"QVAL": qualifier["value"]}}
        sources.setdefault("QVAL", []).extend(column_lineage(shadow, zone)["QVAL"])
    sources["USUBJID"] = [(mapping["source"], "SUBJID")]
    return {k: sorted(set(v)) for k, v in sources.items()}


def _transfers_table(inventory: pd.DataFrame, files: list[str]) -> pd.DataFrame:
    current = inventory[inventory["STATUS"] == "CURRENT"]
    rows = []
    for _, transfer in current.iterrows():
        shas = json.loads(transfer["file_sha256"])
        for file in files:
            rows.append({"site": transfer["SITEID"], "transfer": transfer["TRANSFER"], "file": file,
                         "sha256": shas.get(file)})
    return pd.DataFrame(rows)


def build_sdtm_asset(domain: str, zone: str) -> dg.AssetsDefinition:
    mapping = metadata.mapping(domain)
    check_mapping(mapping)
    dataset = mapping["dataset"]
    supplemental = mapping.get("supplemental")
    ins = mapping_inputs(mapping, zone)
    version = mapping_code_version(mapping)
    outs = {dataset: dg.AssetOut(
        key=sdtm_key(dataset), group_name="sdtm", owners=OWNERS, kinds={"parquet", "pandas"}, code_version=version,
        description=f"SDTM {mapping['domain']} - {dataset_schema(dataset)['label']} (mappings/{dataset}.yaml)")}
    if supplemental:
        outs[supplemental["dataset"]] = dg.AssetOut(
            key=sdtm_key(supplemental["dataset"]), group_name="sdtm", owners=OWNERS, kinds={"parquet", "pandas"},
            code_version=version, description=f"SDTM {dataset_schema(supplemental['dataset'])['label']}")
    lineage = column_lineage(mapping, zone)
    source_file = metadata.raw_schema(mapping["source"])["file"]

    checks = [conformance_spec(sdtm_key(name)) for name in outs]

    @dg.multi_asset(name=f"sdtm_{dataset}", outs=outs, ins={k: dg.AssetIn(key=v) for k, v in ins.items()},
                    check_specs=checks, can_subset=False)
    def sdtm_domain(context: AssetExecutionContext, settings: StudySettings, **inputs: pd.DataFrame):
        inventory = inputs["transfer_inventory"]
        current = inventory[inventory["STATUS"] == "CURRENT"]
        validated = {k.removeprefix("validated_"): v for k, v in inputs.items() if k.startswith("validated_")}
        mapped = map_domain(mapping, MappingInputs(
            zone=zone, validated=validated, dm=inputs.get("sdtm_dm"),
            unscheduled_visits=inputs.get("subject_visits"), randomization=inputs.get("randomization"),
            data_cutoff=dict(zip(current["SITEID"] + "/" + current["TRANSFER"], current["EXPORTED_AT"].str.slice(0, 10))),
        ))
        frame = mapped.frame
        frame.attrs = {"dataset": dataset, "source_file": source_file, "not_mapped": mapped.not_mapped}
        file_findings = inputs["findings"][inputs["findings"]["FILE"] == source_file]
        published = settings.output.root.resolve() / "sdtm"
        common = {
            "mapping_file": f"mappings/{dataset}.yaml", "mapping_sha256": version,
            "input_transfers": markdown_table(_transfers_table(inventory, [source_file]), 100),
            "not_mapped": json.dumps(mapped.not_mapped, sort_keys=True),
            **findings_counts(file_findings),
        }
        yield dg.Output(frame, output_name=dataset, metadata={
            "dagster/row_count": len(frame), "dagster/uri": (published / f"{dataset}.parquet").as_uri(),
            **column_metadata(dataset, lineage), **common,
        })
        dm = frame if dataset == "dm" else inputs.get("sdtm_dm")
        subjects = set(dm["USUBJID"]) if dm is not None else None
        yield conformance_result(sdtm_key(dataset), dataset, frame, None if dataset == "dm" else subjects)
        if supplemental:
            supp = mapped.supplemental
            supp.attrs = {"dataset": supplemental["dataset"], "source_file": source_file, "not_mapped": {}}
            yield dg.Output(supp, output_name=supplemental["dataset"], metadata={
                "dagster/row_count": len(supp),
                "dagster/uri": (published / f"{supplemental['dataset']}.parquet").as_uri(),
                **column_metadata(supplemental["dataset"], _supp_lineage(mapping, zone)), **common,
            })
            yield conformance_result(sdtm_key(supplemental["dataset"]), supplemental["dataset"], supp, subjects)

    return sdtm_domain


def sdtm_datasets() -> list[str]:
    """Every SDTM dataset the mappings produce, SUPP-- included, in mapping order."""
    out = []
    for domain in metadata.mapping_domains():
        mapping = metadata.mapping(domain)
        out.append(mapping["dataset"])
        if "supplemental" in mapping:
            out.append(mapping["supplemental"]["dataset"])
    return out
