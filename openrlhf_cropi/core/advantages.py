"""What a prompt's K behaviour rewards weigh in the objective the job trains, as OpenRLHF 0.11.2 computes it.

``Objective`` mirrors the parts of OpenRLHF's training that decide a response's weight in the
policy gradient and can be computed from one prompt's K rewards, lengths and truncation flags
(trainer/ppo_utils/experience_maker.py ``compute_advantages_and_returns``, length_penalty.py,
models/utils.py ``compute_reward``, models/loss.py ``aggregate_loss``):

1. length penalties on the rewards (``--reward.overlong_buffer_len`` /
   ``--reward.overlong_penalty_factor``: DAPO's overlong penalty on the response length;
   ``--reward.stop_properly_penalty_coef``: truncated responses scaled or set), in float32;
2. the group baseline (``--algo.advantage.estimator``): ``group_norm`` (r - mean) / (std + 1e-9)
   with the unbiased std (``--algo.advantage.no_std_norm`` does not change it in 0.11.2: it only
   switches the batch whitening of gae / reinforce / reinforce_baseline), ``dr_grpo`` r - mean,
   ``rloo`` r - mean of the other K - 1;
3. the result clamped to ``--reward.clip_range`` (OpenRLHF clamps the shaped reward); with
   gamma = 1 every token of a response carries it;
4. the loss aggregation (``--actor.loss_agg_mode``): ``seq-mean-token-mean`` weighs each response
   1/K, its tokens 1/|y_k| each; ``token-mean`` weighs every token of the K responses alike, so a
   response weighs |y_k| / sum_j |y_j| (copies included, so merging copies stays exact).

Estimators whose advantages depend on more than the prompt's own rollouts (a critic, or a
baseline or whitening over the whole rollout batch: gae, reinforce, reinforce_baseline,
flash_reinforce) cannot be scored offline; the integration refuses them at startup.

One deliberate difference: a group whose rewards are all equal gets weights of exactly 0 here.
OpenRLHF divides a float-rounding residue of r - mean(r) by 1e-9 in that case; the true value is
0, the gradient is 0, and CROPI skips such prompts before any forward pass. ``zero_gradient``
finds the other prompts whose gradient is 0 at every theta. ``first_copies`` finds identical
responses, whose log-probs and gradients are identical: each distinct response needs one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

GROUP_NORM_EPS = 1e-9
ESTIMATORS = ("group_norm", "dr_grpo", "rloo")
LOSS_AGG_MODES = ("seq-mean-token-mean", "token-mean")


def _as_rewards(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    return r.to(torch.promote_types(r.dtype, torch.float32))


def zero_variance(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """True where a group's rewards are all equal (or it has fewer than 2), over the last dim.

    Decided from the rewards alone, with exact comparisons (no tolerance): such a group has
    A = 0 and therefore a zero gradient in every phase, so it costs no forward pass.
    """
    r = _as_rewards(rewards)
    if r.shape[-1] < 2:
        return torch.ones(r.shape[:-1], dtype=torch.bool)
    return r.amax(dim=-1) == r.amin(dim=-1)


@dataclass(frozen=True)
class Objective:
    """The training settings that weigh a prompt's responses in the policy gradient (module doc).
    The defaults are the paper's GRPO: group_norm, seq-mean-token-mean, no length penalty."""

    estimator: str = "group_norm"
    loss_agg_mode: str = "seq-mean-token-mean"
    reward_clip: tuple[float, float] | None = (-10.0, 10.0)
    overlong_buffer_len: float | None = None
    overlong_penalty_factor: float = 1.0
    max_new_tokens: int | None = None  # the overlong penalty's limit
    stop_properly_penalty_coef: float | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r} cannot be scored from a prompt's rollouts (supported: {ESTIMATORS})")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
        if self.reward_clip is not None and not self.reward_clip[0] < self.reward_clip[1]:
            raise ValueError(f"reward_clip {self.reward_clip}: low must be below high")
        if self.overlong_buffer_len is not None:
            if self.max_new_tokens is None or not 0 < self.overlong_buffer_len <= self.max_new_tokens:
                raise ValueError(f"overlong_buffer_len {self.overlong_buffer_len} must be in (0, max_new_tokens "
                                 f"{self.max_new_tokens}]")  # fmt: skip
        coef = self.stop_properly_penalty_coef
        if coef is not None and coef > 1:
            raise ValueError(f"stop_properly_penalty_coef {coef}: must be in [0, 1] (a scale) or < 0 (a fixed reward)")

    def rewards(
        self, rewards: torch.Tensor | Sequence[float], lengths: Sequence[int], truncated: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """The rewards training sees: at least float32, length penalties applied (last dim = K)."""
        r = _as_rewards(rewards).clone()
        if self.overlong_buffer_len is not None:
            expected = self.max_new_tokens - self.overlong_buffer_len
            for k, n in enumerate(lengths):
                exceed = min(n - expected, self.overlong_buffer_len)
                if exceed > 0:
                    r[k] += -exceed / self.overlong_buffer_len * self.overlong_penalty_factor
        coef = self.stop_properly_penalty_coef
        if coef is not None and truncated is not None:
            for k, cut in enumerate(truncated):
                if cut:
                    r[k] = coef if coef < 0 else r[k] * coef
        return r

    def advantages(self, rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Per-response advantage of penalised rewards (last dim = K >= 2), clamped; 0 for a zero-variance group."""
        r = _as_rewards(rewards)
        k = r.shape[-1]
        if k < 2:
            raise ValueError(f"group advantages need at least 2 rewards per group, got {k}")
        if not torch.isfinite(r).all():
            raise ValueError("rewards must be finite")
        if self.estimator == "rloo":
            adv = r - (r.sum(-1, keepdim=True) - r) / (k - 1)
        elif self.estimator == "dr_grpo":
            adv = r - r.mean(-1, keepdim=True)
        else:
            adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + GROUP_NORM_EPS)
        if self.reward_clip is not None:
            adv = adv.clamp(min=self.reward_clip[0], max=self.reward_clip[1])
        return torch.where(zero_variance(r).unsqueeze(-1), torch.zeros_like(adv), adv)

    def weights(
        self, rewards: torch.Tensor | Sequence[float], lengths: Sequence[int], truncated: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """w_k of J = sum_k w_k mean_t rho_{k,t}: advantage x the response's share of the loss."""
        adv = self.advantages(self.rewards(rewards, lengths, truncated))
        if self.loss_agg_mode == "token-mean":
            n = torch.as_tensor(list(lengths), dtype=adv.dtype)
            return adv * n / n.sum()
        return adv / len(lengths)


def group_advantages(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Group-normalised advantages over the last dim, unclamped (the method's A_k)."""
    return Objective(reward_clip=None).advantages(rewards)


def first_copies(responses: Sequence[torch.Tensor]) -> list[int]:
    """For each response, the index of the first response with the same tokens (its own if none
    comes earlier). Short sampled answers repeat often (half of the demo's responses are copies)."""
    first: dict[bytes, int] = {}
    return [first.setdefault(torch.as_tensor(r, dtype=torch.int64).numpy().tobytes(), k) for k, r in enumerate(responses)]


def row_weights(first: Sequence[int], weights: torch.Tensor) -> torch.Tensor:
    """Each response's weight summed onto its first copy (0 on the other copies): one row per
    distinct response, exact, since copies have identical ratios and gradients."""
    return torch.zeros_like(weights).index_add_(0, torch.as_tensor(list(first), dtype=torch.long), weights)


def zero_gradient(first: Sequence[int], weights: torch.Tensor) -> bool:
    """True when some response weighs, yet the prompt's gradient is 0 at every theta.

    g_s sums, over the distinct responses, (the weights of its copies) x (its gradient). When
    every such sum is 0 (identical responses with different rewards, whose advantages cancel:
    the reward is not deterministic), g_s is 0 and any score would be round-off noise. The
    reference code drops such prompts by a threshold on sum |g|; here they are recognised
    exactly, before any forward pass. Pass weights computed from float64 rewards: a true
    cancellation then leaves ~1e-16 of the largest weight (float32 leaves ~1e-8, too much).
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    largest = w.abs().max().item() if len(w) else 0.0
    if largest == 0 or list(first) == list(range(len(first))):
        return False  # nothing weighs (zero variance, counted apart); or all responses distinct
    return bool((row_weights(first, w).abs() <= 1e-9 * largest).all())
