"""Reading Pandera's lazy-validation failure cases back to row labels."""

import pandas as pd
import pandera.pandas as pa


def placed_failures(errors: pa.errors.SchemaErrors, context: str) -> pd.DataFrame:
    """Failure cases that point at a row. A case without a row means a check could not run at
    all (it raised): that is a pipeline bug and must never pass as 'no finding'."""
    cases = errors.failure_cases
    unplaced = cases[cases["index"].isna()]
    if not unplaced.empty:
        raise RuntimeError(f"{context}: check(s) {sorted(set(map(str, unplaced['check'])))} could not be evaluated "
                           f"({unplaced['failure_case'].astype(str).iloc[0]}); this is a pipeline bug")
    return cases.drop_duplicates(subset=["check", "column", "index"])
