"""Asset checks shown in the Dagster UI with pass/fail and a failing-row sample.

They are evaluated inside the step that produces the asset (`check_specs`), on the frame already
in memory, so a check costs no extra step and no extra read:
- `raw_contract` on each validated/<file> (WARN): records held back are in the quarantine;
- `sdtm_conformance` on each SDTM dataset: BLOCKING. A failure is a pipeline bug: the step records
  the failed check results and then fails, before it stores or materializes any dataset
  (`refuse_nonconformant`), so the check's history shows the failure, publication does not run,
  the previous outputs stay as they were, and no later run of `reports/*` alone can publish the
  rejected data;
- `eligibility` on the eligibility-deviation listing (WARN);
- `transfers_accepted` on raw/transfer_inventory (WARN): a site's newest transfer folder was
  rejected (its data is not tonight's), with the reasons; the raw_contract checks see records only.
"""

import dagster as dg
import pandas as pd

from pipeline.assets.common import findings_counts, markdown_table
from pipeline.validation.sdtm_conformance import conformance_failures

RAW_CONTRACT = "raw_contract"
CONFORMANCE = "sdtm_conformance"
ELIGIBILITY = "eligibility"
TRANSFERS = "transfers_accepted"


def transfers_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(TRANSFERS, asset=key,
                             description="No transfer folder is rejected that is newer than its site's current one "
                                         "(nor a folder named like a site's): the quarantine has the reasons.")


def transfers_result(key: dg.AssetKey, ingest_findings: pd.DataFrame) -> dg.AssetCheckResult:
    rejected = ingest_findings[(ingest_findings["SEVERITY"] == "ERROR") & ingest_findings["RULE"].str.startswith("TRF-")]
    folders = rejected.drop_duplicates(["SITEID", "TRANSFER"])
    return dg.AssetCheckResult(
        asset_key=key, check_name=TRANSFERS, passed=rejected.empty, severity=dg.AssetCheckSeverity.WARN,
        description=f"{len(folders)} transfer folder(s) rejected", metadata={
            "rejected": markdown_table(rejected[["SITEID", "TRANSFER", "RULE", "MESSAGE"]], 20)})


def raw_contract_spec(key: dg.AssetKey, file: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(RAW_CONTRACT, asset=key,
                             description=f"Every {file} record meets the transfer spec (held-back records are "
                                         "in the quarantine).")


def raw_contract_result(key: dg.AssetKey, file: str, findings: pd.DataFrame) -> dg.AssetCheckResult:
    mine = findings[findings["FILE"] == file]
    errors = mine[mine["SEVERITY"] == "ERROR"]
    held = errors.drop_duplicates(["SITEID", "TRANSFER", "ROW"]).shape[0]
    return dg.AssetCheckResult(
        asset_key=key, check_name=RAW_CONTRACT, passed=errors.empty, severity=dg.AssetCheckSeverity.WARN,
        description=f"{held} record(s) held back", metadata={**findings_counts(mine),
                                                               "failing_rows": markdown_table(errors, 20)})


def conformance_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(CONFORMANCE, asset=key, blocking=True,
                             description="SDTMIG conformance (variables, types, Req, codelists, ISO 8601, keys, "
                                         "--SEQ, --DY, DM subjects, units, labels). Blocks publication on failure.")


def conformance_result(key: dg.AssetKey, dataset: str, frame: pd.DataFrame,
                       dm_subjects: pd.Series | None) -> dg.AssetCheckResult:
    failures = conformance_failures(dataset, frame, dm_subjects)
    by_rule = failures.groupby("rule").size().to_dict() if not failures.empty else {}
    description = ("conformant" if failures.empty else
                   "; ".join(f"{rule}: {n} failure(s)" for rule, n in sorted(by_rule.items()))
                   + f" - first: {failures.iloc[0].dropna().to_dict()}")
    return dg.AssetCheckResult(asset_key=key, check_name=CONFORMANCE, passed=failures.empty, description=description,
                               metadata={"failures": int(len(failures)), "failures_by_rule": dg.MetadataValue.json(by_rule),
                                         "failing_rows": markdown_table(failures, 20)})


def refuse_nonconformant(results: list[dg.AssetCheckResult]):
    """When a conformance result failed: yields the failed results, so that the check's history
    records them, and then fails the step, before anything is stored. Dagster points an evaluation
    at the asset's newest materialization, which is the published dataset, not the one that
    failed: the description says so. The passing datasets of a blocked run get no evaluation (the
    UI shows their check as not executed in that run); their last evaluation is still the one of
    what is published."""
    failed = [r for r in results if not r.passed]
    if failed:
        for result in failed:
            yield dg.AssetCheckResult(
                asset_key=result.asset_key, check_name=result.check_name, passed=False, metadata=result.metadata,
                description=f"blocked, not stored or materialized (the published dataset is an earlier run's): "
                            f"{result.description}")
        raise dg.Failure(
            description="; ".join(f"{CONFORMANCE} failed on {r.asset_key.to_user_string()}: {r.description}"
                                  for r in failed),
            metadata={f"{r.asset_key.to_user_string()} failing_rows": r.metadata["failing_rows"] for r in failed})


def eligibility_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(ELIGIBILITY, asset=key, description="No enrolled subject breaks an eligibility criterion.")


def eligibility_result(key: dg.AssetKey, listing: pd.DataFrame) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(asset_key=key, check_name=ELIGIBILITY, passed=listing.empty,
                               severity=dg.AssetCheckSeverity.WARN,
                               description=f"{listing['USUBJID'].nunique()} subject(s) with deviations",
                               metadata={"failing_rows": markdown_table(listing, 20)})
