"""CROPI's side computations leave OpenRLHF's training bit-for-bit untouched.

Two identical DeepSpeed policy actors train on the same experiences; one of them also runs
CROPI's behavior log-probs and projected gradients before and between the optimizer steps
(as the job does at phase boundaries). Their weights must stay bitwise identical.

Why not two whole jobs (with and without the side computation, same subsets forced)? Because
the CPU pipeline is not run-to-run reproducible: two runs of launch/local/grpo_smoke.sh with
identical flags (with or without --train.full_determinism_enable) end with weights differing by
up to 1.2e-2, from vLLM's sampling. On the actor every input is fixed, so any difference here
would be the side computation's doing.
"""

import pytest
import torch
from safetensors.torch import load_file

from openrlhf_cropi.cli.train_ppo_ray import parse_args

pytestmark = [pytest.mark.host, pytest.mark.e2e]

ray = pytest.importorskip("ray")


def _experience(seed: int):
    from openrlhf.trainer.ppo_utils.experience import Experience

    gen = torch.Generator().manual_seed(seed)
    batch, prompt_len, num_actions = 4, 6, 8
    sequences = torch.randint(3, 400, (batch, prompt_len + num_actions), generator=gen)
    action_mask = torch.ones(batch, num_actions, dtype=torch.bool)
    action_mask[0, -3:] = False
    advantages = torch.randn(batch, 1, generator=gen).expand(batch, num_actions).clone()
    return Experience(
        sequences=sequences,
        attention_mask=torch.ones_like(sequences),
        action_mask=action_mask,
        action_log_probs=-2.0 - torch.rand(batch, num_actions, generator=gen),
        base_action_log_probs=-2.0 - torch.rand(batch, num_actions, generator=gen),
        advantages=advantages,
        returns=advantages.clone(),
        rewards=torch.rand(batch, generator=gen),
        response_length=action_mask.sum(-1).float(),
        total_length=torch.full((batch,), float(prompt_len + num_actions)),
        info={},
    )


def _items():
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 400, (5,), generator=gen)
    responses = [torch.randint(3, 400, (n,), generator=gen) for n in (4, 7, 5)]
    behavior = [-2.0 - torch.rand(len(r), generator=gen) for r in responses]
    return [{"prompt_ids": prompt, "responses": responses, "rewards": torch.tensor([1.0, 0.0, 0.5]), "behavior": behavior}]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_side_computation_leaves_training_identical(cpu_env, tiny_models, tmp_path, zero_stage):
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from openrlhf.utils import get_strategy

    from openrlhf_cropi.ray.policy_actor import CropiPolicyModelActor

    model = str(tiny_models[0])
    projector = {"keep_ratio": 0.5, "proj_dim": 64, "kind": "sjlt", "seed": 0}
    ray.init(num_gpus=2, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        groups = {}
        for name in ("plain", "with_cropi"):
            args = parse_args(
                ["--actor.model_name_or_path", model, "--actor.num_gpus_per_node", "1", "--ds.zero_stage",
                 str(zero_stage), "--ds.param_dtype", "fp32", "--ds.attn_implementation", "eager", "--vllm.num_engines", "0",
                 "--algo.kl.init_coef", "1e-3", "--algo.kl.use_loss", "--algo.advantage.estimator", "group_norm",
                 "--rollout.n_samples_per_prompt", "2", "--train.batch_size", "4", "--train.micro_batch_size", "2",
                 "--actor.adam.lr", "1e-2", "--actor.lr_warmup_ratio", "0", "--ckpt.output_dir", str(tmp_path / name)]
            )  # fmt: skip
            groups[name] = group = RayActorGroup(1, 1, CropiPolicyModelActor, num_gpus_per_actor=1)
            ray.get(group.async_init_model_from_pretrained(get_strategy(args), model, 10, None))

        shares = [ray.put(_items())]
        for step in range(2):
            if step == 0:
                ray.get(groups["with_cropi"].async_run_method("cropi_behavior_log_probs", shares, 1.0, 64))
            ray.get(groups["with_cropi"].async_run_method("cropi_project", shares, projector, 64))
            for group in groups.values():
                ray.get(group.async_run_method("append", _experience(step)))
                ray.get(group.async_run_method("fit", kl_ctl=1e-3))
        for group in groups.values():
            ray.get(group.async_save_model())
    finally:
        ray.shutdown()

    plain = load_file(tmp_path / "plain/model.safetensors")
    with_cropi = load_file(tmp_path / "with_cropi/model.safetensors")
    initial = load_file(tiny_models[0] / "model.safetensors")
    assert any(not torch.equal(plain[k], initial[k]) for k in plain), "training did not move the weights"
    assert all(torch.equal(plain[k], with_cropi[k]) for k in plain)
