"""Lab test names to CDISC codes, reported results to standard units, reference range flags.

Everything comes from `schemas/terminology/lab_tests.yaml`: the aliases sites print, the units
each test may be reported in and the factor to its standard unit (standard = reported x factor),
the result kind (numeric, qualitative, titre) and the physiologically possible range. An
unknown name or a unit not listed for the test is never guessed: it comes back null, and
validation holds the record back with the reason.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import metadata
from pipeline.derivations.distinct_values import arrow_text, on_distinct_rows, on_distinct_values, parsed_once

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"   # ASCII digits only
_PLAIN = re.compile(rf"^{_NUMBER}\Z")
_CENSORED = re.compile(rf"^(?P<op><=|>=|<|>) *(?P<num>{_NUMBER})\Z")


def _tests() -> dict:
    return metadata.lab_tests()["tests"]


def _test_table() -> pd.DataFrame:
    return _test_table_for(str(metadata.metadata_root()))


@lru_cache(maxsize=None)
def _test_table_for(root: str) -> pd.DataFrame:
    rows = []
    for code, test in _tests().items():
        rows.append({
            "LBTESTCD": code, "LBTEST": test["name"], "LBCAT": test["category"], "kind": test["result"],
            "standard_unit": test.get("standard_unit"), "normal": test.get("normal"),
            "plausible_low": (test.get("plausible") or [np.nan, np.nan])[0],
            "plausible_high": (test.get("plausible") or [np.nan, np.nan])[1],
        })
    return pd.DataFrame(rows).set_index("LBTESTCD")


@on_distinct_values
def lab_test_code(names: pd.Series) -> pd.Series:
    """LBTESTCD for each test name as printed by the site (any case); null if unknown."""
    aliases = {alias.upper(): code for code, test in _tests().items() for alias in test["aliases"]}
    return names.str.upper().map(aliases).astype("str")


def test_attribute(codes: pd.Series, attribute: str) -> pd.Series:
    """A per-test attribute (LBTEST, LBCAT, kind, standard_unit, normal, plausible_low/high)."""
    return _attribute(codes, attribute)


@on_distinct_values
def _attribute(codes: pd.Series, attribute: str) -> pd.Series:
    return codes.map(_test_table()[attribute])


def unit_factor(codes: pd.Series, units: pd.Series) -> pd.Series:
    """Factor from the reported unit to the test's standard unit; NaN if the unit is not listed."""
    factors = {f"{code}|{unit}": float(f) for code, t in _tests().items() for unit, f in t["units"].items()}
    keys = codes.astype("str").fillna("") + "|" + units.astype("str").fillna("")
    return _factor_of(keys, factors)


@on_distinct_values
def _factor_of(keys: pd.Series, factors: dict) -> pd.Series:
    return keys.map(factors).astype("float64")


def unit_is_known(codes: pd.Series, units: pd.Series, kinds: pd.Series) -> pd.Series:
    """True where the reported unit is one of the test's, or where the unit is empty and the
    result's form needs none (`<LLOQ` for HBV DNA; a number never borrows the standard unit)."""
    return unit_factor(codes, units).notna() | _needs_no_unit(codes, units, kinds)


@on_distinct_rows
def _needs_no_unit(codes: pd.Series, units: pd.Series, kinds: pd.Series) -> pd.Series:
    unitless = {f"{code}|{kind}" for code, test in _tests().items() for kind in test.get("unitless", [])}
    return units.isna() & (codes.astype("str") + "|" + kinds.astype("str")).isin(unitless)


def allowed_units(code: str) -> list[str]:
    """The units a test may be reported in, as a reader would write them."""
    test = _tests()[code]
    listed = [unit if unit else "(empty)" for unit in test["units"]]
    return listed + [f"(empty) with a result such as {UNITLESS_EXAMPLE[kind]}" for kind in test.get("unitless", [])]


UNITLESS_EXAMPLE = {"below_lloq": "<LLOQ"}


@on_distinct_values
def parse_result(results: pd.Series) -> pd.DataFrame:
    """Reads each result text: kind (number, censored, titre, qualitative, below_lloq, text),
    the operator of a censored value and the numeric part."""
    text = results.astype("str")
    plain = text.str.fullmatch(_PLAIN.pattern)
    censored = text.str.extract(_CENSORED.pattern)
    config = metadata.lab_tests()
    titre_parts = text.str.extract(config["titre"]["pattern"])[0]
    titre_value = pd.to_numeric(titre_parts, errors="coerce")
    is_titre = titre_value.between(config["titre"]["min"], config["titre"]["max"])
    below_lloq = text.str.fullmatch(config["below_lloq_pattern"])
    qualitative = text.str.upper().isin(["POSITIVE", "NEGATIVE"])
    number = pd.to_numeric(text.where(plain), errors="coerce")
    number = number.fillna(pd.to_numeric(censored["num"], errors="coerce"))
    finite = np.isfinite(number.astype("float64"))          # 1e999 overflows: not a result
    plain = plain.fillna(False).astype(bool) & finite
    operator = censored["op"].where(finite)
    kind = pd.Series("text", index=text.index, dtype="str")
    kind = kind.where(~qualitative, "qualitative")
    kind = kind.where(~is_titre.fillna(False), "titre")
    kind = kind.where(~(below_lloq.fillna(False) & operator.isna()), "below_lloq")
    kind = kind.where(operator.isna(), "censored")
    kind = kind.where(~plain, "number")
    return pd.DataFrame({"kind": kind, "operator": operator.astype("str"),
                         "number": number.where(finite).astype("float64")})


ACCEPTED_KINDS = {
    "numeric": {"number", "censored"},
    "qualitative": {"qualitative"},
    "titre_or_qualitative": {"titre", "qualitative"},
    "numeric_or_below_lloq": {"number", "censored", "below_lloq"},
}

EXPECTED_RESULT = {
    "numeric": "a number or a censored number such as <0.5",
    "qualitative": "POSITIVE or NEGATIVE",
    "titre_or_qualitative": "a titre 1:10 .. 1:320, POSITIVE or NEGATIVE",
    "numeric_or_below_lloq": "a number, a censored number or <LLOQ",
}


def result_is_readable(codes: pd.Series, parsed: pd.DataFrame) -> pd.Series:
    """True where the result's form is one the test accepts (numbers for numeric tests ...)."""
    kinds = test_attribute(codes, "kind")
    pairs = kinds.astype("str") + "|" + parsed["kind"].astype("str")
    accepted = {f"{k}|{form}" for k, forms in ACCEPTED_KINDS.items() for form in forms}
    return pairs.isin(accepted)


@on_distinct_values
@parsed_once
def _number(text: pd.Series) -> pd.Series:
    return pd.to_numeric(text, errors="coerce").astype("float64")


def significant(values: pd.Series) -> np.ndarray:
    """Each number rounded to 10 significant digits (kills float noise: 1.5 x 17.2 is 25.8, not
    25.799999999999997); infinities are NaN."""
    x = values.to_numpy(dtype="float64", na_value=np.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        magnitude = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x))))
        scalable = np.isfinite(x) & (magnitude >= -12) & (magnitude <= 9)   # 10**(9 - m) is exact
        scale = 10.0 ** np.where(scalable, 9 - magnitude, 0)
        rounded = np.where(scalable, np.round(x * scale) / scale, np.nan)
    # From 1e10 up, or below 1e-12, the scale is not exact in binary: round those few through text.
    extreme = np.flatnonzero(np.isfinite(x) & ~scalable)
    rounded[extreme] = [r if np.isfinite(r := float(f"{v:.10g}")) else v for v in x[extreme]]
    return rounded


def format_number(values: pd.Series) -> pd.Series:
    """Shortest text of each number after rounding to 10 significant digits; infinities are null."""
    return arrow_text(pa.array(significant(values), from_pandas=True).cast(pa.string()), values.index)


def censored_beyond(operator: pd.Series, bound: pd.Series, low, high) -> tuple[pd.Series, pd.Series]:
    """(certainly below `low`, certainly above `high`) for censored results: only where the bound
    settles it. `<1.7` is below a limit of 3.4 (and of 1.7); against 1.5 it could be either."""
    below = (operator.eq("<") & (bound <= low)) | (operator.eq("<=") & (bound < low))
    above = (operator.eq(">") & (bound >= high)) | (operator.eq(">=") & (bound > high))
    return below.fillna(False).astype(bool), above.fillna(False).astype(bool)


def censored_parts(stresc: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(operator, bound) of each standardized censored result (LBSTRESC `<1.71`); null otherwise."""
    parsed = parse_result(stresc)
    censored = parsed["kind"] == "censored"
    return parsed["operator"].where(censored), parsed["number"].where(censored)


@on_distinct_rows
def standard_results(codes: pd.Series, orres: pd.Series, units: pd.Series,
                     ornrlo: pd.Series, ornrhi: pd.Series) -> pd.DataFrame:
    """LBSTRESC, LBSTRESN, LBSTRESU, LBSTNRLO, LBSTNRHI, LBSTNRC and LBNRIND for each record.

    STRESN only for plain numbers; censored values keep their operator in STRESC with the number
    converted; titres and qualitative results are text. Ranges convert with the same factor.
    """
    parsed = parse_result(orres)
    factor = unit_factor(codes, units)
    converted = parsed["number"] * factor
    kind = parsed["kind"]
    converted_text = format_number(converted)
    rounded = pd.to_numeric(converted_text, errors="coerce")   # the number as STRESC shows it
    stresc = pd.Series(pd.NA, index=orres.index, dtype="str")
    stresc = stresc.where(kind != "number", converted_text)
    stresc = stresc.where(kind != "censored", parsed["operator"] + converted_text)
    stresc = stresc.where(~kind.isin(["titre", "below_lloq"]), orres)
    stresc = stresc.where(kind != "qualitative", orres.str.upper())
    stresn = rounded.where(kind == "number")
    has_result = orres.notna()
    stresu = test_attribute(codes, "standard_unit").astype("str").where(has_result)
    stnrlo = _number(ornrlo) * factor
    stnrhi = _number(ornrhi) * factor
    stnrlo = pd.to_numeric(format_number(stnrlo), errors="coerce")
    stnrhi = pd.to_numeric(format_number(stnrhi), errors="coerce")
    normal = test_attribute(codes, "normal").astype("str")
    stnrc = normal.where(has_result)

    nrind = pd.Series(pd.NA, index=orres.index, dtype="str")
    numeric = stresn.notna()
    nrind = nrind.where(~(numeric & stnrlo.notna() & (stresn < stnrlo)), "LOW")
    nrind = nrind.where(~(numeric & stnrhi.notna() & (stresn > stnrhi)), "HIGH")
    in_range = numeric & (stnrlo.notna() | stnrhi.notna()) & nrind.isna()
    nrind = nrind.where(~in_range, "NORMAL")
    below, above = censored_beyond(parsed["operator"].where(kind == "censored"), rounded, stnrlo, stnrhi)
    nrind = nrind.where(~below, "LOW")
    nrind = nrind.where(~above, "HIGH")
    qualitative_flag = pd.Series(np.where(stresc == normal, "NORMAL", "ABNORMAL"), index=orres.index, dtype="str")
    judged = normal.notna() & kind.isin(["qualitative", "titre"])
    nrind = nrind.where(~judged, qualitative_flag)
    return pd.DataFrame({
        "LBSTRESC": stresc, "LBSTRESN": stresn.astype("float64"), "LBSTRESU": stresu,
        "LBSTNRLO": stnrlo.astype("float64"), "LBSTNRHI": stnrhi.astype("float64"),
        "LBSTNRC": stnrc, "LBNRIND": nrind,
    })
