"""Benchmark: `mesae run` against the I/O floor at several trial sizes.

For each size it generates a trial with `mesae demo-data` (one transfer per site, so that the run
and the floor read the same files), then measures:
- the I/O floor: pyarrow reads every CURRENT CSV of the trial and writes it as Parquet, nothing else;
- `mesae run` end to end in a fresh process (wall time and peak RSS), and its stages from the
  Dagster run record (ingest, validation, mapping, reports and publication); the rest is process
  start-up (imports, instance) and Dagster's event writes between steps. The first run of a size
  also creates its Dagster instance (SQLite schema); the nightly runs against that instance are
  the ones the ratios use: five rounds over the sizes, median kept (one run past 10,000
  subjects); the floor is the median of three too;
- the import time of the pipeline's definitions, the part of the fixed cost that is Python start-up;
- the Dagster floor (benchmarks/dagster_floor.py): the same asset graph with steps that do
  nothing, in each round, so that the fixed cost splits into Dagster's and the pipeline's own.
It prints a table and writes benchmarks/results.md. Usage:

    .venv/bin/python benchmarks/run_benchmark.py                  # 38, 1,000 and 10,000 subjects
    .venv/bin/python benchmarks/run_benchmark.py --sizes 38 1000 10000 30000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median_high

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
STEPS = {"raw_ingest": "ingest", "raw_contract_validation": "validation", "sdtm_domains": "mapping",
         "reports": "reports+write"}


def io_floor(exports: Path, scratch: Path) -> tuple[float, float]:
    """Wall and CPU seconds for pyarrow to read every CURRENT CSV (in its declared encoding) and
    write it as Parquet."""
    scratch.mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), time.process_time()
    for site in sorted(exports.glob("site-*")):
        transfer = sorted(p for p in site.iterdir() if p.is_dir())[-1]
        manifest = json.loads((transfer / "manifest.json").read_text())
        options = pacsv.ReadOptions(encoding=manifest["encoding"])
        parse = pacsv.ParseOptions(newlines_in_values=True)
        for name in manifest["files"]:
            table = pacsv.read_csv(transfer / name, read_options=options, parse_options=parse)
            pq.write_table(table, scratch / f"{site.name}-{name}.parquet")
    return time.perf_counter() - started, time.process_time() - cpu


# Runs `mesae run` and, at exit, writes the process's own peak RSS (VmHWM). The rusage of a child
# is no good here: Linux keeps, across exec, the peak of the memory the child was forked from, so
# a 250 MB run would be reported with the benchmark's own size.
LAUNCH = """import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status, open(os.environ["MESAE_BENCH_PEAK"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
atexit.register(peak)
sys.argv = ["mesae", *sys.argv[1:]]
runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
"""


def run_pipeline(exports: Path, output: Path, home: Path) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS in MB, and stage seconds (plus the process's CPU seconds) of one
    `mesae run` in its own process. CPU seconds are steadier than wall time on a shared host."""
    peak_file = home.parent / "peak-rss-kb"
    env = {**os.environ, "DAGSTER_HOME": str(home), "MESAE_BENCH_PEAK": str(peak_file)}
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, "run", "--exports", str(exports),
                                    "--output", str(output)], env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise RuntimeError(f"mesae run failed: {errors.read().decode(errors='replace')}")
    return wall, int(peak_file.read_text()) / 1024, {**stages(home), "cpu": usage.ru_utime + usage.ru_stime}


def stages(home: Path) -> dict:
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_records(limit=1)[0]
        stats = instance.get_run_step_stats(run.dagster_run.run_id)
        return {STEPS.get(s.step_key, s.step_key): s.end_time - s.start_time for s in stats if s.end_time}


def import_seconds() -> float:
    """Median wall time of a fresh interpreter importing the pipeline's Dagster definitions."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pipeline.definitions"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return median_high(times)


def prepare(size: int, work: Path) -> dict:
    """Generates the trial, measures its floor (median of three) and a first run on a new instance."""
    root = work / f"n{size}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    exports = root / "exports"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "demo-data", "--out", str(exports), "--subjects",
                    str(size), "--transfers", "1"], check=True, stdout=subprocess.DEVNULL)
    generate = time.perf_counter() - started
    floors = [io_floor(exports, root / "floor") for _ in range(3)]
    first, _, _ = run_pipeline(exports, root / "output", root / "home")     # creates the Dagster instance
    return {"subjects": size, "root": root, "generate": generate, "floor": median_high(f[0] for f in floors),
            "floor_cpu": median_high(f[1] for f in floors), "first_run": first, "runs": []}


def dagster_floor(home: Path) -> float:
    """Wall seconds of benchmarks/dagster_floor.py in a fresh process against the instance in `home`."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "dagster_floor.py")], check=True, env={**os.environ, "DAGSTER_HOME": str(home)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def summarize(entry: dict) -> dict:
    """Median nightly run of one size, with its stages and the size of its inputs and outputs."""
    root = entry.pop("root")
    in_rounds = entry.pop("runs")
    wall, rss, steps = sorted(in_rounds, key=lambda r: r[0])[len(in_rounds) // 2]
    summary = json.loads((root / "output" / "run.json").read_text())
    csv_mb = sum(p.stat().st_size for p in (root / "exports").rglob("*.csv")) / 1e6
    return {**entry, "lb_rows": summary["records"].get("lb", 0), "csv_mb": csv_mb, "run": wall, "rss_mb": rss,
            **steps, "overhead": wall - sum(v for k, v in steps.items() if k in STEPS.values()),
            "round_wall": [r[0] for r in in_rounds], "round_cpu": [r[2]["cpu"] for r in in_rounds]}


def measure(sizes: list[int], work: Path, rounds: int = 5) -> list[dict]:
    """Nightly runs against the existing instances, in rounds over the sizes (38, 1,000, 10,000,
    38, ...): this host's speed drifts by a third over minutes, so the differences between sizes
    are taken within a round (see `paired`). Sizes past 10,000 subjects run once."""
    entries = {size: prepare(size, work) for size in sizes}
    floors = []
    dagster_floor(work / "dagster-floor")                                   # creates its instance
    for _ in range(rounds):
        floors.append(dagster_floor(work / "dagster-floor"))
        for size, entry in entries.items():
            if size <= 10000 or not entry["runs"]:
                entry["runs"].append(run_pipeline(entry["root"] / "exports", entry["root"] / "output",
                                                  entry["root"] / "home"))
    results = [summarize(entry) for entry in entries.values()]
    for result in results:
        result["round_dagster_floor"] = floors
    return results


def paired(larger: list[float], smaller: list[float]) -> float:
    """Median over rounds of larger - smaller: the marginal cost, measured between runs made a
    minute apart rather than between medians taken at different times."""
    return median_high(a - b for a, b in zip(larger, smaller))


def report(results: list[dict], imports: float | None = None) -> str:
    cores = os.cpu_count()
    lines = ["# Benchmark results\n", f"Machine: {cores} cores, Python {sys.version.split()[0]}; "
             f"one transfer per site; times in seconds (wall), RSS in MB.\n",
             "| subjects | LB rows | CSV MB | I/O floor | run | first run (new instance) | floor CPU | run CPU | "
             "peak RSS | ingest | validation | mapping | reports+write | start-up + Dagster |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['subjects']:,} | {r['lb_rows']:,} | {r['csv_mb']:.1f} | {r['floor']:.2f} | {r['run']:.2f} | "
                     f"{r['first_run']:.2f} | {r['floor_cpu']:.2f} | {r['cpu']:.2f} | {r['rss_mb']:.0f} | {r['ingest']:.2f} | {r['validation']:.2f} | {r['mapping']:.2f} | "
                     f"{r['reports+write']:.2f} | {r['overhead']:.2f} |")
    by_size = {r["subjects"]: r for r in results}
    small, mid, large = by_size.get(38), by_size.get(1000), by_size.get(10000)
    lines.append("")
    if small:
        lines.append(f"- Fixed cost (38 subjects, end to end, Dagster start-up included): **{small['run']:.2f} s** "
                     "(target < 8 s)" + (f"; of which importing the definitions {imports:.2f} s." if imports else "."))
        floors = small["round_dagster_floor"]
        lines.append(f"- Dagster floor (the same asset graph, its steps doing nothing; imports included): "
                     f"**{median_high(floors):.2f} s**; the 38-subject run takes "
                     f"**{paired(small['round_wall'], floors):.2f} s** more (median within a round).")
    if small and large:
        ratio = paired(large["round_wall"], small["round_wall"]) / (large["floor"] - small["floor"])
        cpu_ratio = paired(large["round_cpu"], small["round_cpu"]) / (large["floor_cpu"] - small["floor_cpu"])
        lines.append(f"- Marginal cost against the floor, (run@10,000 - run@38) / (floor@10,000 - floor@38), "
                     "run differences taken within each round (median): "
                     f"**{ratio:.2f}x** wall, **{cpu_ratio:.2f}x** CPU (target <= 3x, stretch 2x).")
    if small and mid and large:
        linear = paired(large["round_cpu"], small["round_cpu"]) / paired(mid["round_cpu"], small["round_cpu"])
        lines.append(f"- Linearity, marginal CPU time at 10,000 / marginal CPU time at 1,000: **{linear:.1f}x** "
                     "(target <= 11x).")
    if large:
        lines.append(f"- Peak RSS at 10,000 subjects: **{large['rss_mb']:.0f} MB** (target < 1,536 MB).")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[38, 1000, 10000])
    parser.add_argument("--work", type=Path, default=HERE / "work", help="scratch folder (default benchmarks/work)")
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    imports = import_seconds()
    results = measure(args.sizes, args.work)
    for result in results:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    text = report(results, imports)
    args.results.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
