"""Test setup: the helpers in this folder import as modules; a run with no passing test, or (in
CI) with a skipped Chromium/PostgreSQL test, does not exit 0."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

REQUIRED_IN_CI = ("ui", "postgres")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if exitstatus == 0 and not reporter.stats.get("passed"):
        reporter.write_line("no test passed: failing the run (exit 5)", red=True)
        session.exitstatus = 5
    skipped = [r for r in reporter.stats.get("skipped", []) if any(m in r.keywords for m in REQUIRED_IN_CI)]
    if os.environ.get("CI", "").lower() == "true" and skipped and session.exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) needing Chromium or PostgreSQL were skipped in CI: failing",
                            red=True)
        session.exitstatus = 1
