"""A team instance: the run history in PostgreSQL (dagster-postgres) instead of SQLite files.

Why: a study team shares one Dagster instance (the UI, the daemon, several data managers), and
that is PostgreSQL. `mesae run` must record the run, its materializations and checks there, the
same way it does in the local SQLite default, and the run must be readable back from it.

Needs a server: MESAE_TEST_POSTGRES_URL=postgresql://user@host:port/db (.ci/run starts one).
Each test run creates its own database next to that one (and drops it afterwards) so runs of the
suite never see each other's history; without the right to create databases it uses the given
database itself, which is still safe because everything is read back by run id.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import run_cli

pytestmark = pytest.mark.postgres

URL = os.environ.get("MESAE_TEST_POSTGRES_URL", "")
DOCS_EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "dagster-postgres.yaml"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def postgres_url():
    if not URL:
        pytest.skip("MESAE_TEST_POSTGRES_URL is not set: no PostgreSQL server to test the team instance against "
                    "(.ci/run starts one; see the README)")
    import psycopg2
    from psycopg2 import errors, sql

    name = f"mesae_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except (errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction):
        admin.close()
        yield URL
        return
    try:
        yield with_database(URL, name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def sqlalchemy_url(url: str) -> str:
    """The URL with the psycopg2 driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg
    (version 3), which the `postgres` extra does not install (it installs psycopg2-binary)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg2")) if parts.scheme in ("postgres", "postgresql") \
        else url


def write_instance(home: Path, url: str) -> None:
    url = sqlalchemy_url(url)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url:\n      env: MESAE_TEST_DAGSTER_PG_URL\n"
        "telemetry:\n  enabled: false\n", encoding="utf-8")
    os.environ["MESAE_TEST_DAGSTER_PG_URL"] = url


@pytest.fixture(scope="module")
def team_run(postgres_url, tmp_path_factory):
    """A small generated trial run by `mesae run` into a PostgreSQL-backed instance."""
    from pipeline.synthetic_trial import generate_trial

    root = tmp_path_factory.mktemp("pg")
    generate_trial(root / "exports", subjects=5)
    home = root / "home"
    write_instance(home, postgres_url)
    code = run_cli("run", "--exports", str(root / "exports"), "--output", str(root / "output"), home=home)
    assert code == 0, "mesae run failed against the PostgreSQL instance"
    run_id = json.loads((root / "output" / "run.json").read_text(encoding="utf-8"))["run_id"]
    return root, home, run_id


def test_run_is_recorded_in_postgres(team_run, postgres_url):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    root, home, run_id = team_run
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        record = instance.get_run_record_by_id(run_id)
        assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert record.dagster_run.job_name == "mesae_nightly"
        for key in (["raw", "dm"], ["sdtm", "dm"]):
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert event is not None and event.run_id == run_id, key
            assert event.asset_materialization.metadata["dagster/row_count"].value > 0
        checks = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        conformance = [e.dagster_event.event_specific_data for e in checks
                       if e.dagster_event.event_specific_data.check_name == "sdtm_conformance"]
        assert conformance and all(c.passed for c in conformance)
    # Nothing went to SQLite files beside dagster.yaml.
    assert not list(home.rglob("*.db")), sorted(map(str, home.rglob("*.db")))


def test_run_rows_are_in_the_database_itself(team_run, postgres_url):
    """Read independently of Dagster: the run and its materializations are rows in PostgreSQL."""
    import psycopg2

    _, _, run_id = team_run
    with psycopg2.connect(postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cursor.fetchall() == [("SUCCESS",)]
        cursor.execute("SELECT DISTINCT asset_key FROM event_logs WHERE run_id = %s "
                       "AND dagster_event_type = 'ASSET_MATERIALIZATION'", (run_id,))
        keys = {"/".join(json.loads(k)) for (k,) in cursor.fetchall()}  # asset_key is a JSON list
    assert {"raw/dm", "sdtm/dm", "sdtm/lb", "reports/publication"} <= keys


def test_documented_example_loads(monkeypatch, tmp_path):
    """docs/dagster-postgres.yaml is a valid instance config (checked without a server)."""
    import yaml
    from dagster._core.instance.config import dagster_instance_config

    config = yaml.safe_load(DOCS_EXAMPLE.read_text(encoding="utf-8"))
    assert "postgres" in config["storage"]
    for name in ("MESAE_PG_USER", "MESAE_PG_PASSWORD", "MESAE_PG_HOST", "MESAE_PG_DB"):
        monkeypatch.setenv(name, "x")
    (tmp_path / "dagster.yaml").write_text(DOCS_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    loaded, _ = dagster_instance_config(str(tmp_path))
    assert loaded["storage"]["postgres"]["postgres_db"]["db_name"] == {"env": "MESAE_PG_DB"}
    assert loaded["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"


def test_shared_database_refuses_the_other_zone(team_run, postgres_url, tmp_path, capsys):
    """The blinded run's history is in this database; an unblinded instance on the same database
    must be refused (exit 2) before it writes unblinded logs next to it."""
    root, _, _ = team_run
    other_home = tmp_path / "unblinded-home"
    write_instance(other_home, postgres_url)
    capsys.readouterr()
    code = run_cli("run", "--exports", str(root / "exports"), "--output", str(tmp_path / "unblinded-output"),
                   "--unblinded", home=other_home)
    assert code == 2
    assert "serves the blinded zone" in capsys.readouterr().err
    assert not (tmp_path / "unblinded-output" / "run.json").exists()
