"""Throughput: projection bandwidth and per-prompt influence cost, measured side by side.

    python benchmarks/throughput.py [--numel 50000000] [--proj-dim 32768] [--repeats 7]

1. Projection of one float32 (and bf16) vector of ``numel`` coordinates, against a plain
   streaming read of the same tensor (``tensor.sum()``): "read / projection" is the fraction
   of read bandwidth the projection reaches (1.0 = as fast as reading the gradient once).
   SJLT with its layout cached (the steady state: the same layout serves every prompt of a
   phase) in both layouts (``index``, the CPU default; ``bitmask``, the accelerator default),
   with their state in bytes per parameter, and the one-off cost of building a layout. Dense
   projectors on a smaller vector (their cost is d per kept coordinate), with the entries they
   generate per second and what the job's startup limit (2^34 entries per gradient) means here.
2. One prompt's influence vector (off-policy gradient of K responses, each parameter's
   gradient projected by SJLT as autograd produces it) on a small Qwen2, against one plain
   forward + backward (``loss.backward()``) of the same objective over the same K responses in
   one padded batch, and against the same backward with every gradient dropped (the floor of
   any streamed method); then the same with gradient checkpointing (both in training mode).
   "/ plain" is the overhead.

Times are medians over ``--repeats`` rounds in which the compared functions take turns (so
each ratio is measured under the same machine load), on the device ``--device`` names.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from openrlhf_cropi.core.gradients import (
    behavior_log_probs,
    causal_lm_log_prob_fn,
    checkpointing_mode,
    micro_batch_objectives,
    projected_gradient,
    stream_gradients,
)
from openrlhf_cropi.core.projection import DENSE_MAX_ENTRIES, SparseProjector


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
    print("| input | projector | layout | state (B/param) | keep | coordinates | read (ms) | projection (ms) | "
          "read / projection | layout build (s, once) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(numel, generator=g).to(device)
    for x in (x32, x32.bfloat16()):
        for keep in (1.0, 0.1):
            for layout in ("index", "bitmask"):
                p = SparseProjector(numel, keep, d, "sjlt", layout=layout)
                t = time.perf_counter()
                p.project_chunk(x, 0)
                build = time.perf_counter() - t
                m = compare({"read": lambda: x.sum(), "proj": lambda: p.project_chunk(x, 0)}, repeats, device)
                print(f"| {str(x.dtype)[6:]} | sjlt | {layout} | {p.state_bytes() / numel:.3f} | {keep:g} | {numel:,} | "
                      f"{m['read'] * 1e3:.1f} | {m['proj'] * 1e3:.1f} | {m['read'] / m['proj']:.2f} | {build:.1f} |")
    # Without the layout cache every call re-hashes its coordinates.
    p = SparseProjector(numel, 0.1, d, "sjlt", cache=False)
    m = compare({"read": lambda: x32.sum(), "proj": lambda: p.project_chunk(x32, 0)}, max(1, repeats // 3), device)
    print(f"| float32 | sjlt, cache=False | index | 0 | 0.1 | {numel:,} | {m['read'] * 1e3:.1f} | {m['proj'] * 1e3:.1f} | "
          f"{m['read'] / m['proj']:.2f} | - |")
    small = min(numel, 2_000_000)
    y = x32[:small].clone()
    print(f"\n| dense projector | keep | coordinates | projection (ms) | entries generated per second | "
          f"the startup limit ({DENSE_MAX_ENTRIES:.1e} entries per gradient) takes |")
    print("|---|---|---|---|---|---|")
    for kind in ("rademacher", "gaussian"):
        p = SparseProjector(small, 0.01, d, kind)
        m = compare({"proj": lambda: p.project_chunk(y, 0)}, 2, device)
        rate = len(p.kept_local_indices(0, small)) * d / m["proj"]
        print(f"| {kind} | 0.01 | {small:,} | {m['proj'] * 1e3:.0f} | {rate:.2e} | {DENSE_MAX_ENTRIES / rate:.0f} s |")


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

    def objective():  # the influence pass's objective, for the plain and floor passes too
        (one,) = micro_batch_objectives(fn, prompt, responses, rewards, behavior, budget, device)
        return one

    def plain() -> None:  # one ordinary training step's forward + backward
        objective().backward()
        model.zero_grad(set_to_none=True)

    def floor() -> None:
        stream_gradients(objective(), params, lambda i, grad: None)

    def influence() -> None:
        projected_gradient(fn, params, proj, prompt, responses, rewards, behavior, budget, device)

    fns = {"plain forward + backward (loss.backward)": plain, "floor: backward, gradients dropped": floor,
           "influence vector (gradients projected as produced)": influence}  # fmt: skip
    m = compare(fns, repeats, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with checkpointing_mode(model):  # the layers in training mode: transformers checkpoints them
        ckpt = compare({f"{name}, checkpointing": fn for name, fn in fns.items()}, repeats, device)
    tokens = sum(len(r) for r in responses)
    print(f"\n## One prompt's influence vector: Qwen2 {total / 1e6:.1f}M params, K = {k}, prompt 64 tokens, "
          f"{tokens} response tokens, sjlt keep 0.1, d = {d} ({device})\n")
    print("| pass | time (ms) | / plain forward+backward |")
    print("|---|---|---|")
    for times in (m, ckpt):
        t_plain = next(iter(times.values()))
        for name, t in times.items():
            print(f"| {name} | {t * 1e3:.1f} | {t / t_plain:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=50_000_000)
    p.add_argument("--proj-dim", type=int, default=32768)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    projection_table(a.numel, a.proj_dim, a.repeats, device)
    influence_table(a.proj_dim, a.k, a.repeats, device)


if __name__ == "__main__":
    main()
