"""OpenRLHF's policy actor plus CROPI's two side computations on its DeepSpeed model.

Both methods get one share per data-parallel rank and take only their own rank's: (rollout
store path, prompt index) pairs that the rank reads from the store itself (the trainer's way:
tokens never pass through the driver), or a Ray object reference to the prompts (nested in a
list, so Ray does not resolve it); plus the number of forward passes every share needs. Under ZeRO-3, where each forward and backward all-gathers
parameters collectively, the ranks with less work pad with idle passes to the busiest rank's
count. Gradients come from `torch.autograd.grad` on the unwrapped module, each parameter's
projected and dropped as soon as autograd produces it (`core.gradients.projected_gradient`):
`.grad`, the optimizer and the DeepSpeed engine's state are never touched, and no model-sized
buffer exists (under ZeRO-3 too, where each gradient is full-size). Activation checkpointing
applies as in training. Only the weights are used: under --ds.enable_sleep they stay on the
device while OpenRLHF's offload moves the optimizer states away, so nothing is reloaded.
"""

from __future__ import annotations

import socket

import ray
import torch
import torch.distributed as dist
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
from tqdm import tqdm

from openrlhf_cropi.core.advantages import first_copies
from openrlhf_cropi.core.gradients import (
    behavior_log_probs,
    causal_lm_log_prob_fn,
    checkpointing_mode,
    forward_passes,
    projected_gradient,
    stream_gradients,
)
from openrlhf_cropi.core.projection import SparseProjector
from openrlhf_cropi.core.store import RolloutStore, StoreError
from openrlhf_cropi.flags import check_projection_cost


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _read_share(share) -> list[dict]:
    """This rank's prompts: an object reference to the items themselves, or (rollout store path,
    prompt index) pairs read here, from a store on a filesystem every node of the job sees."""
    if isinstance(share, ray.ObjectRef):
        return ray.get(share)
    stores, items = {}, []
    for path, index in share:
        if path not in stores:
            try:
                stores[path] = RolloutStore(path)
            except StoreError as e:
                raise StoreError(
                    f"policy rank {_rank()} on {socket.gethostname()}: {e}. Every node reads the rollout store: "
                    "put --cropi.store_dir (default <--ckpt.path>/cropi) on a filesystem all nodes share"
                ) from None
        rec = stores[path].get(index)
        items.append({"prompt_ids": rec.prompt_ids, "responses": rec.responses, "rewards": rec.rewards,
                      "behavior": rec.behavior_logprobs})  # fmt: skip
    return items


def num_passes(items: list[dict], max_tokens: int) -> int:
    """Forward passes (micro-batches) that teacher forcing or a gradient of these prompts takes."""
    return sum(
        forward_passes(len(it["prompt_ids"]), [len(r) for r in it["responses"]],
                       [f == k for k, f in enumerate(first_copies(it["responses"]))], max_tokens)
        for it in items
    )  # fmt: skip


class _CropiPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        result = super().init_model_from_pretrained(strategy, *args, **kwargs)
        cropi = strategy.args.cropi
        if cropi.enable and cropi.selector == "influence":  # a dense projector too costly: refused now
            check_projection_cost(cropi, sum(getattr(p, "ds_numel", p.numel()) for p in self._params()))
        return result

    def _cropi_model(self) -> torch.nn.Module:
        return self.actor.model.module  # the HF model inside the DeepSpeed engine

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self._cropi_model().parameters() if p.requires_grad]

    def _zero3(self) -> bool:
        return self.strategy.args.ds.zero_stage == 3

    def _idle_passes(self, count: int, backward: bool) -> None:
        """ZeRO-3 only: passes on a two-token input that keep this rank in step with the others."""
        if not self._zero3():
            return
        model, params = self._cropi_model(), self._params()
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.actor.model.device)
        for _ in range(count):
            with torch.set_grad_enabled(backward):
                out = model(input_ids=ids, use_cache=False).logits.float().sum() * 0.0
                if backward:  # each (full-size) gradient dropped as soon as it exists
                    stream_gradients(out, params, lambda i, grad: None)

    def _release_memory(self) -> None:
        """What the pass cached on the accelerator goes back to the device before vLLM wakes in
        its own process (under --ds.enable_sleep nothing else frees it: the side computations
        need the weights only, which OpenRLHF's offload leaves in place)."""
        if self._zero3():
            self.actor.model.empty_partition_cache()  # any parameter still gathered
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def cropi_behavior_log_probs(self, shares: list, passes: list[int], temperature: float, max_tokens: int) -> list:
        """log beta of every response token of this rank's share: one list of per-response tensors per prompt."""
        mine = _read_share(shares[_rank()])
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
        self._release_memory()
        return out

    def cropi_project(self, shares: list, passes: list[int], projector: dict, max_tokens: int) -> list:
        """Projected off-policy gradient ([d] float32) of each prompt of this rank's share; None
        where the gradient is not finite. The policy's log-probs are at the temperature OpenRLHF
        trains with (--rollout.temperature)."""
        mine = _read_share(shares[_rank()])
        model, device, params = self._cropi_model(), self.actor.model.device, self._params()
        numels = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3 keeps the full size in ds_numel
        proj = SparseProjector(total_params=sum(numels), **projector)
        log_prob_fn = causal_lm_log_prob_fn(model, self.strategy.args.rollout.temperature)
        vectors = []
        # Gradient checkpointing (--actor.gradient_checkpointing_enable) as in training, no dropout.
        with checkpointing_mode(model):
            for it in tqdm(mine, desc="CROPI gradients", disable=_rank() != 0):
                vector = projected_gradient(
                    log_prob_fn, params, proj, it["prompt_ids"], it["responses"], it["rewards"], it["behavior"],
                    max_tokens, device, numels,
                )  # fmt: skip
                vectors.append(vector.cpu() if bool(torch.isfinite(vector).all()) else None)
            self._idle_passes(max(passes) - passes[_rank()], backward=True)
        self.strategy.print(
            f"CROPI projection state on {device}: {proj.state_bytes() / 2**30:.2f} GiB "
            f"({proj.state_bytes() / sum(numels):.3f} bytes per parameter), rebuilt at every phase"
        )
        self._release_memory()
        return vectors


CropiPolicyModelActor = ray.remote(num_gpus=1)(_CropiPolicyModelActor)
