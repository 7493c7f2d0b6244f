"""Selection against training per phase for the paper's recipes: a FLOP model, every assumption stated.

    python benchmarks/cost_model.py [--layers 4 8]

Per phase, on the same GPUs (equal model FLOP utilisation assumed for both, so time ratios are
FLOP ratios):

- training: --cropi.steps_per_phase 16 steps x 128 prompts x 8 responses (the recipes' settings)
  of mean length R = max_new_tokens / 2 (assumed) after a 256-token prompt (assumed): the
  old-policy forward (2N FLOPs per token), the reference model's forward for the KL loss (2N) and
  the training forward + backward with activation checkpointing (8N): 12N per token. vLLM
  generation comes on top; it is given as a share g of the training step (assumed 0.5: long-response
  GRPO typically spends about half its step generating), so training time = compute / (1 - g).
- selection: every pool prompt with reward variance (assumed half the pool: 46% on the demo, 51%
  on SmolLM2's problems, both measured) with K = 8 responses, and V x 100 validation prompts with
  32 responses (--cropi.val_samples 32, --cropi.max_val_prompts 100), V = 1: a forward and a
  backward with checkpointing, 8N per token (the projection or exact dot products: at most 2% of
  a prompt's time, measured on SmolLM2). With --cropi.grad_layers n of L blocks: 2N + 6N n / L
  (the backward and its recomputation only above block L - n). Prompt tokens count in both.

The cheaper settings' fidelity is the frontier's (benchmarks/frontier.py, SmolLM2-135M: 30 blocks,
responses of at most 80 tokens): it is a measurement on one small model, not a guarantee at 7B.
"""

from __future__ import annotations

import argparse

RECIPES = {  # name: (parameters, blocks, max_new_tokens), from the recipes' models and presets
    "Qwen2.5-1.5B, 2048 tokens": (1.54e9, 28, 2048),
    "Qwen2.5-7B, 4096 tokens": (7.62e9, 28, 4096),
}
PROMPT_TOKENS, STEPS, PROMPTS_PER_STEP, SAMPLES, K, VAL_PROMPTS, VAL_SAMPLES = 256, 16, 128, 8, 8, 100, 32
USABLE, GENERATION_SHARE = 0.5, 0.5


def phase_ratio(params: float, blocks: int, max_new: int, pool: int, layers: int = 0) -> float:
    """Selection time / training time per phase (the module's assumptions)."""
    tokens = PROMPT_TOKENS + max_new / 2
    training = STEPS * PROMPTS_PER_STEP * SAMPLES * tokens * 12 * params / (1 - GENERATION_SHARE)
    per_token = 8 * params if layers == 0 else 2 * params + 6 * params * layers / blocks
    responses = USABLE * pool * K + VAL_PROMPTS * VAL_SAMPLES
    return responses * tokens * per_token / training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="--cropi.grad_layers settings to model")
    a = p.parse_args()
    print("| recipe | pool | default (whole backward) | " + " | ".join(f"grad_layers {n}" for n in a.layers) + " |")
    print("|---|---|---|" + "---|" * len(a.layers))
    for name, (params, blocks, max_new) in RECIPES.items():
        for pool in (10_000, 50_000):
            cells = [phase_ratio(params, blocks, max_new, pool)] + [phase_ratio(params, blocks, max_new, pool, n)
                                                                    for n in a.layers]  # fmt: skip
            print(f"| {name} | {pool:,} | " + " | ".join(f"{c:.2f}x" for c in cells) + " |")


if __name__ == "__main__":
    main()
