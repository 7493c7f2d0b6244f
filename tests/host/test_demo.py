"""launch/local/demo.sh end to end, at a small size: the suite, the shipped warm start, CROPI 10%
and random 10% GRPO arms on the CPU stack, the comparison report with plots. The full-size run
is the README's main command; its numbers are in benchmarks/README.md."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.host, pytest.mark.e2e]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_demo_small(cpu_env, tmp_path):
    env = {
        **os.environ,
        "VIRTUAL_ENV": sys.prefix,  # the environment is there: demo.sh skips its setup step
        "DEMO_CACHE": str(tmp_path / "cache"), "DEMO_TARGETS": "mul compare",
        "DEMO_PHASES": "2", "DEMO_STEPS_PER_PHASE": "2", "DEMO_EVAL_STEPS": "4",
    }  # fmt: skip
    run = subprocess.run(
        ["bash", str(ROOT / "launch/local/demo.sh"), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    out = tmp_path / "run"
    from openrlhf_cropi.demo.report import load_run

    phases = {}
    for arm in ("influence", "random"):
        assert (out / arm / "DONE").exists()
        # Two phases of 64 prompts (alpha 0.1 of the 640-prompt pool); the job evaluated the
        # initial policy (step 0) and then every 4 steps, per family.
        phases[arm] = [json.loads((out / arm / f"ckpt/cropi/phases/phase-{p:03d}.json").read_text()) for p in (0, 1)]
        assert [len(p["selected"]) for p in phases[arm]] == [64, 64]
        assert sorted(load_run(out / arm).accuracy(("mul", "compare"))) == [0, 4]
    # The same behavior rollouts (made once, by the first arm), different subsets.
    store = "ckpt/cropi/rollouts/pool"
    first, second = (sorted((out / arm / store).rglob("*")) for arm in ("influence", "random"))
    assert [p.relative_to(out / "influence") for p in first] == [p.relative_to(out / "random") for p in second]
    # (.lock names whichever job last wrote the store: not part of the rollouts)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second) if a.is_file() and a.name != ".lock")
    assert phases["influence"][0]["selected"] != phases["random"][0]["selected"]
    # The validation sets were the targets' (DEMO_TARGETS).
    assert len(list((out / "influence/ckpt/cropi/rollouts").glob("val*"))) == 2

    report = (out / "report.md").read_text()
    assert "Validation sets: mul, compare; targeted families: mul, compare" in report and "| CROPI 10% |" in report and "| random 10% |" in report
    for png in ("accuracy.png", "subsets.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resumable: a rerun keeps both arms and only rewrites the report.
    again = subprocess.run(["bash", str(ROOT / "launch/local/demo.sh"), str(out)], env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and "== arm" not in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
