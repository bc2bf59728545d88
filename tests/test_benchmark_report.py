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


def row(subjects, floor, run, floor_cpu, cpu, rss=100.0):
    return {"subjects": subjects, "lb_rows": subjects * 70, "csv_mb": subjects / 150, "floor": floor, "run": run,
            "first_run": run + 1, "floor_cpu": floor_cpu, "cpu": cpu, "rss_mb": rss, "ingest": 0.1,
            "validation": 0.2, "mapping": 0.3, "reports+write": 0.4, "overhead": run - 1.0}


def test_ratios_follow_the_issue_formulas(benchmark):
    text = benchmark.report([
        row(38, floor=0.10, run=9.00, floor_cpu=0.10, cpu=8.50),
        row(1000, floor=0.20, run=10.00, floor_cpu=0.20, cpu=9.50),
        row(10000, floor=1.10, run=15.00, floor_cpu=1.30, cpu=14.50, rss=1200.0),
    ], imports=2.5)
    # (15 - 9) / (1.1 - 0.1) = 6.00 wall; (14.5 - 8.5) / (1.3 - 0.1) = 5.00 CPU
    assert "**6.00x** wall, **5.00x** CPU" in text
    # (14.5 - 8.5) / (9.5 - 8.5) = 6.0
    assert "**6.0x** (target <= 11x)" in text
    assert "**9.00 s** (target < 8 s); of which importing the definitions 2.50 s." in text
    assert "**1200 MB**" in text
    assert text.count("\n| ") == 4   # header and three sizes


def test_ratios_are_left_out_when_a_size_is_missing(benchmark):
    text = benchmark.report([row(38, floor=0.1, run=9.0, floor_cpu=0.1, cpu=8.5)])
    assert "Fixed cost" in text
    assert "Marginal" not in text and "Linearity" not in text and "Peak RSS" not in text
