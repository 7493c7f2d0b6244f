"""Throughput: projection bandwidth and per-prompt influence cost, measured side by side.

    python benchmarks/throughput.py [--numel 50000000] [--proj-dim 32768] [--repeats 5]

1. Projection of one float32 (and bf16) vector of ``numel`` coordinates, against a plain
   streaming read of the same tensor (``tensor.sum()``): "read / projection" is the fraction
   of read bandwidth the projection reaches (1.0 = as fast as reading the gradient once).
   SJLT with its per-chunk layout cached (the steady state: the same layout serves every
   prompt of every phase) and the one-off cost of building that layout. Dense projectors on a
   smaller vector (their cost is d per kept coordinate), extrapolated the same way.
2. One prompt's influence vector (off-policy gradient of K responses + SJLT projection) on a
   small Qwen2, against one plain forward + backward (``loss.backward()``) of a GRPO-style
   loss over the same K responses in one padded batch: "influence / plain" is the overhead.

Times are medians over ``--repeats`` rounds in which the compared functions take turns (so
each ratio is measured under the same machine load), on the device ``--device`` names.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from openrlhf_cropi.core.gradients import behavior_log_probs, causal_lm_log_prob_fn, pack_micro_batch, prompt_gradient
from openrlhf_cropi.core.projection import SparseProjector


def compare(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each function; the functions take turns, so all see the same machine load."""

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in fns.values():
        once(fn)  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def projection_table(numel: int, d: int, repeats: int, device: torch.device) -> None:
    print(f"\n## Projection of one vector, d = {d} ({device})\n")
    print("| input | projector | keep | coordinates | read (ms) | projection (ms) | read / projection | layout build (s, once) |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(numel, generator=g).to(device)
    for x in (x32, x32.bfloat16()):
        for keep in (1.0, 0.1):
            p = SparseProjector(numel, keep, d, "sjlt")
            t = time.perf_counter()
            p.project_chunk(x, 0)
            build = time.perf_counter() - t
            m = compare({"read": lambda: x.sum(), "proj": lambda: p.project_chunk(x, 0)}, repeats, device)
            print(f"| {str(x.dtype)[6:]} | sjlt | {keep:g} | {numel:,} | {m['read'] * 1e3:.1f} | {m['proj'] * 1e3:.1f} | "
                  f"{m['read'] / m['proj']:.2f} | {build:.1f} |")
    # Without the layout cache every call re-hashes its coordinates.
    p = SparseProjector(numel, 0.1, d, "sjlt", cache=False)
    m = compare({"read": lambda: x32.sum(), "proj": lambda: p.project_chunk(x32, 0)}, max(1, repeats // 3), device)
    print(f"| float32 | sjlt, cache=False | 0.1 | {numel:,} | {m['read'] * 1e3:.1f} | {m['proj'] * 1e3:.1f} | "
          f"{m['read'] / m['proj']:.2f} | - |")
    small = min(numel, 2_000_000)
    y = x32[:small].clone()
    for kind in ("rademacher", "gaussian"):
        p = SparseProjector(small, 0.01, d, kind)
        m = compare({"read": lambda: y.sum(), "proj": lambda: p.project_chunk(y, 0)}, 2, device)
        print(f"| float32 | {kind} | 0.01 | {small:,} | {m['read'] * 1e3:.2f} | {m['proj'] * 1e3:.0f} | "
              f"{m['read'] / m['proj']:.5f} | - |")


def tiny_lm(device: torch.device) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float().to(device).eval()


def influence_table(d: int, k: int, repeats: int, device: torch.device) -> None:
    model = tiny_lm(device)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 4096, (64,), generator=g)
    responses = [torch.randint(0, 4096, (int(n),), generator=g) for n in torch.randint(64, 193, (k,), generator=g)]
    rewards = [float(i % 2) for i in range(k)]
    fn, budget = causal_lm_log_prob_fn(model), 1 << 20  # one micro-batch, like the plain pass
    behavior = behavior_log_probs(fn, prompt, responses, budget, device)
    with torch.no_grad():  # a later checkpoint: ratios != 1
        for w in params:
            w.mul_(1.001)
    proj = SparseProjector(total, 0.1, d, "sjlt")
    adv = torch.tensor(rewards, device=device) - 0.5

    def plain() -> None:
        # One ordinary training step's forward + backward over the same K responses.
        model.zero_grad(set_to_none=True)
        ids, attn, act = pack_micro_batch(prompt, responses, device)
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits.float()
        lp = torch.log_softmax(logits[:, -act.shape[1] - 1 : -1], -1).gather(-1, ids[:, -act.shape[1]:, None])[..., 0]
        loss = -((lp.exp() * adv[:, None]) * act).sum() / act.sum()
        loss.backward()

    grads = prompt_gradient(fn, params, prompt, responses, rewards, behavior, budget, device)
    proj.project(grads)  # builds the cached layout once

    def gradient() -> list[torch.Tensor]:
        return prompt_gradient(fn, params, prompt, responses, rewards, behavior, budget, device)

    m = compare({
        "plain forward + backward (loss.backward)": plain,
        "off-policy gradient (autograd.grad)": gradient,
        "sjlt projection of that gradient": lambda: proj.project(grads),
        "influence vector (gradient + projection)": lambda: proj.project(gradient()),
    }, repeats, device)
    t_plain = m["plain forward + backward (loss.backward)"]
    tokens = sum(len(r) for r in responses)
    print(f"\n## One prompt's influence vector: Qwen2 {total / 1e6:.1f}M params, K = {k}, prompt 64 tokens, "
          f"{tokens} response tokens, sjlt keep 0.1, d = {d} ({device})\n")
    print("| step | time (ms) | / plain forward+backward |")
    print("|---|---|---|")
    for name, t in m.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / t_plain:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=50_000_000)
    p.add_argument("--proj-dim", type=int, default=32768)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    projection_table(a.numel, a.proj_dim, a.repeats, device)
    influence_table(a.proj_dim, a.k, a.repeats, device)


if __name__ == "__main__":
    main()
