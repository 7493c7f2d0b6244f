"""Selection at pool scale: the trainer's driver-side phase on a synthetic rollout store.

Writes a store of P prompts x K responses x about L tokens (random tokens and log-probs, 0/1
rewards, no model; log beta only for prompts with reward variance, as the behavior pass
stores it), then, in a fresh process, runs what the trainer does in a phase besides the policy
ranks' gradients: the store summary (rewards, flags), chunk-wise float32 scoring of
every usable pool prompt against V validation targets, reciprocal rank fusion and top-alpha
selection, the phase record (JSON). The projected gradients, the ranks' work that needs a
model, are rows of a fixed random bank here, so the times are the driver's own. Prints each
step's seconds and the process's peak RSS, next to the CPU capability.

    PYTHONPATH=. .venv/bin/python benchmarks/selection.py --prompts 20000 --responses 8 --tokens 512

``--tokens 64 512`` measures several response lengths side by side (one store and one fresh
process each): the peak must not grow with the response length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from openrlhf_cropi.core.scoring import pool_cosines, projected_cosines, select_prompts, tie_break_permutation
from openrlhf_cropi.core.store import PromptRollouts, RolloutStore


def write_store(path: Path, prompts: int, responses: int, tokens: int, seed: int = 0, chunk: int = 4096) -> int:
    """A synthetic store; rewards (hence the selection) depend on the seed only, not on ``tokens``.
    Returns its size in bytes."""
    store = RolloutStore.create(path, {"synthetic": True, "logprob_temperature": 1.0, "max_tokens": 8192})
    rewards_gen = torch.Generator().manual_seed(seed)
    tokens_gen = torch.Generator().manual_seed(seed + 1)
    for start in range(0, prompts, chunk):
        records = []
        for i in range(start, min(start + chunk, prompts)):
            rate = torch.rand((), generator=rewards_gen)
            rewards = (torch.rand(responses, generator=rewards_gen) < rate).float()
            lengths = torch.randint(tokens // 2, tokens + 1, (responses,), generator=tokens_gen).tolist()
            resp = [torch.randint(0, 150000, (n,), generator=tokens_gen) for n in lengths]
            varied = bool(rewards.max() != rewards.min())
            behavior = [-torch.rand(n, generator=tokens_gen) for n in lengths] if varied else None
            records.append(PromptRollouts(i, f"prompt {i}", str(i), {"prompt": f"prompt {i}", "label": str(i)},
                                          torch.randint(0, 150000, (64,), generator=tokens_gen), resp, rewards, behavior))  # fmt: skip
        store.append(records)
    return sum(p.stat().st_size for p in path.iterdir())


def phase(store_path: Path, proj_dim: int, val_sets: int, alpha: float, chunk: int) -> dict:
    """The trainer's phase without the ranks: summary, chunk-wise scoring, fusion, selection, record."""
    times = {}
    t = time.perf_counter()
    summary = RolloutStore(store_path).summary()
    usable = summary.usable
    times["summary"] = time.perf_counter() - t
    bank = torch.randn(1024, proj_dim, generator=torch.Generator().manual_seed(0))  # stands in for the ranks
    targets = [bank[v * 100 : (v + 1) * 100].double().mean(0) for v in range(val_sets)]
    t = time.perf_counter()
    cosines, _ = pool_cosines(torch.nonzero(usable).flatten().tolist(), len(summary), len(targets),
                              projected_cosines(lambda positions: [bank[p % len(bank)].clone() for p in positions],
                                                targets), chunk)  # fmt: skip
    times["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    selected, scores = select_prompts("influence", alpha, usable, summary.pass_rate, cosines, ~torch.isnan(cosines[0]))
    times["selection"] = time.perf_counter() - t
    t = time.perf_counter()
    record = json.dumps({"selected": selected, "scores": scores.tolist(), "cosines": [c.tolist() for c in cosines],
                         "tie_break": tie_break_permutation(len(scores), 0).tolist()})  # fmt: skip
    times["record"] = time.perf_counter() - t
    return {"prompts": len(summary), "usable": int(usable.sum()), "selected": selected, "record_bytes": len(record),
            "seconds": times, "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: on Linux that keeps the
    parent's peak across fork and exec, and the parent here has just written a store."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def measure(store_path: Path, a: argparse.Namespace) -> dict:
    """``phase`` in a fresh process, so that its peak RSS is the phase's alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--phase-of", str(store_path), "--proj-dim", str(a.proj_dim),
         "--val-sets", str(a.val_sets), "--alpha", str(a.alpha), "--chunk", str(a.chunk)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=20000)
    p.add_argument("--responses", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[512], help="response lengths to compare (up to this many)")
    p.add_argument("--proj-dim", type=int, default=32768)
    p.add_argument("--val-sets", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--chunk", type=int, default=1024, help="pool prompts scored per chunk (the trainer: 128 per rank)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temporary directory)")
    p.add_argument("--phase-of", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    a = parse_args()
    if a.phase_of is not None:
        print(json.dumps(phase(a.phase_of, a.proj_dim, a.val_sets, a.alpha, a.chunk)))
        return
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    print(f"pool {a.prompts} prompts x {a.responses} responses, d = {a.proj_dim}, {a.val_sets} validation sets, "
          f"alpha {a.alpha}, scoring chunk {a.chunk}\n")  # fmt: skip
    print("| response tokens | store MB | write s | summary s | scoring s | selection s | record s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for tokens in a.tokens:
            t = time.perf_counter()
            size = write_store(Path(tmp) / f"L{tokens}", a.prompts, a.responses, tokens)
            written = time.perf_counter() - t
            r = measure(Path(tmp) / f"L{tokens}", a)
            s = r["seconds"]
            print(f"| {tokens} | {size / 2**20:.0f} | {written:.0f} | {s['summary']:.2f} | {s['scoring']:.2f} | "
                  f"{s['selection']:.2f} | {s['record']:.2f} | {r['peak_rss_mb']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
