"""Labelled, typed, deterministic Parquet files (pipeline-contract.md section 3).

Column names are SDTM variable names in SDTMIG order; each field carries its label in the Arrow
field metadata key `label`; the schema metadata carries the dataset `label`, `domain`, `studyid`
and `keys`. No timestamps or run ids go inside, so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import metadata

ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}


def arrow_type(variable: dict) -> str:
    return variable.get("arrow") or ("string" if variable["type"] == "Char" else "float64")


def dataset_schema(dataset: str) -> dict:
    """The SDTM metadata of a dataset; SUPP-- datasets share `supp.yaml`."""
    if dataset.startswith("supp"):
        schema = dict(metadata.sdtm_schema("supp"))
        rdomain = dataset[4:].upper()
        schema.update(dataset=dataset, domain=f"SUPP{rdomain}", label=schema["label"].format(rdomain=rdomain))
        return schema
    return metadata.sdtm_schema(dataset)


def to_table(frame: pd.DataFrame, variables: list[dict], table_metadata: dict[str, str]) -> pa.Table:
    fields, arrays = [], []
    for variable in variables:
        kind = ARROW_TYPES[arrow_type(variable)]
        values = frame[variable["name"]]
        if kind == pa.string():
            values = values.astype("str")
        array = pa.array(values, type=kind, from_pandas=True)
        fields.append(pa.field(variable["name"], kind, metadata={"label": variable["label"]}))
        arrays.append(array)
    schema = pa.schema(fields, metadata={k: str(v) for k, v in table_metadata.items()})
    return pa.Table.from_arrays(arrays, schema=schema)


def sdtm_table(dataset: str, frame: pd.DataFrame) -> pa.Table:
    schema = dataset_schema(dataset)
    return to_table(frame, schema["variables"], {
        "label": schema["label"], "domain": schema["domain"], "studyid": metadata.study()["studyid"],
        "keys": ",".join(schema["keys"]),
    })


def write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", use_dictionary=True, write_statistics=True)


@contextmanager
def writes_in_background() -> Iterator[Callable[[pa.Table, Path], None]]:
    """`write`, on a second thread while the caller builds the next table: pyarrow encodes
    without the GIL, so on two cores LB's encoding overlaps the lineage and report tables. The
    bytes do not change. The first failure (a full disk) stops the writing and is raised, at the
    next file handed over or when the block ends."""
    failures: list[BaseException] = []

    def write_unless_failed(table: pa.Table, path: Path) -> None:
        if failures:
            return
        try:
            write(table, path)
        except BaseException as error:
            failures.append(error)

    def hand_over(table: pa.Table, path: Path) -> None:
        if failures:
            raise failures[0]
        pool.submit(write_unless_failed, table, path)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesae-parquet") as pool:
        yield hand_over
    if failures:
        raise failures[0]


def sdtm_datasets() -> list[str]:
    """Every SDTM dataset the mappings produce, SUPP-- included, in mapping order."""
    out = []
    for domain in metadata.mapping_domains():
        mapping = metadata.mapping(domain)
        out.append(mapping["dataset"])
        if "supplemental" in mapping:
            out.append(mapping["supplemental"]["dataset"])
    return out
