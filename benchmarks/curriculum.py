"""Full-data GRPO vs random-10% vs learnability-10% vs CROPI-10%, same budget, same seeds.

    python benchmarks/curriculum.py [--targets add linear] [--seeds 0 1 2 3 4] [--out runs/curriculum-add-linear]
                                    [--arms full random learnability influence]

Every run is one arm of launch/local/demo.sh (the identical pipeline; the arms differ only in
--cropi.selector / --cropi.alpha) with the same warm start, targets, number of global steps and
seeds. The behavior rollouts of the initial policy are generated once per seed and copied into
the other arms' stores (each run would otherwise regenerate the same thing). Resumable: a
finished arm is kept. Prints and writes OUT/report.md and OUT/accuracy.png:
  - per-step targeted / untargeted test accuracy, mean over seeds with Student-t 95% intervals;
  - steps-to-target: target = full-data GRPO's best targeted accuracy (seed mean; random 10%'s
    when --arms leaves full data out, else the first arm's); an arm's steps = its first evaluated step whose seed mean
    reaches it; acceleration = the reference's steps / the arm's steps;
  - accuracy at equal steps (the last evaluated step), the targeted share of the subsets, and
    seconds per phase for behavior rollouts (once), selection and training.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.report import comparison, graded_answers, load_run, plot_accuracy  # noqa: E402
from openrlhf_cropi.demo.tasks import DEFAULT_TARGETS, parse_targets, read_jsonl  # noqa: E402

# name -> demo.sh arm (selector; "full" = random at alpha 1)
METHODS = {"full data": "full", "random 10%": "random", "learnability 10%": "learnability", "CROPI 10%": "influence",
           "CROPI 10%, sketch": "influence-sketch"}


def run_seed(out: Path, cache: Path, seed: int, targets: tuple[str, ...], arms: list[str]) -> None:
    """The arms of one seed: one demo.sh call (it shares the behavior rollouts and keeps finished arms)."""
    env = {
        **os.environ, "DEMO_CACHE": str(cache), "DEMO_ARMS": " ".join(arms), "DEMO_SEED": str(seed),
        "DEMO_TARGETS": " ".join(targets), "DEMO_EVAL_STEPS": "4",
    }  # fmt: skip
    with open(out.parent / f"{out.name}.log", "a") as log:
        print(f"running seed {seed} in {out} (log {log.name})", flush=True)
        subprocess.run(["bash", str(ROOT / "launch/local/demo.sh"), str(out)], env=env, stdout=log, stderr=log, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="FAMILY")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, help="default: runs/curriculum-<targets>")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache", help="the demo's suite (built if absent)")
    parser.add_argument("--arms", nargs="+", choices=list(METHODS.values()), default=list(METHODS.values()),
                        help="demo.sh arms to run (default: all five); the steps-to-target reference is full, else random, "
                             "else the first")
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.targets)
    except ValueError as e:
        parser.error(str(e))
    methods = {name: arm for name, arm in METHODS.items() if arm in args.arms}
    # The steps-to-target reference: full data, else random 10%, else the first arm run.
    reference = next((n for n in ("full data", "random 10%") if n in methods), next(iter(methods)))
    out = args.out or ROOT / f"runs/curriculum-{'-'.join(targets)}"
    out.mkdir(parents=True, exist_ok=True)
    results = {name: [] for name in methods}
    for seed in args.seeds:
        run_seed(out / f"seed{seed}", args.cache, seed, targets, list(methods.values()))
        for name, arm in methods.items():
            results[name].append(load_run(out / f"seed{seed}" / arm))
    suite = args.cache / "suite"
    lines, curves = comparison(results, read_jsonl(suite / "pool.jsonl"), targets, reference, graded_answers(suite, targets, 8))
    plot_accuracy(curves, targets, out / "accuracy.png")
    command = f"python benchmarks/curriculum.py --targets {' '.join(targets)} --seeds {' '.join(map(str, args.seeds))}"
    command += "" if len(methods) == len(METHODS) else f" --arms {' '.join(methods.values())}"
    command += f" --out {args.out}" if args.out else ""
    report = [f"# Curriculum benchmark, targets {', '.join(targets)}", "", f"Command: `{command}`", "", *lines,
              "", "![targeted and untargeted accuracy, seed mean and 95% interval](accuracy.png)", ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(report))
    print("\n".join(lines))
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
