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
