"""Fidelity on real gradients: SmolLM2-135M-Instruct, its own sampled responses, math-verify rewards.

    python benchmarks/fidelity_real.py --out runs/fidelity-smollm2
        [--pool 240] [--val 40] [--k 8] [--temperature 0.5] [--max-new-tokens 96]
        [--proj-dim 32768] [--seeds 3] [--keep-ratios 1 0.5 0.2 0.15 0.1 0.05 0.01 0.001]

The sparse-projection claim (cropi-method.md section 3: keeping ~10% of the gradient
coordinates before projecting preserves the influence ranking far better than projecting all
of them) checked on a real pretrained model instead of a random tiny one. Stages, each resumed
from what --out holds (rerun the same command after an interruption; other settings are refused):

1. rollouts: arithmetic and word problems (pool: seven kinds; validation: additions), K
   responses each from SmolLM2 on vLLM (CPU) at --temperature, rewarded by
   openrlhf_cropi/rewards/math_verify.py through OpenRLHF's contract (query = decoded prompt +
   response with the chat template). rollouts-{pool,val}.jsonl, written chunk by chunk.
2. validation gradient: the exact mean policy gradient of the validation prompts that have
   reward variance (float64 sum, checkpointed every --checkpoint-every prompts).
3. pool: for every pool prompt with reward variance, streamed parameter by parameter as
   autograd produces it (no full gradient is ever held): the exact cosine of its full gradient
   with the validation mean; for every keep ratio and projection seed, the cosine of the
   sjlt-projected vectors (d = --proj-dim) and the exact cosine on the kept coordinates alone
   ("kept only": separates dropping from sketching). One JSON line per prompt.
4. report: precision@10% and Spearman of each ranking against the exact one (mean over the
   seeds), projection time per prompt; report.md, precision.png (with the paper's 1.5B points).

Influence is taken at theta = beta, the initial policy, as in every CROPI run's first phase:
rho = 1 and g_s is the plain GRPO policy gradient (group-normalised advantages, token mean per
response, mean over responses). The weights are SmolLM2's GGUF (4-bit) dequantised to float32
(openrlhf_cropi.models.smollm2), not the original bf16 release.

Memory: the model and one prompt's forward+backward (about 2 GB), the validation mean (float32,
0.54 GB; its float64 sum in stage 2, 1.1 GB), the projectors' cached layouts (8 bytes per kept
coordinate: 1.6 GB per seed for the default keep ratios) and one keep level per coordinate and
seed (0.13 GB per seed): about 8 GB at --seeds 3.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fidelity import precision_at, spearman  # the same measures as the tiny-model benchmark
from openrlhf_cropi.core.advantages import group_advantages, zero_variance
from openrlhf_cropi.core.gradients import causal_lm_log_prob_fn, pack_micro_batch, stream_gradients, surrogate_objective
from openrlhf_cropi.core.projection import SparseProjector

ROOT = Path(__file__).resolve().parents[1]
REWARD = ROOT / "openrlhf_cropi/rewards/math_verify.py"
KEEP_RATIOS = (1.0, 0.5, 0.2, 0.15, 0.1, 0.05, 0.01, 0.001)
# cropi-method.md section 3, the paper's sweep on a 1.5B model with a dense projector:
# precision@10% about 0.13 with no dropping, about 0.70-0.80 keeping 10-15% of the coordinates.
PAPER = {"no dropping": (1.0, 0.13), "keep 0.10-0.15": ((0.10, 0.15), (0.70, 0.80))}
NAMES = ["Tom", "Sara", "Ali", "Mia", "Ken", "Lea"]
ITEMS = ["apples", "pens", "stickers", "books", "coins", "cards"]
GEN_CHUNK = 32  # prompts per vLLM call: at most this much generation is lost on interruption


# ---- problems ------------------------------------------------------------------------------


def problems(n: int, kinds: tuple[str, ...], rng: random.Random) -> list[dict]:
    """n distinct problems with integer answers, kinds drawn uniformly."""
    out, seen = [], set()
    while len(out) < n:
        kind = rng.choice(kinds)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        prompt, label = {
            "add": (f"What is {a} + {b}?", a + b),
            "sub": (f"What is {a + b} - {b}?", a),
            "mul": (f"What is {a % 12 + 2} * {b % 9 + 2}?", (a % 12 + 2) * (b % 9 + 2)),
            "cmp": (f"Which is larger, {a} or {b}?", max(a, b)),
            "word_add": (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b),
            "word_sub": (f"{name} had {a + b} {item} and gave away {b}. How many {item} are left?", a),
            "word_mul": (f"A box holds {b % 9 + 2} {item}. How many {item} are in {a % 12 + 2} boxes?",
                         (b % 9 + 2) * (a % 12 + 2)),
        }[kind]  # fmt: skip
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "label": str(label), "kind": kind})
    return out


# ---- stage 1: rollouts ---------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def generate(model: str, todo: dict[str, list[dict]], out: Path, a: argparse.Namespace) -> None:
    """K responses per prompt on vLLM and their rewards, appended per chunk (runs in a child process)."""
    import importlib.util

    # vLLM's CPU backend sizes its KV cache from this (GiB), else it reserves 92% of the RAM.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # vLLM's CPU worker runs on one thread unless told otherwise; this process only waits.
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from vllm import LLM, SamplingParams

    spec = importlib.util.spec_from_file_location("reward_func", REWARD)  # as OpenRLHF loads --reward.remote_url
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, seed=a.seed)
    tok = llm.get_tokenizer()
    bar = tqdm(total=sum(map(len, todo.values())), desc="rollouts", unit="prompt")
    for split, rows in todo.items():
        for start in range(0, len(rows), GEN_CHUNK):
            chunk = rows[start : start + GEN_CHUNK]
            texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) for r in chunk]  # fmt: skip
            ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            # No per-request seed: vLLM's CPU sampler cannot rewind a request's own generator when a
            # prefill is split ("CPU Generator does not use offset"); the engine is seeded instead.
            params = SamplingParams(n=a.k, temperature=a.temperature, max_tokens=a.max_new_tokens, skip_special_tokens=False)
            outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
            done = []
            for r, text, p, o in zip(chunk, texts, ids, outs):
                responses = [list(c.token_ids) for c in o.outputs]
                queries = [tok.decode(p + resp, skip_special_tokens=False) for resp in responses]
                rewards = reward.reward_func(queries, [text] * len(queries), [r["label"]] * len(queries))["rewards"]
                done.append({**r, "prompt_ids": p, "responses": responses, "rewards": rewards.tolist()})
            append_jsonl(out / f"rollouts-{split}.jsonl", done)
            bar.update(len(chunk))


def ensure_rollouts(model: str, out: Path, a: argparse.Namespace) -> dict[str, list[dict]]:
    rng = random.Random(a.seed)
    wanted = {"pool": problems(a.pool, ("add", "sub", "mul", "cmp", "word_add", "word_sub", "word_mul"), rng)}
    taken = {r["prompt"] for r in wanted["pool"]}
    wanted["val"] = [r for r in problems(a.val + a.pool, ("add", "word_add"), rng) if r["prompt"] not in taken][: a.val]
    for split, rows in wanted.items():
        for i, r in enumerate(rows):
            r["index"] = i
    have = {split: {r["index"] for r in read_jsonl(out / f"rollouts-{split}.jsonl")} for split in wanted}
    todo = {split: [r for r in rows if r["index"] not in have[split]] for split, rows in wanted.items()}
    if any(todo.values()):
        # vLLM in a child process: its engine and KV cache are gone before the gradients start.
        child = multiprocessing.get_context("spawn").Process(target=generate, args=(model, todo, out, a))
        child.start()
        child.join()
        if child.exitcode != 0:
            sys.exit(f"rollout generation failed (exit code {child.exitcode}); rerun to resume")
    return {split: sorted(read_jsonl(out / f"rollouts-{split}.jsonl"), key=lambda r: r["index"]) for split in wanted}


# ---- gradients -----------------------------------------------------------------------------


def gradient_stream(model, row: dict, on_gradient) -> None:
    """g_s of one prompt at theta = beta (rho = 1), one parameter at a time: on_gradient(i, grad).

    All K responses go through one forward: the per-parameter gradients are then the whole
    g_s, which the squared norms of stage 3 need (a sum over micro-batches would not do)."""
    log_prob_fn = causal_lm_log_prob_fn(model)
    responses = [torch.tensor(r) for r in row["responses"]]
    ids, attn, act = pack_micro_batch(torch.tensor(row["prompt_ids"]), responses, "cpu")
    log_probs = log_prob_fn(ids, attn, act)
    adv = group_advantages(torch.tensor(row["rewards"]))
    # Behavior = the policy's own log-probs, detached: rho = 1 exactly, the phase-0 gradient.
    objective = surrogate_objective(log_probs, log_probs.detach(), act, adv / len(responses))
    stream_gradients(objective, list(model.parameters()), on_gradient)


def validation_mean(model, rows: list[dict], out: Path, every: int) -> torch.Tensor:
    final, partial = out / "val-gradient.pt", out / "val-gradient.partial.pt"
    if final.exists():
        return torch.load(final)["mean"]
    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    state = torch.load(partial) if partial.exists() else {"sum": torch.zeros(offsets[-1], dtype=torch.float64), "done": []}
    todo = [r for r in rows if r["index"] not in state["done"]]

    def add(i: int, grad: torch.Tensor) -> None:
        state["sum"][offsets[i] : offsets[i + 1]] += grad.reshape(-1)

    for n, row in enumerate(tqdm(todo, desc="validation gradients", unit="prompt"), 1):
        gradient_stream(model, row, add)
        state["done"].append(row["index"])
        if n % every == 0 or n == len(todo):
            torch.save(state, partial.with_suffix(".tmp"))
            os.replace(partial.with_suffix(".tmp"), partial)
    mean = (state["sum"] / len(state["done"])).float()
    torch.save({"mean": mean}, final)
    partial.unlink()
    return mean


def keep_levels(total: int, keeps: list[float], seed: int) -> torch.Tensor:
    """uint8 [total]: for each coordinate the index (in ascending ``keeps``) of the smallest keep
    ratio whose projector (this seed) keeps it. Kept sets are nested (one hash, growing
    thresholds), so the kept set of keeps[j] is exactly {level <= j}: checked here."""
    level = torch.full((total,), len(keeps) - 1, dtype=torch.uint8)
    sizes = {}
    for j in reversed(range(len(keeps) - 1)):  # the largest ratio, 1, keeps everything
        kept = SparseProjector(total, keeps[j], 1, "sjlt", seed).kept_local_indices(0, total)
        level[kept] = j
        sizes[j] = len(kept)
    counts = torch.bincount(level, minlength=len(keeps)).cumsum(0)
    if any(int(counts[j]) != sizes[j] for j in sizes):
        raise RuntimeError("the projector's kept sets are not nested across keep ratios")
    return level


def score_pool(model, rows: list[dict], target: torch.Tensor, out: Path, a: argparse.Namespace) -> None:
    keeps = sorted(a.keep_ratios)
    seeds = list(range(a.seeds))
    total = target.numel()
    path = out / "pool-scores.jsonl"
    done = {r["index"] for r in read_jsonl(path)}
    todo = [r for r in rows if r["index"] not in done]
    if not todo:
        return
    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    levels = {s: keep_levels(total, keeps, s) for s in tqdm(seeds, desc="kept sets", unit="seed")}
    projectors = {(k, s): SparseProjector(total, k, a.proj_dim, "sjlt", s) for k in keeps for s in seeds}
    t_squared = target.double().square()
    target_levels = {s: torch.bincount(levels[s], weights=t_squared, minlength=len(keeps)) for s in seeds}
    tt = t_squared.sum()
    del t_squared
    # Projected parameter by parameter, as the gradients are below: the layouts cached here
    # (one per parameter slice) are the ones every pool prompt reuses.
    targets = {}
    for c, proj in tqdm(projectors.items(), desc="layouts", unit="projector"):
        acc = proj.accumulator()
        for i in range(len(params)):
            proj.accumulate(acc, target[offsets[i] : offsets[i + 1]], offsets[i])
        targets[c] = proj.finish(acc)

    for row in tqdm(todo, desc="pool gradients", unit="prompt"):
        acc = {c: proj.accumulator() for c, proj in projectors.items()}
        dots = {s: torch.zeros(len(keeps), dtype=torch.float64) for s in seeds}
        norms = {s: torch.zeros(len(keeps), dtype=torch.float64) for s in seeds}
        proj_seconds = {k: 0.0 for k in keeps}
        exact = torch.zeros(2, dtype=torch.float64)  # <g, t>, |g|^2

        def consume(i: int, grad: torch.Tensor) -> None:
            o, g = offsets[i], grad.reshape(-1)
            gt, gg = g.double() * target[o : o + g.numel()].double(), g.double().square()
            exact.add_(torch.stack([gt.sum(), gg.sum()]))
            for s in seeds:
                level = levels[s][o : o + g.numel()]
                dots[s] += torch.bincount(level, weights=gt, minlength=len(keeps))
                norms[s] += torch.bincount(level, weights=gg, minlength=len(keeps))
            for (k, s), proj in projectors.items():
                t0 = time.perf_counter()
                proj.accumulate(acc[k, s], g, o)
                proj_seconds[k] += time.perf_counter() - t0

        t0 = time.perf_counter()
        gradient_stream(model, row, consume)
        seconds = time.perf_counter() - t0

        def cos(dot, gg, tt) -> float:
            return float(dot / (gg.sqrt() * tt.sqrt()))

        record = {
            "index": row["index"],
            "exact": cos(exact[0], exact[1], tt),
            # [keep][seed], keeps ascending; kept-only sums the levels up to that keep ratio.
            "kept_only": [[cos(dots[s][: j + 1].sum(), norms[s][: j + 1].sum(), target_levels[s][: j + 1].sum())
                           for s in seeds] for j in range(len(keeps))],  # fmt: skip
            "sketch": [[float(torch.nn.functional.cosine_similarity(projectors[k, s].finish(acc[k, s]), targets[k, s], dim=0))
                        for s in seeds] for k in keeps],  # fmt: skip
            "seconds": seconds,
            "projection_seconds": [proj_seconds[k] / len(seeds) for k in keeps],  # per seed
            "tokens": sum(len(r) for r in row["responses"]) + len(row["responses"]) * len(row["prompt_ids"]),
        }
        append_jsonl(path, [record])


# ---- report --------------------------------------------------------------------------------


def report(out: Path, a: argparse.Namespace, rollouts: dict, val_used: int, command: str) -> str:
    keeps = sorted(a.keep_ratios)
    records = sorted(read_jsonl(out / "pool-scores.jsonl"), key=lambda r: r["index"])
    exact = torch.tensor([r["exact"] for r in records], dtype=torch.float64)
    rows = []
    for j, keep in enumerate(keeps):
        row = {"keep": keep}
        for kind in ("kept_only", "sketch"):
            runs = [torch.tensor([r[kind][j][s] for r in records], dtype=torch.float64) for s in range(a.seeds)]
            row[kind] = (sum(precision_at(exact, x) for x in runs) / a.seeds, sum(spearman(exact, x) for x in runs) / a.seeds)
        row["ms"] = 1000 * sum(r["projection_seconds"][j] for r in records) / len(records)
        rows.append(row)
    seconds = sum(r["seconds"] for r in records) / len(records)
    tokens = sum(r["tokens"] for r in records) / len(records)
    hook_ms = sum(sum(r["projection_seconds"]) for r in records) / len(records) * a.seeds * 1000
    pool, val = rollouts["pool"], rollouts["val"]
    rates = torch.tensor([sum(r["rewards"]) / len(r["rewards"]) for r in pool])
    lines = [
        f"    {command}",
        "",
        f"Pool {len(pool)} prompts (mean pass rate {rates.mean():.2f}; {len(records)} with reward variance, ranked), "
        f"validation {len(val)} ({val_used} with variance, their exact mean gradient is the reference), "
        f"K = {a.k} responses at temperature {a.temperature}, d = {a.proj_dim}, {a.seeds} projection seed(s), sjlt; "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads.",
        "",
        f"exact cosines: std {exact.std():.4f}, 10-90% range [{exact.quantile(0.1):.4f}, {exact.quantile(0.9):.4f}]; "
        f"1/sqrt(d) = {a.proj_dim ** -0.5:.4f}. Per prompt {seconds:.1f} s in all (forward + backward of the K "
        f"responses, {tokens:.0f} tokens with the prompt repeated; the exact references; all {len(keeps) * a.seeds} "
        f"projections), of which projections {hook_ms / 1000:.1f} s.",
        "",
        "| keep | kept only P@10% | kept only Spearman | sjlt P@10% | sjlt Spearman | sjlt projection ms / prompt |",
        "|---|---|---|---|---|---|",
    ]
    for row in reversed(rows):
        ko, sk = row["kept_only"], row["sketch"]
        lines.append(f"| {row['keep']:g} | {ko[0]:.2f} | {ko[1]:.3f} | {sk[0]:.2f} | {sk[1]:.3f} | {row['ms']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "ranked": len(records)}, indent=1))
    plot(out / "precision.png", rows, len(records), a)
    return text


def plot(path: Path, rows: list[dict], ranked: int, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = [r["keep"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(keeps, [r["sketch"][0] for r in rows], "o-", label=f"SmolLM2-135M, keep then sjlt (d = {a.proj_dim})")
    ax.plot(keeps, [r["kept_only"][0] for r in rows], "s--", label="SmolLM2-135M, kept coordinates only (no sketch)")
    (x1, y1), ((xa, xb), (ya, yb)) = PAPER["no dropping"], PAPER["keep 0.10-0.15"]
    ax.plot([x1], [y1], "k^", label="paper, 1.5B, dense projection")
    ax.fill_between([xa, xb], ya, yb, color="k", alpha=0.25, label="paper, 1.5B, keep 10-15%")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of gradient coordinates kept")
    ax.set_ylabel("precision@10% vs exact full-gradient ranking")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Top-10% precision, {ranked} ranked prompts, mean of {a.seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- main ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results and resume state")
    p.add_argument("--model", type=Path, default=ROOT / "runs/cache/smollm2", help="built if missing")
    p.add_argument("--pool", type=int, default=240)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--k", type=int, default=8, help="responses per prompt")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (the reference code's)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--proj-dim", type=int, default=32768)
    p.add_argument("--seeds", type=int, default=3, help="projection seeds averaged")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=list(KEEP_RATIOS))
    p.add_argument("--seed", type=int, default=0, help="problems and sampling")
    p.add_argument("--checkpoint-every", type=int, default=8, help="validation prompts between checkpoints")
    a = p.parse_args()
    if 1.0 not in a.keep_ratios or not all(0 < k <= 1 for k in a.keep_ratios):
        p.error("--keep-ratios: values in (0, 1], including 1 (plain projection)")
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "model", "checkpoint_every")}
    settings_file = a.out / "settings.json"
    if settings_file.exists() and (old := json.loads(settings_file.read_text())) != settings:
        changed = [f"--{k.replace('_', '-')} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v]
        p.error(f"{a.out} holds a run made with {', '.join(changed)}: use those settings or another --out")
    settings_file.write_text(json.dumps(settings, indent=1))

    from openrlhf_cropi.models.smollm2 import build_smollm2

    model_dir = str(build_smollm2(a.model))
    t0 = time.perf_counter()
    rollouts = ensure_rollouts(model_dir, a.out, a)
    print(f"rollouts ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    usable = {split: [r for r in rows if not bool(zero_variance(torch.tensor(r["rewards"])))] for split, rows in rollouts.items()}
    if not usable["val"] or len(usable["pool"]) < 10:
        sys.exit(f"too few prompts with reward variance: {len(usable['pool'])} pool, {len(usable['val'])} validation")
    target = validation_mean(model, usable["val"], a.out, a.checkpoint_every)
    score_pool(model, usable["pool"], target, a.out, a)
    command = "python benchmarks/fidelity_real.py " + " ".join(sys.argv[1:])
    print(report(a.out, a, rollouts, len(usable["val"]), command), end="")
    print(f"total {time.perf_counter() - t0:.0f} s in this invocation")


if __name__ == "__main__":
    main()
