"""What an auditor sees in Dagster for each SDTM asset, checked against the published files and
the raw exports themselves (read here independently, with the csv module).

Why: the Dagster metadata is the audit trail. A row count that is not the file's, a column
label that differs from the Parquet label, a column lineage that misses a mapped variable or
names a column that does not exist, a row-level lineage whose sha256 is not the raw file's, or a
`mesae trace` that prints another row than the one a record came from, would each tell an
auditor something false. Everything here reads the session's demo run (`demo_run`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from functools import cache
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.assets.raw import INVENTORY_COLUMNS
from pipeline.definitions import build_definitions
from pipeline.metadata import RAW_FILES, package_code_digest

ROOT = Path(__file__).resolve().parent.parent
NO_LINEAGE_ALGORITHMS = {"hardcode", "sequence"}


def sdtm_datasets() -> list[str]:
    """Every SDTM dataset the mapping files declare (SUPP-- included), read from the YAML itself."""
    out = []
    for path in sorted((ROOT / "mappings").glob("*.yaml")):
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
        out.append(mapping["dataset"])
        if "supplemental" in mapping:
            out.append(mapping["supplemental"]["dataset"])
    return out


def mapping_of(dataset: str) -> tuple[dict, bool]:
    """(the mapping file that produces `dataset`, whether it is that mapping's SUPP-- dataset)."""
    for path in sorted((ROOT / "mappings").glob("*.yaml")):
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
        if mapping["dataset"] == dataset:
            return mapping, False
        if mapping.get("supplemental", {}).get("dataset") == dataset:
            return mapping, True
    raise KeyError(dataset)


DATASETS = sdtm_datasets()


@pytest.fixture(scope="module")
def run(demo_run):
    assert demo_run.exit_code == 0, "the demo run failed; see test_demo_run.py"
    return demo_run


@pytest.fixture(scope="module")
def instance(run):
    with dg.DagsterInstance.from_config(str(run.home)) as instance:
        yield instance


@pytest.fixture(scope="module")
def materializations(instance) -> dict[str, dg.AssetMaterialization]:
    out = {}
    for dataset in DATASETS:
        event = instance.get_latest_materialization_event(dg.AssetKey(["sdtm", dataset]))
        assert event is not None, f"sdtm/{dataset} was never materialized in the demo run's instance"
        out[dataset] = event.asset_materialization
    return out


@cache
def raw_rows(exports: Path, site: str, transfer: str, file: str) -> list[dict[str, str]]:
    """Data rows of one raw file (header excluded), keyed by upper-case column name, decoded in the
    encoding its manifest declares. Independent of pipeline.transfers on purpose."""
    folder = exports / f"site-{site}" / transfer
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8-sig"))
    codec = "gb18030" if manifest["encoding"].lower() == "gb18030" else "utf-8-sig"
    text = (folder / file).read_bytes().decode(codec)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().upper() for h in next(reader)]
    return [dict(zip(header, record)) for record in reader]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- asset metadata -----------------------------------------------------------------------

@pytest.mark.parametrize("dataset", DATASETS)
def test_row_count_and_uri_are_the_published_files(run, instance, materializations, dataset):
    metadata = materializations[dataset].metadata
    path = run.output / "sdtm" / f"{dataset}.parquet"
    assert metadata["dagster/row_count"].value == pq.ParquetFile(path).metadata.num_rows
    # The value the materialization stored (what its row count counts, also when a later step
    # fails and nothing is published), and the stable path it was published as.
    stored = (run.output / ".mesae" / "assets" / "sdtm" / f"{dataset}.arrow").resolve()
    assert metadata["dagster/uri"].value == stored.as_uri()
    with pa.memory_map(str(stored)) as source:
        assert pa.ipc.open_file(source).read_all().num_rows == metadata["dagster/row_count"].value
    assert metadata["published_as"].value == (run.output.resolve() / "sdtm" / f"{dataset}.parquet").as_uri()
    # The publication names the set's own folder, which the next run leaves as it is.
    publication = instance.get_latest_materialization_event(dg.AssetKey(["reports", "publication"]))
    release = (run.output / ".mesae" / "releases" / publication.run_id).resolve()
    assert publication.asset_materialization.metadata["release_uri"].value == release.as_uri()
    assert (release / "sdtm" / f"{dataset}.parquet").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("dataset", DATASETS)
def test_column_schema_lists_every_column_with_its_sdtm_label(run, materializations, dataset):
    columns = materializations[dataset].metadata["dagster/column_schema"].schema.columns
    arrow = pq.read_schema(run.output / "sdtm" / f"{dataset}.parquet")
    assert [c.name for c in columns] == arrow.names
    for column in columns:
        label = arrow.field(column.name).metadata[b"label"].decode()
        assert column.description == label, f"{dataset}.{column.name}: Dagster says {column.description!r}, Parquet {label!r}"


def expected_lineage(dataset: str) -> dict[str, set[tuple[str, str]]]:
    """Variables that must have column lineage, from the mapping file: every variable whose
    algorithm names a `source` or `from` (not hardcode/sequence), with the raw columns it names
    directly (file.COLUMN or COLUMN of the primary file; $VARIABLE and ctx_ facts are indirect)."""
    mapping, is_supp = mapping_of(dataset)
    primary = mapping["source"]

    def direct(references) -> set[tuple[str, str]]:
        refs = set()
        for ref in [references] if isinstance(references, str) else (references or []):
            if ref.startswith("$"):
                continue
            if "." in ref:
                prefix, column = ref.split(".", 1)
                if not column.startswith("ctx_"):
                    refs.add(("sdtm/dm" if prefix == "dm" and primary != "dm" else f"raw/{prefix}", column))
            else:
                refs.add((f"raw/{primary}", ref))
        return refs

    if is_supp:
        values = set()
        for qualifier in mapping["supplemental"]["qualifiers"]:
            values |= direct(qualifier["value"].get("source"))
        return {"QVAL": values, "USUBJID": {(f"raw/{primary}", "SUBJID")}}
    return {name: direct(spec.get("source")) for name, spec in mapping["variables"].items()
            if spec["algorithm"] not in NO_LINEAGE_ALGORITHMS and ("source" in spec or "from" in spec)}


def raw_columns(file: str) -> set[str]:
    return set(yaml.safe_load((ROOT / "schemas" / "raw" / f"{file}.yaml").read_text(encoding="utf-8"))["columns"])


def sdtm_variables(dataset: str) -> set[str]:
    schema = yaml.safe_load((ROOT / "schemas" / "sdtm" / f"{dataset}.yaml").read_text(encoding="utf-8"))
    return {v["name"] for v in schema["variables"]}


@pytest.mark.parametrize("dataset", DATASETS)
def test_column_lineage_covers_every_mapped_variable(instance, materializations, dataset):
    lineage = materializations[dataset].metadata["dagster/column_lineage"].lineage.deps_by_column
    expected = expected_lineage(dataset)
    assert expected, f"no variable of {dataset} has a raw source? the expectation is broken"
    missing = sorted(set(expected) - set(lineage))
    assert missing == [], f"{dataset}: mapped variables without column lineage: {missing}"
    materialized = {k.to_user_string() for k in instance.get_asset_keys()}
    for variable, deps in lineage.items():
        found = {(d.asset_key.to_user_string(), d.column_name) for d in deps}
        assert expected.get(variable, set()) <= found, \
            f"{dataset}.{variable}: lineage {sorted(found)} lacks {sorted(expected[variable] - found)}"
        for key, column in found:
            assert key in materialized, f"{dataset}.{variable} depends on {key}, which the run did not materialize"
            if key == "sdtm/dm":
                assert column in sdtm_variables("dm"), f"{dataset}.{variable}: DM has no {column}"
            elif key == "raw/transfer_inventory":
                assert column in INVENTORY_COLUMNS, f"{dataset}.{variable}: the transfer inventory has no {column}"
            else:
                assert key.startswith("raw/") and "randomization" not in key, f"{dataset}.{variable}: {key}"
                assert column in raw_columns(key.removeprefix("raw/")), \
                    f"{dataset}.{variable}: {key} has no column {column}"


@pytest.mark.parametrize("dataset, variable, inputs", [
    # an unscheduled visit's number counts the dated visits of the subject in ex, lb and mrs (spec 2)
    ("lb", "VISITNUM", {("raw/ex", "EXSTDAT"), ("raw/mrs", "MRSDAT"), ("raw/mrs", "VISIT"), ("raw/lb", "LBDAT")}),
    ("qs", "VISITNUM", {("raw/ex", "EXSTDAT"), ("raw/lb", "LBDAT"), ("raw/lb", "VISIT")}),
    ("ex", "VISIT", {("raw/lb", "LBDAT"), ("raw/mrs", "MRSDAT")}),
    # the end of an ongoing AE is the data cut-off, the date of the manifest's exported_at
    ("ae", "AEENTPT", {("raw/transfer_inventory", "EXPORTED_AT"), ("raw/ae", "AEONGO")}),
    # --SEQ numbers the records in key order: a changed test, date or visit renumbers them
    ("lb", "LBSEQ", {("raw/lb", "SUBJID"), ("raw/lb", "LBTEST"), ("raw/lb", "LBDAT"), ("raw/lb", "VISIT")}),
    ("ae", "AESEQ", {("raw/ae", "AEDECOD"), ("raw/ae", "AESTDAT")}),
])
def test_column_lineage_names_inputs_read_from_other_files(materializations, dataset, variable, inputs):
    """Auditors read the lineage as every input that can change a value: a changed mrs.csv date
    renumbers an LB record's unscheduled visit, a changed exported_at moves AEENTPT."""
    deps = materializations[dataset].metadata["dagster/column_lineage"].lineage.deps_by_column[variable]
    assert inputs <= {(d.asset_key.to_user_string(), d.column_name) for d in deps}


def markdown_rows(markdown: str) -> list[dict[str, str]]:
    lines = [line.strip() for line in markdown.strip().splitlines() if line.strip().startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (v.strip() for v in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.parametrize("dataset", DATASETS)
def test_mapping_and_input_transfers_are_recorded(run, materializations, dataset):
    materialization = materializations[dataset]
    metadata = materialization.metadata
    mapping, _ = mapping_of(dataset)
    assert metadata["mapping_file"].value == f"mappings/{mapping['dataset']}.yaml"
    assert materialization.tags["dagster/code_version"] == \
        f"{metadata['mapping_version'].value}+{package_code_digest()[:8]}"

    # One row per site's CURRENT transfer and raw file the mapping reads, with its sha256 on disk.
    current = pq.read_table(run.output / "transfers.parquet").to_pandas()
    current = current[current["STATUS"] == "CURRENT"]
    rows = markdown_rows(metadata["input_transfers"].value)
    files = {r["file"] for r in rows}
    assert f"{mapping['source']}.csv" in files and files <= {f"{f}.csv" for f in RAW_FILES}
    if dataset == "dm":   # reference dates from ex, death from ae, last participation from lb and mrs
        assert files == {f"{f}.csv" for f in RAW_FILES}
    assert sorted((r["site"], r["transfer"], r["file"]) for r in rows) == sorted(
        (s, t, f) for s, t in zip(current["SITEID"], current["TRANSFER"]) for f in files)
    for row in rows:
        assert row["sha256"] == sha256_of(run.exports / f"site-{row['site']}" / row["transfer"] / row["file"])


def test_raw_assets_record_the_exports_version_they_read(run, instance):
    """The job observes the exports before ingesting them, so each raw materialization names the
    exports' data version it read: an observation of unchanged exports (the UI's "Observe sources")
    then finds nothing stale. Written independently of the pipeline: the hash of every transfer
    folder name and manifest, in site and folder order."""
    digest = hashlib.sha256()
    for manifest in sorted(run.exports.glob("site-*/*/manifest.json")):
        digest.update(f"{manifest.parent.parent.name.removeprefix('site-')}/{manifest.parent.name}".encode())
        digest.update(manifest.read_bytes())
    observed = instance.get_latest_data_version_record(dg.AssetKey(["exports", "site_transfers"]))
    assert observed is not None and observed.asset_observation.tags["dagster/data_version"] == digest.hexdigest()
    for name in RAW_FILES:
        tags = instance.get_latest_materialization_event(dg.AssetKey(["raw", name])).asset_materialization.tags
        assert tags["dagster/input_data_version/exports/site_transfers"] == digest.hexdigest(), name


def test_a_rejected_transfer_fails_the_transfers_check(run, instance):
    """The demo's newest site-05 transfer is still being copied (mrs.csv missing): REJECTED, and the
    catalog's check on the transfer inventory says so, not only the quarantine."""
    key = dg.AssetCheckKey(dg.AssetKey(["raw", "transfer_inventory"]), "transfers_accepted")
    record = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]
    evaluation = record.event.dagster_event.event_specific_data
    inventory = pq.read_table(run.output / "transfers.parquet").to_pandas()
    rejected = inventory[inventory["STATUS"] == "REJECTED"]
    assert len(rejected) == 1 and not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN and evaluation.description == "1 transfer folder(s) rejected"
    table = evaluation.metadata["rejected"].value
    assert rejected["TRANSFER"].iloc[0] in table and "TRF-MISSING-FILE" in table and "mrs.csv" in table


def code_versions(defs: dg.Definitions) -> dict[str, str]:
    graph = defs.resolve_asset_graph()
    return {d: graph.get(dg.AssetKey(["sdtm", d])).code_version for d in DATASETS}


def test_materialized_code_version_is_the_definitions_code_version(tmp_path, materializations):
    """Otherwise the UI would flag every SDTM asset as changed code right after a run."""
    versions = code_versions(build_definitions(tmp_path / "e", tmp_path / "o"))
    assert {d: m.tags["dagster/code_version"] for d, m in materializations.items()} == versions


def test_code_version_follows_its_own_mapping_only(tmp_path, monkeypatch):
    """Editing mappings/lb.yaml changes the code version of sdtm/lb and nothing else; editing
    mappings/ae.yaml changes sdtm/ae and sdtm/suppae (same mapping), not sdtm/lb."""
    root = tmp_path / "metadata"
    shutil.copytree(ROOT / "schemas", root / "schemas")
    shutil.copytree(ROOT / "mappings", root / "mappings")
    original = code_versions(build_definitions(tmp_path / "e", tmp_path / "o"))
    monkeypatch.setenv("MESAE_METADATA_ROOT", str(root))
    copied = code_versions(build_definitions(tmp_path / "e", tmp_path / "o"))
    assert copied == original, "an identical copy of the metadata must give identical code versions"

    def edit(file: str, old: str, new: str) -> None:
        path = root / "mappings" / file
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{file} no longer contains {old!r}; update this test"
        path.write_text(text.replace(old, new), encoding="utf-8")

    edit("lb.yaml", "LBORRESU: {algorithm: assign, source: LBORRESU}",
         'LBORRESU: {algorithm: assign, source: LBORRESU, note: "unit as printed by the local lab"}')
    after_lb = code_versions(build_definitions(tmp_path / "e", tmp_path / "o"))
    assert {d for d in DATASETS if after_lb[d] != copied[d]} == {"lb"}

    edit("ae.yaml", "AETERM:   {algorithm: assign, source: AETERM}",
         'AETERM:   {algorithm: assign, source: AETERM, note: "verbatim, as reported"}')
    after_ae = code_versions(build_definitions(tmp_path / "e", tmp_path / "o"))
    assert {d for d in DATASETS if after_ae[d] != after_lb[d]} == {"ae", "suppae"}


def test_code_version_follows_the_package_code(tmp_path):
    """A derivation change (here the study day) must change every SDTM asset's code version, not
    only run.json's: the asset's version ends with the digest of the package code."""
    copies = [tmp_path / "same", tmp_path / "edited"]
    for copy in copies:
        shutil.copytree(ROOT / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    study_day = copies[1] / "pipeline" / "derivations" / "study_day.py"
    study_day.write_text(study_day.read_text(encoding="utf-8") + "\n# one more line\n", encoding="utf-8")
    unchanged = package_code_digest(copies[0])
    assert package_code_digest(copies[1]) != unchanged
    assert unchanged == package_code_digest()
    versions = code_versions(build_definitions(tmp_path / "e", tmp_path / "o"))
    assert all(v.endswith(f"+{unchanged[:8]}") for v in versions.values()), versions


# --- row-level lineage --------------------------------------------------------------------

@pytest.mark.parametrize("dataset", DATASETS)
def test_row_lineage_points_at_the_raw_row_with_its_sha256(run, dataset):
    """Every SDTM record has a lineage row (site, transfer, file, row, sha256); the sha256 is the
    raw file's on disk, and the raw row it names belongs to the record's subject."""
    lineage = pq.read_table(run.output / "lineage" / f"{dataset}.parquet").to_pandas()
    records = pq.read_table(run.output / "sdtm" / f"{dataset}.parquet").to_pandas()
    assert len(lineage) == len(records) > 0
    assert list(lineage["USUBJID"]) == list(records["USUBJID"])
    for column in ("SITEID", "TRANSFER", "FILE", "ROW", "SHA256"):
        assert lineage[column].notna().all(), f"{dataset} lineage has rows without {column}"
    for (site, transfer, file, sha), group in lineage.groupby(["SITEID", "TRANSFER", "FILE", "SHA256"]):
        assert sha == sha256_of(run.exports / f"site-{site}" / transfer / file), f"{site}/{transfer}/{file}"
        rows = raw_rows(run.exports, site, transfer, file)
        assert group["ROW"].between(1, len(rows)).all()
        subjects = [rows[row - 1]["SUBJID"] for row in group["ROW"]]
        assert ["MESAE-" + s for s in subjects] == list(group["USUBJID"]), \
            f"{dataset}: a lineage row of {site}/{transfer}/{file} names another subject's raw row"


@pytest.mark.parametrize("dataset", [d for d in DATASETS if mapping_of(d)[1]])
def test_a_qualifier_traces_to_the_raw_file_its_value_comes_from(run, dataset):
    """SUPPDM's enrol.* qualifiers come from enrol.csv, not from the parent DM record's dm.csv: the
    file is the one the mapping file names for the qualifier, and a copied value is the raw text."""
    mapping, _ = mapping_of(dataset)
    lineage = pq.read_table(run.output / "lineage" / f"{dataset}.parquet").to_pandas()
    records = pq.read_table(run.output / "sdtm" / f"{dataset}.parquet").to_pandas()
    for qualifier in mapping["supplemental"]["qualifiers"]:
        source = qualifier["value"]["source"]
        file, column = source.split(".", 1) if "." in source else (mapping["source"], source)
        mine = records["QNAM"] == qualifier["qnam"]
        assert mine.any(), qualifier["qnam"]
        assert set(lineage.loc[mine, "FILE"]) == {f"{file}.csv"}, qualifier["qnam"]
        if qualifier["value"]["algorithm"] == "assign":
            for origin, qval in zip(lineage[mine].itertuples(), records.loc[mine, "QVAL"]):
                raw = raw_rows(run.exports, origin.SITEID, origin.TRANSFER, origin.FILE)[origin.ROW - 1]
                assert raw[column] == qval, (qualifier["qnam"], origin)


def trace_block(run, usubjid: str, seq: int, capsys) -> str:
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["trace", usubjid, "LB", str(seq), "--output", str(run.output), "--exports", str(run.exports)])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_trace_prints_the_raw_row_of_an_lb_record(run, capsys):
    """`mesae trace USUBJID LB SEQ` prints the raw lb.csv row the record came from: checked on the
    first LB record of every site (UTF-8, gb18030, BOM, lower-case and shuffled headers)."""
    lb = pq.read_table(run.output / "sdtm" / "lb.parquet").to_pandas()
    lineage = pq.read_table(run.output / "lineage" / "lb.parquet").to_pandas()
    joined = lb.join(lineage[["SITEID", "TRANSFER", "FILE", "ROW"]])
    order = list(yaml.safe_load((ROOT / "schemas" / "raw" / "lb.yaml").read_text(encoding="utf-8"))["columns"])
    firsts = joined.groupby("SITEID", sort=True).head(1)
    assert len(firsts) >= 5
    for record in firsts.itertuples(index=False):
        raw = raw_rows(run.exports, record.SITEID, record.TRANSFER, record.FILE)[record.ROW - 1]
        # The record really is that row's: same subject, same original result.
        assert raw["SUBJID"] == record.USUBJID.removeprefix("MESAE-")
        assert (raw["LBORRES"] or None) == record.LBORRES
        out = trace_block(run, record.USUBJID, int(record.LBSEQ), capsys)
        path = run.exports / f"site-{record.SITEID}" / record.TRANSFER / record.FILE
        assert f"LB {record.USUBJID} SEQ {int(record.LBSEQ)} <- {path} data row {record.ROW} (sha256 matches)" in out
        expected = "\n".join(f"  {column:10} {raw.get(column, '')}" for column in order)
        assert expected in out, f"trace printed\n{out}\nexpected the raw row\n{expected}"
        # ... beside the SDTM record itself
        assert f"  LBSEQ      {int(record.LBSEQ)}\n" in out and f"  LBORRES    {record.LBORRES or ''}\n" in out


def test_trace_of_an_unknown_record_is_a_one_line_error(run, capsys):
    from pipeline.cli import main

    code = main(["trace", "MESAE-99-999", "LB", "1", "--output", str(run.output), "--exports", str(run.exports)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "MESAE-99-999" in err


def test_trace_from_another_folder_names_the_exports_it_looked_for(run, tmp_path, monkeypatch, capsys):
    """The --exports default is relative: run from elsewhere, it is not found, not 'unreadable'."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["trace", "MESAE-01-001", "LB", "1", "--output", str(run.output)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"exports folder demo/exports not found (from {tmp_path})" in err and "--exports" in err


def test_trace_of_a_missing_record_says_where_to_look(run, capsys):
    """"DM has no record" for a held-back subject did not point to the quarantine, nor, for a
    renumbered --SEQ, to the subject's records."""
    import pandas as pd

    from pipeline.cli import main

    lb = pd.read_parquet(run.output / "sdtm" / "lb.parquet")
    subject = lb["USUBJID"].iloc[0]
    seqs = lb.loc[lb["USUBJID"] == subject, "LBSEQ"]
    assert main(["trace", subject, "LB", "9999", "--output", str(run.output), "--exports", str(run.exports)]) == 2
    assert f"(its records have SEQ {seqs.min()} to {seqs.max()}" in capsys.readouterr().err
    quarantine = pd.read_parquet(run.output / "quarantine.parquet")
    errors = quarantine[quarantine["SEVERITY"].eq("ERROR") & quarantine["SUBJID"].notna()]
    cases = [(domain, file, subjid) for domain, file in [("LB", "lb.csv"), ("QS", "mrs.csv"), ("AE", "ae.csv"),
                                                          ("EX", "ex.csv")]
             for subjid in sorted(set(errors.loc[errors["FILE"] == file, "SUBJID"]) - set(
                 pd.read_parquet(run.output / "sdtm" / f"{domain.lower()}.parquet")["USUBJID"].str.removeprefix("MESAE-")))]
    domain, file, held = cases[0]          # a subject whose only records in that file are held back
    assert main(["trace", f"MESAE-{held}", domain, "1", "--output", str(run.output), "--exports", str(run.exports)]) == 2
    err = capsys.readouterr().err
    count = len(errors.loc[(errors["SUBJID"] == held) & (errors["FILE"] == file), ["FILE", "ROW"]].drop_duplicates())
    assert f"; {count} of the subject's records in {file} are held back (ERROR findings in" in err, err
    assert main(["trace", "01-001", "DM", "1", "--output", str(run.output), "--exports", str(run.exports)]) == 2
    assert "(a USUBJID is MESAE-<SUBJID>, e.g. MESAE-01-001)" in capsys.readouterr().err


def test_trace_of_a_row_gone_from_a_changed_file_is_a_one_line_error(run, tmp_path, capsys):
    """The raw file was cut short after the run: the record's row is not there any more."""
    from pipeline.cli import main

    lineage = pq.read_table(run.output / "lineage" / "lb.parquet").to_pandas()
    last = lineage.sort_values("ROW").iloc[-1]
    exports = tmp_path / "exports"
    shutil.copytree(run.exports, exports)
    path = exports / f"site-{last.SITEID}" / last.TRANSFER / last.FILE
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))
    code = main(["trace", last.USUBJID, "LB", str(int(last.SEQ)), "--output", str(run.output), "--exports", str(exports)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path} has no readable data row {int(last.ROW)} any more" in err and last.SHA256 in err


def test_trace_of_a_changed_row_prints_todays_values_and_fails(run, tmp_path, capsys):
    """A value edited in the raw file after the run: trace shows it, says the file changed, and
    exits 1, so that a script collecting evidence cannot take today's value for the source."""
    from pipeline.cli import main

    lineage = pq.read_table(run.output / "lineage" / "lb.parquet").to_pandas()
    hit = lineage.iloc[0]
    exports = tmp_path / "exports"
    shutil.copytree(run.exports, exports)
    path = exports / f"site-{hit.SITEID}" / hit.TRANSFER / hit.FILE
    manifest = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8-sig"))
    codec = "gb18030" if manifest["encoding"].lower() == "gb18030" else "utf-8-sig"
    text = path.read_bytes().decode(codec)
    records = list(csv.reader(io.StringIO(text, newline="")))
    column = [h.strip().upper() for h in records[0]].index("LBREASND")
    records[hit.ROW][column] = "EDITED AFTER THE RUN"
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n").writerows(records)
    path.write_bytes(out.getvalue().encode(codec))
    capsys.readouterr()
    code = main(["trace", hit.USUBJID, "LB", str(int(hit.SEQ)), "--output", str(run.output), "--exports", str(exports)])
    captured = capsys.readouterr()
    assert code == 1
    assert "CHANGED since the run" in captured.out and "EDITED AFTER THE RUN" in captured.out
    assert captured.err.count("\n") == 1 and f"{path} changed since the run" in captured.err


def test_demo_into_a_file_is_a_one_line_error(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "taken").write_text("a file, not a folder")
    code = main(["demo", "--dir", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot write the demo trial" in err, err


def test_trace_of_an_unknown_dataset_names_the_known_ones(run, capsys):
    from pipeline.cli import main

    code = main(["trace", "MESAE-01-001", "XX", "1", "--output", str(run.output), "--exports", str(run.exports)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown dataset 'XX'" in err and "LB" in err, err
