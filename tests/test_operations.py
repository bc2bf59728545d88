"""Nightly operations: the new-transfer sensor, the nightly schedule and the failure guidance,
evaluated with Dagster's own test utilities on transfers written to disk.

Why: the sensor is what starts the pipeline when a site's copy has finished. If it fired on a
transfer still being copied, the run would reject it (and report a rejection that is not real);
if it never advanced its cursor, it would start the same run every minute; if it skipped a
completed transfer, data would wait a day. The guidance is what a data manager reads in the morning.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from pipeline.automation import (DEFAULT_CRON, DEFAULT_TIMEZONE, ScheduleSettingError, failure_guidance,
                                 failure_message)
from pipeline.definitions import JOB_NAME, build_definitions
from site_exports import one_subject_trial, write_transfer

T1, T2, T3 = "20261116T220005", "20261123T220005", "20261124T220005"


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None):
    """One evaluation of new_transfer_sensor with the cursor a daemon would hand it."""
    sensor = defs.resolve_sensor_def("new_transfer_sensor")
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))


@pytest.fixture(scope="module")
def instance():
    """Sensors here read no instance state; an in-memory instance is enough and costs nothing."""
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def exports(tmp_path) -> Path:
    root = tmp_path / "exports"
    root.mkdir()
    return root


@pytest.fixture
def defs(exports, tmp_path) -> dg.Definitions:
    return build_definitions(exports, tmp_path / "output", "blinded")


# --- sensor -------------------------------------------------------------------------------

def test_empty_exports_root_is_skipped(defs, instance):
    result = tick(defs, instance, None)
    assert result.run_requests == [] and result.skip_message == "no new complete transfer"
    assert result.cursor is None


def test_missing_exports_root_is_skipped_with_the_reason(tmp_path, instance):
    defs = build_definitions(tmp_path / "not-there", tmp_path / "output", "blinded")
    result = tick(defs, instance, None)
    assert result.run_requests == []
    assert "does not exist" in result.skip_message and str(tmp_path / "not-there") in result.skip_message


def test_new_complete_transfer_requests_a_run_and_advances_the_cursor(defs, exports, instance):
    write_transfer(exports, "01", T1, one_subject_trial("01"))
    first = tick(defs, instance, None)
    assert len(first.run_requests) == 1 and first.skip_message is None
    request = first.run_requests[0]
    assert request.tags["mesae/transfers"] == f"01/{T1}"
    assert json.loads(first.cursor) == {"01": T1}
    assert defs.resolve_sensor_def("new_transfer_sensor").job_name == JOB_NAME

    # The daemon hands the new cursor back: nothing new, no second run.
    again = tick(defs, instance, first.cursor)
    assert again.run_requests == [] and again.skip_message == "no new complete transfer"
    assert again.cursor == first.cursor

    # A newer complete transfer, and another site: one run, a different run_key.
    write_transfer(exports, "01", T2, one_subject_trial("01"))
    write_transfer(exports, "02", T1, one_subject_trial("02"))
    second = tick(defs, instance, first.cursor)
    assert len(second.run_requests) == 1
    assert json.loads(second.cursor) == {"01": T2, "02": T1}
    assert second.run_requests[0].tags["mesae/transfers"] == f"01/{T2},02/{T1}"
    assert second.run_requests[0].run_key != request.run_key

    # Same cursor, same run_key: a restarted daemon cannot start the same run twice.
    replay = tick(defs, instance, first.cursor)
    assert replay.run_requests[0].run_key == second.run_requests[0].run_key


@pytest.mark.parametrize("cursor", ["{not json", '["01"]', '{"01": 20261116}'])
def test_an_unreadable_cursor_starts_again_from_an_empty_one(defs, exports, instance, cursor):
    """A cursor edited by hand must not make every tick fail: the sensor starts from nothing, with
    the same run_key as a fresh start (Dagster does not launch a run_key twice)."""
    write_transfer(exports, "01", T1, one_subject_trial("01"))
    fresh = tick(defs, instance, None)
    recovered = tick(defs, instance, cursor)
    assert len(recovered.run_requests) == 1
    assert recovered.run_requests[0].run_key == fresh.run_requests[0].run_key
    assert json.loads(recovered.cursor) == {"01": T1}


def test_transfer_with_a_file_still_missing_waits_until_complete(defs, exports, instance):
    """A file listed in the manifest but not yet copied: skip, keep the cursor, pick it up later."""
    write_transfer(exports, "01", T1, one_subject_trial("01"))
    cursor = tick(defs, instance, None).cursor
    folder = write_transfer(exports, "01", T2, one_subject_trial("01"))
    parked = folder.parent.parent.parent / "lb.csv.copying"
    shutil.move(folder / "lb.csv", parked)

    waiting = tick(defs, instance, cursor)
    assert waiting.run_requests == [] and waiting.skip_message.startswith("no new complete transfer; waiting for ")
    # The operator is told which transfer waits and why.
    assert f"site-01/{T2}" in waiting.skip_message and "lb.csv" in waiting.skip_message
    assert waiting.cursor == cursor and json.loads(waiting.cursor) == {"01": T1}

    shutil.move(parked, folder / "lb.csv")  # the copy finishes
    done = tick(defs, instance, waiting.cursor)
    assert len(done.run_requests) == 1 and done.run_requests[0].tags["mesae/transfers"] == f"01/{T2}"
    assert json.loads(done.cursor) == {"01": T2}


def test_transfer_with_a_partly_copied_file_waits_until_its_sha256_matches(defs, exports, instance):
    """All files present, one truncated (sha256 differs from the manifest) while it is copied."""
    folder = write_transfer(exports, "03", T1, one_subject_trial("03"))
    full = (folder / "ae.csv").read_bytes()
    (folder / "ae.csv").write_bytes(full[: len(full) // 2])

    waiting = tick(defs, instance, None)
    assert waiting.run_requests == [] and waiting.cursor is None
    assert f"site-03/{T1}" in waiting.skip_message and "ae.csv" in waiting.skip_message and "sha256" in waiting.skip_message

    (folder / "ae.csv").write_bytes(full)
    done = tick(defs, instance, waiting.cursor)
    assert len(done.run_requests) == 1 and json.loads(done.cursor) == {"03": T1}


def test_broken_manifest_is_never_picked_up(defs, exports, instance):
    """A rejected transfer (manifest without its file list) never starts a run; the older complete
    transfer of the site is the one requested, as the pipeline would make it CURRENT."""
    write_transfer(exports, "01", T1, one_subject_trial("01"))
    write_transfer(exports, "01", T2, one_subject_trial("01"), manifest_changes={"files": None})
    first = tick(defs, instance, None)
    assert first.run_requests[0].tags["mesae/transfers"] == f"01/{T1}"
    assert json.loads(first.cursor) == {"01": T1}
    for _ in range(2):  # and it stays that way, tick after tick
        later = tick(defs, instance, first.cursor)
        assert later.run_requests == [] and later.cursor == first.cursor

    (exports / "site-01" / T3).mkdir()
    (exports / "site-01" / T3 / "manifest.json").write_text("{not json", encoding="utf-8")
    assert tick(defs, instance, first.cursor).run_requests == []


def test_generated_trial_in_flight_transfer_is_not_picked_up(tmp_path, instance):
    """The synthetic trial's last site has a newer transfer still being copied (mrs.csv missing):
    the sensor requests the complete transfers and leaves that one for later."""
    from pipeline.synthetic_trial import generate_trial

    trial = generate_trial(tmp_path / "exports", subjects=5)
    defs = build_definitions(trial.exports, tmp_path / "output", "blinded")
    sites = sorted(p.name.removeprefix("site-") for p in trial.exports.glob("site-*"))
    in_flight = [s for s in sites if (trial.exports / f"site-{s}" / T3).is_dir()]
    assert len(in_flight) == 1 and not (trial.exports / f"site-{in_flight[0]}" / T3 / "mrs.csv").exists()

    result = tick(defs, instance, None)
    assert json.loads(result.cursor) == {s: T2 for s in sites}
    assert result.run_requests[0].tags["mesae/transfers"] == ",".join(f"{s}/{T2}" for s in sites)
    assert tick(defs, instance, result.cursor).run_requests == []


# --- schedule -----------------------------------------------------------------------------

def _fire_times(schedule: dg.ScheduleDefinition, start: dt.datetime, n: int) -> list[dt.datetime]:
    # The iterator the Dagster daemon uses to find a schedule's ticks.
    from dagster._utils.schedules import cron_string_iterator

    ticks = cron_string_iterator(start.timestamp(), schedule.cron_schedule, schedule.execution_timezone)
    return [next(ticks) for _ in range(n)]


def test_nightly_schedule_default_is_0700_shanghai_after_the_exports(tmp_path, monkeypatch):
    monkeypatch.delenv("MESAE_SCHEDULE_CRON", raising=False)
    monkeypatch.delenv("MESAE_SCHEDULE_TIMEZONE", raising=False)
    schedule = build_definitions(tmp_path / "e", tmp_path / "o").resolve_schedule_def("nightly")
    assert (schedule.cron_schedule, schedule.execution_timezone) == (DEFAULT_CRON, DEFAULT_TIMEZONE)
    assert (DEFAULT_CRON, DEFAULT_TIMEZONE) == ("0 7 * * *", "Asia/Shanghai")
    assert schedule.job_name == JOB_NAME
    first, second = _fire_times(schedule, dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc), 2)
    # 07:00 in Shanghai is 23:00 UTC the day before: after the spec's export time (22:00:05Z).
    assert first.astimezone(dt.timezone.utc) == dt.datetime(2026, 11, 25, 23, 0, tzinfo=dt.timezone.utc)
    assert second - first == dt.timedelta(days=1)

    tick_time = first
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick_time))
    assert len(data.run_requests) == 1 and data.skip_message is None
    assert data.run_requests[0].tags.get("dagster/schedule_name") == "nightly"


def test_nightly_schedule_is_overridable_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MESAE_SCHEDULE_CRON", "30 3 * * 1-5")
    monkeypatch.setenv("MESAE_SCHEDULE_TIMEZONE", "Europe/Berlin")
    schedule = build_definitions(tmp_path / "e", tmp_path / "o").resolve_schedule_def("nightly")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 3 * * 1-5", "Europe/Berlin")
    # Friday 2026-11-27 noon UTC: next ticks are Monday and Tuesday 03:30 Berlin (02:30 UTC in winter).
    ticks = _fire_times(schedule, dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc), 2)
    assert [t.astimezone(dt.timezone.utc) for t in ticks] == [
        dt.datetime(2026, 11, 30, 2, 30, tzinfo=dt.timezone.utc), dt.datetime(2026, 12, 1, 2, 30, tzinfo=dt.timezone.utc)]


def test_empty_schedule_variables_mean_the_default(tmp_path, monkeypatch):
    """`MESAE_SCHEDULE_CRON=` (set but empty, as service files often leave it) must not stop the
    definitions, and so every `mesae run`, from loading."""
    monkeypatch.setenv("MESAE_SCHEDULE_CRON", "")
    monkeypatch.setenv("MESAE_SCHEDULE_TIMEZONE", " ")
    schedule = build_definitions(tmp_path / "e", tmp_path / "o").resolve_schedule_def("nightly")
    assert (schedule.cron_schedule, schedule.execution_timezone) == (DEFAULT_CRON, DEFAULT_TIMEZONE)


def test_invalid_schedule_is_refused_when_the_definitions_load(tmp_path, monkeypatch):
    monkeypatch.setenv("MESAE_SCHEDULE_CRON", "every night")
    with pytest.raises(ScheduleSettingError, match="MESAE_SCHEDULE_CRON='every night' .* is not a schedule"):
        build_definitions(tmp_path / "e", tmp_path / "o")


# --- failure guidance ---------------------------------------------------------------------

def _error_line(error: Exception) -> str:
    """How the CLI and the failure sensor quote an error: class name and first line."""
    return f"{type(error).__name__}: {str(error).splitlines()[0]}"


def test_guidance_for_a_conformance_failure():
    import pandas as pd

    from pipeline.assets.checks import conformance_result

    # A real failing evaluation of the blocking check: an LB record with nothing in it.
    frame = pd.DataFrame({"STUDYID": ["MESAE"], "DOMAIN": ["LB"], "USUBJID": [None]})
    result = conformance_result(dg.AssetKey(["sdtm", "lb"]), "lb", frame, pd.Series(["MESAE-01-001"]))
    assert not result.passed
    message = f"sdtm_conformance failed on sdtm/lb: {result.description}"
    assert "pipeline bug" in failure_guidance(message)
    assert "pipeline bug" in failure_guidance("AccountingError: row accounting does not close for lb.csv")


def test_guidance_for_an_unusable_iwrs_list(tmp_path):
    from pipeline.transfers import RandomizationFileError, read_randomization

    (tmp_path / "unblinded").mkdir()
    (tmp_path / "unblinded" / "randomization.csv").write_bytes(b"")
    with pytest.raises(RandomizationFileError) as error:
        read_randomization(tmp_path)
    assert "IWRS list" in failure_guidance(_error_line(error.value))


def test_guidance_for_a_busy_output_folder(tmp_path):
    from pipeline.output_folder import OutputFolder, OutputFolderBusy

    holder = OutputFolder(tmp_path / "out", "blinded")
    holder.acquire(0)
    try:
        with pytest.raises(OutputFolderBusy) as busy:
            OutputFolder(tmp_path / "out", "blinded").acquire(0.2)
    finally:
        holder.release()
    assert "Another run is writing" in failure_guidance(_error_line(busy.value))


def test_guidance_for_a_zone_mismatch(tmp_path):
    from pipeline.output_folder import OutputFolder, OutputFolderError
    from pipeline.resources import ZoneError, check_instance_zone

    OutputFolder(tmp_path / "out", "blinded").claim()
    with pytest.raises(OutputFolderError) as folder:
        OutputFolder(tmp_path / "out", "unblinded").check(tmp_path / "exports")
    (tmp_path / "home").mkdir()
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as dagster_instance:
        check_instance_zone(dagster_instance, "unblinded")
        with pytest.raises(ZoneError) as instance:
            check_instance_zone(dagster_instance, "blinded")
    for error in (folder.value, instance.value):
        assert "other blinding zone" in failure_guidance(_error_line(error)), error


def test_guidance_for_a_missing_exports_folder(tmp_path):
    from pipeline.transfers import ExportsRootError, list_transfers

    # A path that happens to contain "zone" must still get the exports advice.
    with pytest.raises(ExportsRootError) as missing:
        list_transfers(tmp_path / "blinded-zone" / "exports")
    assert "exports folder is missing" in failure_guidance(_error_line(missing.value))


def test_guidance_for_other_output_folder_problems_is_not_zone_advice(tmp_path):
    from pipeline.output_folder import OutputFolder, OutputFolderError

    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(OutputFolderError) as inside:
        OutputFolder(exports / "out", "blinded").check(exports)
    advice = failure_guidance(_error_line(inside.value))
    assert "other blinding zone" not in advice and "exports folder is missing" not in advice
    assert "separate, empty --output folder" in advice


def test_a_first_run_into_a_folder_of_other_files_is_refused(tmp_path, capsys):
    """`--output .` in a repository or `--output ~` would scatter sdtm/, reports/, run.json ... among
    someone's files: a folder mesae never wrote must be new or empty (hidden entries aside)."""
    from conftest import run_cli

    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    output = tmp_path / "notes"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    (output / ".DS_Store").write_text("")
    args = ["run", "--exports", str(tmp_path / "exports"), "--output", str(output)]
    assert run_cli(*args, home=tmp_path / "home") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output folder {output} was not written by mesae and is not empty (notes.txt)" in err
    assert sorted(p.name for p in output.iterdir()) == [".DS_Store", "notes.txt"]
    (output / "notes.txt").unlink()
    (output / "lost+found").mkdir()                        # the root of a volume of its own
    home = output / "dagster_home"                         # an instance inside the output folder
    assert run_cli(*args, home=home) == 0                  # none of those is someone's file
    assert run_cli(*args, home=home) == 0                  # and from then on it is mesae's
    shutil.rmtree(output / ".mesae")                       # its state deleted: its own links are no strangers
    assert run_cli(*args, home=home) == 0


def test_an_instance_the_ui_made_inside_the_output_folder_is_no_stranger(tmp_path):
    """`dagster dev` makes no dagster.yaml: its instance folder is known by the zone marker."""
    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    output = tmp_path / "out"
    (output / "ui_home").mkdir(parents=True)
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    with dg.DagsterInstance.from_config(str(output / "ui_home")) as instance:
        result = build_definitions(tmp_path / "exports", output).resolve_job_def(JOB_NAME).execute_in_process(
            instance=instance, raise_on_error=False, run_config=quiet)
    assert result.success and not (output / "ui_home" / "dagster.yaml").exists()
    assert (output / "run.json").exists()


def test_a_summary_that_cannot_be_written_does_not_fail_a_published_run(tmp_path, monkeypatch, capsys):
    """Exit 0 means published: `mesae run | head` (a closed pipe) or stdout on a full disk must not
    turn a published night into exit 1 with a traceback."""
    import io

    from conftest import run_cli

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("no file descriptor here")

    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    output = tmp_path / "out"
    monkeypatch.setattr("sys.stdout", Closed())
    assert run_cli("run", "--exports", str(tmp_path / "exports"), "--output", str(output), home=tmp_path / "home") == 0
    err = capsys.readouterr().err
    run_id = json.loads((output / "run.json").read_text())["run_id"]
    assert f"mesae: run {run_id} published to {output}; its summary could not be written" in err
    assert "Broken pipe" in err and "Traceback" not in err


def test_guidance_for_launchpad_mistakes():
    """Config or subsets that only the UI can produce get their own advice, not "rerun" (which
    fails again) nor the other zone's (the folders' mismatch is no zone matter)."""
    from pipeline.resources import StoreFolderError

    store = failure_guidance(f"{StoreFolderError.__name__}: the asset store's folder /a is not the run's output "
                             "folder /b; set both to the same folder")
    assert "settings.output_dir and store.output_dir" in store and "blinding zone" not in store
    mixed = failure_guidance("MixedInputsError: the outputs would mix values built from different transfer files: x")
    assert "whole mesae_nightly job" in mixed and "then rerun" not in mixed
    sites = failure_guidance("ValueError: sites_withdrawn ['3'] are not SITEIDs; expected two digits, e.g. '03'")
    assert "two-digit SITEIDs" in sites and "then rerun" not in sites


@pytest.mark.parametrize("exports_entries, withdrawn, message", [
    ([], [], "has no site-XX folder"),                                  # an empty mount point
    (["site-01"], ["3"], "sites_withdrawn ['3'] are not SITEIDs"),
    (["site-01"], ["site-03"], "are not SITEIDs"),
])
def test_the_settings_refuse_what_mesae_run_refuses(tmp_path, exports_entries, withdrawn, message):
    """Runs of the schedule, sensor and launchpad go through the settings resource, not the CLI's
    checks: an exports root without a site folder published an empty set on a first night."""
    exports = tmp_path / "exports"
    exports.mkdir()
    for entry in exports_entries:
        (exports / entry).mkdir()
    defs = build_definitions(exports, tmp_path / "out", sites_withdrawn=withdrawn)
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(instance=dg.DagsterInstance.ephemeral(),
                                                               raise_on_error=False, run_config=quiet)
    assert not result.success
    events = [e for e in result.all_events if e.event_type in (dg.DagsterEventType.RESOURCE_INIT_FAILURE,
                                                                dg.DagsterEventType.STEP_FAILURE)]
    assert any(message in str(e.event_specific_data.error) for e in events), events
    assert not (tmp_path / "out" / "run.json").exists()


def test_guidance_for_an_interrupted_run():
    assert "interrupted" in failure_guidance("DagsterExecutionInterruptedError: dagster._core.errors."
                                             "DagsterExecutionInterruptedError")
    assert "then rerun" not in failure_guidance("DagsterExecutionInterruptedError: x")


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory):
    """Two real runs that fail before any step, recorded in one instance: the output folder busy
    (its lock held here), and the exports folder gone. Yields (instance, [(result, advice)])."""
    from pipeline.output_folder import OutputFolder

    tmp = tmp_path_factory.mktemp("failed-runs")
    exports = tmp / "exports"
    write_transfer(exports, "01", T1, one_subject_trial("01"))
    holder = OutputFolder(tmp / "busy-out", "blinded")
    holder.claim()
    holder.acquire(0)
    cases = [(build_definitions(exports, tmp / "busy-out", "blinded", lock_timeout_seconds=0.2),
              "Another run is writing"),
             (build_definitions(tmp / "gone", tmp / "out", "blinded"), "exports folder is missing")]
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    with dg.instance_for_test() as instance:
        try:
            runs = [(defs.resolve_job_def(JOB_NAME).execute_in_process(instance=instance, raise_on_error=False,
                                                                      run_config=quiet), advice)
                    for defs, advice in cases]
        finally:
            holder.release()
        yield instance, runs


def test_failure_sensor_reports_the_real_cause_of_a_failed_run(failed_runs, capfd):
    """End to end: the failure sensor reads the real cause of each failed run from the instance
    (the run failure event itself only says "Execution of run ... failed") and logs the advice."""
    from pipeline.automation import FAILURE_EVENTS, failure_guidance_sensor

    instance, runs = failed_runs
    for result, advice in runs:
        assert not result.success
        records = instance.all_logs(result.run_id, of_type={*FAILURE_EVENTS, dg.DagsterEventType.ASSET_CHECK_EVALUATION})
        message = failure_message([r.dagster_event for r in records])
        assert advice in failure_guidance(message), message
        failure = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
        context = dg.build_run_status_sensor_context(
            sensor_name="failure_guidance", dagster_event=failure, dagster_instance=instance,
            dagster_run=instance.get_run_by_id(result.run_id)).for_run_failure()
        capfd.readouterr()
        failure_guidance_sensor(context)  # logs through Dagster's console logger (stderr)
        logged = capfd.readouterr().err
        assert f"run {result.run_id} failed: {message} -> " in logged and advice in logged, logged


def test_cli_names_the_cause_of_a_run_that_failed_before_any_step(failed_runs):
    """README: a second run on a busy folder "exits 1 naming the folder"."""
    from pipeline.cli import failure_reason

    _, runs = failed_runs
    for result, advice in runs:
        reason = failure_reason(result)
        assert advice in failure_guidance(reason), reason


def refused(capsys, *args) -> str:
    """`mesae run ...` refused before Dagster starts: exit 2, one line on stderr, no traceback."""
    from pipeline.cli import main

    code = main(["run", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_an_exports_root_without_site_folders_is_refused_before_it_replaces_good_outputs(
        tmp_path, capsys, monkeypatch):
    """Pointing --exports one level too deep (a site's folder) or at an empty folder would publish an
    empty set over last night's outputs: refused as an unusable input root (contract section 1)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    write_transfer(tmp_path / "exports", "01", T2, one_subject_trial())
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "exports" / "site-01", tmp_path / "empty"):
        err = refused(capsys, "--exports", root, "--output", tmp_path / "output")
        assert f"exports folder {root} has no site-XX folder" in err
    assert not (tmp_path / "output").exists()


def test_an_output_folder_that_cannot_be_created_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    write_transfer(tmp_path / "exports", "01", T2, one_subject_trial())
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "output"
    err = refused(capsys, "--exports", tmp_path / "exports", "--output", output)
    assert err.strip() == f"mesae: output folder {output} cannot be created: Not a directory"


@pytest.mark.parametrize("spoil", ["a file", "storage a file"])
def test_an_unusable_dagster_home_is_refused_in_one_line(tmp_path, capsys, monkeypatch, spoil):
    """Contract section 1: an unusable invocation exits 2 with one line, no traceback, before
    anything is run: a DAGSTER_HOME that is a file, or whose SQLite storage cannot be created."""
    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    home = tmp_path / "home"
    if spoil == "a file":
        home.write_text("not a folder")
    else:
        home.mkdir()
        for name in ("history", "storage", "schedules"):
            (home / name).write_text("in the way")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    err = refused(capsys, "--exports", tmp_path / "exports", "--output", tmp_path / "out")
    assert f"the Dagster instance folder {home} cannot be used" in err and "set DAGSTER_HOME" in err
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize("flag, environment, says", [
    (["--lock-timeout", "nan"], {}, "argument --lock-timeout: 'nan' is not a number of seconds; expected 0 or more"),
    (["--lock-timeout", "-5"], {}, "argument --lock-timeout: '-5' is not a number of seconds; expected 0 or more"),
    (["--lock-timeout", "soon"], {}, "argument --lock-timeout: 'soon' is not a number of seconds; expected 0 or more"),
    (["--unblinded"], {"MESAE_UNBLINDED": "maybe"}, "MESAE_UNBLINDED must be 1, true or yes (unblinded) or empty, 0, false or no (blinded), not 'maybe'"),
    ([], {"MESAE_SCHEDULE_CRON": "0 2 * *"}, "MESAE_SCHEDULE_CRON='0 2 * *' with MESAE_SCHEDULE_TIMEZONE="),
    ([], {"MESAE_SCHEDULE_TIMEZONE": "China/Beijing"}, "MESAE_SCHEDULE_TIMEZONE='China/Beijing' is not a schedule"),
])
def test_a_bad_setting_is_refused_in_one_line(tmp_path, capsys, monkeypatch, flag, environment, says):
    """Contract section 1: a bad flag is an unusable invocation (exit 2, one line); so is a schedule
    variable the code location cannot build (it was a 30-line traceback and exit 1)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    err = refused(capsys, "--exports", tmp_path / "exports", "--output", tmp_path / "out", *flag)
    assert says in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_file_where_the_state_folder_belongs_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".mesae").write_text("in the way")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    err = refused(capsys, "--exports", tmp_path / "exports", "--output", tmp_path / "out")
    assert f"{tmp_path / 'out' / '.mesae'} exists and is not mesae's state folder" in err


def test_a_run_left_started_by_a_killed_process_is_marked_failed(tmp_path, monkeypatch):
    """kill -9 leaves a `mesae run` STARTED in the instance for ever; the next run on the host marks
    it FAILED. A run whose process lives, or that another host started, is left alone."""
    import socket
    import subprocess

    from conftest import run_cli

    write_transfer(tmp_path / "exports", "01", T1, one_subject_trial("01"))
    home = tmp_path / "home"
    home.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    runs = {"killed": (socket.gethostname(), ended.pid), "alive": (socket.gethostname(), os.getpid()),
            "elsewhere": ("another-host", ended.pid),
            # a Ctrl-C before Dagster started the run left it NOT_STARTED
            "interrupted": (socket.gethostname(), ended.pid)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for name, (host, pid) in runs.items():
            status = dg.DagsterRunStatus.NOT_STARTED if name == "interrupted" else dg.DagsterRunStatus.STARTED
            instance.add_run(dg.DagsterRun(job_name=JOB_NAME, run_id=f"{name}-run", status=status,
                                           tags={"mesae/source": "cli", "mesae/host": host, "mesae/pid": str(pid)}))
    assert run_cli("run", "--exports", str(tmp_path / "exports"), "--output", str(tmp_path / "out"), home=home) == 0
    with dg.DagsterInstance.from_config(str(home)) as instance:
        status = {name: instance.get_run_by_id(f"{name}-run").status for name in runs}
        failure = instance.all_logs("killed-run", of_type=dg.DagsterEventType.RUN_FAILURE)
    assert status == {"killed": dg.DagsterRunStatus.FAILURE, "alive": dg.DagsterRunStatus.STARTED,
                      "elsewhere": dg.DagsterRunStatus.STARTED, "interrupted": dg.DagsterRunStatus.FAILURE}
    assert f"the mesae process {ended.pid}" in failure[0].dagster_event.message


def test_a_published_site_that_vanishes_fails_the_run_until_it_is_withdrawn(tmp_path, capsys):
    """A site folder deleted or unmounted dropped the site's subjects from every dataset, exit 0,
    with no finding: the run now fails and keeps the published set, until the site comes back or
    the data manager says it has closed (`--without-site`)."""
    import pandas as pd

    from conftest import run_cli
    from pipeline.synthetic_trial import generate_trial

    exports, output = tmp_path / "exports", tmp_path / "output"
    generate_trial(exports, subjects=12, transfers=1)
    assert run_cli("run", "--exports", str(exports), "--output", str(output), home=tmp_path / "home") == 0
    before = {p: (output / p).read_bytes() for p in ("run.json", "sdtm/dm.parquet")}
    shutil.move(exports / "site-03", tmp_path / "aside")
    capsys.readouterr()
    assert run_cli("run", "--exports", str(exports), "--output", str(output), home=tmp_path / "home") == 1
    error = capsys.readouterr().err
    assert "site 03 (last published from transfer" in error and "its folder site-03 is gone" in error, error
    assert "--without-site 03`" in error and "restore its transfers" in error and "then rerun" not in error
    assert {p: (output / p).read_bytes() for p in before} == before
    assert run_cli("run", "--exports", str(exports), "--output", str(output), "--without-site", "01",
                   home=tmp_path / "home") == 1             # site 01 sends data: withdrawing it is refused
    error = capsys.readouterr().err
    assert "site 01 is to be withdrawn but has a current transfer" in error
    assert "run again without withdrawing it" in error
    assert run_cli("run", "--exports", str(exports), "--output", str(output), "--without-site", "07",
                   home=tmp_path / "home") == 1             # a typo beside a site gone: said, and the run refused
    error = capsys.readouterr().err
    assert "--without-site 07: no such site" in error and "01, 02, 03" in error and "nothing to withdraw" in error
    assert run_cli("run", "--exports", str(exports), "--output", str(output), "--without-site", "03",
                   home=tmp_path / "home") == 0
    assert "03" not in json.loads((output / "run.json").read_text())["inputs"]
    quarantine = pd.read_parquet(output / "quarantine.parquet")
    (message,) = quarantine.loc[quarantine["RULE"] == "TRF-SITE-WITHDRAWN", "MESSAGE"]   # the set says why
    assert message.startswith("site 03 withdrawn by this run's settings (mesae run --without-site): its subjects, "
                              "last published from transfer ")
    # The flag kept the next night (a cron line): site 03 is in neither set nor exports; said, not refused.
    assert run_cli("run", "--exports", str(exports), "--output", str(output), "--without-site", "03",
                   home=tmp_path / "home") == 0
    assert "--without-site 03: no such site" in capsys.readouterr().err
    assert run_cli("run", "--exports", str(exports), "--output", str(output), home=tmp_path / "home") == 0


def test_sites_gone_names_why_and_lets_withdrawn_sites_go():
    from pipeline.transfers import Transfer, sites_gone

    published = {"01": {"transfer": "20261122T220000"}, "02": {"transfer": "20261122T220000"},
                 "03": {"transfer": "20261122T220000"}}
    now = [Transfer(site="01", name="20261123T220005", path=Path("x"), status="CURRENT"),
           Transfer(site="02", name="20261123T220005", path=Path("x"), status="REJECTED")]
    now[1].problem("TRF-MISSING-FILE", file="lb.csv", detail="listed in manifest.json but absent")
    gone = sites_gone(published, now, withdrawn=[])
    assert list(gone) == ["02", "03"]
    assert gone["02"].startswith("site 02 (last published from transfer 20261122T220000): every "
                                 "transfer of it is REJECTED (newest 20261123T220005: ")
    assert gone["03"] == "site 03 (last published from transfer 20261122T220000): its folder site-03 is gone from the exports root"
    assert sites_gone(published, now, withdrawn=["02", "03"]) == {}
    assert sites_gone({}, now, withdrawn=[]) == {}


def test_a_site_whose_data_goes_back_in_time_is_reported():
    """The transfer last published vanished (deleted, or the exports root is an older copy) or is
    rejected now: the set quietly took the site's data back a night. Each case says so; a site on
    the same or a newer transfer, or not current at all (sites_gone's case), does not."""
    from pipeline.transfers import Transfer, sites_gone_back

    published = {s: {"transfer": "20261124T220005"} for s in ("01", "02", "03", "04", "05")}
    now = [Transfer(site="01", name="20261123T220005", path=Path("x"), status="CURRENT"),          # gone
           Transfer(site="02", name="20261123T220005", path=Path("x"), status="CURRENT"),          # rejected now
           Transfer(site="02", name="20261124T220005", path=Path("x"), status="REJECTED"),
           Transfer(site="03", name="20261124T220005", path=Path("x"), status="CURRENT"),          # same
           Transfer(site="04", name="20261125T220005", path=Path("x"), status="CURRENT")]          # newer
    now[2].problem("TRF-ROWS", file="lb.csv", value=3, expected=4)
    found = sites_gone_back(published, now)
    assert [(f["SITEID"], f["TRANSFER"], f["RULE"], f["SEVERITY"]) for f in found] == [
        ("01", "20261123T220005", "TRF-SITE-BACK", "WARNING"), ("02", "20261123T220005", "TRF-SITE-BACK", "WARNING")]
    assert found[0]["MESSAGE"] == ("site 01 goes back in time: its current transfer is older than 20261124T220005, the "
                                   "one last published, which is gone from site-01/; the site's data in this set is "
                                   "that of this transfer")
    assert "which is REJECTED now (lb.csv: 3 data rows, the manifest says 4)" in found[1]["MESSAGE"]
    assert sites_gone_back({}, now) == []


def test_a_deleted_newest_transfer_is_reported_the_night_the_data_goes_back(tmp_path):
    import pandas as pd

    from conftest import run_cli
    from pipeline.synthetic_trial import generate_trial

    exports, output, home = tmp_path / "exports", tmp_path / "output", tmp_path / "home"
    generate_trial(exports, subjects=6, transfers=2)
    args = ["run", "--exports", str(exports), "--output", str(output)]
    assert run_cli(*args, home=home) == 0
    newest = sorted(p for p in (exports / "site-01").iterdir() if p.is_dir())[-1]
    shutil.rmtree(newest)
    for night, expected in ((2, [("01", f"site 01 goes back in time: its current transfer is older than {newest.name}")]),
                            (3, [])):
        assert run_cli(*args, home=home) == 0, night
        quarantine = pd.read_parquet(output / "quarantine.parquet")
        back = quarantine[quarantine["RULE"] == "TRF-SITE-BACK"]
        assert [(s, m[:len(expected[0][1])]) for s, m in zip(back["SITEID"], back["MESSAGE"])] == expected, night


def test_sites_behind_are_those_a_night_late_or_with_a_newer_rejected_transfer():
    """Every night said "5 current" while one site had sent nothing for three nights and another
    only broken transfers: run.json (and the summary) now name them."""
    import pandas as pd

    from pipeline.publication import sites_behind

    rows = [("01", "20261126T220000", "CURRENT"), ("02", "20261126T013000", "CURRENT"),      # 20.5 h: same night
            ("03", "20261123T220000", "CURRENT"), ("03", "20261122T220000", "SUPERSEDED"),
            ("05", "20261125T220000", "CURRENT"), ("05", "20261126T220000", "REJECTED"),
            ("05", "20261124T220000", "REJECTED"),                                          # older: history
            ("01", "2026-11-27T220000", "REJECTED"),                     # a name that is no time: news
            (None, "site-3", "REJECTED")]
    inventory = pd.DataFrame(rows, columns=["SITEID", "TRANSFER", "STATUS"]).astype("str")
    assert sites_behind(inventory) == [
        {"site": "01", "current": "20261126T220000", "hours_behind_newest": 0.0, "newer_rejected": ["2026-11-27T220000"]},
        {"site": "03", "current": "20261123T220000", "hours_behind_newest": 72.0, "newer_rejected": []},
        {"site": "05", "current": "20261125T220000", "hours_behind_newest": 24.0, "newer_rejected": ["20261126T220000"]}]
    assert sites_behind(inventory[inventory["STATUS"] != "CURRENT"]) == []
