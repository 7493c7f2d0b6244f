"""OpenRLHF's policy actor plus CROPI's two side computations on its DeepSpeed model.

Both methods get one Ray object reference per data-parallel rank (nested in a list, so Ray
does not resolve them) and fetch only their own rank's share of the prompts, plus the number
of forward passes every share needs. Under ZeRO-3, where each forward and backward all-gathers
parameters collectively, the ranks with less work pad with idle passes to the busiest rank's
count. Gradients come from `torch.autograd.grad` on the unwrapped module: `.grad`, the
optimizer and the DeepSpeed engine's state are never touched.
"""

from __future__ import annotations

import ray
import torch
import torch.distributed as dist
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
from tqdm import tqdm

from openrlhf_cropi.core.gradients import (
    behavior_log_probs,
    causal_lm_log_prob_fn,
    plan_micro_batches,
    prompt_gradient,
)
from openrlhf_cropi.core.projection import SparseProjector


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def num_passes(items: list[dict], max_tokens: int) -> int:
    """Forward passes (micro-batches) that teacher forcing or a gradient of these prompts takes."""
    return sum(
        len(plan_micro_batches([len(r) for r in it["responses"]], len(it["prompt_ids"]), max_tokens)) for it in items
    )


class _CropiPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    def _cropi_model(self) -> torch.nn.Module:
        return self.actor.model.module  # the HF model inside the DeepSpeed engine

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self._cropi_model().parameters() if p.requires_grad]

    def _zero3(self) -> bool:
        return self.strategy.args.ds.zero_stage == 3

    def _idle_passes(self, count: int, backward: bool) -> None:
        """ZeRO-3 only: passes on a two-token input that keep this rank in step with the others."""
        if self.strategy.args.ds.zero_stage != 3:
            return
        model, params = self._cropi_model(), self._params()
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.actor.model.device)
        for _ in range(count):
            with torch.set_grad_enabled(backward):
                out = model(input_ids=ids).logits.float().sum() * 0.0
                if backward:
                    torch.autograd.grad(out, params, allow_unused=True)

    @torch.no_grad()
    def cropi_behavior_log_probs(self, shares: list, passes: list[int], temperature: float, max_tokens: int) -> list:
        """log beta of every response token of this rank's share: one list of per-response tensors per prompt."""
        mine = ray.get(shares[_rank()])
        model, device = self._cropi_model(), self.actor.model.device
        was_training = model.training
        model.eval()
        log_prob_fn = causal_lm_log_prob_fn(model, temperature)
        out = [
            behavior_log_probs(log_prob_fn, it["prompt_ids"], it["responses"], max_tokens, device)
            for it in tqdm(mine, desc="CROPI behavior log-probs", disable=_rank() != 0)
        ]
        self._idle_passes(max(passes) - passes[_rank()], backward=False)
        model.train(was_training)
        return out

    def cropi_project(self, shares: list, passes: list[int], projector: dict, max_tokens: int) -> list:
        """Projected off-policy gradient ([d] float32) of each prompt of this rank's share; None
        where the gradient is not finite. The policy's log-probs are at the temperature OpenRLHF
        trains with (--rollout.temperature)."""
        mine = ray.get(shares[_rank()])
        model, device, params = self._cropi_model(), self.actor.model.device, self._params()
        proj = SparseProjector(total_params=sum(_numel(p) for p in params), **projector)
        log_prob_fn = causal_lm_log_prob_fn(model, self.strategy.args.rollout.temperature)
        shapes = [getattr(p, "ds_shape", p.shape) for p in params]  # ZeRO-3 keeps the full shape in ds_shape
        was_training = model.training
        model.eval()
        vectors = []
        for it in tqdm(mine, desc="CROPI gradients", disable=_rank() != 0):
            grads = prompt_gradient(
                log_prob_fn, params, it["prompt_ids"], it["responses"], it["rewards"], it["behavior"],
                max_tokens, device, shapes,
            )  # fmt: skip
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            vectors.append(proj.project(grads).cpu() if finite else None)
        self._idle_passes(max(passes) - passes[_rank()], backward=True)
        model.train(was_training)
        return vectors


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps the full size in ds_numel


CropiPolicyModelActor = ray.remote(num_gpus=1)(_CropiPolicyModelActor)
