"""The demo's task suite: seeded, correct answers, no evaluation prompt in training data."""

import re

import pytest

from openrlhf_cropi.demo.reward import is_correct
from openrlhf_cropi.demo.tasks import (
    DEFAULT_TARGETS, DESIGNS, DIFFICULTIES, FAMILIES, HABIT_RATE, HABITS, build_suite, parse_targets, read_jsonl,
    suite_design, write_oracle_pool,
)  # fmt: skip

VAL_FILES = tuple(f"val_{f}.jsonl" for f in FAMILIES)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_suite(tmp_path_factory.mktemp("suite"), seed=0, pool=140, val=12, test=9, sft=700)


def _solve(prompt: str) -> int:
    """An independent solver, from the prompt text alone."""
    n = [int(x) for x in re.findall(r"\d+", prompt)]
    if m := re.fullmatch(r"What is (\d+) ([-+*]|mod) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "mod" else a % b
    if prompt.startswith("Which is larger"):
        return max(n)
    if prompt.startswith("Solve for x"):
        a, b, c = n
        assert (c - b) % a == 0
        return (c - b) // a
    if "gets" in prompt:
        return n[0] + n[1]
    if "gives away" in prompt:
        return n[0] - n[1]
    if "bags of" in prompt:
        return n[0] * n[1]
    if "the richer one" in prompt:
        return max(n)
    raise AssertionError(f"unknown prompt {prompt!r}")


def test_every_label_is_the_answer(suite):
    for name in ("pool.jsonl", "test.jsonl", *VAL_FILES):
        for row in read_jsonl(suite / name):
            assert int(row["label"]) == _solve(row["prompt"]), row
            assert int(row["label"]) >= 0
    habits = 0
    for row in read_jsonl(suite / "sft.jsonl"):
        answer = _solve(row["prompt"])
        if row["response"] != str(answer):
            assert row["response"] in {h.format(answer) for h in HABITS.values()}, row
            habits += 1
    assert abs(habits / 700 - HABIT_RATE) < 0.1


def test_every_habit_is_rejected_by_the_reward_and_fits_the_demo_token_budget():
    from transformers import AutoTokenizer

    from openrlhf_cropi.demo.warm_start import WARM_START

    tok = AutoTokenizer.from_pretrained(WARM_START)
    assert set(HABITS) == set(FAMILIES)
    for habit in HABITS.values():
        assert is_correct("42", "42") and not is_correct(habit.format(42), "42"), habit
        # demo.sh samples 8 tokens: a two-digit answer in its habit still ends within them.
        assert len(tok(habit.format(42) + tok.eos_token)["input_ids"]) <= 8, habit


def test_files_sizes_and_families(suite):
    pool = read_jsonl(suite / "pool.jsonl")
    assert len(pool) == 140
    assert {(r["family"], r["difficulty"]) for r in pool} == {(f, d) for f in FAMILIES for d in DIFFICULTIES}
    # A validation set per family, so any targets can be chosen without changing the suite.
    assert [sorted({r["family"] for r in read_jsonl(suite / f"val_{f}.jsonl")}) for f in FAMILIES] == [[f] for f in FAMILIES]
    assert all(len(read_jsonl(suite / name)) == 12 for name in VAL_FILES)
    test = read_jsonl(suite / "test.jsonl")
    assert len(test) == 9 * len(FAMILIES)
    # The datasource (OpenRLHF's eval tag) is the family: the report groups families by targets.
    assert all(r["datasource"] == r["family"] for r in test) and {r["family"] for r in test} == set(FAMILIES)
    assert len(read_jsonl(suite / "sft.jsonl")) == 700


def test_evaluation_prompts_never_appear_in_training_data(suite):
    held_out = {r["prompt"] for name in ("test.jsonl", *VAL_FILES) for r in read_jsonl(suite / name)}
    training = {r["prompt"] for name in ("pool.jsonl", "sft.jsonl") for r in read_jsonl(suite / name)}
    assert not held_out & training
    pool = [r["prompt"] for r in read_jsonl(suite / "pool.jsonl")]
    assert len(set(pool)) == len(pool)


def test_seeded(tmp_path, suite):
    again = build_suite(tmp_path / "a", seed=0, pool=140, val=12, test=9, sft=700)
    other = build_suite(tmp_path / "b", seed=1, pool=140, val=12, test=9, sft=700)
    assert (again / "pool.jsonl").read_text() == (suite / "pool.jsonl").read_text()
    assert (other / "pool.jsonl").read_text() != (suite / "pool.jsonl").read_text()


def test_too_many_distinct_problems_asked_for_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="distinct problems"):
        build_suite(tmp_path, seed=0, pool=10, val=2000, test=1, sft=10)


def test_targets_are_validated_with_the_flag_named():
    assert parse_targets(["mul", "compare", "mul"]) == ("mul", "compare")
    assert parse_targets(list(DEFAULT_TARGETS)) == DEFAULT_TARGETS
    for bad, match in [(["add", "division"], "unknown: division"), ([], "1 to 6 skills"), (list(FAMILIES), "1 to 6 skills")]:
        with pytest.raises(ValueError, match=match) as err:
            parse_targets(bad)
        assert str(err.value).startswith("--targets")


@pytest.fixture(scope="module")
def surface(tmp_path_factory):
    return build_suite(tmp_path_factory.mktemp("surface"), seed=0, pool=140, val=12, test=9, sft=800, design="surface")


def test_surface_design_labels_habits_and_pool(surface):
    """Every label right (the same independent solver); a habit belongs to the skill, in both
    forms; the pool lacks the validation form (word-form addition) and has the rest."""
    design = DESIGNS["surface"]
    assert suite_design(surface) == "surface"
    for name in ("pool.jsonl", "test.jsonl", *(f"val_{f}.jsonl" for f in design.families)):
        for row in read_jsonl(surface / name):
            assert int(row["label"]) == _solve(row["prompt"]) >= 0, row
    skill_words = {"add": ("+", "gets"), "sub": (" - ", "gives away"), "mul": ("*", "bags of"), "cmp": ("larger", "richer")}
    habits = 0
    for row in read_jsonl(surface / "sft.jsonl"):
        skill = next(k for k, words in skill_words.items() if any(w in row["prompt"] for w in words))
        answer = _solve(row["prompt"])
        if row["response"] != str(answer):
            assert row["response"] == design.habits[f"{skill}_sym"].format(answer), row
            habits += 1
    assert abs(habits / 800 - HABIT_RATE) < 0.1
    assert design.habits["add_sym"] == design.habits["add_word"] != design.habits["sub_word"]
    pool = read_jsonl(surface / "pool.jsonl")
    assert {r["family"] for r in pool} == set(design.families) - {"add_word"}
    assert {r["family"] for r in read_jsonl(surface / "test.jsonl")} == set(design.families)
    # The look-alike: word-form subtraction shares the validation form's template.
    word_sub = next(r["prompt"] for r in pool if r["family"] == "sub_word")
    word_add = read_jsonl(surface / "val_add_word.jsonl")[0]["prompt"]
    assert word_sub.split()[0] in {"Ann", "Bob", "Cy", "Dee", "Eve"} and word_add.endswith("now?") and word_sub.endswith("now?")
    assert parse_targets(["add_word"], design="surface") == ("add_word",)
    with pytest.raises(ValueError, match="unknown: add"):
        parse_targets(["add"], design="surface")


def test_oracle_pool_holds_the_targeted_skills_prompts(surface, suite):
    rows = read_jsonl(write_oracle_pool(surface, ["add_word"]))
    assert rows and {r["family"] for r in rows} == {"add_sym"}  # the skill's only form in the pool
    assert len(rows) == sum(r["family"] == "add_sym" for r in read_jsonl(surface / "pool.jsonl"))
    assert {r["family"] for r in read_jsonl(write_oracle_pool(suite, ["add", "linear"]))} == {"add", "linear"}
