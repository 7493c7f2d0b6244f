"""What CROPI's phase-0 selection sees on the demo: sketched vs exact influence, and by family.

    python benchmarks/demo_selection.py [--run runs/demo/influence] [--cache runs/demo-cache] [--targets add linear]

Scores the demo run's stored behavior rollouts at the warm-started model with the offline
`cropi score` (the same core code as the job; the demo's token-mean objective): with the demo's
sketch (sjlt, keep 0.1, d 8192), with it on the gradients of the top 3, 2 or 1 of the model's 4
blocks only (--grad-layers), and exactly (identity projection of every coordinate). Prints, for each, the
top-10% overlap with the exact ranking and the targeted-family share of the top 10%, and the
exact mean cosine of each pool family with each validation set: whether a targeted family's
prompts point where that family's validation gradient points at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.tasks import DEFAULT_TARGETS, FAMILIES, parse_targets, read_jsonl  # noqa: E402
from openrlhf_cropi.demo.warm_start import WARM_START  # noqa: E402

SKETCH = ["--projector", "sjlt", "--keep-ratio", "0.1", "--proj-dim", "8192"]
SETTINGS = {
    "exact": ["--projector", "identity", "--keep-ratio", "1.0"],  # + --proj-dim <all parameters>
    "demo sketch (sjlt, keep 0.1, d 8192)": SKETCH,
    **{f"demo sketch, top {n} of 4 blocks (--cropi.grad_layers {n})": [*SKETCH, "--grad-layers", str(n)] for n in (3, 2, 1)},
}


def score(run: Path, model: Path, val_sets: int, extra: list[str], out: Path) -> dict[int, list[float]]:
    if not out.exists():
        store = run / "ckpt/cropi/rollouts"
        vals = [arg for v in range(val_sets) for arg in ("--val", str(store / f"val{v}"))]
        cmd = [sys.executable, "-m", "openrlhf_cropi.cli.cropi", "score", "--model", str(model),
               "--train", str(store / "pool"), *vals,
               "--val-cap", "0", "--seed", "0", "--out", str(out), "--loss-agg-mode", "token-mean",  # the demo's
               *extra]  # fmt: skip
        subprocess.run(cmd, check=True)
    prompts = json.loads(out.read_text())["prompts"]
    return {p["index"]: p["cosines"] for p in prompts if p["cosines"] is not None}


def top(cosines: dict[int, list[float]], k: int) -> list[int]:
    """Top k by the mean cosine over the validation sets."""
    return sorted(cosines, key=lambda i: -statistics.mean(cosines[i]))[:k]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs/demo/influence", help="a demo arm's run directory")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache")
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="the run's targets, in order")
    args = parser.parse_args(argv)
    targets = parse_targets(args.targets)
    pool = read_jsonl(args.cache / "suite/pool.jsonl")
    k = len(pool) // 10
    model = WARM_START
    from transformers import AutoModelForCausalLM

    from openrlhf_cropi.core.gradients import top_layers_parameters

    policy = AutoModelForCausalLM.from_pretrained(model)
    SETTINGS["exact"] += ["--proj-dim", str(sum(p.numel() for p in policy.parameters()))]
    for n in (2, 1):  # exact on the top blocks' coordinates (--cropi.projector none --cropi.grad_layers n)
        size = sum(p.numel() for p in top_layers_parameters(policy, n))
        SETTINGS[f"exact, top {n} of 4 blocks"] = [*SETTINGS["exact"][:4], "--proj-dim", str(size), "--grad-layers", str(n)]
    # Each setting's scores are kept in the run directory, named by its flags (a rerun reuses them).
    results = {name: score(args.run, model, len(targets), extra, args.run / f"scores{''.join(extra).replace('-', '_')}.json")
               for name, extra in SETTINGS.items()}  # fmt: skip
    exact = results["exact"]
    exact_top = set(top(exact, k))
    print(f"{len(exact)} pool prompts with reward variance scored; top {k} (10% of the pool) by mean cosine")
    for name, cosines in results.items():
        chosen = top(cosines, k)
        share = sum(pool[i]["family"] in targets for i in chosen) / k
        print(f"{name:>40s}: overlap with exact top {len(exact_top & set(chosen)) / k:.0%}, targeted share {share:.0%}")
    print(f"targeted share among all scored prompts: {sum(pool[i]['family'] in targets for i in exact) / len(exact):.0%}")
    by_family = defaultdict(list)
    for i, c in exact.items():
        by_family[pool[i]["family"]].append(c)
    print(f"exact mean cosine by pool family with each validation set ({', '.join(targets)}):")
    for family in FAMILIES:
        rows = by_family.get(family, [])
        if rows:
            means = [statistics.mean(r[v] for r in rows) for v in range(len(targets))]
            print(f"  {family:>8s} ({len(rows):3d} prompts): " + " ".join(f"{m:+.4f}" for m in means))


if __name__ == "__main__":
    main()
