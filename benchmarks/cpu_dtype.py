"""bf16 vs float32 on this CPU: why the local runs use --ds.param_dtype fp32.

    python benchmarks/cpu_dtype.py [--repeats 5] [--sft-examples 640]

Times, side by side in one run, in bfloat16 and in float32:
1. a 5120x128 @ 128x384 matmul forward+backward;
2. a forward+backward of a tiny model (hidden 128, 4 layers) on 64 x 80 tokens;
3. OpenRLHF's SFT trainer (`openrlhf.cli.train_sft`, single CPU process over gloo) on
   --sft-examples rows of the demo's SFT data, one epoch at batch 64: wall time including
   the trainer's start-up, and the per-step time from the difference of two sizes.
and prints the bf16/fp32 ratios with the CPU capability. CPUs without native bf16 (AVX2 only)
emulate bf16 matmuls; those with AVX512-BF16 or AMX do not.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
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


# The shape the demo's warm start had when the table in benchmarks/README.md was measured.
SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=384, max_position_embeddings=256)  # fmt: skip


def sft_seconds(base: Path, data: Path, out: Path, param_dtype: str) -> float:
    """Wall seconds of `python -m openrlhf.cli.train_sft`, one epoch, one process (DeepSpeed over gloo)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # DeepSpeed's JIT-built CPU Adam, where launch/local/cpu_env.sh keeps it (built once per venv).
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", f"{sys.prefix}/torch_extensions")}  # fmt: skip
    cmd = [
        sys.executable, "-m", "openrlhf.cli.train_sft", "--model.model_name_or_path", str(base), "--data.dataset", str(data),
        "--data.input_key", "prompt", "--data.output_key", "response", "--data.apply_chat_template",
        "--data.max_len", "80", "--train.batch_size", "64", "--train.micro_batch_size", "64", "--train.max_epochs", "1",
        "--train.seed", "0", "--adam.lr", "3e-3", "--ds.zero_stage", "2", "--ds.param_dtype", param_dtype,
        "--ds.attn_implementation", "eager", "--ckpt.output_dir", str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sft-examples", type=int, default=640, help="rows of the large SFT run (the small one: half)")
    args = parser.parse_args(argv)

    from openrlhf_cropi.demo.tasks import build_suite
    from openrlhf_cropi.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "base", **SHAPE)
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
