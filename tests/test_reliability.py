"""What a data manager relies on when things go wrong (pipeline-contract.md sections 1 and 2):
a run killed at any point, two runs at once, read-only inputs, a full disk or an unwritable
output folder never leave a mixed, half-written or missing set of outputs, and the next run
cleans up. Real `mesae run` processes are killed with SIGKILL; permission faults run as user
nobody; the disk fills on a real tmpfs where mounting is allowed.

Time budget (2 cores): about two minutes. One small synthetic trial (5 subjects) serves every
test; a second exports root adds a newer site-01 transfer with one lab row fewer, so an output
set that mixed the two would show (record counts, run.json inputs and lineage disagree).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline.output_folder import STALE_SUFFIX, OutputFolder, OutputFolderBusy, OutputFolderError, asset_store
from pipeline.resources import AssetStore

NOBODY = 65534
PYTHON = sys.executable
# Memory-backed temporary storage where there is one: what these tests check (rename, symlink,
# flock, permissions, SIGKILL) behaves the same there, and Dagster's SQLite and the fsyncs are
# several times faster, which keeps the whole file near two minutes.
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
RUN_ID = re.compile(r"run ([0-9a-f-]{36}) published")


# --- shared trial and helpers --------------------------------------------------------------

@dataclasses.dataclass
class World:
    base: Path            # world-traversable temporary folder (user nobody works in it)
    exports: Path         # E1, read-only (chmod -R a-w)
    newer: Path           # E2 = E1 + a newer site-01 transfer with one lab row fewer
    baseline: Path        # output of one in-process run on E1
    baseline_home: Path
    exports_before: dict  # snapshot of E1 before any run
    audit: list           # file operations under E1 seen in process during the baseline run
    second: "Finished"    # a second fresh run on E1 in a subprocess (as nobody when possible)
    second_output: Path
    second_as_nobody: bool


@dataclasses.dataclass
class Finished:
    code: int
    stdout: str
    stderr: str
    seconds: float


class Running:
    """A `mesae run` subprocess (python -m pipeline.cli) with its output in files."""

    def __init__(self, exports, output, home, *extra, logs: Path, nobody=None, name="run"):
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
        env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home)}
        env.pop("MESAE_UNBLINDED", None)
        command = [PYTHON, "-m", "pipeline.cli", "run", "--exports", str(exports), "--output", str(output), *extra]
        prefix, preexec = nobody if nobody else ([], None)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.started = time.monotonic()
            self.process = subprocess.Popen(prefix + command, env=env, cwd=home, stdout=out, stderr=err,
                                            preexec_fn=preexec)
        self.finished_at = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        if self.process.poll() is None:
            return True
        if self.finished_at is None:
            self.finished_at = time.monotonic()
        return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 180) -> Finished:
        code = self.process.wait(timeout)
        self.running()
        return Finished(code, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"),
                        self.finished_at - self.started)


def wait_until(condition, run: Running | None = None, timeout: float = 120, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if run is not None and not run.running():
            raise AssertionError(f"the run ended (code {run.process.returncode}) before the kill point")
        if time.monotonic() > deadline:
            raise AssertionError("kill point not reached in time")
        time.sleep(poll)


def make_home(path: Path, owner: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


@functools.cache
def nobody_runner() -> tuple[tuple[list[str], object] | None, str]:
    """(command prefix, preexec_fn) that runs a command as user nobody, or None and the reason.

    Plain setuid in preexec_fn works where nobody can read the interpreter. Where it lives under a
    private /root (as on the development machine), `setpriv` runs as nobody keeping only
    CAP_DAC_READ_SEARCH: nobody may read everything, but writes are checked like any user's."""
    if os.geteuid() != 0:
        return None, "switching to user nobody needs root"

    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    def works(command, preexec=None) -> bool:
        try:
            return subprocess.run(command, preexec_fn=preexec, cwd="/", capture_output=True).returncode == 0
        except OSError:  # nobody may not even execute the interpreter
            return False

    probe = [PYTHON, "-c", "import pipeline.cli"]
    if works(probe, drop):
        return ([], drop), ""
    setpriv = shutil.which("setpriv")
    if setpriv:
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                  "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search"]
        if works(prefix + probe):
            return (prefix, None), ""
    return None, "user nobody cannot run this Python and setpriv is not available"


def needs_nobody():
    runner, reason = nobody_runner()
    if runner is None:
        pytest.skip(reason)
    return runner


def snapshot(root: Path) -> dict:
    """Every path under root with type, size, mtime, inode, mode and content hash."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [""] + dirs + files if folder == str(root) else dirs + files:
            path = os.path.join(folder, name) if name else folder
            info = os.lstat(path)
            digest = None
            if os.path.isfile(path) and not os.path.islink(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            out[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino, digest)
    return out


def published(output: Path) -> dict[str, bytes]:
    """The contract's outputs, read through the published paths; each must open and parse."""
    files = {}
    for relative in ["quarantine.parquet", "transfers.parquet", "run.json"]:
        files[relative] = (output / relative).read_bytes()
    for folder in ["sdtm", "lineage"]:
        for path in sorted((output / folder).glob("*.parquet")):
            files[f"{folder}/{path.name}"] = path.read_bytes()
    assert any(k.startswith("sdtm/") for k in files) and any(k.startswith("lineage/") for k in files)
    for relative, data in files.items():
        if relative.endswith(".parquet"):
            pq.read_table(io.BytesIO(data))
        else:
            json.loads(data)
    return files


def datasets(files: dict[str, bytes]) -> dict[str, bytes]:
    """What must not depend on when or where a run happened: everything but run.json."""
    return {k: v for k, v in files.items() if k != "run.json"}


def assert_one_set(folder: Path) -> dict:
    """The files of one published set agree with each other: run.json names the CURRENT transfers
    of transfers.parquet, counts the records of every SDTM dataset, and every lineage row points
    to a transfer and file checksum of run.json. A set mixing two runs' files fails this."""
    release = (folder / "current").resolve() if (folder / "current").is_symlink() else folder
    summary = json.loads((release / "run.json").read_text(encoding="utf-8"))
    inventory = pq.read_table(release / "transfers.parquet").to_pandas()
    current = inventory[inventory["STATUS"] == "CURRENT"]
    assert dict(zip(current["SITEID"], current["TRANSFER"])) == {s: v["transfer"] for s, v in summary["inputs"].items()}
    assert sorted(p.stem for p in (release / "sdtm").glob("*.parquet")) == sorted(summary["records"])
    for dataset, records in summary["records"].items():
        assert pq.read_metadata(release / "sdtm" / f"{dataset}.parquet").num_rows == records, dataset
        lineage = pq.read_table(release / "lineage" / f"{dataset}.parquet",
                                columns=["SITEID", "TRANSFER", "FILE", "SHA256"]).to_pandas()
        assert len(lineage) == records, dataset
        for site, transfer, file, sha in lineage.drop_duplicates().itertuples(index=False):
            assert summary["inputs"][site]["transfer"] == transfer, (dataset, site)
            assert summary["inputs"][site]["sha256"][file] == sha, (dataset, site, file)
    return summary


def leftovers(output: Path) -> dict[str, list[str]]:
    """What an unfinished run can leave behind, by kind."""
    state = output / ".mesae"
    staging = state / "staging"
    return {
        "staging": sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [],
        "links": sorted(p.name for p in output.iterdir() if p.name.startswith(".current-")),
        "temporary": sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.suffix in (".tmp", STALE_SUFFIX)),
        "releases": sorted(p.name for p in (state / "releases").iterdir()),
    }


def assert_clean(output: Path) -> None:
    """After a successful run: no staging, no temporary files or links; current and at most one
    previous release kept."""
    left = leftovers(output)
    assert left["staging"] == [] and left["links"] == [] and left["temporary"] == [], left
    current = os.path.basename(os.readlink(output / "current"))
    assert current in left["releases"] and len(left["releases"]) <= 2, left


def copy_output(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def add_newer_transfer(exports: Path) -> None:
    """Site 01 sends a newer full snapshot: the same files with the last lab row gone."""
    site = exports / "site-01"
    newest = sorted(p for p in site.iterdir() if p.is_dir())[-1]
    target = site / "20261124T230000"
    shutil.copytree(newest, target)
    for path in [target, *target.iterdir()]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["encoding"] == "utf-8"
    data = (target / "lb.csv").read_bytes()
    records = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    ending = "\r\n" if b"\r\n" in data else "\n"
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator=ending).writerows(records[:-1])
    data = buffer.getvalue().encode("utf-8")
    (target / "lb.csv").write_bytes(data)
    manifest["files"]["lb.csv"] = {"rows": len(records) - 2, "sha256": hashlib.sha256(data).hexdigest()}
    manifest["exported_at"] = "2026-11-24T23:00:00Z"
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def make_read_only(root: Path) -> None:
    for folder, dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


# --- in-process audit of file operations ---------------------------------------------------

_AUDIT = {"root": None, "events": [], "busy": False}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
MUTATING_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                   "os.chmod", "os.chown", "os.utime", "os.chflags", "os.setxattr", "os.removexattr",
                   "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move", "shutil.chown"}
LISTING_EVENTS = {"os.listdir", "os.scandir", "open"}


def _audit_path(value, dir_fd=None) -> str | None:
    if isinstance(value, int) or value is None:
        return None
    path = os.fsdecode(value)
    if dir_fd is not None and not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            return None
    return os.path.abspath(path)


def _audit_hook(event: str, args: tuple) -> None:
    root = _AUDIT["root"]
    if root is None or _AUDIT["busy"] or (event not in MUTATING_EVENTS and event not in LISTING_EVENTS):
        return
    _AUDIT["busy"] = True
    try:
        paths = []
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                     (isinstance(flags, int) and bool(flags & WRITE_FLAGS))
            paths = [(_audit_path(path), "open for writing" if writes else "open")]
        elif event in ("os.rename", "os.link", "os.symlink"):
            paths = [(_audit_path(args[0]), event), (_audit_path(args[1]), event)]
        elif event in ("os.listdir", "os.scandir"):
            paths = [(_audit_path(args[0] if args else "."), event)]
        else:
            dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "os.mkdir") and len(args) > 1 and \
                isinstance(args[-1], int) else None
            paths = [(_audit_path(args[0], dir_fd), event)]
        for path, what in paths:
            if path is not None and (path == root or path.startswith(root + os.sep)):
                _AUDIT["events"].append((what, path))
    finally:
        _AUDIT["busy"] = False


def watch_file_operations(root: Path | None) -> list:
    """Records Python-level file operations under root (None stops). Arrow's C++ writers bypass
    audit hooks: the OS-level read-only test covers them."""
    if not getattr(sys, "_mesae_reliability_hook", False):
        sys.addaudithook(_audit_hook)
        sys._mesae_reliability_hook = True
    _AUDIT["events"] = []
    _AUDIT["root"] = None if root is None else os.path.realpath(root)
    return _AUDIT["events"]


# --- the shared trial ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def world() -> World:
    """E1 (read-only) and E2; one in-process run on E1 under the audit hook and, at the same time
    on the other core, a second fresh run on E1 in a subprocess (as user nobody when possible)."""
    from pipeline.synthetic_trial import generate_trial

    base = Path(tempfile.mkdtemp(prefix="mesae-reliability-", dir=FAST_TMP))
    os.chmod(base, 0o755)
    second = None
    try:
        exports, newer = base / "exports", base / "exports-newer"
        generate_trial(exports, subjects=5)
        shutil.copytree(exports, newer)
        add_newer_transfer(newer)
        make_read_only(exports)
        before = snapshot(exports)

        runner, _ = nobody_runner()
        owner = NOBODY if runner else None
        second_output = base / "second-output"
        make_home(second_output, owner)
        second = Running(exports, second_output, make_home(base / "second-home", owner), logs=base / "logs",
                         nobody=runner, name="second")

        events = watch_file_operations(exports)
        try:
            code = run_cli("run", "--exports", str(exports), "--output", str(base / "baseline"),
                           home=base / "baseline-home")
        finally:
            watch_file_operations(None)
        assert code == 0
        yield World(base, exports, newer, base / "baseline", base / "baseline-home", before, list(events),
                    second.wait(), second_output, runner is not None)
    finally:
        if second is not None and second.running():  # the in-process run failed: stop ours
            second.kill()
            second.process.wait()
        shutil.rmtree(base, ignore_errors=True)


# --- 3. inputs untouched -------------------------------------------------------------------

def test_exports_are_never_written_by_the_pipeline_process(world):
    """In process (audit hook): no open for writing, create, rename or delete under the exports
    root; and a blinded run never lists or opens `unblinded/`."""
    writes = [e for e in world.audit if e[0] not in ("open", "os.listdir", "os.scandir")]
    assert writes == []
    assert any(what == "open" for what, _ in world.audit), "the hook saw no read at all: it is not watching"
    unblinded = str(os.path.realpath(world.exports / "unblinded"))
    assert [e for e in world.audit if e[1] == unblinded or e[1].startswith(unblinded + os.sep)] == []


def test_read_only_exports_run_as_nobody_and_stay_unchanged(world):
    """A run as user nobody on an exports tree nobody cannot write succeeds; afterwards nothing
    under the exports root differs (paths, sizes, mtimes, inodes, modes, contents), after that
    run and the in-process one."""
    if not world.second_as_nobody:
        pytest.skip(nobody_runner()[1])
    assert world.second.code == 0, world.second.stderr
    assert "Traceback" not in world.second.stderr
    assert snapshot(world.exports) == world.exports_before
    assert os.stat(world.second_output / ".mesae" / "zone").st_uid == NOBODY


# --- 4. determinism ------------------------------------------------------------------------

def test_two_fresh_runs_give_byte_identical_outputs(world):
    """Same inputs, two fresh output folders, two processes (and users): the same bytes in every
    dataset, quarantine, transfers and lineage file (contract section 3); run.json differs only
    in its run id and time."""
    assert world.second.code == 0, world.second.stderr
    first, second = published(world.baseline), published(world.second_output)
    assert datasets(first) == datasets(second)
    one, two = json.loads(first["run.json"]), json.loads(second["run.json"])
    assert one["run_id"] != two["run_id"]
    for summary in (one, two):
        summary.pop("run_id"), summary.pop("finished_at")
    assert one == two
    assert_one_set(world.baseline)


def test_rerun_into_the_same_output_changes_no_byte(world):
    """Running again on unchanged inputs publishes a new release with the same bytes."""
    output = copy_output(world.baseline, world.base / "rerun-output")
    before = published(output)
    assert run_cli("run", "--exports", str(world.exports), "--output", str(output), home=world.baseline_home) == 0
    after = published(output)
    assert datasets(after) == datasets(before)
    assert json.loads(after["run.json"])["run_id"] != json.loads(before["run.json"])["run_id"]
    assert_clean(output)


# --- 1. kill during a run ------------------------------------------------------------------

def lock_holder(output: Path) -> str:
    try:
        return (output / ".mesae" / "lock").read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_sigkill_at_any_point_leaves_the_previous_outputs_and_the_next_run_cleans_up(world):
    """SIGKILL a real `mesae run` on newer inputs during publication (staging half written), at
    startup and during ingest. Each time the published outputs are byte-identical to before and
    form one set; a run that got the lock removed the staging left by the killed publication;
    the next complete run publishes the newer set and leaves nothing behind."""
    output = copy_output(world.baseline, world.base / "kill-output")
    before = published(output)
    home, logs = make_home(world.base / "kill-home"), world.base / "kill-logs"
    kill_points = [  # publication first, so that a later run has its leftovers to remove
        ("publication", lambda run: wait_until(lambda: any((output / ".mesae" / "staging").glob("*/*")), run)),
        ("startup", lambda run: time.sleep(1.0)),
        ("ingest", lambda run: (wait_until(lambda: lock_holder(output).startswith(f"pid {run.pid} "), run),
                                time.sleep(1.0))),
    ]
    previous_leftovers: list[str] = []
    for point, reach in kill_points:
        run = Running(world.newer, output, home, logs=logs, name=point)
        reach(run)
        assert run.running(), f"{point}: the run finished before it could be killed"
        run.kill()
        assert run.wait().code == -signal.SIGKILL
        assert published(output) == before, f"published outputs changed by a run killed at {point}"
        assert_one_set(output)
        left = leftovers(output)
        assert left["links"] == [], left
        if point == "publication":
            assert left["staging"], "killed during publication but no staging folder was left to clean"
        elif point == "startup":  # killed before taking the lock: it removed nothing
            assert left["staging"] == previous_leftovers, left
        else:  # this run held the lock, so it removed what the killed publication left
            assert not set(previous_leftovers) & set(left["staging"]), (point, left)
        previous_leftovers = left["staging"]

    assert run_cli("run", "--exports", str(world.newer), "--output", str(output), home=home) == 0
    after = published(output)
    assert_clean(output)
    summary = assert_one_set(output)
    assert summary["inputs"]["01"]["transfer"] == "20261124T230000"
    assert summary["records"]["lb"] == json.loads(before["run.json"])["records"]["lb"] - 1
    assert after["sdtm/lb.parquet"] != before["sdtm/lb.parquet"]


CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from pipeline.output_folder import OutputFolder

    out, run_id, kill_at = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    calls = 0

    def counted(function):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    for name in ("mkdir", "rename", "replace", "symlink", "link", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))

    folder = OutputFolder(out, "blinded")
    folder.claim()
    folder.acquire(10)
    folder.clean_leftovers()
    staging = folder.new_staging(run_id)
    for name in sys.argv[5:]:
        path = staging / name
        os.makedirs(path.parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, f"{run_id}:{name}".encode())
        os.close(fd)
    folder.publish(staging)
    folder.release()
    print(calls)
""")
PIPELINE_ROOT = str(Path(__import__("pipeline").__file__).resolve().parent.parent)
SET = ["sdtm/dm.parquet", "sdtm/ae.parquet", "lineage/dm.parquet", "lineage/ae.parquet", "quarantine.parquet",
       "transfers.parquet", "run.json", "reports/traceability.html"]


def crashing_run(output: Path, run_id: str, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-I", "-S", "-c", CRASHING_RUN, PIPELINE_ROOT, str(output), run_id, str(kill_at), *SET],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def fast_tmp(tmp_path):
    """FAST_TMP (these tests run a hundred short publications), else tmp_path."""
    if FAST_TMP is None:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mesae-steps-", dir=FAST_TMP))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def visible_set(output: Path) -> str | None:
    """The run whose files a reader sees: resolving `current` once and through the published
    paths; fails on a mixed or partial set. None when nothing was ever published."""
    if not (output / "current").exists():
        return None
    release = (output / "current").resolve()
    owners = {(release / name).read_text().split(":")[0] for name in SET}
    owners |= {(output / name).read_text().split(":")[0] for name in SET}
    assert len(owners) == 1, f"mixed set: {owners}"
    return owners.pop()


def test_publication_killed_at_every_step_is_all_or_nothing(fast_tmp):
    """The output folder's own steps (zone, lock, cleanup, staging, rename, symlink swap, pruning),
    with a SIGKILL before each call that changes the file system (mkdir, rename, replace, symlink,
    link, unlink, rmdir) in turn: a reader always sees exactly the old set or the new one, and the
    next run publishes and leaves no leftovers (no staging, no temporary `.current-*` link or
    zone file, at most the current and previous release)."""
    output = fast_tmp / "out"
    assert crashing_run(output, "first", 0).returncode == 0
    assert crashing_run(output, "second", 0).returncode == 0
    old = "second"
    for kill_at in range(1, 300):
        crashed = crashing_run(output, f"killed{kill_at}", kill_at)
        assert crashed.returncode in (0, -signal.SIGKILL), (kill_at, crashed.stderr)
        if crashed.returncode == 0:  # every step has been interrupted once
            assert kill_at > 20 and visible_set(output) == f"killed{kill_at}"
            break
        seen = visible_set(output)
        assert seen in (old, f"killed{kill_at}"), (kill_at, seen)
        following = crashing_run(output, f"next{kill_at}", 0)
        assert following.returncode == 0, (kill_at, following.stderr)
        assert visible_set(output) == f"next{kill_at}"
        left = leftovers(output)
        assert left["staging"] == [] and left["links"] == [] and left["temporary"] == [], (kill_at, left)
        assert len(left["releases"]) <= 2, (kill_at, left)
        old = f"next{kill_at}"


def test_first_publication_killed_at_every_step_leaves_nothing_or_everything(fast_tmp):
    """Before the first complete run a reader sees no outputs (not an empty or partial set)."""
    steps = int(crashing_run(fast_tmp / "probe", "probe", 0).stdout)
    assert steps > 10
    for kill_at in range(1, steps + 1):
        output = fast_tmp / f"out{kill_at}"
        assert crashing_run(output, "killed", kill_at).returncode == -signal.SIGKILL, kill_at
        assert visible_set(output) in (None, "killed"), kill_at
        assert crashing_run(output, "next", 0).returncode == 0, kill_at
        assert visible_set(output) == "next"
        assert_clean(output)


def test_the_new_release_is_durable_before_current_points_to_it(tmp_path, monkeypatch):
    """After a power cut `current` must not point to a release whose directory entry was never
    written: the rename into releases/ is fsync'ed (the releases folder) before the swap."""
    folder = OutputFolder(tmp_path / "out", "blinded")
    folder.claim()
    calls = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append(("rename", str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b))[1])
    staging = folder.new_staging("r1")
    (staging / "run.json").write_text("{}")
    release = folder.publish(staging)
    renamed = calls.index(("rename", str(release)))
    swapped = calls.index(("replace", str(folder.root / "current")))
    between = [path for kind, path in calls[renamed:swapped] if kind == "fsync"]
    assert str(release.parent) in between, calls
    assert ("fsync", str(folder.root)) in calls[swapped:], calls


# --- 2. single writer ----------------------------------------------------------------------

def test_lock_waits_then_names_the_folder_and_holder(tmp_path):
    holder = OutputFolder(tmp_path / "out", "blinded")
    holder.acquire(1)
    try:
        waiting = OutputFolder(tmp_path / "out", "blinded")
        started = time.monotonic()
        with pytest.raises(OutputFolderBusy) as busy:
            waiting.acquire(0.6)
        assert 0.5 <= time.monotonic() - started < 3
        message = str(busy.value)
        assert str(tmp_path / "out") in message and f"pid {os.getpid()}" in message and "\n" not in message
    finally:
        holder.release()
    waiting.acquire(0.1)  # released: taken at once
    waiting.release()


def test_a_run_of_the_code_location_waits_for_the_run_before_it_and_says_so(tmp_path):
    """A sensor's run that gave up after 30 s behind the nightly run was never started again: runs
    of the code location wait hours, and their log says for whom."""
    import threading

    from pipeline.definitions import CODE_LOCATION_LOCK_TIMEOUT, defs

    assert defs.resources["settings"].lock_timeout_seconds == CODE_LOCATION_LOCK_TIMEOUT >= 3600
    holder = OutputFolder(tmp_path / "out", "blinded")
    holder.acquire(1)
    heard = []
    threading.Timer(1.0, holder.release).start()
    follower = OutputFolder(tmp_path / "out", "blinded")
    follower.acquire(30, heard.append)   # taken once the holder is done
    follower.release()
    assert heard == [f"output folder {tmp_path / 'out'} is being written by pid {os.getpid()} since "
                     f"{heard[0].split(' since ')[1].split(';')[0]}; waiting up to 30 s for it to finish"]


def test_replaced_asset_files_are_gone_at_the_end_of_the_run_or_at_the_next_one(tmp_path):
    """AssetStore.save sets the old file aside and deletes it in the background; the run's end
    waits for that, and a run killed before it leaves the file to the next run's cleanup."""
    store, key = AssetStore(output_dir=str(tmp_path)), dg.AssetKey(["sdtm", "lb"])
    store.save(key, pd.DataFrame({"LBTESTCD": ["HGB"]}))
    store.save(key, pd.DataFrame({"LBTESTCD": ["WBC"]}))
    store.teardown_after_execution(None)
    assert store.load(key)["LBTESTCD"].tolist() == ["WBC"]
    assert sorted(p.name for p in asset_store(tmp_path).rglob("*") if p.is_file()) == ["lb.arrow"]

    left = asset_store(tmp_path) / "sdtm" / f"lb.arrow.4242-0{STALE_SUFFIX}"
    left.write_bytes(b"set aside by a run killed before deleting it")
    # A run killed before renaming known_transfers.json left its temporary file (one per kill,
    # never removed); one of a live process (pid 1) may still be renamed and stays.
    dead = tmp_path / ".mesae" / f"known_transfers.json.{2 ** 22 + 17}.tmp"
    alive = tmp_path / ".mesae" / "known_transfers.json.1.tmp"
    for temporary in (dead, alive):
        temporary.write_text("{}")
    folder = OutputFolder(tmp_path, "blinded")
    with folder.locked(1):
        assert folder.clean_leftovers() == [left.name, dead.name]
    assert not left.exists() and store.load(key)["LBTESTCD"].tolist() == ["WBC"]
    assert not dead.exists() and alive.exists()


def test_background_parquet_writes_give_the_same_bytes_and_stop_at_the_first_failure(tmp_path, monkeypatch):
    from pipeline import sdtm_datasets

    tables = [pa.table({"USUBJID": [f"MESAE-01-{i:03d}"] * 3, "LBSEQ": [1, 2, 3]}) for i in range(4)]
    with sdtm_datasets.writes_in_background() as write_file:
        for i, table in enumerate(tables):
            write_file(table, tmp_path / "background" / f"{i}.parquet")
    for i, table in enumerate(tables):
        sdtm_datasets.write(table, tmp_path / "direct" / f"{i}.parquet")
        assert (tmp_path / "background" / f"{i}.parquet").read_bytes() == (tmp_path / "direct" / f"{i}.parquet").read_bytes()

    real_write, attempted = sdtm_datasets.write, []

    def full_disk_at_the_second(table, path):
        attempted.append(path.name)
        if len(attempted) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(table, path)

    monkeypatch.setattr(sdtm_datasets, "write", full_disk_at_the_second)
    with pytest.raises(OSError, match="No space left on device"):
        with sdtm_datasets.writes_in_background() as write_file:
            for i, table in enumerate(tables):
                write_file(table, tmp_path / "failing" / f"{i}.parquet")
    assert attempted == ["0.parquet", "1.parquet"]
    assert sorted(p.name for p in (tmp_path / "failing").iterdir()) == ["0.parquet"]


def test_zone_is_checked_again_under_the_lock(tmp_path):
    """Two runs of different zones start on a new folder at the same moment: both pass the check
    (nothing recorded yet); the second to get the lock must refuse the folder the first claimed."""
    exports = tmp_path / "exports"
    exports.mkdir()
    blinded, unblinded = OutputFolder(tmp_path / "out", "blinded"), OutputFolder(tmp_path / "out", "unblinded")
    blinded.check(exports)
    unblinded.check(exports)
    blinded.claim()
    unblinded.claim()
    with blinded.locked(1):
        staging = blinded.new_staging("r1")
        (staging / "run.json").write_text(json.dumps({"zone": "blinded"}))
        blinded.publish(staging)
    with pytest.raises(OutputFolderError, match="holds blinded outputs"):
        unblinded.acquire(1)
    assert unblinded._lock_handle is None
    assert (tmp_path / "out" / ".mesae" / "zone").read_text() == "blinded"


class Sampler(threading.Thread):
    """Watches an output folder every 5 ms: who holds the lock, which run is staging, and
    whether two runs ever stage at once."""

    def __init__(self, output: Path):
        super().__init__(daemon=True)
        self.output, self.holders, self.stagings, self.overlaps = output, [], [], []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            holder = lock_holder(self.output).split(" since")[0]
            if holder and (not self.holders or self.holders[-1] != holder):
                self.holders.append(holder)
            staging = sorted(p.name for p in (self.output / ".mesae" / "staging").glob("*"))
            if len(staging) > 1:
                self.overlaps.append(staging)
            if staging and (not self.stagings or self.stagings[-1] != staging[0]):
                self.stagings.append(staging[0])
            time.sleep(0.005)

    def stop(self):
        self.stopped.set()
        self.join()


@pytest.mark.slow
def test_two_runs_on_one_output_never_write_at_the_same_time(world, capsys):
    """While the folder is locked (as by a run in progress), C (--lock-timeout 1) gives up:
    exit 1 naming the folder; B (newer inputs, --lock-timeout 120) waits, then runs; A, started
    while B writes, waits for B and then publishes. One writer at a time throughout (lock
    holder and staging sampled every 5 ms); each release is one consistent set, B's the newer
    inputs', A's byte-identical to the first outputs (the same inputs give the same bytes,
    whatever ran in between)."""
    output = copy_output(world.baseline, world.base / "lock-output")
    before = published(output)
    logs, me = world.base / "lock-logs", f"pid {os.getpid()}"
    sampler = Sampler(output)
    held = OutputFolder(output, "blinded")
    held.acquire(1)
    try:
        sampler.start()
        b = Running(world.newer, output, make_home(world.base / "lock-home-b"), "--lock-timeout", "120",
                    logs=logs, name="b")
        c = Running(world.newer, output, make_home(world.base / "lock-home-c"), "--lock-timeout", "1",
                    logs=logs, name="c")
        done_c = c.wait()
        assert done_c.code == 1, done_c.stderr
        assert b.running() and lock_holder(output).startswith(me + " "), "B did not wait for the lock"
    finally:
        held.release()
    wait_until(lambda: lock_holder(output).startswith(f"pid {b.pid} "), b, poll=0.005)
    capsys.readouterr()
    code_a = run_cli("run", "--exports", str(world.exports), "--output", str(output), "--lock-timeout", "120",
                     home=world.base / "lock-home-a")
    out_a = capsys.readouterr().out
    done_b = b.wait()
    sampler.stop()

    assert code_a == 0 and done_b.code == 0, done_b.stderr
    assert sampler.overlaps == [], f"two runs staging at once: {sampler.overlaps}"
    assert sampler.holders == [me, f"pid {b.pid}", me], sampler.holders
    run_a, run_b = RUN_ID.search(out_a).group(1), RUN_ID.search(done_b.stdout).group(1)
    assert sampler.stagings == [run_b, run_a], sampler.stagings
    releases = output / ".mesae" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == sorted([run_a, run_b])
    assert os.path.basename(os.readlink(output / "current")) == run_a
    assert_clean(output)
    summary_a, summary_b = assert_one_set(releases / run_a), assert_one_set(releases / run_b)
    assert summary_b["inputs"]["01"]["transfer"] == "20261124T230000"
    assert summary_b["records"]["lb"] == summary_a["records"]["lb"] - 1
    after = datasets(published(output))
    assert {k: v for k, v in after.items() if k != "quarantine.parquet"} == \
        {k: v for k, v in datasets(before).items() if k != "quarantine.parquet"}, \
        "the same inputs gave other bytes after B's run"
    # ... and the quarantine says that site 01's data went back from B's newer transfer to A's
    import pandas as pd

    quarantine = pd.read_parquet(output / "quarantine.parquet")
    back = quarantine[quarantine["RULE"] == "TRF-SITE-BACK"]
    assert list(back["SITEID"]) == ["01"] and "older than 20261124T230000" in back["MESSAGE"].iloc[0]
    assert quarantine[quarantine["RULE"] != "TRF-SITE-BACK"].reset_index(drop=True).equals(
        pd.read_parquet(world.baseline / "quarantine.parquet"))

    assert "Traceback" not in done_c.stderr
    lines = [line for line in done_c.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("mesae: ") for line in lines), done_c.stderr
    assert str(output) in lines[0] and "is being written by" in lines[0], done_c.stderr


# --- 5. resource faults --------------------------------------------------------------------

def nobody_run(world: World, output: Path, name: str, *extra) -> Finished:
    runner = needs_nobody()
    home = make_home(world.base / f"{name}-home", NOBODY)
    return Running(world.exports, output, home, *extra, logs=world.base / f"{name}-logs", nobody=runner,
                   name=name).wait()


def test_unwritable_output_folder_exits_2_with_one_line(world):
    """The output folder belongs to root (0755) and the run is user nobody: refused before the
    run starts, exit 2, one line on stderr, no traceback, outputs untouched."""
    output = copy_output(world.baseline, world.base / "readonly-output")
    os.chmod(output, 0o755)
    before, layout = published(output), snapshot(output)
    done = nobody_run(world, output, "readonly")
    assert done.code == 2, done.stderr
    assert done.stderr.strip() == f"mesae: output folder {output} is not writable"
    assert published(output) == before and snapshot(output) == layout


def test_unwritable_state_folder_fails_the_run_with_its_reason(world):
    """The output folder is nobody's but its .mesae/ is root's: found only once the run starts
    (taking the lock), so exit 1, stderr without traceback, outputs untouched."""
    output = copy_output(world.baseline, world.base / "halfwritable-output")
    for path in [output, *[p for p in output.iterdir() if p.name != ".mesae"]]:
        os.lchown(path, NOBODY, NOBODY)
    before, layout = published(output), snapshot(output)
    done = nobody_run(world, output, "halfwritable")
    assert done.code == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert published(output) == before and snapshot(output) == layout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("mesae: ") for line in lines), done.stderr
    assert "Permission denied" in lines[0] and str(output / ".mesae") in lines[0], done.stderr


@functools.cache
def tmpfs_reason() -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root and mount(8)"
    probe = Path(tempfile.mkdtemp(prefix="mesae-tmpfs-probe-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            return f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(world, capsys):
    """The output folder sits on a tmpfs with 64 KiB left: the run on newer inputs fails (exit 1)
    saying the disk is full, the previous outputs are intact; with space again the next run
    publishes and leaves nothing behind."""
    reason = tmpfs_reason()
    if reason:
        pytest.skip(reason)
    mount = world.base / "tmpfs"
    mount.mkdir()
    size = sum(f.stat().st_size + 8192 for f in world.baseline.rglob("*") if f.is_file()) + 64 * 1024 + (1 << 20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        output = copy_output(world.baseline, mount / "output")
        filler = mount / "filler"
        filler.write_bytes(b"\0" * max(free_bytes(mount) - 64 * 1024, 0))
        assert free_bytes(mount) <= 80 * 1024
        before = published(output)
        capsys.readouterr()
        code = run_cli("run", "--exports", str(world.newer), "--output", str(output), home=world.base / "tmpfs-home")
        err = capsys.readouterr().err
        assert code == 1, err
        assert "No space left on device" in err and "Traceback" not in err, err
        assert published(output) == before
        assert_one_set(output)
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        assert run_cli("run", "--exports", str(world.newer), "--output", str(output),
                       home=world.base / "tmpfs-home") == 0
        assert_clean(output)
        assert assert_one_set(output)["inputs"]["01"]["transfer"] == "20261124T230000"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_while_publishing(world, monkeypatch, capsys):
    """The disk fills while the run writes its output set (the 5th Parquet file raises ENOSPC):
    exit 1 with the reason, previous outputs intact, a half-written staging folder left; the
    next run removes it and publishes."""
    from pipeline import sdtm_datasets

    output = copy_output(world.baseline, world.base / "enospc-output")
    before = published(output)
    real_write, calls = sdtm_datasets.write, []

    def failing_write(table, path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(table, path)

    monkeypatch.setattr(sdtm_datasets, "write", failing_write)
    capsys.readouterr()
    code = run_cli("run", "--exports", str(world.newer), "--output", str(output), home=world.base / "enospc-home")
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(calls) == 5, "the failure was not reached during publication"
    assert "No space left on device" in err and "Traceback" not in err, err
    assert published(output) == before
    assert_one_set(output)
    half_written = leftovers(output)["staging"]
    assert len(half_written) == 1 and any((output / ".mesae" / "staging" / half_written[0]).rglob("*.parquet"))
    monkeypatch.setattr(sdtm_datasets, "write", real_write)
    assert run_cli("run", "--exports", str(world.newer), "--output", str(output), home=world.base / "enospc-home") == 0
    assert_clean(output)
    assert assert_one_set(output)["inputs"]["01"]["transfer"] == "20261124T230000"


@pytest.mark.parametrize("content, refused", [
    ('{"zone": "blinded", "studyid": "MESAE"}', True),      # a published output folder higher up
    ('[1, 2]', False),                                      # another tool's run.json: not ours
    ('{"zone": "us-east"}', False),
    ('not json', False),
])
def test_an_output_folder_inside_another_is_refused_and_other_files_are_not_taken_for_one(tmp_path, content, refused):
    (tmp_path / "run.json").write_text(content)
    folder = OutputFolder(tmp_path / "nightly" / "out", "unblinded")
    if refused:
        with pytest.raises(OutputFolderError, match=re.escape(f"inside the blinded output folder {tmp_path}")):
            folder.check(tmp_path / "exports")
    else:
        folder.check(tmp_path / "exports")
        assert (tmp_path / "nightly" / "out").is_dir()
