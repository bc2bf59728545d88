"""Validated layer: the raw contract applied with Pandera, records held back with reasons.

One step validates all six files together, because some rules cross files (a SUBJID must be in
dm.csv; a subject whose dm.csv or enrol.csv record is held back is held back everywhere). Each
`validated/<file>` holds the records that may be mapped; `validated/findings` holds why the
others may not.
"""


import dagster as dg
from dagster import AssetExecutionContext
import pandas as pd

from pipeline import findings, metadata
from pipeline.assets.checks import raw_contract_result, raw_contract_spec
from pipeline.assets.common import OWNERS, findings_counts, findings_table_schema
from pipeline.assets.raw import RAW_KEYS, RANDOMIZATION_KEY
from pipeline.validation import randomization as iwrs
from pipeline.validation.raw_contract import validate_raw

VALIDATED_KEYS = {name: dg.AssetKey(["validated", name]) for name in metadata.RAW_FILES}
FINDINGS_KEY = dg.AssetKey(["validated", "findings"])
VALIDATED_RANDOMIZATION_KEY = dg.AssetKey(["validated", "randomization"])


def build_validation_asset(zone: str) -> dg.AssetsDefinition:
    outs = {
        name: dg.AssetOut(key=key, group_name="validated", owners=OWNERS, kinds={"pandera", "pandas"},
                          description=f"{metadata.raw_schema(name)['file']} records that passed the raw contract.")
        for name, key in VALIDATED_KEYS.items()
    }
    outs["findings"] = dg.AssetOut(key=FINDINGS_KEY, group_name="validated", owners=OWNERS, kinds={"pandera", "pandas"},
                                   description="Raw contract findings: every record held back (ERROR) or flagged (WARNING).")
    ins = {name: dg.AssetIn(key=key) for name, key in RAW_KEYS.items()}
    if zone == "unblinded":
        ins["randomization"] = dg.AssetIn(key=RANDOMIZATION_KEY)
        outs["validated_randomization"] = dg.AssetOut(
            key=VALIDATED_RANDOMIZATION_KEY, group_name="validated", owners=OWNERS, kinds={"pandas"},
            description="IWRS randomization reconciled with enrol.csv (unblinded zone only).")

    checks = [raw_contract_spec(VALIDATED_KEYS[n], metadata.raw_schema(n)["file"]) for n in metadata.RAW_FILES]

    @dg.multi_asset(outs=outs, ins=ins, name="raw_contract_validation", check_specs=checks, can_subset=False)
    def raw_contract_validation(context: AssetExecutionContext, **raw: pd.DataFrame):
        randomization = raw.pop("randomization", None)
        validated, raw_findings = validate_raw(raw)
        extra = []
        if randomization is not None:
            validated, reconciled, randomization_findings = iwrs.reconcile(randomization, validated)
            extra.append(randomization_findings)
        all_findings = findings.combine([raw_findings, *extra])
        for name in metadata.RAW_FILES:
            frame = validated[name].reset_index(drop=True)
            yield dg.Output(frame, output_name=name, metadata={
                "dagster/row_count": len(frame),
                "held_back": int(len(raw[name]) - len(frame)),
            })
        yield dg.Output(all_findings, output_name="findings", metadata={
            "dagster/row_count": len(all_findings), "dagster/column_schema": findings_table_schema(),
            **findings_counts(all_findings),
        })
        for name in metadata.RAW_FILES:
            yield raw_contract_result(VALIDATED_KEYS[name], metadata.raw_schema(name)["file"], all_findings)
        if randomization is not None:
            yield dg.Output(reconciled, output_name="validated_randomization",
                            metadata={"dagster/row_count": len(reconciled)})

    return raw_contract_validation
