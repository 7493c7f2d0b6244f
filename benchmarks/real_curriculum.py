"""A real model learning with CROPI: SmolLM2-135M-Instruct, GRPO on CPU, CROPI 10% against variance 10%.

    python benchmarks/real_curriculum.py [--out runs/real-curriculum] [--seeds 0] [--arms influence variance]
        [--lr 1e-4] [--phases 3] [--steps-per-phase 4] [--batch 8] [--k 8] [--max-new-tokens 64] ...

Data (OUT/data, written once): the surface design's eight families (openrlhf_cropi.demo.tasks:
sums, differences, products and comparisons, each as symbols and as a word problem) at
difficulties 1 and 2 (one- and two-digit numbers; SmolLM2 gets three digits nearly never right),
sent through the model's chat template. The pool is drawn evenly from the design's pool families
(all but add_word), a validation set of each target family (--targets, default add_word) and a
test set of every family. A family's skill is its operation, so the targeted test families are
the targets' skills in both forms (add_word: add_sym and add_word). Each arm is one `python -m
openrlhf_cropi.cli.train_ppo_ray` job on the real pipeline (vLLM CPU engine, DeepSpeed actor,
fp32): SmolLM2 (openrlhf_cropi.models.smollm2), rewarded by openrlhf_cropi/rewards/math_verify.py,
GRPO (group-normalised advantages, no KL). The arms of a seed share the seed, the steps and the
behavior rollouts (the first finished arm's, copied), and differ only in --cropi.selector /
--cropi.alpha: influence (CROPI, exact scores), variance, random, full (random at alpha 1).

Resumable: a finished arm (OUT/seedS/ARM/DONE) is kept and an unfinished one restarts; a rerun
with other data or training settings than OUT/settings.json holds is refused (arms and seeds may
differ). Writes OUT/report.md, OUT/accuracy.png and OUT/results.json (accuracy per test family and
step, each phase's subset and seconds, per arm and seed: every number of the report).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curriculum import raw_results  # noqa: E402
from openrlhf_cropi.demo.report import Run, comparison, groups, load_run, phase_table, plot_accuracy  # noqa: E402
from openrlhf_cropi.demo.tasks import DESIGNS, read_jsonl  # noqa: E402

DESIGN = DESIGNS["surface"]  # its habits belong to the demo's warm start and play no part here
DIFFICULTIES = (1, 2)
REWARD = ROOT / "openrlhf_cropi/rewards/math_verify.py"
# arm -> (its name in the report, --cropi.selector, --cropi.alpha); None = --alpha
ARMS = {"influence": ("CROPI 10%", "influence", None), "variance": ("variance 10%", "variance", None),
        "random": ("random 10%", "random", None), "full": ("full data", "random", 1.0)}  # fmt: skip
# What the arms of one OUT directory must share (the rest: --out, --seeds, --arms, --model).
SETTINGS = ("targets", "pool", "val", "test", "data_seed", "k", "temperature", "max_new_tokens", "lr", "alpha",
            "phases", "steps_per_phase", "batch", "micro_batch", "eval_steps", "eval_samples")  # fmt: skip


def write_data(out: Path, a: argparse.Namespace) -> Path:
    """OUT/data: test.jsonl (every family), val_<target>.jsonl, pool.jsonl; distinct prompts throughout."""
    data = out / "data"
    if (data / "pool.jsonl").exists():
        return data
    rng, seen = random.Random(a.data_seed), set()

    def draw(family: str, n: int, datasource: str) -> list[dict]:
        rows = []
        for _ in range(200 * n):
            if len(rows) == n:
                return rows
            difficulty = DIFFICULTIES[len(rows) % len(DIFFICULTIES)]
            prompt, label = DESIGN.generators[family](rng, difficulty)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "label": str(label), "family": family, "difficulty": difficulty,
                             "datasource": datasource})  # fmt: skip
        raise ValueError(f"family {family}: only {len(rows)} distinct problems, {n} asked for")

    files = {"test.jsonl": [row for family in DESIGN.families for row in draw(family, a.test, family)]}
    files |= {f"val_{t}.jsonl": draw(t, a.val, f"val_{t}") for t in a.targets}
    families = DESIGN.pool_families
    pool = [row for family in families for row in draw(family, -(-a.pool // len(families)), "pool")]
    rng.shuffle(pool)
    files["pool.jsonl"] = pool[: a.pool]
    tmp = out / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, rows in files.items():
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(data)
    return data


def job_flags(a: argparse.Namespace, model: str, data: Path, arm: str, seed: int, run: Path) -> list[str]:
    _, selector, alpha = ARMS[arm]
    rows = a.batch * a.k
    flags = [
        "--actor.model_name_or_path", model, "--reward.remote_url", REWARD,
        "--data.prompt_dataset", data / "pool.jsonl", "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.apply_chat_template", "--data.max_len", 128 + a.max_new_tokens, "--rollout.max_new_tokens", a.max_new_tokens,
        "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", a.k,
        "--rollout.temperature", a.temperature, "--rollout.batch_size", a.batch, "--rollout.micro_batch_size", rows,
        "--train.batch_size", rows, "--train.micro_batch_size", a.micro_batch,
        "--algo.kl.init_coef", 0, "--actor.adam.lr", a.lr, "--actor.lr_warmup_ratio", 0,
        "--actor.num_nodes", 1, "--actor.num_gpus_per_node", 1,
        "--vllm.num_engines", 1, "--vllm.tensor_parallel_size", 1, "--vllm.sync_backend", "gloo", "--vllm.enforce_eager",
        "--ds.zero_stage", 2, "--ds.param_dtype", "fp32", "--ds.attn_implementation", "eager",
        "--train.num_episodes", 1, "--train.seed", seed,
        "--eval.dataset", data / "test.jsonl", "--eval.steps", a.eval_steps, "--eval.temperature", a.temperature,
        "--eval.n_samples_per_prompt", a.eval_samples,
        "--ckpt.path", run / "ckpt", "--ckpt.save_steps", -1, "--ckpt.best_metric_key", "none",
        "--ckpt.output_dir", run / "final", "--logger.tensorboard_dir", run / "tensorboard",
        "--cropi.enable", "--cropi.selector", selector, "--cropi.alpha", alpha or a.alpha,
        "--cropi.val_datasets", *(data / f"val_{t}.jsonl" for t in a.targets),
        "--cropi.num_phases", a.phases, "--cropi.steps_per_phase", a.steps_per_phase,
        "--cropi.train_samples", a.k, "--cropi.val_samples", a.k, "--cropi.behavior_temperature", a.temperature,
        "--cropi.projector", "none", "--cropi.seed", seed,
    ]  # fmt: skip
    return [str(f) for f in flags]


def run_seed(a: argparse.Namespace, model: str, data: Path, seed: int) -> None:
    """One seed's arms in one Ray cluster, the first finished arm's behavior rollouts copied to the others."""
    out = a.out / f"seed{seed}"
    todo = [arm for arm in a.arms if not (out / arm / "DONE").exists()]
    if not todo:
        return
    first = next((out / arm for arm in a.arms if (out / arm / "DONE").exists()), None)
    jobs = []
    for arm in todo:
        run = out / arm
        copy = f'cp -r "{first}/ckpt/cropi/rollouts" "{run}/ckpt/cropi/"' if first else "true"
        flags = " ".join(f"'{f}'" for f in job_flags(a, model, data, arm, seed, run))
        jobs.append(
            f'rm -rf "{run}" && mkdir -p "{run}/ckpt/cropi" && {copy} && echo "== seed {seed} arm {arm}, log {run}.log" && '
            f"VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m openrlhf_cropi.cli.train_ppo_ray {flags} "
            f'>"{run}.log" 2>&1 || {{ tail -n 40 "{run}.log" >&2; exit 1; }}; touch "{run}/DONE"'
        )
        first = first or run
    # One cluster for the seed's arms (actor and vLLM engine each on a logical Ray "GPU").
    script = ". launch/local/cpu_env.sh; start_ray 2; trap stop_ray EXIT; set -e; " + "; ".join(jobs)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", "-c", script], cwd=ROOT, check=True)


def check_settings(a: argparse.Namespace) -> None:
    wanted = {name: getattr(a, name) for name in SETTINGS}
    path = a.out / "settings.json"
    if path.exists():
        have = json.loads(path.read_text())
        differ = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
        if differ:
            sys.exit(f"{path}: this OUT was made with other settings ({differ}, as (there, here)); "
                     "pass them or choose another --out")  # fmt: skip
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=1) + "\n")


def behavior_table(a: argparse.Namespace, data: Path) -> list[str]:
    """Per family: the initial policy's pass rate on the pool and validation prompts (the behavior
    rollouts of the first seed's first arm) and how many have reward variance, the only ones any
    selector here can pick and GRPO can learn from."""
    from openrlhf_cropi.core.store import RolloutStore

    stores = a.out / f"seed{a.seeds[0]}" / a.arms[0] / "ckpt/cropi/rollouts"
    rows = [("pool", read_jsonl(data / "pool.jsonl"), stores / "pool")]
    rows += [(f"validation {t}", read_jsonl(data / f"val_{t}.jsonl"), stores / f"val{i}") for i, t in enumerate(a.targets)]
    lines = ["| prompts | family | count | behavior pass rate | with reward variance |", "|---|---|---|---|---|"]
    for name, prompts, store in rows:
        summary = RolloutStore(store).summary()
        pass_rate, varied = summary.pass_rate.tolist(), (~summary.zero_variance).tolist()
        for family in DESIGN.families:
            mine = [pos for pos, i in enumerate(summary.index.tolist()) if prompts[i]["family"] == family]
            if mine:
                rate = sum(pass_rate[pos] for pos in mine) / len(mine)
                lines.append(f"| {name} | {family} | {len(mine)} | {rate:.2f} | {sum(varied[pos] for pos in mine)} |")
    return lines


def report(a: argparse.Namespace, data: Path, command: str) -> str:
    import torch

    results: dict[str, list[Run]] = {ARMS[arm][0]: [load_run(a.out / f"seed{s}" / arm) for s in a.seeds] for arm in a.arms}
    raw = {name: {str(s): raw_results(run) for s, run in zip(a.seeds, runs)} for name, runs in results.items()}
    (a.out / "results.json").write_text(json.dumps({"settings": json.loads((a.out / "settings.json").read_text()),
                                                    "arms": raw}, indent=1))  # fmt: skip
    targets = tuple(a.targets)
    test = read_jsonl(data / "test.jsonl")
    answers = {g: a.eval_samples * sum(r["family"] in families for r in test) for g, families in groups(DESIGN, targets).items()}
    reference = next(n for n in ("full data", "variance 10%", "random 10%") if n in results) if len(results) > 1 else next(iter(results))
    lines, curves = comparison(results, read_jsonl(data / "pool.jsonl"), DESIGN, targets, reference, answers)
    plot_accuracy(curves, DESIGN, targets, a.out / "accuracy.png")
    text = [f"# SmolLM2-135M-Instruct, GRPO on CPU: {', '.join(results)}", "", f"Command: `{command}`", "",
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}; settings: `{a.out / 'settings.json'}`.", "",
            *lines, "", "![targeted, untargeted and all-family test accuracy](accuracy.png)", "",
            f"The initial policy's behavior rollouts (K = {a.k}, temperature {a.temperature}, at most "
            f"{a.max_new_tokens} new tokens; seed {a.seeds[0]}):", "", *behavior_table(a, data), ""]  # fmt: skip
    for name, runs in results.items():
        for seed, run in zip(a.seeds, runs):
            text += [f"## {name}, seed {seed}: per phase", "", *phase_table(run, DESIGN, targets), ""]
    (a.out / "report.md").write_text("\n".join(text))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs/real-curriculum")
    p.add_argument("--model", type=Path, default=ROOT / "runs/cache/smollm2", help="SmolLM2 checkpoint dir (built if absent)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["influence", "variance"])
    p.add_argument("--targets", nargs="+", choices=DESIGN.families, default=list(DESIGN.default_targets),
                   help="validation families")
    p.add_argument("--pool", type=int, default=320, help="pool prompts, evenly over the design's pool families")
    p.add_argument("--val", type=int, default=32, help="validation prompts per target family")
    p.add_argument("--test", type=int, default=32, help="test prompts per family")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--k", type=int, default=8, help="responses per prompt: training, behavior and validation rollouts")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature for training, behavior and test")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4,
                   help="the lowest of 1e-5, 3e-5, 1e-4 at which 6 steps changed the model (benchmarks/README.md)")
    p.add_argument("--alpha", type=float, default=0.1, help="subset share of the pool per phase (not full)")
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--steps-per-phase", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="prompts per global step")
    p.add_argument("--micro-batch", type=int, default=16, help="rows per training micro-batch")
    p.add_argument("--eval-steps", type=int, default=4, help="evaluate at step 0 and every this many steps")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per test prompt")
    a = p.parse_args(argv)
    a.out = a.out.resolve()
    check_settings(a)
    data = write_data(a.out, a)
    from openrlhf_cropi.models.smollm2 import build_smollm2

    model = str(build_smollm2(a.model))
    for seed in a.seeds:
        run_seed(a, model, data, seed)
    command = "python benchmarks/real_curriculum.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(a, data, command))
    print(f"wrote {a.out / 'report.md'}")


if __name__ == "__main__":
    main()
