"""GPU check of the influence pass: one command, torch + transformers only (and this checkout).

    python benchmarks/gpu_check.py                      # CUDA, Qwen2.5-1.5B shape, bf16: a few minutes
    python benchmarks/gpu_check.py --device cpu --shape tiny --response-len 32 --repeats 1   # smoke test

A random-weight model of the shape asked for (default Qwen2.5-1.5B's config, written out, nothing
downloaded) in bf16, one prompt (256 tokens) with K = 8 responses of 1024 tokens, packed into
micro-batches of --max-tokens padded tokens (default: 4 rows, the 1.5B recipe's training
micro-batch of 4 x (prompt + response)). It prints, each figure measured side by side in this run:

1. correctness on this device: the streamed projection (``projected_gradient``) against the
   whole gradient from ``torch.autograd.grad`` projected afterwards; the accelerator (bitmask)
   layout against the CPU (index) one; the kept set against the CPU's.
2. time per prompt: plain forward + ``loss.backward()`` over the same micro-batches (a
   training step's gradient accumulation), the same backward dropping every gradient (floor),
   and the influence pass (gradients projected as produced); ratios to plain.
3. SJLT projection bandwidth (GB/s of bf16 gradient projected) with both layouts, against the
   device's copy bandwidth measured here (read + write of a 1 GiB buffer).
4. peak memory of the influence pass and of the plain step, above what the weights hold.
5. dense projectors: matrix entries generated per second here, so the 2^34-entry limit in seconds.

Exit status 1 if a check failed (the other sections still run).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from openrlhf_cropi.core.gradients import (  # noqa: E402
    causal_lm_log_prob_fn,
    checkpointing_mode,
    micro_batch_objectives,
    plan_micro_batches,
    projected_gradient,
    stream_gradients,
)
from openrlhf_cropi.core.projection import DENSE_MAX_ENTRIES, SparseProjector  # noqa: E402

from memory import SHAPES as REAL_SHAPES  # noqa: E402  (the real configs, written out once there)

SHAPES = {
    "qwen2.5-1.5b": {k: v for k, v in REAL_SHAPES["qwen2.5-1.5b"].items() if k != "arch"},
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096),
}  # fmt: skip
KEEP, PROJ_DIM = 0.1, 32768
failures: list[str] = []


def section(title: str):
    """Run a section; a failure is printed and counted, the next section still runs."""

    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n## {title}\n", flush=True)
            try:
                return fn(*args, **kwargs)
            except Exception:  # report and go on: one device run should give every figure it can
                traceback.print_exc()
                failures.append(title)

        return run

    return wrap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each function; they take turns, so all see the same conditions."""

    def once(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    for fn in fns.values():
        once(fn)  # warm-up (and layouts built)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_above_start(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn runs, above what was allocated before: CUDA allocator
    statistics; on a CPU, the running sum of the profiler's allocation and free events."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events))


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape])
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


class Prompt:
    def __init__(self, vocab: int, k: int, prompt_len: int, response_len: int):
        g = torch.Generator().manual_seed(1)
        self.prompt_ids = torch.randint(0, vocab, (prompt_len,), generator=g)
        self.responses = [torch.randint(0, vocab, (response_len,), generator=g) for _ in range(k)]
        self.rewards = [float(i % 2) for i in range(k)]
        # log beta of a uniform policy: a random-weight model is close to it (rho near 1).
        self.behavior = [torch.full((response_len,), -math.log(vocab)) for _ in range(k)]

    def args(self):
        return self.prompt_ids, self.responses, self.rewards, self.behavior


@section("1. Correctness on this device")
def correctness(model, params, prompt: Prompt, max_tokens: int, device: torch.device) -> None:
    fn, total = causal_lm_log_prob_fn(model), sum(p.numel() for p in params)
    projector = SparseProjector(total, KEEP, PROJ_DIM)
    streamed = projected_gradient(fn, params, projector, *prompt.args(), max_tokens, device)
    # Oracle: the whole gradient (model-sized, fine for a check), then projected.
    full = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    for objective in micro_batch_objectives(fn, *prompt.args(), max_tokens, device):
        for acc, part in zip(full, torch.autograd.grad(objective, params, allow_unused=True)):
            if part is not None:
                acc += part
    oracle = projector.project(full)
    del full
    error = float((streamed - oracle).norm() / oracle.norm())
    print(f"streamed vs whole-gradient oracle: relative error {error:.2e} (finite: {bool(torch.isfinite(streamed).all())})")
    n = min(total, 1 << 26)
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    by_layout = {lay: SparseProjector(n, KEEP, PROJ_DIM, layout=lay).project_chunk(x, 0) for lay in ("index", "bitmask")}
    layout_error = float((by_layout["index"] - by_layout["bitmask"]).norm() / by_layout["index"].norm())
    print(f"bitmask vs index layout on {n:,} coordinates: relative difference {layout_error:.2e} (atomic-add order only)")
    probe = SparseProjector(total, KEEP, PROJ_DIM)
    offset = max(0, total - (1 << 20))
    same_kept = torch.equal(probe.kept_local_indices(offset, 1 << 20, device).cpu(), probe.kept_local_indices(offset, 1 << 20))
    print(f"kept set of 2^20 coordinates identical to the CPU's: {same_kept}")
    if not (error < 2e-2 and layout_error < 1e-4 and same_kept):
        raise AssertionError("a correctness check is outside its tolerance")


@section("2. Time per prompt")
def timing(model, params, prompt: Prompt, max_tokens: int, repeats: int, device: torch.device) -> None:
    fn, total = causal_lm_log_prob_fn(model), sum(p.numel() for p in params)
    projector = SparseProjector(total, KEEP, PROJ_DIM)
    objectives = lambda: micro_batch_objectives(fn, *prompt.args(), max_tokens, device)  # noqa: E731

    def plain() -> None:  # a training step's forward + backward with gradient accumulation
        for objective in objectives():
            objective.backward()
        model.zero_grad(set_to_none=True)

    def floor() -> None:
        for objective in objectives():
            stream_gradients(objective, params, lambda i, grad: None)

    def influence() -> None:
        projected_gradient(fn, params, projector, *prompt.args(), max_tokens, device)

    m = compare({"plain forward + backward": plain, "floor (gradients dropped)": floor,
                 "influence pass (gradients projected)": influence}, repeats, device)  # fmt: skip
    t_plain = m["plain forward + backward"]
    print("| pass | time per prompt (ms) | / plain |")
    print("|---|---|---|")
    for name, t in m.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / t_plain:.3f} |")
    print(f"\nprojector state on {device}: {projector.state_bytes() / 2**30:.2f} GiB, "
          f"{projector.state_bytes() / total:.3f} bytes per parameter")


@section("3. SJLT projection bandwidth")
def bandwidth(total: int, repeats: int, device: torch.device) -> None:
    n = min(total, 1 << 28)
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    buf = torch.empty(1 << 28, device=device, dtype=torch.float32)  # 1 GiB
    src = torch.randn_like(buf)
    fns = {"copy 1 GiB": lambda: buf.copy_(src)}
    projectors = {lay: SparseProjector(n, KEEP, PROJ_DIM, layout=lay) for lay in ("index", "bitmask")}
    for lay, p in projectors.items():
        fns[f"sjlt {lay}"] = lambda p=p: p.project_chunk(x, 0)
    m = compare(fns, repeats, device)
    copy_gbs = 2 * buf.nbytes / m["copy 1 GiB"] / 1e9
    print(f"device copy bandwidth: {copy_gbs:.3g} GB/s (read + write)")
    print("| layout | state (bytes/param) | projection (ms) | bf16 gradient projected (GB/s) | / copy bandwidth |")
    print("|---|---|---|---|---|")
    for lay, p in projectors.items():
        gbs = x.nbytes / m[f"sjlt {lay}"] / 1e9
        print(f"| {lay} | {p.state_bytes() / n:.3f} | {m[f'sjlt {lay}'] * 1e3:.2f} | {gbs:.3g} | {gbs / copy_gbs:.3f} |")
    print(f"({n:,} coordinates, keep {KEEP}, d = {PROJ_DIM})")


@section("4. Peak memory above the weights")
def memory(model, params, prompt: Prompt, max_tokens: int, device: torch.device) -> None:
    fn, total = causal_lm_log_prob_fn(model), sum(p.numel() for p in params)
    projector = SparseProjector(total, KEEP, PROJ_DIM)

    def plain() -> None:
        for objective in micro_batch_objectives(fn, *prompt.args(), max_tokens, device):
            objective.backward()

    def influence() -> None:
        projected_gradient(fn, params, projector, *prompt.args(), max_tokens, device)

    influence()  # layout built: it is counted below as state, next to the pass's peak
    peak_influence = peak_above_start(influence, device) + projector.state_bytes()
    peak_plain = peak_above_start(plain, device)
    model.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in params)
    print("| pass | peak above weights (GiB) | bytes per parameter |")
    print("|---|---|---|")
    for name, b in (("plain forward + backward (.grad kept)", peak_plain), ("influence pass + projector layout", peak_influence)):
        print(f"| {name} | {b / 2**30:.2f} | {b / total:.2f} |")
    print(f"\ninfluence / plain: {peak_influence / peak_plain:.2f} (weights: {weights / 2**30:.2f} GiB)")


@section("5. Dense projectors")
def dense(repeats: int, device: torch.device) -> None:
    n = 1 << 14
    x = torch.randn(n, device=device)
    print("| projector | entries per second | the 2^34 limit takes (s) |")
    print("|---|---|---|")
    for kind in ("rademacher", "gaussian"):
        p = SparseProjector(n, 1.0, PROJ_DIM, kind)
        t = compare({kind: lambda p=p: p.project_chunk(x, 0)}, repeats, device)[kind]
        rate = n * PROJ_DIM / t
        print(f"| {kind} | {rate:.2e} | {DENSE_MAX_ENTRIES / rate:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 (float32 on cpu)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=None, help="micro-batch budget (default: 4 rows)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every pass")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    max_tokens = a.max_tokens or 4 * (a.prompt_len + a.response_len)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    print(f"torch {torch.__version__}, device {name}; shape {a.shape}, {dtype}; K = {a.k}, prompt {a.prompt_len} + "
          f"response {a.response_len} tokens, micro-batches of <= {max_tokens} tokens "
          f"({len(plan_micro_batches([a.response_len] * a.k, a.prompt_len, max_tokens))} per prompt); "
          f"sjlt keep {KEEP}, d = {PROJ_DIM}; gradient checkpointing {'on' if a.checkpointing else 'off'}")  # fmt: skip

    model = build(a.shape, device, dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    total = sum(q.numel() for q in params)
    print(f"{total:,} parameters, built in {time.perf_counter() - t0:.0f} s")
    prompt = Prompt(model.config.vocab_size, a.k, a.prompt_len, a.response_len)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Eval mode with checkpointing layers in training mode (so they checkpoint): every pass alike.
    with checkpointing_mode(model):
        correctness(model, params, prompt, max_tokens, device)
        timing(model, params, prompt, max_tokens, a.repeats, device)
        memory(model, params, prompt, max_tokens, device)
    bandwidth(total, a.repeats, device)
    dense(max(1, a.repeats // 2), device)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; failed sections: {failures or 'none'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
