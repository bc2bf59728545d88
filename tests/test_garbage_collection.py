"""The collector policy of pipeline processes (pipeline/garbage_collection.py), observed in fresh
interpreters: the policy is process-wide, so this test process is no place to look at it."""

from __future__ import annotations

import subprocess
import sys

from pipeline.garbage_collection import YOUNG_GENERATION_THRESHOLD

PROBE = """import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))  # runs last
{body}
print("threshold:", gc.get_threshold()[0], flush=True)
"""


def probe(body: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True,
                          check=True, timeout=120)
    return dict(line.split(": ", 1) for line in done.stdout.splitlines()
                if line.startswith(("threshold: ", "frozen at exit: ")))


def test_a_plain_interpreter_keeps_python_defaults():
    seen = probe("pass")
    assert seen["threshold"] == "700" and seen["frozen at exit"] == "False"


def test_the_mesae_command_tunes_its_own_process():
    seen = probe("import pipeline.cli, sys; sys.argv = ['mesae', '--help']\n"
                 "try:\n    pipeline.cli.console()\nexcept SystemExit:\n    pass")
    assert seen["threshold"] == str(YOUNG_GENERATION_THRESHOLD) and seen["frozen at exit"] == "True"


def test_loading_the_code_location_tunes_its_process():
    """Run workers launched by the schedule, the sensor or the UI load the definitions, not the CLI."""
    seen = probe("import warnings; warnings.filterwarnings('ignore'); import pipeline.definitions")
    assert seen["threshold"] == str(YOUNG_GENERATION_THRESHOLD) and seen["frozen at exit"] == "True"
