"""The demo's starting point: the task suite and a small model SFT-ed on it, shipped pre-built.

    python -m openrlhf_cropi.demo.warm_start CACHE_DIR [--design habits]   # builds the suite; prints model and suite
    python -m openrlhf_cropi.demo.warm_start CACHE_DIR --rebuild           # retrains the design's warm start (~30 min, 2 AVX2 cores)

Each suite design (openrlhf_cropi/demo/tasks.py) has its warm start (WARM_STARTS, under
launch/local/): a 3.4M-parameter model of the
tiny-model builder's architecture, trained by `--rebuild`: the suite (seed 0), the base model
(seed 0), then a plain float32 PyTorch SFT loop on the suite's answers (answer tokens only,
AdamW, warm-up then linear decay, gradient clipping; seeded batch order, single process,
2 threads: the same bytes on the same CPU), then its pass rates on the pool at K = 8
(warm_start.json). It ships because the SFT needs ~1500 steps to leave the loss plateau of
this task mix, about half an hour here, far beyond the demo's budget.

Without --rebuild this builds the suite when absent and checks that the shipped model was
trained on exactly this suite (sha256 of its SFT and pool files): a changed generator stops
with an error naming --rebuild instead of demonstrating on mismatched data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_cropi.demo.reward import is_correct
from openrlhf_cropi.demo.tasks import DESIGNS, build_suite, read_jsonl
from openrlhf_cropi.tiny_model import build_tiny_model

_LAUNCH = Path(__file__).resolve().parents[2] / "launch/local"
WARM_STARTS = {"habits": _LAUNCH / "demo-warm-start", "surface": _LAUNCH / "demo-warm-start-surface"}
WARM_START = WARM_STARTS["habits"]  # the default design's
# head_dim 32: the smallest vLLM's CPU attention takes.
MODEL_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=768, max_position_embeddings=256)  # fmt: skip
SFT = dict(steps=1500, batch=64, lr=1e-3, warmup=100, clip=1.0)  # what --rebuild trains with
SUITE_SEED = 0


def suite_digest(suite: Path) -> str:
    """sha256 over the files the warm start depends on: its SFT data and the pool it is rated on."""
    h = hashlib.sha256()
    for name in ("sft.jsonl", "pool.jsonl"):
        h.update((suite / name).read_bytes())
    return h.hexdigest()


def _prompt(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def sft(base: Path, rows: list[dict], out: Path, steps: int, batch: int, lr: float, warmup: int, clip: float, seed: int) -> list[float]:
    """Supervised fine-tuning on {"prompt", "response"} rows, loss on the response and EOS only.

    Returns the loss of every step; writes the model and tokenizer to `out`.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").train()
    data = []
    for r in rows:
        prompt = _prompt(tok, r["prompt"])
        data.append((tok(prompt + r["response"] + tok.eos_token)["input_ids"], len(tok(prompt)["input_ids"])))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, (steps - s) / max(steps - warmup, 1)))
    losses = []
    for _ in (bar := tqdm(range(steps), desc="warm-start SFT")):
        chosen = rng.sample(data, batch)
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((batch, width), tok.pad_token_id)
        mask = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100)
        for i, (ids, prompt_len) in enumerate(chosen):
            input_ids[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
            labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return losses


@torch.no_grad()
def sample(model, tok, rows: list[dict], samples: int) -> tuple[dict, torch.Tensor]:
    """`samples` answers per row as the demo samples them (temperature 1, no top-k/top-p, 8 new
    tokens), with transformers (no engine to start), through the chat template as OpenRLHF's
    --data.apply_chat_template does. `tok` pads on the left. Returns (the prompts' encoding,
    prompt + answer ids, row-major: row i's answers are i * samples onwards)."""
    enc = tok([_prompt(tok, r["prompt"]) for r in rows], return_tensors="pt", padding=True)
    gen = model.generate(
        **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8,
        num_return_sequences=samples, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return enc, gen


def answers(model, tok, rows: list[dict], samples: int, batch: int = 64, desc: str = "sampling") -> list[str]:
    """The decoded answers of `sample`, `batch` rows at a time: row i's are i * samples onwards."""
    out = []
    for start in tqdm(range(0, len(rows), batch), desc=desc, leave=False):
        enc, gen = sample(model, tok, rows[start : start + batch], samples)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def load(model_dir: Path):
    """(model in eval mode, float32; tokenizer padding on the left, as `sample` needs)."""
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval(), tok


def pass_rates(model_dir: Path, rows: list[dict], samples: int, seed: int) -> list[float]:
    """Per row, the fraction of `samples` answers sampled at temperature 1 that are correct."""
    model, tok = load(model_dir)
    torch.manual_seed(seed)
    sampled = answers(model, tok, rows, samples, desc="warm start pass rates")
    return [sum(is_correct(a, row["label"]) for a in sampled[i * samples : (i + 1) * samples]) / samples
            for i, row in enumerate(rows)]  # fmt: skip


def summarise(rows: list[dict], rates: list[float]) -> dict[str, float]:
    """Mean pass rate overall, per family and per family/difficulty."""
    groups = defaultdict(list)
    for row, rate in zip(rows, rates):
        for key in ("all", row["family"], f"{row['family']}/{row['difficulty']}"):
            groups[key].append(rate)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def suite(cache: Path, design: str = "habits") -> Path:
    """A design's demo suite under `cache` (suite/, suite-<design>/ for the others), built once
    (a DONE marker is written last)."""
    path = cache / ("suite" if design == "habits" else f"suite-{design}")
    if not (path / "DONE").exists():
        build_suite(path, seed=SUITE_SEED, design=design)
        (path / "DONE").write_text("")
    return path


def rebuild(cache: Path, design: str = "habits") -> dict:
    """Train the design's warm start from scratch and rate it on the pool; returns its record."""
    out = WARM_STARTS[design]
    data = suite(cache, design)
    base = build_tiny_model(cache / "base", seed=SUITE_SEED, **MODEL_SHAPE)
    torch.set_num_threads(2)  # part of what makes the bytes reproducible
    start = time.time()
    losses = sft(base, read_jsonl(data / "sft.jsonl"), out, seed=SUITE_SEED, **SFT)
    pool = read_jsonl(data / "pool.jsonl")
    rates = pass_rates(out, pool, samples=8, seed=SUITE_SEED)
    record = {
        "suite_sha256": suite_digest(data), "shape": MODEL_SHAPE, "sft": SFT, "sft_seconds": round(time.time() - start),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "final_loss": sum(losses[-50:]) / 50,
        "pool_share_with_variance": sum(0 < r < 1 for r in rates) / len(rates),
        "pool_pass_rates": summarise(pool, rates),
    }  # fmt: skip
    (out / "warm_start.json").write_text(json.dumps(record, indent=1))
    return record


def warm_start(cache: Path, design: str = "habits") -> Path:
    """The design's suite under `cache` and its shipped warm start, checked to belong together."""
    data, model = suite(cache, design), WARM_STARTS[design]
    record = model / "warm_start.json"
    rebuild_it = f"`python -m openrlhf_cropi.demo.warm_start {cache} --design {design} --rebuild`"
    if not record.exists():
        raise FileNotFoundError(f"{model}: no warm start here; build it with {rebuild_it}")
    if json.loads(record.read_text())["suite_sha256"] != suite_digest(data):
        raise RuntimeError(
            f"{data} is not the suite {model} was trained on (openrlhf_cropi/demo/tasks.py changed?): rebuild it with "
            f"{rebuild_it}"
        )
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--design", choices=list(DESIGNS), default="habits", help="the suite design")
    parser.add_argument("--rebuild", action="store_true", help="retrain the design's warm start (about 30 minutes on 2 cores)")
    args = parser.parse_args(argv)
    if args.rebuild:
        record = rebuild(args.cache, args.design)
        print(f"warm start: pool pass rate {record['pool_pass_rates']['all']:.3f}, "
              f"{record['pool_share_with_variance']:.0%} of pool prompts between 0 and 1")  # fmt: skip
    print(warm_start(args.cache, args.design))  # the last two lines: the model, then the suite
    print(suite(args.cache, args.design))


if __name__ == "__main__":
    main()
