"""A tiny float32 Qwen2 causal LM with random weights, built in-process (no files, no network)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 200


def make_tiny_lm(seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


@pytest.fixture
def tiny_lm() -> Qwen2ForCausalLM:
    return make_tiny_lm(0)
