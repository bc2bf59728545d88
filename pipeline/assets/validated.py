"""Validated layer: the raw contract applied with Pandera, records held back with reasons.

One step validates all six files together, because some rules cross files (a SUBJID must be in
dm.csv; a subject whose dm.csv or enrol.csv record is held back is held back everywhere). Each
`validated/<file>` holds the records that may be mapped; `validated/findings` holds why the
others may not.
"""


import dagster as dg

from pipeline import findings, metadata
from pipeline.assets.checks import raw_contract_result, raw_contract_spec
from pipeline.assets.common import OWNERS, findings_counts, findings_table_schema
from pipeline.assets.raw import RAW_KEYS, RANDOMIZATION_KEY, raw_column_schema
from pipeline.validation import randomization as iwrs
from pipeline.publication import INPUT_SET_ATTR, RANDOMIZATION_ATTR, one_input_set
from pipeline.resources import AssetStore, StudySettings, store_of
from pipeline.validation.raw_contract import validate_raw

VALIDATED_KEYS = {name: dg.AssetKey(["validated", name]) for name in metadata.RAW_FILES}
FINDINGS_KEY = dg.AssetKey(["validated", "findings"])
VALIDATED_RANDOMIZATION_KEY = dg.AssetKey(["validated", "randomization"])


def build_validation_asset(zone: str) -> dg.AssetsDefinition:
    code_version = metadata.layer_code_version(metadata.VALIDATION_LAYER_METADATA)
    raw_keys = list(RAW_KEYS.values()) + ([RANDOMIZATION_KEY] if zone == "unblinded" else [])
    specs = [dg.AssetSpec(key, deps=raw_keys, group_name="validated", owners=OWNERS, kinds={"pandera", "pandas"},
                          code_version=code_version,
                          description=f"{metadata.raw_schema(name)['file']} records that passed the raw contract.")
             for name, key in VALIDATED_KEYS.items()]
    specs.append(dg.AssetSpec(FINDINGS_KEY, deps=raw_keys, group_name="validated", owners=OWNERS,
                              kinds={"pandera", "pandas"}, code_version=code_version,
                              description="Raw contract findings: every record held back (ERROR) or flagged (WARNING)."))
    if zone == "unblinded":
        specs.append(dg.AssetSpec(VALIDATED_RANDOMIZATION_KEY, deps=[RANDOMIZATION_KEY, VALIDATED_KEYS["enrol"]],
                                  group_name="validated", owners=OWNERS, kinds={"pandas"}, code_version=code_version,
                                  description="IWRS randomization reconciled with enrol.csv (unblinded zone only)."))
    checks = [raw_contract_spec(VALIDATED_KEYS[n], metadata.raw_schema(n)["file"]) for n in metadata.RAW_FILES]

    @dg.multi_asset(specs=specs, name="raw_contract_validation", check_specs=checks, can_subset=False)
    def raw_contract_validation(settings: StudySettings, store: AssetStore):
        store = store_of(settings, store)
        raw = {name: store.load(key) for name, key in RAW_KEYS.items()}
        stamp = {INPUT_SET_ATTR: one_input_set({RAW_KEYS[name].to_user_string(): frame for name, frame in raw.items()})}
        validated, raw_findings = validate_raw(raw)
        extra = []
        if zone == "unblinded":
            iwrs_list = store.load(RANDOMIZATION_KEY)
            stamp[RANDOMIZATION_ATTR] = iwrs_list.attrs.get(RANDOMIZATION_ATTR)
            validated, reconciled, randomization_findings = iwrs.reconcile(iwrs_list, validated)
            extra.append(randomization_findings)
        all_findings = findings.combine([raw_findings, *extra])
        for name, key in VALIDATED_KEYS.items():
            frame = validated[name].reset_index(drop=True)
            frame.attrs.update(stamp)
            store.save(key, frame)
            yield dg.MaterializeResult(asset_key=key, metadata={
                "dagster/row_count": len(frame), "dagster/column_schema": raw_column_schema(name),
                "held_back": int(len(raw[name]) - len(frame))})
        all_findings.attrs.update(stamp)
        store.save(FINDINGS_KEY, all_findings)
        yield dg.MaterializeResult(asset_key=FINDINGS_KEY, metadata={
            "dagster/row_count": len(all_findings), "dagster/column_schema": findings_table_schema(),
            **findings_counts(all_findings)})
        for name in metadata.RAW_FILES:
            yield raw_contract_result(VALIDATED_KEYS[name], metadata.raw_schema(name)["file"], all_findings)
        if zone == "unblinded":
            reconciled.attrs.update(stamp)
            store.save(VALIDATED_RANDOMIZATION_KEY, reconciled)
            yield dg.MaterializeResult(asset_key=VALIDATED_RANDOMIZATION_KEY,
                                       metadata={"dagster/row_count": len(reconciled)})

    return raw_contract_validation
