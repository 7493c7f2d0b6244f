"""A seeded suite of short, verifiable arithmetic problems, in families and difficulties.

    python -m openrlhf_cropi.demo.tasks OUT_DIR [--seed 0] [--pool 640] [--val 48] [--test 48] [--sft 24000]

writes, every row {"prompt", "label", "family", "difficulty", "datasource"}:
    pool.jsonl            the RL prompt pool: every family at every difficulty, shuffled
    val_<family>.jsonl    one validation set per family
    test.jsonl            held-out test prompts; datasource = the family
    sft.jsonl             warm-start pairs {"prompt", "response"}: the answer, or (HABIT_RATE of
                          them) the answer in its family's habit, a format the verifier rejects
A run's targets are the families whose validation sets it gives CROPI (--cropi.val_datasets);
the others appear only in its pool and test set. The files do not depend on the targets, so one
suite and one warm start serve every choice of them. The answer is a bare integer, so a
response is checked by exact match (reward.py). No prompt appears in two files.

The habits stand for what RLVR's first steps fix in real instruct models: answers right in
substance but in a form the verifier rejects ("x = 5", "12 now"), each family its own. A warm
start SFT-ed on this data says the bare answer about half the time; GRPO can learn a family's
habit away in a few steps, and prompts of the same family carry the same lesson, which is what
influence-guided selection can find. Getting the number itself right (carries, two-digit
equations) is not learned within the demo's budget (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Sequence

DIFFICULTIES = (1, 2, 3)
FAMILIES = ("add", "linear", "sub", "mul", "compare", "mod", "word")
DEFAULT_TARGETS = ("add", "linear")


# One wrong-format answer per family (short: responses are cut at 8 tokens), and how often the
# SFT data uses it.
HABITS = {"add": "= {}", "linear": "x = {}", "sub": "{} left", "mul": "{}.0", "compare": "max {}", "mod": "r {}",
          "word": "{} now"}  # fmt: skip
HABIT_RATE = 0.5


def parse_targets(names: Sequence[str], flag: str = "--targets") -> tuple[str, ...]:
    """Validated target families: distinct, known, and not all of them (nothing would be untargeted)."""
    targets = tuple(dict.fromkeys(names))
    unknown = [n for n in targets if n not in FAMILIES]
    if unknown or not targets or len(targets) == len(FAMILIES):
        raise ValueError(f"{flag} {' '.join(names)}: give 1 to {len(FAMILIES) - 1} of the families {', '.join(FAMILIES)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))  # fmt: skip
    return targets


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _add(rng, d):
    a, b = _number(rng, d), _number(rng, d)
    return f"What is {a} + {b}?", a + b


def _sub(rng, d):
    b, difference = _number(rng, d), _number(rng, d)  # the inverse of an addition: 100 problems at d = 1
    return f"What is {b + difference} - {b}?", difference


def _mul(rng, d):
    a, b = _number(rng, d), rng.randint(2, 9)
    return f"What is {a} * {b}?", a * b


def _compare(rng, d):
    a, b = rng.sample(range(10 ** (d - 1) if d > 1 else 0, 10**d), 2)
    return f"Which is larger, {a} or {b}?", max(a, b)


def _mod(rng, d):
    a, b = _number(rng, d + 1), rng.randint(2, 9)
    return f"What is {a} mod {b}?", a % b


def _linear(rng, d):
    x, a = _number(rng, d), rng.randint(2, 9)
    b = rng.randint(1, 9 * d)
    return f"Solve for x: {a}x + {b} = {a * x + b}.", x


_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve")
_THINGS = ("apples", "coins", "books", "cards")


def _word(rng, d):
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = _number(rng, d), _number(rng, d)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} now?", a + b
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} now?", a - b


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, int]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "compare": _compare, "mod": _mod, "linear": _linear, "word": _word,
}  # fmt: skip


def _rows(
    rng: random.Random, family: str, count: int, seen: set[str], datasource: str, unique: bool = True
) -> list[dict]:
    """`count` problems of one family, difficulties in turn, none in `seen`; `unique` adds them to it."""
    rows = []
    for _ in range(count * 200):
        if len(rows) == count:
            break
        difficulty = DIFFICULTIES[len(rows) % len(DIFFICULTIES)]
        prompt, answer = GENERATORS[family](rng, difficulty)
        if prompt in seen:
            continue
        if unique:
            seen.add(prompt)
        rows.append(
            {"prompt": prompt, "label": str(answer), "family": family, "difficulty": difficulty, "datasource": datasource}
        )
    if len(rows) < count:
        raise ValueError(f"family {family}: only {len(rows)} distinct problems, {count} asked for")
    return rows


def build_suite(out: Path, seed: int = 0, pool: int = 640, val: int = 48, test: int = 48, sft: int = 24000) -> Path:
    """Write the suite to `out` (sizes are totals per file; val and test are per family)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    # Evaluation data first, so the pool and the SFT data can never contain an evaluation prompt.
    files: dict[str, list[dict]] = {}
    for family in FAMILIES:
        files[f"val_{family}.jsonl"] = _rows(rng, family, val, seen, f"val_{family}")
    files["test.jsonl"] = [row for family in FAMILIES for row in _rows(rng, family, test, seen, family)]
    held_out = set(seen)
    per_family = -(-pool // len(FAMILIES))
    pool_rows = [row for family in FAMILIES for row in _rows(rng, family, per_family, seen, "pool")][:pool]
    rng.shuffle(pool_rows)
    files["pool.jsonl"] = pool_rows
    # Warm-start pairs come from the same distribution, repeats allowed (there are only 100
    # one-digit sums); they may contain pool prompts, never validation or test prompts.
    sft_rows = []
    for family in FAMILIES:
        sft_rows += _rows(rng, family, -(-sft // len(FAMILIES)), held_out, "sft", unique=False)
    rng.shuffle(sft_rows)
    files["sft.jsonl"] = [
        {"prompt": r["prompt"], "response": HABITS[r["family"]].format(r["label"]) if rng.random() < HABIT_RATE else r["label"]}
        for r in sft_rows[:sft]
    ]
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=640)
    parser.add_argument("--val", type=int, default=48, help="prompts per validation set (one per family)")
    parser.add_argument("--test", type=int, default=48, help="test prompts per family")
    parser.add_argument("--sft", type=int, default=24000)
    args = parser.parse_args(argv)
    build_suite(args.out, args.seed, args.pool, args.val, args.test, args.sft)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
