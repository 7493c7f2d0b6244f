"""CROPI scores the objective the job trains: per-prompt gradients against OpenRLHF 0.11.2's own code.

The oracle takes a prompt's K responses as one rollout group through OpenRLHF's
``RemoteExperienceMaker.compute_advantages_and_returns`` (its length penalties, group baselines
and reward clip, with the job's parsed flags) and its ``PolicyLoss`` (its loss aggregation;
clipping set out of reach, as CROPI's objective has none), every response a row of its own,
copies included, with log-probs read off one unpadded forward per response; the gradient is
``-autograd.grad`` of that loss. CROPI's ``prompt_gradient``, given ``objective_of`` the same
flags, merges the copies and batches the responses, and must agree to float32 round-off, off
policy (every importance ratio differs from 1).
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from openrlhf_cropi.cli.train_ppo_ray import parse_args
from openrlhf_cropi.core.gradients import behavior_log_probs, causal_lm_log_prob_fn, prompt_gradient
from openrlhf_cropi.flags import objective_of

pytestmark = pytest.mark.host

PROMPT = torch.tensor([5, 17, 3, 99, 42])
# Six responses: 1 and 4 are copies with equal rewards, 2 and 5 copies whose rewards differ.
_R = {0: [7, 8, 9], 1: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 2: [11, 12], 3: [20, 30, 40, 50, 60, 70, 80]}
RESPONSES = [torch.tensor(_R[k]) for k in (0, 1, 2, 3, 1, 2)]
TRUNCATED = [False, True, False, True, True, False]  # 1 and 4 cut at the length limit
REWARDS = {"binary": [1.0, 0.0, 1.0, 0.0, 0.0, 0.0], "wide": [40.0, 0.0, 3.0, 0.5, 0.0, 1.0]}  # wide: the clip bites

ESTIMATORS = [["group_norm"], ["group_norm", "--algo.advantage.no_std_norm"], ["dr_grpo"], ["rloo"]]
PENALTIES = {
    "none": [],
    # limit 12 - 6 = 6 tokens: the 7- and 10-token responses pay
    "overlong": ["--reward.overlong_buffer_len", "6", "--reward.overlong_penalty_factor", "0.5"],
    "stop-scale": ["--reward.stop_properly_penalty_coef", "0.5"],
    "stop-fixed": ["--reward.stop_properly_penalty_coef", "-0.5"],
}


def _model(seed):
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).float().eval()


def _args(flags):
    return parse_args(["--actor.model_name_or_path", "unused", "--rollout.n_samples_per_prompt", str(len(RESPONSES)),
                       "--rollout.max_new_tokens", "12", "--algo.kl.use_loss", *flags])  # fmt: skip


def _openrlhf_advantages(args, rewards):
    """OpenRLHF's per-token advantages [K, A] of the group, by its own experience maker."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    maker = object.__new__(RemoteExperienceMaker)  # only compute_advantages_and_returns is used
    maker.strategy = SimpleNamespace(args=args)
    maker.advantage_estimator = args.algo.advantage.estimator
    maker.kl_ctl = SimpleNamespace(value=0.0)
    lengths = [len(r) for r in RESPONSES]
    mask = torch.zeros(len(RESPONSES), max(lengths), dtype=torch.bool)
    for k, n in enumerate(lengths):
        mask[k, :n] = True
    experience = Experience(action_mask=mask, rewards=torch.tensor(rewards), response_length=torch.tensor(lengths),
                            truncated=torch.tensor(TRUNCATED), kl=torch.zeros(mask.shape), index=list(range(len(lengths))),
                            info={})  # fmt: skip
    maker.compute_advantages_and_returns([experience])
    return experience.advantages, mask


def _token_log_probs(model, response):
    logits = model(input_ids=torch.cat([PROMPT, response]).unsqueeze(0)).logits[0].float()
    rows = logits[len(PROMPT) - 1 : -1]
    return torch.log_softmax(rows, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)


def _oracle(model, args, rewards, behavior):
    from openrlhf.models.loss import PolicyLoss

    advantages, mask = _openrlhf_advantages(args, rewards)
    params = list(model.parameters())
    old = torch.zeros(mask.shape)
    rows = [_token_log_probs(model, r) for r in RESPONSES]
    log_probs = torch.stack([torch.nn.functional.pad(lp, (0, mask.shape[1] - len(lp))) for lp in rows])
    for k, b in enumerate(behavior):
        old[k, : len(b)] = b
    loss_fn = PolicyLoss(clip_eps_low=1e9, clip_eps_high=1e9, token_level_loss=args.actor.loss_agg_mode == "token-mean")
    loss = loss_fn(log_probs, old, advantages, action_mask=mask)[0]
    return [-g for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("rewards", sorted(REWARDS))
@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=" ".join)
def test_gradient_matches_openrlhf_advantages_and_loss(estimator, loss_agg_mode, penalty, rewards):
    args = _args(["--algo.advantage.estimator", *estimator, "--actor.loss_agg_mode", loss_agg_mode,
                  *PENALTIES[penalty]])  # fmt: skip
    behavior_model, model = _model(0), _model(1)  # theta != beta
    behavior = behavior_log_probs(causal_lm_log_prob_fn(behavior_model), PROMPT, RESPONSES, 10_000, "cpu")
    want = _oracle(model, args, REWARDS[rewards], behavior)
    got = prompt_gradient(causal_lm_log_prob_fn(model), list(model.parameters()), PROMPT, RESPONSES, REWARDS[rewards],
                          behavior, 30, "cpu", truncated=TRUNCATED, objective=objective_of(args))  # fmt: skip
    flat_got, flat_want = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])
    if flat_want.norm() == 0:  # the penalty made every reward equal: no gradient, and none computed
        assert flat_got.norm() == 0 and penalty == "stop-fixed"
        return
    error = ((flat_got - flat_want).norm() / flat_want.norm()).item()
    assert error <= 1e-5, error


def test_the_penalties_and_the_clip_change_the_gradient():
    """The cases above are not vacuous: each setting moves OpenRLHF's own gradient."""
    behavior_model, model = _model(0), _model(1)
    behavior = behavior_log_probs(causal_lm_log_prob_fn(behavior_model), PROMPT, RESPONSES, 10_000, "cpu")
    base = _oracle(model, _args(["--algo.advantage.estimator", "dr_grpo"]), REWARDS["wide"], behavior)
    for flags in (["--actor.loss_agg_mode", "seq-mean-token-mean"], PENALTIES["overlong"], PENALTIES["stop-scale"],
                  ["--reward.clip_range", "-100", "100"], ["--algo.advantage.estimator", "rloo"]):  # fmt: skip
        other = _oracle(model, _args(["--algo.advantage.estimator", "dr_grpo", *flags]), REWARDS["wide"], behavior)
        change = torch.cat([(a - b).flatten() for a, b in zip(other, base)]).norm()
        assert change > 1e-3 * torch.cat([b.flatten() for b in base]).norm(), flags
