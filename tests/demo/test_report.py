"""The demo report and the curriculum benchmark's arithmetic, on TensorBoard files written as OpenRLHF writes them."""

import importlib.util
import json
from pathlib import Path

import pytest

from openrlhf_cropi.demo.report import load_run, phase_table, write_report
from openrlhf_cropi.demo.tasks import FAMILIES, TARGETED, UNTARGETED

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[2]


def _fake_run(run_dir: Path, suite: Path, gain: float) -> None:
    """Two phases of 2 steps; eval at steps 0, 2, 4; targeted accuracy rises by `gain` per eval."""
    from torch.utils.tensorboard import SummaryWriter

    pool = [{"prompt": f"p{i}", "label": "1", "family": FAMILIES[i % len(FAMILIES)], "difficulty": 1} for i in range(14)]
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    writer = SummaryWriter(str(run_dir / "tensorboard" / "ppo_x"))  # OpenRLHF's layout: tensorboard/<run name>/
    for step, phase in [(1, 0), (2, 0), (3, 1), (4, 1)]:
        writer.add_scalar("train/cropi/phase", phase, step)
        writer.add_scalar("train/timing/step_total", 10.0, step)
    writer.add_scalar("train/cropi/time_rollouts", 60.0, 1)  # the trainer logs it with the first step
    for k, step in enumerate((0, 2, 4)):
        for f in TARGETED:
            writer.add_scalar(f"eval/eval_targeted_{f}_pass1", 0.2 + gain * k, step)
        for f in UNTARGETED:
            writer.add_scalar(f"eval/eval_untargeted_{f}_pass1", 0.5, step)
    writer.close()
    phases = run_dir / "ckpt/cropi/phases"
    phases.mkdir(parents=True)
    for phase, selected in [(0, [0, 1]), (1, [0, 7])]:  # pool rows 0 and 7 are both FAMILIES[0]
        status = {"cropi/time_gradients": 3.0, "cropi/time_scoring": 0.5}
        record = {"phase": phase, "selector": "influence", "selected": selected, "status": status}
        (phases / f"phase-{phase:03d}.json").write_text(json.dumps(record))


def test_report_table_and_plots(tmp_path):
    _fake_run(tmp_path / "run", tmp_path / "suite", gain=0.1)
    run = load_run(tmp_path / "run")
    assert run.accuracy("targeted") == pytest.approx({0: 0.2, 2: 0.3, 4: 0.4})
    assert run.phase_steps() == {0: [1, 2], 1: [3, 4]}
    assert run.phase_times() == [
        {"phase": 0, "rollouts": 60.0, "selection": 3.5, "training": 20.0},
        {"phase": 1, "rollouts": 0.0, "selection": 3.5, "training": 20.0},
    ]
    table = phase_table(run, [json.loads(x) for x in (tmp_path / "suite/pool.jsonl").read_text().splitlines()])
    assert table[2] == f"| 0 | 1-2 | {FAMILIES[0]} 1, {FAMILIES[1]} 1 | 60 | 3.5 | 20.0 | 0.300 | 0.500 |"
    assert table[3] == f"| 1 | 3-4 | {FAMILIES[0]} 2 | 0 | 3.5 | 20.0 | 0.400 | 0.500 |"
    report = write_report(tmp_path / "run", tmp_path / "suite", tmp_path / "out")
    assert "0.200 -> 0.400" in report.read_text()
    for png in ("accuracy.png", "subsets.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_events_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard events"):
        load_run(tmp_path)


def test_curriculum_steps_to_target_and_acceleration(tmp_path):
    spec = importlib.util.spec_from_file_location("curriculum", ROOT / "benchmarks/curriculum.py")
    curriculum = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curriculum)
    runs = {}
    for name, gain in [("full data", 0.05), ("random 10%", 0.02), ("learnability 10%", 0.05), ("CROPI 10%", 0.1)]:
        runs[name] = []
        for seed in (0, 1):
            _fake_run(tmp_path / f"{name}-{seed}", tmp_path / "suite", gain)
            runs[name].append(load_run(tmp_path / f"{name}-{seed}"))
    # Full data peaks at 0.3 at step 4; CROPI passes 0.3 at step 2: 2x. Random never reaches it.
    assert curriculum.steps_to(curriculum.mean_curve(runs["CROPI 10%"], "targeted"), 0.3) == 2
    pool = [json.loads(x) for x in (tmp_path / "suite/pool.jsonl").read_text().splitlines()]
    lines = curriculum.summarise(runs, pool)
    row = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines if line.startswith("| ") and "method" not in line}
    assert row["CROPI 10%"][1:3] == ["2", "2.00x"]
    assert row["full data"][1:3] == ["4", "1.00x"]
    assert row["random 10%"][1] == "-"
    # Subsets of the fake runs: rows 0, 1, 0, 7 -> families 0, 1, 0, 0; TARGETED holds family 0 ("add").
    assert FAMILIES[0] in TARGETED and FAMILIES[1] in TARGETED and row["CROPI 10%"][6] == "100%"


def test_curriculum_when_full_data_never_improves(tmp_path):
    spec = importlib.util.spec_from_file_location("curriculum", ROOT / "benchmarks/curriculum.py")
    curriculum = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curriculum)
    runs = {}
    for name, gain in [("full data", -0.05), ("random 10%", 0.0), ("learnability 10%", 0.0), ("CROPI 10%", 0.1)]:
        _fake_run(tmp_path / name, tmp_path / "suite", gain)
        runs[name] = [load_run(tmp_path / name)]
    pool = [json.loads(x) for x in (tmp_path / "suite/pool.jsonl").read_text().splitlines()]
    lines = curriculum.summarise(runs, pool)
    assert "reached at step 0" in lines[0]
    assert all("n/a: full data never beat step 0" in line for line in lines[4:]), lines
