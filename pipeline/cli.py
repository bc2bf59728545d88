"""The `mesae` command: demo, demo-data, run, trace.

Exit codes of `run` (pipeline-contract.md section 1): 0 outputs published; 2 unusable
invocation or input (one line on stderr, no traceback); 1 any other failure, after which the
previously published outputs are intact. Dagster is imported only by the commands that need
it, so `mesae --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from pipeline.output_folder import ZONE_ENV, OutputFolder, OutputFolderError, zone_from_environment

# The run's events go to the Dagster instance (and its UI); the terminal gets a short summary.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class UsageError(Exception):
    """An unusable invocation or input root: exit 2 with this one-line reason."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as the contract asks
        raise UsageError(f"{message} (see {self.prog} --help)")


def seconds(text: str) -> float:
    """A wait in seconds: `nan` would wait for ever, a negative one not at all."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; expected 0 or more, e.g. 30")
    return value


def site_id(text: str) -> str:
    from pipeline.transfers import SITEID

    if not SITEID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SITEID; expected two digits, e.g. 03")
    return text


def build_parser() -> Parser:
    # No abbreviations: `--unblind` or `--export` in a nightly script should fail, not be guessed.
    parser = Parser(prog="mesae", description="MESAE site exports to CDISC SDTM, orchestrated by Dagster.",
                    allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND",
                                     title="commands (mesae COMMAND --help for each)")

    demo = commands.add_parser("demo", help="make a synthetic trial and run the pipeline on it", allow_abbrev=False)
    demo.add_argument("--dir", default="demo", type=Path, help="demo folder (default ./demo)")
    demo.add_argument("--subjects", type=int, default=None,
                      help="enrolled subjects of a new demo trial (default 38; an existing DIR/exports is reused)")
    demo.add_argument("--seed", type=int, default=None, help="seed of a new demo trial (default 0)")

    data = commands.add_parser("demo-data", help="write synthetic raw site exports", allow_abbrev=False)
    data.add_argument("--out", required=True, type=Path, help="exports root to create")
    data.add_argument("--subjects", type=int, default=38, help="enrolled subjects (default 38)")
    data.add_argument("--sites", type=int, default=None,
                      help="sites (default 5, more when SUBJID numbering needs them)")
    data.add_argument("--transfers", type=int, default=2, help="complete transfers per site (default 2)")
    data.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes (default 0)")

    run = commands.add_parser("run", help="ingest, validate, map and publish through Dagster", allow_abbrev=False)
    run.add_argument("--exports", required=True, type=Path, help="exports root (read only)")
    run.add_argument("--output", required=True, type=Path, help="output folder of this blinding zone")
    zone = run.add_mutually_exclusive_group()
    zone.add_argument("--unblinded", action="store_true", help=f"unblinded zone (also {ZONE_ENV}=1)")
    zone.add_argument("--blinded", action="store_true",
                      help=f"blinded zone, refusing to run if {ZONE_ENV} says unblinded (the default zone)")
    run.add_argument("--without-site", action="append", default=[], metavar="SITEID", type=site_id,
                     help="a site of the last published set that has closed: publish without it (repeatable)")
    run.add_argument("--lock-timeout", type=seconds, default=30.0,
                     help="seconds to wait for another run on the same output folder (default 30)")

    trace = commands.add_parser("trace", help="print an SDTM record and the raw row(s) it came from",
                                allow_abbrev=False)
    trace.add_argument("usubjid")
    trace.add_argument("domain", help="DM, EX, AE, LB, QS, SUPPAE ...")
    trace.add_argument("seq", help="the record's --SEQ (for DM and SUPPDM: 1)")
    trace.add_argument("--output", type=Path, default=Path("demo/output"),
                       help="output folder of the run (default demo/output)")
    trace.add_argument("--exports", type=Path, default=Path("demo/exports"),
                       help="exports root the run read (default demo/exports)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:   # the commands, not only "a command is required"
        build_parser().print_help(sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
        handler = {"demo": demo, "demo-data": demo_data, "run": run, "trace": trace}[args.command]
        return handler(args)
    except UsageError as error:
        print(f"mesae: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mesae: interrupted; published outputs are unchanged", file=sys.stderr)
        return 1
    except BrokenPipeError:   # `mesae trace ... | head`: the reader stopped; 128 + SIGPIPE, as a shell reports it
        stop_writing_stdout()
        return 141


def demo_data(args) -> int:
    from pipeline.synthetic_trial import generate_trial

    try:
        trial = generate_trial(args.out, subjects=args.subjects, sites=args.sites, transfers=args.transfers,
                               seed=args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"wrote synthetic exports to {trial.exports} ({len(trial.subjects)} consented subjects, seed {args.seed})")
    return 0


def zone_of(args) -> str:
    """--unblinded, --blinded or MESAE_UNBLINDED; the variable is checked either way, as the code
    location (loaded by the run as well) refuses a value that is neither yes nor no, and a flag
    that contradicts it is refused: a shell that inherited the other zone's setting is a mistake."""
    try:
        from_environment = zone_from_environment()
    except ValueError as error:
        raise UsageError(str(error)) from None
    asked = "unblinded" if args.unblinded else "blinded" if getattr(args, "blinded", False) else None
    if asked is not None and os.environ.get(ZONE_ENV, "").strip() and asked != from_environment:
        raise UsageError(f"--{asked} contradicts {ZONE_ENV}={os.environ[ZONE_ENV]!r} ({from_environment}); "
                         f"unset {ZONE_ENV} or drop the flag")
    return asked or from_environment


def dagster_home(zone: str) -> Path:
    """$DAGSTER_HOME, or a project-local instance per zone (SQLite), created on first use."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home" / zone).absolute()
    try:
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists():
            config.write_text("# Created by mesae: a local SQLite instance. See README for PostgreSQL.\n"
                              "telemetry:\n  enabled: false\n", encoding="utf-8")
    except OSError as error:
        raise unusable_instance(home, error) from None
    return home


def instance_problem(home: Path, error: BaseException) -> str:
    """One line for the instance's storage failing: the OS's words, or the database's first line."""
    cause = error.strerror if isinstance(error, OSError) and error.strerror else \
        (str(getattr(error, "orig", None) or error).strip().splitlines() or [type(error).__name__])[0]
    return f"the Dagster instance folder {home} cannot be used ({cause})"


def unusable_instance(home: Path, error: BaseException) -> UsageError:
    return UsageError(f"{instance_problem(home, error)}; set DAGSTER_HOME to a writable folder (nothing was run)")


def preflight(exports: Path, output: Path, zone: str, home: Path, sites_withdrawn: list[str] = ()) -> None:
    """Everything that makes an invocation unusable, checked before Dagster starts (exit 2)."""
    from pipeline.transfers import (RANDOMIZATION_PATH, ExportsRootError, check_exports_root, list_transfers,
                                    unknown_withdrawals)

    try:
        listing = list_transfers(exports)
        # Said, not refused: a flag kept in a cron line after the night it was needed is harmless.
        unknown = unknown_withdrawals(sites_withdrawn, OutputFolder(output, zone).published_inputs(), listing)
        if unknown:
            print(f"mesae: {unknown}", file=sys.stderr)
        check_exports_root(exports)
    except ExportsRootError as error:
        raise UsageError(str(error)) from None
    if zone == "unblinded":
        path = exports.joinpath(*RANDOMIZATION_PATH)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise UsageError(f"unblinded run needs a readable {path}")
    try:
        OutputFolder(output, zone).check(exports)
    except OutputFolderError as error:
        raise UsageError(str(error)) from None


def run(args) -> int:
    zone = zone_of(args)
    home = dagster_home(zone)
    preflight(args.exports, args.output, zone, home, args.without_site)
    return execute(args.exports, args.output, zone, home, args.lock_timeout, args.without_site)


def execute(exports: Path, output: Path, zone: str, home: Path, lock_timeout: float,
            sites_withdrawn: list[str] | None = None) -> int:
    os.environ["DAGSTER_HOME"] = str(home)
    import warnings

    warnings.filterwarnings("ignore")
    import dagster as dg

    from pipeline import metadata
    from pipeline.automation import ScheduleSettingError, failure_guidance
    from pipeline.resources import ZoneError, check_instance_zone

    from sqlalchemy.exc import SQLAlchemyError

    try:   # the module builds the code location's definitions from the environment as it loads
        from pipeline.definitions import JOB_NAME, build_definitions

        definitions = build_definitions(exports, output, zone, lock_timeout, sites_withdrawn)
    except ScheduleSettingError as error:
        raise UsageError(str(error)) from None
    job = definitions.resolve_job_def(JOB_NAME)
    # The instance's own storage failing (a read-only or full disk) is named in one line, as the
    # contract asks: before the run, an unusable invocation; during it, a failed run.
    try:
        instance = dg.DagsterInstance.get()
        check_instance_zone(instance, zone)
    except ZoneError as error:
        raise UsageError(str(error)) from None
    except (OSError, SQLAlchemyError) as error:
        raise unusable_instance(home, error) from None
    with instance:
        try:
            close_abandoned_runs(instance)
            result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET,
                                            tags={"mesae/source": "cli", **this_process(),
                                                  "mesae/code_version": metadata.code_version(),
                                                  "mesae/exports": str(exports.absolute())})
        except (OSError, SQLAlchemyError) as error:
            print(f"mesae: run failed: {instance_problem(home, error)}; the published outputs are unchanged",
                  file=sys.stderr)
            return 1
        if result.success:
            report_published(output, result.run_id)
            return 0
        reason = failure_reason(result)
    print(f"mesae: run {result.run_id} failed: {reason}", file=sys.stderr)
    print(f"mesae: {failure_guidance(reason)}", file=sys.stderr)
    return 1


def this_process() -> dict[str, str]:
    import socket

    return {"mesae/host": socket.gethostname(), "mesae/pid": str(os.getpid())}


def close_abandoned_runs(instance) -> None:
    """A `mesae run` killed mid-run (kill -9, a lost machine, a Ctrl-C before Dagster started it)
    leaves its run STARTED (or NOT_STARTED) in the instance for ever. The next run on the same host marks it FAILED, so the UI shows no phantom run in
    progress. Runs of the UI and daemon are Dagster's own to monitor."""
    import dagster as dg

    from pipeline.output_folder import process_alive

    host = this_process()["mesae/host"]
    records = instance.get_run_records(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        tags={"mesae/source": "cli", "mesae/host": host}))
    for record in records:
        pid = record.dagster_run.tags.get("mesae/pid", "")
        if pid.isdigit() and not process_alive(int(pid)):
            instance.report_run_failed(record.dagster_run, message=(
                f"the mesae process {pid} on {host} ended before the run finished (killed?); the output "
                "folder holds the last set published in full (see its run.json)"))


def failure_reason(result) -> str:
    """One line: the failed blocking checks, else the innermost error of the failure."""
    from pipeline.automation import failure_message

    return failure_message(result.all_events) or "see the run's log in the Dagster UI"


def _why_not_found(output: Path, usubjid: str, lineage) -> str:
    """Where to look instead: the subject's other records, or its findings in the quarantine
    (a subject held back has none in SDTM; --SEQ renumbers when records come and go)."""
    import pyarrow.parquet as pq

    from pipeline import metadata

    prefix = metadata.study()["usubjid_prefix"]
    if not usubjid.startswith(prefix):
        return f" (a USUBJID is {prefix}<SUBJID>, e.g. {prefix}01-001)"
    mine = lineage.loc[lineage["USUBJID"] == usubjid, "SEQ"].dropna()
    if len(mine):
        return f" (its records have SEQ {int(mine.min())} to {int(mine.max())}: --SEQ renumbers when records come and go)"
    subjid, files = usubjid.removeprefix(prefix), set(lineage["FILE"].dropna().astype("str"))
    quarantine = pq.read_table(output / "quarantine.parquet", columns=["SUBJID", "FILE", "ROW", "SEVERITY"]).to_pandas()
    held = quarantine[(quarantine["SUBJID"] == subjid) & (quarantine["SEVERITY"] == "ERROR")
                      & quarantine["FILE"].isin(files)].drop_duplicates(["FILE", "ROW"])
    if len(held):
        return (f"; {len(held)} of the subject's records in {', '.join(sorted(set(held['FILE'])))} are held back "
                f"(ERROR findings in {output / 'quarantine.parquet'}, SUBJID {subjid})")
    return "; the subject has no record in this dataset"


def report_published(output: Path, run_id: str) -> None:
    """The summary of a published run. Exit 0 means published, so a reader that stopped early
    (`| head`) or a full disk under a redirected stdout does not turn the night into a failure."""
    try:
        print_summary(output, run_id)
        sys.stdout.flush()
    except OSError as error:
        stop_writing_stdout()
        print(f"mesae: run {run_id} published to {output}; its summary could not be written to the standard "
              f"output ({error.strerror or error})", file=sys.stderr)


def stop_writing_stdout() -> None:
    """Points stdout at /dev/null, so that the flush at exit does not fail again with a traceback."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def print_summary(output: Path, run_id: str) -> None:
    summary = json.loads((output / "run.json").read_text(encoding="utf-8"))
    records = ", ".join(f"{k.upper()} {v}" for k, v in summary["records"].items())
    warnings = sum(r["n"] for r in summary["findings_by_rule"] if r["SEVERITY"] == "WARNING")
    transfers = ", ".join(f"{n} {s.lower()}" for s, n in summary["transfers"].items()) or "none"
    print(f"MESAE {summary['zone']} run {run_id} published to {output}")
    print(f"  subjects: {summary['subjects']}; records: {records}")
    print(f"  held back: {summary['held_back']} raw records; warnings: {warnings}; transfers: {transfers}")
    for site in summary.get("sites_behind", []):
        why = [f"{site['hours_behind_newest']:g} h older than the newest site's"] if site["hours_behind_newest"] else []
        why += [f"newer transfer(s) REJECTED: {', '.join(site['newer_rejected'])}"] if site["newer_rejected"] else []
        print(f"  behind: site {site['site']} is on transfer {site['current']}; {'; '.join(why)}")
    by_rule = ", ".join(f"{r['RULE']} {r['n']}" for r in summary["findings_by_rule"])
    if by_rule:
        print(f"  findings by rule: {by_rule}  (details: {output / 'quarantine.parquet'})")


def demo(args) -> int:
    from pipeline.synthetic_trial import generate_trial

    exports, output = args.dir / "exports", args.dir / "output"
    if exports.exists():
        ignored = " ".join(f"--{name} {value}" for name, value in (("subjects", args.subjects), ("seed", args.seed))
                           if value is not None)
        print(f"reusing the synthetic exports in {exports} (delete the folder for a new trial"
              + (f"; {ignored} applies only to a new one)" if ignored else ")"))
    else:
        try:
            generate_trial(exports, subjects=38 if args.subjects is None else args.subjects,
                           seed=0 if args.seed is None else args.seed)
        except ValueError as error:
            raise UsageError(str(error)) from None
        except OSError as error:
            raise UsageError(f"cannot write the demo trial to {exports}: {error.strerror or error}") from None
        print(f"wrote a synthetic MESAE trial to {exports}")
    home = dagster_home("blinded")
    preflight(exports, output, "blinded", home)
    code = execute(exports, output, "blinded", home, 30.0)
    if code == 0:
        root = Path(__file__).resolve().parent.parent
        print("\nOpen the Dagster UI (from the repository root):")
        dagster = Path(sys.executable).parent / "dagster"
        print(f"  cd {root} && DAGSTER_HOME={home} MESAE_EXPORTS={exports.absolute()} "
              f"MESAE_OUTPUT={output.absolute()} {dagster if dagster.exists() else 'dagster'} dev")
        mesae = Path(sys.executable).parent / "mesae"
        print(f"Trace a record to its raw row:  {mesae if mesae.exists() else 'mesae'} trace MESAE-01-001 LB 1 "
              f"--output {output} --exports {exports}")
    return code


def trace(args) -> int:
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline import metadata, transfers

    dataset = args.domain.lower()
    # One set: `current` resolved once, so that a run publishing meanwhile cannot pair one set's
    # lineage with the next one's records.
    published = (args.output / "current").resolve() if (args.output / "current").is_symlink() else args.output
    path = published / "lineage" / f"{dataset}.parquet"
    from pipeline.sdtm_datasets import sdtm_datasets

    known = sdtm_datasets()
    if dataset not in known:
        raise UsageError(f"unknown dataset {args.domain!r}; expected one of {', '.join(d.upper() for d in known)}")
    if not path.is_file():
        raise UsageError(f"no lineage for {args.domain} in {args.output} (is it a mesae output folder?)")
    try:
        seq = int(args.seq)
    except ValueError:
        raise UsageError(f"SEQ must be a whole number, not {args.seq!r}") from None
    if not args.exports.is_dir():   # the default, demo/exports, is relative to the current folder
        raise UsageError(f"exports folder {args.exports} not found (from {Path.cwd()}); give --exports, the "
                         "folder the run read")
    lineage = pq.read_table(path).to_pandas()
    hits = lineage[(lineage["USUBJID"] == args.usubjid) & (lineage["SEQ"].fillna(1) == seq)]
    if hits.empty:
        raise UsageError(f"{args.domain.upper()} has no record USUBJID={args.usubjid} SEQ={seq}"
                         + _why_not_found(published, args.usubjid, lineage))
    # The lineage file's rows are the dataset's rows, in the same order.
    records = pq.read_table(published / "sdtm" / f"{dataset}.parquet").to_pandas().iloc[hits.index]
    for position, record in records.iterrows():
        print(f"{args.domain.upper()} record, row {position + 1} of {published / 'sdtm' / f'{dataset}.parquet'}:")
        for variable, value in record.items():
            print(f"  {variable:10} {'' if pd.isna(value) else value}")
    changed = []
    for hit in hits.drop_duplicates(["SITEID", "TRANSFER", "FILE", "ROW"]).itertuples(index=False):
        source = transfers.Transfer(site=hit.SITEID, name=hit.TRANSFER,
                                    path=args.exports / f"site-{hit.SITEID}" / hit.TRANSFER)
        if not transfers.read_manifest(source):
            raise UsageError(f"transfer {source.path} is not readable any more: {source.reason}")
        data = (source.path / hit.FILE).read_bytes()
        name = next(n for n in metadata.RAW_FILES if metadata.raw_schema(n)["file"] == hit.FILE)
        raw = transfers.read_csv_file(source, hit.FILE, data, metadata.raw_schema(name))
        rows = raw.data[raw.data["src_row"] == hit.ROW] if raw is not None else None
        if rows is None or rows.empty:
            raise UsageError(f"{source.path / hit.FILE} has no readable data row {hit.ROW} any more: the file "
                             f"changed since the run (the run read sha256 {hit.SHA256})")
        row = rows.iloc[0]
        sha_note = "sha256 matches" if raw.sha256 == hit.SHA256 else f"CHANGED since the run (run saw {hit.SHA256})"
        if raw.sha256 != hit.SHA256:
            changed.append(str(source.path / hit.FILE))
        print(f"{args.domain.upper()} {args.usubjid} SEQ {seq} <- {source.path / hit.FILE} data row {hit.ROW} ({sha_note})")
        for column in metadata.raw_schema(name)["columns"]:
            value = row[column]
            print(f"  {column:10} {'' if pd.isna(value) else value}")
    if changed:   # an audit trail that prints today's values as the source must not look like success
        print(f"mesae: {', '.join(changed)} changed since the run: the raw values above are today's, not those "
              f"the record was built from", file=sys.stderr)
        return 1
    return 0


def console() -> int:
    """The `mesae` command: tunes the garbage collector before the heavy imports, which make
    most of the objects it would otherwise walk again and again (pipeline/garbage_collection.py)."""
    from pipeline.garbage_collection import tune_for_pipeline_process

    tune_for_pipeline_process()
    return main()


if __name__ == "__main__":
    sys.exit(console())
