"""--SEQ: a per-subject sequence number assigned after sorting by the domain keys.

Sorting on the full key list (with a stable tiebreak on the source coordinates) makes the
numbers reproducible run after run, which SUPP-- IDVARVAL and auditors rely on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def sort_by_keys(frame: pd.DataFrame, keys: list[str], tiebreak: list[str] = ()) -> pd.DataFrame:
    """Rows sorted by the SDTM keys (nulls last), then by the tiebreak columns; index reset.

    Sorts integer codes (each key factorized in sorted order) with one lexsort, which is much
    cheaper than comparing text keys row against row."""
    by = [k for k in [*keys, *tiebreak] if k in frame.columns]
    orders = []
    for key in by:
        codes, _ = pd.factorize(frame[key], sort=True, use_na_sentinel=True)
        orders.append(np.where(codes < 0, np.iinfo(np.int64).max, codes))
    order = np.lexsort(orders[::-1]) if orders else np.arange(len(frame))
    return frame.take(order).reset_index(drop=True)


def sequence_number(usubjid: pd.Series) -> pd.Series:
    """1..n within each subject, in the current row order (call after `sort_by_keys`)."""
    return (usubjid.groupby(usubjid, sort=False).cumcount() + 1).astype("Int64")
