"""The Dagster definitions of the MESAE pipeline, for one blinding zone.

`dagster dev` (through workspace.yaml) loads `defs` with the zone, exports and output from the
environment: MESAE_UNBLINDED=1 selects the unblinded zone, MESAE_EXPORTS and MESAE_OUTPUT the
folders (defaults: the demo trial's). The blinded definitions contain no asset that can read
`unblinded/`: the zones differ in code, not only in configuration. Loading them tunes the
process's garbage collector for a pipeline run (pipeline/garbage_collection.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from pipeline.assets.raw import build_randomization_asset, build_raw_ingest, site_transfers
from pipeline.assets.reports import build_report_assets
from pipeline.assets.sdtm import build_sdtm_assets
from pipeline.assets.validated import build_validation_asset
from pipeline.automation import build_schedule, build_sensor, failure_guidance_sensor
from pipeline.garbage_collection import tune_for_pipeline_process
from pipeline.output_folder import zone_from_environment
from pipeline.resources import AssetStore, StudySettings

JOB_NAME = "mesae_nightly"
# A run the schedule, the sensor or the UI starts has nobody to start it again if it gives up: it
# waits for the run before it (the 07:00 run and a new transfer's run, say) rather than failing
# after the 30 s `mesae run` waits for at a terminal. The launchpad can set another wait.
CODE_LOCATION_LOCK_TIMEOUT = 4 * 3600.0
DEFAULT_EXPORTS = "demo/exports"
DEFAULT_OUTPUT = "demo/output"


def build_definitions(exports: str | Path, output: str | Path, zone: str = "blinded",
                      lock_timeout_seconds: float = 30.0, sites_withdrawn: list[str] | None = None) -> dg.Definitions:
    assets = [site_transfers, build_raw_ingest(), build_validation_asset(zone),
              build_sdtm_assets(zone),
              build_report_assets(zone)]
    if zone == "unblinded":
        assets.append(build_randomization_asset())
    # The job observes the exports first (a step of its own): each raw materialization then records
    # the exports' data version it read, and the UI flags raw/* stale only when a site sends data.
    exports, output = str(Path(exports).absolute()), str(Path(output).absolute())
    # The zone is code; the code version and exports a run used are recorded by the run itself
    # (reports/publication), as the launchpad can change the folders and a run process loads the
    # metadata afresh.
    job = dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.all(include_sources=True),
                              executor_def=dg.in_process_executor,
                              description=f"Every asset of the {zone} zone: ingest, validate, map, publish.",
                              tags={"mesae/zone": zone})
    return dg.Definitions(
        assets=assets, jobs=[job],
        schedules=[build_schedule(job)], sensors=[build_sensor(job, exports), failure_guidance_sensor],
        resources={"settings": StudySettings.for_zone(zone, exports_dir=exports, output_dir=output,
                                                      lock_timeout_seconds=lock_timeout_seconds,
                                                      sites_withdrawn=sorted(sites_withdrawn or [])),
                   "store": AssetStore.for_zone(zone, output_dir=output)},
        executor=dg.in_process_executor,
    )


tune_for_pipeline_process()
defs = build_definitions(os.environ.get("MESAE_EXPORTS", DEFAULT_EXPORTS), os.environ.get("MESAE_OUTPUT", DEFAULT_OUTPUT),
                         zone_from_environment(), CODE_LOCATION_LOCK_TIMEOUT)
