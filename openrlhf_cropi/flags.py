"""The `--cropi.*` flags: one typed, validated dataclass, registered on OpenRLHF's own parser.

Each field of `CropiArgs` is one flag (`--cropi.<field>`); its help is the field's metadata.
`check_host_args` rejects OpenRLHF settings CROPI cannot work with, naming the flag;
`objective_of` is what the job trains, in the terms CROPI scores it with.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

from openrlhf_cropi.core.advantages import ESTIMATORS, Objective
from openrlhf_cropi.core.projection import check_dense_cost
from openrlhf_cropi.core.scoring import METHODS as SELECTORS
from openrlhf_cropi.core.scoring import SIMILARITY_METHODS as SIMILARITY_SELECTORS

SUPPORTED_OPENRLHF = "0.11.2"
# Why an estimator's advantages cannot be computed from one prompt's K behavior rollouts.
_UNSCORABLE = {
    "gae": "its advantages come from a critic's values",
    "reinforce": "its advantages are whitened over the whole rollout batch",
    "reinforce_baseline": "its advantages are whitened over the whole rollout batch (a batch-dependent shift that "
    "gives even prompts without reward variance a gradient)",
    "flash_reinforce": "its baseline is the mean reward of the whole rollout batch",
}
PROJECTORS = ("sjlt", "gaussian", "rademacher", "none")


class CropiFlagError(ValueError):
    """A flag value CROPI cannot run with; the message starts with the flag's name."""


def _flag(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class CropiArgs:
    enable: bool = _flag(False, "Train each phase on the most influential prompts of the pool (CROPI).")
    val_datasets: list[str] = _flag(
        None,
        "Validation sets, one or several (each in --data.prompt_dataset syntax, same keys as the pool). "
        "Scores are fused over them by reciprocal rank.",
        nargs="+",
    )
    val_split: str = _flag("train", "Split read from each validation set.")
    alpha: float = _flag(0.1, "Fraction of the pool selected for each phase, in (0, 1].")
    steps_per_phase: int = _flag(8, "Global steps (rollout batches) per phase.")
    num_phases: int = _flag(4, "Phases in the run; the run lasts num_phases x steps_per_phase global steps.")
    train_samples: int = _flag(8, "Behavior responses per pool prompt (K), generated once from the initial policy.")
    val_samples: int = _flag(32, "Behavior responses per validation prompt.")
    behavior_temperature: float = _flag(
        1.0,
        "Sampling temperature of the behavior rollouts (sampling only: log beta, like the policy's log-probs, "
        "is computed at --rollout.temperature).",
    )
    behavior_chunk: int = _flag(
        4096,
        "Behavior prompts in flight on the vLLM engines, and per rollout-store chunk (a killed job loses at most "
        "one); the engines wake once per pass. Teacher forcing goes by chunks of the same size.",
    )
    skip_failed_rewards: bool = _flag(
        False,
        "Leave out a behavior response whose reward failed (the reward function raised) instead of stopping "
        "the job with an error naming the prompt.",
    )
    max_val_prompts: int = _flag(
        100,
        "Cap on validation prompts per set (seeded choice among those with a gradient; only these are teacher-forced).",
    )
    keep_ratio: float = _flag(0.1, "Fraction of gradient coordinates kept before projection, in (0, 1].")
    proj_dim: int = _flag(32768, "Dimension of the projected gradients.")
    projector: str = _flag(
        "sjlt",
        "Random projection of the kept coordinates. sjlt costs one pass over each gradient; the dense gaussian "
        "and rademacher cost proj_dim x kept coordinates per micro-batch and are refused at startup above "
        "2^34 matrix entries. none: exact cosines with the full gradients, no projection (--cropi.keep_ratio and "
        "--cropi.proj_dim unused); each policy rank then keeps every validation set's mean gradient and one "
        "gradient buffer, (V + 1) x 4 bytes per parameter for V validation sets (under ZeRO-3 too: full-size), "
        "during selection; checked at startup against the device's free memory.",
        choices=PROJECTORS,
    )
    grad_layers: int = _flag(
        0,
        "Take CROPI's gradients with respect to the top N transformer blocks and what lies above them (final "
        "norm, an untied lm_head) only: the backward stops below them, so the lower blocks cost a forward and no "
        "backward. 0: every parameter. A head tied to the input embedding is left out with it.",
    )
    cascade: float = _flag(
        0.0,
        "Cascade scoring, C >= 1: score every usable pool prompt with the gradients of the top --cropi.grad_layers "
        "blocks only (the cheap stage), then the top C x alpha of them again with every parameter, and select the "
        "top alpha by that full score. 0: off, the --cropi.grad_layers gradients score the whole pool. Costs the "
        "cheap stage on the pool plus the full one on C x alpha of it; needs --cropi.grad_layers > 0; the memory "
        "is the full stage's. On SmolLM2, C = 3 over the top 4 of 30 blocks kept the exact top 10% at 1.3x less "
        "time than exact scoring (benchmarks/README.md, the frontier).",
    )
    max_tokens_per_gpu: int = _flag(
        None,
        "Padded tokens per micro-batch of CROPI's teacher forcing and gradients (the responses of one prompt are "
        "packed up to it; a longer one goes alone). Default: the job's training micro-batch, i.e. "
        "--train.max_tokens_per_gpu with --train.dynamic_batch_enable, else --train.micro_batch_size x "
        "--data.max_len, so CROPI's activations stay within training's. Fixed for a rollout store: changing it "
        "later needs a new --cropi.store_dir.",
    )
    rrf_k: float = _flag(
        0.0,
        "Reciprocal rank fusion constant k in sum_v 1/(k + rank_v), ranks counted within each top alpha*N; "
        "0 (as in the reference code) interleaves the per-set leaders, 60 (classical RRF) favours agreement.",
    )
    seed: int = _flag(
        0, "Seed of the coordinate subset, the projection, the validation cap and the selectors' tie-break order."
    )
    store_dir: str = _flag(
        None,
        "Rollouts, scores and selections (default: <--ckpt.path>/cropi). One job writes it at a time; a store made "
        "from other data or settings is refused.",
    )
    selector: str = _flag(
        "influence",
        "How the subset is chosen; the baselines run through the identical pipeline. influence: CROPI. random: "
        "uniform over the pool; variance: uniform over the prompts whose behavior rewards (as training sees them) "
        "vary, the DAPO-style filter; both draw afresh each phase. bm25: highest BM25 score against the validation "
        "prompts (mean over each set's, at most --cropi.max_val_prompts, fused over the sets like influence; needs "
        "the bm25 extra); embedding: highest cosine of the initial policy's mean-pooled last hidden state of the "
        "prompt with each validation set's mean (one forward per prompt on the policy ranks, once per job, kept in "
        "the store for a resumed job); both among the prompts with reward variance, the same subset every phase. "
        "learnability: highest p(1-p) of the behavior pass rate p; pass_rate: lowest p among prompts with variance.",
        choices=SELECTORS,
    )

    def __post_init__(self):
        if not self.enable:
            return
        if not self.val_datasets and self.selector in SIMILARITY_SELECTORS:
            raise CropiFlagError(f"--cropi.val_datasets: the {self.selector} selector needs at least one validation set")
        if self.selector == "bm25" and importlib.util.find_spec("bm25s") is None:  # refused now, not after the rollouts
            raise CropiFlagError("--cropi.selector bm25: needs bm25s: pip install 'openrlhf-cropi[bm25]'")
        for path in self.val_datasets or []:
            local = path.split("@")[0].strip()
            if os.path.splitext(local)[1] in {".json", ".jsonl", ".csv", ".parquet", ".arrow"}:
                if not os.path.isfile(local):
                    raise CropiFlagError(f"--cropi.val_datasets: no such file: {local}")
        if not 0 < self.alpha <= 1:
            raise CropiFlagError(f"--cropi.alpha: must be in (0, 1], got {self.alpha}")
        if not 0 < self.keep_ratio <= 1:
            raise CropiFlagError(f"--cropi.keep_ratio: must be in (0, 1], got {self.keep_ratio}")
        if self.max_tokens_per_gpu is not None and self.max_tokens_per_gpu < 1:
            raise CropiFlagError(f"--cropi.max_tokens_per_gpu: must be >= 1, got {self.max_tokens_per_gpu}")
        for name in ("steps_per_phase", "num_phases", "proj_dim", "max_val_prompts", "behavior_chunk"):
            if getattr(self, name) < 1:
                raise CropiFlagError(f"--cropi.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("train_samples", "val_samples"):
            if getattr(self, name) < 2:
                raise CropiFlagError(f"--cropi.{name}: group-normalised advantages need >= 2, got {getattr(self, name)}")
        if not self.behavior_temperature > 0:
            raise CropiFlagError(f"--cropi.behavior_temperature: must be > 0, got {self.behavior_temperature}")
        if self.grad_layers < 0:
            raise CropiFlagError(f"--cropi.grad_layers: must be >= 0, got {self.grad_layers}")
        if self.cascade:
            if self.cascade < 1:
                raise CropiFlagError(f"--cropi.cascade: must be 0 (off) or >= 1, got {self.cascade}")
            if self.selector != "influence":
                raise CropiFlagError(f"--cropi.cascade: scores influence only, but --cropi.selector is {self.selector}")
            if self.grad_layers == 0:
                raise CropiFlagError(
                    "--cropi.cascade: its cheap stage is the gradients of the top --cropi.grad_layers blocks; set "
                    "--cropi.grad_layers (the frontier's choice on SmolLM2: 4)"
                )
        if self.rrf_k < 0:
            raise CropiFlagError(f"--cropi.rrf_k: must be >= 0, got {self.rrf_k}")


def add_cropi_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CROPI (openrlhf-cropi)")
    for f in dataclasses.fields(CropiArgs):
        kwargs = dict(f.metadata)
        if f.type in ("bool", bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(f"--cropi.{f.name}", default=f.default, **kwargs)


def cropi_args(args: SimpleNamespace) -> CropiArgs:
    """The validated CropiArgs of hierarchical train_ppo_ray args, with the defaults that depend
    on other flags filled in; raises CropiFlagError."""
    values = dict(vars(args.cropi))
    if values.get("max_tokens_per_gpu") is None:
        train = args.train
        values["max_tokens_per_gpu"] = (
            train.max_tokens_per_gpu if train.dynamic_batch_enable else train.micro_batch_size * args.data.max_len
        )
    return CropiArgs(**values)


def check_projection_cost(cropi: CropiArgs, total_params: int) -> None:
    """A dense --cropi.projector is refused where projecting one gradient would take minutes
    (called by the policy actors once the model is loaded, before any rollout)."""
    try:
        check_dense_cost(cropi.projector, total_params, cropi.keep_ratio, cropi.proj_dim)
    except ValueError as error:
        raise CropiFlagError(
            f"--cropi.projector {cropi.projector}: {error}; use --cropi.projector sjlt, or lower --cropi.proj_dim "
            "or --cropi.keep_ratio"
        ) from None


def check_exact_memory(cropi: CropiArgs, total_params: int, free_bytes: int) -> None:
    """--cropi.projector none is refused where its state cannot fit the device's free memory
    (called by the policy actors once the model and optimizer are loaded, before any rollout)."""
    from openrlhf_cropi.core.exact import state_bytes

    num_targets = len(cropi.val_datasets or [])
    need = state_bytes(num_targets, total_params)
    if need > free_bytes:
        raise CropiFlagError(
            f"--cropi.projector none: exact scores keep {num_targets} validation mean gradient(s) and one gradient "
            f"buffer of {total_params:,} float32 parameters on each policy rank, {need / 2**30:.1f} GiB, but the "
            f"device has {free_bytes / 2**30:.1f} GiB free after loading the model; use --cropi.projector sjlt (0.8 "
            "bytes per parameter at the default keep ratio), or fewer --cropi.val_datasets"
        )


def check_host_args(args: SimpleNamespace) -> None:
    """OpenRLHF settings CROPI cannot run with, and validation sets that lack the data keys."""
    unsupported = [
        (args.train.async_enable, "--train.async_enable: CROPI swaps the prompt sampler between synchronous steps"),
        (args.ds.tensor_parallel_size > 1, "--ds.tensor_parallel_size > 1: per-prompt gradients need whole parameters or ZeRO shards"),
        (args.ds.ring_attn_size > 1, "--ds.ring_attn_size > 1: per-prompt gradients are computed without ring attention"),
        (args.data.dataloader_num_workers > 0, "--data.dataloader_num_workers > 0: worker processes would prefetch from a stale subset"),
        (args.train.num_episodes != 1, "--train.num_episodes: CROPI sets the run length with --cropi.num_phases x --cropi.steps_per_phase; leave it at 1"),
        (args.ds.lora.rank > 0, "--ds.lora.rank: gradients of LoRA adapters are not supported yet"),
        (args.algo.dynamic_filtering_enable, "--algo.dynamic_filtering_enable: filtered prompts would desynchronise the phase schedule"),
        (args.train.agent_func_path is not None, "--train.agent_func_path: behavior rollouts need the single-turn reward path (--reward.remote_url)"),
        (not args.reward.remote_url, "--reward.remote_url: behavior rollouts need a verifiable reward (a reward .py file or URL)"),
        (args.actor.gradient_checkpointing_enable and args.actor.gradient_checkpointing_reentrant,
         "--actor.gradient_checkpointing_reentrant: reentrant checkpointing does not support torch.autograd.grad, "
         "which CROPI's per-prompt gradients use; leave it off (non-reentrant checkpointing saves the same memory)"),
    ]  # fmt: skip
    for bad, message in unsupported:
        if bad:
            raise CropiFlagError(message)
    estimator = args.algo.advantage.estimator
    if estimator not in ESTIMATORS:
        raise CropiFlagError(
            f"--algo.advantage.estimator {estimator}: CROPI scores each prompt with the advantages training gives its "
            f"own K behavior responses, and {_UNSCORABLE.get(estimator, 'it is not implemented')}; use "
            f"{', '.join(ESTIMATORS)} (the paper's GRPO: group_norm)"
        )
    if args.actor.policy_loss_type != "ppo":
        raise CropiFlagError(
            f"--actor.policy_loss_type {args.actor.policy_loss_type}: its sequence-level ratio (the geometric mean of "
            "the token ratios) weighs an off-policy response otherwise than the per-token ratios CROPI scores with; "
            "use ppo"
        )
    if args.algo.kl.init_coef > 0 and not args.algo.kl.use_loss:
        raise CropiFlagError(
            f"--algo.kl.init_coef {args.algo.kl.init_coef} without --algo.kl.use_loss: the KL penalty then enters "
            "every token's reward and so the advantages, which CROPI cannot score from the behavior rollouts; add "
            "--algo.kl.use_loss (the paper's GRPO: a KL loss, which CROPI leaves out like the entropy term) or set "
            "--algo.kl.init_coef 0"
        )
    objective_of(args)
    _check_validation_columns(args)


def objective_of(args: SimpleNamespace) -> Objective:
    """The job's training objective as CROPI scores it (core.advantages.Objective); raises
    CropiFlagError naming the flag when OpenRLHF's settings make no valid one."""
    reward = args.reward
    try:
        return Objective(
            estimator=args.algo.advantage.estimator,
            loss_agg_mode=args.actor.loss_agg_mode,
            reward_clip=tuple(reward.clip_range) if reward.clip_range else None,
            overlong_buffer_len=reward.overlong_buffer_len,
            overlong_penalty_factor=reward.overlong_penalty_factor,
            # OpenRLHF's own fallback for the overlong penalty's limit.
            max_new_tokens=args.rollout.max_new_tokens or args.data.max_len,
            stop_properly_penalty_coef=reward.stop_properly_penalty_coef,
        )
    except ValueError as error:
        flag = {"estimator": "--algo.advantage.estimator", "loss_agg_mode": "--actor.loss_agg_mode",
                "reward_clip": "--reward.clip_range", "overlong_buffer_len": "--reward.overlong_buffer_len",
                "stop_properly_penalty_coef": "--reward.stop_properly_penalty_coef"}[str(error).split()[0]]  # fmt: skip
        raise CropiFlagError(f"{flag}: {error}") from None


def check_openrlhf_version() -> None:
    """The plugin reaches into OpenRLHF's internals: another version must not run silently."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("openrlhf")
    except PackageNotFoundError:
        found = "none"
    if found != SUPPORTED_OPENRLHF:
        raise CropiFlagError(
            f"openrlhf {found} is installed; openrlhf-cropi works with openrlhf {SUPPORTED_OPENRLHF} only "
            f"(pip install openrlhf=={SUPPORTED_OPENRLHF})"
        )


def _check_validation_columns(args: SimpleNamespace) -> None:
    """Each local validation file has the pool's input and label columns (hub sets: at run time)."""
    import datasets

    keys = [k for k in (args.data.input_key, args.data.label_key) if k]
    for spec in args.cropi.val_datasets or []:
        path = spec.split("@")[0].strip()
        loader = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(path)[1])
        if loader is None:
            continue
        try:
            columns = datasets.load_dataset(loader, data_files=path, split="train").column_names
        except Exception as error:  # a malformed file: say which one
            raise CropiFlagError(f"--cropi.val_datasets: cannot read {path}: {error}") from None
        missing = [k for k in keys if k not in columns]
        if missing:
            raise CropiFlagError(
                f"--cropi.val_datasets: {path} has no column {missing[0]!r} "
                f"(set by --data.input_key/--data.label_key; its columns: {columns})"
            )
