"""The tests part of `run.py`: the GPU test suite (`pytest -m gpu tests/gpu`) on the run's device, its counts read
from pytest's JUnit XML (or, failing that, its summary line)."""

import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


DEVICE_VARIABLE = "TRL_OFFLINE_TEST_DEVICE"  # the tests' `device` fixture reads it


def pytest_command(tests_path: str, junit_xml: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-m", "gpu", tests_path, f"--junitxml={junit_xml}"]


def counts(junit_xml: Path, output: str) -> dict:
    """`{passed, failed, errors, skipped, total}` from the JUnit XML, else from pytest's last summary line."""
    if junit_xml.exists():
        root = ElementTree.parse(junit_xml).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        total = sum(int(s.get("tests", 0)) for s in suites)
        failed = sum(int(s.get("failures", 0)) for s in suites)
        errors = sum(int(s.get("errors", 0)) for s in suites)
        skipped = sum(int(s.get("skipped", 0)) for s in suites)
        source = "junit"
    else:
        found = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", output)}
        failed, skipped = found.get("failed", 0), found.get("skipped", 0)
        errors = found.get("error", 0) + found.get("errors", 0)
        total = found.get("passed", 0) + failed + errors + skipped
        source = "summary line"
    return {
        "passed": total - failed - errors - skipped,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
        "total": total,
        "source": source,
    }


def status(returncode: int | None, found: dict) -> str:
    """ok only when pytest exited cleanly and some test passed: a run that skipped everything proved nothing."""
    if returncode is None:
        return "timeout"
    return "ok" if returncode == 0 and found["passed"] > 0 and found["failed"] + found["errors"] == 0 else "failed"
