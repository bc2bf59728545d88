"""Dagster resources: where the exports and outputs are, which zone, and how asset values
are stored between steps."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import dagster as dg
import pandas as pd
import pyarrow as pa
from pydantic import ConfigDict, PrivateAttr

from pipeline import metadata
from pipeline.output_folder import INSTANCE_ZONE_MARKER, STALE_SUFFIX, OutputFolder, asset_store, zones_around
from pipeline.transfers import SITEID, ExportsRootError, check_exports_root

ZONE_KEY = "mesae/zone"


class ZoneError(Exception):
    """The Dagster instance or output folder belongs to the other blinding zone."""


class StoreFolderError(Exception):
    """The asset store's folder is not the run's output folder (two launchpad fields set apart)."""


def check_instance_zone(instance, zone: str) -> None:
    """A Dagster instance serves one zone, so a blinded run history never holds unblinded logs.

    The zone is recorded in the instance's own storage (so two DAGSTER_HOMEs sharing one
    PostgreSQL database are caught) and, for people looking at the folder, in $DAGSTER_HOME."""
    if instance.root_directory:
        for outer, holder in zones_around(Path(instance.root_directory) / INSTANCE_ZONE_MARKER):
            if holder is not None and holder != zone:
                raise ZoneError(f"the Dagster instance at {instance.root_directory} is inside the {holder} output folder "
                                f"{outer}; whoever is given that folder would get this {zone} zone's run history")
    recorded = instance.run_storage.get_cursor_values({ZONE_KEY}).get(ZONE_KEY)
    marker = Path(instance.root_directory) / INSTANCE_ZONE_MARKER if instance.root_directory else None
    if recorded is None and marker is not None and marker.is_file():
        recorded = marker.read_text(encoding="utf-8").strip()
    if recorded is not None and recorded != zone:
        raise ZoneError(f"the Dagster instance at {instance.root_directory} serves the {recorded} zone; "
                        f"run the {zone} zone with its own DAGSTER_HOME and storage")
    instance.run_storage.set_cursor_values({ZONE_KEY: zone})
    if marker is not None and not marker.exists():
        marker.write_text(zone, encoding="utf-8")


class ZonedResource(dg.ConfigurableResource):
    """A resource whose blinding zone is code, not configuration: each zone's definitions carry
    their own subclass (`for_zone`), so a run config or the launchpad cannot point one zone's
    assets at the other zone's output folder or instance, whose checks would then pass."""

    ZONE: ClassVar[str]
    # A `zone=` from code written for the version with a zone field is refused, not dropped.
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def for_zone(cls, zone: str, /, **config):
        return {sub.ZONE: sub for sub in cls.__subclasses__()}[zone](**config)

    @property
    def zone(self) -> str:
        return self.ZONE


class StudySettings(ZonedResource):
    """Exports root and output folder of a run; holds the output folder's lock for the whole run
    (the job runs in one process)."""

    exports_dir: str
    output_dir: str
    lock_timeout_seconds: float = 30.0
    # Sites of the last published set that may drop out of this one (closed or withdrawn); any
    # other site without a usable transfer fails the run rather than vanish from the outputs.
    sites_withdrawn: list[str] = []
    _folder: OutputFolder | None = PrivateAttr(default=None)

    @property
    def exports(self) -> Path:
        return Path(self.exports_dir)

    @property
    def output(self) -> OutputFolder:
        return OutputFolder(Path(self.output_dir), self.zone)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if not self.exports.is_dir():
            raise ExportsRootError(f"exports folder {self.exports} does not exist or is not a folder")
        check_exports_root(self.exports)
        malformed = [site for site in self.sites_withdrawn if not SITEID.fullmatch(site)]
        if malformed:
            raise ValueError(f"sites_withdrawn {malformed} are not SITEIDs; expected two digits, e.g. '03'")
        if context.instance is not None:
            check_instance_zone(context.instance, self.zone)
        folder = self.output
        folder.check(self.exports)
        folder.claim()
        folder.acquire(self.lock_timeout_seconds, context.log.info if context.log else None)
        removed = folder.clean_leftovers()
        if removed and context.log:
            context.log.info(f"removed leftovers of unfinished runs: {', '.join(removed)}")
        self._folder = folder

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._folder is not None:
            self._folder.release()
            self._folder = None


class BlindedStudySettings(StudySettings):
    ZONE: ClassVar[str] = "blinded"


class UnblindedStudySettings(StudySettings):
    ZONE: ClassVar[str] = "unblinded"


_STALE_NUMBERS = itertools.count()
_DISCARDS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesae-discard")


def _discard(stale: Path) -> None:
    """A file that cannot be deleted now is left to the next run's `clean_leftovers`."""
    with contextlib.suppress(OSError):
        stale.unlink(missing_ok=True)


class AssetStore(ZonedResource):
    """Where asset values live between steps: Arrow IPC files in the output folder's state area.

    Arrow IPC keeps dtypes (text, nullable integers, categories) and reads back memory-mapped, so
    handing a million lab rows to the next step costs little; the files belong to the output
    folder, hence to its blinding zone, which the store checks on its own; every asset also makes
    sure it is the run's output folder (`store_of`), as run config can set the two apart. `DataFrame.attrs`
    travel in the schema metadata. Assets save and load through this resource and report
    `MaterializeResult`s, so Dagster records one materialization per asset and no per-input or
    per-output handling events.
    """

    output_dir: str
    _discards: list[Future] = PrivateAttr(default_factory=list)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        OutputFolder(Path(self.output_dir), self.zone).check_zone()

    def path_of(self, key: dg.AssetKey) -> Path:
        return asset_store(Path(self.output_dir)).joinpath(*key.path).with_suffix(".arrow")

    def save(self, key: dg.AssetKey, frame: pd.DataFrame) -> None:
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        attrs = json.dumps({**frame.attrs, metadata.CODE_VERSION_ATTR: metadata.code_version()}, sort_keys=True,
                           default=str).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"mesae_attrs": attrs})
        temporary = path.with_suffix(".arrow.tmp")
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        # Never rename over the old file: that makes ext4 flush the new file to disk first
        # (auto_da_alloc), 0.7 s a run at 10,000 subjects. The old file is renamed aside and
        # deleted on a background thread (freeing a 200 MB file takes ext4 about 0.2 s). A run
        # killed in between leaves the asset missing, and `load` then says to materialize it again.
        if path.exists():
            stale = path.with_name(f"{path.name}.{os.getpid()}-{next(_STALE_NUMBERS)}{STALE_SUFFIX}")
            path.rename(stale)
            self._discards.append(_DISCARDS.submit(_discard, stale))
        temporary.rename(path)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Replaced files are gone when the run ends."""
        for discard in self._discards:
            discard.result()
        self._discards.clear()

    def load(self, key: dg.AssetKey) -> pd.DataFrame:
        path = self.path_of(key)
        if not path.exists():
            raise dg.Failure(f"{key.to_user_string()} has not been materialized for this output folder yet; "
                             "materialize it (or the whole job) first")
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        frame = table.to_pandas()
        frame.attrs = json.loads((table.schema.metadata or {}).get(b"mesae_attrs", b"{}"))
        return frame


class BlindedAssetStore(AssetStore):
    ZONE: ClassVar[str] = "blinded"


class UnblindedAssetStore(AssetStore):
    ZONE: ClassVar[str] = "unblinded"


def store_of(settings: StudySettings, store: AssetStore) -> AssetStore:
    """The store, once it is known to keep its values in the run's output folder, whose checks
    (zone, not inside the exports or another output folder) it then shares: its folder can be
    set in run config apart from the settings', and a stash in the exports root took the arms."""
    if Path(store.output_dir).resolve() != Path(settings.output_dir).resolve():
        raise StoreFolderError(f"the asset store's folder {store.output_dir} is not the run's output folder "
                        f"{settings.output_dir}; set both to the same folder")
    return store
