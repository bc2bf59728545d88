"""Nightly operations: the schedule, the new-transfer sensor and the run-failure guidance.

The sensor's cursor is the newest complete transfer seen per site. "Complete" means arrived: every
file of its manifest present with its sha256. A transfer still being copied does not match and is
not picked up until it does (the skip reason names it and why). The run then checks rows and
columns as for any transfer, and a transfer that fails is REJECTED with its reason in
transfers.parquet that same night. A folder's content is taken once: a corrected re-send goes in a
new folder (a new export time, as the spec names them); the nightly schedule runs regardless, so
nothing waits for a silent site.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import dagster as dg

from pipeline import transfers
from pipeline.output_folder import OutputFolderBusy

# 07:00 in Shanghai is 23:00 UTC: an hour after the sites' nightly export at 22:00 UTC (the spec's
# manifest example and folder names are UTC), so the scheduled run reads that night's transfers,
# and its outputs are there when the data managers start the day. The spec fixes no export time:
# set MESAE_SCHEDULE_CRON to an hour after the sites' own, or let new_transfer_sensor run.
DEFAULT_CRON = "0 7 * * *"
DEFAULT_TIMEZONE = "Asia/Shanghai"


def complete_new_transfers(root, cursor: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(new cursor, the complete transfers newer than the cursor, the newer ones still waiting with
    why), checking each site's transfers newest first."""
    updated = dict(cursor)
    found, waiting = [], []
    by_site: dict[str, list[transfers.Transfer]] = {}
    for transfer in transfers.list_transfers(root):
        by_site.setdefault(transfer.site, []).append(transfer)
    for site, site_transfers in sorted(by_site.items()):
        for transfer in sorted(site_transfers, key=lambda t: t.name, reverse=True):
            if transfer.name <= cursor.get(site, ""):
                break
            if transfers.verify_checksums(transfer):
                updated[site] = transfer.name
                found.append(f"{site}/{transfer.name}")
                break
            waiting.append(f"site-{site}/{transfer.name} ({transfer.reason})")
    return updated, found, waiting


def read_cursor(text: str | None) -> dict[str, str] | None:
    """The cursor as {site: transfer}; None when it is not one (set by hand in the UI, say)."""
    try:
        cursor = json.loads(text) if text else {}
    except ValueError:
        return None
    ok = isinstance(cursor, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in cursor.items())
    return cursor if ok else None


def build_sensor(job: dg.JobDefinition, exports_dir: str) -> dg.SensorDefinition:
    @dg.sensor(job=job, name="new_transfer_sensor", minimum_interval_seconds=60,
               description="Starts the pipeline when a site's new transfer has arrived completely (every file of "
                           "its manifest, with its sha256); the run then accepts or rejects it.")
    def new_transfer_sensor(context: dg.SensorEvaluationContext):
        cursor = read_cursor(context.cursor)
        if cursor is None:
            # Start again from nothing: the transfers seen are requested once more under the same
            # run_key as before, which Dagster does not launch twice.
            context.log.warning(f"unreadable cursor {context.cursor!r}: starting again from an empty one")
            cursor = {}
        try:
            updated, found, waiting = complete_new_transfers(Path(exports_dir), cursor)
        except transfers.ExportsRootError as error:
            return dg.SkipReason(str(error))
        if not found:
            return dg.SkipReason("no new complete transfer" + (f"; waiting for {'; '.join(waiting)}" if waiting else ""))
        context.update_cursor(json.dumps(updated, sort_keys=True))
        run_key = hashlib.sha256(json.dumps(updated, sort_keys=True).encode()).hexdigest()[:16]
        return dg.RunRequest(run_key=run_key, tags={"mesae/transfers": ",".join(found)})

    return new_transfer_sensor


class ScheduleSettingError(ValueError):
    """MESAE_SCHEDULE_CRON / MESAE_SCHEDULE_TIMEZONE do not make a schedule."""


def build_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    # An empty variable (e.g. `MESAE_SCHEDULE_CRON=` in a service file) means "not set": the default,
    # not an invalid cron string that would stop every definition, and so `mesae run`, from loading.
    cron = os.environ.get("MESAE_SCHEDULE_CRON", "").strip() or DEFAULT_CRON
    timezone = os.environ.get("MESAE_SCHEDULE_TIMEZONE", "").strip() or DEFAULT_TIMEZONE
    try:
        return dg.ScheduleDefinition(
            name="nightly", job=job, cron_schedule=cron, execution_timezone=timezone,
            description="Nightly run on the sites' current transfers (default 07:00 Asia/Shanghai, 23:00 UTC).")
    except dg.DagsterInvalidDefinitionError:   # `mesae run` says which variable, in one line
        raise ScheduleSettingError(
            f"MESAE_SCHEDULE_CRON={cron!r} with MESAE_SCHEDULE_TIMEZONE={timezone!r} is not a schedule; expected "
            "a five-field cron string (e.g. '0 7 * * *') and an IANA time zone (e.g. 'Asia/Shanghai')") from None


ZONE_MISMATCH = re.compile(r"ZoneError|holds (un)?blinded outputs|serves the (un)?blinded zone")


# (words of a failure message, what to do), first match wins; the order puts specific causes
# before the broader words of others.
GUIDANCE = [
    (("sdtm_conformance", "AccountingError", "row accounting"),
     "The outputs failed a conformance check or row accounting: this is a pipeline bug, not a data problem. The "
     "previous outputs are unchanged. Send the run id to the pipeline team."),
    (("RandomizationFileError",),
     "The IWRS list (unblinded/randomization.csv) cannot be used as it is: have it exported again as the reason "
     "says, then rerun. The previous outputs are unchanged."),
    (("MixedInputsError", "would mix"),
     "Part of the job was materialized without the rest (a subset in the UI), so the outputs would mix two inputs "
     "or code versions: launch the whole mesae_nightly job (or mesae run). The previous outputs are unchanged."),
    (("are not SITEIDs",),
     "settings.sites_withdrawn takes two-digit SITEIDs such as '03': correct the value in the run's config. The "
     "previous outputs are unchanged."),
    (("is not the run's output folder",),
     "settings.output_dir and store.output_dir name different folders in the run's config: set both to the same "
     "output folder (the code location's defaults do). The previous outputs are unchanged."),
    (("DagsterExecutionInterruptedError", "KeyboardInterrupt"),
     "The run was interrupted (Ctrl-C, or terminated from the UI). The previous outputs are unchanged; run again "
     "when ready."),
    (("is to be withdrawn but has a current transfer",),
     "A site given to --without-site (settings.sites_withdrawn) still sends usable data: run again without "
     "withdrawing it. The previous outputs are unchanged."),
    (("Publishing would drop its subjects",),
     "A site of the published set has no usable transfer tonight: restore its transfers (or have it send a new "
     "one), or, if it has closed, run with --without-site and its SITEID. The previous outputs are unchanged."),
    ((OutputFolderBusy.__name__, "is being written by"),
     "Another run is writing this output folder. Wait for it to finish, then run again."),
]

# After the zone advice: these words also appear in its messages.
FOLDER_GUIDANCE = [
    (("inside the exports folder", "was not written by mesae"),
     "The output folder cannot be used (it is inside the exports folder or holds files mesae did not write). Use "
     "a separate, empty --output folder."),
    (("ExportsRootError", "exports folder", "exports path", "site folder"),
     "The exports folder is missing or unreadable. Check the nightly copy from the sites, then run again."),
    (("No space left", "Permission denied", "Read-only", "is not writable"),
     "The output folder cannot be written (disk full or permissions). Free space or fix permissions; the previous "
     "outputs are unchanged."),
]


def failure_guidance(message: str) -> str:
    """What a data manager should do next, from a run's failure message (see `failure_message`)."""
    text = message or ""
    for words, advice in GUIDANCE:
        if any(word in text for word in words):
            return advice
    # Matched on the error's own words, not on "zone" anywhere (a path such as /srv/blinded-zone/...
    # would match that), and before the exports advice ("inside the exports folder" names it too).
    if ZONE_MISMATCH.search(text):
        return "The output folder or Dagster instance belongs to the other blinding zone. Use the zone's own folder."
    for words, advice in FOLDER_GUIDANCE:
        if any(word in text for word in words):
            return advice
    return "The run failed; the previous outputs are unchanged. Check the run's log in the Dagster UI, then rerun."


FAILURE_EVENTS = (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RESOURCE_INIT_FAILURE,
                  dg.DagsterEventType.RUN_FAILURE)


def failure_message(events) -> str:
    """One line for a failed run, from its Dagster events: the failed blocking checks, else the
    innermost error of the first step, resource-initialisation or run failure.

    A run failure event's own message is generic ("Execution of run ... failed"); the cause (a busy
    output folder, a missing exports folder, the other zone's folder) is in the error it carries, and
    for a resource that could not start, only in the RESOURCE_INIT_FAILURE / RUN_FAILURE events."""
    events = [e for e in events if e is not None]
    failed_checks = [e.event_specific_data for e in events
                     if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                     and not e.event_specific_data.passed
                     and e.event_specific_data.severity == dg.AssetCheckSeverity.ERROR]
    if failed_checks:
        return "; ".join(f"{c.check_name} failed on {c.asset_key.to_user_string()}: {c.description}"
                         for c in failed_checks)
    for event in events:
        if event.event_type in FAILURE_EVENTS and event.event_specific_data is not None:
            error = getattr(event.event_specific_data, "error", None)
            if error is None:
                continue
            while getattr(error, "cause", None) is not None:
                error = error.cause
            lines = (error.message or "").strip().splitlines()
            first = lines[0] if lines else ""
            # The message repeats the (qualified) class name: "pipeline.x.OutputFolderBusy: output ...".
            first = re.sub(rf"^[\w.]*\b{re.escape(error.cls_name)}: ", "", first)
            return f"{error.cls_name}: {first}"
    return ""


# Running by default, unlike the schedule and the new-transfer sensor: it starts no run, it only
# logs advice, and advice switched off is advice nobody reads.
@dg.run_failure_sensor(name="failure_guidance", description="Logs what a data manager should do after a failed run.",
                       default_status=dg.DefaultSensorStatus.RUNNING)
def failure_guidance_sensor(context: dg.RunFailureSensorContext):
    run_id = context.dagster_run.run_id
    records = context.instance.all_logs(run_id, of_type={*FAILURE_EVENTS, dg.DagsterEventType.ASSET_CHECK_EVALUATION})
    message = failure_message([r.dagster_event for r in records]) or context.failure_event.message or ""
    context.log.error(f"run {run_id} failed: {message} -> {failure_guidance(message)}")
