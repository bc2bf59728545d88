"""Apply a transformation once per distinct value (or distinct combination of values) instead of
once per row.

Raw and SDTM columns repeat heavily: a million lab rows carry a few thousand dates, tens of units,
one reference date per subject. Parsing or combining the distinct values and broadcasting the
result back by integer codes is the vectorized way to derive a column: the per-row work is
integer arithmetic in numpy, the text work is proportional to the distinct values.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import wraps

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pandas.api.extensions import take

# Factorizations of Arrow-backed columns, by the identity of their (immutable) Arrow data. One raw
# column is parsed by several rules and derivations; hashing a million values once instead of at
# every use is the single largest saving in the mapping. Entries go when the Arrow data does.
_FACTORIZED: dict[int, tuple[weakref.ref, np.ndarray, pd.Index]] = {}


def factorized(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """`pd.factorize(values)` (code -1 for null), computed once per Arrow column; read-only codes."""
    if not isinstance(values.array, pd.arrays.ArrowExtensionArray):
        return pd.factorize(values, use_na_sentinel=True)
    data = values.array.__arrow_array__()
    hit = _FACTORIZED.get(id(data))
    if hit is None or hit[0]() is not data:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        codes = codes.astype(np.int32)   # half the memory of intp; callers widen before arithmetic
        codes.flags.writeable = False
        hit = _FACTORIZED[id(data)] = (weakref.ref(data), codes, pd.Index(uniques))
        weakref.finalize(data, _FACTORIZED.pop, id(data), None)
    return hit[1], hit[2]


def on_distinct_rows(function: Callable[..., pd.Series | pd.DataFrame]):
    """Run `function(*series)` on the distinct combinations of its Series arguments and broadcast
    the result back to every row (keyword arguments pass through unchanged)."""

    @wraps(function)
    def broadcast(*columns: pd.Series, **kwargs):
        combined, first = distinct_rows(columns)
        arguments = [column.take(first).reset_index(drop=True) for column in columns]
        result = function(*arguments, **kwargs).reset_index(drop=True)
        out = result.take(combined)
        out.index = columns[0].index
        return out

    return broadcast


def distinct_rows(columns) -> tuple[np.ndarray, np.ndarray]:
    """For equally long Series: each row's combination code (dense, 0..n-1, nulls equal to
    each other) and the position of the first row with each combination."""
    combined = pd.factorize(combined_rank([null_coded(column) for column in columns]))[0]
    first = np.empty(int(combined.max()) + 1 if len(combined) else 0, dtype=np.int64)
    first[combined[::-1]] = np.arange(len(combined) - 1, -1, -1)
    return combined, first


def null_coded(values: pd.Series) -> tuple[np.ndarray, int]:
    """Factorization codes with null as a value of its own (the last code), and their bound."""
    codes, uniques = factorized(values)
    return np.where(codes < 0, len(uniques), codes).astype(np.int64), len(uniques) + 1


def combined_rank(ranks: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """One integer per row that orders like the tuple of its ranks (each rank below its bound):
    mixed radix, renumbered densely whenever the next key would overflow int64. One stable
    argsort of it is several times faster than `np.lexsort` over the keys."""
    combined, span = ranks[0]
    for rank, bound in ranks[1:]:
        if span * bound >= 1 << 62:
            distinct, combined = np.unique(combined, return_inverse=True)
            span = len(distinct)
        combined, span = combined * bound + rank, span * bound
    return combined


def on_distinct_values(function: Callable[..., pd.Series | pd.DataFrame]):
    """Run `function` on the distinct non-null values of a Series and broadcast the result back;
    the result keeps the input's index, null where the input is."""

    @wraps(function)
    def broadcast(values: pd.Series, *args, **kwargs):
        codes, uniques = factorized(values)
        distinct = pd.Series(uniques, dtype="str")
        return spread(function(distinct, *args, **kwargs), codes, values.index)

    return broadcast


# Calls with more distinct values than this are parsed directly: vectorized parsing is already
# cheap per value there, and remembering would only cost memory.
REMEMBERED_CALL_SIZE = 4096
REMEMBERED_VALUES = 100_000


def parsed_once(function: Callable[[pd.Series], pd.Series]):
    """Remember a pure text parser's result per text for the life of the process.

    Under `on_distinct_values`: the same date or time text is parsed by the raw contract, the
    mapping and the reports, and a parser is many small pandas steps whose cost, on a small trial,
    is per call rather than per value. Only for functions of the text alone (no arguments, no
    metadata), so a remembered result can never go stale.
    """
    remembered: dict[str, object] = {}
    result_type = None

    @wraps(function)
    def parse(distinct: pd.Series) -> pd.Series:
        nonlocal result_type
        if len(distinct) > REMEMBERED_CALL_SIZE:
            return function(distinct)
        text = distinct.tolist()
        if len(remembered) + len(text) > REMEMBERED_VALUES:
            remembered.clear()
        new = [t for t in text if t not in remembered]
        if new or result_type is None:
            parsed = function(pd.Series(new, dtype="str"))
            remembered.update(zip(new, parsed.tolist()))
            result_type = parsed.dtype
        return pd.Series([remembered[t] for t in text], dtype=result_type)

    return parse


def in_set(values: pd.Series, members: pd.Series | pd.Index) -> pd.Series:
    """`values.isin(members)` for large member sets (subject lists): Arrow's hash lookup instead
    of pandas' per-member conversion of Arrow-backed text. Members come as a Series or Index,
    so that a list of 10,000 subjects reaches Arrow without a Python loop; nulls are not members."""
    member_array = _as_arrow_string(members)
    if isinstance(member_array, pa.ChunkedArray):
        member_array = member_array.combine_chunks()
    found = pc.is_in(_as_arrow_string(values), value_set=pc.drop_null(member_array))
    return pd.Series(found.to_numpy(zero_copy_only=False), index=values.index).fillna(False).astype(bool)


def _as_arrow_string(values: pd.Series | pd.Index) -> pa.Array | pa.ChunkedArray:
    return pa.array(values.astype("str"), type=pa.string(), from_pandas=True)


def as_text(values: pd.Series) -> pd.Series:
    """A column as text; a categorical one (the src_ coordinates: one value per file) by taking
    its few categories with the integer codes, several times faster than `astype("str")`."""
    if not isinstance(values.dtype, pd.CategoricalDtype):
        return values.astype("str")
    codes = values.cat.codes.to_numpy()
    text = pd.Series(values.cat.categories.astype("str").take(np.maximum(codes, 0)), index=values.index)
    return text if (codes >= 0).all() else text.where(codes >= 0)


def arrow_text(array, index) -> pd.Series:
    """A pandas text Series over an Arrow string array, without a round trip through Python objects."""
    series = pa.table({"text": array}).to_pandas()["text"]
    series.index = index
    return series.astype("str")


def lookup(keys: pd.Series, table: pd.Series) -> pd.Series:
    """`table[key]` for every row (null where the key is missing): looked up once per distinct
    key, broadcast by integer code, e.g. a subject's reference date onto a million lab rows."""
    codes, uniques = factorized(keys)
    return spread(table.reindex(uniques), codes, keys.index).astype(table.dtype)


def spread(per_value: pd.Series | pd.DataFrame, codes: np.ndarray, index: pd.Index) -> pd.Series | pd.DataFrame:
    """Row i gets `per_value`'s row at position codes[i], missing where the code is -1: a
    positional take, without the label lookup of `reindex(codes)` (a tenth of a second per
    million rows)."""
    def column(values: pd.Series) -> pd.Series:
        return pd.Series(take(values.array, codes, allow_fill=True), index=index, name=values.name)

    if isinstance(per_value, pd.DataFrame):
        return pd.DataFrame({name: column(per_value[name]) for name in per_value.columns}, index=index)
    return column(per_value)
