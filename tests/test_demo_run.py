"""The whole pipeline on the default synthetic trial: what a biostatistician and a data manager
rely on every morning (pipeline-contract.md sections 2 to 4)."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from site_exports import SPEC_COLUMNS

DATASETS = ["dm", "ex", "ae", "lb", "qs", "suppdm", "suppae"]


def read(run, relative):
    return pq.read_table(run.output / relative).to_pandas()


def raw_rows(run, file):
    """Every data row of `file` in the CURRENT transfers, read with the csv module (an oracle
    independent of the pipeline's reader)."""
    import csv
    import io

    inventory = read(run, "transfers.parquet")
    frames = []
    for row in inventory[inventory["STATUS"] == "CURRENT"].itertuples():
        folder = run.exports / f"site-{row.SITEID}" / row.TRANSFER
        manifest = json.loads((folder / "manifest.json").read_text())
        text = (folder / file).read_bytes().decode("gb18030" if manifest["encoding"] == "gb18030" else "utf-8-sig")
        records = list(csv.reader(io.StringIO(text, newline="")))
        header = [h.strip().upper() for h in records[0]]
        frame = pd.DataFrame([dict(zip(header, r)) for r in records[1:] if r])
        frame["SITEID"], frame["TRANSFER"], frame["ROW"] = row.SITEID, row.TRANSFER, range(1, len(frame) + 1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_run_publishes(demo_run):
    assert demo_run.exit_code == 0
    for dataset in DATASETS:
        assert (demo_run.output / "sdtm" / f"{dataset}.parquet").is_file()
    for name in ["quarantine.parquet", "transfers.parquet", "run.json"]:
        assert (demo_run.output / name).is_file()


def test_every_consented_subject_is_in_dm(demo_run):
    dm = read(demo_run, "sdtm/dm.parquet")
    consented = raw_rows(demo_run, "dm.csv")["SUBJID"]
    assert sorted(dm["SUBJID"]) == sorted(consented)
    assert (dm["USUBJID"] == "MESAE-" + dm["SUBJID"]).all()
    assert set(dm["SITEID"]) == set(dm["SUBJID"].str[:2])
    screen_failures = demo_run.trial.subjects.query("ENRLFL == 'N'")["SUBJID"]
    assert (dm.set_index("SUBJID").loc[list(screen_failures), "ARMNRS"] == "SCREEN FAILURE").all()


def test_row_accounting_closes_for_every_file(demo_run):
    summary = json.loads((demo_run.output / "run.json").read_text())
    assert summary["zone"] == "blinded" and summary["studyid"] == "MESAE"
    for file in SPEC_COLUMNS:
        rows = summary["rows"][file]
        assert rows["read"] == len(raw_rows(demo_run, file)), file
        assert rows["read"] == rows["mapped"] + rows["held_back"] + rows["not_mapped"], file
    missed = (raw_rows(demo_run, "ex.csv")["EXYN"].str.upper().isin(["N", "NO"])).sum()
    assert summary["rows"]["ex.csv"]["not_mapped"] == missed > 0
    assert list(summary["not_mapped_reasons"]["ex.csv"]) == ["dose not given (EXYN = N): EX holds administrations only"]


def test_quarantine_is_exactly_the_planted_findings(demo_run):
    quarantine = read(demo_run, "quarantine.parquet")
    key = ["SITEID", "TRANSFER", "FILE", "ROW", "SUBJID", "RULE", "SEVERITY"]

    def rows(frame):
        return sorted(tuple("" if pd.isna(v) else str(int(v)) if isinstance(v, float) else str(v) for v in r)
                      for r in frame[key].itertuples(index=False))

    assert rows(quarantine) == rows(demo_run.trial.planted)
    assert quarantine["MESSAGE"].str.len().gt(20).all()


def test_held_back_records_are_not_in_sdtm(demo_run):
    lineage = read(demo_run, "lineage/lb.parquet")
    errors = read(demo_run, "quarantine.parquet").query("SEVERITY == 'ERROR' and FILE == 'lb.csv'")
    held = set(zip(errors["SITEID"], errors["TRANSFER"], errors["ROW"].astype(int)))
    mapped = set(zip(lineage["SITEID"], lineage["TRANSFER"], lineage["ROW"]))
    assert held and not held & mapped


@pytest.mark.parametrize("dataset", DATASETS)
def test_parquet_conventions(demo_run, dataset):
    from pipeline.sdtm_datasets import dataset_schema

    schema = dataset_schema(dataset)
    table = pq.read_table(demo_run.output / "sdtm" / f"{dataset}.parquet")
    assert table.column_names == [v["name"] for v in schema["variables"]]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["label"] == schema["label"] and meta["studyid"] == "MESAE"
    assert meta["keys"] == ",".join(schema["keys"]) and meta["domain"] == schema["domain"]
    for field, variable in zip(table.schema, schema["variables"]):
        assert field.metadata[b"label"].decode() == variable["label"]
        arrow = {"int64": "int64", "float64": "double"}[variable.get("arrow", "float64")] if variable["type"] == "Num" else None
        expected = ("string", "large_string") if variable["type"] == "Char" else (arrow,)
        assert str(field.type) in expected, (field.name, field.type)
    frame = table.to_pandas()
    for column in frame.columns[frame.dtypes == object]:
        assert not frame[column].eq("").any(), f"{column} holds empty strings instead of nulls"
    sort_keys = [k for k in schema["keys"] if k in frame.columns]
    resorted = frame.sort_values(sort_keys, kind="stable", na_position="last")
    assert resorted.index.equals(frame.index), "rows are not sorted by the domain keys"


@pytest.mark.parametrize("dataset, unique", [("dm", ["USUBJID"]), ("ex", ["USUBJID", "VISITNUM"]),
                                             ("ae", ["USUBJID", "AESPID"]), ("lb", ["USUBJID", "LBTESTCD", "LBSPEC", "VISITNUM", "LBDTC"]),
                                             ("qs", ["USUBJID", "QSTESTCD", "VISITNUM", "QSEVINTX"])])
def test_no_duplicate_keys_or_sequence_numbers_or_day_zero(demo_run, dataset, unique):
    frame = read(demo_run, f"sdtm/{dataset}.parquet")
    assert not frame.duplicated(unique).any()
    seq = [c for c in frame.columns if c.endswith("SEQ")]
    for column in seq:
        assert not frame.duplicated(["USUBJID", column]).any()
        assert (frame.groupby("USUBJID")[column].min() == 1).all()
    for column in [c for c in frame.columns if c.endswith("DY")]:
        assert not (frame[column] == 0).any()


def test_every_lab_result_has_its_standard_unit(demo_run):
    lb = read(demo_run, "sdtm/lb.parquet")
    numeric = lb[lb["LBSTRESN"].notna()]
    expected = {"NEUT": "10^9/L", "LYM": "10^9/L", "WBC": "10^9/L", "HGB": "g/L", "PLAT": "10^9/L", "AST": "U/L",
                "ALT": "U/L", "BILI": "umol/L", "CREAT": "umol/L", "GLUC": "mmol/L", "APTT": "sec", "HBVDNA": "IU/mL"}
    with_unit = numeric[numeric["LBTESTCD"] != "INR"]
    assert (with_unit["LBSTRESU"] == with_unit["LBTESTCD"].map(expected)).all()
    assert numeric.loc[numeric["LBTESTCD"] == "INR", "LBSTRESU"].isna().all()
    not_done = lb[lb["LBSTAT"] == "NOT DONE"]
    assert len(not_done) and not_done["LBORRES"].isna().all() and not_done["LBSTRESC"].isna().all()


def test_blinded_expansion(demo_run):
    dm = read(demo_run, "sdtm/dm.parquet").set_index("SUBJID")
    ex = read(demo_run, "sdtm/ex.parquet")
    expansion = demo_run.trial.subjects.query("PHASE == 'EXPANSION'")["SUBJID"]
    for variable in ["ARMCD", "ARM", "ACTARMCD", "ACTARM"]:
        assert set(dm.loc[list(expansion), variable].dropna()) == {"BLINDED"}
    doses = ex[ex["USUBJID"].isin("MESAE-" + expansion)]
    assert (doses["EXTRT"] == "BLINDED TREATMENT").all() and doses["EXDOSE"].isna().all()
    escalation = ex[~ex["USUBJID"].isin("MESAE-" + expansion)]
    assert (escalation["EXTRT"] == "HUC-MSC-EXO").all() and escalation["EXDOSE"].notna().all()
    assert set(ex["EXROUTE"]) == {"NASAL"}
    # EXDOSU is the unit of EXDOSE (SDTMIG): none without a dose, so none for a blinded one.
    assert doses["EXDOSU"].isna().all() and (escalation["EXDOSU"] == "PARTICLES").all()


def test_runs_are_recorded_in_the_dagster_instance(demo_run):
    import dagster as dg

    from pipeline.assets.raw import RAW_KEYS

    import os
    os.environ["DAGSTER_HOME"] = str(demo_run.home)
    with dg.DagsterInstance.get() as instance:
        for key in RAW_KEYS.values():
            assert instance.get_latest_materialization_event(key) is not None, key
        records = instance.get_run_records()
        assert records and records[0].dagster_run.job_name == "mesae_nightly"
