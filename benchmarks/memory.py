"""Memory of the influence pass vs a plain training forward+backward, at real model shapes.

    python benchmarks/memory.py [--shapes smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--k 8]
                                [--prompt-len 8] [--response-len 16] [--checkpointing]

For each shape (the configs of SmolLM2-135M, Qwen2.5-0.5B and Qwen2.5-1.5B, random float32
weights built from a transformers config: nothing is downloaded), one prompt with K responses
(lengths spread over [response_len / 2, response_len]) in one micro-batch, three passes, each
measured in a fresh process. The default sequences are short: parameters then dominate, which
is where a model-sized buffer shows (and what 2 CPU cores can run at 1.5B). With long ones,
activations dominate and a training step peaks early in its backward, before its ``.grad``
fills; then what separates the passes is the projector's layout (benchmarks/README.md).

- training:  forward + ``loss.backward()`` of CROPI's surrogate objective: ``.grad`` for every
             parameter, as a plain training step holds it.
- floor:     the same backward with every parameter's gradient dropped the moment autograd
             produces it: activations plus one parameter's gradient, what any streamed
             method needs at least.
- influence: ``projected_gradient`` (sjlt, keep 0.1, d = 32768): gradients projected as produced;
             the projector's layout (built by a first pass) is counted as the pass's memory.

What is measured: resident memory. Each process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that every tensor above 64 KiB is its own mapping and goes back to the OS when freed (resident
memory then follows live tensors, page-rounded); ``extra`` is the peak resident size during
the measured pass (VmHWM, reset through /proc/self/clear_refs) minus the resident size once
the model and inputs exist (so: activations, gradients, projector layout, temporaries; not the
weights or the Python runtime). Every pass is run twice and the second is measured (warm).

Then the same quantities for Qwen2.5-7B from a memory model (stated below, in bf16 on an
80 GB GPU with the 7B recipe's settings), checked against 80 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The real configs (config.json of each model on the Hub), written out: nothing is downloaded.
SHAPES = {
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen2.5-7b": dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=32768),
}  # fmt: skip
MODES = ("training", "floor", "influence")
KEEP, PROJ_DIM = 0.1, 32768
GiB = 2**30


def build_model(shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        spec.pop("arch")
    ]
    torch.manual_seed(0)
    return model_class(config_class(**spec)).float().eval()


# ---- one measurement (child process) ---------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def measure(shape: str, mode: str, k: int, prompt_len: int, response_len: int, checkpointing: bool) -> dict:
    import torch

    from openrlhf_cropi.core.gradients import (
        causal_lm_log_prob_fn,
        checkpointing_mode,
        pack_micro_batch,
        projected_gradient,
        stream_gradients,
        surrogate_objective,
    )
    from openrlhf_cropi.core.projection import SparseProjector

    model = build_model(shape)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
    lengths = torch.linspace(response_len // 2, response_len, k).round().long().tolist()
    responses = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    rewards = [float(i % 2) for i in range(k)]
    # log beta of a uniform policy: a random-weight model is close to it, so rho stays near 1.
    behavior = [torch.full((n,), -float(torch.log(torch.tensor(float(vocab))))) for n in lengths]
    fn, budget = causal_lm_log_prob_fn(model), 1 << 30  # all K responses in one micro-batch
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    projector = SparseProjector(sum(p.numel() for p in params), KEEP, PROJ_DIM, "sjlt")

    def training() -> None:
        ids, attn, act = pack_micro_batch(prompt, responses, "cpu")
        adv = torch.tensor(rewards) - 0.5
        beh = torch.nn.utils.rnn.pad_sequence(behavior, batch_first=True)
        surrogate_objective(fn(ids, attn, act), beh, act, adv / k).backward()
        model.zero_grad(set_to_none=True)  # after the peak: what the step held is measured

    def floor() -> None:
        ids, attn, act = pack_micro_batch(prompt, responses, "cpu")
        adv = torch.tensor(rewards) - 0.5
        beh = torch.nn.utils.rnn.pad_sequence(behavior, batch_first=True)
        stream_gradients(surrogate_objective(fn(ids, attn, act), beh, act, adv / k), params, lambda i, grad: None)

    def influence() -> None:
        projected_gradient(fn, params, projector, prompt, responses, rewards, behavior, budget, "cpu")

    run = {"training": training, "floor": floor, "influence": influence}[mode]
    context = contextlib.nullcontext()
    if checkpointing:  # transformers checkpoints only in training mode (no dropout in these configs)
        context = checkpointing_mode(model) if mode != "training" else _training_mode(model)
    base = _status_bytes("VmRSS")
    _reset_peak()
    with context:
        run()  # first pass: the influence pass builds the projector's layout here
        first_peak = _status_bytes("VmHWM")
        _reset_peak()
        run()
        peak = _status_bytes("VmHWM")
    return {
        "shape": shape, "mode": mode, "params": sum(p.numel() for p in params),
        "largest_param": max(p.numel() for p in params), "tokens": k * prompt_len + sum(lengths),
        "base": base, "extra": peak - base, "first_extra": first_peak - base, "layout": projector.state_bytes(),
    }  # fmt: skip


@contextlib.contextmanager
def _training_mode(model):
    model.train()
    try:
        yield
    finally:
        model.eval()


# ---- the 7B memory model ---------------------------------------------------------------------


def model_7b(response_len: int = 4096, prompt_len: int = 1024, gpus: int = 8) -> tuple[list[tuple[str, float, float]], int]:
    """(component, influence pass GiB, training step GiB) per GPU for the 7B recipe, and the
    parameter count.

    Recipe (launch/recipes/_common.sh, preset qwen2.5-7b-instruct): 1 node x 8 GPUs of 80 GB,
    ZeRO-3, bf16 weights, --train.micro_batch_size 1, --data.max_len 1024 + 4096, gradient
    checkpointing, actor + reference + vLLM colocated with --ds.enable_sleep and
    --vllm.enable_sleep. CROPI's micro-batch: the default --cropi.max_tokens_per_gpu = 1 x 5120
    tokens, i.e. one response with its prompt (T = 5120 at most). The influence pass runs
    while vLLM sleeps and the optimizer states are offloaded; training runs with them loaded.
    """
    s = SHAPES["qwen2.5-7b"]
    h, inter, layers, vocab, heads, kv = (s[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "vocab_size", "num_attention_heads", "num_key_value_heads"))  # fmt: skip
    head_dim, tokens = h // heads, prompt_len + response_len
    layer_params = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter
    params = layers * layer_params + 2 * vocab * h  # untied embedding and lm_head
    bf16, fp32 = 2, 4
    # Checkpointing keeps each layer's input (T x H, bf16) and recomputes one layer at a time;
    # that layer holds about 8 H + 4 I values per token (norms, q/k/v, attention output,
    # gate, up, activation, product), doubled while its backward runs. Flash attention: O(T).
    checkpoints = layers * tokens * h * bf16
    one_layer = 2 * tokens * (8 * h + 4 * inter) * bf16
    # Logits: the influence pass keeps only the response's (logits_to_keep): bf16 output, its
    # float32 copy (divided in place), then in the backward up to three float32 x V tensors at
    # once (softmax and gather gradients and their sum). OpenRLHF's training step computes all
    # T positions and uses flash-attn's fused cross-entropy: about one float32 gradient.
    logits_influence = (response_len + 1) * vocab * (bf16 + fp32 + 3 * fp32)
    logits_training = tokens * vocab * (bf16 + fp32 + fp32)
    # ZeRO-3 gathers parameters for the module being run; "auto" live-parameter limits keep a
    # couple of layers, and the embedding or lm_head (V x H) when it is the one being run.
    gathered = (2 * layer_params + vocab * h) * bf16
    weights = params * bf16 / gpus  # the bf16 partition each rank owns
    # Influence only: one parameter's full-size bf16 gradient (the largest: V x H), the float32
    # copy of its kept 10%, and the projector's accelerator layout (bitmask: 1/8 + 2 x keep
    # bytes per parameter at d = 32768).
    largest_grad = vocab * h * bf16 + KEEP * vocab * h * fp32
    layout = params * (1 / 8 + 2 * KEEP)
    # Training only: fp32 master weights, Adam m and v (12 bytes per parameter) and the fp32
    # gradient partition, each split over the ranks; ZeRO-3 reduce-scatters gradients in
    # buckets (reduce_bucket_size "auto" = H^2 elements, fp32).
    optimizer = params * 12 / gpus
    grad_partition = params * fp32 / gpus + h * h * fp32
    runtime = 3 * GiB  # CUDA context, allocator slack, vLLM's residue while asleep (assumed)
    rows = [
        ("bf16 weights, this rank's ZeRO-3 partition", weights, weights),
        ("gathered parameters (ZeRO-3 working set)", gathered, gathered),
        ("checkpointed layer inputs", checkpoints, checkpoints),
        ("one layer recomputed, forward + backward", one_layer, one_layer),
        ("response logits and their gradients", logits_influence, logits_training),
        ("optimizer states + fp32 gradient partition", 0.0, optimizer + grad_partition),
        ("largest parameter's gradient + its kept copy", largest_grad, 0.0),
        ("projector layout (accelerator bitmask)", layout, 0.0),
        ("CUDA context, allocator slack, vLLM asleep", runtime, runtime),
    ]
    return [(name, a / GiB, b / GiB) for name, a, b in rows], params


# ---- driver ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b")
    p.add_argument("--k", type=int, default=8, help="responses of the prompt (one micro-batch)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=16, help="longest response; the others down to half")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in all three passes")
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = measure(*a.child, a.k, a.prompt_len, a.response_len, a.checkpointing)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    shapes = a.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        p.error(f"--shapes: unknown {sorted(unknown)}; choose from {sorted(SHAPES)}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; float32; K = {a.k}, prompt {a.prompt_len} tokens, responses "
          f"{a.response_len // 2}-{a.response_len} tokens, one micro-batch; sjlt keep {KEEP}, d = {PROJ_DIM}; "
          f"gradient checkpointing {'on' if a.checkpointing else 'off'}\n")  # fmt: skip
    results = {}
    for shape in shapes:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", shape, mode, "--k", str(a.k), "--prompt-len",
                   str(a.prompt_len), "--response-len", str(a.response_len)] + (["--checkpointing"] * a.checkpointing)  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{shape} {mode} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            results[shape, mode] = json.loads(lines[-1][len("RESULT "):])
            r = results[shape, mode]
            print(f"  {shape} {mode}: extra {r['extra'] / GiB:.2f} GiB", file=sys.stderr)

    print("| shape | parameters | tokens | weights (GiB) | training extra (GiB) | floor extra (GiB) | "
          "influence extra (GiB) | influence / training, extra | influence / training, total | "
          "influence - floor (B/param) | training - floor (B/param) | layout (B/param) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        t, f, i = (results[shape, m] for m in MODES)
        n = t["params"]
        total = {m: results[shape, m]["base"] + results[shape, m]["extra"] for m in MODES}
        print(f"| {shape} | {n / 1e6:,.0f}M | {t['tokens']} | {4 * n / GiB:.2f} | {t['extra'] / GiB:.2f} | "
              f"{f['extra'] / GiB:.2f} | {i['extra'] / GiB:.2f} | {i['extra'] / t['extra']:.2f} | "
              f"{total['influence'] / total['training']:.2f} | {(i['extra'] - f['extra']) / n:.2f} | "
              f"{(t['extra'] - f['extra']) / n:.2f} | {i['layout'] / n:.2f} |")  # fmt: skip
    print("\n(extra: peak resident memory during the pass above the resident size once model and inputs exist; "
          "total: the same plus that base, weights and Python runtime included. Largest parameter: the tied "
          "embedding, held once for the whole backward in every mode.)")

    rows, params = model_7b()
    print(f"\n## Qwen2.5-7B ({params / 1e9:.2f}B parameters), 7B recipe, per GPU (memory model, not measured)\n")
    print("| component | influence pass (GiB) | training step (GiB) |")
    print("|---|---|---|")
    for name, inf, train in rows:
        print(f"| {name} | {inf:.1f} | {train:.1f} |")
    inf_total, train_total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| **total** | **{inf_total:.1f}** | **{train_total:.1f}** |")
    gpu = 80e9 / GiB
    print(f"\n80 GB GPU = {gpu:.1f} GiB: influence pass {inf_total / gpu:.0%} of it, training step "
          f"{train_total / gpu:.0%}; influence / training {inf_total / train_total:.2f}. Beyond weights and "
          f"activations the influence pass holds {(rows[6][1] + rows[7][1]) * GiB / params:.3f} bytes per parameter "
          f"(one parameter's gradient and the layout), training {rows[5][2] * GiB / params:.2f}.")  # fmt: skip


if __name__ == "__main__":
    main()
