"""Cheaper gradients as a frontier: seconds per prompt against ranking fidelity, SmolLM2 real gradients.

    python benchmarks/frontier.py --out runs/frontier-smollm2
        [--pool 200] [--val 40] [--k 8] [--temperature 0.5] [--max-new-tokens 80]
        [--layers 1 2 4 8 15] [--caps 8 16 32] [--timing-prompts 6] [--cascade 2 3]

The reference is fidelity_real.py's: SmolLM2-135M-Instruct's own responses to arithmetic and
word problems (its rollouts, made here with the same generator and settings, or copied from a
fidelity_real --out), math-verify rewards, GRPO gradients at theta = beta, and the exact cosine of
each pool prompt's whole gradient with the validation prompts' mean gradient. Every cheaper
setting is ranked against it (precision@10% and Spearman over the prompts with reward variance):

- ``sjlt keep 0.1``: today's default (d = 32768, seed 0), the whole backward plus the projection;
- ``layers N``: the gradient of the top N blocks and the final norm only (--cropi.grad_layers N;
  SmolLM2's head is tied to the embedding, so it is left out), the exact cosine on those
  coordinates. The backward stops below the N blocks;
- ``cap T``: each response's first T tokens only (prompt and validation gradients alike);
- ``layers N + cap T``;
- ``cascade c: X``: the cheap setting X on every prompt, the exact score on its top c x 10%, the
  final top 10% among those by the exact score.

Cosines come from ONE backward per prompt and token cap: each parameter's dot product with the
target and squared norm are kept (pool-scores.jsonl), so any set of layers is scored offline. The
seconds per prompt come from separate timed passes (the setting's own backward, its dot products
or projection) on the first --timing-prompts pool prompts, settings interleaved; a cascade's is
its cheap setting's plus c x 0.1 x exact's. Every stage resumes from --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fidelity import precision_at, spearman
from fidelity_real import append_jsonl, ensure_rollouts, read_jsonl
from openrlhf_cropi.core.advantages import group_advantages, zero_variance
from openrlhf_cropi.core.exact import state_bytes
from openrlhf_cropi.core.gradients import (
    causal_lm_log_prob_fn,
    pack_micro_batch,
    stream_gradients,
    surrogate_objective,
    top_layers_parameters,
)
from openrlhf_cropi.core.projection import SparseProjector

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.1
FULL = 0  # token cap 0: whole responses


def capped(row: dict, cap: int) -> dict:
    return row if cap == FULL else {**row, "responses": [r[:cap] for r in row["responses"]]}


def backward(model, params, row: dict, on_gradient) -> None:
    """g_s at theta = beta (rho = 1) with respect to ``params``, streamed: on_gradient(i, grad)."""
    responses = [torch.tensor(r) for r in row["responses"]]
    ids, attn, act = pack_micro_batch(torch.tensor(row["prompt_ids"]), responses, "cpu")
    log_probs = causal_lm_log_prob_fn(model)(ids, attn, act)
    adv = group_advantages(torch.tensor(row["rewards"]))
    objective = surrogate_objective(log_probs, log_probs.detach(), act, adv / len(responses))
    stream_gradients(objective, params, on_gradient)


def validation_means(model, rows: list[dict], caps: list[int], out: Path) -> dict[int, list[torch.Tensor]]:
    """Per token cap: the validation prompts' mean gradient, one float32 tensor per parameter."""
    path = out / "val-gradients.pt"
    means = torch.load(path) if path.exists() else {}
    params = list(model.parameters())
    for cap in caps:
        if cap in means:
            continue
        total = [torch.zeros(p.numel(), dtype=torch.float64) for p in params]
        for row in tqdm(rows, desc=f"validation gradients, cap {cap or 'none'}", unit="prompt"):
            backward(model, params, capped(row, cap), lambda i, g: total[i].add_(g.reshape(-1)))
        means[cap] = [(t / len(rows)).float() for t in total]
        torch.save(means, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return means


def score_pool(model, rows: list[dict], means: dict, caps: list[int], out: Path, proj_dim: int) -> None:
    """pool-scores.jsonl: per prompt and cap, each parameter's <g, t> and |g|^2; for whole
    responses also the sjlt keep-0.1 cosine (today's default)."""
    path = out / "pool-scores.jsonl"
    done = {r["index"] for r in read_jsonl(path)}
    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    projector = SparseProjector(offsets[-1], 0.1, proj_dim, "sjlt", 0)
    acc = projector.accumulator()
    for i, t in enumerate(means[FULL]):
        projector.accumulate(acc, t, offsets[i])
    target = projector.finish(acc)
    for row in tqdm([r for r in rows if r["index"] not in done], desc="pool gradients", unit="prompt"):
        record = {"index": row["index"]}
        for cap in caps:
            dots, squares = torch.zeros(len(params), dtype=torch.float64), torch.zeros(len(params), dtype=torch.float64)
            acc = projector.accumulator()

            def consume(i: int, grad: torch.Tensor) -> None:
                g = grad.reshape(-1)
                dots[i], squares[i] = torch.dot(g.double(), means[cap][i].double()), torch.dot(g.double(), g.double())
                if cap == FULL:
                    projector.accumulate(acc, g, offsets[i])

            backward(model, params, capped(row, cap), consume)
            record[str(cap)] = {"dots": dots.tolist(), "squares": squares.tolist()}
            if cap == FULL:
                record["sjlt"] = float(torch.nn.functional.cosine_similarity(projector.finish(acc), target, dim=0))
        append_jsonl(path, [record])


def settings(layers: list[int], caps: list[int]) -> list[tuple[str, int, int]]:
    """(name, layers (0: all), cap (0: none)) of every setting scored exactly on a subset."""
    out = [("exact (projector none)", 0, FULL)]
    out += [(f"layers {n}", n, FULL) for n in layers]
    out += [(f"cap {c}", 0, c) for c in caps]
    out += [(f"layers {n} + cap {c}", n, c) for n in layers for c in caps]
    return out


def timings(model, rows: list[dict], means: dict, grid: list, out: Path, proj_dim: int) -> dict[str, float]:
    """Seconds per prompt of each setting's own pass, and of today's default, interleaved over prompts."""
    path = out / "timings.json"
    if path.exists():
        return json.loads(path.read_text())
    everything = list(model.parameters())
    projector = SparseProjector(sum(p.numel() for p in everything), 0.1, proj_dim, "sjlt", 0)
    offsets = [0]
    for p in everything:
        offsets.append(offsets[-1] + p.numel())
    position = {id(p): i for i, p in enumerate(everything)}
    subsets = {n: top_layers_parameters(model, n) for n in {n for _, n, _ in grid}}
    seconds: dict[str, float] = {}

    def default_pass(row):  # whole backward, sjlt keep 0.1 (the layout built once, before timing)
        acc = projector.accumulator()
        backward(model, everything, row, lambda i, g: projector.accumulate(acc, g.reshape(-1), offsets[i]))

    def exact_pass(n, cap):
        params = subsets[n]
        targets = [means[cap][position[id(p)]] for p in params]
        return lambda row: backward(model, params, capped(row, cap),
                                    lambda i, g: (torch.dot(g.reshape(-1), targets[i]), torch.dot(g.reshape(-1), g.reshape(-1))))  # fmt: skip

    passes = {"sjlt keep 0.1 (today's default)": default_pass, **{name: exact_pass(n, c) for name, n, c in grid}}
    default_pass(rows[0])  # warm-up; the projector's layout is cached from here on
    for k, row in enumerate(tqdm(rows, desc="timing", unit="prompt")):
        names = list(passes)
        for name in names[k % len(names):] + names[: k % len(names)]:  # rotated: no setting always first
            t0 = time.perf_counter()
            passes[name](row)
            seconds[name] = seconds.get(name, 0.0) + (time.perf_counter() - t0) / len(rows)
    path.write_text(json.dumps(seconds, indent=1))
    return seconds


def report(out: Path, model, rows_scored: list[dict], means: dict, grid: list, seconds: dict, a, command: str) -> str:
    params = list(model.parameters())
    position = {id(p): i for i, p in enumerate(params)}
    total = sum(p.numel() for p in params)
    tt = {cap: torch.tensor([float(torch.dot(t.double(), t.double())) for t in means[cap]]) for cap in means}

    def cosines(n: int, cap: int) -> torch.Tensor:
        mask = torch.zeros(len(params), dtype=torch.bool)
        mask[[position[id(p)] for p in top_layers_parameters(model, n)]] = True
        dots = torch.tensor([r[str(cap)]["dots"] for r in rows_scored])[:, mask].sum(1)
        squares = torch.tensor([r[str(cap)]["squares"] for r in rows_scored])[:, mask].sum(1)
        return dots / (squares * tt[cap][mask].sum()).sqrt()

    exact = cosines(0, FULL)
    default = seconds["sjlt keep 0.1 (today's default)"]
    fraction = {n: sum(p.numel() for p in top_layers_parameters(model, n)) / total for _, n, _ in grid}
    lines = [
        f"    {command}",
        "",
        f"{len(rows_scored)} pool prompts with reward variance ranked (SmolLM2-135M-Instruct, K = {a.k}, temperature "
        f"{a.temperature}, at most {a.max_new_tokens} new tokens); precision@10% and Spearman against the exact cosine "
        f"of the whole gradient; seconds per prompt over {a.timing_prompts} prompts; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads. State: bytes per model "
        "parameter held while scoring (exact: one validation set and the gradient buffer, on the scored coordinates).",
        "",
        "| setting | s / prompt | cheaper than today's default | P@10% | Spearman | state bytes / parameter |",
        "|---|---|---|---|---|---|",
    ]
    results = []

    def row(name, s, scores, state):
        p10, rho = precision_at(exact, scores), spearman(exact, scores)
        results.append({"setting": name, "seconds": s, "speedup": default / s, "precision_at_10": p10,
                        "spearman": rho, "state_bytes_per_parameter": state})  # fmt: skip
        lines.append(f"| {name} | {s:.2f} | {default / s:.1f}x | {p10:.2f} | {rho:.3f} | {state:.2f} |")

    row("sjlt keep 0.1 (today's default)", default, torch.tensor([r["sjlt"] for r in rows_scored]),
        SparseProjector(total, 0.1, a.proj_dim).state_bytes_per_parameter("cpu"))  # fmt: skip
    for name, n, cap in grid:
        row(name, seconds[name], cosines(n, cap), state_bytes(1, 1) * fraction[n])
    t_exact = seconds[grid[0][0]]
    for c in a.cascade:
        for name, n, cap in grid[1:]:
            cheap = cosines(n, cap)
            short = cheap.topk(min(len(cheap), round(c * ALPHA * len(cheap)))).indices
            scores = torch.full_like(exact, float("-inf"))
            scores[short] = exact[short]
            row(f"cascade {c}: {name}", seconds[name] + c * ALPHA * t_exact, scores, state_bytes(1, 1))
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    # With pool-scores.jsonl and the targets' per-parameter squared norms, every cosine above can be recomputed.
    (out / "results.json").write_text(json.dumps({"ranked": len(rows_scored), "rows": results, "seconds": seconds,
                                                  "target_squared_norms": {c: t.tolist() for c, t in tt.items()}}))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results and resume state")
    p.add_argument("--model", type=Path, default=ROOT / "runs/cache/smollm2", help="built if missing")
    p.add_argument("--pool", type=int, default=200)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--k", type=int, default=8, help="responses per prompt")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0, help="problems and sampling")
    p.add_argument("--proj-dim", type=int, default=32768, help="today's default projection")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 15])
    p.add_argument("--caps", type=int, nargs="+", default=[8, 16, 32], help="response tokens kept")
    p.add_argument("--timing-prompts", type=int, default=6)
    p.add_argument("--cascade", type=float, nargs="+", default=[2, 3], help="c: the exact score on the top c x 10%")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    settings_file = a.out / "settings.json"
    kept = {k: v for k, v in vars(a).items() if k in ("pool", "val", "k", "temperature", "max_new_tokens", "seed",
                                                       "proj_dim", "caps")}  # fmt: skip
    if settings_file.exists() and json.loads(settings_file.read_text()) != kept:
        p.error(f"{a.out} holds a run made with other settings ({settings_file}): use those or another --out")
    settings_file.write_text(json.dumps(kept, indent=1))

    from transformers import AutoModelForCausalLM

    from openrlhf_cropi.models.smollm2 import build_smollm2

    model_dir = str(build_smollm2(a.model))
    t0 = time.perf_counter()
    rollouts = ensure_rollouts(model_dir, a.out, a)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    usable = {s: [r for r in rows if not bool(zero_variance(torch.tensor(r["rewards"])))] for s, rows in rollouts.items()}
    caps = [FULL, *a.caps]
    means = validation_means(model, usable["val"], caps, a.out)
    score_pool(model, usable["pool"], means, caps, a.out, a.proj_dim)
    grid = settings(a.layers, a.caps)
    seconds = timings(model, usable["pool"][: a.timing_prompts], means, grid, a.out, a.proj_dim)
    scored = sorted(read_jsonl(a.out / "pool-scores.jsonl"), key=lambda r: r["index"])
    command = "python benchmarks/frontier.py " + " ".join(sys.argv[1:])
    print(report(a.out, model, scored, means, grid, seconds, a, command), end="")
    print(f"total {time.perf_counter() - t0:.0f} s in this invocation")


if __name__ == "__main__":
    main()
