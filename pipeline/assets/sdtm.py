"""SDTM layer: one asset per mapping file (plus its SUPP-- dataset), built from the mapping.

The factory reads `mappings/<domain>.yaml` to decide what each asset depends on (the raw files
it names, `sdtm/dm` for subject reference dates, the unscheduled visit table, the IWRS list in
the unblinded zone), its code version (hash of its mapping and the metadata it uses, and of the
package code) and its column lineage. A new domain is a new mapping file and SDTM schema; no code changes here.
"""


import json
from typing import NamedTuple

import dagster as dg
import pandas as pd

from pipeline import metadata
from pipeline.assets.checks import conformance_result, conformance_spec, refuse_nonconformant
from pipeline.assets.common import OWNERS, findings_counts, markdown_table
from pipeline.assets.raw import INVENTORY_KEY, RANDOMIZATION_KEY, RAW_KEYS
from pipeline.assets.validated import FINDINGS_KEY, VALIDATED_KEYS, VALIDATED_RANDOMIZATION_KEY
from pipeline.derivations.distinct_values import distinct_rows
from pipeline.derivations.iso_dates import site_date_to_iso
from pipeline.derivations.visits import unscheduled_visit_numbers
from pipeline.mapping_engine import (UNBLINDED_SOURCES, MappingInputs, check_mapping, column_lineage, map_domain,
                                     qualifier_lineage)
from pipeline.publication import INPUT_SET_ATTR, RANDOMIZATION_ATTR, one_input_set
from pipeline.resources import AssetStore, StudySettings, store_of
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


def dated_visits(validated: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """SUBJID, VISIT and ISO date of every visit-bearing record."""
    parts = []
    for name, column, date in metadata.visit_columns():
        frame = validated[name][["SUBJID", column, date]]
        # drop_duplicates, on the factorization codes the mapping shares
        frame = frame.take(distinct_rows([frame[c] for c in frame.columns])[1])
        parts.append(pd.DataFrame({"SUBJID": frame["SUBJID"], "VISIT": frame[column], "DTC": site_date_to_iso(frame[date])}))
    return pd.concat(parts, ignore_index=True)


def mapping_inputs(mapping: dict, zone: str) -> dict[str, dg.AssetKey]:
    found = {"algorithms": set(), "prefixes": set(), "files": set()}
    _walk(mapping, found)
    files = {mapping["source"], *mapping.get("join", []), *found["files"]}
    is_dm = mapping["dataset"] == "dm"
    files |= {p for p in found["prefixes"] if p in metadata.RAW_FILES and not (p == "dm" and not is_dm)}
    ins = {f"validated_{f}": VALIDATED_KEYS[f] for f in sorted(files)}
    if "dm" in found["prefixes"] and not is_dm:
        ins["sdtm_dm"] = sdtm_key("dm")
    if "visit_number" in found["algorithms"]:   # unscheduled visits are numbered across every visit file
        ins.update({f"validated_{f}": VALIDATED_KEYS[f] for f, _, _ in metadata.visit_columns()})
    if zone == "unblinded" and found["algorithms"] & set(UNBLINDED_SOURCES):
        ins["randomization"] = VALIDATED_RANDOMIZATION_KEY
    ins["transfer_inventory"] = INVENTORY_KEY
    ins["findings"] = FINDINGS_KEY
    return ins


def mapping_code_version(mapping: dict) -> str:
    """Hash of the mapping file, the SDTM schema(s) and the terminology it relies on. The asset's
    code version adds the package code, which holds the derivations (a study-day change must show)."""
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
    if file_or_asset == "transfer_inventory":
        return INVENTORY_KEY
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
            sources.append(dg.TableColumnDep(asset_key=lineage_asset(file), column_name=column))
        if sources:
            deps[variable["name"]] = sources
    return {"dagster/column_schema": table_schema, "dagster/column_lineage": dg.TableColumnLineage(deps_by_column=deps)}


def _supp_lineage(mapping: dict, zone: str) -> dict[str, list[tuple[str, str]]]:
    qualifiers = mapping["supplemental"]["qualifiers"]
    return {"QVAL": sorted({pair for q in qualifiers for pair in qualifier_lineage(mapping, q, zone)}),
            "USUBJID": [(mapping["source"], "SUBJID")]}


def _transfers_table(inventory: pd.DataFrame, files: list[str]) -> pd.DataFrame:
    current = inventory[inventory["STATUS"] == "CURRENT"]
    rows = []
    for _, transfer in current.iterrows():
        shas = json.loads(transfer["file_sha256"])
        for file in files:
            rows.append({"site": transfer["SITEID"], "transfer": transfer["TRANSFER"], "file": file,
                         "sha256": shas.get(file)})
    return pd.DataFrame(rows)


def _dataset_metadata(dataset: str, frame: pd.DataFrame, lineage: dict, version: str, input_files: list[str],
                      not_mapped: dict, inventory: pd.DataFrame, file_findings: pd.DataFrame, published,
                      stored) -> dict:
    """`input_transfers` lists every raw file the mapping reads (DM reads six), with its sha256.
    `dagster/uri` is the value this materialization stored, which `dagster/row_count` counts; it
    is published as `published_as` only when the run's publication passes (reports/publication
    names the set's own folder), so a run that fails later leaves the catalog true."""
    return {
        "dagster/row_count": len(frame), "dagster/uri": stored.as_uri(),
        "published_as": (published / f"{dataset}.parquet").as_uri(),
        **column_metadata(dataset, lineage),
        "mapping_file": f"mappings/{dataset.removeprefix('supp') if dataset.startswith('supp') else dataset}.yaml",
        "mapping_version": version,
        "input_transfers": markdown_table(_transfers_table(inventory, input_files), 200),
        "not_mapped": json.dumps(not_mapped, sort_keys=True),
        **findings_counts(file_findings),
    }


class BuiltDataset(NamedTuple):
    """A dataset mapped and checked, held until every dataset passed conformance."""
    name: str
    frame: pd.DataFrame
    check: dg.AssetCheckResult
    metadata: dict


def build_sdtm_assets(zone: str) -> dg.AssetsDefinition:
    """Every SDTM dataset, one asset each, computed in one step (DM first: the others need its
    reference dates). One step instead of one per domain saves Dagster's per-step event writes,
    which cost more than the mapping itself on a small trial; each dataset keeps its own key,
    code version, dependencies, checks, metadata and lineage."""
    mappings = [metadata.mapping(d) for d in metadata.mapping_domains()]
    mappings.sort(key=lambda m: m["dataset"] != "dm")
    loads, specs, checks, versions, input_files = {}, [], [], {}, {}
    for mapping in mappings:
        check_mapping(mapping)
        dataset, supplemental = mapping["dataset"], mapping.get("supplemental")
        versions[dataset] = mapping_code_version(mapping)
        code_version = f"{versions[dataset]}+{metadata.package_code_digest()[:8]}"
        needed = mapping_inputs(mapping, zone)
        # The files the step loads, and those the lineage names beyond them (AE's EPOCH reads ex.csv
        # through DM's subject facts).
        read = {name.removeprefix("validated_") for name in needed if name.startswith("validated_")}
        named = {file for pairs in column_lineage(mapping, zone).values() for file, _ in pairs
                 if file in metadata.RAW_FILES}
        input_files[dataset] = sorted(metadata.raw_schema(name)["file"] for name in read | named)
        loads.update({k: v for k, v in needed.items() if k != "sdtm_dm"})
        for name in [dataset] + ([supplemental["dataset"]] if supplemental else []):
            specs.append(dg.AssetSpec(
                sdtm_key(name), deps=sorted(set(needed.values()), key=str), group_name="sdtm", owners=OWNERS,
                kinds={"parquet", "pandas"}, code_version=code_version,
                description=f"SDTM {dataset_schema(name)['label']} (mappings/{dataset}.yaml)"))
            checks.append(conformance_spec(sdtm_key(name)))

    @dg.multi_asset(name="sdtm_domains", specs=specs, check_specs=checks, can_subset=False)
    def sdtm_domains(settings: StudySettings, store: AssetStore):
        store = store_of(settings, store)
        inputs = {name: store.load(key) for name, key in loads.items()}
        stamp = {INPUT_SET_ATTR: one_input_set(inputs)}
        if zone == "unblinded":   # DM's arms and EX's doses come from the IWRS list
            stamp[RANDOMIZATION_ATTR] = one_input_set(
                {k: v for k, v in inputs.items() if k.startswith("validated_") or k == "randomization"},
                RANDOMIZATION_ATTR)
        inventory = inputs["transfer_inventory"]
        current = inventory[inventory["STATUS"] == "CURRENT"]
        validated = {k.removeprefix("validated_"): v for k, v in inputs.items() if k.startswith("validated_")}
        mapping_inputs_ = MappingInputs(
            zone=zone, validated=validated, unscheduled_visits=unscheduled_visit_numbers(dated_visits(validated)),
            randomization=inputs.get("randomization"),
            data_cutoff=dict(zip(current["SITEID"] + "/" + current["TRANSFER"], current["data_cutoff"])))
        published = settings.output.root.resolve() / "sdtm"
        subjects = None
        built: list[BuiltDataset] = []
        for mapping in mappings:
            dataset, supplemental = mapping["dataset"], mapping.get("supplemental")
            mapped = map_domain(mapping, mapping_inputs_)
            if dataset == "dm":
                mapping_inputs_.dm = mapped.frame
                subjects = mapped.frame["USUBJID"]
            source_file = metadata.raw_schema(mapping["source"])["file"]
            file_findings = inputs["findings"][inputs["findings"]["FILE"] == source_file]
            produced = [(dataset, mapped.frame, column_lineage(mapping, zone), mapped.not_mapped)]
            if supplemental:
                produced.append((supplemental["dataset"], mapped.supplemental, _supp_lineage(mapping, zone), {}))
            for name, frame, lineage, not_mapped in produced:
                frame.attrs = {"dataset": name, "source_file": source_file, "not_mapped": not_mapped, **stamp}
                built.append(BuiltDataset(name, frame, conformance_result(
                    sdtm_key(name), name, frame, None if name == "dm" else subjects), _dataset_metadata(
                    name, frame, lineage, versions[dataset], input_files[dataset], not_mapped, inventory,
                    file_findings, published, store.path_of(sdtm_key(name)).resolve())))
        yield from refuse_nonconformant([b.check for b in built])
        for dataset in built:
            store.save(sdtm_key(dataset.name), dataset.frame)
            yield dg.MaterializeResult(asset_key=sdtm_key(dataset.name), metadata=dataset.metadata)
            yield dataset.check

    return sdtm_domains
