"""Read CROPI demo runs (TensorBoard scalars + phase records) and write their comparison report.

    python -m openrlhf_cropi.demo.report OUT --suite SUITE_DIR [--targets add linear]

OUT holds one run directory per arm, as launch/local/demo.sh writes them: OUT/influence (CROPI 10%)
and OUT/random (random 10%), each with tensorboard/ (OpenRLHF's logger) and
ckpt/cropi/phases/phase-NNN.json and .jsonl (the selection of each phase: pool row indices,
and the rows themselves with their family). The targets are the families whose validation sets
the runs gave CROPI; the targeted families are those of the targets' skills (SUITE_DIR's design). Writes OUT/report.md, accuracy.png (test accuracy vs
step, targeted and untargeted families) and subsets.png (subset family mix per phase), and prints
the comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from openrlhf_cropi.demo.tasks import DESIGNS, Design, parse_targets, read_jsonl, suite_design

CROPI = "CROPI 10%"
ARMS = {CROPI: "influence", "random 10%": "random"}  # the demo's arms: name -> run directory under OUT


@dataclass
class Run:
    """What one run logged: scalars by tag ({step: value}) and the phase records."""

    scalars: dict[str, dict[int, float]]
    phases: list[dict] = field(default_factory=list)

    def accuracy(self, families: tuple[str, ...]) -> dict[int, float]:
        """Mean test pass@1 over `families` (the test set's datasources), by step."""
        tags = [f"eval/eval_{family}_pass1" for family in families]
        if not all(t in self.scalars for t in tags):
            return {}
        steps = sorted(set.intersection(*(set(self.scalars[t]) for t in tags)))
        return {s: sum(self.scalars[t][s] for t in tags) / len(tags) for s in steps}

    def phase_steps(self) -> dict[int, list[int]]:
        """Global steps trained in each phase (each step logs the phase it trained on as cropi/phase)."""
        out: dict[int, list[int]] = {}
        for step, phase in sorted(self.scalars.get("train/cropi/phase", {}).items()):
            out.setdefault(int(phase), []).append(step)
        return out

    def phase_times(self) -> list[dict]:
        """Per phase: behavior rollouts (phase 0 only), selection and training seconds."""
        steps = self.phase_steps()
        step_total = self.scalars.get("train/timing/step_total", {})
        rollouts = sum(self.scalars.get("train/cropi/time_rollouts", {}).values())  # logged once, at step 1
        rows = []
        for record in self.phases:
            status = record["status"]
            rows.append(
                {
                    "phase": record["phase"],
                    "rollouts": rollouts if record["phase"] == 0 else 0.0,
                    "selection": status.get("cropi/time_gradients", 0.0) + status.get("cropi/time_scoring", 0.0),
                    "training": sum(step_total.get(s, 0.0) for s in steps.get(record["phase"], [])),
                }
            )
        return rows


def load_run(run_dir: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    events = sorted(run_dir.glob("tensorboard/**/events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard events under tensorboard/")
    for path in events:  # a resumed run writes a second file; later values win
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    phases = []
    for path in sorted(run_dir.glob("ckpt/cropi/phases/phase-*.json")):
        # The selected rows themselves: an arm may train on a pool of its own (the oracle).
        phases.append({**json.loads(path.read_text()), "families": [r["family"] for r in read_jsonl(path.with_suffix(".jsonl"))]})
    return Run(scalars, phases)


def composition(phase: dict) -> Counter:
    """Selected prompts per family."""
    return Counter(phase["families"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def groups(design: Design, targets: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Test families by group: targeted (the targets' skills, in every form), untargeted, all."""
    targeted = design.targeted(targets)
    return {"targeted": targeted, "untargeted": tuple(f for f in design.families if f not in targeted),
            "all": design.families}  # fmt: skip


def phase_table(run: Run, design: Design, targets: tuple[str, ...]) -> list[str]:
    """Markdown rows: phase, subset by family, rollouts/selection/training seconds, accuracy at the phase's end."""
    by_group = groups(design, targets)
    targeted, untargeted = run.accuracy(by_group["targeted"]), run.accuracy(by_group["untargeted"])
    steps = run.phase_steps()
    head = "| phase | steps | subset by family | rollouts s | selection s | training s | targeted acc | untargeted acc |"
    lines = [head, "|---" * 8 + "|"]
    for times, record in zip(run.phase_times(), run.phases):
        phase_steps = steps.get(record["phase"], [])
        end = max(phase_steps) if phase_steps else None
        mix = composition(record)
        mix_text = ", ".join(f"{f} {mix[f]}" for f in design.families if mix[f])
        span = f"{min(phase_steps)}-{end}" if phase_steps else "-"
        lines.append(
            f"| {record['phase']} | {span} | {mix_text} | {times['rollouts']:.0f} | {times['selection']:.1f} | "
            f"{times['training']:.1f} | {_fmt(targeted.get(end))} | {_fmt(untargeted.get(end))} |"
        )
    return lines


# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_curve(runs: list[Run], families: tuple[str, ...], answers: int) -> dict[int, tuple[float, float]]:
    """{step: (mean accuracy over the runs, 95% half-width)} at the steps every run evaluated.

    Over several runs (seeds) the interval is Student's t over them. A single run has no seed
    spread: its interval is the evaluation's own sampling noise, binomial over the `answers`
    graded at each point (test prompts of the families x samples per prompt; an upper bound).
    """
    curves = [r.accuracy(families) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    out = {}
    for step in steps:
        values = [c[step] for c in curves]
        mean = statistics.mean(values)
        if len(values) > 1:
            half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
        else:
            half = 1.96 * math.sqrt(mean * (1 - mean) / answers)
        out[step] = (mean, half)
    return out


def steps_to(curve: dict[int, tuple[float, float]], target: float) -> int | None:
    """The first evaluated step whose mean accuracy reaches `target`."""
    return next((s for s, (v, _) in sorted(curve.items()) if v >= target - 1e-9), None)


def above_steps(a: dict[int, tuple[float, float]], b: dict[int, tuple[float, float]]) -> list[int]:
    """Steps both curves evaluated where a's 95% interval lies entirely above b's."""
    return [s for s in sorted(set(a) & set(b)) if a[s][0] - a[s][1] > b[s][0] + b[s][1]]


def family_shares(runs: list[Run]) -> Counter:
    """Each family's share of all the runs' phase subsets together."""
    mix = Counter(f for run in runs for phase in run.phases for f in phase["families"])
    total = max(sum(mix.values()), 1)
    return Counter({f: n / total for f, n in mix.items()})


def comparison(
    results: dict[str, list[Run]], pool_rows: list[dict], design: Design, targets: tuple[str, ...], reference: str,
    answers: dict[str, int],
) -> tuple[list[str], dict[str, dict[str, dict[int, tuple[float, float]]]]]:
    """The arms side by side: markdown lines and the curves they were computed from.

    The target is the `reference` arm's best targeted accuracy (mean over its runs); an arm's
    steps-to-target is its first evaluated step whose mean reaches it, its acceleration the
    reference's steps over its own. `answers[group]` is what seed_curve needs for single runs.
    """
    by_group = groups(design, targets)
    curves = {name: {g: seed_curve(runs, fams, answers[g]) for g, fams in by_group.items()} for name, runs in results.items()}
    ref = curves[reference]["targeted"]
    target = max(v for v, _ in ref.values())
    ref_steps = steps_to(ref, target)
    pool_share = sum(r["family"] in by_group["targeted"] for r in pool_rows) / len(pool_rows)
    end = min(max(c["targeted"]) for c in curves.values())
    lines = [
        f"Validation sets: {', '.join(targets)}; targeted families: {', '.join(by_group['targeted'])} "
        f"({pool_share:.0%} of the pool). Target accuracy: {reference}'s best targeted "
        f"test accuracy, {target:.3f}, first reached at step {ref_steps}. Accuracies: mean and 95% interval "
        f"({'Student t over ' + str(len(results[reference])) + ' seeds' if len(results[reference]) > 1 else 'evaluation sampling noise, one seed'}).",
        "",
        f"| arm | steps to target | acceleration | targeted at step 0 | targeted at step {end} | untargeted at step {end} "
        f"| all families at step {end} | targeted share of subsets | behavior rollouts s | selection s / phase "
        "| training s / phase |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        steps = steps_to(curves[name]["targeted"], target)
        if not ref_steps:
            accel = f"n/a: {reference} never beat step 0"
        elif steps is None:
            accel = "not reached"
        else:
            accel = f"{ref_steps / max(steps, 1):.2f}x"
        at = {"start": curves[name]["targeted"].get(0), **{g: curves[name][g].get(end) for g in by_group}}
        cell = {k: "-" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}" for k, v in at.items()}
        times = [t for r in runs for t in r.phase_times()]
        # Runs that reuse a store's behavior rollouts log 0 s for them: report the generating run's.
        rollouts = max((t["rollouts"] for t in times), default=0.0)
        trained = [t["training"] for t in times if t["training"] > 0]
        lines.append(
            f"| {name} | {steps if steps is not None else '-'} | {accel} | {cell['start']} | {cell['targeted']} | "
            f"{cell['untargeted']} | {cell['all']} | "
            f"{sum(v for f, v in family_shares(runs).items() if f in by_group['targeted']):.0%} | "
            f"{rollouts:.0f} | {statistics.mean(t['selection'] for t in times):.1f} | "
            f"{statistics.mean(trained) if trained else 0:.1f} |"
        )
    steps = sorted(set.intersection(*(set(c["targeted"]) for c in curves.values())))
    for group in by_group:
        lines += ["", f"{group.capitalize()} accuracy by step ({', '.join(by_group[group])}), mean ± 95% half-width:", "",
                  "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]  # fmt: skip
        for name, arm_curves in curves.items():
            cells = (f"{arm_curves[group][s][0]:.3f} ± {arm_curves[group][s][1]:.3f}" for s in steps)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Accuracy per test family at step 0 -> step {end} (seed means):", "",
              "| arm | " + " | ".join(design.families) + " |", "|---" * (len(design.families) + 1) + "|"]  # fmt: skip
    for name, runs in results.items():
        per_family = [[statistics.mean(r.accuracy((f,))[step] for r in runs) for step in (0, end)] for f in design.families]
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f} -> {b:.3f}" for a, b in per_family) + " |")
    lines += ["", "Subsets by family (share of all phases' selections, over seeds):", "",
              "| arm | " + " | ".join(design.families) + " |", "|---" * (len(design.families) + 1) + "|"]  # fmt: skip
    for name, runs in results.items():
        shares = family_shares(runs)
        lines.append(f"| {name} | " + " | ".join(f"{shares[f]:.0%}" for f in design.families) + " |")
    if max(len(runs) for runs in results.values()) > 1:
        per_seed = (f"{name} {', '.join(_fmt(r.accuracy(by_group['targeted']).get(end)) for r in runs)}"
                    for name, runs in results.items())  # fmt: skip
        lines += ["", f"Targeted accuracy at step {end} per seed: " + "; ".join(per_seed) + "."]
    if CROPI in curves:
        lines.append("")
        for name in curves:
            if name != CROPI:
                above = above_steps(curves[CROPI]["targeted"], curves[name]["targeted"])
                listed = ", ".join(map(str, above))
                where = (f"at steps {listed}" if len(above) > 1 else f"at step {listed}") if above else "at no evaluated step"
                lines.append(f"- {CROPI} above {name}, 95% intervals apart: {where} (of {', '.join(map(str, steps))}).")
    return lines, curves


def plot_accuracy(
    curves: dict[str, dict[str, dict[int, tuple[float, float]]]], design: Design, targets: tuple[str, ...], out: Path
) -> None:
    """curves[name][group] = {step: (mean, half-width)}: one line and band per name in each group's panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, (group, families) in zip(axes, groups(design, targets).items()):
        for name, by_group in curves.items():
            steps = list(by_group[group])
            mean = [v for v, _ in by_group[group].values()]
            half = [h for _, h in by_group[group].values()]
            ax.plot(steps, mean, marker="o", label=name)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
        named = ", ".join(families) if len(families) <= 3 else f"{len(families)} families"
        ax.set_title(f"{group} test accuracy ({named})", fontsize=9)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (pass@1, 95% band)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_subsets(runs: dict[str, Run], pool_rows: list[dict], design: Design, targets: tuple[str, ...], out: Path) -> None:
    """One panel per arm: each phase's subset by family, targeted families hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs) + 2, 4), sharey=True, squeeze=False)
    pool_mix, targeted = Counter(r["family"] for r in pool_rows), design.targeted(targets)
    for ax, (name, run) in zip(axes[0], runs.items()):
        bottom = [0.0] * len(run.phases)
        labels = [str(r["phase"]) for r in run.phases]
        for family in design.families:
            counts = [composition(r)[family] / max(len(r["selected"]), 1) for r in run.phases]
            tag = f"{family} ({'targeted' if family in targeted else 'untargeted'}, pool {pool_mix[family] / len(pool_rows):.0%})"
            ax.bar(labels, counts, bottom=bottom, label=tag, hatch="//" if family in targeted else None)
            bottom = [b + c for b, c in zip(bottom, counts)]
        ax.set_title(f"{name}: subset per phase", fontsize=9)
        ax.set_xlabel("phase")
    axes[0][0].set_ylabel("share of the phase's subset")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def graded_answers(suite: Path, targets: tuple[str, ...], samples: int) -> dict[str, int]:
    """Answers graded per evaluation point in each group: its test prompts x samples per prompt."""
    test = Counter(r["family"] for r in read_jsonl(suite / "test.jsonl"))
    return {g: samples * sum(test[f] for f in fams) for g, fams in groups(DESIGNS[suite_design(suite)], targets).items()}


def write_report(out: Path, suite: Path, targets: tuple[str, ...] | None = None, eval_samples: int = 8) -> Path:
    """The demo's report: its arms (ARMS, under `out`) compared, random 10% as the reference."""
    design = DESIGNS[suite_design(suite)]
    targets = targets or design.default_targets
    by_group = groups(design, targets)
    runs = {name: load_run(out / sub) for name, sub in ARMS.items()}
    pool_rows = read_jsonl(suite / "pool.jsonl")
    lines, curves = comparison(
        {n: [r] for n, r in runs.items()}, pool_rows, design, targets, "random 10%", graded_answers(suite, targets, eval_samples)
    )
    plot_accuracy(curves, design, targets, out / "accuracy.png")
    plot_subsets(runs, pool_rows, design, targets, out / "subsets.png")
    text = [
        "# CROPI demo report: CROPI 10% vs random 10%",
        "",
        f"Runs: `{out / ARMS['CROPI 10%']}` and `{out / ARMS['random 10%']}`: the same warm start, behavior rollouts, "
        f"seed and steps; only the phase subsets differ. Validation sets (they steer CROPI): {', '.join(targets)}; "
        f"targeted families: {', '.join(by_group['targeted'])}; untargeted: {', '.join(by_group['untargeted'])}.",
        "",
        *lines,
        "",
        "![test accuracy vs step](accuracy.png)",
        "",
        "![subset family mix per phase](subsets.png)",
        "",
    ]
    for name, run in runs.items():
        text += [f"## {name}: per phase", "", *phase_table(run, design, targets), ""]
    (out / "report.md").write_text("\n".join(text))
    print("\n".join(lines))
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--suite", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", metavar="FAMILY", help="the runs' validation families (default: the design's)")
    parser.add_argument("--eval-samples", type=int, default=8, help="the runs' --eval.n_samples_per_prompt")
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.targets, design=suite_design(args.suite)) if args.targets else None
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {write_report(args.out, args.suite, targets, args.eval_samples)}")


if __name__ == "__main__":
    main()
