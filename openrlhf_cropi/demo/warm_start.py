"""The demo's starting point: the task suite and a tiny model SFT-ed on it with OpenRLHF's SFT trainer.

    python -m openrlhf_cropi.demo.warm_start CACHE_DIR [--seed 0] [--sft-examples 8000] [--sft-epochs 3]

Builds, each only when absent (a DONE marker is written last, so an interrupted step redoes
itself): CACHE_DIR/suite (openrlhf_cropi.demo.tasks), CACHE_DIR/base (a ~1M-parameter model
of the tiny-model builder's architecture), CACHE_DIR/warm_start (`python -m
openrlhf.cli.train_sft` on the suite's answers, single process, gloo) and its pass rates on the
pool (warm_start/pool_pass_rates.json). GRPO needs pass rates that are spread, neither all 0
nor all 1: otherwise this stops with an error and keeps what it built.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_cropi.demo.reward import is_correct
from openrlhf_cropi.demo.tasks import build_suite, read_jsonl
from openrlhf_cropi.tiny_model import build_tiny_model

# A few transformer layers at the smallest width vLLM's CPU attention takes (head_dim 32).
MODEL_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=384, max_position_embeddings=256)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _done(path: Path) -> bool:
    return (path / "DONE").exists()


def _mark(path: Path) -> None:
    (path / "DONE").write_text("")


def sft(base: Path, data: Path, out: Path, epochs: int, seed: int, param_dtype: str = "fp32") -> None:
    """OpenRLHF's SFT trainer, one CPU process (DeepSpeed over gloo), float32 unless asked otherwise
    (bf16 is emulated on CPUs without native bf16: benchmarks/cpu_dtype.py)."""
    env = {
        **os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "openrlhf.cli.train_sft",
        "--model.model_name_or_path", str(base), "--data.dataset", str(data),
        "--data.input_key", "prompt", "--data.output_key", "response", "--data.apply_chat_template",
        "--data.max_len", "80", "--train.batch_size", "64", "--train.micro_batch_size", "64",
        "--train.max_epochs", str(epochs), "--train.seed", str(seed), "--adam.lr", "3e-3",
        "--ds.zero_stage", "2", "--ds.param_dtype", param_dtype, "--ds.attn_implementation", "eager",
        "--ckpt.output_dir", str(out),
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


@torch.no_grad()
def pass_rates(model_dir: Path, rows: list[dict], samples: int, seed: int, batch: int = 64) -> list[float]:
    """Per row, the fraction of `samples` answers sampled at temperature 1 that are correct.

    Sampled with transformers (no engine to start), through the chat template as OpenRLHF's
    --data.apply_chat_template does.
    """
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    out = []
    for start in tqdm(range(0, len(rows), batch), desc="warm start pass rates", leave=False):
        enc = tok(texts[start : start + batch], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8,
            num_return_sequences=samples, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        answers = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, row in enumerate(rows[start : start + batch]):
            out.append(sum(is_correct(a, row["label"]) for a in answers[i * samples : (i + 1) * samples]) / samples)
    return out


def summarise(rows: list[dict], rates: list[float]) -> dict[str, float]:
    """Mean pass rate overall, per family and per family/difficulty."""
    groups = defaultdict(list)
    for row, rate in zip(rows, rates):
        for key in ("all", row["family"], f"{row['family']}/{row['difficulty']}"):
            groups[key].append(rate)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def warm_start(cache: Path, seed: int = 0, sft_examples: int = 8000, sft_epochs: int = 3) -> Path:
    """Build what is missing under `cache`; returns the warm-started model's directory."""
    suite, base, model = cache / "suite", cache / "base", cache / "warm_start"
    if not _done(suite):
        build_suite(suite, seed=seed, sft=sft_examples)
        _mark(suite)
    if not _done(base):
        build_tiny_model(base, seed=seed, **MODEL_SHAPE)
        _mark(base)
    if not _done(model):
        sft(base, suite / "sft.jsonl", model, sft_epochs, seed)
        pool = read_jsonl(suite / "pool.jsonl")
        rates = pass_rates(model, pool, samples=8, seed=seed)
        summary = summarise(pool, rates)
        (model / "pool_pass_rates.json").write_text(json.dumps(summary, indent=1))
        spread = sum(0 < r < 1 for r in rates) / len(rates)
        print(f"warm start: pool pass rate {summary['all']:.3f}, {spread:.0%} of pool prompts between 0 and 1")
        if spread == 0:
            raise RuntimeError(
                f"{model}: no pool prompt has a pass rate between 0 and 1, GRPO would have nothing to learn; "
                "change --sft-examples / --sft-epochs and delete this directory"
            )
        _mark(model)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-examples", type=int, default=8000)
    parser.add_argument("--sft-epochs", type=int, default=3)
    args = parser.parse_args(argv)
    print(warm_start(args.cache, args.seed, args.sft_examples, args.sft_epochs))


if __name__ == "__main__":
    main()
