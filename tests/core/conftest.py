"""A tiny float32 Qwen2 causal LM with random weights, built in-process (no files, no network)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 200


def make_tiny_lm(seed: int = 0, tie_word_embeddings: bool = False) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


@pytest.fixture
def tiny_lm() -> Qwen2ForCausalLM:
    return make_tiny_lm(0)


@pytest.fixture
def tiny_tied_lm() -> Qwen2ForCausalLM:
    """The same with lm_head tied to the embedding (Qwen2.5-0.5B/1.5B, SmolLM2)."""
    return make_tiny_lm(0, tie_word_embeddings=True)
