"""Blinded and unblinded zones (pipeline-contract.md section 5): the blinded outputs never read
`unblinded/` and nothing in them separates the expansion arms; the unblinded outputs carry the
real arms and doses; an output folder or Dagster instance serves one zone only."""

import hashlib
import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_cli

DATASETS = ["dm", "suppdm", "ex", "ae", "suppae", "lb", "qs"]


def published(output: Path) -> dict[str, bytes]:
    names = [f"sdtm/{d}.parquet" for d in DATASETS] + [f"lineage/{d}.parquet" for d in DATASETS] + [
        "quarantine.parquet", "transfers.parquet", "reports/eligibility_deviations.parquet"]
    return {n: (output / n).read_bytes() for n in names}


def summary_without_run(output: Path) -> dict:
    summary = json.loads((output / "run.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("finished_at", "run_id")}


@pytest.fixture(scope="module")
def zones(tmp_path_factory):
    """The default trial run blinded three ways (unblinded/ present, absent, unreadable) while an
    audit hook records every file event under unblinded/, and once unblinded."""
    from pipeline.synthetic_trial import generate_trial

    root = tmp_path_factory.mktemp("zones")
    trial = generate_trial(root / "exports")
    secret = (root / "exports" / "unblinded").resolve()
    touched, watching = [], []

    def audit(event, args):
        if watching and event in ("open", "os.listdir", "os.scandir", "os.stat", "os.chmod", "os.rename", "os.remove",
                     "shutil.copyfile", "os.mkdir") and args:
            target = args[0]
            if isinstance(target, (str, bytes, os.PathLike)):
                text = os.fsdecode(target)
                if str(secret) in os.path.abspath(text) or text.endswith("randomization.csv"):
                    touched.append((event, text))

    def watched_run(*args, home):
        watching.append(True)
        try:
            return run_cli(*args, home=home)
        finally:
            watching.clear()

    sys.addaudithook(audit)
    exports = str(root / "exports")
    outputs = {name: root / f"blinded-{name}" for name in ("present", "absent", "unreadable")}
    assert watched_run("run", "--exports", exports, "--output", str(outputs["present"]), home=root / "home-blinded") == 0
    shutil.move(secret, root / "kept-aside")
    assert watched_run("run", "--exports", exports, "--output", str(outputs["absent"]), home=root / "home-blinded") == 0
    shutil.move(root / "kept-aside", secret)
    os.chmod(secret, 0)
    try:
        assert watched_run("run", "--exports", exports, "--output", str(outputs["unreadable"]),
                           home=root / "home-blinded") == 0
    finally:
        os.chmod(secret, 0o755)
    blinded_touches = list(touched)
    outputs["unblinded"] = root / "unblinded"
    assert watched_run("run", "--exports", exports, "--output", str(outputs["unblinded"]), "--unblinded",
                       home=root / "home-unblinded") == 0
    return {"trial": trial, "root": root, "outputs": outputs, "blinded_touches": blinded_touches,
            "unblinded_touches": touched[len(blinded_touches):]}


def test_blinded_runs_never_touch_the_unblinded_folder(zones):
    assert zones["blinded_touches"] == []
    assert any("randomization.csv" in path for _, path in zones["unblinded_touches"]), "the hook sees file opens"


def test_blinded_outputs_identical_with_unblinded_folder_present_absent_or_unreadable(zones):
    present, absent, unreadable = (zones["outputs"][k] for k in ("present", "absent", "unreadable"))
    assert published(present) == published(absent) == published(unreadable)
    assert summary_without_run(present) == summary_without_run(absent) == summary_without_run(unreadable)


def subject_features(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per subject: how many records, how many nulls, the set of values, and their shape with
    digits masked (a kit series 'A1..' vs 'B2..' shows in the shape)."""
    values = frame[column].astype("str")
    shape = values.str.replace(r"\d", "9", regex=True)
    grouped = pd.DataFrame({"USUBJID": frame["USUBJID"], "value": values, "shape": shape,
                            "null": frame[column].isna()}).groupby("USUBJID")
    return pd.DataFrame({
        "records": grouped.size(), "nulls": grouped["null"].sum(),
        "values": grouped["value"].agg(lambda v: tuple(sorted(v.fillna("<null>")))),
        "shapes": grouped["shape"].agg(lambda v: tuple(sorted(set(v.fillna("<null>"))))),
    })


def separating(frame: pd.DataFrame, arm: pd.Series, identifiers: set[str]) -> list[str]:
    """Columns with a per-subject feature constant within each arm and different between arms."""
    found = []
    for column in frame.columns:
        if column in identifiers:
            continue
        features = subject_features(frame, column).join(arm, how="inner")
        for feature in ["records", "nulls", "values", "shapes"]:
            per_arm = features.groupby("ARM")[feature].agg(lambda v: set(v))
            if len(per_arm) == 2 and all(len(s) == 1 for s in per_arm) and per_arm.iloc[0] != per_arm.iloc[1]:
                found.append(f"{column}:{feature}")
    return found


SUBJECT_IDENTIFIERS = {"USUBJID", "SUBJID", "SITEID", "RFSTDTC", "RFENDTC", "RFXSTDTC", "RFXENDTC", "RFICDTC",
                       "RFPENDTC", "BRTHDTC", "AGE"}


def arms_of(zones) -> pd.Series:
    subjects = zones["trial"].subjects.query("PHASE == 'EXPANSION'")
    return pd.Series(subjects["TRTGRP"].to_numpy(), index="MESAE-" + subjects["SUBJID"], name="ARM")


def datasets_and_reports(output: Path) -> dict[str, pd.DataFrame]:
    frames = {d: pq.read_table(output / "sdtm" / f"{d}.parquet").to_pandas() for d in DATASETS}
    quarantine = pq.read_table(output / "quarantine.parquet").to_pandas()
    frames["quarantine"] = quarantine.assign(USUBJID="MESAE-" + quarantine["SUBJID"].fillna(""))
    lineage = {f"lineage/{d}": pq.read_table(output / "lineage" / f"{d}.parquet").to_pandas() for d in DATASETS}
    return {**frames, **lineage}


def test_nothing_in_blinded_outputs_separates_the_arms(zones):
    arm = arms_of(zones)
    leaks = {name: separating(frame, arm, SUBJECT_IDENTIFIERS | {"ROW", "TRANSFER", "SHA256"})
             for name, frame in datasets_and_reports(zones["outputs"]["present"]).items()}
    assert {k: v for k, v in leaks.items() if v} == {}
    text = (zones["outputs"]["present"] / "run.json").read_text()
    for token in ("PLACEBO", "EXOSOME", '"PBO"', '"EXO"', "TRTGRP", "randomization"):
        assert token not in text


def test_the_leak_detector_sees_the_arms_in_unblinded_outputs(zones):
    """A detector that never fires proves nothing: on the unblinded outputs it must fire."""
    arm = arms_of(zones)
    frames = datasets_and_reports(zones["outputs"]["unblinded"])
    assert "ARMCD:values" in separating(frames["dm"], arm, SUBJECT_IDENTIFIERS)
    assert any(f.startswith("EXTRT:") for f in separating(frames["ex"], arm, SUBJECT_IDENTIFIERS))


def test_unblinded_run_has_real_arms_and_doses(zones):
    subjects = zones["trial"].subjects.set_index("SUBJID")
    output = zones["outputs"]["unblinded"]
    dm = pq.read_table(output / "sdtm" / "dm.parquet").to_pandas().set_index("SUBJID")
    ex = pq.read_table(output / "sdtm" / "ex.parquet").to_pandas()
    expansion = subjects[subjects["PHASE"] == "EXPANSION"]
    expected_arm = expansion["TRTGRP"].map({"EXOSOME": "EXO", "PLACEBO": "PBO"})
    assert (dm.loc[expansion.index, "ARMCD"] == expected_arm).all()
    treated = dm.loc[expansion.index, "RFXSTDTC"].notna()
    assert (dm.loc[expansion.index[treated], "ACTARMCD"] == expected_arm[treated]).all()
    doses = ex.assign(SUBJID=ex["USUBJID"].str.removeprefix("MESAE-")).join(subjects, on="SUBJID")
    expansion_doses = doses[doses["PHASE"] == "EXPANSION"]
    assert len(expansion_doses)
    assert (expansion_doses["EXTRT"] == expansion_doses["TRTGRP"].map(
        {"EXOSOME": "HUC-MSC-EXO", "PLACEBO": "PLACEBO"})).all()
    assert (expansion_doses["EXDOSE"] == expansion_doses["DOSE"]).all()
    assert (expansion_doses["EXDOSU"] == "PARTICLES").all()      # a placebo dose of 0 has its unit
    assert json.loads((output / "run.json").read_text())["zone"] == "unblinded"
    summary = json.loads((output / "run.json").read_text())
    rows = summary["rows"]["randomization.csv"]
    assert rows == {"read": len(expansion), "mapped": len(expansion), "held_back": 0, "not_mapped": 0}
    # The list that decides ARM, EXTRT and EXDOSE is identified like every site file.
    iwrs = zones["root"] / "exports" / "unblinded" / "randomization.csv"
    assert summary["randomization"] == {"file": "unblinded/randomization.csv",
                                        "sha256": hashlib.sha256(iwrs.read_bytes()).hexdigest()}


def test_blinded_instance_holds_nothing_unblinded(zones):
    home = zones["root"] / "home-blinded"
    texts = []
    for database in home.rglob("*.db"):
        with sqlite3.connect(database) as connection:
            for (table,) in connection.execute("select name from sqlite_master where type = 'table'"):
                for row in connection.execute(f'select * from "{table}"'):
                    texts.append(" ".join(str(v) for v in row))
    for log in home.rglob("*"):
        if log.is_file() and log.suffix in (".out", ".err", ".complete", ".log"):
            texts.append(log.read_text(errors="replace"))
    blob = "\n".join(texts)
    assert "raw/transfer_inventory" in blob or "transfer_inventory" in blob, "the scan reads the run history"
    for token in ("PLACEBO", "EXOSOME", "TRTGRP", "randomization.csv", "raw/randomization"):
        assert token not in blob, token


def test_zones_refuse_each_others_output_folders_and_instances(zones, capsys):
    exports, root = zones["root"] / "exports", zones["root"]
    blinded, unblinded = zones["outputs"]["present"], zones["outputs"]["unblinded"]
    assert run_cli("run", "--exports", str(exports), "--output", str(blinded), "--unblinded",
                   home=root / "home-unblinded") == 2
    assert "holds blinded outputs" in capsys.readouterr().err
    assert run_cli("run", "--exports", str(exports), "--output", str(unblinded), home=root / "home-blinded") == 2
    assert "holds unblinded outputs" in capsys.readouterr().err
    assert run_cli("run", "--exports", str(exports), "--output", str(root / "new-out"), "--unblinded",
                   home=root / "home-blinded") == 2
    assert "serves the blinded zone" in capsys.readouterr().err
    os.environ["MESAE_UNBLINDED"] = "1"
    try:
        assert run_cli("run", "--exports", str(exports), "--output", str(blinded), home=root / "home-unblinded") == 2
    finally:
        del os.environ["MESAE_UNBLINDED"]
    # an unblinded instance (run history, job snapshot) inside the blinded output folder
    assert run_cli("run", "--exports", str(exports), "--output", str(root / "new-out-2"), "--unblinded",
                   home=blinded / "team-dagster") == 2
    assert f"is inside the blinded output folder {blinded}" in capsys.readouterr().err
    assert not (blinded / "team-dagster" / "mesae-zone").exists()


@pytest.mark.parametrize("inside", ["sdtm", ".mesae", "lineage", "current/reports", "new/deeper"])
def test_no_output_folder_nests_in_another(zones, capsys, inside):
    """`<blinded>/sdtm` resolves into a published blinded release: an unblinded run there used to
    publish EXO/PBO arms under the blinded folder (and a blinded run likewise into unblinded)."""
    exports, root = zones["root"] / "exports", zones["root"]
    blinded, unblinded = zones["outputs"]["present"], zones["outputs"]["unblinded"]
    before, files = published(blinded), sorted(blinded.rglob("*"))
    assert run_cli("run", "--exports", str(exports), "--output", str(blinded / inside), "--unblinded",
                   home=root / "home-unblinded") == 2
    assert f"inside the blinded output folder {blinded}" in capsys.readouterr().err
    assert run_cli("run", "--exports", str(exports), "--output", str(unblinded / inside),
                   home=root / "home-blinded") == 2
    assert "inside the unblinded output folder" in capsys.readouterr().err
    assert published(blinded) == before and sorted(blinded.rglob("*")) == files


def test_no_output_folder_holds_another_or_the_exports(zones, capsys):
    """Looking down as well as up: a blinded run into a folder that already holds an unblinded
    output folder (or the exports, with unblinded/) published around it."""
    exports, root = zones["root"] / "exports", zones["root"]
    outer = root / "outer"
    shutil.copytree(zones["outputs"]["unblinded"], outer / "team" / "unblinded", symlinks=True)
    assert run_cli("run", "--exports", str(exports), "--output", str(outer), home=root / "home-blinded") == 2
    assert f"holds the unblinded output folder {outer / 'team' / 'unblinded'}" in capsys.readouterr().err
    assert not (outer / "run.json").exists()
    assert run_cli("run", "--exports", str(exports), "--output", str(root), home=root / "home-blinded") == 2
    assert f"the exports folder {exports.resolve()} is inside the output folder" in capsys.readouterr().err
    # an archive of the zone's own outputs inside its folder leaks nothing: not refused
    kept = root / "kept-outputs"
    shutil.copytree(zones["outputs"]["present"], kept, symlinks=True)
    shutil.copytree(zones["outputs"]["present"], kept / "archive" / "2026-11-26", symlinks=False)
    assert run_cli("run", "--exports", str(exports), "--output", str(kept), home=root / "home-blinded") == 0


def test_the_zone_is_not_run_configuration(zones):
    """A launchpad config naming the blinded folder, run by the unblinded code location, published
    the arms into the blinded folder: the zone is no longer a config field, and the unblinded
    assets refuse a blinded folder whatever the config says."""
    import dagster as dg

    from pipeline.definitions import JOB_NAME, build_definitions

    exports, blinded = zones["root"] / "exports", zones["outputs"]["present"]
    import pydantic

    from pipeline.resources import StudySettings
    with pytest.raises(pydantic.ValidationError, match="zone"):   # code written for the old field is refused
        StudySettings.for_zone("blinded", exports_dir=str(exports), output_dir=str(blinded), zone="unblinded")
    before = published(blinded)
    job = build_definitions(exports, zones["root"] / "unblinded-elsewhere", "unblinded").get_job_def(JOB_NAME)
    config = {"exports_dir": str(exports), "output_dir": str(blinded), "lock_timeout_seconds": 30}
    with pytest.raises(dg.DagsterInvalidConfigError, match="zone"):
        job.execute_in_process(run_config={"resources": {"settings": {"config": {**config, "zone": "blinded"}}}},
                               instance=dg.DagsterInstance.ephemeral())
    result = job.execute_in_process(run_config={"resources": {"settings": {"config": config}}},
                                    instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    # The asset store's folder is configurable on its own: the unblinded assets' values (the IWRS
    # list, the arms) went into the blinded folder's store, and a blinded reports-only run published them.
    stored = sorted((p, p.stat().st_mtime_ns) for p in (blinded / ".mesae" / "assets").rglob("*"))
    result = job.execute_in_process(
        run_config={"resources": {"store": {"config": {"output_dir": str(blinded)}}}},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    assert sorted((p, p.stat().st_mtime_ns) for p in (blinded / ".mesae" / "assets").rglob("*")) == stored
    assert not (blinded / ".mesae" / "assets" / "raw" / "randomization.arrow").exists()
    # nor at a fresh folder, however placed (a stash in the exports root took the arms)
    stash = exports / "site-01" / "stash"
    result = job.execute_in_process(
        run_config={"resources": {"store": {"config": {"output_dir": str(stash)}}}},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success and not stash.exists()
    assert published(blinded) == before


@pytest.mark.parametrize("value, zone", [("1", "unblinded"), ("TRUE", "unblinded"), (" Yes ", "unblinded"),
                                         ("", "blinded"), ("0", "blinded"), ("no", "blinded"),
                                         ("2", None), ("on", None)])
def test_the_zone_variable_reads_the_same_for_the_cli_and_dagster_dev(monkeypatch, value, zone):
    """`mesae run` took TRUE or Yes as unblinded where the definitions `dagster dev` loads took them
    as blinded, and `on` silently as blinded: one parser now, refusing what is neither."""
    import argparse

    from pipeline.cli import UsageError, zone_of
    from pipeline.output_folder import zone_from_environment

    monkeypatch.setenv("MESAE_UNBLINDED", value)
    if zone is None:
        with pytest.raises(ValueError, match="must be 1, true or yes"):
            zone_from_environment()
        with pytest.raises(UsageError):
            zone_of(argparse.Namespace(unblinded=False))
    else:
        assert zone_from_environment() == zone == zone_of(argparse.Namespace(unblinded=False))


@pytest.mark.parametrize("value, flag, zone", [("0", "--unblinded", None), ("no", "--unblinded", None),
                                               ("1", "--blinded", None), ("yes", "--blinded", None),
                                               ("", "--blinded", "blinded"), ("", "--unblinded", "unblinded"),
                                               ("1", "--unblinded", "unblinded"), ("0", "--blinded", "blinded")])
def test_a_zone_flag_that_contradicts_the_variable_is_refused(monkeypatch, value, flag, zone):
    """`MESAE_UNBLINDED=0 mesae run --unblinded` ran unblinded in silence, and a blinded user whose
    shell inherited MESAE_UNBLINDED=1 had no way to insist on the blinded zone."""
    from pipeline.cli import UsageError, build_parser, zone_of

    monkeypatch.setenv("MESAE_UNBLINDED", value)
    args = build_parser().parse_args(["run", "--exports", "e", "--output", "o", flag])
    if zone is None:
        with pytest.raises(UsageError, match=f"{flag} contradicts MESAE_UNBLINDED"):
            zone_of(args)
    else:
        assert zone_of(args) == zone


def test_randomization_inconsistencies_are_findings(tmp_path):
    from pipeline.synthetic_trial import generate_trial

    trial = generate_trial(tmp_path / "exports", subjects=10, transfers=1)
    path = tmp_path / "exports" / "unblinded" / "randomization.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(frame) >= 4
    frame.loc[0, "RANDNO"] = "R999"                                   # disagrees with enrol.csv
    placebo = frame.index[frame["TRTGRP"] == "PLACEBO"][0]
    frame.loc[placebo, "DOSE"] = "5.0E10"                             # a placebo with a dose
    escalation_subject = trial.subjects.query("PHASE == 'ESCALATION'")["SUBJID"].iloc[0]
    frame = pd.concat([frame, pd.DataFrame([{"RANDNO": "R900", "SUBJID": escalation_subject, "TRTGRP": "EXOSOME",
                                             "DOSE": "5.0E10", "RANDDAT": "2026-06-01"}])], ignore_index=True)
    frame.to_csv(path, index=False)
    output = tmp_path / "output"
    assert run_cli("run", "--exports", str(tmp_path / "exports"), "--output", str(output), "--unblinded",
                   home=tmp_path / "home") == 0
    quarantine = pq.read_table(output / "quarantine.parquet").to_pandas()
    rnd = quarantine[quarantine["RULE"].str.startswith("RND-")]
    placebo_subject = frame.loc[placebo, "SUBJID"]
    assert set(zip(rnd["RULE"], rnd["SUBJID"])) >= {
        ("RND-RANDNO", frame.loc[0, "SUBJID"]), ("RND-DOSE", placebo_subject),
        ("RND-NOT-ENROLLED", escalation_subject), ("RND-MISSING", placebo_subject)}
    assert (rnd.loc[rnd["RULE"] == "RND-DOSE", "FILE"] == "randomization.csv").all()
    dm = pq.read_table(output / "sdtm" / "dm.parquet").to_pandas().set_index("SUBJID")
    assert pd.isna(dm.loc[placebo_subject, "ARMCD"]) and dm.loc[placebo_subject, "ARMNRS"] == "NOT ASSIGNED"
    ex = pq.read_table(output / "sdtm" / "ex.parquet").to_pandas()
    assert f"MESAE-{placebo_subject}" not in set(ex["USUBJID"])
    assert dm.loc[frame.loc[0, "SUBJID"], "ARMCD"] in ("EXO", "PBO")   # the IWRS record decides


@pytest.mark.parametrize("randdat, doses, late", [
    ("2026-10-20", [("Y", "07 OCT 2026"), ("Y", "2026-10-08")], "2026-10-07"),   # dosed 13 days before
    ("2026-10-07", [("Y", "2026-10-07")], None),                                 # the same day
    ("UN OCT 2026", [("Y", "2026-10-07")], None),                                # may be 1 October
    ("2026-11-02", [("Y", "2026-10"), ("Y", "2026-11-03")], "2026-10"),          # a partial first dose
    ("2026-10-20", [("N", "2026-10-07"), ("Y", "2026-10-21")], None),            # the earlier dose was not given
    ("2026-10-20", [], None),                                                    # not dosed yet
])
def test_randomized_after_the_first_dose_is_reported(randdat, doses, late):
    """RANDDAT is required by the spec and was read for its format only: a subject dosed before
    it was randomized is reported (RND-DATE, WARNING), when the dates settle it."""
    from pipeline.validation.randomization import _randomized_after_dosing

    coordinates = {"src_site": ["unblinded"], "src_transfer": ["unblinded"], "src_file": ["randomization.csv"],
                   "src_row": [3]}
    usable = pd.DataFrame({"SUBJID": ["02-011"], "RANDDAT": [randdat], **coordinates}).astype({"RANDDAT": "str"})
    ex = pd.DataFrame({"SUBJID": ["02-011"] * len(doses), "EXYN": [y for y, _ in doses],
                       "EXSTDAT": [d for _, d in doses]}, dtype="str")
    found = _randomized_after_dosing(usable, ex[ex["EXYN"].eq("Y")])
    if late is None:
        assert found.empty, found["MESSAGE"].tolist()
    else:
        assert found["MESSAGE"].tolist() == [
            f"randomization.csv row 3: RANDDAT = '{randdat}' is after the subject's first dose ({late}); "
            "a subject is randomized before it is dosed"]
        assert found["SEVERITY"].tolist() == ["WARNING"]
