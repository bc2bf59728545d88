"""Applies a declarative mapping (`mappings/<domain>.yaml`) to validated raw records.

A mapping names, for each SDTM variable, its source columns and one algorithm from a small
vocabulary (in the spirit of sdtm.oak: assign, recode, hardcode, conditional, ISO 8601 dates,
study day, sequence, baseline flag, unit conversion ...). The algorithms are thin adapters over
the derivation library; this module holds no per-variable special cases.

Source references in a mapping:
- `COLUMN`          a column of the mapping's primary raw file;
- `enrol.COLUMN`    a column of another raw file, joined by SUBJID (subject-level files) or
                    aggregated by the algorithm (`from:`);
- `dm.VARIABLE`     a variable (or `ctx_` subject fact) of the SDTM DM built before;
- `$VARIABLE`       a variable derived earlier in the same mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import metadata
from pipeline.derivations import codelists
from pipeline.derivations import lab_unit_conversions as labs
from pipeline.derivations.baseline import apart_values, last_observation_before_exposure
from pipeline.derivations.distinct_values import as_text, factorized, in_set, lookup
from pipeline.derivations.dose_labels import dose_particles
from pipeline.derivations.iso_dates import is_complete_date, iso_datetime, may_be_extreme, site_date_to_iso
from pipeline.derivations.sequence import sequence_number, sort_by_keys
from pipeline.derivations.study_day import study_day
from pipeline.derivations.visits import epoch, scheduled_visit_number, visit_name, visit_number
from pipeline.sdtm_datasets import arrow_type
from pipeline.transfers import stack_transfers

SUBJECT_LEVEL_FILES = ("dm", "enrol")


@dataclass
class MappingInputs:
    """Everything a mapping may read. `randomization` exists only in the unblinded zone."""

    zone: str
    validated: dict[str, pd.DataFrame]
    dm: pd.DataFrame | None = None
    unscheduled_visits: pd.DataFrame | None = None
    randomization: pd.DataFrame | None = None
    data_cutoff: dict[str, str] = field(default_factory=dict)  # "site/transfer" -> export date


@dataclass
class MappedDomain:
    frame: pd.DataFrame                 # SDTM variables in order, then src_* (and ctx_* for DM)
    supplemental: pd.DataFrame | None   # SUPP-- records, with src_* coordinates
    not_mapped: dict[str, int]          # reason -> number of source rows without an SDTM record


class MappingError(ValueError):
    """A mapping file that cannot be applied (unknown algorithm, bad reference)."""


class Work:
    """The rows being mapped and the variables derived so far."""

    def __init__(self, frame: pd.DataFrame, source: str, inputs: MappingInputs):
        self.frame = frame
        self.source = source
        self.inputs = inputs
        self.out: dict[str, pd.Series] = {}
        self._joined: dict[str, pd.Series] = {}
        self.cache: dict = {}

    def resolve(self, reference: str) -> pd.Series:
        if reference.startswith("$"):
            name = reference[1:]
            if name not in self.out:
                raise MappingError(f"{reference} is used before it is derived")
            return self.out[name]
        if "." not in reference:
            if reference not in self.frame.columns:
                raise MappingError(f"column {reference} is not in {self.source}.csv")
            return self.frame[reference]
        prefix, column = reference.split(".", 1)
        if reference not in self._joined:
            self._joined[reference] = self._join(prefix, column)
        return self._joined[reference]

    def _join(self, prefix: str, column: str) -> pd.Series:
        """A subject-level value on every row: looked up once per subject, broadcast by code."""
        if prefix == "dm" and self.source != "dm":
            table = self.inputs.dm.set_index("SUBJID")[column]
        elif prefix in SUBJECT_LEVEL_FILES:
            table = self._subject_records(prefix)[column]
        else:
            raise MappingError(f"{prefix}.{column}: only subject-level files join row by row; use `from:`")
        return lookup(self.frame["SUBJID"], table)

    def coordinates(self, file: str) -> pd.DataFrame:
        """Each row's source coordinates (src_*) in `file`: the row itself for the mapping's own
        file, the subject's record for a subject-level file joined by SUBJID. A subject without
        one gets no value from that file either, so its row never reaches the output."""
        own = self.frame[[c for c in self.frame.columns if c.startswith("src_")]]
        if file == self.source or file not in SUBJECT_LEVEL_FILES:
            return own
        other = self._subject_records(file)
        position = other.index.get_indexer(self.frame["SUBJID"])
        if not (position >= 0).any():
            return own
        return other[own.columns].iloc[np.maximum(position, 0)].reset_index(drop=True).set_axis(own.index)

    def _subject_records(self, file: str) -> pd.DataFrame:
        """A subject-level file's records by SUBJID (the first one of a subject), made once."""
        key = ("subject_records", file)
        if key not in self.cache:
            self.cache[key] = self.inputs.validated[file].drop_duplicates("SUBJID").set_index("SUBJID")
        return self.cache[key]

    def sources(self, spec: dict) -> list[pd.Series]:
        source = spec.get("source", [])
        return [self.resolve(s) for s in ([source] if isinstance(source, str) else source)]

    def condition(self, when: dict | list[dict] | None) -> pd.Series:
        """Rows where every `reference: value` of `when` holds; a list of such maps holds where
        any of them does (AEOUT = FATAL or AESDTH = Y)."""
        if isinstance(when, list):
            mask = pd.Series(False, index=self.frame.index)
            for alternative in when:
                mask |= self.condition(alternative)
            return mask
        mask = pd.Series(True, index=self.frame.index)
        for reference, value in (when or {}).items():
            mask &= canonical_value(self, reference).eq(value).fillna(False)
        return mask


def canonical_value(work: Work, reference: str) -> pd.Series:
    """A raw column recoded with its codelist (Y/y/YES -> Y) for conditions."""
    values = work.resolve(reference)
    file, column = (reference.split(".", 1) if "." in reference else (work.source, reference))
    spec = metadata.raw_schema(file)["columns"].get(column, {}) if file in metadata.RAW_FILES else {}
    if spec.get("kind") == "code":
        return codelists.recode(values, spec["codelist"]).fillna(values)
    return values


def _text(values) -> pd.Series:
    return values.astype("str")


# --- algorithms -------------------------------------------------------------------------------

def hardcode(work: Work, spec: dict) -> pd.Series:
    out = pd.Series(str(spec["value"]), index=work.frame.index, dtype="str")
    keep = work.condition(spec.get("when"))
    if "when_present" in spec:
        keep &= work.resolve(spec["when_present"]).notna()
    return out.where(keep)


def assign(work: Work, spec: dict) -> pd.Series:
    (values,) = work.sources(spec)
    return values.copy()


def usubjid(work: Work, spec: dict) -> pd.Series:
    (subjid,) = work.sources(spec)
    return metadata.study()["usubjid_prefix"] + subjid


def site_from_subjid(work: Work, spec: dict) -> pd.Series:
    (subjid,) = work.sources(spec)
    return subjid.str.slice(0, 2)


def iso8601(work: Work, spec: dict) -> pd.Series:
    values = work.sources(spec)
    date = site_date_to_iso(values[0])
    return _text(iso_datetime(date, values[1] if len(values) > 1 else None))


def integer(work: Work, spec: dict) -> pd.Series:
    (values,) = work.sources(spec)
    return pd.to_numeric(values, errors="coerce").astype("Int64")


def integer_text(work: Work, spec: dict) -> pd.Series:
    return _text(integer(work, spec).astype("str").where(integer(work, spec).notna()))


def number(work: Work, spec: dict) -> pd.Series:
    (values,) = work.sources(spec)
    return pd.to_numeric(values, errors="coerce").astype("float64")


def recode(work: Work, spec: dict) -> pd.Series:
    (values,) = work.sources(spec)
    out = codelists.recode(values, spec["codelist"])
    if "default" in spec:
        out = out.fillna(derive(work, spec["default"]))
    return out


def _rows_from(work: Work, file: str, spec: dict) -> tuple[pd.DataFrame, pd.Series]:
    other = Work(work.inputs.validated[file], file, work.inputs)
    rows = other.condition(spec.get("where"))
    value = derive(other, spec["value"]) if "value" in spec else pd.Series("Y", index=other.frame.index)
    frame = pd.DataFrame({"SUBJID": other.frame["SUBJID"], "value": value})
    if "order_by_visit" in spec:
        frame["order"] = scheduled_visit_number(other.frame[spec["order_by_visit"]])
    return frame[rows.to_numpy()], rows


def _subject_aggregate(work: Work, spec: dict, how: str) -> pd.Series:
    """The subject's first or last value: in text order (ISO dates), or, with `order_by_visit`,
    among the dates that may be the earliest (latest), that of the earliest (latest) scheduled
    visit. Text order cannot place a partial date: `2026-02` sorts before `2026-02-17T09:10`
    whatever day it was, so a partial Day 3 dose became the first dose and left the subject
    without study days; visit order alone made a Day 1 dose dated after the Day 2 one the first."""
    files = spec["from"] if isinstance(spec["from"], list) else [spec["from"]]
    values = spec["value"] if isinstance(spec["value"], list) else [spec["value"]] * len(files)
    parts = [_rows_from(work, f, {**spec, "value": v})[0] for f, v in zip(files, values)]
    stacked = pd.concat(parts, ignore_index=True).dropna(subset=["value"])
    if spec.get("complete_only"):
        stacked = stacked[is_complete_date(stacked["value"]).to_numpy()]
    if "order_by_visit" in spec:
        stacked = stacked[may_be_extreme(stacked["value"], stacked["SUBJID"], latest=how == "max").to_numpy()]
        ordered = stacked.sort_values(["SUBJID", "order", "value"], kind="stable").groupby("SUBJID")["value"]
        per_subject = ordered.first() if how == "min" else ordered.last()
    else:
        per_subject = getattr(stacked.groupby("SUBJID")["value"], how)()
    return _text(work.frame["SUBJID"].map(per_subject))


def subject_first(work: Work, spec: dict) -> pd.Series:
    return _subject_aggregate(work, spec, "min")


def subject_last(work: Work, spec: dict) -> pd.Series:
    return _subject_aggregate(work, spec, "max")


def subject_flag(work: Work, spec: dict) -> pd.Series:
    rows, _ = _rows_from(work, spec["from"], {"where": spec.get("where")})
    return _text(pd.Series(np.where(in_set(work.frame["SUBJID"], rows["SUBJID"]), "Y", None), index=work.frame.index))


def arm(work: Work, spec: dict) -> pd.Series:
    """Planned and actual arm per DM rules: cohorts open label, expansion masked when blinded."""
    key = "arm"
    if key not in work.cache:
        enrolled, phase, cohort, first_dose = work.sources(spec)
        work.cache[key] = arm_variables(work.frame["SUBJID"], codelists.recode(enrolled, "NY"), phase, cohort,
                                        first_dose.notna(), work.inputs)
    return work.cache[key][spec["part"]]


def arm_variables(subjid, enrolled, phase, cohort, treated, inputs: MappingInputs) -> pd.DataFrame:
    config = metadata.arms()
    index = subjid.index
    armcd = pd.Series(pd.NA, index=index, dtype="str")
    armname = pd.Series(pd.NA, index=index, dtype="str")
    for row in config["escalation"]:
        match = phase.eq("ESCALATION") & cohort.eq(str(row["cohort"]))
        armcd = armcd.where(~match.fillna(False), row["armcd"])
        armname = armname.where(~match.fillna(False), row["arm"])
    expansion = phase.eq("EXPANSION").fillna(False)
    if inputs.zone == "blinded":
        masked = config["expansion"]["blinded"]
        armcd = armcd.where(~expansion, masked["armcd"])
        armname = armname.where(~expansion, masked["arm"])
    else:
        group = subjid.map(inputs.randomization.set_index("SUBJID")["TRTGRP"])
        for trtgrp, row in config["expansion"]["unblinded"].items():
            match = expansion & group.eq(trtgrp).fillna(False)
            armcd = armcd.where(~match, row["armcd"])
            armname = armname.where(~match, row["arm"])
    screen_failure = enrolled.eq("N").fillna(False)
    reasons = config["armnrs"]
    armnrs = pd.Series(pd.NA, index=index, dtype="str")
    armnrs = armnrs.where(~(armcd.isna() & ~screen_failure), reasons["not_assigned"])
    armnrs = armnrs.where(~(armcd.notna() & ~treated), reasons["not_treated"])
    armnrs = armnrs.where(~screen_failure, reasons["screen_failure"])
    armcd = armcd.where(~screen_failure)
    armname = armname.where(~screen_failure)
    actual = armcd.notna() & treated
    return pd.DataFrame({
        "ARMCD": armcd, "ARM": armname, "ACTARMCD": armcd.where(actual), "ACTARM": armname.where(actual),
        "ARMNRS": armnrs, "ACTARMUD": pd.Series(pd.NA, index=index, dtype="str"),
    })


def treatment_name(work: Work, spec: dict) -> pd.Series:
    subjid, phase = work.sources(spec)
    config = metadata.arms()
    phase = codelists.recode(phase, "PHASE")
    out = pd.Series(config["escalation_extrt"], index=subjid.index, dtype="str").where(phase.eq("ESCALATION"))
    expansion = phase.eq("EXPANSION").fillna(False)
    if work.inputs.zone == "blinded":
        return out.where(~expansion, config["expansion"]["blinded"]["extrt"])
    group = subjid.map(work.inputs.randomization.set_index("SUBJID")["TRTGRP"])
    names = {k: v["extrt"] for k, v in config["expansion"]["unblinded"].items()}
    return out.where(~expansion, group.map(names)).astype("str")


def dose(work: Work, spec: dict) -> pd.Series:
    """Escalation: the label's particles. Expansion: null when blinded, the IWRS dose when not."""
    subjid, phase, label = work.sources(spec)
    phase = codelists.recode(phase, "PHASE")
    out = dose_particles(label).where(phase.eq("ESCALATION"))
    if work.inputs.zone == "unblinded":
        planned = subjid.map(work.inputs.randomization.set_index("SUBJID")["DOSE"])
        out = out.where(~phase.eq("EXPANSION").fillna(False), planned)
    return out.astype("float64")


def visit_attribute(work: Work, spec: dict) -> pd.Series:
    (visit,) = work.sources(spec)
    table = {v["visit"]: v.get(spec["attribute"]) for v in metadata.visits()["visits"]}
    return _text(visit.map(table))


def visit_number_algorithm(work: Work, spec: dict) -> pd.Series:
    subjid, visit, dtc = work.sources(spec)
    return visit_number(subjid, visit, dtc, work.inputs.unscheduled_visits)


def visit_name_algorithm(work: Work, spec: dict) -> pd.Series:
    visit, visitnum = work.sources(spec)
    return visit_name(visit, visitnum)


def epoch_algorithm(work: Work, spec: dict) -> pd.Series:
    """Sources: the record's date, the first and last dose, whether dosing is complete, and
    optionally the subject's earliest and latest complete dose dates, which bound a partial
    first or last dose; those are looked up only when a dose date is partial."""
    dtc, first, last, complete = work.sources({"source": spec["source"][:4]})
    first_day = spec.get("first_dose_day", "TREATMENT")
    if first_day not in ("TREATMENT", "SCREENING"):
        raise MappingError(f"epoch: first_dose_day is TREATMENT or SCREENING, not {first_day!r}")
    bounds = []
    if len(spec["source"]) > 4 and (_has_partial_date(first) or _has_partial_date(last)):
        bounds = work.sources({"source": spec["source"][4:]})
    return _text(epoch(dtc, first, last, complete.eq("Y"), *bounds,
                       pre_dose_on_first_dose_day=first_day == "SCREENING"))


def _has_partial_date(iso: pd.Series) -> bool:
    distinct = pd.Series(factorized(iso)[1], dtype="str")
    return bool((~is_complete_date(distinct)).any())


def study_day_algorithm(work: Work, spec: dict) -> pd.Series:
    dtc, reference = work.sources(spec)
    return study_day(dtc, reference)


def data_cutoff(work: Work, spec: dict) -> pd.Series:
    transfer = as_text(work.frame["src_site"]) + "/" + as_text(work.frame["src_transfer"])
    cutoff = transfer.map(work.inputs.data_cutoff)
    return _text(cutoff.where(work.condition(spec.get("when"))))


def lab_test_code(work: Work, spec: dict) -> pd.Series:
    (names,) = work.sources(spec)
    return labs.lab_test_code(names)


def lab_test_attribute(work: Work, spec: dict) -> pd.Series:
    (codes,) = work.sources(spec)
    return _text(labs.test_attribute(codes, spec["attribute"]))


def lab_standard_result(work: Work, spec: dict) -> pd.Series:
    key = ("lab_standard_result", tuple(spec["source"]))
    if key not in work.cache:
        work.cache[key] = labs.standard_results(*work.sources(spec))
    return work.cache[key][spec["part"]]


def baseline_flag(work: Work, spec: dict) -> pd.Series:
    """Sources: the record's date, the first dose, the result and its status, and optionally the
    subject's earliest complete dose date, looked up only when a first dose is partial."""
    dtc, reference, result, status = work.sources({"source": spec["source"][:4]})
    has_result = result.notna() & status.isna()
    if "exclude_when_present" in spec:
        has_result &= work.resolve(spec["exclude_when_present"]).isna()
    frame = pd.DataFrame({"dtc": dtc, "ref": reference})
    narrowed = len(spec["source"]) > 4 and _has_partial_date(reference)
    if narrowed:
        frame["by"] = work.resolve(spec["source"][4])
    for column in spec["group"]:
        frame[column] = work.resolve("$" + column)
    for column, values in spec.get("apart", {}).items():
        frame[column] = apart_values(work.resolve("$" + column), values)
    return last_observation_before_exposure(frame, "dtc", "ref", has_result, [*spec["group"], *spec.get("apart", {})],
                                            reference_by="by" if narrowed else None)


ALGORITHMS: dict[str, Callable[[Work, dict], pd.Series]] = {
    "hardcode": hardcode, "assign": assign, "copy": assign, "usubjid": usubjid,
    "site_from_subjid": site_from_subjid, "iso8601": iso8601, "integer": integer, "integer_text": integer_text,
    "number": number, "recode": recode, "subject_first": subject_first, "subject_last": subject_last,
    "subject_flag": subject_flag, "arm": arm, "treatment_name": treatment_name, "dose": dose,
    "visit_attribute": visit_attribute, "visit_number": visit_number_algorithm, "visit_name": visit_name_algorithm,
    "epoch": epoch_algorithm, "study_day": study_day_algorithm, "data_cutoff": data_cutoff,
    "lab_test_code": lab_test_code, "lab_test_attribute": lab_test_attribute,
    "lab_standard_result": lab_standard_result, "baseline_flag": baseline_flag,
}
# Algorithms whose values come from the IWRS list in the unblinded zone (for lineage).
UNBLINDED_SOURCES = {"arm": ["randomization.TRTGRP"], "treatment_name": ["randomization.TRTGRP"],
                     "dose": ["randomization.DOSE"]}


def implied_sources(algorithm: str | None) -> list[tuple[str, str]]:
    """What an algorithm reads besides its `source`, for the auditors' lineage: an unscheduled
    visit is numbered among the dated visits of every file, and the data cut-off is the manifest's
    export time (`exported_at`, kept in raw/transfer_inventory)."""
    if algorithm == "visit_number":
        return sorted({(f, c) for f, visit, date in metadata.visit_columns() for c in ("SUBJID", visit, date)})
    if algorithm == "data_cutoff":
        return [("transfer_inventory", "EXPORTED_AT")]
    return []


# Keys each algorithm understands besides `algorithm`, `source` and `note`; anything else in a
# mapping is a typo that would otherwise be ignored silently.
PARAMETERS = {
    "hardcode": {"value", "when", "when_present"}, "recode": {"codelist", "default"},
    "subject_first": {"from", "where", "value", "order_by_visit", "complete_only"},
    "subject_last": {"from", "where", "value", "order_by_visit", "complete_only"},
    "subject_flag": {"from", "where"}, "arm": {"part"}, "visit_attribute": {"attribute"},
    "data_cutoff": {"when"}, "lab_test_attribute": {"attribute"}, "lab_standard_result": {"part"},
    "baseline_flag": {"group", "apart", "exclude_when_present"}, "epoch": {"first_dose_day"},
}


def check_spec(spec: dict, where: str) -> None:
    """Refuses an unknown algorithm or parameter in a mapping, naming where it is."""
    name = spec.get("algorithm")
    if name != "sequence" and name not in ALGORITHMS:
        raise MappingError(f"{where}: unknown algorithm {name!r}")
    unknown = set(spec) - {"algorithm", "source", "note"} - PARAMETERS.get(name, set())
    if unknown:
        raise MappingError(f"{where}: algorithm {name} has no parameter(s) {', '.join(sorted(unknown))}")
    for key in ("default", "value"):
        nested = spec.get(key)
        for item in nested if isinstance(nested, list) else [nested]:
            if isinstance(item, dict):
                check_spec(item, f"{where}.{key}")


def check_mapping(mapping: dict) -> None:
    for section in ("variables", "context"):
        for name, spec in mapping.get(section, {}).items():
            check_spec(spec, f"mappings/{mapping['dataset']}.yaml {name}")
    for qualifier in mapping.get("supplemental", {}).get("qualifiers", []):
        check_spec(qualifier["value"], f"mappings/{mapping['dataset']}.yaml {qualifier['qnam']}")


def derive(work: Work, spec: dict) -> pd.Series:
    name = spec.get("algorithm")
    if name == "sequence":
        return pd.Series(pd.NA, index=work.frame.index, dtype="Int64")
    if name not in ALGORITHMS:
        raise MappingError(f"unknown algorithm {name!r}")
    return ALGORITHMS[name](work, spec)


# --- applying a whole mapping -----------------------------------------------------------------

def typed(values: pd.Series, variable: dict) -> pd.Series:
    kind = arrow_type(variable)
    if kind == "int64":
        return pd.to_numeric(values, errors="coerce").astype("Int64")
    if kind == "float64":
        return pd.to_numeric(values, errors="coerce").astype("float64")
    return values.astype("str")


def map_domain(mapping: dict, inputs: MappingInputs) -> MappedDomain:
    """The SDTM records (and SUPP-- records) of one domain, sorted, sequenced and typed."""
    check_mapping(mapping)
    schema = metadata.sdtm_schema(mapping["dataset"])
    source = inputs.validated[mapping["source"]]
    not_mapped = {}
    if "filter" in mapping:
        keep = Work(source, mapping["source"], inputs).condition(mapping["filter"]["where"])
        dropped = int((~keep).sum())
        if dropped:
            not_mapped[mapping["filter"]["not_mapped"]] = dropped
        source = source[keep.to_numpy()]
    work = Work(source.reset_index(drop=True), mapping["source"], inputs)
    for name, spec in mapping["variables"].items():
        work.out[name] = derive(work, spec).reset_index(drop=True)
    for name, spec in mapping.get("context", {}).items():
        work.out[name] = derive(work, spec).reset_index(drop=True)

    variables = schema["variables"]
    missing = [v["name"] for v in variables if v["name"] not in work.out]
    if missing:
        raise MappingError(f"{mapping['dataset']}: no mapping for {', '.join(missing)}")
    frame = pd.DataFrame({v["name"]: typed(work.out[v["name"]], v) for v in variables})
    for name in mapping.get("context", {}):
        frame[name] = work.out[name]
    coordinates = [c for c in source.columns if c.startswith("src_")]
    for column in coordinates:
        frame[column] = work.frame[column].array
    frame["_row"] = np.arange(len(frame))
    frame = sort_by_keys(frame, schema["keys"], ["src_site", "src_transfer", "src_row"])
    sequence = [v["name"] for v in variables if mapping["variables"][v["name"]].get("algorithm") == "sequence"]
    for name in sequence:
        frame[name] = sequence_number(frame["USUBJID"])
    supplemental = None
    if "supplemental" in mapping:
        supplemental = _supplemental(mapping, work, frame)
    return MappedDomain(frame.drop(columns="_row"), supplemental, not_mapped)


def _supplemental(mapping: dict, work: Work, frame: pd.DataFrame) -> pd.DataFrame:
    """SUPP-- records for the sorted parent; IDVARVAL is the parent's --SEQ (null for DM)."""
    config = mapping["supplemental"]
    order = frame["_row"].to_numpy()
    idvar = config.get("idvar")
    pieces = []
    for qualifier in config["qualifiers"]:
        value = derive(work, qualifier["value"]).reset_index(drop=True).to_numpy()[order]
        piece = pd.DataFrame({
            "STUDYID": frame["STUDYID"], "RDOMAIN": config["rdomain"], "USUBJID": frame["USUBJID"],
            "IDVAR": idvar, "IDVARVAL": frame[idvar].astype("str") if idvar else None,
            "QNAM": qualifier["qnam"], "QLABEL": qualifier["qlabel"], "QVAL": value,
            "QORIG": qualifier["qorig"], "QEVAL": qualifier.get("qeval"),
        })
        # Lineage names the raw row the value comes from: enrol.csv for SUPPDM's enrol.* qualifiers.
        files = {file for file, _ in qualifier_lineage(mapping, qualifier, work.inputs.zone)}
        origin = work.coordinates(files.pop() if len(files) == 1 else mapping["source"]).iloc[order]
        for column in origin.columns:
            piece[column] = origin[column].array
        pieces.append(piece[pd.notna(value)])
    schema = metadata.sdtm_schema("supp")
    supp = stack_transfers(pieces)   # the coordinates' categories differ between files
    supp = pd.DataFrame({**{v["name"]: typed(supp[v["name"]], v) for v in schema["variables"]},
                         **{c: supp[c] for c in supp.columns if c.startswith("src_")}})
    return sort_by_keys(supp, schema["keys"])


def column_lineage(mapping: dict, zone: str) -> dict[str, list[tuple[str, str]]]:
    """For each SDTM variable, the (raw file or sdtm/dm, column) pairs it is derived from: its
    sources, conditions (`where`, `when`, `when_present`), grouping, the keys that order a --SEQ
    and, for a DM subject fact (`dm.ctx_...`, not a published column), the raw columns DM derived
    that fact from."""
    primary = mapping["source"]
    specs = {**mapping["variables"], **mapping.get("context", {})}
    resolved: dict[str, list[tuple[str, str]]] = {}

    def of(name: str) -> list[tuple[str, str]]:
        if name not in resolved:
            resolved[name] = []   # a reference cycle ends here instead of recursing
            resolved[name] = sorted(set(refs(specs[name], primary)))
        return resolved[name]

    def reference_lineage(reference: str, file: str) -> list[tuple[str, str]]:
        if reference.startswith("$"):
            return of(reference[1:])
        if "." not in reference:
            return [(file, reference)]
        prefix, column = reference.split(".", 1)
        if prefix == "dm" and primary != "dm":
            return column_lineage(metadata.mapping("dm"), zone)[column] if column.startswith("ctx_") \
                else [("sdtm/dm", column)]
        return [(prefix, column)]

    def refs(spec: dict, file: str) -> list[tuple[str, str]]:
        out = []
        source = spec.get("source", [])
        for reference in [source] if isinstance(source, str) else source:
            out += reference_lineage(reference, file)
        for reference in [spec.get("when_present"), spec.get("exclude_when_present")]:
            out += reference_lineage(reference, file) if reference else []
        for variable in [*spec.get("group", []), *spec.get("apart", {})]:
            out += of(variable)
        files = spec.get("from")
        files = files if isinstance(files, list) else ([files] if files else [])
        values = spec.get("value")
        values = values if isinstance(values, list) else [values] * len(files)
        for other, value in zip(files, values):
            out += refs(value or {}, other)
            out += [(other, column) for column in _condition_columns(spec.get("where"))]
            out += [(other, spec["order_by_visit"])] if "order_by_visit" in spec else []
        if not files and isinstance(spec.get("value"), dict):
            out += refs(spec["value"], file)
        out += [(file, c) if "." not in c else tuple(c.split(".", 1)) for c in _condition_columns(spec.get("when"))]
        if "default" in spec:
            out += refs(spec["default"], file)
        out += implied_sources(spec.get("algorithm"))
        if spec.get("algorithm") == "sequence":   # the number is the record's place in the key order
            for key in metadata.sdtm_schema(mapping["dataset"])["keys"]:
                out += of(key) if key in specs and specs[key] is not spec else []
        if zone == "unblinded":
            out += [tuple(r.split(".", 1)) for r in UNBLINDED_SOURCES.get(spec.get("algorithm"), [])]
        return out

    for name in specs:
        of(name)
    return resolved


def _condition_columns(where: dict | list[dict] | None) -> list[str]:
    return [column for alternative in (where if isinstance(where, list) else [where or {}]) for column in alternative]


def qualifier_lineage(mapping: dict, qualifier: dict, zone: str) -> list[tuple[str, str]]:
    """The (raw file, column) pairs a SUPP-- qualifier's QVAL is derived from."""
    single = {"source": mapping["source"], "dataset": mapping["dataset"], "variables": {"QVAL": qualifier["value"]}}
    return column_lineage(single, zone)["QVAL"]
