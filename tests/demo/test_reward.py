"""The demo's reward: exact match of a bare integer, in OpenRLHF's reward_func contract."""

import importlib.util
from pathlib import Path

import torch

from openrlhf_cropi.demo.reward import is_correct

REWARD_FILE = Path(__file__).resolve().parents[2] / "openrlhf_cropi/demo/reward.py"


def test_exact_integer_match_after_normalising():
    assert is_correct("42", "42")
    assert is_correct(" 42.<|im_end|>", "42")
    assert is_correct("1,042", "1042")
    assert is_correct("042", "42")
    for wrong in ("41", "42 43", "x = 42", "", "<|im_end|>", "forty-two", "-42"):
        assert not is_correct(wrong, "42"), wrong


def test_reward_func_loaded_as_openrlhf_loads_it():
    # OpenRLHF imports the file by path (--reward.remote_url FILE.py), not as a package module.
    spec = importlib.util.spec_from_file_location("reward_func", REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    out = module.reward_func([prompt + "5<|im_end|>", prompt + "6<|im_end|>"], [prompt, prompt], ["5", "5"])
    torch.testing.assert_close(out["rewards"], torch.tensor([1.0, 0.0]))
    assert out["scores"] is out["rewards"]
