"""Does GRPO raise targeted accuracy on the demo's warm start, at what learning rate, and would
a perfect selection of the targeted families' prompts beat drawing from the whole pool?

    python benchmarks/grpo_probe.py --lr 1e-4 [--steps 16] [--only-targets] [--targets add linear]
                                    [--threads 2] [--eval-every 4]

A plain PyTorch GRPO loop (NOT the product pipeline: no OpenRLHF, vLLM or DeepSpeed), about 4
minutes per 16-step run here, for scanning what the real pipeline (15+ minutes a run) should use:
each step samples 8 answers (temperature 1, 8 tokens) for 16 pool prompts drawn at random
(full data), or with --only-targets from the targeted families' pool prompts only (an oracle
selection by family). Advantages normalised
per group (OpenRLHF's group_norm), on-policy policy-gradient loss averaged over response tokens
(EOS included), AdamW betas (0.9, 0.95) as OpenRLHF's actor, gradient clipping at 1.0.
Prints test pass@1 (8 samples per prompt, the same sampling seed at every evaluation, so the
curve is paired) every --eval-every steps: T / U = targeted / untargeted families, T1 / U1 the
same at difficulty 1, then per family and difficulty.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openrlhf_cropi.demo.reward import is_correct  # noqa: E402
from openrlhf_cropi.demo.tasks import DEFAULT_TARGETS, parse_targets, read_jsonl  # noqa: E402
from openrlhf_cropi.demo.warm_start import WARM_START, load, sample, suite  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--only-targets", action="store_true", help="train on the targeted families' prompts only")
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--threads", type=int, default=2)
    # An evaluation reseeds torch's RNG (paired curves), so its interval is part of the run's trajectory.
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/demo-cache")
    args = parser.parse_args(argv)
    targets = parse_targets(args.targets)
    torch.set_num_threads(args.threads)
    model, tok = load(WARM_START)
    data = suite(args.cache)
    pool = read_jsonl(data / "pool.jsonl")
    test = read_jsonl(data / "test.jsonl")
    if args.only_targets:
        pool = [r for r in pool if r["family"] in targets]

    def rewards(rows: list[dict], enc, gen) -> torch.Tensor:
        answers = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return torch.tensor([float(is_correct(a, rows[j // 8]["label"])) for j, a in enumerate(answers)]).view(len(rows), 8)

    def evaluate() -> str:
        model.eval()
        torch.manual_seed(123)
        scores = torch.cat([rewards(test[i : i + 48], *sample(model, tok, test[i : i + 48], 8)) for i in range(0, len(test), 48)])
        model.train()
        groups: dict[str, list[float]] = {}
        for row, score in zip(test, scores.mean(1).tolist()):
            side = "T" if row["family"] in targets else "U"
            for key in (side, f"{side}1" if row["difficulty"] == 1 else None, f"{row['family']}{row['difficulty']}"):
                if key:
                    groups.setdefault(key, []).append(score)
        return " ".join(f"{k}={sum(v) / len(v):.2f}" for k, v in groups.items())

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(0)
    torch.manual_seed(0)
    print(f"lr {args.lr} step 0 {evaluate()}", flush=True)
    for step in range(1, args.steps + 1):
        model.eval()
        rows = rng.sample(pool, 16)
        enc, gen = sample(model, tok, rows, 8)
        model.train()
        r = rewards(rows, enc, gen)
        advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-9)).view(-1)
        prompt_len = enc["input_ids"].shape[1]
        response = gen[:, prompt_len:]
        is_eos = (response == tok.eos_token_id).int()
        after_eos = (is_eos.cumsum(1) - is_eos) > 0
        mask = ~after_eos & ((response != tok.pad_token_id) | (response == tok.eos_token_id))
        attention = torch.cat([enc["attention_mask"].repeat_interleave(8, 0), mask.long()], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=gen, attention_mask=attention, position_ids=positions).logits[:, prompt_len - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, response[..., None])[..., 0]
        loss = -(advantages[:, None] * logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            print(f"lr {args.lr} step {step} train reward {r.mean():.3f} {evaluate()}", flush=True)


if __name__ == "__main__":
    main()
