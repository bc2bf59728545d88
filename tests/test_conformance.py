"""SDTM conformance checks of our own outputs: each rule catches its defect, and a broken mapping
stops publication (the run fails, the previous outputs stay byte for byte)."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline.metadata import PROJECT_ROOT
from pipeline.validation.sdtm_conformance import conformance_failures


@pytest.fixture(scope="module")
def golden_lb(tmp_path_factory):
    """A conformant LB and DM from the hand-written golden trial."""
    root = tmp_path_factory.mktemp("conf")
    shutil.copytree(Path(__file__).parent / "golden" / "exports", root / "exports")
    assert run_cli("run", "--exports", str(root / "exports"), "--output", str(root / "output"), home=root / "home") == 0
    read = lambda d: pq.read_table(root / "output" / "sdtm" / f"{d}.parquet").to_pandas()  # noqa: E731
    lb, dm = read("lb"), read("dm")
    lb["LBSEQ"] = lb["LBSEQ"].astype("Int64")
    lb["LBDY"] = lb["LBDY"].astype("Int64")
    for column in lb.columns[lb.dtypes == object]:
        lb[column] = lb[column].astype("str")
    return lb, dm["USUBJID"]


def rules_for(frame, subjects):
    return set(conformance_failures("lb", frame, subjects)["rule"])


def test_conformant_dataset_passes(golden_lb):
    lb, subjects = golden_lb
    assert rules_for(lb, subjects) == set()


@pytest.mark.parametrize("breakage, rule", [
    (lambda f: f.assign(LBTESTCD=f["LBTESTCD"].where(f.index != 0, None)), "SDTM-REQUIRED"),
    (lambda f: f.assign(LBTESTCD=f["LBTESTCD"].where(f.index != 0, "NOTACODE")), "SDTM-CODELIST"),
    (lambda f: f.assign(LBDTC=f["LBDTC"].where(f.index != 0, "05/03/2026")), "SDTM-ISO8601"),
    (lambda f: f.assign(LBDY=f["LBDY"].where(f.index != 0, 0)), "SDTM-DY-ZERO"),
    (lambda f: pd.concat([f, f.iloc[[0]]], ignore_index=True), "SDTM-UNIQUE-KEYS"),
    (lambda f: f.assign(LBSEQ=pd.Series([1] * len(f), dtype="Int64")), "SDTM-SEQ"),
    (lambda f: f.assign(USUBJID=f["USUBJID"].where(f.index != 0, "MESAE-09-999")), "SDTM-DM-SUBJECT"),
    (lambda f: f.assign(LBSTRESU=f["LBSTRESU"].where(f.index != 0, "g/dL")), "SDTM-STD-UNIT"),
    (lambda f: f.assign(LBSTRESN=f["LBSTRESN"].astype("str")), "SDTM-TYPE"),
    (lambda f: f[list(reversed(f.columns))], "SDTM-VARIABLES"),
])
def test_each_conformance_rule_catches_its_defect(golden_lb, breakage, rule):
    lb, subjects = golden_lb
    assert rule in rules_for(breakage(lb.copy()), subjects)


def snapshot(output: Path) -> dict[str, bytes]:
    """Every published file as a reader sees it through the contract's paths (symlinks followed)."""
    files = {}
    for folder, dirs, names in os.walk(output, followlinks=True):
        dirs[:] = [d for d in dirs if d not in (".mesae", "current")]
        for name in names:
            path = Path(folder) / name
            files[path.relative_to(output).as_posix()] = path.read_bytes()
    return files


def _latest_materialization_runs(home: Path) -> dict[str, str]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        return {d: instance.get_latest_materialization_event(dg.AssetKey(["sdtm", d])).run_id
                for d in ("dm", "lb", "qs")}


def _latest_check_results(home: Path) -> dict[str, tuple[str, bool, bool]]:
    """Per dataset, the newest sdtm_conformance evaluation: (run, passed, description)."""
    import dagster as dg

    results = {}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for dataset in ("dm", "lb", "qs"):
            key = dg.AssetCheckKey(dg.AssetKey(["sdtm", dataset]), "sdtm_conformance")
            record = next(r for r in instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
                          if r.event.dagster_event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            evaluation = record.event.dagster_event.event_specific_data
            results[dataset] = (record.run_id, evaluation.passed, evaluation.description)
    return results


def _reports_only(exports: Path, output: Path, home: Path):
    """What "Materialize" on the reports group in the UI runs: reports/* alone."""
    import dagster as dg

    from pipeline.definitions import JOB_NAME, build_definitions

    defs = build_definitions(exports, output, "blinded")
    keys = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[0] == "reports"]
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return defs.resolve_job_def(JOB_NAME).execute_in_process(
            instance=instance, asset_selection=keys, raise_on_error=False, run_config=quiet)


def test_broken_mapping_fails_the_run_and_keeps_previous_outputs(tmp_path, capsys):
    from pipeline.synthetic_trial import generate_trial

    generate_trial(tmp_path / "exports", subjects=5, transfers=1)
    output, home = tmp_path / "output", tmp_path / "home"
    assert run_cli("run", "--exports", str(tmp_path / "exports"), "--output", str(output), home=home) == 0
    before = snapshot(output)
    assert "sdtm/lb.parquet" in before
    materialized = _latest_materialization_runs(home)
    stored = {p: p.stat().st_mtime_ns for p in (output / ".mesae" / "assets" / "sdtm").glob("*.arrow")}
    assert len(stored) == 7

    broken = tmp_path / "metadata"
    shutil.copytree(PROJECT_ROOT / "schemas", broken / "schemas")
    shutil.copytree(PROJECT_ROOT / "mappings", broken / "mappings")
    mapping = (broken / "mappings" / "lb.yaml").read_text()
    (broken / "mappings" / "lb.yaml").write_text(mapping.replace(
        "LBTESTCD: {algorithm: lab_test_code, source: LBTEST}", "LBTESTCD: {algorithm: assign, source: LBTEST}"))
    os.environ["MESAE_METADATA_ROOT"] = str(broken)
    try:
        code = run_cli("run", "--exports", str(tmp_path / "exports"), "--output", str(output), home=home)
        err = capsys.readouterr().err
        # The rejected datasets were neither stored nor materialized: the catalog still describes
        # the published ones, and a later run of reports/* alone has nothing rejected to publish.
        assert {p: p.stat().st_mtime_ns for p in stored} == stored
        assert _latest_materialization_runs(home) == materialized
        # The check's history records the failed evaluation, saying it was blocked; the datasets that
        # passed keep the evaluation of what is published.
        checks = _latest_check_results(home)
        assert checks["lb"][0] not in materialized.values() and not checks["lb"][1]
        assert checks["lb"][2].startswith("blocked, not stored or materialized")
        assert {d: checks[d][:2] for d in ("dm", "qs")} == {d: (materialized[d], True) for d in ("dm", "qs")}
        reports_only = _reports_only(tmp_path / "exports", output, home)
    finally:
        del os.environ["MESAE_METADATA_ROOT"]
    assert code == 1
    assert "sdtm_conformance failed on sdtm/lb" in err and "SDTM-CODELIST" in err
    assert "pipeline bug" in err and "Traceback" not in err
    assert snapshot(output) == before
    # It is refused: the stored SDTM datasets were built by other code than the findings of the blocked run.
    assert not reports_only.success
    failure = reports_only.get_step_failure_events()[0].event_specific_data.error
    assert "would mix code versions" in str(failure.cause or failure)
    assert snapshot(output) == before
