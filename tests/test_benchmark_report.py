"""The benchmark's ratios, checked on numbers worked out by hand (the benchmark itself is run from
the README, not in CI: it takes minutes and measures the machine, not the code)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("run_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(subjects, floor, walls, floor_cpu, cpus, rss=100.0, dagster_floors=(5.0, 7.5, 5.5)):
    """One size's results with its runs in round order; the table shows the median run."""
    return {"subjects": subjects, "lb_rows": subjects * 70, "csv_mb": subjects / 150, "floor": floor,
            "run": sorted(walls)[1], "first_run": 20.0, "floor_cpu": floor_cpu, "cpu": sorted(cpus)[1],
            "rss_mb": rss, "ingest": 0.1, "validation": 0.2, "mapping": 0.3, "reports+write": 0.4, "overhead": 1.0,
            "round_wall": walls, "round_cpu": cpus, "round_dagster_floor": list(dagster_floors)}


def test_ratios_follow_the_issue_formulas_within_rounds(benchmark):
    # Round 2 ran on a slow host: every size took longer. Differences within a round cancel that.
    text = benchmark.report([
        row(38, floor=0.10, walls=[9.0, 12.0, 9.5], floor_cpu=0.10, cpus=[8.5, 11.5, 9.0]),
        row(1000, floor=0.20, walls=[10.0, 13.0, 10.5], floor_cpu=0.20, cpus=[9.5, 12.5, 10.0]),
        row(10000, floor=1.10, walls=[15.0, 18.5, 15.5], floor_cpu=1.30, cpus=[14.5, 18.0, 15.0], rss=1200.0),
    ], imports=2.5)
    # wall differences 6.0, 6.5, 6.0 -> median 6.0; / (1.1 - 0.1) = 6.00
    # CPU differences 6.0, 6.5, 6.0 -> 6.0; / (1.3 - 0.1) = 5.00
    assert "**6.00x** wall, **5.00x** CPU" in text
    # 6.0 / median(1.0, 1.0, 1.0) = 6.0
    assert "**6.0x** (target <= 11x)" in text
    assert "**9.50 s** (target < 8 s); of which importing the definitions 2.50 s." in text
    assert "**1200 MB**" in text
    # Dagster floor median 5.5; 38-subject run minus floor per round 4.0, 4.5, 4.0 -> 4.0
    assert "**5.50 s**; the 38-subject run takes **4.00 s** more" in text
    assert text.count("\n| ") == 4   # header and three sizes


def test_ratios_are_left_out_when_a_size_is_missing(benchmark):
    text = benchmark.report([row(38, floor=0.1, walls=[9.0, 9.1, 9.2], floor_cpu=0.1, cpus=[8.5, 8.6, 8.7])])
    assert "Fixed cost" in text
    assert "Marginal" not in text and "Linearity" not in text and "Peak RSS" not in text


def test_dagster_floor_runs_the_pipelines_own_asset_graph():
    """The floor is only a floor of *this* pipeline if its graph is the pipeline's, step for step."""
    import dagster as dg

    spec = importlib.util.spec_from_file_location("dagster_floor", SCRIPT.parent / "dagster_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    from pipeline.definitions import JOB_NAME, build_definitions

    real = floor.pipeline_steps()
    job = floor.floor_job()
    pipeline_job = build_definitions("unused-exports", "unused-output").resolve_job_def(JOB_NAME)

    def steps(job: dg.JobDefinition) -> dict[str, set[str]]:
        return {n.name: set(n.definition.output_dict) for n in job.graph.node_dict.values()}

    assert steps(job) == steps(pipeline_job)    # the observation of the exports included
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert len(result.get_asset_materialization_events()) == sum(len(s.keys) for s in real)
    assert len(result.get_asset_check_evaluations()) == sum(len(s.check_keys) for s in real)
