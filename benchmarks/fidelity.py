"""Fidelity: rankings from projected influence vs exact full-gradient cosines, on a tiny model.

    python benchmarks/fidelity.py [--hidden 256] [--layers 4] [--pool 300] [--val 40] [--k 8]
                                  [--proj-dim 32768] [--seeds 3] [--kinds sjlt,gaussian,rademacher] [--batch 32]

A random tiny Qwen2 (the behavior policy beta) samples K responses per prompt; a reward rule
that depends on the prompt and the response gives rewards that vary within groups. The
influence is scored at a perturbed checkpoint theta != beta (importance ratios != 1), as in a
later CROPI phase. Exact scores: cos(g_s, mean_q g_q) over all parameters. Projected scores:
the same with every projector at every keep ratio. Reported per (keep ratio, projector),
averaged over projection seeds: precision@10% (overlap of the two top-10% sets among prompts
with reward variance) and Spearman correlation of the two score vectors. "kept only" is the
exact cosine restricted to the kept coordinates (no sketch): it separates the effect of
dropping coordinates from the effect of the d-dimensional sketch.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from openrlhf_cropi.core.advantages import zero_variance
from openrlhf_cropi.core.gradients import behavior_log_probs, causal_lm_log_prob_fn, prompt_gradient
from openrlhf_cropi.core.projection import SparseProjector

KEEP_RATIOS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.01)
KINDS = ("sjlt", "gaussian", "rademacher")
VOCAB, CLASSES = 512, 8


def tiny_policy(hidden: int, layers: int, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64), head_dim=32,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float().eval()


def rollouts(model, n: int, k: int, gen: torch.Generator):
    """n prompts of a random class c; reward 1 iff the response has enough tokens = c (mod CLASSES)."""
    out = []
    for _ in range(n):
        c = int(torch.randint(CLASSES, (1,), generator=gen))
        length = int(torch.randint(6, 16, (1,), generator=gen))
        prompt = torch.cat([torch.tensor([c]), torch.randint(CLASSES, VOCAB, (length,), generator=gen)])
        need = int(torch.randint(1, 4, (1,), generator=gen))
        with torch.no_grad():
            seqs = model.generate(prompt.repeat(k, 1), do_sample=True, max_new_tokens=24, min_new_tokens=4,
                                  pad_token_id=0, eos_token_id=None, top_k=0)
        responses = [s[len(prompt):] for s in seqs]
        rewards = [float(int(((r % CLASSES) == c).sum()) >= need) for r in responses]
        out.append((prompt, responses, rewards))
    return out


def gradient_batches(model, data, max_tokens: int, batch: int):
    """Exact flattened g_s of the prompts, ``batch`` at a time: [b, total_params] tensors."""
    fn, params = causal_lm_log_prob_fn(model), list(model.parameters())
    for start in range(0, len(data), batch):
        rows = []
        for prompt, responses, rewards, behavior in data[start : start + batch]:
            grads = prompt_gradient(fn, params, prompt, responses, rewards, behavior, max_tokens, "cpu")
            rows.append(torch.cat([g.flatten() for g in grads]))
        yield torch.stack(rows)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def precision_at(a: torch.Tensor, b: torch.Tensor, frac: float = 0.1) -> float:
    n = max(1, round(frac * len(a)))
    return len(set(a.topk(n).indices.tolist()) & set(b.topk(n).indices.tolist())) / n


def cosines(vectors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(vectors.double(), target.double().expand(len(vectors), -1), dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Qwen2 (multiple of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pool", type=int, default=300)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--proj-dim", type=int, default=32768)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS), help="projectors to compare (comma-separated)")
    p.add_argument("--batch", type=int, default=32, help="training gradients held (and projected) at once")
    a = p.parse_args()
    kinds = tuple(a.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        p.error(f"--kinds: choose from {KINDS}")

    t0 = time.perf_counter()
    beta = tiny_policy(a.hidden, a.layers, 0)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # model.generate samples from the global generator
    fn, max_tokens = causal_lm_log_prob_fn(beta), 4096
    data = {}
    for split, n in (("train", a.pool), ("val", a.val)):
        items = [r for r in rollouts(beta, n, a.k, gen) if not bool(zero_variance(r[2]))]
        data[split] = [(pr, rs, rw, behavior_log_probs(fn, pr, rs, max_tokens, "cpu")) for pr, rs, rw in items]
    theta = tiny_policy(a.hidden, a.layers, 0)  # a later checkpoint: beta plus a small perturbation
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for w in theta.parameters():
            w.add_(0.02 * w.std() * torch.randn(w.shape, generator=g))
    total = sum(w.numel() for w in theta.parameters())
    # The validation vector is linear in the gradients: P(mean g) = mean(P g).
    target = sum(g.double().sum(0) for g in gradient_batches(theta, data["val"], max_tokens, a.batch)) / len(data["val"])
    configs = [(keep, kind, seed) for keep in KEEP_RATIOS for kind in ("kept only",) + kinds for seed in range(a.seeds)]
    projectors, targets, exact, scores = {}, {}, [], {c: [] for c in configs}
    for keep, kind, seed in configs:
        proj = SparseProjector(total, keep, a.proj_dim, "sjlt" if kind == "kept only" else kind, seed)
        if kind == "kept only":
            projectors[keep, kind, seed] = proj.kept_local_indices(0, total)
            targets[keep, kind, seed] = target[projectors[keep, kind, seed]]
        else:
            projectors[keep, kind, seed] = proj
            targets[keep, kind, seed] = proj.project_chunk(target.float(), 0)
    # Training gradients stream through in batches: a dense projector's matrix is generated
    # once per batch, and memory holds one batch of full gradients.
    for grads in gradient_batches(theta, data["train"], max_tokens, a.batch):
        exact.append(cosines(grads, target))
        for c in configs:
            proj = projectors[c]
            vectors = grads[:, proj] if c[1] == "kept only" else proj.project_chunk(grads, 0)
            scores[c].append(cosines(vectors, targets[c]))
    exact = torch.cat(exact)
    print(f"tiny Qwen2 (hidden {a.hidden}, {a.layers} layers): {total:,} parameters; pool {a.pool} prompts "
          f"({len(exact)} with reward variance, ranked), validation {a.val} ({len(data['val'])} with variance), "
          f"K = {a.k}, d = {a.proj_dim}, {a.seeds} projection seeds; {time.perf_counter() - t0:.0f} s")
    # A sketch perturbs each cosine by about 1/sqrt(d): rankings survive when that is small
    # against the spread of the exact cosines.
    print(f"exact cosines: std {exact.std():.4f}, 10-90% range [{exact.quantile(0.1):.4f}, {exact.quantile(0.9):.4f}]; "
          f"1/sqrt(d) = {a.proj_dim ** -0.5:.4f}")

    rows = []
    for keep in KEEP_RATIOS:
        row = {}
        for kind in ("kept only",) + kinds:
            runs = [torch.cat(scores[keep, kind, seed]) for seed in range(a.seeds)]
            row[kind] = (sum(precision_at(exact, r) for r in runs) / a.seeds, sum(spearman(exact, r) for r in runs) / a.seeds)
        rows.append((keep, row))

    header = "| keep | " + " | ".join(f"{k} P@10% | {k} Spearman" for k in ("kept only",) + kinds) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * (1 + len(kinds))))
    for keep, row in rows:
        cells = " | ".join(f"{row[k][0]:.2f} | {row[k][1]:.3f}" for k in ("kept only",) + kinds)
        print(f"| {keep:g} | {cells} |")
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
