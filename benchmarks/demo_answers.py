"""What the demo's GRPO changed: each model's test answers sorted into right, right number in the
family's habit (a format the verifier rejects, see openrlhf_cropi/demo/tasks.py), and wrong.

    python benchmarks/demo_answers.py [--runs runs/demo] [--cache runs/demo-cache] [--targets add linear]

Samples 8 answers per test prompt (temperature 1, 8 tokens, as the demo evaluates) from the warm
start and from each arm's final model (OUT/<arm>/final), with transformers, and prints the three
shares for the targeted and the untargeted families. Separates the two things GRPO can teach
here: dropping a habit (the number was right) and getting the number right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.reward import is_correct, normalise  # noqa: E402
from openrlhf_cropi.demo.tasks import DEFAULT_TARGETS, HABITS, parse_targets, read_jsonl  # noqa: E402
from openrlhf_cropi.demo.warm_start import WARM_START, answers, load, suite  # noqa: E402


def kind(answer: str, row: dict) -> str:
    if is_correct(answer, row["label"]):
        return "right"
    return "habit" if normalise(answer) == HABITS[row["family"]].format(row["label"]) else "wrong"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs/demo")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache")
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    args = parser.parse_args(argv)
    targets = parse_targets(args.targets)
    torch.set_num_threads(2)
    test = read_jsonl(suite(args.cache) / "test.jsonl")
    models = {"warm start": WARM_START, **{d.name: d / "final" for d in sorted(args.runs.iterdir()) if (d / "final").is_dir()}}
    print("| model | targeted: right / habit / wrong | untargeted: right / habit / wrong |\n|---|---|---|")
    for name, path in models.items():
        counts = {g: {"right": 0, "habit": 0, "wrong": 0} for g in ("targeted", "untargeted")}
        torch.manual_seed(0)
        for j, answer in enumerate(answers(*load(path), test, samples=8, batch=48)):
            row = test[j // 8]
            counts["targeted" if row["family"] in targets else "untargeted"][kind(answer, row)] += 1
        cells = [" / ".join(f"{c[k] / sum(c.values()):.2f}" for k in ("right", "habit", "wrong")) for c in counts.values()]
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
