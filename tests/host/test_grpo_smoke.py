"""launch/local/grpo_smoke.sh: plain OpenRLHF GRPO on the CPU stack, end to end."""

import os
import pathlib
import re
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = [pytest.mark.host, pytest.mark.e2e]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _scalars(tensorboard_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = [p for p in tensorboard_dir.iterdir() if p.is_dir()]
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_grpo_smoke_trains_checkpoints_and_syncs_vllm(tmp_path):
    # Importance-sampling correction makes OpenRLHF log vllm_kl: the mean gap between the
    # engine's log-probs of what it sampled and the DeepSpeed actor's. It stays at kernel noise
    # only if every step's weight sync reached the engine (without a sync it is the policy's
    # drift). The wide clip band leaves the loss unchanged.
    is_flags = (
        "--algo.advantage.is_correction_level token --algo.advantage.is_correction_mode clip "
        "--algo.advantage.is_correction_threshold 0 1000"
    )
    env = {**os.environ, "GRPO_SMOKE_EXTRA_ARGS": is_flags}
    run = subprocess.run(
        ["bash", str(ROOT / "launch/local/grpo_smoke.sh"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    # float32 end to end (--ds.param_dtype fp32, patches/): a bf16 fallback would be 10-35x slower
    # on CPUs without native bf16. The actor saves its parameters as it holds them, and vLLM
    # logs the dtype its engine runs in (before the patch it was always bfloat16).
    engine_dtypes = set(re.findall(r"Initializing a V1 LLM engine .*? dtype=(torch\.\w+)", run.stdout + run.stderr))
    assert engine_dtypes == {"torch.float32"}, engine_dtypes
    with safe_open(tmp_path / "final/model.safetensors", "pt") as saved:
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"F32"}

    assert (tmp_path / "ckpt/_actor/global_step3/mp_rank_00_model_states.pt").is_file()
    initial = load_file(tmp_path / "tiny_model/model.safetensors")
    final = load_file(tmp_path / "final/model.safetensors")
    assert initial.keys() == final.keys()
    changed = [name for name in initial if not torch.equal(initial[name], final[name])]
    assert len(changed) > len(initial) // 2, f"policy barely changed: {changed}"

    scalars = _scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["train/policy_loss"]] == [1, 2, 3]
    # The policy moved away from the reference (so the engine had something to catch up on)...
    assert scalars["train/kl"][-1][1] > 1e-3
    # ...and the engine's samples still score like the actor's at every step.
    assert all(abs(value) < 1e-3 for _, value in scalars["train/vllm_kl"]), scalars["train/vllm_kl"]
