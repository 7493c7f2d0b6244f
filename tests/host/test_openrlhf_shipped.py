"""OpenRLHF 0.11.2's own unit tests (the `tests` package its wheel installs) against the
patched install. They run in a child pytest so their `tests` package never meets ours."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.host


def test_openrlhf_shipped_unit_tests_pass_on_patched_install():
    shipped = pathlib.Path(importlib.util.find_spec("openrlhf").origin).parents[1] / "tests"
    assert (shipped / "test_ppo_trainer.py").is_file(), f"no shipped tests at {shipped}"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(shipped), str(shipped)],
        capture_output=True, text=True, cwd=shipped.parent, timeout=900,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    print(f"OpenRLHF shipped tests: {summary}")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 200 and "failed" not in summary, summary
