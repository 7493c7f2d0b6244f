"""Build a tiny Qwen2-architecture causal LM and tokenizer offline, for CPU tests and smoke runs.

    python -m openrlhf_cropi.tiny_model OUT_DIR [--hidden-size 128] [--layers 2] [--heads 4]
                                                [--kv-heads 2] [--intermediate-size 256] [--seed 0]

The directory loads with transformers' Auto classes, with vLLM (CPU) and with OpenRLHF's Actor.
Nothing is downloaded: the tokenizer is trained here on a built-in corpus and the weights are
random (seeded), so the model is useless as a solver but exact in shape and file layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# Qwen's own special tokens: <|im_end|> ends a chat turn (our eos), <|endoftext|> pads.
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# Qwen2-style template: one <|im_start|>role\n...<|im_end|>\n block per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Total vocab: 3 specials + 256 byte symbols + ~250 merges, small but with real multi-byte tokens.
BPE_VOCAB_SIZE = 512


def _corpus() -> list[str]:
    """Deterministic text in the style of the math prompts the tests and smoke runs use."""
    lines = [
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789",
        "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
        "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ = + * ^ % $ # @ & ~ `",
        "Solve the problem step by step. Put the final answer in \\boxed{}.",
        "user: Please answer the question. assistant: The answer is",
    ]
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            lines.append(f"What is {a} + {b}? Answer: {a + b}")
            lines.append(f"Compute {a} * {b} - {b}. The answer is \\boxed{{{a * b - b}}}.")
            lines.append(f"If x = {a} and y = {b}, what is x - y? Answer: {a - b}")
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: every string encodes without unknown tokens and decodes back exactly."""
    tok = Tokenizer(models.BPE())
    # Single digits (as Qwen does) keep numbers compositional; ByteLevel maps all bytes to symbols.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,  # ids 0..2, each a single token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,  # else decode() rewrites " ?", breaking round-trips
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write tokenizer, config, generation config and float32 safetensors weights to out_dir."""
    head_dim, rest = divmod(hidden_size, num_attention_heads)
    if rest or head_dim < 32:  # vLLM's CPU attention kernels need head_dim >= 32
        raise ValueError(
            f"hidden_size / num_attention_heads must be an integer >= 32, "
            f"got {hidden_size}/{num_attention_heads}"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        # Untied by default, like the larger Qwen2.5 models (lm_head its own tensor in the
        # checkpoint); tied like Qwen2.5-0.5B/1.5B and SmolLM2 for the tests of that case.
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # float32, as the CPU stack runs (--ds.param_dtype fp32): a bf16 checkpoint would make every
    # plain `from_pretrained` compute in bf16, which CPUs without native bf16 emulate slowly.
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.config.dtype = torch.float32
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="num_hidden_layers")
    p.add_argument("--heads", type=int, default=4, help="num_attention_heads")
    p.add_argument("--kv-heads", type=int, default=2, help="num_key_value_heads")
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_tiny_model(
        a.out_dir,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        intermediate_size=a.intermediate_size,
        max_position_embeddings=a.max_position_embeddings,
        seed=a.seed,
    )
    print(out)


if __name__ == "__main__":
    main()
