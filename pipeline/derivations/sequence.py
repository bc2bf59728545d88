"""--SEQ: a per-subject sequence number assigned after sorting by the domain keys.

Sorting on the full key list (with a stable tiebreak on the source coordinates) makes the
numbers reproducible run after run, which SUPP-- IDVARVAL and auditors rely on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.derivations.distinct_values import combined_rank, factorized


def sort_by_keys(frame: pd.DataFrame, keys: list[str], tiebreak: list[str] = ()) -> pd.DataFrame:
    """Rows sorted by the SDTM keys (nulls last), then by the tiebreak columns; index reset.

    Sorts integer codes, which is much cheaper than comparing text keys row against row: each
    key's codes (shared with the derivations that hashed it already) become the rank of their
    value among the key's distinct values, and the ranks combine into one integer per row."""
    by = [k for k in [*keys, *tiebreak] if k in frame.columns]
    ranks = []
    for key in by:
        codes, uniques = factorized(frame[key])
        rank = np.empty(len(uniques) + 1, dtype=np.int64)
        rank[pd.Index(uniques).argsort()] = np.arange(len(uniques))
        rank[-1] = len(uniques)              # code -1 (null) picks this last entry: nulls sort last
        ranks.append((rank[codes], len(uniques) + 1))
    order = np.argsort(combined_rank(ranks), kind="stable") if ranks else np.arange(len(frame))
    return frame.take(order).reset_index(drop=True)


def sequence_number(usubjid: pd.Series) -> pd.Series:
    """1..n within each subject, in the current row order (call after `sort_by_keys`)."""
    return (usubjid.groupby(usubjid, sort=False).cumcount() + 1).astype("Int64")
