"""Identical responses computed once: the demo's selection pass with and without its copies.

    python benchmarks/copies.py [--store runs/demo/influence/ckpt/cropi/rollouts/pool] [--prompts 80]

Reads a demo run's pool rollouts (``bash launch/local/demo.sh`` writes them) and the shipped
warm start, and times the projected off-policy gradient of the first ``--prompts`` prompts
with reward variance two ways, taking turns: as stored (each distinct response one row, its
copies' advantages summed) and with every copy made distinct by changing its last token (one
row per response, what the gradient cost before copies were merged; same lengths, so the same
padding). Prints the share of copies, rows per prompt, seconds per prompt and the ratio, next
to the CPU capability and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from openrlhf_cropi.core.advantages import first_copies
from openrlhf_cropi.core.gradients import causal_lm_log_prob_fn, projected_gradient
from openrlhf_cropi.core.projection import SparseProjector
from openrlhf_cropi.core.store import RolloutStore

ROOT = Path(__file__).resolve().parents[1]


def without_copies(responses: list[torch.Tensor], vocab: int) -> list[torch.Tensor]:
    """Each copy's last token moved until no two responses are identical (lengths kept)."""
    out: list[torch.Tensor] = []
    for r in responses:
        r = r.clone()
        while any(torch.equal(r, o) for o in out):
            r[-1] = (r[-1] + 1) % vocab
        out.append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(ROOT / "runs/demo/influence/ckpt/cropi/rollouts/pool"))
    parser.add_argument("--model", default=str(ROOT / "launch/local/demo-warm-start"))
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    params = [p for p in model.parameters() if p.requires_grad]
    projector = SparseProjector(sum(p.numel() for p in params), keep_ratio=0.1, proj_dim=8192)
    log_prob_fn = causal_lm_log_prob_fn(model)
    records = [r for r in RolloutStore(a.store) if r.behavior_logprobs is not None][: a.prompts]
    if not records:
        raise SystemExit(f"{a.store}: no teacher-forced prompts (run launch/local/demo.sh first)")
    vocab = model.config.vocab_size
    variants = {
        "copies merged": [(r, r.responses) for r in records],
        "one row each": [(r, without_copies(r.responses, vocab)) for r in records],
    }
    rows = {name: sum(len(set(first_copies(resp))) for _, resp in v) / len(records) for name, v in variants.items()}

    def run(items) -> float:
        t = time.perf_counter()
        for r, responses in items:
            projected_gradient(log_prob_fn, params, projector, r.prompt_ids, responses, r.rewards,
                               r.behavior_logprobs, 4096, "cpu")  # fmt: skip
        return (time.perf_counter() - t) / len(items)

    run(variants["copies merged"][:5])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.repeats):
        for name, items in variants.items():
            times[name].append(run(items))
    k = statistics.mean(len(r.responses) for r in records)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"{len(records)} pool prompts with reward variance, K = {k:g}")  # fmt: skip
    for name in variants:
        print(f"  {name:14s} {rows[name]:.2f} rows per prompt, {statistics.median(times[name]) * 1e3:.1f} ms per prompt")
    ratio = statistics.median(times["one row each"]) / statistics.median(times["copies merged"])
    print(f"  copies: {1 - rows['copies merged'] / k:.0%} of the responses; merged / one row each: {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
