"""Apply a text transformation once per distinct value instead of once per row."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

import pandas as pd


def on_distinct_values(function: Callable[..., pd.Series | pd.DataFrame]):
    """Run `function` on the distinct non-null values of a Series and broadcast the result back.

    Raw columns repeat heavily (dates, units, test names), so parsing the uniques is the cheap,
    vectorized way to parse a column; the result keeps the input's index, null where the input is.
    """

    @wraps(function)
    def broadcast(values: pd.Series, *args, **kwargs):
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        distinct = pd.Series(uniques, dtype="str")
        parsed = function(distinct, *args, **kwargs).reset_index(drop=True)
        out = parsed.reindex(codes)  # code -1 is not a label: a missing row
        out.index = values.index
        return out

    return broadcast
