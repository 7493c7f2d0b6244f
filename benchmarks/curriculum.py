"""Full-data GRPO vs random-10% vs learnability-10% vs CROPI-10%, same budget, same seeds.

    python benchmarks/curriculum.py [--full] [--seeds 0 1] [--out runs/curriculum]

Every run is launch/local/demo.sh (the identical pipeline; the methods differ only in
--cropi.selector / --cropi.alpha) with the same warm start, the same number of global steps and
the same seeds. The behavior rollouts of the initial policy are generated once per seed and
copied into the other methods' stores (each run would otherwise regenerate the same thing).
Prints and writes OUT/report.md and OUT/accuracy.png:
  - steps-to-target: target = full-data GRPO's best targeted test accuracy (mean over seeds);
    a method's steps = its first evaluated step whose seed-mean targeted accuracy reaches it;
    acceleration = full data's steps / the method's steps
  - final targeted / untargeted accuracy, mean and spread (min-max) over seeds
  - the share of targeted-family prompts in the phases' subsets (the pool's share for reference)
  - wall time per phase: behavior rollouts (once), selection, training
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.report import GROUPS, Run, load_run, plot_accuracy  # noqa: E402
from openrlhf_cropi.demo.tasks import TARGETED, read_jsonl  # noqa: E402

METHODS = {"full data": "full", "random 10%": "random", "learnability 10%": "learnability", "CROPI 10%": "influence"}
SIZES = {"default": {"phases": 4, "steps_per_phase": 4}, "full": {"phases": 8, "steps_per_phase": 4}}


def run_method(out: Path, cache: Path, selector: str, seed: int, size: dict, rollouts_from: Path | None) -> None:
    if (out / "report.md").exists():
        print(f"{out}: done, kept")
        return
    if rollouts_from is not None and not (out / "ckpt/cropi/rollouts").exists():
        shutil.copytree(rollouts_from, out / "ckpt/cropi/rollouts")
    env = {
        **os.environ, "DEMO_CACHE": str(cache), "DEMO_SELECTOR": selector, "DEMO_SEED": str(seed),
        "DEMO_PHASES": str(size["phases"]), "DEMO_STEPS_PER_PHASE": str(size["steps_per_phase"]),
    }  # fmt: skip
    with open(out.parent / f"{out.name}.log", "w") as log:
        print(f"running {out.name} (log {log.name})", flush=True)
        subprocess.run(["bash", str(ROOT / "launch/local/demo.sh"), str(out)], env=env, stdout=log, stderr=log, check=True)


def mean_curve(runs: list[Run], group: str) -> dict[int, float]:
    curves = [r.accuracy(group) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: statistics.mean(c[s] for c in curves) for s in steps}


def steps_to(curve: dict[int, float], target: float) -> int | None:
    return next((s for s, v in sorted(curve.items()) if v >= target - 1e-9), None)


def targeted_share(run: Run, pool_rows: list[dict]) -> float:
    """Share of targeted-family prompts over all of the run's phase subsets."""
    picked = [pool_rows[i]["family"] in TARGETED for phase in run.phases for i in phase["selected"]]
    return sum(picked) / len(picked)


def summarise(results: dict[str, list[Run]], pool_rows: list[dict]) -> list[str]:
    full = mean_curve(results["full data"], "targeted")
    target = max(full.values())
    full_steps = steps_to(full, target)
    pool_share = sum(r["family"] in TARGETED for r in pool_rows) / len(pool_rows)
    lines = [
        f"Target: full-data GRPO's best targeted accuracy (seed mean) = {target:.3f}, reached at step {full_steps}. "
        f"Targeted families make up {pool_share:.0%} of the pool.",
        "",
        "| method | steps to target | acceleration | final targeted | final untargeted | targeted at full's target step "
        "| targeted share of subsets | behavior rollouts s | selection s / phase | training s / phase |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        curve = mean_curve(runs, "targeted")
        steps = steps_to(curve, target)
        if not full_steps:
            accel = "n/a: full data never beat step 0"
        elif steps is None:
            accel = f"< {full_steps / max(curve):.2f}x (not reached)"
        else:
            accel = f"{full_steps / max(steps, 1):.2f}x"
        finals = {}
        for group in GROUPS:
            values = [r.accuracy(group)[max(r.accuracy(group))] for r in runs]
            finals[group] = f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        times = [t for r in runs for t in r.phase_times()]
        # Runs after a seed's first one reuse its behavior rollouts (0 s here): report the generating run's.
        rollouts = max(t["rollouts"] for t in times if t["phase"] == 0)
        selection = statistics.mean(t["selection"] for t in times)
        training = statistics.mean(t["training"] for t in times if t["training"] > 0)
        lines.append(
            f"| {name} | {steps if steps is not None else '-'} | {accel} | {finals['targeted']} | {finals['untargeted']} | "
            f"{curve.get(full_steps, float('nan')):.3f} | {statistics.mean(targeted_share(r, pool_rows) for r in runs):.0%} | "
            f"{rollouts:.0f} | {selection:.1f} | {training:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="8 phases instead of 4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/curriculum")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache", help="the demo's suite + warm start")
    args = parser.parse_args(argv)
    size = SIZES["full" if args.full else "default"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Run]] = {name: [] for name in METHODS}
    for seed in args.seeds:
        rollouts = None
        for name, selector in METHODS.items():
            out = args.out / f"{selector}-seed{seed}"
            run_method(out, args.cache, selector, seed, size, rollouts)
            rollouts = rollouts or out / "ckpt/cropi/rollouts"
            results[name].append(load_run(out))
    lines = summarise(results, read_jsonl(args.cache / "suite/pool.jsonl"))
    seed_means = {name: {g: mean_curve(runs, g) for g in GROUPS} for name, runs in results.items()}
    plot_accuracy(seed_means, args.out / "accuracy.png")
    command = "python benchmarks/curriculum.py" + (" --full" if args.full else "") + f" --seeds {' '.join(map(str, args.seeds))}"
    report = [f"# Curriculum benchmark ({'full' if args.full else 'default'} size)", "", f"Command: `{command}`", "", *lines,
              "", "![targeted and untargeted accuracy, seed mean](accuracy.png)", ""]  # fmt: skip
    (args.out / "report.md").write_text("\n".join(report))
    print("\n".join(lines))
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
