"""Read a CROPI run (TensorBoard scalars + phase records) and write its report.

    python -m openrlhf_cropi.demo.report RUN_DIR --suite SUITE_DIR [--out RUN_DIR]

RUN_DIR is what launch/local/demo.sh writes: tensorboard/ (OpenRLHF's logger) and
ckpt/cropi/phases/phase-NNN.json (the selection of each phase, as pool row indices). The pool's
rows in SUITE_DIR/pool.jsonl give each selected prompt its family. Writes report.md,
accuracy.png (test accuracy vs step) and subsets.png (subset composition per phase), and
prints the per-phase table.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from openrlhf_cropi.demo.tasks import FAMILIES, TARGETED, read_jsonl


@dataclass
class Run:
    """What one run logged: scalars by tag ({step: value}) and the phase records."""

    scalars: dict[str, dict[int, float]]
    phases: list[dict] = field(default_factory=list)

    def accuracy(self, group: str) -> dict[int, float]:
        """Mean test pass@1 over the families of `group` ("targeted" or "untargeted"), by step."""
        tags = [t for t in self.scalars if t.startswith(f"eval/eval_{group}_") and t.endswith("_pass1")]
        if not tags:
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
    phases = [json.loads(p.read_text()) for p in sorted(run_dir.glob("ckpt/cropi/phases/phase-*.json"))]
    return Run(scalars, phases)


def composition(phase: dict, pool_rows: list[dict]) -> Counter:
    """Selected prompts per family."""
    return Counter(pool_rows[i]["family"] for i in phase["selected"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def phase_table(run: Run, pool_rows: list[dict]) -> list[str]:
    """Markdown rows: phase, subset by family, rollouts/selection/training seconds, accuracy at the phase's end."""
    targeted, untargeted = run.accuracy("targeted"), run.accuracy("untargeted")
    steps = run.phase_steps()
    head = "| phase | steps | subset by family | rollouts s | selection s | training s | targeted acc | untargeted acc |"
    lines = [head, "|---" * 8 + "|"]
    for times, record in zip(run.phase_times(), run.phases):
        phase_steps = steps.get(record["phase"], [])
        end = max(phase_steps) if phase_steps else None
        mix = composition(record, pool_rows)
        mix_text = ", ".join(f"{f} {mix[f]}" for f in FAMILIES if mix[f])
        span = f"{min(phase_steps)}-{end}" if phase_steps else "-"
        lines.append(
            f"| {record['phase']} | {span} | {mix_text} | {times['rollouts']:.0f} | {times['selection']:.1f} | "
            f"{times['training']:.1f} | {_fmt(targeted.get(end))} | {_fmt(untargeted.get(end))} |"
        )
    return lines


GROUPS = ("targeted", "untargeted")


def plot_accuracy(curves: dict[str, dict[str, dict[int, float]]], out: Path) -> None:
    """curves[name][group] = {step: accuracy}, one line per name in each group's panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, group in zip(axes, GROUPS):
        for name, by_group in curves.items():
            acc = by_group[group]
            ax.plot(list(acc), list(acc.values()), marker="o", label=name)
        ax.set_title(f"{group} test accuracy (pass@1)")
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_subsets(run: Run, pool_rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0] * len(run.phases)
    labels = [str(r["phase"]) for r in run.phases]
    pool_mix = Counter(r["family"] for r in pool_rows)
    for family in FAMILIES:
        counts = [composition(r, pool_rows)[family] / max(len(r["selected"]), 1) for r in run.phases]
        tag = f"{family} ({'targeted' if family in TARGETED else 'untargeted'}, pool {pool_mix[family] / len(pool_rows):.0%})"
        ax.bar(labels, counts, bottom=bottom, label=tag)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("phase")
    ax.set_ylabel("share of the phase's subset")
    ax.set_title("Subset composition per phase")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, suite: Path, out: Path) -> Path:
    run = load_run(run_dir)
    pool_rows = read_jsonl(suite / "pool.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    table = phase_table(run, pool_rows)
    plot_accuracy({run.phases[0]["selector"] if run.phases else "run": {g: run.accuracy(g) for g in GROUPS}}, out / "accuracy.png")
    plot_subsets(run, pool_rows, out / "subsets.png")
    selector = run.phases[0]["selector"] if run.phases else "?"
    start = {g: run.accuracy(g).get(0) for g in GROUPS}
    end_step = max(run.accuracy("targeted"), default=None)
    end = {g: run.accuracy(g).get(end_step) for g in GROUPS}
    text = [
        f"# CROPI demo report ({selector} selector)",
        "",
        f"Run: `{run_dir}`. Targeted families (with validation sets): {', '.join(TARGETED)}; "
        f"untargeted: {', '.join(f for f in FAMILIES if f not in TARGETED)}.",
        "",
        f"Test accuracy (pass@1): targeted {_fmt(start['targeted'])} -> {_fmt(end['targeted'])}, "
        f"untargeted {_fmt(start['untargeted'])} -> {_fmt(end['untargeted'])} (step 0 -> {end_step}).",
        "",
        "Per phase: the subset CROPI trained on, the time spent on behavior rollouts (once, phase 0),",
        "on selection (gradients + scoring) and on GRPO training, and test accuracy at the phase's last step.",
        "",
        *table,
        "",
        "![test accuracy vs step](accuracy.png)",
        "",
        "![subset composition per phase](subsets.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))
    print("\n".join(table))
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--suite", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="default: RUN_DIR")
    args = parser.parse_args(argv)
    print(f"wrote {write_report(args.run_dir, args.suite, args.out or args.run_dir)}")


if __name__ == "__main__":
    main()
