"""OpenRLHF's PPO trainer (the single controller) with CROPI's curriculum.

- Before the first step: behavior rollouts of every pool and validation prompt from the initial
  policy (vLLM engines, awake once for the whole pass; the job's reward function), written to
  the rollout store chunk by chunk; then log beta by teacher forcing on the DeepSpeed policy
  ranks at --rollout.temperature, only for the prompts that can be scored (pool prompts with
  a gradient, each validation set's seeded choice). A restarted job does only what the store
  lacks; a job resumed past step 0, whose policy is no longer the initial one, stops instead.
- The cheap targeting baselines' similarities, once: bm25 here, embedding (the initial
  policy's mean-pooled prompt states) on the policy ranks, kept in the store for a resumed job.
- At step 0 and every --cropi.steps_per_phase steps: projected off-policy gradients on all
  policy ranks, which read their prompts from the store; the pool's come back chunk by chunk
  and are scored as they come; selection; the prompt sampler switches to the new subset.
- The trainer itself keeps only the stores' summaries (rewards, flags: 50 bytes per
  pool prompt at K = 8) plus, during a phase, one chunk of projected gradients and the cosines
  (4 bytes per prompt and validation set): never tokens or log-probs.
- The sampler's state rides in OpenRLHF's checkpoint, so --ckpt.load_enable resumes in the
  same phase on the same subset.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from pathlib import Path

import ray
import torch
from openrlhf.datasets import PromptDataset
from openrlhf.datasets.utils import blending_datasets
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ray.vllm_engine import batch_vllm_engine_call
from openrlhf.utils.logging_utils import init_logger
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm

from openrlhf_cropi.core.scoring import (
    choose_validation,
    pool_cosines,
    projected_cosines,
    select_prompts,
    tie_break_permutation,
    validation_vector,
)
from openrlhf_cropi.core.similarity import bm25_scores
from openrlhf_cropi.core.store import (
    PromptRollouts,
    RolloutStore,
    RolloutSummary,
    StoreBusyError,
    StoreError,
    fsync_dir,
    reward_source,
)
from openrlhf_cropi.flags import CropiFlagError, cropi_args, objective_of
from openrlhf_cropi.sampler import PhaseSampler

logger = init_logger(__name__)

SCORE_CHUNK_PER_RANK = 128  # pool prompts per rank and gradient call: their d-vectors come back together


@functools.lru_cache(maxsize=None)
def _load_tokenizer(name: str, use_fast: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=True, use_fast=use_fast)


class _TokenizerByName:
    """Stands for the job's tokenizer in engine calls. Pickled as its name, it becomes the real
    tokenizer in the engine's process, loaded there once: not shipped with each of the many calls."""

    def __init__(self, name: str, use_fast: bool):
        self.name, self.use_fast = name, use_fast

    def __reduce__(self):
        return _load_tokenizer, (self.name, self.use_fast)


def behavior_record(
    split: str, index: int, text: str, label, row: dict, outputs: list[dict], max_len: int, skip_failed: bool
) -> PromptRollouts:
    """One prompt's behavior rollouts from an engine's per-sample outputs (the dicts of OpenRLHF's
    SingleTurnAgentExecutor). A failed reward (None: the reward function raised, and OpenRLHF
    logged it in the engine) stops the job with an error naming the prompt, or, with
    ``skip_failed``, leaves that response out. It never becomes a reward of 0, which could fake
    reward variance. vLLM's log-probs of the sampled tokens are kept where it reported finite ones."""
    failed = [k for k, out in enumerate(outputs) if out["reward"] is None]
    if failed and (not skip_failed or len(failed) == len(outputs)):
        fix = "" if skip_failed else ", or pass --cropi.skip_failed_rewards to leave such responses out"
        raise RuntimeError(
            f"CROPI behavior rollouts: the reward of {split} prompt {index} ({text[:200]!r}) failed for response(s) "
            f"{failed} of {len(outputs)}: the reward function raised (its error is in the vLLM engine's log). "
            f"Fix the reward function{fix}"
        )
    kept = [out for out in outputs if out["reward"] is not None]
    start = kept[0]["action_ranges"][0][0]
    sampling = None
    if all(out.get("rollout_log_probs") is not None for out in kept):
        sampling = [torch.tensor(out["rollout_log_probs"][start:max_len], dtype=torch.float32) for out in kept]
        sampling = sampling if all(torch.isfinite(lp).all() for lp in sampling) else None
    return PromptRollouts(
        index=index, text=text, label=label, row=row, prompt_ids=kept[0]["observation_tokens"][:start],
        responses=[out["observation_tokens"][start:max_len] for out in kept],
        rewards=[torch.as_tensor(out["reward"], dtype=torch.float64).item() for out in kept],
        truncated=[bool(out["truncated"]) for out in kept],
        sampling_logprobs=sampling,
    )  # fmt: skip


class _Progress:
    """A tqdm bar, and a log line with the rate and the whole pass's ETA at most once a minute."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.start = self.logged = time.time()
        self.bar = tqdm(total=total, desc=what, unit="prompt")

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        now = time.time()
        if now - self.logged >= 60 or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-9)
            logger.info(f"{self.what}: {self.done}/{self.total} prompts, {rate:.2f} prompts/s, "
                        f"ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s")  # fmt: skip
            self.logged = now


class _CropiPPOTrainer(PPOTrainer.__ray_actor_class__):
    def __init__(self, pretrain, strategy, actor_model_group, *args, **kwargs):
        super().__init__(pretrain, strategy, actor_model_group, *args, **kwargs)
        self.cropi = cropi_args(self.args)
        self.objective = objective_of(self.args)  # rewards and weights as training computes them
        self.store_dir = Path(self.cropi.store_dir or os.path.join(self.args.ckpt.path, "cropi"))

        rollout = self.args.rollout
        total_draws = self.cropi.num_phases * self.cropi.steps_per_phase * rollout.batch_size
        self.sampler = PhaseSampler(total_draws, seed=self.args.train.seed)
        pool = self.prompts_dataloader.dataset
        self.prompts_dataloader = StatefulDataLoader(pool, batch_size=1, sampler=self.sampler, collate_fn=pool.collate_fn)
        self.samples_generator.prompts_dataloader = self.prompts_dataloader
        # The LR schedule spans what the sampler will draw, not one pass over the whole pool.
        self.max_steps = (
            total_draws * rollout.n_samples_per_prompt // self.args.train.batch_size * self.args.train.max_epochs
        )
        # Each split: its PromptDataset (what the engines see), its original rows (what users
        # reuse) and its source. The pool rows come from the call prepare_datasets made, so they line up.
        data = self.args.data
        pool_rows = blending_datasets(
            data.prompt_dataset, data.prompt_probs, strategy, self.args.train.seed,
            max_count=data.max_samples, dataset_split=data.prompt_split,
        )  # fmt: skip
        pool_rows = pool_rows.select(range(min(data.max_samples, len(pool_rows))))
        self.splits = {"pool": (pool, pool_rows, data.prompt_dataset), **self._validation_sets()}
        self._stores: dict[str, RolloutStore] = {}
        self._summaries: dict[str, RolloutSummary] = {}
        self._scored: dict[str, list[int]] = {}  # per split: the prompts scored in every phase
        self._pending_status: dict = {}
        self._similarity: list[torch.Tensor] = []  # bm25 / embedding: one [N] score per validation set

    def _validation_sets(self) -> dict[str, tuple]:
        sets = {}
        keys = [self.args.data.input_key] + ([self.args.data.label_key] if self.args.data.label_key else [])
        for v, spec in enumerate(self.cropi.val_datasets or []):
            data = blending_datasets(spec, None, self.strategy, self.args.train.seed, dataset_split=self.cropi.val_split)
            missing = [k for k in keys if k not in data.column_names]
            if missing:
                raise CropiFlagError(
                    f"--cropi.val_datasets: {spec} has no column {missing[0]!r} "
                    f"(--data.input_key/--data.label_key; columns: {data.column_names})"
                )
            prompts = PromptDataset(data, self.tokenizer, self.strategy, input_template=self.args.data.input_template)
            sets[f"val{v}"] = (prompts, data, spec)
        return sets

    # ---- behavior rollouts -------------------------------------------------------------------

    def _ensure_rollouts(self, resumed_step: int) -> tuple[float, dict]:
        """Make what the store lacks; returns (seconds it took, status). Nothing on a complete store."""
        t0 = time.time()
        self._stores = {split: self._open_store(split) for split in self.splits}
        for split in self.splits:
            self._check_prompts(split)
        missing = {split: [i for i in range(len(self.splits[split][0])) if i not in store]
                   for split, store in self._stores.items()}  # fmt: skip
        self._check_resume(resumed_step, missing, "behavior rollouts")
        if any(missing.values()):
            self._generate(missing)
        self._summaries = {split: self._summary(split) for split in self.splits}
        if self.cropi.selector == "influence":
            for split, summary in self._summaries.items():
                if split != "pool" and not summary.usable.any():
                    raise CropiFlagError(
                        f"--cropi.val_datasets: {self.splits[split][2]}: all {len(summary)} prompts have the same "
                        "reward in every behavior sample (or identical responses with different rewards), so no "
                        f"validation gradient exists to score against (rollouts kept in {self._stores[split].path})"
                    )
        self._scored = {split: self._needs_behavior(split) for split in self.splits}
        unforced = {split: [i for i in scored if not bool(self._summaries[split].teacher_forced[i])]
                    for split, scored in self._scored.items()}  # fmt: skip
        self._check_resume(resumed_step, unforced, "behavior log-probs (log beta)")
        if any(unforced.values()):
            self._teacher_force(unforced)
        return time.time() - t0, self._report_behavior_pass()

    def _open_store(self, split: str) -> RolloutStore:
        samples = self.cropi.train_samples if split == "pool" else self.cropi.val_samples
        # logprob_temperature and max_tokens (the teacher-forcing micro-batch budget) are what
        # `cropi score` needs to reproduce log beta's numerics offline.
        meta = {
            "split": split,
            "source": self.splits[split][2],
            "model": self.args.actor.model_name_or_path,
            "samples": samples,
            "sample_temperature": self.cropi.behavior_temperature,
            "logprob_temperature": self.args.rollout.temperature,
            "max_len": self.args.data.max_len,
            "max_new_tokens": self.args.rollout.max_new_tokens,
            "max_tokens": self.cropi.max_tokens_per_gpu,
            # What else decides the stored tokens and rewards: a changed reward file, template,
            # key or sampling setting must not reuse them.
            "reward": [reward_source(url) for url in self.args.reward.remote_url],
            "apply_chat_template": self.args.data.apply_chat_template,
            "input_template": self.args.data.input_template,
            "input_key": self.args.data.input_key,
            "label_key": self.args.data.label_key,
            "top_p": self.args.rollout.top_p,
        }
        try:
            return RolloutStore.create(self.store_dir / "rollouts" / split, meta, exist_ok=True)
        except StoreBusyError as e:
            raise CropiFlagError(f"--cropi.store_dir: {e}") from None
        except StoreError as e:
            raise CropiFlagError(
                f"{e}. The store keeps how its rollouts were made (logprob_temperature: --rollout.temperature, "
                "sample_temperature: --cropi.behavior_temperature, samples: --cropi.train_samples or "
                "--cropi.val_samples, max_tokens: --cropi.max_tokens_per_gpu, reward: --reward.remote_url and the "
                "file's sha256, apply_chat_template / input_template / input_key / label_key: --data.*, top_p: "
                "--rollout.top_p): run with those settings, or give a new --cropi.store_dir"
            ) from None

    def _check_prompts(self, split: str) -> None:
        """Every stored prompt's text and label are the dataset's: rollouts and rewards of edited
        data (a fixed label, another template) are never reused."""
        dataset, _, source = self.splits[split]
        flag = "--data.prompt_dataset" if split == "pool" else "--cropi.val_datasets"
        for i, text, label in self._stores[split].prompts():
            if i >= len(dataset):
                continue  # reported by _summary, with its own fix
            now = json.loads(json.dumps(dataset.labels[i]))
            if text != dataset.prompts[i] or label != now:
                what = f"text {text[:200]!r} (now {dataset.prompts[i][:200]!r})" if text != dataset.prompts[i] else \
                    f"label {label!r} (now {now!r})"  # fmt: skip
                raise CropiFlagError(
                    f"{flag}: {source} ({split}) prompt {i} differs from the rollout store {self._stores[split].path}: "
                    f"stored {what}. Its behavior rollouts and rewards were made for the old data: give a new "
                    "--cropi.store_dir (or restore the data)"
                )

    def _check_resume(self, resumed_step: int, missing: dict[str, list[int]], what: str) -> None:
        """Rollouts and log beta come from the initial policy: a job resumed past step 0 no longer has it."""
        for split, indices in missing.items():
            if resumed_step > 0 and indices:
                flag = "--data.prompt_dataset" if split == "pool" else "--cropi.val_datasets"
                raise CropiFlagError(
                    f"{flag}: {self.splits[split][2]} ({split}): the rollout store {self._stores[split].path} lacks "
                    f"{what} of {len(indices)} prompts, and this job resumes from step {resumed_step}, whose policy "
                    "is no longer the initial policy they must come from. Resume with the datasets and --cropi.* "
                    "settings this run started with (for a new validation set: without it), or start a new run "
                    "(without --ckpt.load_enable, or with a new --ckpt.path), which makes them from the initial policy"
                )

    def _summary(self, split: str) -> RolloutSummary:
        summary = self._stores[split].summary(self.objective)
        if not torch.equal(summary.index, torch.arange(len(self.splits[split][0]))):
            raise CropiFlagError(
                f"{self._stores[split].path}: the store holds prompts {summary.index[-1].item()} and beyond that "
                f"{self.splits[split][2]} does not have: it was made from other data (--data.max_samples?); "
                "give a new --cropi.store_dir"
            )
        return summary

    def _needs_behavior(self, split: str) -> list[int]:
        """The prompts scored in every phase, hence teacher-forced: none for the baselines; the pool's
        prompts with a gradient; a validation set's seeded choice of --cropi.max_val_prompts of those."""
        if self.cropi.selector != "influence":
            return []
        usable = torch.nonzero(self._summaries[split].usable).flatten().tolist()
        return usable if split == "pool" else choose_validation(usable, self.cropi.max_val_prompts, self.cropi.seed)

    def _generate(self, missing: dict[str, list[int]]) -> None:
        """Behavior rollouts of the missing prompts of all splits in one pass: the engines wake once,
        --cropi.behavior_chunk prompts are in flight, each chunk of finished prompts is stored."""
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=self.cropi.behavior_temperature,
            top_p=self.args.rollout.top_p,
            max_tokens=self.args.rollout.max_new_tokens,
            min_tokens=1,
            skip_special_tokens=False,
            logprobs=0,  # the sampled token's own: a check on log beta (_teacher_force)
        )
        tokenizer = _TokenizerByName(self.args.actor.model_name_or_path, not self.args.data.disable_fast_tokenizer)
        chunk, max_len = self.cropi.behavior_chunk, self.args.data.max_len
        todo = iter([(split, i) for split, indices in missing.items() for i in indices])
        progress = _Progress("CROPI behavior rollouts", sum(map(len, missing.values())))
        logger.info(f"CROPI behavior rollouts: {({s: len(m) for s, m in missing.items()})} prompts to generate")
        engines = itertools.cycle(self.vllm_engines)
        pending: dict = {}
        done: dict[str, list[PromptRollouts]] = {split: [] for split in missing}

        def submit() -> None:
            for split, i in itertools.islice(todo, chunk - len(pending)):
                dataset = self.splits[split][0]
                ref = next(engines).generate_responses.remote(
                    prompt=dataset.prompts[i], label=dataset.labels[i], sampling_params=params, max_length=max_len,
                    hf_tokenizer=tokenizer,
                    num_samples=self.cropi.train_samples if split == "pool" else self.cropi.val_samples,
                )  # fmt: skip
                pending[ref] = (split, i)

        if self.args.vllm.enable_sleep:
            batch_vllm_engine_call(self.vllm_engines, "wake_up")
        try:
            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=min(len(pending), 64), timeout=10)
                for ref in ready:
                    split, i = pending.pop(ref)
                    dataset, rows, _ = self.splits[split]
                    done[split].append(behavior_record(split, i, dataset.prompts[i], dataset.labels[i], dict(rows[i]),
                                                       ray.get(ref), max_len, self.cropi.skip_failed_rewards))  # fmt: skip
                    if len(done[split]) == chunk:
                        self._stores[split].append(done[split])
                        done[split] = []
                submit()
                progress.update(len(ready))
        finally:  # finished prompts are kept, even when the pass fails
            for split, records in done.items():
                self._stores[split].append(records)
            if self.args.vllm.enable_sleep:
                batch_vllm_engine_call(self.vllm_engines, "sleep")

    def _teacher_force(self, unforced: dict[str, list[int]]) -> None:
        """log beta, chunk by chunk on the policy ranks, at --rollout.temperature: the temperature of
        the policy's log-probs in training, so rho is exactly 1 at phase 0 whatever the behavior
        temperature sampled at. Compared with the log-probs vLLM sampled with where both are of
        the same distribution: vLLM reports raw log-probs (temperature 1) unless OpenRLHF's
        importance-sampling correction asks for processed ones."""
        jobs = [(split, i) for split, indices in unforced.items() for i in indices]
        progress = _Progress("CROPI teacher forcing", len(jobs))
        comparable = self.args.rollout.temperature == 1.0 and self.args.algo.advantage.is_correction_level == "off"
        gap_max, gap_sum, gap_tokens = 0.0, 0.0, 0  # running: the pass's tokens are never all held
        for start in range(0, len(jobs), self.cropi.behavior_chunk):
            part = jobs[start : start + self.cropi.behavior_chunk]
            logprobs = self._on_actors(
                "cropi_behavior_log_probs", part, self.args.rollout.temperature, self.cropi.max_tokens_per_gpu
            )
            for split in unforced:
                self._stores[split].append_behavior({i: lp for (s, i), lp in zip(part, logprobs) if s == split})
                self._summaries[split].teacher_forced[[i for s, i in part if s == split]] = True
            if comparable:
                for (split, i), lp in zip(part, logprobs):
                    sampled = self._stores[split].get(i).sampling_logprobs
                    if sampled is not None:
                        gap = (torch.cat(lp) - torch.cat(sampled)).abs()
                        gap_max, gap_sum = max(gap_max, gap.max().item()), gap_sum + gap.sum().item()
                        gap_tokens += len(gap)
            progress.update(len(part))
        if gap_tokens:
            logger.info(f"CROPI log beta (policy actors) vs the log-probs vLLM sampled with, {gap_tokens} tokens: "
                        f"max |difference| {gap_max:.2e}, mean {gap_sum / gap_tokens:.2e}")  # fmt: skip

    def _report_behavior_pass(self) -> dict:
        """Log what the pass teacher-forced and what it saved; warn once about zero-gradient prompts."""
        lines, status = [], {}
        for split, summary in self._summaries.items():
            zero_var, zero_grad = int(summary.zero_variance.sum()), int(summary.zero_gradient.sum())
            usable = len(summary) - zero_var - zero_grad
            lines.append(f"{split}: {len(self._scored[split])} of {len(summary)} ({zero_var} without reward variance, "
                         f"{zero_grad} with a zero gradient, {usable - len(self._scored[split])} beyond the cap or "
                         "unused by this selector)")  # fmt: skip
            if zero_grad:
                logger.warning(
                    f"CROPI: {zero_grad} {split} prompts got different rewards for identical responses: their "
                    "advantages cancel, so their gradient is 0 (no score). Is the reward function deterministic?"
                )
            status[f"cropi/{split}_teacher_forced"] = float(len(self._scored[split]))
        total = sum(len(s) for s in self._summaries.values())
        forced = sum(len(s) for s in self._scored.values())
        logger.info(f"CROPI teacher forcing: {forced} of {total} prompts need log beta, "
                    f"{1 - forced / max(total, 1):.0%} of the forward passes saved; " + "; ".join(lines))  # fmt: skip
        return status

    def _on_actors(self, method: str, jobs: list[tuple[str, int]], *args) -> list:
        """Run a CROPI method on every policy rank, rank r on jobs[r::world], (split, prompt index)
        pairs that the rank reads from the rollout store itself (told which chunk files hold
        them); results in job order. The methods need the weights only, which stay on the device
        under --ds.enable_sleep (OpenRLHF's offload moves the optimizer states): nothing is reloaded."""
        world = self.args.actor.num_nodes * self.args.actor.num_gpus_per_node
        reads = [[(str(self._stores[split].path), i, self._stores[split].chunks_of(i)) for split, i in jobs[r::world]]
                 for r in range(world)]  # fmt: skip
        per_rank = ray.get(self.actor_model_group.async_run_method(method, reads, *args))
        out = [None] * len(jobs)
        for rank, results in enumerate(per_rank):
            out[rank::world] = results
        return out

    # ---- the cheap targeting baselines --------------------------------------------------------

    def _validation_choice(self, split: str) -> list[int]:
        """The validation prompts bm25 and embedding compare with: a seeded choice of --cropi.max_val_prompts."""
        return choose_validation(range(len(self.splits[split][0])), self.cropi.max_val_prompts, self.cropi.seed)

    def _similarities(self, resumed_step: int) -> list[torch.Tensor]:
        """bm25 or embedding scores of every pool prompt against each validation set ([N] each).
        The embedding is the initial policy's: kept in the store, and required there by a job
        resumed past step 0."""
        val_splits = [s for s in self.splits if s != "pool"]
        if self.cropi.selector == "bm25":
            val_texts = [[self.splits[s][0].prompts[i] for i in self._validation_choice(s)] for s in val_splits]
            return bm25_scores(self.splits["pool"][0].prompts, val_texts)
        path = self.store_dir / "embedding_cosines.pt"
        meta = {"model": self.args.actor.model_name_or_path, "sources": [self.splits[s][2] for s in self.splits],
                "max_val_prompts": self.cropi.max_val_prompts, "seed": self.cropi.seed}  # fmt: skip
        saved = torch.load(path) if path.exists() else None
        if saved is not None and saved["meta"] == meta:
            return list(saved["cosines"])
        if resumed_step > 0:
            raise CropiFlagError(
                f"--cropi.selector embedding: {path} " + ("is missing" if saved is None else f"was made for {saved['meta']}")
                + f": the embeddings are the initial policy's, which this job, resumed from step {resumed_step}, no "
                "longer has. Resume with the settings this run started with, or start a new run"
            )
        means = []
        for split in val_splits:
            vectors = [v for v in self._on_actors("cropi_embed", [(split, i) for i in self._validation_choice(split)])
                       if v is not None]  # fmt: skip
            if not vectors:
                raise RuntimeError(f"CROPI: no finite prompt embedding in {self.splits[split][2]}")
            means.append(torch.stack(vectors).double().mean(0))
        pool_size = len(self.splits["pool"][0])
        world = self.args.actor.num_nodes * self.args.actor.num_gpus_per_node
        cosines, _ = pool_cosines(
            range(pool_size), pool_size, len(means),
            projected_cosines(lambda positions: self._on_actors("cropi_embed", [("pool", p) for p in positions]), means),
            chunk=SCORE_CHUNK_PER_RANK * world, progress="CROPI prompt embeddings",
        )  # fmt: skip
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"meta": meta, "cosines": cosines}, tmp)
        os.replace(tmp, path)
        return list(cosines)

    # ---- phases ------------------------------------------------------------------------------

    def _select(self, phase: int) -> dict:
        t0 = time.time()
        pool = self._summaries["pool"]
        usable, pass_rate = pool.usable, pool.pass_rate
        if self.cropi.selector != "random" and not usable.any():
            raise RuntimeError(
                f"CROPI: all {len(pool)} pool prompts got the same reward (as training sees it) in every behavior "
                "sample (or different rewards for identical responses), so none can be selected: check the reward "
                "function, or raise --cropi.train_samples"
            )
        status = {"cropi/phase": phase, "cropi/prompts_zero_variance": float(pool.zero_variance.sum()),
                  "cropi/prompts_zero_gradient": float(pool.zero_gradient.sum())}  # fmt: skip
        # A fresh random draw each phase; the others break ties by one seeded order in every phase.
        drawn, extra = self.cropi.selector in ("random", "variance"), {}
        seed = self.cropi.seed + phase if drawn else self.cropi.seed
        if self.cropi.selector in ("bm25", "embedding"):  # scored once, at the start
            cosines, t_grad, t_score = self._similarity, 0.0, 0.0
            scored = ~torch.isnan(cosines[0])
            selected, scores = self._select_prompts(phase, self.cropi.selector, self.cropi.alpha, usable, pass_rate,
                                                    cosines, scored, self.cropi.rrf_k, seed=seed)  # fmt: skip
        elif self.cropi.selector != "influence":
            selected, scores = self._select_prompts(phase, self.cropi.selector, self.cropi.alpha, usable, pass_rate,
                                                    seed=seed)  # fmt: skip
            cosines, t_grad, t_score = [], 0.0, 0.0
        else:
            selected, scores, cosines, t_grad, grad_status, extra = self._influence(phase, usable, pass_rate)
            t_score = time.time() - t0 - t_grad
            status.update(grad_status)
        for v, c in enumerate(cosines):  # bm25: scores, not cosines
            finite = c[torch.isfinite(c)]
            status[f"cropi/val{v}_cos_mean"] = finite.mean().item()
            status[f"cropi/val{v}_cos_selected_mean"] = c[selected].mean().item()
        previous = set(self.sampler.subset)
        self.sampler.set_subset(phase, selected)
        chosen = scores[selected].double()
        status.update(
            {
                "cropi/subset_size": float(len(selected)),
                "cropi/subset_overlap_prev": len(previous & set(selected)) / len(selected) if previous else 0.0,
                "cropi/score_selected_mean": chosen.mean().item(),
                "cropi/score_selected_min": chosen.min().item(),
                "cropi/time_gradients": t_grad,
                "cropi/time_scoring": t_score,
            }
        )
        self._save_phase(phase, selected, scores, cosines, status, seed, extra)
        logger.info(f"CROPI phase {phase}: {len(selected)} prompts selected ({self.cropi.selector}): {status}")
        return status

    @staticmethod
    def _select_prompts(phase: int, *args, **kwargs):
        try:
            return select_prompts(*args, **kwargs)
        except ValueError as error:  # nothing selectable: stop now, with the counts
            raise RuntimeError(f"CROPI phase {phase}: {error}") from None

    def _influence(self, phase: int, usable: torch.Tensor, pass_rate: torch.Tensor):
        """The pool's cosines and the selection; with --cropi.cascade, first the cheap stage on the
        whole pool, then every parameter's gradients on its top C x alpha, the selection among them."""
        cropi, candidates, t_grad = self.cropi, self._scored["pool"], 0.0
        status, extra = {}, {}
        if cropi.cascade:
            cheap, nonfinite_cheap, t_grad = self._pool_cosines(candidates, cropi.grad_layers)
            shortlist, _ = self._select_prompts(phase, "influence", min(1.0, cropi.cascade * cropi.alpha), usable,
                                                pass_rate, cheap, ~torch.isnan(cheap[0]), cropi.rrf_k, seed=cropi.seed)  # fmt: skip
            candidates = sorted(shortlist)
            status = {"cropi/cascade_shortlist": float(len(shortlist)), "cropi/time_gradients_cheap": t_grad,
                      "cropi/prompts_scored_cheap": float((~torch.isnan(cheap[0])).sum()),
                      "cropi/prompts_nonfinite_cheap": float(nonfinite_cheap)}  # fmt: skip
            extra = {"cascade": {"layers": cropi.grad_layers, "shortlist": shortlist, "cosines": cheap}}
        cosines, nonfinite, t_full = self._pool_cosines(candidates, 0 if cropi.cascade else cropi.grad_layers)
        scored = ~torch.isnan(cosines[0])
        selected, scores = self._select_prompts(
            phase, "influence", cropi.alpha, usable, pass_rate, cosines, scored, cropi.rrf_k, seed=cropi.seed
        )
        status |= {"cropi/prompts_scored": float(scored.sum()), "cropi/prompts_nonfinite": float(nonfinite)}
        return selected, scores, cosines, t_grad + t_full, status, extra

    def _pool_cosines(self, candidates: list[int], layers: int) -> tuple[list[torch.Tensor], int, float]:
        """Validation targets first, then the pool's ``candidates`` chunk by chunk, with the gradients
        of the top ``layers`` blocks (0: all): only one chunk of d-vectors (or, exact, of cosines)
        exists at a time. The ranks keep the projector layout or exact targets until the pool is
        scored. Returns the cosines per validation set, the count of non-finite gradients, and
        the seconds on the ranks."""
        max_tokens, exact = self.cropi.max_tokens_per_gpu, self.cropi.projector == "none"
        projector = {"keep_ratio": self.cropi.keep_ratio, "proj_dim": self.cropi.proj_dim,
                     "kind": self.cropi.projector, "seed": self.cropi.seed}  # fmt: skip
        t_grad, nonfinite_val = 0.0, 0

        def on_actors(method: str, jobs: list[tuple[str, int]], *args) -> list:
            nonlocal t_grad
            t0 = time.time()
            out = self._on_actors(method, jobs, *args)
            t_grad += time.time() - t0
            return out

        ray.get(self.actor_model_group.async_run_method("cropi_use_layers", layers))
        try:
            targets = []
            for split in (s for s in self.splits if s != "pool"):
                jobs = [(split, i) for i in self._scored[split]]
                if exact:  # the ranks keep the mean
                    used = sum(on_actors("cropi_exact_target", jobs, max_tokens))
                else:
                    vectors = [v for v in on_actors("cropi_project", jobs, projector, max_tokens) if v is not None]
                    used = len(vectors)
                    targets.append(validation_vector(torch.stack(vectors)) if vectors else None)
                nonfinite_val += len(jobs) - used
                if not used:
                    raise RuntimeError(f"CROPI: no finite validation gradient in {split}")

            def pool_gradients(positions: list[int]) -> list:
                jobs = [("pool", p) for p in positions]
                return on_actors("cropi_exact_cosines", jobs, max_tokens) if exact else \
                    on_actors("cropi_project", jobs, projector, max_tokens)  # fmt: skip

            cosines_of = pool_gradients if exact else projected_cosines(pool_gradients, targets)
            world = self.args.actor.num_nodes * self.args.actor.num_gpus_per_node
            cosines, nonfinite = pool_cosines(
                candidates, len(self._summaries["pool"]), len(self.splits) - 1, cosines_of,
                chunk=SCORE_CHUNK_PER_RANK * world, progress="CROPI scoring" + (f" (top {layers} blocks)" if layers else ""),
            )  # fmt: skip
        finally:  # the ranks drop the stage's layers, projector layout or exact targets before training resumes
            ray.get(self.actor_model_group.async_run_method("cropi_end_phase"))
        return cosines, int(nonfinite.sum()) + nonfinite_val, t_grad

    def _save_phase(self, phase, selected: list[int], scores: torch.Tensor, cosines: list, status: dict, seed: int,
                    extra: dict):
        """phases/phase-NNN.json: the selection, each pool prompt's score and cosine per validation
        set (bm25: its BM25 score; null where unscored), the tie-break order, with --cropi.cascade
        the cheap stage's layers, shortlist and cosines; phase-NNN.jsonl: the selected rows, usable
        as a prompt dataset."""
        out = self.store_dir / "phases"
        out.mkdir(parents=True, exist_ok=True)

        def finite_or_none(values: torch.Tensor) -> list:
            return [v if v == v and abs(v) != float("inf") else None for v in values.double().tolist()]

        record = {
            "phase": phase,
            "selector": self.cropi.selector,
            "selected": selected,
            "scores": finite_or_none(scores),
            "cosines": [finite_or_none(c) for c in cosines],
            "status": status,
        }
        if "cascade" in extra:
            cascade = extra["cascade"]
            record["cascade"] = {**cascade, "cosines": [finite_or_none(c) for c in cascade["cosines"]]}
        if self.cropi.selector not in ("random", "variance"):
            # Among equal scores, the prompt earlier in this permutation wins; the same in every phase.
            record["tie_break"] = {"seed": seed, "permutation": tie_break_permutation(len(scores), seed).tolist()}
        rows = self.splits["pool"][1]
        subset = "".join(json.dumps(dict(rows[i]), ensure_ascii=False) + "\n" for i in sorted(selected))
        for name, text in ((f"phase-{phase:03d}.json", json.dumps(record)), (f"phase-{phase:03d}.jsonl", subset)):
            tmp = out / f".{name}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out / name)  # a restarted job selects a phase again: replaced, not added
        fsync_dir(out)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, global_step: int = 0) -> None:
        # A resumed run finds its phase and subset in the checkpoint's sampler state.
        resumed_step = self.init_checkpoint_states()["global_step"]
        t_rollouts, rollout_status = self._ensure_rollouts(resumed_step)
        if self.cropi.selector in ("bm25", "embedding"):
            t0 = time.time()
            self._similarity = self._similarities(resumed_step)
            rollout_status["cropi/time_similarity"] = time.time() - t0
        if resumed_step == 0:
            if self.eval_dataloader is not None and self.args.eval.steps > 0:
                # The initial policy's accuracy, the point every curve starts from, with the
                # sampling settings PPOTrainer.fit evaluates with.
                eval_args = self.args.eval
                settings = {"temperature": eval_args.temperature, "n_samples_per_prompt": eval_args.n_samples_per_prompt}
                self.evaluate(0, **{**self.generate_kwargs, **settings})
            self._pending_status = {**self._select(0), "cropi/time_rollouts": t_rollouts, **rollout_status}
        try:
            super().fit(global_step)
        finally:  # the writer's locks: a next job on this run directory may start at once
            for store in self._stores.values():
                store.close()

    def train_step(self, rollout_samples, global_step: int):
        trained_phase = self.sampler.phase  # the subset these samples were drawn from
        status, global_step = super().train_step(rollout_samples, global_step)
        status.update(self._pending_status)
        self._pending_status = {}
        phase, boundary = divmod(global_step, self.cropi.steps_per_phase)
        if boundary == 0 and phase < self.cropi.num_phases:
            status.update(self._select(phase))
        status["cropi/phase"] = float(trained_phase)
        return status, global_step


CropiPPOTrainer = ray.remote(_CropiPPOTrainer)
