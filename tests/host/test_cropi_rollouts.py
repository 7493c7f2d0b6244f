"""The trainer's behavior-rollout pieces that need no running job: engine outputs to stored
records (a failed reward is an error or, flagged, a left-out response: never a 0), and the
tokenizer stand-in that engine calls carry instead of the tokenizer itself."""

import pickle

import pytest
import torch

pytestmark = pytest.mark.host

from openrlhf_cropi.ray.trainer import _TokenizerByName, behavior_record  # noqa: E402


def sample(prompt, response, reward):
    """One sample as OpenRLHF 0.11.2's SingleTurnAgentExecutor.execute returns it (reward None when
    the reward function raised: the executor logs the exception and leaves it None)."""
    tokens = prompt + response
    return {"observation_tokens": tokens, "action_ranges": [(len(prompt), len(tokens))], "reward": reward,
            "prompt": "p", "label": "l", "scores": reward, "rollout_log_probs": None, "truncated": False}


def test_failed_reward_is_an_error_naming_the_prompt_or_a_left_out_response():
    prompt = [5, 6, 7]
    outputs = [sample(prompt, [1, 2], 1.0), sample(prompt, [3], None), sample(prompt, [4, 4, 4], torch.tensor([0.0]))]
    with pytest.raises(RuntimeError, match=r"reward of pool prompt 42 \('What is 2\+2\?'\) failed for response\(s\) \[1\] "
                                           r"of 3.*--cropi.skip_failed_rewards"):
        behavior_record("pool", 42, "What is 2+2?", "4", {}, outputs, max_len=64, skip_failed=False)
    rec = behavior_record("val0", 42, "What is 2+2?", "4", {"q": 1}, outputs, max_len=64, skip_failed=True)
    assert rec.rewards.tolist() == [1.0, 0.0]  # the failed response is left out, not scored 0
    assert [r.tolist() for r in rec.responses] == [[1, 2], [4, 4, 4]] and rec.prompt_ids.tolist() == prompt
    assert rec.behavior_logprobs is None and rec.row == {"q": 1}
    with pytest.raises(RuntimeError, match="failed for response"):  # nothing left to store
        behavior_record("pool", 1, "p", "l", {}, [sample(prompt, [1], None)] * 2, max_len=64, skip_failed=True)
    # Responses are cut at --data.max_len, as OpenRLHF cuts its own samples.
    rec = behavior_record("pool", 1, "p", "l", {}, outputs[:1] * 2, max_len=4, skip_failed=False)
    assert [r.tolist() for r in rec.responses] == [[1], [1]]


def test_sampling_log_probs_follow_the_kept_response_tokens():
    """vLLM's log-probs of the sampled tokens (OpenRLHF pads the prompt's part with zeros) are kept
    for the kept responses, cut where the tokens are; dropped when any is missing or not finite."""
    prompt = [5, 6, 7]
    outputs = [sample(prompt, [1, 2], 1.0), sample(prompt, [3], None), sample(prompt, [4, 4, 4], 0.0)]
    for out, lp in zip(outputs, ([-0.5, -1.5], [-2.0], [-0.125, -0.25, -0.375])):
        out["rollout_log_probs"] = [0.0] * len(prompt) + lp
    rec = behavior_record("pool", 0, "p", "l", {}, outputs, max_len=64, skip_failed=True)
    assert [s.tolist() for s in rec.sampling_logprobs] == [[-0.5, -1.5], [-0.125, -0.25, -0.375]]
    rec = behavior_record("pool", 0, "p", "l", {}, outputs[::2], max_len=5, skip_failed=False)
    assert [s.tolist() for s in rec.sampling_logprobs] == [[-0.5, -1.5], [-0.125, -0.25]]
    outputs[2]["rollout_log_probs"][-1] = float("-inf")
    assert behavior_record("pool", 0, "p", "l", {}, outputs[::2], max_len=64, skip_failed=False).sampling_logprobs is None
    outputs[2]["rollout_log_probs"] = None
    assert behavior_record("pool", 0, "p", "l", {}, outputs[::2], max_len=64, skip_failed=False).sampling_logprobs is None


def test_engine_calls_carry_the_tokenizer_by_name(tiny_models):
    stand_in = _TokenizerByName(str(tiny_models[0]), True)
    payload = pickle.dumps(stand_in)
    assert len(payload) < 500  # the name, not the vocabulary
    first, second = pickle.loads(payload), pickle.loads(payload)
    assert first is second  # loaded once per process
    assert first.decode(first("What is 2 + 2?", add_special_tokens=False)["input_ids"]) == "What is 2 + 2?"
