"""Pass rates of a model on suite files, per family and difficulty, by sampling with transformers.

    python -m openrlhf_cropi.demo.pass_rates MODEL FILE.jsonl [FILE.jsonl ...] [--samples 4]
                                             [--temperature 1.0] [--json OUT.json]

The demo's warm start uses it to check that GRPO has something to learn: pass rates on the
pool must be spread, neither all 0 nor all 1. Prompts go through the model's chat template,
as OpenRLHF's --data.apply_chat_template does.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_cropi.demo.reward import is_correct


@torch.no_grad()
def pass_rates(
    model_dir: str | Path, rows: list[dict], samples: int = 4, temperature: float = 1.0, batch: int = 64, seed: int = 0
) -> list[float]:
    """Fraction of `samples` sampled answers that are correct, per row."""
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True) for r in rows]
    out = []
    for start in tqdm(range(0, len(rows), batch), desc="pass rates", leave=False):
        enc = tok(texts[start : start + batch], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=8,
            num_return_sequences=samples, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        answers = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, row in enumerate(rows[start : start + batch]):
            out.append(sum(is_correct(a, row["label"]) for a in answers[i * samples : (i + 1) * samples]) / samples)
    return out


def summarise(rows: list[dict], rates: list[float]) -> dict[str, float]:
    """Mean pass rate per family, per family/difficulty and overall."""
    groups = defaultdict(list)
    for row, rate in zip(rows, rates):
        groups["all"].append(rate)
        groups[row["family"]].append(rate)
        groups[f"{row['family']}/{row['difficulty']}"].append(rate)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    rates = pass_rates(args.model, rows, args.samples, args.temperature)
    summary = summarise(rows, rates)
    summary["fraction_zero"] = sum(r == 0 for r in rates) / len(rates)
    summary["fraction_one"] = sum(r == 1 for r in rates) / len(rates)
    for k, v in summary.items():
        print(f"{k:>14s} {v:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
