"""A seeded suite of short, verifiable arithmetic problems, in families and difficulties.

    python -m openrlhf_cropi.demo.tasks OUT_DIR [--design habits] [--seed 0] [--pool 640] [--val 48] [--test 48] [--sft 24000]
    python -m openrlhf_cropi.demo.tasks SUITE_DIR --oracle-pool FAMILY...   # prints the oracle arm's pool file

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

Two designs (DESIGNS):
  habits    seven families, each its own habit, each recognisable from its wording: a word-overlap
            selector finds a target family as well as the gradient can.
  surface   surface form and lesson disagree. Four skills (add, sub, mul, cmp), each in a symbolic
            form ("What is 12 + 5?") and a word form ("Ann has 12 coins and gets 5 more. ..."); the
            habit belongs to the skill, in both forms. The word forms share their template, so
            word-form subtraction looks like word-form addition and carries another lesson. The
            validation set is word-form addition (add_word), which the pool lacks: what transfers
            to it is symbolic addition (other words, same lesson), not word-form subtraction (same
            words, other lesson). The test set has every family, so the target skill is measured
            in both forms.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
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


def parse_targets(names: Sequence[str], flag: str = "--targets", design: str = "habits") -> tuple[str, ...]:
    """Validated target families of a design: distinct, known, and not every skill (nothing would be untargeted)."""
    spec = DESIGNS[design]
    targets = tuple(dict.fromkeys(names))
    unknown = [n for n in targets if n not in spec.families]
    if unknown or not targets or len(spec.targeted(targets)) == len(spec.families):
        raise ValueError(f"{flag} {' '.join(names)}: give families of 1 to {len(set(spec.skills.values())) - 1} skills "
                         f"of the {design} design's {', '.join(spec.families)}"
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


def _word_add(rng, d):
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = _number(rng, d), _number(rng, d)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} now?", a + b


def _word_sub(rng, d):  # the same words as _word_add but the verb: the lexical look-alike
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    b, difference = _number(rng, d), _number(rng, d)
    return f"{name} has {b + difference} {thing} and gives away {b}. How many {thing} now?", difference


def _word_mul(rng, d):
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = _number(rng, d), rng.randint(2, 9)
    return f"{name} has {b} bags of {a} {thing}. How many {thing} now?", a * b


def _word_cmp(rng, d):
    (name, other), thing = rng.sample(_NAMES, 2), rng.choice(_THINGS)
    a, b = rng.sample(range(10 ** (d - 1) if d > 1 else 0, 10**d), 2)
    return f"{name} has {a} {thing} and {other} has {b}. How many {thing} has the richer one?", max(a, b)


@dataclass(frozen=True)
class Design:
    """A suite's families: their generators and habits, the skill each belongs to (the lesson its
    habit teaches), the families the RL pool draws from, and the default validation families."""

    generators: dict[str, Callable[[random.Random, int], tuple[str, int]]]
    habits: dict[str, str]
    skills: dict[str, str]
    pool_families: tuple[str, ...]
    default_targets: tuple[str, ...]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.generators)

    def targeted(self, targets: Sequence[str]) -> tuple[str, ...]:
        """The families of the targets' skills: what a run targeted by these validation sets should learn."""
        skills = {self.skills[t] for t in targets}
        return tuple(f for f in self.families if self.skills[f] in skills)


_SURFACE_HABITS = {"add": "= {}", "sub": "{} left", "mul": "{}.0", "cmp": "max {}"}
DESIGNS = {
    "habits": Design({f: GENERATORS[f] for f in FAMILIES}, HABITS, {f: f for f in FAMILIES}, FAMILIES, DEFAULT_TARGETS),
    "surface": Design(
        generators={"add_sym": _add, "add_word": _word_add, "sub_sym": _sub, "sub_word": _word_sub,
                    "mul_sym": _mul, "mul_word": _word_mul, "cmp_sym": _compare, "cmp_word": _word_cmp},
        habits={f"{skill}_{form}": h for skill, h in _SURFACE_HABITS.items() for form in ("sym", "word")},
        skills={f"{skill}_{form}": skill for skill in _SURFACE_HABITS for form in ("sym", "word")},
        pool_families=("add_sym", "sub_sym", "sub_word", "mul_sym", "mul_word", "cmp_sym", "cmp_word"),
        default_targets=("add_word",),
    ),  # fmt: skip
}


def _rows(
    rng: random.Random, family: str, count: int, seen: set[str], datasource: str, unique: bool = True,
    generators: dict = GENERATORS,
) -> list[dict]:
    """`count` problems of one family, difficulties in turn, none in `seen`; `unique` adds them to it."""
    rows = []
    for _ in range(count * 200):
        if len(rows) == count:
            break
        difficulty = DIFFICULTIES[len(rows) % len(DIFFICULTIES)]
        prompt, answer = generators[family](rng, difficulty)
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


def build_suite(
    out: Path, seed: int = 0, pool: int = 640, val: int = 48, test: int = 48, sft: int = 24000, design: str = "habits"
) -> Path:
    """Write the suite to `out` (sizes are totals per file; val and test are per family), and
    design.json naming its design."""
    spec = DESIGNS[design]
    families, gen = spec.families, spec.generators
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    # Evaluation data first, so the pool and the SFT data can never contain an evaluation prompt.
    files: dict[str, list[dict]] = {}
    for family in families:
        files[f"val_{family}.jsonl"] = _rows(rng, family, val, seen, f"val_{family}", generators=gen)
    files["test.jsonl"] = [row for family in families for row in _rows(rng, family, test, seen, family, generators=gen)]
    held_out = set(seen)
    per_family = -(-pool // len(spec.pool_families))
    pool_rows = [row for family in spec.pool_families for row in _rows(rng, family, per_family, seen, "pool", generators=gen)]
    pool_rows = pool_rows[:pool]
    rng.shuffle(pool_rows)
    files["pool.jsonl"] = pool_rows
    # Warm-start pairs come from the same distribution, every family (repeats allowed: there are
    # only 100 one-digit sums); they may contain pool prompts, never validation or test prompts.
    sft_rows = []
    for family in families:
        sft_rows += _rows(rng, family, -(-sft // len(families)), held_out, "sft", unique=False, generators=gen)
    rng.shuffle(sft_rows)
    files["sft.jsonl"] = [
        {"prompt": r["prompt"],
         "response": spec.habits[r["family"]].format(r["label"]) if rng.random() < HABIT_RATE else r["label"]}
        for r in sft_rows[:sft]
    ]  # fmt: skip
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "design.json").write_text(json.dumps({"design": design}) + "\n")
    return out


def suite_design(suite: Path) -> str:
    """The name of the design a suite directory was built with (design.json; "habits" for a suite without it)."""
    path = suite / "design.json"
    return json.loads(path.read_text())["design"] if path.exists() else "habits"


def write_oracle_pool(suite: Path, targets: Sequence[str]) -> Path:
    """The pool's prompts of the targets' skills (every form), for the oracle arm: SUITE/pool-oracle-<targets>.jsonl."""
    design = suite_design(suite)
    targeted = set(DESIGNS[design].targeted(parse_targets(targets, "--oracle-pool", design)))
    out = suite / f"pool-oracle-{'-'.join(targets)}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(suite / "pool.jsonl") if r["family"] in targeted))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--design", choices=list(DESIGNS), default="habits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=640)
    parser.add_argument("--val", type=int, default=48, help="prompts per validation set (one per family)")
    parser.add_argument("--test", type=int, default=48, help="test prompts per family")
    parser.add_argument("--sft", type=int, default=24000)
    parser.add_argument("--oracle-pool", nargs="+", metavar="FAMILY", help="write the oracle arm's pool of an existing suite")
    args = parser.parse_args(argv)
    if args.oracle_pool:
        try:
            print(write_oracle_pool(args.out, args.oracle_pool))
        except ValueError as e:
            parser.error(str(e))
        return
    build_suite(args.out, args.seed, args.pool, args.val, args.test, args.sft, args.design)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
