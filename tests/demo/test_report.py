"""The demo report and the curriculum benchmark's arithmetic, on TensorBoard files written as OpenRLHF writes them."""

import json
import math
from pathlib import Path

import pytest

from openrlhf_cropi.demo.report import (
    above_steps, comparison, groups, load_run, phase_table, seed_curve, steps_to, write_report,
)  # fmt: skip
from openrlhf_cropi.demo.tasks import DESIGNS, FAMILIES

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")
TARGETS = ("add", "linear")  # FAMILIES[0] and FAMILIES[1]
OTHERS = tuple(f for f in FAMILIES if f not in TARGETS)
HABITS = DESIGNS["habits"]
ANSWERS = {"targeted": 160, "untargeted": 400, "all": 560}


def _pool(suite: Path) -> list[dict]:
    pool = [{"prompt": f"p{i}", "label": "1", "family": FAMILIES[i % len(FAMILIES)], "difficulty": 1} for i in range(14)]
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    test = [{"prompt": f"t{f}{i}", "label": "1", "family": f, "datasource": f} for f in FAMILIES for i in range(10)]
    (suite / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return pool


def _fake_run(run_dir: Path, suite: Path, gain: float, offset: float = 0.0) -> None:
    """Two phases of 2 steps; eval at steps 0, 2, 4; targeted accuracy rises by `gain` per eval."""
    from torch.utils.tensorboard import SummaryWriter

    pool = _pool(suite)
    writer = SummaryWriter(str(run_dir / "tensorboard" / "ppo_x"))  # OpenRLHF's layout: tensorboard/<run name>/
    for step, phase in [(1, 0), (2, 0), (3, 1), (4, 1)]:
        writer.add_scalar("train/cropi/phase", phase, step)
        writer.add_scalar("train/timing/step_total", 10.0, step)
    writer.add_scalar("train/cropi/time_rollouts", 60.0, 1)  # the trainer logs it with the first step
    for k, step in enumerate((0, 2, 4)):
        for f in TARGETS:  # the test set's datasource is the family
            writer.add_scalar(f"eval/eval_{f}_pass1", 0.2 + offset + gain * k, step)
        for f in OTHERS:
            writer.add_scalar(f"eval/eval_{f}_pass1", 0.5, step)
    writer.close()
    phases = run_dir / "ckpt/cropi/phases"
    phases.mkdir(parents=True)
    for phase, selected in [(0, [0, 1]), (1, [0, 7])]:  # pool rows 0 and 7 are both FAMILIES[0]
        status = {"cropi/time_gradients": 3.0, "cropi/time_scoring": 0.5}
        record = {"phase": phase, "selector": "influence", "selected": selected, "status": status}
        (phases / f"phase-{phase:03d}.json").write_text(json.dumps(record))
        (phases / f"phase-{phase:03d}.jsonl").write_text("".join(json.dumps(pool[i]) + "\n" for i in sorted(selected)))


def _rows(lines: list[str], table: int = 0) -> dict[str, list[str]]:
    """The rows of the table-th markdown table in lines, by first cell."""
    tables, previous = [], False
    for line in lines:
        if line.startswith("|"):
            if not previous:
                tables.append([])
            tables[-1].append(line)
        previous = line.startswith("|")
    return {row.split(" | ")[0].strip("| "): row.split(" | ") for row in tables[table][2:]}  # after header and rule


def test_run_accuracy_phases_and_table(tmp_path):
    _fake_run(tmp_path / "run", tmp_path / "suite", gain=0.1)
    run = load_run(tmp_path / "run")
    assert run.accuracy(TARGETS) == pytest.approx({0: 0.2, 2: 0.3, 4: 0.4})
    assert run.accuracy(OTHERS) == pytest.approx({0: 0.5, 2: 0.5, 4: 0.5})
    assert run.accuracy(("add", "nonexistent")) == {}
    assert run.phase_steps() == {0: [1, 2], 1: [3, 4]}
    assert run.phase_times() == [
        {"phase": 0, "rollouts": 60.0, "selection": 3.5, "training": 20.0},
        {"phase": 1, "rollouts": 0.0, "selection": 3.5, "training": 20.0},
    ]
    table = phase_table(run, HABITS, TARGETS)
    assert table[2] == f"| 0 | 1-2 | {FAMILIES[0]} 1, {FAMILIES[1]} 1 | 60 | 3.5 | 20.0 | 0.300 | 0.500 |"
    assert table[3] == f"| 1 | 3-4 | {FAMILIES[0]} 2 | 0 | 3.5 | 20.0 | 0.400 | 0.500 |"


def test_intervals_against_hand_computed_values(tmp_path):
    for seed, offset in enumerate((0.0, 0.1)):
        _fake_run(tmp_path / f"r{seed}", tmp_path / "suite", gain=0.1, offset=offset)
    runs = [load_run(tmp_path / f"r{s}") for s in (0, 1)]
    # Two seeds, values 0.2 and 0.3 at step 0: sd = 0.0707, t(0.975, 1 df) = 12.706.
    mean, half = seed_curve(runs, TARGETS, answers=160)[0]
    assert mean == pytest.approx(0.25) and half == pytest.approx(12.706 * 0.05 * math.sqrt(2) / math.sqrt(2))
    # One run: binomial noise of 160 graded answers at p = 0.2.
    mean, half = seed_curve(runs[:1], TARGETS, answers=160)[0]
    assert half == pytest.approx(1.96 * math.sqrt(0.2 * 0.8 / 160))
    assert steps_to({0: (0.2, 0), 2: (0.35, 0), 4: (0.3, 0)}, 0.3) == 2
    assert steps_to({0: (0.2, 0)}, 0.3) is None


def test_demo_report_compares_the_arms(tmp_path):
    _fake_run(tmp_path / "out/influence", tmp_path / "suite", gain=0.1)
    _fake_run(tmp_path / "out/random", tmp_path / "suite", gain=0.05)
    report = write_report(tmp_path / "out", tmp_path / "suite", TARGETS).read_text()
    # Random peaks at 0.3 at step 4; CROPI reaches 0.3 at step 2: 2x.
    assert "random 10%'s best targeted test accuracy, 0.300, first reached at step 4" in report
    rows = _rows(report.splitlines())
    assert rows["CROPI 10%"][1:3] == ["2", "2.00x"] and rows["random 10%"][1:3] == ["4", "1.00x"]
    # At step 4: CROPI 0.4, with the binomial interval of 2 families x 10 test prompts x 8 samples.
    assert rows["CROPI 10%"][4] == f"0.400 ± {1.96 * math.sqrt(0.4 * 0.6 / 160):.3f}"
    assert "## CROPI 10%: per phase" in report and "## random 10%: per phase" in report
    for png in ("accuracy.png", "subsets.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_events_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard events"):
        load_run(tmp_path)


def test_curriculum_comparison(tmp_path):
    runs = {}
    for name, gain in [("full data", 0.05), ("random 10%", 0.02), ("learnability 10%", 0.05), ("CROPI 10%", 0.1)]:
        runs[name] = []
        for seed in (0, 1):
            _fake_run(tmp_path / f"{name}-{seed}", tmp_path / "suite", gain)
            runs[name].append(load_run(tmp_path / f"{name}-{seed}"))
    pool = _pool(tmp_path / "suite")
    lines, _ = comparison(runs, pool, HABITS, TARGETS, "full data", ANSWERS)
    rows = _rows(lines)
    # Full data peaks at 0.3 at step 4; CROPI passes 0.3 at step 2: 2x. Random never reaches it.
    assert rows["CROPI 10%"][1:3] == ["2", "2.00x"]
    assert rows["full data"][1:3] == ["4", "1.00x"]
    assert rows["random 10%"][1:3] == ["-", "not reached"]
    # Identical seeds: zero spread, so a zero-width t interval.
    assert rows["CROPI 10%"][4] == "0.400 ± 0.000"
    # All families at step 4: (2 x 0.4 + 5 x 0.5) / 7.
    assert rows["CROPI 10%"][6] == f"{(2 * 0.4 + 5 * 0.5) / 7:.3f} ± 0.000"
    # Subsets of the fake runs: rows 0, 1, 0, 7 -> families 0, 1, 0, 0: all targeted.
    assert rows["CROPI 10%"][7] == "100%"
    assert _rows(lines, table=4)["CROPI 10%"][1].strip(" |") == "0.200 -> 0.400"  # add, steps 0 -> 4
    mix = _rows(lines, table=5)["CROPI 10%"]
    assert [c.strip(" |") for c in mix[1:3]] == ["75%", "25%"] and all(c.strip(" |") == "0%" for c in mix[3:])
    by_step = _rows(lines, table=1)
    assert [c.strip(" |") for c in by_step["random 10%"][1:]] == ["0.200 ± 0.000", "0.220 ± 0.000", "0.240 ± 0.000"]
    assert [c.strip(" |") for c in _rows(lines, table=2)["random 10%"][1:]] == ["0.500 ± 0.000"] * 3  # untargeted
    # Zero-width intervals: apart wherever the means differ.
    assert "- CROPI 10% above random 10%, 95% intervals apart: at steps 2, 4 (of 0, 2, 4)." in lines
    assert "- CROPI 10% above full data, 95% intervals apart: at steps 2, 4 (of 0, 2, 4)." in lines


def test_curriculum_lists_each_seed_in_seed_order(tmp_path):
    runs = {}
    for name, gain, offsets in [("full data", 0.05, (0.0, 0.1)), ("CROPI 10%", 0.1, (0.02, 0.0))]:
        runs[name] = []
        for seed, offset in enumerate(offsets):
            _fake_run(tmp_path / f"{name}-{seed}", tmp_path / "suite", gain, offset)
            runs[name].append(load_run(tmp_path / f"{name}-{seed}"))
    lines, _ = comparison(runs, _pool(tmp_path / "suite"), HABITS, TARGETS, "full data", ANSWERS)
    # Step 4 is the third evaluation: 0.2 + offset + 2 * gain.
    assert "Targeted accuracy at step 4 per seed: full data 0.300, 0.400; CROPI 10% 0.420, 0.400." in lines


def test_above_steps_by_hand():
    cropi = {0: (0.20, 0.02), 4: (0.30, 0.02), 8: (0.35, 0.05)}
    other = {0: (0.20, 0.02), 4: (0.25, 0.02), 8: (0.28, 0.03), 12: (0.1, 0.0)}
    # step 4: 0.28 > 0.27 apart; step 8: 0.30 > 0.31 no; step 12 only in one curve.
    assert above_steps(cropi, other) == [4]
    assert above_steps(other, cropi) == []


def test_comparison_when_the_reference_never_improves(tmp_path):
    runs = {}
    for name, gain in [("full data", -0.05), ("CROPI 10%", 0.1)]:
        _fake_run(tmp_path / name, tmp_path / "suite", gain)
        runs[name] = [load_run(tmp_path / name)]
    lines, _ = comparison(runs, _pool(tmp_path / "suite"), HABITS, TARGETS, "full data", ANSWERS)
    assert "first reached at step 0" in lines[0]
    assert all(row[2] == "n/a: full data never beat step 0" for row in _rows(lines).values()), lines
    assert not any("per seed" in line for line in lines)  # one seed: nothing to list


def test_t_quantiles_match_scipy():
    from scipy.stats import t

    from openrlhf_cropi.demo.report import _T95

    assert all(abs(q - t.ppf(0.975, df)) < 1e-3 for df, q in _T95.items())


def test_the_surface_design_targets_a_skill_in_both_forms():
    surface = DESIGNS["surface"]
    by_group = groups(surface, ("add_word",))
    assert by_group["targeted"] == ("add_sym", "add_word")
    assert set(by_group["untargeted"]) == set(surface.families) - {"add_sym", "add_word"}
    assert groups(HABITS, TARGETS)["targeted"] == TARGETS
