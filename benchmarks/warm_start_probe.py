"""Why the demo's warm start is weak: what it answers, and whether more SFT of this model would help.

    python benchmarks/warm_start_probe.py [--cache runs/demo-cache] [--steps 400]

1. Greedy answers of the cached warm start to the first test prompts of every family.
2. A plain fp32 PyTorch SFT loop (no OpenRLHF, no DeepSpeed) from the same base model on the
   same SFT data, batch 64, lr 1e-3: once on the comparison family alone, once on the whole
   7-family mixture. Prints the answer-token loss every 50 steps. If the mixture stays on a
   plateau where one family alone does not, the limit is the model/compute budget, not
   OpenRLHF's SFT trainer.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.reward import is_correct  # noqa: E402
from openrlhf_cropi.demo.tasks import FAMILIES, read_jsonl  # noqa: E402


def _prompt(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(model_dir: Path, rows: list[dict]) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok([_prompt(tok, r["prompt"]) for r in rows], return_tensors="pt", padding=True)
    gen = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    for row, answer in zip(rows, tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)):
        print(f"  {row['prompt']!r:60s} -> {answer!r:8s} ({'right' if is_correct(answer, row['label']) else 'wrong'}, label {row['label']})")


def plain_sft_losses(base: Path, rows: list[dict], steps: int, lr: float = 1e-3, batch: int = 64) -> dict[int, float]:
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    data = []
    for r in rows:
        prompt = _prompt(tok, r["prompt"])
        ids = tok(prompt + r["response"] + tok.eos_token)["input_ids"]
        data.append((ids, len(tok(prompt)["input_ids"])))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = {}
    for step in range(steps + 1):
        chosen = rng.sample(data, batch)
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100)
        for i, (ids, prompt_len) in enumerate(chosen):
            input_ids[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
            labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])  # loss on the answer + eos only
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            losses[step] = loss.item()
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    test = read_jsonl(args.cache / "suite/test.jsonl")
    print("greedy answers of the warm start (first 3 test prompts of each family):")
    greedy_answers(args.cache / "warm_start", [r for f in FAMILIES for r in [t for t in test if t["family"] == f][:3]])
    sft = read_jsonl(args.cache / "suite/sft.jsonl")
    print(f"plain fp32 SFT loop from {args.cache / 'base'}, answer-token loss by step:")
    for name, rows in [("comparison only", [r for r in sft if r["prompt"].startswith("Which is larger")]), ("all 7 families", sft)]:
        losses = plain_sft_losses(args.cache / "base", rows, args.steps)
        print(f"  {name:>16s}: " + "  ".join(f"{s}:{v:.2f}" for s, v in losses.items()))


if __name__ == "__main__":
    main()
