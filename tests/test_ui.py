"""The Dagster UI over the demo run: what a data manager or an auditor opens.

Starts `dagster-webserver -w workspace.yaml` from the repository root (as the README says, with
DAGSTER_HOME and MESAE_EXPORTS / MESAE_OUTPUT of the session's demo run), asks its GraphQL API
for the asset graph and the latest materializations, then loads the lineage page and the
sdtm/lb asset page in headless Chromium and keeps screenshots in test-artifacts/.

Why: the definitions loading in Python does not prove the UI can load them through the
workspace file from the repository root, nor that the run recorded by `mesae run` is the one
the UI shows. The webserver is always stopped by its PID (see notes/toolchain.md: started from a
non-interactive shell it ignores SIGINT unless SIGINT is restored, hence the preexec_fn).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_asset_graph import graph_snapshot

pytestmark = pytest.mark.ui

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
START_TIMEOUT = 60
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SDTM = ["dm", "ex", "ae", "lb", "qs", "suppae", "suppdm"]
RAW = ["dm", "enrol", "ex", "ae", "lb", "mrs"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Webserver:
    def __init__(self, base: str, process: subprocess.Popen, log: Path):
        self.base, self.process, self.log = base, process, log

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(self.base + "/graphql", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"query": query, "variables": variables or {}}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert "errors" not in answer, answer["errors"]
        return answer["data"]

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]

    def wait_until_loaded(self) -> None:
        """/server_info answers before the code location is loaded: wait for both."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"dagster-webserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                entries = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                                       "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
                locations = entries["workspaceOrError"]["locationEntries"]
                if locations and all(e["loadStatus"] == "LOADED" for e in locations):
                    errors = [e for e in locations if e["locationOrLoadError"]["__typename"] == "PythonError"]
                    assert not errors, f"the code location failed to load: {errors}"
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        pytest.fail(f"dagster-webserver did not load the workspace within {START_TIMEOUT} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def webserver(demo_run):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium chromium-driver)")
    assert demo_run.exit_code == 0
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "dagster-webserver.log"
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(demo_run.home), "MESAE_EXPORTS": str(demo_run.exports),
           "MESAE_OUTPUT": str(demo_run.output)}
    env.pop("MESAE_UNBLINDED", None)
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env,
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        server = Webserver(f"http://127.0.0.1:{port}", process, log)
        server.wait_until_loaded()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        try:  # the code server it started, if it outlived the webserver (same new session)
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def key(path: list[str]) -> str:
    return "/".join(path)


def test_graphql_asset_graph_is_the_definitions_graph(webserver, tmp_path):
    """The UI shows the contract's keys and the same lineage as the Python definitions."""
    from pipeline.definitions import build_definitions

    nodes = webserver.graphql("{ assetNodes { assetKey { path } dependencyKeys { path } } }")["assetNodes"]
    shown = {key(n["assetKey"]["path"]): sorted(key(d["path"]) for d in n["dependencyKeys"]) for n in nodes}
    assert {f"raw/{f}" for f in RAW} <= set(shown)
    assert {f"sdtm/{d}" for d in SDTM} <= set(shown)
    assert "reports/publication" in shown
    assert "validated/lb" in shown["sdtm/lb"] and "sdtm/dm" in shown["sdtm/lb"]
    assert {f"sdtm/{d}" for d in SDTM} <= set(shown["reports/publication"])
    assert not [k for k in shown if "randomization" in k], "the blinded UI shows an unblinded asset"
    assert shown == graph_snapshot(build_definitions(tmp_path / "e", tmp_path / "o", "blinded"))["assets"]


def test_graphql_latest_materializations_are_the_demo_run(webserver, demo_run):
    """Each SDTM asset's latest materialization is from the run that published the outputs, with
    the published file's row count."""
    run_id = json.loads((demo_run.output / "run.json").read_text(encoding="utf-8"))["run_id"]
    query = """query ($keys: [AssetKeyInput!]) { assetNodes(assetKeys: $keys) { assetKey { path }
        assetMaterializations(limit: 1) { runId metadataEntries { label ... on IntMetadataEntry { intValue } } } } }"""
    nodes = webserver.graphql(query, {"keys": [{"path": ["sdtm", d]} for d in SDTM]})["assetNodes"]
    assert sorted(key(n["assetKey"]["path"]) for n in nodes) == sorted(f"sdtm/{d}" for d in SDTM)
    for node in nodes:
        dataset = node["assetKey"]["path"][1]
        assert node["assetMaterializations"], f"sdtm/{dataset} has no materialization in the UI"
        latest = node["assetMaterializations"][0]
        assert latest["runId"] == run_id
        counts = {e["label"]: e.get("intValue") for e in latest["metadataEntries"]}
        assert counts.get("dagster/row_count") == pq.ParquetFile(demo_run.output / "sdtm" / f"{dataset}.parquet") \
            .metadata.num_rows


def test_nothing_is_shown_stale_right_after_the_run(webserver):
    """Right after `mesae run` no asset may show "Unsynced": code versions and data versions the
    run recorded are the ones the UI computes (otherwise auditors see false warnings)."""
    nodes = webserver.graphql("{ assetNodes { assetKey { path } staleStatus staleCauses { reason } } }")["assetNodes"]
    stale = {key(n["assetKey"]["path"]): [c["reason"] for c in n["staleCauses"]] for n in nodes
             if n["staleStatus"] != "FRESH"}
    assert stale == {}


@pytest.fixture(scope="module")
def browser(webserver):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    # The UI shows a "Join the Dagster community" dialog once per instance on localhost.
    context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"');")
    page = context.new_page()
    page.goto(url, wait_until="networkidle", timeout=60_000)
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.first.click()
    return page


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000, f"{path} is {path.stat().st_size} bytes: an empty page?"


def test_asset_graph_page_renders(webserver, browser):
    from playwright.sync_api import expect

    page = open_page(browser, webserver.base + "/asset-groups")
    try:
        page.get_by_text("Global asset lineage").first.wait_for(timeout=30_000)
        for group in ("raw", "validated", "sdtm", "reports"):
            page.get_by_text(group, exact=True).first.wait_for(timeout=30_000)
        # Wait for the groups' asset statuses, not the "fetching statuses" placeholder.
        expect(page.get_by_text("fetching statuses")).to_have_count(0, timeout=30_000)
        assert "Materialize all" in page.inner_text("body")
        path = ARTIFACTS / "dagster-asset-graph.png"
        page.screenshot(path=str(path))
        assert_png(path)

        # The sdtm group as a list: every dataset with its materialization status.
        page.goto(webserver.base + "/locations/mesae/asset-groups/sdtm/list", wait_until="networkidle",
                  timeout=60_000)
        for dataset in SDTM:
            page.get_by_text(f"sdtm / {dataset}", exact=True).first.wait_for(timeout=30_000)
        expect(page.get_by_text("Loading...")).to_have_count(0, timeout=30_000)
        expect(page.get_by_text("Materialized", exact=True)).to_have_count(len(SDTM), timeout=30_000)
        path = ARTIFACTS / "dagster-sdtm-group.png"
        page.screenshot(path=str(path))
        assert_png(path)
    finally:
        page.context.close()


def test_sdtm_lb_asset_page_shows_the_materialization(webserver, browser, demo_run):
    rows = pq.ParquetFile(demo_run.output / "sdtm" / "lb.parquet").metadata.num_rows
    page = open_page(browser, webserver.base + "/assets/sdtm/lb")
    try:
        page.get_by_text("Latest materialization").first.wait_for(timeout=30_000)
        page.get_by_text(f"{rows:,}", exact=True).first.wait_for(timeout=30_000)  # the row count, as the UI formats it
        page.get_by_text("Lab Test or Examination Short Name").first.wait_for(timeout=30_000)  # column labels
        text = page.inner_text("body")
        assert "lb" in text and "mappings/lb.yaml" in text
        path = ARTIFACTS / "dagster-sdtm-lb.png"
        page.screenshot(path=str(path))
        assert_png(path)
    finally:
        page.context.close()
