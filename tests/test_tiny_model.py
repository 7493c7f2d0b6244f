"""The offline tiny Qwen2 model: loads with the Auto classes, tokenises math losslessly, is seeded."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from openrlhf_cropi.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_tokenizer_round_trip_and_specials(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for s in ["What is 12 + 35? Answer: 47", "Compute (3*4)/2 - 7^2 = -43; x != y, Q.E.D. \\boxed{42}"]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert plain.endswith("<|im_end|>\n")


def test_config_and_forward(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert cfg.model_type == "qwen2"
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention needs this
    assert cfg.vocab_size == len(tok)
    assert cfg.dtype == torch.float32

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    batch = tok(["What is 12 + 35? Answer:"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits.float()).all()
    assert math.isfinite(float(logits.float().std())) and float(logits.float().std()) > 0


def test_seeded_weights(tiny_dir, tmp_path):
    same = _weights(build_tiny_model(tmp_path / "same", seed=0))
    other = _weights(build_tiny_model(tmp_path / "other", seed=1))
    ref = _weights(tiny_dir)
    assert ref.keys() == same.keys() == other.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref)
    # The tokenizer does not depend on the seed and trains deterministically.
    assert (tiny_dir / "tokenizer.json").read_text() == (tmp_path / "other" / "tokenizer.json").read_text()


def test_rejects_small_head_dim(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path, hidden_size=64, num_attention_heads=4)
