"""Would batching several prompts into one backward make the demo's per-prompt gradients cheaper?

    python benchmarks/batching.py [--prompts 16] [--batches 1 2 4 8 16]

On the demo's model shape (3.4M parameters, 4 blocks; random weights) and demo-like rollouts
(25-token prompts, K = 8 responses of 2-7 tokens, half of them copies), side by side:

- the one-prompt path (``projected_gradient``, sjlt keep 0.1, d = 32768), as the job runs it:
  its rows packed onto one copy of the prompt (``causal_lm_log_prob_fn``'s ``share_prompt``),
  and as it ran before, whole padded rows that each repeat the prompt;
- B prompts in one forward (rows left-padded to a common prompt length) and one backward of
  their B objectives with ``torch.autograd.grad(..., is_grads_batched=True)``, which gives each
  prompt's own gradient (checked against the one-prompt path: max relative error printed), then
  projected as a batch;
- the float32 matmul rate of a [rows, 256] x [256, 768] product (the model's MLP) at several row
  counts: whether the one-prompt path's small matrices leave the CPU idle.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from openrlhf_cropi.core.advantages import Objective
from openrlhf_cropi.core.gradients import behavior_log_probs, causal_lm_log_prob_fn, projected_gradient
from openrlhf_cropi.core.projection import SparseProjector
from openrlhf_cropi.demo.warm_start import MODEL_SHAPE
from openrlhf_cropi.tiny_model import build_tiny_model

OBJECTIVE = Objective(loss_agg_mode="token-mean")  # the demo's


def rollouts(fn, n: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        prompt = torch.randint(3, 400, (25,), generator=gen)
        distinct = [torch.randint(3, 400, (2 + k,), generator=gen) for k in range(4)]
        responses = [distinct[k % 4].clone() for k in range(8)]
        rewards = torch.tensor([float(k % 4 < 2) for k in range(8)])
        items.append((prompt, responses, rewards, behavior_log_probs(fn, prompt, responses, 4096, "cpu")))
    return items


def batched(fn, params, projector, items) -> torch.Tensor:
    """[B, d]: one forward of every row of the B prompts, one batched backward of their objectives."""
    rows = [(p, k) for p, it in enumerate(items) for k in range(len(it[1]))]
    width_p = max(len(it[0]) for it in items)
    width_a = max(len(r) for it in items for r in it[1])
    ids = torch.zeros(len(rows), width_p + width_a, dtype=torch.long)
    attn = torch.zeros_like(ids)
    act = torch.zeros(len(rows), width_a, dtype=torch.bool)
    beh, weights, owner = torch.zeros(len(rows), width_a), torch.zeros(len(rows)), torch.zeros(len(rows), dtype=torch.long)
    for r, (p, k) in enumerate(rows):
        prompt, responses, rewards, behavior = items[p]
        n, m = len(prompt), len(responses[k])
        ids[r, width_p - n : width_p], attn[r, width_p - n : width_p + m] = prompt, 1
        ids[r, width_p : width_p + m], act[r, :m], beh[r, :m] = responses[k], True, behavior[k]
        weights[r], owner[r] = OBJECTIVE.weights(rewards, [len(x) for x in responses])[k], p
    log_ratio = (fn(ids, attn, act) - beh).masked_fill(~act, 0.0)
    per_row = weights * (torch.exp(log_ratio) * act).sum(-1) / act.sum(-1)
    objectives = torch.zeros(len(items)).index_add(0, owner, per_row)
    grads = torch.autograd.grad(objectives, params, grad_outputs=torch.eye(len(items)), is_grads_batched=True)
    acc, offset = projector.accumulator((len(items),)), 0
    for g, p in zip(grads, params):
        projector.accumulate(acc, g.reshape(len(items), -1), offset)
        offset += p.numel()
    return projector.finish(acc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp, seed=0, **MODEL_SHAPE)).eval()
    params = list(model.parameters())
    fn = causal_lm_log_prob_fn(model, share_prompt=False)  # whole rows (batched rows hold several prompts)
    shared = causal_lm_log_prob_fn(model)
    items = rollouts(fn, a.prompts)
    projector = SparseProjector(sum(p.numel() for p in params), 0.1, 32768)
    one = lambda fn: torch.stack([projected_gradient(fn, params, projector, *it, 4096, "cpu", objective=OBJECTIVE)  # noqa: E731
                                  for it in items])  # fmt: skip
    reference = one(fn)  # also builds the projector's layout
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in params):,} parameters, {a.prompts} prompts\n")  # fmt: skip
    print("| path | ms / prompt | max relative error vs one-prompt |\n|---|---|---|")
    t0 = time.perf_counter()
    one(fn)
    print(f"| one prompt per backward, whole rows (the job's before) | {1000 * (time.perf_counter() - t0) / a.prompts:.1f} | - |")
    for _ in range(2):  # the second is the one to read: the first warms the packed path's shapes up
        t0 = time.perf_counter()
        got = one(shared)
        ms = 1000 * (time.perf_counter() - t0) / a.prompts
    error = ((got - reference).norm(dim=-1) / reference.norm(dim=-1)).max()
    print(f"| one prompt per backward, rows on one shared prompt (the job's) | {ms:.1f} | {error:.1e} |")
    for b in a.batches:
        t0 = time.perf_counter()
        got = torch.cat([batched(fn, params, projector, items[i : i + b]) for i in range(0, a.prompts, b)])
        ms = 1000 * (time.perf_counter() - t0) / a.prompts
        error = ((got - reference).norm(dim=-1) / reference.norm(dim=-1)).max()
        print(f"| {b} prompts per batched backward | {ms:.1f} | {error:.1e} |")
    print("\n| rows x 256 @ 256 x 768 | GFLOP/s |\n|---|---|")
    w = torch.randn(768, 256)
    for rows in (32, 128, 512, 2048):
        x = torch.randn(rows, 256)
        n = max(3, 20000 // rows)
        torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(n):
            torch.nn.functional.linear(x, w)
        print(f"| {rows} | {2 * rows * 256 * 768 * n / (time.perf_counter() - t0) / 1e9:.0f} |")


if __name__ == "__main__":
    main()
