"""CROPI 10% against the cheap selectors, full data and an oracle: same budget, same seeds.

    python benchmarks/curriculum.py [--design habits] [--targets add linear] [--seeds 0 1 2 3 4]
                                    [--out runs/curriculum-habits-add-linear] [--arms full random ... influence]

Every run is one arm of launch/local/demo.sh (the identical pipeline; the arms differ only in
--cropi.selector / --cropi.alpha, and the oracle in its pool) with the same warm start, targets,
number of global steps and seeds. The behavior rollouts of the initial policy are generated once
per seed and copied into the other arms' stores (each run would otherwise regenerate the same
thing; the oracle makes its own, of its own pool). Resumable: a finished arm is kept, a seed
whose arms are all done is not started again. Prints and writes OUT/report.md,
OUT/accuracy.png and OUT/results.json (per arm and seed: test accuracy per family and step,
each phase's subset by family and its seconds: every number of the report, recomputable):
  - per-step targeted / untargeted / all-family test accuracy, mean over seeds with Student-t 95% intervals;
  - steps-to-target: target = full-data GRPO's best targeted accuracy (seed mean; random 10%'s
    when --arms leaves full data out, else the first arm's); an arm's steps = its first evaluated step whose seed mean
    reaches it; acceleration = the reference's steps / the arm's steps;
  - accuracy at equal steps (the last evaluated step), the subsets' share of each family, and
    seconds per phase for behavior rollouts (once), selection and training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.report import Run, comparison, graded_answers, load_run, plot_accuracy  # noqa: E402
from openrlhf_cropi.demo.tasks import DESIGNS, parse_targets, read_jsonl  # noqa: E402
from openrlhf_cropi.demo.warm_start import suite  # noqa: E402

# name -> demo.sh arm (a selector at alpha 0.1; "full" = random at alpha 1; "oracle" = variance
# on the targeted skills' pool prompts only)
METHODS = {"full data": "full", "random 10%": "random", "variance 10%": "variance", "bm25 10%": "bm25",
           "embedding 10%": "embedding", "oracle": "oracle", "CROPI 10%": "influence",
           "learnability 10%": "learnability", "CROPI 10%, sketch": "influence-sketch"}  # fmt: skip
DEFAULT_ARMS = ["full", "random", "variance", "bm25", "embedding", "oracle", "influence"]


def run_seed(out: Path, cache: Path, design: str, seed: int, targets: tuple[str, ...], arms: list[str]) -> None:
    """The arms of one seed: one demo.sh call (it shares the behavior rollouts and keeps finished arms)."""
    if all((out / arm / "DONE").exists() for arm in arms):
        return
    env = {
        **os.environ, "DEMO_CACHE": str(cache), "DEMO_ARMS": " ".join(arms), "DEMO_SEED": str(seed),
        "DEMO_TARGETS": " ".join(targets), "DEMO_EVAL_STEPS": "4", "DEMO_DESIGN": design,
    }  # fmt: skip
    with open(out.parent / f"{out.name}.log", "a") as log:
        print(f"running seed {seed} in {out} (log {log.name})", flush=True)
        subprocess.run(["bash", str(ROOT / "launch/local/demo.sh"), str(out)], env=env, stdout=log, stderr=log, check=True)


def raw_results(run: Run) -> dict:
    """What the report uses of one run: accuracy per test family and step, each phase's subset and seconds."""
    accuracy = {tag[len("eval/eval_"):-len("_pass1")]: values for tag, values in run.scalars.items()
                if tag.startswith("eval/eval_") and tag.endswith("_pass1")}  # fmt: skip
    phases = [{**times, "families": dict(sorted(Counter(record["families"]).items()))}
              for times, record in zip(run.phase_times(), run.phases)]  # fmt: skip
    return {"accuracy": accuracy, "phases": phases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", choices=list(DESIGNS), default="habits", help="the suite design")
    parser.add_argument("--targets", nargs="+", metavar="FAMILY", help="validation families (default: the design's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, help="default: runs/curriculum-<targets>")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache", help="the demo's suite (built if absent)")
    parser.add_argument("--arms", nargs="+", choices=list(METHODS.values()), default=DEFAULT_ARMS,
                        help=f"demo.sh arms to run (default: {' '.join(DEFAULT_ARMS)}); the steps-to-target reference "
                             "is full, else random, else the first")  # fmt: skip
    args = parser.parse_args(argv)
    design = DESIGNS[args.design]
    try:
        targets = parse_targets(args.targets or design.default_targets, design=args.design)
    except ValueError as e:
        parser.error(str(e))
    methods = {name: arm for name, arm in METHODS.items() if arm in args.arms}
    # The steps-to-target reference: full data, else random 10%, else the first arm run.
    reference = next((n for n in ("full data", "random 10%") if n in methods), next(iter(methods)))
    out = args.out or ROOT / f"runs/curriculum-{args.design}-{'-'.join(targets)}"
    out.mkdir(parents=True, exist_ok=True)
    results = {name: [] for name in methods}
    for seed in args.seeds:
        run_seed(out / f"seed{seed}", args.cache, args.design, seed, targets, list(methods.values()))
        for name, arm in methods.items():
            results[name].append(load_run(out / f"seed{seed}" / arm))
    raw = {name: {str(seed): raw_results(run) for seed, run in zip(args.seeds, runs)} for name, runs in results.items()}
    (out / "results.json").write_text(json.dumps({"design": args.design, "targets": targets, "arms": raw}, indent=1))
    data = suite(args.cache, args.design)
    lines, curves = comparison(results, read_jsonl(data / "pool.jsonl"), design, targets, reference,
                               graded_answers(data, targets, 8))  # fmt: skip
    plot_accuracy(curves, design, targets, out / "accuracy.png")
    command = (f"python benchmarks/curriculum.py --design {args.design} --targets {' '.join(targets)} "
               f"--seeds {' '.join(map(str, args.seeds))}")  # fmt: skip
    command += "" if list(methods.values()) == DEFAULT_ARMS else f" --arms {' '.join(methods.values())}"
    command += f" --out {args.out}" if args.out else ""
    report = [f"# Curriculum benchmark, {args.design} design, validation sets {', '.join(targets)}", "",
              f"Command: `{command}`", "", *lines,
              "", "![targeted and untargeted accuracy, seed mean and 95% interval](accuracy.png)", ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(report))
    print("\n".join(lines))
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
