"""The declarative mappings against the metadata: every SDTM variable is mapped, every raw column
of the transfer spec is either used or declared unmapped with a reason, typos are refused."""

import copy

import pytest

from pipeline import metadata
from pipeline.mapping_engine import MappingError, check_mapping, column_lineage, qualifier_lineage
from pipeline.sdtm_datasets import dataset_schema


def used_columns() -> set[tuple[str, str]]:
    used = set()
    for domain in metadata.mapping_domains():
        mapping = metadata.mapping(domain)
        for sources in column_lineage(mapping, "blinded").values():
            used |= {s for s in sources if s[0] in metadata.RAW_FILES}
        used |= {(mapping["source"], c) for c in mapping.get("filter", {}).get("where", {})}
        used |= {(joined, "SUBJID") for joined in mapping.get("join", [])}   # the join key
        for qualifier in mapping.get("supplemental", {}).get("qualifiers", []):
            used |= set(qualifier_lineage(mapping, qualifier, "blinded"))
        for reference in mapping.get("unmapped_columns", {}):
            used.add(tuple(reference.split(".", 1)) if "." in reference else (mapping["source"], reference))
    return used


def test_every_raw_column_is_mapped_or_declared_unmapped():
    used = used_columns()
    missing = [(name, column) for name in metadata.RAW_FILES for column in metadata.raw_schema(name)["columns"]
               if (name, column) not in used]
    assert not missing, f"raw columns neither mapped nor listed in unmapped_columns: {missing}"


@pytest.mark.parametrize("domain", metadata.mapping_domains())
def test_every_sdtm_variable_has_a_mapping_in_a_valid_mapping_file(domain):
    mapping = metadata.mapping(domain)
    check_mapping(mapping)
    variables = [v["name"] for v in dataset_schema(mapping["dataset"])["variables"]]
    assert set(variables) <= set(mapping["variables"])


def test_unmapped_columns_carry_a_reason():
    for domain in metadata.mapping_domains():
        for column, reason in metadata.mapping(domain).get("unmapped_columns", {}).items():
            assert isinstance(reason, str) and len(reason) > 20, (domain, column)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["variables"]["QSLOBXFL"].update(only_when_null="$QSEVINTX"), r"no parameter\(s\) only_when_null"),
    (lambda m: m["variables"]["QSTESTCD"].update(algorithm="hardcoded"), "unknown algorithm 'hardcoded'"),
])
def test_a_typo_in_a_mapping_is_refused(change, message):
    mapping = copy.deepcopy(metadata.mapping("qs"))
    change(mapping)
    with pytest.raises(MappingError, match=message):
        check_mapping(mapping)


@pytest.mark.parametrize("doses, first, last", [
    # (VISIT, EXSTDAT, EXSTTIM) of the doses given
    ([("DAY 1", "2026-02-17", "09:10"), ("DAY 3", "UN FEB 2026", ""), ("DAY 28", "2026-03-16", "10:00")],
     "2026-02-17T09:10", "2026-03-16T10:00"),              # a partial Day 3 dose is neither first nor last
    ([("DAY 1", "2026-06-10", "09:00"), ("DAY 21", "2026-07-01", "11:30"), ("DAY 28", "UN JUL 2026", "")],
     "2026-06-10T09:00", "2026-07"),                       # the last dose is partial: so is RFXENDTC
    ([("DAY 7", "2026-02-23", ""), ("DAY 1", "2026-02-17", "")], "2026-02-17", "2026-02-23"),
    # a Day 1 and Day 2 dose with swapped dates: the earliest and latest EXSTDTC, not the visit order
    ([("DAY 1", "2026-08-11", "09:00"), ("DAY 2", "2026-08-10", "09:00")], "2026-08-10T09:00", "2026-08-11T09:00"),
    ([("DAY 1", "2026-08-11", "09:00"), ("DAY 2", "2026-08-10", "09:00"), ("DAY 3", "UN AUG 2026", "")],
     "2026-08-10T09:00", "2026-08"),                       # the partial one may be first or last: the visit decides
    ([("DAY 1", "2026-08-10", ""), ("DAY 2", "2026-08-10", "08:00")], "2026-08-10", "2026-08-10T08:00"),
])
def test_reference_doses_are_those_of_the_first_and_last_dosing_visit(doses, first, last):
    """Text order cannot place a partial date (`2026-02` sorts before `2026-02-17T09:10`), so a
    partial Day 3 dose used to become RFXSTDTC and leave the subject without study days and
    every record SCREENING. The dosing visits order the doses (Day 1 is the first by the protocol)
    among those that may be the earliest (latest): a dose certainly before the Day 1 dose is the
    first (the reference: RFXSTDTC is the earliest EXSTDTC), else the baseline would be post-dose."""
    import pandas as pd

    from pipeline import metadata
    from pipeline.mapping_engine import MappingInputs, Work, derive

    ex = pd.DataFrame({"SUBJID": ["01-001"] * len(doses), "VISIT": [d[0] for d in doses], "EXYN": "Y",
                       "EXSTDAT": [d[1] for d in doses], "EXSTTIM": [d[2] or None for d in doses]}).astype("str")
    dm = pd.DataFrame({"SUBJID": ["01-001"]}).astype("str")
    work = Work(dm, "dm", MappingInputs(zone="blinded", validated={"dm": dm, "ex": ex}))
    variables = metadata.mapping("dm")["variables"]
    assert derive(work, variables["RFXSTDTC"]).tolist() == [first]
    assert derive(work, variables["RFXENDTC"]).tolist() == [last]


@pytest.mark.parametrize("specimens, flagged", [
    # (LBSPEC, LBDTC) of one subject's haemoglobin; first dose 2026-03-07T11:30
    ([("BLOOD", "2026-02-25"), (None, "2026-03-07T07:50")], [None, "Y"]),        # blank on Day 1: one baseline
    ([("BLOOD", "2026-02-25"), ("SERUM", "2026-03-07T07:50")], [None, "Y"]),
    ([("SERUM", "2026-02-25"), ("CEREBROSPINAL FLUID", "2026-02-26")], ["Y", "Y"]),  # CSF has its own
    ([(None, "2026-02-25"), ("CEREBROSPINAL FLUID", "2026-02-26"), ("CEREBROSPINAL FLUID", "2026-03-07T12:00")],
     ["Y", "Y", None]),                                                        # after the dose: not baseline
])
def test_lab_baseline_is_one_per_test_with_csf_apart(specimens, flagged):
    """The reference groups the baseline by subject and test, with LBSPEC only to keep CSF and
    serum antibodies apart: a Day 1 sample whose specimen the site left empty gave the test a
    second LBLOBXFL (the screening one stayed flagged as the last BLOOD result)."""
    import pandas as pd

    from pipeline.mapping_engine import MappingInputs, Work, derive

    lb = pd.DataFrame({"SUBJID": ["01-001"] * len(specimens)}).astype("str")
    dm = pd.DataFrame({"SUBJID": ["01-001"], "RFXSTDTC": ["2026-03-07T11:30"]}).astype("str")
    work = Work(lb, "lb", MappingInputs(zone="blinded", validated={"lb": lb}, dm=dm))
    work.out.update({"USUBJID": pd.Series("MESAE-01-001", index=lb.index), "LBTESTCD": pd.Series("HGB", index=lb.index),
                     "LBSPEC": pd.Series([s for s, _ in specimens], dtype="str"),
                     "LBDTC": pd.Series([d for _, d in specimens], dtype="str"),
                     "LBORRES": pd.Series("110", index=lb.index, dtype="str"), "LBSTAT": pd.Series(None, index=lb.index, dtype="str")})
    flag = derive(work, metadata.mapping("lb")["variables"]["LBLOBXFL"])
    assert [None if pd.isna(v) else v for v in flag] == flagged
    assert ("lb", "LBSPEC") in column_lineage(metadata.mapping("lb"), "blinded")["LBLOBXFL"]


def test_a_partial_last_dose_is_narrowed_by_the_complete_doses_before_it():
    """A Day 28 dose dated `UN APR 2026` left EPOCH null on the Day 7 and Day 14 samples; the
    complete Day 21 dose (04-24) proves they are in treatment. Wired from ex.csv through DM's
    context facts to LB's EPOCH."""
    import pandas as pd

    from pipeline import metadata
    from pipeline.mapping_engine import MappingInputs, Work, derive

    doses = [("DAY 1", "2026-04-03", "09:00"), ("DAY 7", "2026-04-09", "09:00"), ("DAY 14", "2026-04-16", "09:00"),
             ("DAY 21", "2026-04-24", "11:15"), ("DAY 28", "UN APR 2026", None)]
    ex = pd.DataFrame({"SUBJID": "01-001", "VISIT": [d[0] for d in doses], "EXYN": "Y",
                       "EXSTDAT": [d[1] for d in doses], "EXSTTIM": [d[2] for d in doses]}).astype("str")
    dm = pd.DataFrame({"SUBJID": ["01-001"]}).astype("str")
    work = Work(dm, "dm", MappingInputs(zone="blinded", validated={"dm": dm, "ex": ex}))
    mapping = metadata.mapping("dm")
    facts = {"SUBJID": dm["SUBJID"]}
    for name in ("RFXSTDTC", "RFXENDTC"):
        facts[name] = work.out[name] = derive(work, mapping["variables"][name])
    for name in ("ctx_dosing_complete", "ctx_first_dose_by", "ctx_last_dose_from"):
        facts[name] = derive(work, mapping["context"][name])
    assert facts["RFXENDTC"].tolist() == ["2026-04"] and facts["ctx_last_dose_from"].tolist() == ["2026-04-24T11:15"]
    dates = ["2026-03-31", "2026-04-09T08:00", "2026-04-16", "2026-04-29", "2026-05-22"]
    lb = pd.DataFrame({"SUBJID": ["01-001"] * len(dates)}).astype("str")
    work = Work(lb, "lb", MappingInputs(zone="blinded", validated={"lb": lb}, dm=pd.DataFrame(facts)))
    work.out["LBDTC"] = pd.Series(dates, dtype="str")
    epoch = derive(work, metadata.mapping("lb")["variables"]["EPOCH"])
    assert [None if pd.isna(v) else v for v in epoch] == ["SCREENING", "TREATMENT", "TREATMENT", None, "FOLLOW-UP"]
