"""Code and data versions in the Dagster catalog, over several nights.

Why: an auditor reads "what changed" from the catalog. Every asset must carry a code version that
changes exactly when something it is built from changed (a raw-contract rule shows on
validated/*, not only in run.json), and data versions must follow the content: the same on a
rerun over the same transfers (a rerun is "a no-op in content"), new when a transfer arrives or is
rejected. A run started without the job's observation step (the UI's "Materialize all") must
record the exports it read, not the last ones observed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from conftest import run_cli
from pipeline.definitions import JOB_NAME, build_definitions

ROOT = Path(__file__).resolve().parent.parent
EXPORTS = dg.AssetKey(["exports", "site_transfers"])


def code_versions(tmp_path: Path) -> dict[str, str | None]:
    graph = build_definitions(tmp_path / "e", tmp_path / "o").resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).code_version for key in graph.materializable_asset_keys}


def test_every_asset_has_a_code_version_that_follows_the_metadata_it_reads(tmp_path, monkeypatch):
    original = code_versions(tmp_path)
    assert original and all(original.values()), [k for k, v in original.items() if not v]
    root = tmp_path / "metadata"
    shutil.copytree(ROOT / "schemas", root / "schemas")
    shutil.copytree(ROOT / "mappings", root / "mappings")
    monkeypatch.setenv("MESAE_METADATA_ROOT", str(root))
    assert code_versions(tmp_path) == original, "an identical copy of the metadata must give identical versions"

    def changed_by(file: str) -> set[str]:
        before = code_versions(tmp_path)
        with (root / file).open("a", encoding="utf-8") as handle:
            handle.write("\n# reviewed\n")
        after = code_versions(tmp_path)
        return {key.split("/")[0] for key in after if after[key] != before[key]}

    # the raw contract: read by the ingest (columns) and the validation; the SDTM step reads
    # validated/*, whose versions carry the change to it
    assert changed_by("schemas/raw/mrs.yaml") == {"raw", "validated", "reports"}
    assert changed_by("schemas/protocol.yaml") == {"reports"}
    assert changed_by("schemas/terminology/codelists.yaml") == {"validated", "sdtm", "reports"}
    assert changed_by("mappings/qs.yaml") == {"sdtm", "reports"}


def _versions(home: Path) -> dict[str, str]:
    """The newest data version of every materialized asset."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        out = {}
        for key in instance.get_asset_keys():
            if key == EXPORTS:
                continue
            event = instance.get_latest_materialization_event(key)
            out[key.to_user_string()] = event.asset_materialization.tags["dagster/data_version"]
        return out


def _copy_transfer(exports: Path, site: str, name: str, drop: str | None = None) -> Path:
    """A new transfer folder of `site`: its newest one under a later export time, complete, or
    without the file `drop` (rejected as incomplete)."""
    folder = exports / f"site-{site}"
    newest = sorted(p for p in folder.iterdir() if p.is_dir())[-1]
    target = folder / name
    shutil.copytree(newest, target)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8-sig"))
    manifest["exported_at"] = f"{name[:4]}-{name[4:6]}-{name[6:8]}T{name[9:11]}:{name[11:13]}:{name[13:15]}Z"
    (target / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    if drop:
        (target / drop).unlink()
    return target


def _exports_version(exports: Path) -> str:
    """Written independently of the pipeline: every transfer folder name and manifest, in order."""
    digest = hashlib.sha256()
    for manifest in sorted(exports.glob("site-*/*/manifest.json")):
        digest.update(f"{manifest.parent.parent.name.removeprefix('site-')}/{manifest.parent.name}".encode())
        digest.update(manifest.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """A small trial run three times: twice over the same transfers, then with a rejected one added."""
    from pipeline.synthetic_trial import generate_trial

    root = tmp_path_factory.mktemp("nights")
    exports, output, home = root / "exports", root / "output", root / "home"
    generate_trial(exports, subjects=5, transfers=1)
    versions = []
    for night in range(3):
        if night == 2:
            _copy_transfer(exports, "02", "20261124T220005", drop="ae.csv")
        assert run_cli("run", "--exports", str(exports), "--output", str(output), home=home) == 0
        versions.append(_versions(home))
    return root, versions


def test_a_rerun_over_the_same_transfers_keeps_every_data_version(nights):
    _, (first, second, _) = nights
    assert first.keys() == second.keys() and len(first) >= 20
    assert {k for k in first if first[k] != second[k]} == set()


def test_a_rejected_transfer_changes_the_inventory_and_findings_versions_only_upstream(nights):
    """The new folder is REJECTED: the transfer list and the ingest findings are new data, the raw
    files read (the current transfers) are not."""
    _, (_, second, third) = nights
    changed = {k for k in second if second[k] != third[k]}
    assert {"raw/transfer_inventory", "raw/ingest_findings"} <= changed
    assert not changed & {f"raw/{f}" for f in ("dm", "enrol", "ex", "ae", "lb", "mrs")}
    assert not changed & {f"validated/{f}" for f in ("dm", "enrol", "ex", "ae", "lb", "mrs")}


def test_materialize_all_without_the_observation_records_the_exports_it_read(nights):
    """The UI's "Materialize all" runs every materializable asset, without the job's observation
    of the exports: the raw assets still record the version of the exports they read, and the
    catalog's newest exports version is that one."""
    root, _ = nights
    exports, output, home = root / "exports", root / "output", root / "home"
    _copy_transfer(exports, "03", "20261125T220005")
    read = _exports_version(exports)
    defs = build_definitions(exports, output)
    graph = defs.resolve_asset_graph()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_latest_data_version_record(EXPORTS).asset_observation.tags["dagster/data_version"] != read
        result = defs.resolve_job_def(JOB_NAME).execute_in_process(
            instance=instance, asset_selection=list(graph.materializable_asset_keys), run_config=quiet)
        assert result.success
        for name in ("dm", "lb", "transfer_inventory"):
            tags = instance.get_latest_materialization_event(dg.AssetKey(["raw", name])).asset_materialization.tags
            assert tags[f"dagster/input_data_version/{EXPORTS.to_user_string()}"] == read, name
        observed = instance.get_latest_data_version_record(EXPORTS)
        assert observed.asset_observation.tags["dagster/data_version"] == read
        assert observed.run_id == result.run_id


def _resend_same_folder_with_an_edit(exports: Path, site: str) -> str:
    """The site re-sends its current transfer under the same folder name with one lab result
    changed slightly (manifest sha256 updated, as the spec asks). Returns the new result."""
    import csv
    import io

    transfer = sorted(p for p in (exports / f"site-{site}").iterdir() if p.is_dir())[-1]
    manifest = json.loads((transfer / "manifest.json").read_text(encoding="utf-8-sig"))
    codec = "gb18030" if manifest["encoding"].lower() == "gb18030" else "utf-8"
    data = (transfer / "lb.csv").read_bytes()
    bom = data.startswith(b"\xef\xbb\xbf")
    records = list(csv.reader(io.StringIO(data.decode("utf-8-sig" if codec == "utf-8" else codec), newline="")))
    column = [h.strip().upper() for h in records[0]].index("LBORRES")
    row = next(i for i, r in enumerate(records[1:], 1) if r[column].replace(".", "", 1).isdigit())
    value = records[row][column] + ("1" if "." in records[row][column] else ".1")
    records[row][column] = value
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\r\n" if b"\r\n" in data else "\n").writerows(records)
    data = (b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode(codec)
    (transfer / "lb.csv").write_bytes(data)
    manifest["files"]["lb.csv"]["sha256"] = hashlib.sha256(data).hexdigest()
    (transfer / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return value


def _refused_after(defs: dg.Definitions, home: Path, prefixes: list[list[str]]) -> str:
    """Materializes the assets under each key prefix in turn (as the UI does for a selection),
    then reports/* alone, which must fail: its error."""
    graph = defs.resolve_asset_graph()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    job = defs.resolve_job_def(JOB_NAME)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for prefix in [*prefixes, ["reports"]]:
            keys = [k for k in graph.materializable_asset_keys if k.path[:len(prefix)] == prefix]
            result = job.execute_in_process(instance=instance, asset_selection=keys, run_config=quiet,
                                            raise_on_error=False)
            assert result.success == (prefix != ["reports"]), prefix
    error = result.get_step_failure_events()[0].event_specific_data.error
    return str(error.cause or error)


def test_a_partial_rematerialization_cannot_publish_old_datasets_with_new_checksums(tmp_path):
    """A same-name re-send with other bytes, then raw/* and reports/* alone in the UI: the SDTM
    datasets of the old files would be published beside the new files' sha256 (run.json, lineage),
    and trace would certify the wrong file. Every stored value carries the input set it was built
    from; publication refuses a mix. The whole job then publishes the new value."""
    import pandas as pd

    from pipeline.synthetic_trial import generate_trial

    exports, output, home = tmp_path / "exports", tmp_path / "output", tmp_path / "home"
    generate_trial(exports, subjects=5, transfers=1)
    assert run_cli("run", "--exports", str(exports), "--output", str(output), home=home) == 0
    before = {p.relative_to(output): p.read_bytes() for p in output.glob("*/*.parquet")}
    value = _resend_same_folder_with_an_edit(exports, "02")
    error = _refused_after(build_definitions(exports, output), home, [["raw"]])
    assert "would mix values built from different transfer files" in error
    assert {p.relative_to(output): p.read_bytes() for p in output.glob("*/*.parquet")} == before
    assert run_cli("run", "--exports", str(exports), "--output", str(output), home=home) == 0
    lb = pd.read_parquet(output / "sdtm" / "lb.parquet")
    assert value in set(lb.loc[lb["USUBJID"].str.startswith("MESAE-02-"), "LBORRES"].dropna())


def test_a_changed_iwrs_list_cannot_be_published_beside_arms_of_the_old_one(tmp_path):
    """Unblinded zone: raw/randomization re-materialized after the IWRS list changed, then
    reports/* alone, published DM arms of the old list under the new list's sha256 in run.json."""
    import csv
    import io

    from pipeline.synthetic_trial import generate_trial

    exports, output, home = tmp_path / "exports", tmp_path / "output", tmp_path / "home"
    generate_trial(exports, subjects=12, transfers=1)
    assert run_cli("run", "--unblinded", "--exports", str(exports), "--output", str(output), home=home) == 0
    before = {p.relative_to(output): p.read_bytes() for p in output.glob("*/*.parquet")}
    path = exports / "unblinded" / "randomization.csv"
    records = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    header = [h.strip().upper() for h in records[0]]
    group = header.index("TRTGRP")
    first = next(i for i, r in enumerate(records[1:], 1) if r[group])
    second = next(i for i, r in enumerate(records[1:], 1) if r[group] and r[group] != records[first][group])
    for column in [group, header.index("DOSE")] if "DOSE" in header else [group]:
        records[first][column], records[second][column] = records[second][column], records[first][column]
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows(records)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    error = _refused_after(build_definitions(exports, output, "unblinded"), home, [["raw", "randomization"]])
    assert "would mix values built from different IWRS lists" in error
    assert {p.relative_to(output): p.read_bytes() for p in output.glob("*/*.parquet")} == before
