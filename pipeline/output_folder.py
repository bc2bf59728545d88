"""The output folder: one blinding zone, one writer at a time, atomic publication.

Layout (what readers use is the contract's layout; the rest is ours):

    <output>/sdtm -> current/sdtm           quarantine.parquet, transfers.parquet, run.json,
    <output>/current -> .mesae/releases/R   lineage/ and reports/ likewise point into current
    <output>/.mesae/zone                    blinded | unblinded, written by the first run
    <output>/.mesae/lock                    flock'ed by the run that writes
    <output>/.mesae/staging/<run>/          a run's outputs while it writes them
    <output>/.mesae/releases/<run>/         published sets; the current one and the one before
    <output>/.mesae/assets/                 Dagster's stored asset values (Arrow IPC)

A run writes everything into its staging folder, renames it into `releases/`, then swaps the
`current` symlink with one atomic rename: a reader sees the old set or the new set, never a mix
(to read several files of one set, resolve `current` once). A run killed at any point leaves the
previous set untouched; the next run removes the leftovers.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ZONES = ("blinded", "unblinded")
PUBLISHED_ENTRIES = ("sdtm", "quarantine.parquet", "transfers.parquet", "run.json", "lineage", "reports")
STATE = ".mesae"
INSTANCE_ZONE_MARKER = "mesae-zone"   # in a Dagster instance folder: the zone whose runs it records


ZONE_ENV = "MESAE_UNBLINDED"


def zone_from_environment() -> str:
    """The zone `MESAE_UNBLINDED` names, read the same way by `mesae run` and `dagster dev`: a
    value that is neither yes nor no is refused rather than taken as blinded."""
    flag = os.environ.get(ZONE_ENV, "").strip().lower()
    if flag not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{ZONE_ENV} must be 1, true or yes (unblinded) or empty, 0, false or no (blinded), "
                         f"not {flag!r}")
    return "unblinded" if flag in ("1", "true", "yes") else "blinded"


def _holder(lock) -> str:
    """Who holds the lock, as the holder wrote it into the lock file."""
    lock.seek(0)
    return lock.read().strip() or "another process"


def recorded_zone(root: Path) -> str | None:
    """The zone the folder `root` belongs to, from its marker or its published run.json."""
    marker, summary = root / STATE / "zone", root / "run.json"
    try:
        if marker.is_file():
            return marker.read_text(encoding="utf-8").strip()
        if summary.is_file():
            recorded = json.loads(summary.read_text(encoding="utf-8"))
            return recorded.get("zone") if isinstance(recorded, dict) else None
    except (OSError, ValueError):
        return None
    return None


def zones_around(path: Path):
    """Each folder that holds `path` (its parents as written and as resolved, nearest first), with
    the zone it records: the outer output folders a folder or an instance must not lie in."""
    for outer in dict.fromkeys([*path.absolute().parents, *path.resolve().parents]):
        yield outer, recorded_zone(outer)


class OutputFolderError(Exception):
    """The output folder cannot be used for this run (wrong zone, not ours, not writable)."""


class OutputFolderBusy(Exception):
    """Another run holds the output folder's lock."""


class OutputFolder:
    def __init__(self, root: Path, zone: str):
        if zone not in ZONES:
            raise ValueError(f"zone must be one of {ZONES}, not {zone!r}")
        self.root = Path(root)
        self.zone = zone
        self.state = self.root / STATE
        self._lock_handle = None

    # --- zone ----------------------------------------------------------------------------
    def recorded_zone(self) -> str | None:
        return recorded_zone(self.root)

    def published_inputs(self) -> dict[str, dict]:
        """The sites and transfers of the set published last (run.json `inputs`), or none."""
        try:
            summary = json.loads((self.root / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        inputs = summary.get("inputs") if isinstance(summary, dict) else None
        return inputs if isinstance(inputs, dict) else {}

    def check_zone(self) -> None:
        """Refuses a folder the other zone has recorded as its own."""
        recorded = self.recorded_zone()
        if recorded is not None and recorded != self.zone:
            raise OutputFolderError(
                f"output folder {self.root} holds {recorded} outputs; the {self.zone} zone never writes there "
                f"(use another --output folder)")

    def check(self, exports: Path) -> None:
        """Refuses a folder of the other zone, inside the exports root or inside another output
        folder (`<blinded>/sdtm` resolves into a blinded release), holding the exports root or
        another output folder, or holding foreign files."""
        root, exports = self.root.resolve(), Path(exports).resolve()
        if root == exports or exports in root.parents:
            raise OutputFolderError(f"output folder {self.root} is inside the exports folder {exports}; "
                                    "the pipeline never writes there")
        if root in exports.parents:
            raise OutputFolderError(f"the exports folder {exports} is inside the output folder {self.root}; whoever "
                                    "is given the outputs would get the exports (with unblinded/) too")
        for outer, zone in zones_around(self.root):
            if zone in ZONES:   # another tool's run.json higher up is not an output folder
                raise OutputFolderError(
                    f"output folder {self.root} is inside the {zone} output folder {outer}; an output folder "
                    "never nests in another (its releases would mix with the other's; use another --output folder)")
        inner = self._inner_output_folder()
        if inner is not None:
            raise OutputFolderError(
                f"output folder {self.root} holds the {inner[1]} output folder {inner[0]}; whoever is given the "
                f"{self.zone} folder would get it too (use another --output folder, or move it out)")
        self.check_zone()
        for entry in PUBLISHED_ENTRIES:
            path = self.root / entry
            if (path.exists() or path.is_symlink()) and not path.is_symlink():
                raise OutputFolderError(f"{path} exists and was not written by mesae; move it away or use another --output")
        if not self.state.exists() and self.root.is_dir():
            # `--output .` or `--output ~` would scatter the published entries among someone's files.
            foreign = sorted(entry.name for entry in self.root.iterdir() if not self._may_precede_first_run(entry))
            if foreign:
                raise OutputFolderError(
                    f"output folder {self.root} was not written by mesae and is not empty "
                    f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); use a new or empty --output folder")
        try:   # created now, so that a path that cannot be a folder is refused before the run starts
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputFolderError(f"output folder {self.root} cannot be created: {error.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OutputFolderError(f"output folder {self.root} is not writable")
        if self.state.exists() and not self.state.is_dir():
            raise OutputFolderError(f"{self.state} exists and is not mesae's state folder; move it away or use "
                                    "another --output")

    @staticmethod
    def _may_precede_first_run(entry: Path) -> bool:
        """Entries a folder may hold before mesae first publishes there: hidden ones (.DS_Store), a
        volume's lost+found, a Dagster instance (DAGSTER_HOME inside the output folder), and
        mesae's own published links, left when its state folder was deleted."""
        return (entry.name.startswith(".") or entry.name == "lost+found"
                or any((entry / marker).is_file() for marker in ("dagster.yaml", INSTANCE_ZONE_MARKER))
                or (entry.name in (*PUBLISHED_ENTRIES, "current") and entry.is_symlink()))

    def _inner_output_folder(self) -> tuple[Path, str] | None:
        """An output folder of the other zone below this one (our own state folder aside), with
        its zone. A copy of this zone's own outputs (an archive of past nights) leaks nothing."""
        if not self.root.is_dir():
            return None
        for folder, subfolders, _ in os.walk(self.root):
            if Path(folder) == self.root and STATE in subfolders:
                subfolders.remove(STATE)
            for name in subfolders:
                if (Path(folder) / name).is_symlink():   # our published entries, or a link out
                    continue
                zone = recorded_zone(Path(folder) / name)
                if zone in ZONES and zone != self.zone:
                    return Path(folder) / name, zone
        return None

    def claim(self) -> None:
        """Records the zone of a new folder. The first run to record it wins: a marker is never
        replaced (two first runs of different zones race here; `acquire` settles it)."""
        self.state.mkdir(parents=True, exist_ok=True)
        marker = self.state / "zone"
        if marker.exists():
            return
        temporary = self.state / f"zone.{os.getpid()}.tmp"
        temporary.write_bytes(self.zone.encode())
        try:
            os.link(temporary, marker)  # fails if another run recorded a zone meanwhile
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: last writer wins, `acquire` still checks
            os.replace(temporary, marker)
        finally:
            temporary.unlink(missing_ok=True)

    # --- single writer -------------------------------------------------------------------
    @contextmanager
    def locked(self, timeout_seconds: float):
        self.acquire(timeout_seconds)
        try:
            yield self
        finally:
            self.release()

    def acquire(self, timeout_seconds: float, waiting: Callable[[str], None] | None = None) -> None:
        """Waits up to `timeout_seconds` for the folder's lock; OutputFolderBusy after that.
        `waiting` hears once that the run waits, and for whom (a run in the UI shows why it idles)."""
        self.state.mkdir(parents=True, exist_ok=True)
        handle = open(self.state / "lock", "a+", encoding="utf-8")
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waiting is not None:
                    waiting(f"output folder {self.root} is being written by {_holder(handle)}; "
                            f"waiting up to {timeout_seconds:g} s for it to finish")
                    waiting = None
                if time.monotonic() >= deadline:
                    holder = _holder(handle)
                    handle.close()
                    raise OutputFolderBusy(
                        f"output folder {self.root} is being written by {holder}; waited {timeout_seconds:g} s "
                        "(two runs never write the same folder; try again when it has finished)") from None
                time.sleep(0.2)
        # check() ran before the lock: another zone's run may have claimed the folder since.
        try:
            self.check_zone()
        except OutputFolderError:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        handle.flush()
        self._lock_handle = handle

    def release(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # --- staging and publication ---------------------------------------------------------
    @property
    def asset_store(self) -> Path:
        return asset_store(self.root)

    def clean_leftovers(self) -> list[str]:
        """Removes what runs that did not finish left (call under the lock): staging folders, the
        temporary `.current-<run>` link of a run killed just before its swap, replaced asset
        files a run was still deleting, and temporary files of a run killed before their rename."""
        staging = self.state / "staging"
        removed = []
        if staging.is_dir():
            for leftover in sorted(staging.iterdir()):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover.name)
        if self.root.is_dir():
            for link in sorted(self.root.glob(".current-*")):
                if link.is_symlink():
                    link.unlink()
                    removed.append(link.name)
        for stale in sorted(self.asset_store.rglob(f"*{STALE_SUFFIX}")):
            stale.unlink(missing_ok=True)
            removed.append(stale.name)
        # `<name>.<pid>.tmp` of a run killed before its rename: the zone marker (claim) or
        # known_transfers.json (pipeline/transfers.py).
        for temporary in sorted(self.state.glob("*.tmp")):
            pid = temporary.name.split(".")[-2]
            if pid.isdigit() and not process_alive(int(pid)):
                temporary.unlink(missing_ok=True)
                removed.append(temporary.name)
        return removed

    def new_staging(self, run_id: str) -> Path:
        path = self.state / "staging" / run_id
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def release_of(self, run_id: str) -> Path:
        """Where a run's published set stays, unchanged, while it is the current one or the one before."""
        return self.state / "releases" / run_id

    def publish(self, staging: Path) -> Path:
        """Moves a complete staging folder into place with one atomic symlink swap."""
        release = self.release_of(staging.name)
        releases = release.parent
        releases.mkdir(parents=True, exist_ok=True)
        if release.exists():
            shutil.rmtree(release)
        _fsync_tree(staging)
        os.rename(staging, release)
        _fsync_dir(releases)  # the release's entry is on disk before `current` can point to it
        previous = os.readlink(self.root / "current") if (self.root / "current").is_symlink() else None
        # The entries point through `current`; on a first publication they are made before it
        # exists, so they all appear with the swap (a killed first run shows none, not some).
        for entry in PUBLISHED_ENTRIES:
            path = self.root / entry
            if not path.is_symlink():
                os.symlink(os.path.join("current", entry), path)
        link = self.root / f".current-{staging.name}"
        if link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(release, self.root), link)
        os.replace(link, self.root / "current")
        _fsync_dir(self.root)
        keep = {release.name, Path(previous).name if previous else None}
        for old in releases.iterdir():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        return release


# An asset file replaced by a newer one, waiting to be deleted (AssetStore.save).
STALE_SUFFIX = ".stale"


def asset_store(root: Path) -> Path:
    """Where Dagster's asset values for this output folder live."""
    return Path(root) / STATE / "assets"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_dir(Path(folder))
