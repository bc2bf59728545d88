"""The Dagster definitions of both blinding zones: they load, their asset graph matches the
reviewed snapshot, and the blinded graph has no asset that can read unblinded data.

The snapshots (tests/snapshots/asset_graph_<zone>.json) list every asset key with its upstream
keys, and every asset check key. Asset keys are part of the external contract (schedules,
sensors and auditors' bookmarks refer to them), so a change of lineage must show up in review as
a diff of these files, not slip in unnoticed. After an intended change, regenerate them with

    MESAE_UPDATE_SNAPSHOTS=1 /work/venv/bin/pytest tests/test_asset_graph.py

and commit the JSON diff together with the code change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from pipeline.definitions import JOB_NAME, build_definitions

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MESAE_UPDATE_SNAPSHOTS", "") == "1"
ZONES = ("blinded", "unblinded")
CONTRACT_RAW = {f"raw/{f}" for f in ("dm", "enrol", "ex", "ae", "lb", "mrs")}
CONTRACT_SDTM = {f"sdtm/{d}" for d in ("dm", "ex", "ae", "lb", "qs")}


def _definitions(tmp_path: Path, zone: str) -> dg.Definitions:
    # The folders need not exist: loading definitions must not touch the data (the UI loads them
    # on a machine where the nightly copy may not have arrived yet).
    return build_definitions(tmp_path / "exports", tmp_path / "output", zone)


def graph_snapshot(defs: dg.Definitions) -> dict:
    """Every asset key with its sorted upstream keys, and every asset check key, as plain JSON."""
    graph = defs.resolve_asset_graph()
    assets = {key.to_user_string(): sorted(parent.to_user_string() for parent in graph.get(key).parent_keys)
              for key in graph.get_all_asset_keys()}
    checks = sorted(check.to_user_string() for check in graph.asset_check_keys)
    return {"assets": dict(sorted(assets.items())), "asset_checks": checks}


@pytest.mark.parametrize("zone", ZONES)
def test_definitions_load_for_each_zone(tmp_path, zone):
    """Both zones load with the job, the nightly schedule and both sensors, and the contract's keys."""
    defs = _definitions(tmp_path, zone)
    job = defs.resolve_job_def(JOB_NAME)
    assert job.tags.get("mesae/zone") == zone
    assert defs.resolve_schedule_def("nightly").job_name == JOB_NAME
    assert defs.resolve_sensor_def("new_transfer_sensor").job_name == JOB_NAME
    # Nothing starts runs until a data manager switches it on; the advice on failures is on.
    assert defs.resolve_schedule_def("nightly").default_status == dg.DefaultScheduleStatus.STOPPED
    assert defs.resolve_sensor_def("new_transfer_sensor").default_status == dg.DefaultSensorStatus.STOPPED
    assert defs.resolve_sensor_def("failure_guidance").default_status == dg.DefaultSensorStatus.RUNNING
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert CONTRACT_RAW <= keys, f"contract raw/<file> keys missing: {sorted(CONTRACT_RAW - keys)}"
    assert CONTRACT_SDTM <= keys, f"contract sdtm/<domain> keys missing: {sorted(CONTRACT_SDTM - keys)}"
    assert "reports/publication" in keys


@pytest.mark.parametrize("zone", ZONES)
def test_asset_graph_matches_snapshot(tmp_path, zone):
    """The lineage (assets, upstream keys, checks) equals the reviewed snapshot of the zone."""
    actual = graph_snapshot(_definitions(tmp_path, zone))
    path = SNAPSHOTS / f"asset_graph_{zone}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=2) + "\n", encoding="utf-8")
    if not path.exists():
        pytest.fail(f"{path} is missing; create it with MESAE_UPDATE_SNAPSHOTS=1 and review it")
    expected = json.loads(path.read_text(encoding="utf-8"))
    added = sorted(set(actual["assets"]) - set(expected["assets"]))
    removed = sorted(set(expected["assets"]) - set(actual["assets"]))
    changed = sorted(k for k in set(actual["assets"]) & set(expected["assets"])
                     if actual["assets"][k] != expected["assets"][k])
    assert (added, removed, changed) == ([], [], []), (
        f"{zone} asset graph differs from {path.name}: added {added}, removed {removed}, upstream changed {changed}. "
        "If intended, regenerate with MESAE_UPDATE_SNAPSHOTS=1 and commit the diff.")
    assert actual["asset_checks"] == expected["asset_checks"], (
        f"{zone} asset checks differ from {path.name}; if intended, regenerate with MESAE_UPDATE_SNAPSHOTS=1")


def test_blinded_graph_reads_no_unblinded_data(tmp_path):
    """The blinded zone differs from the unblinded one in code: no randomization asset, no edge to one."""
    blinded = graph_snapshot(_definitions(tmp_path, "blinded"))
    unblinded = graph_snapshot(_definitions(tmp_path, "unblinded"))
    # The test would be empty if the unblinded zone had no randomization asset to leave out.
    assert {"raw/randomization", "validated/randomization"} <= set(unblinded["assets"])
    leaks = [key for key, upstream in blinded["assets"].items()
             if "randomization" in key or any("randomization" in u for u in upstream)]
    assert leaks == [], f"blinded assets that read unblinded data: {leaks}"
    assert not [c for c in blinded["asset_checks"] if "randomization" in c]
    # Apart from the randomization assets the zones publish the same asset keys.
    assert set(unblinded["assets"]) - set(blinded["assets"]) == {"raw/randomization", "validated/randomization"}
