"""The Dagster floor of the fixed cost: the pipeline's own asset graph (its steps, assets, checks
and dependencies, the in-process executor, the SQLite instance in $DAGSTER_HOME) with steps that
do nothing, run end to end in this process. What a 38-subject `mesae run` takes above it is the
pipeline's own work. Run by run_benchmark.py; by hand:

    DAGSTER_HOME=/tmp/floor .venv/bin/python benchmarks/dagster_floor.py
"""

from __future__ import annotations

import sys

import dagster as dg

from pipeline.assets.raw import EXPORTS_KEY
from pipeline.definitions import JOB_NAME, build_definitions


def in_dependency_order(specs) -> list[dg.AssetKey]:
    """A multi-asset yields an asset after the assets of its own step that it depends on."""
    pending = {s.key: {d.asset_key for d in s.deps} for s in specs}
    order: list[dg.AssetKey] = []
    while pending:
        ready = [k for k, deps in pending.items() if not deps & pending.keys()]
        order += ready
        for key in ready:
            del pending[key]
    return order


def no_op_step(step: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The same step (its assets and checks), materializing and passing without any work."""
    keys, checks = in_dependency_order(step.specs), list(step.check_specs)

    @dg.multi_asset(name=step.node_def.name, specs=list(step.specs), check_specs=checks, can_subset=False)
    def _no_op():
        for key in keys:
            yield dg.MaterializeResult(asset_key=key)
        for check in checks:
            yield dg.AssetCheckResult(asset_key=check.asset_key, check_name=check.name, passed=True)

    return _no_op


def pipeline_steps() -> list[dg.AssetsDefinition]:
    """The pipeline's steps (multi-assets), as the definitions build them."""
    pipeline = build_definitions("unused-exports", "unused-output")
    return [a for a in pipeline.assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable]


@dg.observable_source_asset(key=EXPORTS_KEY)
def exports_observed() -> dg.DataVersion:
    """The job's first step observes the exports, as the pipeline's does."""
    return dg.DataVersion("floor")


def floor_job() -> dg.JobDefinition:
    job = dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.all(include_sources=True),
                              executor_def=dg.in_process_executor)
    assets = [exports_observed, *(no_op_step(s) for s in pipeline_steps())]
    return dg.Definitions(assets=assets, jobs=[job]).resolve_job_def(JOB_NAME)


def main() -> int:
    with dg.DagsterInstance.get() as instance:
        result = floor_job().execute_in_process(
            instance=instance, run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
