"""The demo's warm start: the SFT loop, and the shipped checkpoint checked against the suite it was made from."""

import json

import pytest
import torch

from openrlhf_cropi.demo import warm_start as ws
from openrlhf_cropi.demo.tasks import build_suite, read_jsonl
from openrlhf_cropi.tiny_model import build_tiny_model


def test_sft_learns_one_family_and_is_seeded(tmp_path):
    base = build_tiny_model(tmp_path / "base", num_hidden_layers=1, max_position_embeddings=128)
    rows = [r for r in read_jsonl(build_suite(tmp_path / "suite", pool=70, val=3, test=3, sft=700) / "sft.jsonl")
            if r["prompt"].startswith("Which is larger")]  # fmt: skip
    args = dict(steps=40, batch=16, lr=3e-3, warmup=10, clip=1.0, seed=0)
    losses = ws.sft(base, rows, tmp_path / "a", **args)
    assert len(losses) == 40 and sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
    again = ws.sft(base, rows, tmp_path / "b", **args)
    assert again == losses
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


@pytest.mark.parametrize("design", list(ws.WARM_STARTS))
def test_shipped_warm_start_belongs_to_the_suite_and_has_spread(tmp_path, design):
    assert ws.warm_start(tmp_path, design) == ws.WARM_STARTS[design]
    record = json.loads((ws.WARM_STARTS[design] / "warm_start.json").read_text())
    # The bar GRPO needs (issue 13): at least 40% of the pool with 0 < pass rate < 1 at K = 8.
    assert record["pool_share_with_variance"] >= 0.4
    model = ws.WARM_STARTS[design] / "model.safetensors"
    from safetensors.torch import load_file

    assert sum(t.numel() for t in load_file(model).values()) == 3_389_696
    assert all(t.dtype == torch.float32 for t in load_file(model).values())


def test_a_changed_suite_is_refused_naming_rebuild(tmp_path):
    suite = ws.suite(tmp_path)
    with open(suite / "sft.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "What is 1 + 1?", "response": "2"}) + "\n")
    with pytest.raises(RuntimeError, match="--rebuild"):
        ws.warm_start(tmp_path)
