"""The math-verify reward (openrlhf_cropi/rewards/math_verify.py) on realistic model outputs,
called the way OpenRLHF calls it: from worker threads, one query (prompt + response) at a time."""

import asyncio
import importlib.util
import os
import time

import pytest

if importlib.util.find_spec("math_verify") is None:
    if os.environ.get("CI"):
        pytest.fail("math-verify is missing: launch/local/setup_cpu.sh installs it", pytrace=False)
    pytest.skip("math-verify is missing: pip install math-verify==0.9.0", allow_module_level=True)

from openrlhf_cropi.rewards import math_verify as reward  # noqa: E402

# SmolLM2-135M-Instruct's chat template around "What is 7 + 5?", as OpenRLHF passes the prompt.
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
)

# (response, label, the answer read from it, reward). The first block is SmolLM2-135M-Instruct's
# own output (sampled at temperature 0.5 from the checkpoint openrlhf_cropi.models.smollm2 builds;
# long ones shortened).
CASES = [
    ("The answer is 12. To find 7 + 5, you simply add them together, which is 12.<|im_end|>", "12", "12", 1),
    ("To add 23 + 48, you simply add them together: 23 + 48 = 100.<|im_end|>", "71", "100", 0),
    ("23 + 48 = 77 + 24 = 121.<|im_end|>", "71", "121", 0),
    ("To solve this, we need to first find 9 and 6, then multiply them together.\n\n9 * 6 = 6 × 2 = 12\n\n"
     "So, 9 * 6 equals 54.<|im_end|>", "54", "54", 1),
    ("To calculate 9 * 6, you simply multiply 9 by itself, which is 81.<|im_end|>", "54", "81", 0),
    ("15 - 8 = 6<|im_end|>", "7", "6", 0),
    ("100 - 37 = 23.<|im_end|>", "63", "23", 0),
    # Rambling past the answer: the final number decides (35), not the "answer is 12" before it.
    ("7 + 5 = 12, which is a simple addition problem that can be solved using basic arithmetic operations. "
     "In this case, 7 can be viewed as 7 multiplied by 5, which is 35 in this context", "12", "35", 0),
    # Cut off at the token limit mid-sentence: the last number written is an operand.
    ("So, 12 * 3 = 36 pens are in 3 boxes.\n\nThis means that 12 * 3 = ", "36", "3", 0),
    ("Tom has 3 apples. If he buys 4 more apples, he has 3 + 4 = 7 apples.<|im_end|>", "7", "7", 1),
    # \boxed: the last complete box wins over any number, even one after it.
    ("15 - 8 = 7, so the answer is $\\boxed{7}$.<|im_end|>", "7", "\\boxed{7}", 1),
    ("I think it is \\boxed{8}. Wait, 15 - 8 = 7.", "7", "\\boxed{8}", 0),
    ("First \\boxed{8}, no: \\boxed{7", "7", "\\boxed{8}", 0),  # the last box is never closed
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", "\\boxed{\\frac{1}{2}}", 1),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", "\\boxed{\\sqrt{2}}", 1),
    ("\\boxed{7+5}", "12", "\\boxed{7+5}", 1),  # a box holds the answer, evaluated
    ("The answer is 7 + 5.", "12", "5", 0),  # plain text is not evaluated: echoing the question earns 0
    # Number formats and equivalence.
    ("The answer is 0.5", "\\frac{1}{2}", "0.5", 1),
    ("Half of it: 1/2", "0.5", "1/2", 1),
    ("It costs $1,234 in total.", "1234", "1,234", 1),
    ("The final answer is 12.0", "12", "12.0", 1),
    ("7 - 10 = -3.", "-3", "-3", 1),
    ("10-3=7", "7", "7", 1),
    ("The answer is 12 apples and 3 oranges.", "12", "3", 0),
    # No answer at all, or garbage.
    ("I'm sorry, I can't help with that.<|im_end|>", "12", None, 0),
    ("The answer is twelve.", "12", None, 0),
    ("", "12", None, 0),
    ("\\boxed{", "12", None, 0),
    ("}}}{{{\\frac{", "12", None, 0),
    ("\\boxed{abc}", "12", "\\boxed{abc}", 0),
]  # fmt: skip


def _call(responses, labels, prompt=PROMPT):
    return reward.reward_func([prompt + r for r in responses], [prompt] * len(responses), labels)


@pytest.mark.parametrize("response, label, answer, expected", CASES)
def test_realistic_outputs(response, label, answer, expected):
    assert reward.extract_answer(reward.response_text(PROMPT + response, PROMPT)) == answer
    out = _call([response], [label])
    assert out["rewards"].tolist() == [float(expected)]
    assert out["extra_logs"]["answer_found"].tolist() == [float(answer is not None)]


def test_batch_contract():
    """One call scores a whole batch exactly like one call per response; OpenRLHF's keys and shapes."""
    out = _call([c[0] for c in CASES], [c[1] for c in CASES])
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert out["rewards"].shape == (len(CASES),) and out["rewards"].dtype.is_floating_point
    assert out["rewards"].tolist() == [float(c[3]) for c in CASES]
    assert out["scores"].tolist() == out["rewards"].tolist()
    assert _call([], [])["rewards"].shape == (0,)


def test_the_prompt_is_not_read():
    """The prompt's numbers (7 + 5) and the template's special tokens are not the response."""
    assert _call(["I don't know.<|im_end|>"], ["5"])["rewards"].tolist() == [0.0]
    # A query whose prompt part differs from `prompts` (it was decoded differently) is read whole.
    assert reward.response_text("Q: 2 + 3<|im_end|>", "other") == "Q: 2 + 3"


@pytest.mark.parametrize(
    "label, expected",
    [(12, 1.0), ("12", 1.0), ("$12$", 1.0), ("\\boxed{12}", 1.0), ("12.0", 1.0), ("24/2", 1.0),
     ("13", 0.0), (None, 0.0), ("twelve", 0.0), ("", 0.0), ("\\frac{", 0.0)],
)  # fmt: skip
def test_label_formats(label, expected):
    assert _call(["So 7 + 5 = 12."], [label])["rewards"].tolist() == [expected]


def test_from_worker_threads():
    """OpenRLHF runs reward_func with asyncio.to_thread, where math-verify's own (SIGALRM) timeout
    cannot run; many threads at once share the one checker."""
    cases = CASES * 2

    async def all_at_once():
        return await asyncio.gather(*[asyncio.to_thread(_call, [c[0]], [c[1]]) for c in cases])

    results = asyncio.run(all_at_once())
    assert [r["rewards"].item() for r in results] == [float(c[3]) for c in cases]


def test_a_check_that_overruns_is_killed(monkeypatch):
    """sympy would evaluate 9^(9^(9^9)) for hours: the checker is killed at its deadline, the
    response gets 0, and the next check runs in a fresh checker."""
    monkeypatch.setattr(reward, "CHECK_SECONDS", 2.0)
    assert _call(["So 7 + 5 = 12."], ["12"])["rewards"].tolist() == [1.0]  # the checker is up
    t0 = time.perf_counter()
    out = _call(["\\boxed{9^{9^{9^{9}}}}", "So 7 + 5 = 12."], ["12", "12"])
    assert out["rewards"].tolist() == [0.0, 1.0]
    assert out["extra_logs"]["answer_found"].tolist() == [1.0, 1.0]
    assert time.perf_counter() - t0 < 60  # 2 s deadline plus a restart (importing sympy)


def test_missing_math_verify_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    spec = importlib.util.spec_from_file_location("reward_func", reward.__file__)
    with pytest.raises(ImportError, match=r"pip install math-verify==0\.9\.0"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.host
def test_through_openrlhfs_reward_executor():
    """OpenRLHF's own loader and thread offload (SingleTurnAgentExecutor, --reward.remote_url FILE.py)."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=reward.__file__)
    queries = [PROMPT + c[0] for c in CASES]
    results = asyncio.run(executor._fetch_rewards_via_func(queries, [PROMPT] * len(CASES), [c[1] for c in CASES]))
    assert [r["rewards"].item() for r in results] == [float(c[3]) for c in CASES]
