"""bf16 vs float32 on this CPU: why the local runs use --ds.param_dtype fp32.

    python benchmarks/cpu_dtype.py [--repeats 5] [--sft-examples 640]

Times, side by side in one run, in bfloat16 and in float32:
1. a 5120x128 @ 128x384 matmul forward+backward;
2. a forward+backward of the demo's base model (hidden 128, 4 layers) on 64 x 80 tokens;
3. OpenRLHF's SFT trainer (`openrlhf.cli.train_sft`, as the demo's warm start runs it) on
   --sft-examples rows of the demo's SFT data, one epoch at batch 64: wall time including
   the trainer's start-up, and the per-step time from the difference of two sizes.
and prints the bf16/fp32 ratios with the CPU capability. CPUs without native bf16 (AVX2 only)
emulate bf16 matmuls; those with AVX512-BF16 or AMX do not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_step(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5120, 128, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(128, 384, generator=gen).to(dtype).requires_grad_()

    def step():
        (a @ b).float().square().mean().backward()

    return step


def model_step(model_dir: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    ids = torch.randint(3, 400, (64, 80), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def sft_seconds(base: Path, data: Path, out: Path, param_dtype: str) -> float:
    from openrlhf_cropi.demo.warm_start import sft

    # DeepSpeed's JIT-built CPU Adam, where launch/local/cpu_env.sh keeps it (built once per venv).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    t0 = time.perf_counter()
    sft(base, data, out, epochs=1, seed=0, param_dtype=param_dtype)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sft-examples", type=int, default=640, help="rows of the large SFT run (the small one: half)")
    args = parser.parse_args(argv)

    from openrlhf_cropi.demo.tasks import build_suite, read_jsonl
    from openrlhf_cropi.demo.warm_start import MODEL_SHAPE
    from openrlhf_cropi.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "base", **MODEL_SHAPE)
        results = []
        for name, make in {"matmul 5120x128 @ 128x384 fwd+bwd": matmul_step,
                           "base model fwd+bwd, 64 x 80 tokens": lambda dt: model_step(str(model_dir), dt)}.items():  # fmt: skip
            results.append((name, _best(make(torch.bfloat16), args.repeats), _best(make(torch.float32), args.repeats)))

        build_suite(tmp / "suite", seed=0, sft=args.sft_examples)
        rows = (tmp / "suite/sft.jsonl").read_text().splitlines(keepends=True)
        sizes = {"small": args.sft_examples // 2, "large": args.sft_examples}
        for size, n in sizes.items():
            (tmp / f"sft-{size}.jsonl").write_text("".join(rows[:n]))
        # Untimed first run: DeepSpeed JIT-builds its CPU Adam on first use in a fresh environment.
        sft_seconds(model_dir, tmp / "sft-small.jsonl", tmp / "warm-up", "fp32")
        wall = {
            (dtype, size): sft_seconds(model_dir, tmp / f"sft-{size}.jsonl", tmp / f"out-{dtype}-{size}", dtype)
            for dtype in ("bf16", "fp32")
            for size in sizes
        }
        steps = (sizes["large"] - sizes["small"]) // 64
        results.append((f"train_sft, {sizes['large']} rows (wall, with start-up)", wall["bf16", "large"], wall["fp32", "large"]))
        per_step = {dt: (wall[dt, "large"] - wall[dt, "small"]) / steps for dt in ("bf16", "fp32")}
        results.append(("train_sft, one step of 64 rows", per_step["bf16"], per_step["fp32"]))

    print(f"\nCPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads: {torch.get_num_threads()}")
    print(f"{'case':<46} {'bf16 s':>9} {'fp32 s':>9} {'bf16/fp32':>10}")
    for name, bf16, fp32 in results:
        print(f"{name:<46} {bf16:>9.3f} {fp32:>9.3f} {bf16 / fp32:>9.1f}x")


if __name__ == "__main__":
    main()
