"""Reward of the demo suite in OpenRLHF's reward-function contract (--reward.remote_url FILE).

1.0 when the response, normalised, is exactly the label's integer, else 0.0. Normalising strips
whitespace, the chat template's special tokens, a trailing period and thousands separators;
anything else (extra words, a second number) is wrong, so the reward cannot be gamed.
"""

from __future__ import annotations

import re

import torch

_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def normalise(text: str) -> str:
    return _SPECIAL.sub("", text).strip().rstrip(".").replace(",", "").strip()


def is_correct(response: str, label: str) -> bool:
    answer = normalise(response)
    return re.fullmatch(r"-?\d+", answer) is not None and int(answer) == int(label)


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **kwargs) -> dict:
    rewards = torch.tensor(
        [float(is_correct(q[len(p) :] if q.startswith(p) else q, lab)) for q, p, lab in zip(queries, prompts, labels)]
    )
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
