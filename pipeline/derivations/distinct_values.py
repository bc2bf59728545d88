"""Apply a transformation once per distinct value (or distinct combination of values) instead of
once per row.

Raw and SDTM columns repeat heavily: a million lab rows carry a few thousand dates, tens of units,
one reference date per subject. Parsing or combining the distinct values and broadcasting the
result back by integer codes is the vectorized way to derive a column: the per-row work is
integer arithmetic in numpy, the text work is proportional to the distinct values.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def _codes(values: pd.Series) -> tuple[np.ndarray, pd.Series]:
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes.astype(np.int64), pd.Series(uniques, dtype=values.dtype)


def on_distinct_rows(function: Callable[..., pd.Series | pd.DataFrame]):
    """Run `function(*series)` on the distinct combinations of its Series arguments and broadcast
    the result back to every row (keyword arguments pass through unchanged)."""

    @wraps(function)
    def broadcast(*columns: pd.Series, **kwargs):
        index = columns[0].index
        combined = np.zeros(len(index), dtype=np.int64)
        uniques = []
        for column in columns:
            codes, distinct = _codes(column)
            # Renumbered after each column, the combined code stays below rows x distinct values.
            combined = pd.factorize(combined * len(distinct) + codes)[0].astype(np.int64)
            uniques.append((codes, distinct))
        _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
        arguments = [distinct.take(codes[first]).reset_index(drop=True) for codes, distinct in uniques]
        result = function(*arguments, **kwargs).reset_index(drop=True)
        out = result.take(inverse.ravel())
        out.index = index
        return out

    return broadcast


def on_distinct_values(function: Callable[..., pd.Series | pd.DataFrame]):
    """Run `function` on the distinct non-null values of a Series and broadcast the result back;
    the result keeps the input's index, null where the input is."""

    @wraps(function)
    def broadcast(values: pd.Series, *args, **kwargs):
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        distinct = pd.Series(uniques, dtype="str")
        parsed = function(distinct, *args, **kwargs).reset_index(drop=True)
        out = parsed.reindex(codes)  # code -1 is not a label: a missing row
        out.index = values.index
        return out

    return broadcast


def in_set(values: pd.Series, members) -> pd.Series:
    """`values.isin(members)` for large member sets (subject lists): Arrow's hash lookup instead
    of pandas' per-member conversion of Arrow-backed text."""
    member_array = pa.array([m for m in members if m is not None and m == m], type=pa.string())
    found = pc.is_in(pa.array(values.astype("str"), type=pa.string(), from_pandas=True), value_set=member_array)
    return pd.Series(found.to_numpy(zero_copy_only=False), index=values.index).fillna(False).astype(bool)


def arrow_text(array, index) -> pd.Series:
    """A pandas text Series over an Arrow string array, without a round trip through Python objects."""
    series = pa.table({"text": array}).to_pandas()["text"]
    series.index = index
    return series.astype("str")


def lookup(keys: pd.Series, table: pd.Series) -> pd.Series:
    """`table[key]` for every row (null where the key is missing): looked up once per distinct
    key, broadcast by integer code, e.g. a subject's reference date onto a million lab rows."""
    codes, uniques = pd.factorize(keys, use_na_sentinel=True)
    per_key = table.reindex(pd.Index(uniques)).reset_index(drop=True)
    out = per_key.reindex(codes)   # code -1 is not a label: null
    out.index = keys.index
    return out.astype(table.dtype)
