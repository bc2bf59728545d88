"""Loads the declarative study metadata (`schemas/`) and mappings (`mappings/`).

They are data, read once per process; every rule, codelist, unit and mapping the code applies
comes from here, so a protocol amendment or a new lab unit is an edit to a YAML file.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import yaml

from pipeline import __version__

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def metadata_root() -> Path:
    """Where `schemas/` and `mappings/` live: the project root, or MESAE_METADATA_ROOT."""
    return Path(os.environ.get("MESAE_METADATA_ROOT", PROJECT_ROOT))


def load_yaml(relative: str) -> dict:
    return _load_yaml(str(metadata_root()), relative)


# libyaml's loader when PyYAML was built with it: ten times faster than the pure-Python one.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=None)
def _load_yaml(root: str, relative: str) -> dict:
    with (Path(root) / relative).open(encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_LOADER)


def study() -> dict:
    return load_yaml("schemas/study.yaml")


def codelists() -> dict:
    return load_yaml("schemas/terminology/codelists.yaml")


def lab_tests() -> dict:
    return load_yaml("schemas/terminology/lab_tests.yaml")


def visits() -> dict:
    return load_yaml("schemas/terminology/visits.yaml")


def arms() -> dict:
    return load_yaml("schemas/terminology/arms.yaml")


def rules() -> dict:
    return load_yaml("schemas/rules.yaml")["rules"]


def protocol() -> dict:
    return load_yaml("schemas/protocol.yaml")


RAW_FILES = ("dm", "enrol", "ex", "ae", "lb", "mrs")


def raw_schema(name: str) -> dict:
    return load_yaml(f"schemas/raw/{name}.yaml")


def visit_columns() -> list[tuple[str, str, str]]:
    """(raw file, visit column, its date column) of every visit-bearing file (schemas/raw: kind
    visit with `date`): unscheduled visits are numbered across all of them."""
    return [(name, column, spec["date"]) for name in RAW_FILES
            for column, spec in raw_schema(name)["columns"].items() if spec.get("kind") == "visit" and spec.get("date")]


def sdtm_schema(dataset: str) -> dict:
    return load_yaml(f"schemas/sdtm/{dataset}.yaml")


def mapping(domain: str) -> dict:
    return load_yaml(f"mappings/{domain}.yaml")


def mapping_domains() -> list[str]:
    return sorted(p.stem for p in (metadata_root() / "mappings").glob("*.yaml"))


def files_digest(paths: list[Path], base: Path | None = None) -> str:
    """sha256 over the files' names and bytes, in the order given: a content version."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update((path.relative_to(base) if base else Path(path.name)).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


CODE_VERSION_ATTR = "code_version"   # key of the version stamped on every stored asset value


def code_version() -> str:
    """Version of everything that decides the outputs: package code, schemas and mappings."""
    return _code_version(str(metadata_root()))


@lru_cache(maxsize=None)
def _code_version(root_text: str) -> str:
    root = Path(root_text)
    data = sorted([*root.joinpath("schemas").rglob("*.yaml"), *root.joinpath("mappings").rglob("*.yaml")])
    return f"{__version__}+{package_code_digest()[:8]}{files_digest(data, root)[:8]}"


# The metadata each layer reads, beside the package code: a layer's code version changes exactly
# when something that can change its output changed (an edited raw-contract rule shows on
# validated/*, not only in run.json). The SDTM layer's is per mapping (assets/sdtm.py).
RAW_LAYER_METADATA = ("schemas/raw/*.yaml", "schemas/rules.yaml")
VALIDATION_LAYER_METADATA = (*RAW_LAYER_METADATA, "schemas/study.yaml", "schemas/terminology/*.yaml")
REPORTS_LAYER_METADATA = ("schemas/**/*.yaml", "mappings/*.yaml")


def layer_code_version(patterns: tuple[str, ...]) -> str:
    """`<metadata digest>+<package code digest>`, the form of the SDTM assets' code versions."""
    root = metadata_root()
    paths = sorted({path for pattern in patterns for path in root.glob(pattern)})
    return f"{files_digest(paths, root)[:16]}+{package_code_digest()[:8]}"


@lru_cache(maxsize=None)
def package_code_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 of the package's Python code: part of the code version of every asset it derives."""
    return files_digest(sorted(root.joinpath("pipeline").rglob("*.py")), root)
