"""launch/local/demo.sh end to end, at a small size: suite, SFT warm start with OpenRLHF's SFT
trainer, CROPI GRPO on the CPU stack, report with plots. The full-size run is the README's
main command; its numbers are in benchmarks/README.md."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from openrlhf_cropi.demo.tasks import FAMILIES

pytestmark = [pytest.mark.host, pytest.mark.e2e]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_demo_small(cpu_env, tmp_path):
    env = {
        **os.environ,
        "VIRTUAL_ENV": sys.prefix,  # the environment is there: demo.sh skips its setup step
        "DEMO_CACHE": str(tmp_path / "cache"),
        "DEMO_SFT_EXAMPLES": "3000", "DEMO_SFT_EPOCHS": "1",
        "DEMO_PHASES": "2", "DEMO_STEPS_PER_PHASE": "2",
    }  # fmt: skip
    run = subprocess.run(
        ["bash", str(ROOT / "launch/local/demo.sh"), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    cache, out = tmp_path / "cache", tmp_path / "run"
    for part in ("suite", "base", "warm_start"):
        assert (cache / part / "DONE").exists()
    # The warm start was checked: spread pass rates on the pool.
    rates = json.loads((cache / "warm_start/pool_pass_rates.json").read_text())
    assert 0 < rates["all"] < 1

    # Two phases of 64 prompts (alpha 0.1 of the 640-prompt pool), all with reward variance.
    phases = [json.loads((out / f"ckpt/cropi/phases/phase-{p:03d}.json").read_text()) for p in (0, 1)]
    assert [len(p["selected"]) for p in phases] == [64, 64]
    # The printed table: one row per phase, test accuracy at each phase's last step.
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and all(any(f in row for f in FAMILIES) for row in rows), run.stdout[-2000:]
    assert rows[0].split(" | ")[1] == "1-2" and rows[1].split(" | ")[1] == "3-4"
    assert "-" not in (rows[0].split(" | ")[-2], rows[1].split(" | ")[-2]), rows
    # The job evaluated the initial policy (step 0) and then every 2 steps.
    from openrlhf_cropi.demo.report import load_run

    assert sorted(load_run(out).accuracy("targeted")) == [0, 2, 4]
    report = (out / "report.md").read_text()
    assert "Test accuracy (pass@1): targeted" in report
    for png in ("accuracy.png", "subsets.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
