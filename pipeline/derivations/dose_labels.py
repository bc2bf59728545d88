"""EXDOSE from the particle count as written on the label.

Labels come as `2.5E10`, `2.5e10`, `25000000000` or `2.5x10^10` (site-export-spec.md, ex.csv);
all mean 2.5e10 particles. `2.5E+10`, the same E notation as number formatters and the IWRS
write it, is read too. Anything else is not a dose: null here, a finding in validation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.derivations.distinct_values import on_distinct_values, parsed_once

_LABEL = r"^(?P<mantissa>[0-9]+(?:\.[0-9]+)?)(?:(?:[eE]\+?(?P<exp>[0-9]{1,2}))|(?:x10\^(?P<pow>[0-9]{1,2})))?\Z"


@on_distinct_values
@parsed_once
def dose_particles(labels: pd.Series) -> pd.Series:
    """Particles per dose (float64) for each label; NaN when the label is not a dose."""
    parts = labels.str.extract(_LABEL)
    exponent = pd.to_numeric(parts["exp"].fillna(parts["pow"]), errors="coerce").fillna(0)
    mantissa = pd.to_numeric(parts["mantissa"], errors="coerce")
    particles = (mantissa * 10.0 ** exponent).astype("float64")
    return particles.where(np.isfinite(particles))
