"""The IWRS randomization list against enrol.csv (unblinded zone only).

Every randomized subject must be enrolled in the expansion, RANDNO must agree, a subject is
randomized once and a RANDNO used once, and the DOSE must fit the group (EXOSOME > 0, PLACEBO
0). The IWRS record decides the arm. An expansion subject without a usable record keeps a DM
record with a null arm (NOT ASSIGNED), and its doses are held back: their treatment is unknown.
"""

from __future__ import annotations

import pandas as pd

from pipeline import findings
from pipeline.derivations import codelists
from pipeline.derivations.distinct_values import lookup
from pipeline.derivations.dose_labels import dose_particles
from pipeline.derivations.iso_dates import partial_date_bounds, site_date_to_iso
from pipeline.validation.raw_contract import held_back_rows, rows_where, validate_file


def _randomized_after_dosing(usable: pd.DataFrame, given: pd.DataFrame) -> pd.DataFrame:
    """RND-DATE where RANDDAT is certainly after the first dose `given`: its earliest possible day
    after the latest day the first dose may be (partial dates count only when that settles it)."""
    iso = site_date_to_iso(given["EXSTDAT"])
    first_dose = pd.DataFrame({"SUBJID": given["SUBJID"], "latest": partial_date_bounds(iso)[1], "date": iso})
    first_dose = (first_dose.dropna(subset=["latest"]).sort_values(["SUBJID", "latest"], kind="stable")
                  .drop_duplicates("SUBJID").set_index("SUBJID"))
    randomized = partial_date_bounds(site_date_to_iso(usable["RANDDAT"]))[0]
    late = (randomized > lookup(usable["SUBJID"], first_dose["latest"])).fillna(False).astype(bool)
    return findings.for_rows("RND-DATE", usable[late.to_numpy()], value=usable.loc[late.to_numpy(), "RANDDAT"],
                             expected=lookup(usable.loc[late.to_numpy(), "SUBJID"], first_dose["date"]))


def reconcile(randomization: pd.DataFrame, validated: dict[str, pd.DataFrame]):
    """(validated frames with unresolvable doses removed, reconciled list, findings)."""
    ragged = randomization["src_ragged"]
    out = [validate_file("randomization", rows_where(randomization, ~ragged), None),
           findings.from_records(randomization.attrs.get("ingest_findings", []))]
    usable = randomization[~ragged & ~held_back_rows(randomization, out[0])]

    enrol = validated["enrol"]
    expansion = enrol[codelists.recode(enrol["PHASE"], "PHASE").eq("EXPANSION").fillna(False)
                      & codelists.recode(enrol["ENRLFL"], "NY").eq("Y").fillna(False)]
    expected_randno = expansion.set_index("SUBJID")["RANDNO"]

    duplicated = usable["RANDNO"].duplicated(keep=False)
    out.append(findings.for_rows("RND-DUPLICATE", usable[duplicated], value=usable.loc[duplicated, "RANDNO"],
                                 detail="RANDNO = '" + usable.loc[duplicated, "RANDNO"] + "' is used more than once; "
                                        "none of these records is used"))
    usable = usable[~duplicated]
    not_enrolled = ~usable["SUBJID"].isin(expected_randno.index)
    out.append(findings.for_rows("RND-NOT-ENROLLED", usable[not_enrolled], value=usable.loc[not_enrolled, "SUBJID"],
                                 detail="no enrolled EXPANSION record in enrol.csv"))
    usable = usable[~not_enrolled]

    group = codelists.recode(usable["TRTGRP"], "TRTGRP")
    dose = dose_particles(usable["DOSE"]).fillna(pd.to_numeric(usable["DOSE"], errors="coerce"))
    wrong_dose = (group.eq("EXOSOME") & ~(dose > 0)) | (group.eq("PLACEBO") & ~dose.eq(0))
    out.append(findings.for_rows("RND-DOSE", usable[wrong_dose], value=usable.loc[wrong_dose, "DOSE"],
                                 detail=group[wrong_dose],
                                 expected=group[wrong_dose].map({"EXOSOME": "particles > 0", "PLACEBO": "0"})))
    usable, group, dose = usable[~wrong_dose], group[~wrong_dose], dose[~wrong_dose]

    enrol_randno = usable["SUBJID"].map(expected_randno)
    mismatch = enrol_randno.ne(usable["RANDNO"]).fillna(True)
    out.append(findings.for_rows("RND-RANDNO", usable[mismatch], value=usable.loc[mismatch, "RANDNO"],
                                 expected=enrol_randno[mismatch].fillna("(empty)")))

    reconciled = pd.DataFrame({"SUBJID": usable["SUBJID"].to_numpy(), "RANDNO": usable["RANDNO"].to_numpy(),
                               "TRTGRP": group.to_numpy(), "DOSE": dose.astype("float64").to_numpy()})
    missing = expansion[~expansion["SUBJID"].isin(reconciled["SUBJID"])]
    out.append(findings.for_rows("RND-MISSING", missing, value=missing["SUBJID"], detail=missing["RANDNO"]))

    ex = validated["ex"]
    given = codelists.recode(ex["EXYN"], "NY").eq("Y").fillna(False)
    out.append(_randomized_after_dosing(usable, ex[given.to_numpy()]))
    unknown = ex["SUBJID"].isin(missing["SUBJID"]) & given
    out.append(findings.for_rows("RND-TREATMENT-UNKNOWN", ex[unknown], value=ex.loc[unknown, "SUBJID"]))
    validated = {**validated, "ex": ex[~unknown]}
    return validated, reconciled.sort_values("SUBJID").reset_index(drop=True), findings.combine(out)
