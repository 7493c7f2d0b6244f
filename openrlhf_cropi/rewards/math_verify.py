"""Math answers checked with math-verify, in OpenRLHF's reward-function contract.

    --reward.remote_url /path/to/openrlhf_cropi/rewards/math_verify.py
    (the path: python -c "import openrlhf_cropi.rewards.math_verify as m; print(m.__file__)")

Reward 1.0 when the response's answer equals the label mathematically, else 0.0:
- the answer: the content of the last complete \\boxed{...} in the response if there is one,
  else the final number in it ("-3", "0.5", "1,234", "1/2"). Only a box holds an expression:
  a plain-text "7 + 5" is not read as 12, so echoing the question earns nothing;
- the label: a number or LaTeX ("12", "-3", "0.5", "\\frac{1}{2}", "\\sqrt{2}", "1,234");
- equality is math-verify's: 12 = 12.0, 1/2 = 0.5 = \\frac{1}{2}, 1,234 = 1234.
The response is the query after the prompt (OpenRLHF decodes prompt + response with the chat
template's special tokens, which are dropped). Malformed output, no answer, or a label that does
not parse: reward 0, never an exception. `extra_logs["answer_found"]` is 1 where the response
has an answer at all, so a run can tell wrong answers from missing ones.

Why a child process: math-verify bounds its work with SIGALRM, which only works in a process's
main thread, and OpenRLHF calls reward_func from worker threads (asyncio.to_thread), where
math-verify refuses to run with its timeout on. Without one, sympy can hang on a boxed
9^{9^{9^9}} (and a signal would not interrupt that C-level arithmetic anyway). So the checks
run in one child process per loaded reward file, one response at a time with a deadline; a
check that overruns kills the child (reward 0) and the next call starts a fresh one.

Needs `pip install math-verify==0.9.0` (or the `math` extra of openrlhf-cropi).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

if importlib.util.find_spec("math_verify") is None:
    raise ImportError(
        "the math-verify reward needs the math-verify package: pip install math-verify==0.9.0 "
        "(or pip install 'openrlhf-cropi[math]')"
    )

CHECK_SECONDS = 10.0  # per response: math-verify's own defaults are 5 s to parse + 5 s to verify
START_SECONDS = 120.0  # importing sympy in the child, on a loaded machine
# Chat-template control tokens: <|im_end|>, <|eot_id|>, ... and DeepSeek's <｜end▁of▁sentence｜>.
_SPECIAL = re.compile(r"<\|[^<>|]{1,40}\|>|<｜[^<>｜]{1,40}｜>")
# An integer with or without thousands separators, an optional decimal part, or a fraction a/b.
_NUMBER = re.compile(r"(?<![\d.,/])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+|/\d+)?")
_BOXED = "\\boxed{"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class _Checker:
    """The child process that runs math-verify; thread-safe, restarted after a failed check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        path = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
        child = subprocess.Popen(
            [sys.executable, "-m", "openrlhf_cropi.rewards.math_verify"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        if _read_line(child, START_SECONDS) != "ready":
            _stop(child)
            raise RuntimeError("the math-verify checker process did not start (its error is on stderr above)")
        return child

    def __call__(self, answer: str, label: str) -> bool:
        with self._lock:
            if self._child is None:
                self._child = self._start()
            try:
                self._child.stdin.write(json.dumps([answer, label]) + "\n")
                self._child.stdin.flush()
                reply = _read_line(self._child, CHECK_SECONDS)
                if reply in ("true", "false"):
                    return reply == "true"
            except OSError:  # the child died
                pass
            # Overran its deadline, died, or answered garbage: a fresh child for the next check.
            _stop(self._child)
            self._child = None
            return False


def _read_line(child: subprocess.Popen, timeout: float) -> str | None:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    return child.stdout.readline().strip() if ready else None


def _stop(child: subprocess.Popen) -> None:
    child.kill()
    child.communicate()  # reaps it and closes its pipes


_check = _Checker()


def response_text(query: str, prompt: str) -> str:
    return _SPECIAL.sub("", query[len(prompt) :] if query.startswith(prompt) else query)


def extract_answer(response: str) -> str | None:
    """The last complete \\boxed{...} (as written) if any, else the final number; None if neither."""
    start = response.rfind(_BOXED)
    while start >= 0:
        depth = 0
        for end in range(start + len(_BOXED) - 1, len(response)):
            depth += {"{": 1, "}": -1}.get(response[end], 0)
            if depth == 0:
                return response[start : end + 1]
        start = response.rfind(_BOXED, 0, start)  # this one is never closed: an earlier one
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def reward_func(queries: list[str], prompts: list[str], labels: list, **kwargs) -> dict:
    import torch  # here, not at the top: the checker child runs this file and needs no torch

    answers = [extract_answer(response_text(q, p)) for q, p in zip(queries, prompts)]
    correct = [a is not None and label is not None and _check(a, str(label)) for a, label in zip(answers, labels)]
    rewards = torch.tensor(correct, dtype=torch.float32)
    found = torch.tensor([a is not None for a in answers], dtype=torch.float32)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"answer_found": found}}


def _serve() -> None:
    """The child: one JSON [answer, label] per line in, one JSON true/false per line out."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts off is deliberate (see above)
    print("ready", flush=True)
    for line in sys.stdin:
        answer, label = json.loads(line)
        try:
            # A LaTeX label needs math delimiters to be read as LaTeX ("\sqrt{2}" would yield 2).
            gold = parse(f"${label}$" if "\\" in label else label, parsing_timeout=None)
            parsed = parse(answer, parsing_timeout=None)
            correct = bool(gold) and bool(parsed) and verify(gold, parsed, timeout_seconds=None)
        except Exception:  # math-verify catches its own errors; this is for anything it lets through
            correct = False
        print(json.dumps(bool(correct)), flush=True)


if __name__ == "__main__":
    _serve()
