"""OpenRLHF's policy actor plus CROPI's side computations on its DeepSpeed model.

The methods get one share per data-parallel rank and take only their own rank's: (rollout
store path, prompt index, chunk files) triples that the rank reads from the store itself (the
trainer's way: tokens never pass through the driver), or a Ray object reference to the prompts
(nested in a list, so Ray does not resolve it). Before any forward pass the ranks agree, with
one all-reduce, on whether every rank could read its share and on the largest number of forward
passes a share needs: a rank that cannot read stops every rank with its error (no rank waits in
a collective for it), and under ZeRO-3, where each forward and backward all-gathers parameters
collectively, the ranks with less work pad with idle passes to that count. Gradients come from
`torch.autograd.grad` on the unwrapped module, each parameter's projected and dropped as soon
as autograd produces it (`core.gradients.projected_gradient`): `.grad`, the optimizer and the
DeepSpeed engine's state are never touched, and no model-sized buffer exists (under ZeRO-3 too,
where each gradient is full-size). Activation checkpointing applies as in training. Only the
weights are used: under --ds.enable_sleep they stay on the device while OpenRLHF's offload
moves the optimizer states away, so nothing is reloaded.
"""

from __future__ import annotations

import socket
import time

import ray
import torch
import torch.distributed as dist
from deepspeed.utils import get_z3_leaf_modules
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
from tqdm import tqdm

from openrlhf_cropi.core import exact
from openrlhf_cropi.core.advantages import Objective, first_copies, zero_variance
from openrlhf_cropi.core.gradients import (
    behavior_log_probs,
    causal_lm_log_prob_fn,
    checkpointing_mode,
    forward_passes,
    projected_gradient,
    stream_gradients,
    top_layers_parameters,
)
from openrlhf_cropi.core.projection import SparseProjector
from openrlhf_cropi.core.similarity import mean_pooled
from openrlhf_cropi.core.store import RolloutStore, StoreError
from openrlhf_cropi.flags import CropiFlagError, check_exact_memory, check_projection_cost, objective_of

READ_RETRIES_S = (0.5, 1, 2, 4, 8)  # re-list a store whose new chunk this node does not see yet (NFS caching)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _where() -> str:
    return f"policy rank {_rank()} on {socket.gethostname()}"


def _open(path: str) -> RolloutStore:
    try:
        return RolloutStore(path)
    except StoreError as e:
        raise StoreError(
            f"{_where()}: {e}. Every node reads the rollout store: put --cropi.store_dir (default "
            "<--ckpt.path>/cropi) on a filesystem all nodes share"
        ) from None


def _read_share(share, need_behavior: bool) -> list[dict]:
    """This rank's prompts: an object reference to the items themselves, or (rollout store path,
    prompt index, chunk files) triples read here, from a store on a filesystem every node of the
    job sees. A prompt this node does not see yet (a chunk the driver just wrote, hidden by NFS
    attribute caching) is looked for again after re-listing the store, then named in an error."""
    if isinstance(share, ray.ObjectRef):
        return ray.get(share)
    stores, items = {}, []
    for path, index, chunks in share:
        for wait in (*READ_RETRIES_S, None):
            store = stores.get(path) or _open(path)
            stores[path] = store
            if index in store and (store.teacher_forced(index) or not need_behavior):
                break
            if wait is None:
                raise StoreError(
                    f"{_where()}: {path}: prompt {index} is not in the chunk(s) this node sees, though the driver "
                    f"wrote it to {', '.join(chunks)} (looked again for {sum(READ_RETRIES_S):.0f} s). Is the store "
                    "on a filesystem every node shares, with a current view (NFS: attribute caching)?"
                )
            time.sleep(wait)
            stores[path] = _open(path)  # a fresh listing of the directory
        rec = store.get(index)
        items.append({"prompt_ids": rec.prompt_ids, "responses": rec.responses, "rewards": rec.rewards,
                      "truncated": rec.truncated, "behavior": rec.behavior_logprobs})  # fmt: skip
    return items


def num_passes(items: list[dict], max_tokens: int, objective: Objective | None = None) -> int:
    """Forward passes (micro-batches) that teacher forcing (``objective`` None) or a gradient of
    these prompts takes: a gradient runs none for a prompt whose rewards, as trained, do not vary."""
    passes = 0
    for it in items:
        lengths = [len(r) for r in it["responses"]]
        if objective is not None and bool(zero_variance(objective.rewards(it["rewards"], lengths, it.get("truncated")))):
            continue
        distinct = [f == k for k, f in enumerate(first_copies(it["responses"]))]
        passes += forward_passes(len(it["prompt_ids"]), lengths, distinct, max_tokens)
    return passes


def free_device_bytes() -> int:
    """Free memory of this rank's device: the accelerator's, or the host's available RAM."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class _CropiPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        result = super().init_model_from_pretrained(strategy, *args, **kwargs)
        cropi = strategy.args.cropi
        self._phase_state: dict = {}  # what one phase's scoring keeps on this rank (cropi_end_phase drops it)
        if cropi.enable and cropi.selector == "influence":  # refused now, not at the first phase
            try:
                total = sum(self._numels())
            except ValueError as error:
                raise CropiFlagError(f"--cropi.grad_layers {cropi.grad_layers}: {error}") from None
            if cropi.cascade:  # its second stage takes every parameter's gradient
                total = sum(self._numels(layers=0))
            if cropi.projector == "none":
                check_exact_memory(cropi, total, free_device_bytes())
            else:
                check_projection_cost(cropi, total)
        if self._zero3():
            check_zero3_leaf_modules(self._cropi_model())
        return result

    def _cropi_model(self) -> torch.nn.Module:
        return self.actor.model.module  # the HF model inside the DeepSpeed engine

    def _params(self, layers: int | None = None) -> list[torch.nn.Parameter]:
        """The parameters CROPI's gradients are taken with respect to: the top ``layers`` blocks, by
        default the phase's stage's (``cropi_use_layers``), else --cropi.grad_layers."""
        if layers is None:
            layers = self._phase_state.get("layers", self.strategy.args.cropi.grad_layers)
        return top_layers_parameters(self._cropi_model(), layers)

    def _numels(self, layers: int | None = None) -> list[int]:
        return [getattr(p, "ds_numel", p.numel()) for p in self._params(layers)]  # ZeRO-3: the full size in ds_numel

    def _zero3(self) -> bool:
        return self.strategy.args.ds.zero_stage == 3

    def _idle_passes(self, count: int, backward: bool, decoder_only: bool = False) -> None:
        """ZeRO-3 only: passes on a two-token input that keep this rank in step with the others
        (through the same modules as theirs: the whole model, or its decoder without the head)."""
        if not self._zero3():
            return
        model, params = self._cropi_model(), self._params()
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.actor.model.device)
        for _ in range(count):
            with torch.set_grad_enabled(backward):
                if decoder_only:
                    model.get_decoder()(input_ids=ids, use_cache=False)
                    continue
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

    def _agree(self, share, need_behavior: bool, count_passes) -> tuple[list, int]:
        """Read this rank's share and agree with every rank, in one all-reduce and before any
        forward pass, that all could read theirs, and on the largest count of forward passes
        (``count_passes(items)``)."""
        try:
            mine, error = _read_share(share, need_behavior), None
            passes = count_passes(mine)
        except Exception as e:  # any failure here is agreed on: no other rank may wait for this one
            mine, error, passes = [], e, 0
        if dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            flags = torch.tensor([passes, error is not None], dtype=torch.long, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            most, failed = int(flags[0]), bool(flags[1])
        else:
            most, failed = passes, error is not None
        if error is not None:
            raise error
        if failed:
            raise StoreError(f"{_where()}: another policy rank could not read its prompts (its error says why)")
        return mine, most - passes

    @torch.no_grad()
    def cropi_behavior_log_probs(self, shares: list, temperature: float, max_tokens: int) -> list:
        """log beta of every response token of this rank's share: one list of per-response tensors per prompt."""
        mine, idle = self._agree(shares[_rank()], False, lambda items: num_passes(items, max_tokens))
        model, device = self._cropi_model(), self.actor.model.device
        was_training = model.training
        model.eval()
        log_prob_fn = causal_lm_log_prob_fn(model, temperature)
        out = [
            behavior_log_probs(log_prob_fn, it["prompt_ids"], it["responses"], max_tokens, device)
            for it in tqdm(mine, desc="CROPI behavior log-probs", disable=_rank() != 0)
        ]
        self._idle_passes(idle, backward=False)
        model.train(was_training)
        self._release_memory()
        return out

    @torch.no_grad()
    def cropi_embed(self, shares: list) -> list:
        """--cropi.selector embedding: each prompt's last hidden states (the decoder's output,
        no head), mean-pooled over its tokens ([H] float32), one forward per prompt; None where
        not finite."""
        mine, idle = self._agree(shares[_rank()], False, len)
        model, device = self._cropi_model(), self.actor.model.device
        was_training = model.training
        model.eval()
        decoder, out = model.get_decoder(), []
        for it in tqdm(mine, desc="CROPI prompt embeddings", disable=_rank() != 0):
            ids = torch.as_tensor(it["prompt_ids"], dtype=torch.long, device=device)[None]
            vector = mean_pooled(decoder(input_ids=ids, use_cache=False).last_hidden_state[0]).cpu()
            out.append(vector if bool(torch.isfinite(vector).all()) else None)
        self._idle_passes(idle, backward=False, decoder_only=True)
        model.train(was_training)
        self._release_memory()
        return out

    def _gradient_pass(self, shares: list, max_tokens: int, desc: str, compute) -> list:
        """``compute(log_prob_fn, params, device, objective, item)`` for each prompt of this rank's
        share, as the job trains: the policy's log-probs at --rollout.temperature, the responses
        weighed as in its objective, gradient checkpointing (--actor.gradient_checkpointing_enable)
        as in training but no dropout; ZeRO-3 ranks padded to the agreed pass count."""
        objective = objective_of(self.strategy.args)
        mine, idle = self._agree(shares[_rank()], True, lambda items: num_passes(items, max_tokens, objective))
        model, device, params = self._cropi_model(), self.actor.model.device, self._params()
        log_prob_fn = causal_lm_log_prob_fn(model, self.strategy.args.rollout.temperature)
        with checkpointing_mode(model):
            out = [compute(log_prob_fn, params, device, objective, it)
                   for it in tqdm(mine, desc=desc, disable=_rank() != 0)]  # fmt: skip
            self._idle_passes(idle, backward=True)
        self._release_memory()
        return out

    def cropi_project(self, shares: list, projector: dict, max_tokens: int) -> list:
        """Projected off-policy gradient ([d] float32) of each prompt of this rank's share; None
        where the gradient is not finite. The projector's layout is built at the first call of a
        phase and kept until ``cropi_end_phase``."""
        numels = self._numels()
        key = ("projector", tuple(sorted(projector.items())))
        if key not in self._phase_state:
            self._phase_state[key] = SparseProjector(total_params=sum(numels), **projector)
        proj = self._phase_state[key]

        def compute(log_prob_fn, params, device, objective, it):
            vector = projected_gradient(
                log_prob_fn, params, proj, it["prompt_ids"], it["responses"], it["rewards"], it["behavior"],
                max_tokens, device, numels, truncated=it.get("truncated"), objective=objective,
            )  # fmt: skip
            return vector.cpu() if bool(torch.isfinite(vector).all()) else None

        return self._gradient_pass(shares, max_tokens, "CROPI gradients", compute)

    def _exact_buffer(self) -> list[torch.Tensor]:
        if "buffer" not in self._phase_state:
            self._phase_state["buffer"] = exact.flat_zeros(self._numels(), self.actor.model.device)
        return self._phase_state["buffer"]

    def cropi_exact_target(self, shares: list, max_tokens: int) -> list[bool]:
        """--cropi.projector none: the mean gradient of one validation set, each prompt's on the
        rank that reads it, summed over the ranks (one all-reduce per parameter) and kept on every
        rank, full-size, until ``cropi_end_phase``. Returns whether each prompt of this rank's
        share had a finite gradient (the others are left out of the mean)."""
        buffer, numels = self._exact_buffer(), self._numels()
        target = exact.flat_zeros(numels, self.actor.model.device)

        def compute(log_prob_fn, params, device, objective, it):
            finite = exact.gradient_into(
                buffer, log_prob_fn, params, it["prompt_ids"], it["responses"], it["rewards"], it["behavior"],
                max_tokens, device, truncated=it.get("truncated"), objective=objective,
            )  # fmt: skip
            if finite:
                for t, g in zip(target, buffer):
                    t.add_(g)
            return finite

        finite = self._gradient_pass(shares, max_tokens, "CROPI validation gradients", compute)
        used = torch.tensor([float(sum(finite))], dtype=torch.float32, device=target[0].device)
        if dist.is_initialized():
            for t in (*target, used):
                dist.all_reduce(t)
        if used.item() > 0:
            for t in target:
                t.div_(used)
        self._phase_state.setdefault("targets", []).append(target)
        self._phase_state.setdefault("target_norms", []).append(exact.squared_norm(target))
        return finite

    def cropi_exact_cosines(self, shares: list, max_tokens: int) -> list:
        """--cropi.projector none: the exact cosines ([V] float64) of each prompt of this rank's
        share with the validation means ``cropi_exact_target`` keeps; None where not finite."""
        targets, norms, buffer = self._phase_state["targets"], self._phase_state["target_norms"], self._exact_buffer()

        def compute(log_prob_fn, params, device, objective, it):
            dots = exact.gradient_dots(
                targets, buffer, log_prob_fn, params, it["prompt_ids"], it["responses"], it["rewards"], it["behavior"],
                max_tokens, device, truncated=it.get("truncated"), objective=objective,
            ).cpu()  # fmt: skip
            return exact.cosines_from_dots(dots, norms) if bool(torch.isfinite(dots).all()) else None

        return self._gradient_pass(shares, max_tokens, "CROPI exact scores", compute)

    def cropi_use_layers(self, layers: int) -> None:
        """--cropi.cascade: the gradients of the top ``layers`` blocks (0: every parameter) until
        ``cropi_end_phase``, which also drops the targets and layout built for the previous stage."""
        self._phase_state["layers"] = layers

    def cropi_end_phase(self) -> None:
        """Drop what this phase's scoring kept (projector layout, exact targets) before training resumes."""
        for key, value in self._phase_state.items():
            if isinstance(value, SparseProjector):
                self.strategy.print(
                    f"CROPI projection state on {self.actor.model.device}: {value.state_bytes() / 2**30:.2f} GiB "
                    f"({value.state_bytes() / value.total_params:.3f} bytes per parameter), built once this phase"
                )
        self._phase_state.clear()
        self._release_memory()


def check_zero3_leaf_modules(model: torch.nn.Module) -> None:
    """ZeRO-3 leaf modules (MoE blocks that OpenRLHF marks so) gather their parameters through
    module backward hooks, which would fire inside CROPI's autograd.grad passes: refused."""
    leaves = get_z3_leaf_modules(model)
    if leaves:
        raise CropiFlagError(
            f"--ds.zero_stage 3: the model has {len(leaves)} ZeRO-3 leaf module(s) ({type(leaves[0]).__name__}: "
            "mixture-of-experts blocks), whose DeepSpeed backward hooks CROPI's per-prompt gradients do not "
            "support; use --ds.zero_stage 2"
        )


CropiPolicyModelActor = ray.remote(num_gpus=1)(_CropiPolicyModelActor)
