"""OpenRLHF's PPO trainer (the single controller) with CROPI's curriculum.

- Before the first step: behavior rollouts of every pool and validation prompt from the initial
  policy (vLLM engines, the job's reward function), behavior log-probs by teacher forcing on
  the DeepSpeed policy actors, all written to the rollout store chunk by chunk. A restarted job
  generates only what the store lacks.
- At step 0 and every --cropi.steps_per_phase steps: projected off-policy gradients on all
  policy ranks, scores, selection; the prompt sampler switches to the new subset.
- The sampler's state rides in OpenRLHF's checkpoint, so --ckpt.load_enable resumes in the
  same phase on the same subset.
"""

from __future__ import annotations

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

from openrlhf_cropi.core.advantages import zero_variance
from openrlhf_cropi.core.scoring import choose_validation, cosine, select_prompts, validation_vector
from openrlhf_cropi.core.store import PromptRollouts, RolloutStore
from openrlhf_cropi.flags import CropiFlagError, cropi_args
from openrlhf_cropi.ray.policy_actor import num_passes
from openrlhf_cropi.sampler import PhaseSampler

logger = init_logger(__name__)

CHUNK_PROMPTS = 64  # prompts generated, teacher-forced and stored per chunk


class _CropiPPOTrainer(PPOTrainer.__ray_actor_class__):
    def __init__(self, pretrain, strategy, actor_model_group, *args, **kwargs):
        super().__init__(pretrain, strategy, actor_model_group, *args, **kwargs)
        self.cropi = cropi_args(self.args)
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
        self._records: dict[str, list[PromptRollouts]] = {}
        self._pending_status: dict = {}

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

    def _ensure_rollouts(self) -> float:
        """Generate and store what the store lacks; returns the seconds that took (0 on a full store)."""
        t0 = time.time()
        for split, (dataset, rows, source) in self.splits.items():
            samples = self.cropi.train_samples if split == "pool" else self.cropi.val_samples
            # temperature and max_tokens (the teacher-forcing micro-batch budget) are what
            # `cropi score` needs to reproduce these log-probs offline.
            meta = {
                "split": split,
                "source": source,
                "model": self.args.actor.model_name_or_path,
                "samples": samples,
                "temperature": self.cropi.behavior_temperature,
                "max_len": self.args.data.max_len,
                "max_new_tokens": self.args.rollout.max_new_tokens,
                "max_tokens": self.args.train.max_tokens_per_gpu,
            }
            store = RolloutStore.create(self.store_dir / "rollouts" / split, meta, exist_ok=True)
            missing = [i for i in range(len(dataset)) if i not in store]
            if missing:
                logger.info(f"CROPI behavior rollouts for {split}: {len(missing)} of {len(dataset)} prompts to generate")
            for start in tqdm(range(0, len(missing), CHUNK_PROMPTS), desc=f"CROPI rollouts {split}", disable=not missing):
                store.append(self._rollout_chunk(dataset, rows, missing[start : start + CHUNK_PROMPTS], samples))
            self._records[split] = [store.get(i) for i in range(len(dataset))]
        for split, records in self._records.items():
            if split != "pool" and bool(zero_variance(torch.stack([r.rewards for r in records])).all()):
                raise CropiFlagError(
                    f"--cropi.val_datasets: {self.splits[split][2]}: all {len(records)} prompts have "
                    "the same reward in every behavior sample, so no validation gradient exists to score against "
                    f"(rollouts kept in {self.store_dir / 'rollouts' / split})"
                )
        return time.time() - t0

    def _rollout_chunk(self, dataset: PromptDataset, rows, indices: list[int], samples: int) -> list[PromptRollouts]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=self.cropi.behavior_temperature,
            top_p=self.args.rollout.top_p,
            max_tokens=self.args.rollout.max_new_tokens,
            min_tokens=1,
            skip_special_tokens=False,
        )
        if self.args.vllm.enable_sleep:
            batch_vllm_engine_call(self.vllm_engines, "wake_up")
        refs = [
            self.vllm_engines[n % len(self.vllm_engines)].generate_responses.remote(
                prompt=dataset.prompts[i], label=dataset.labels[i], sampling_params=params,
                max_length=self.args.data.max_len, hf_tokenizer=self.tokenizer, num_samples=samples,
            )  # fmt: skip
            for n, i in enumerate(indices)
        ]
        outputs = ray.get(refs)
        if self.args.vllm.enable_sleep:
            batch_vllm_engine_call(self.vllm_engines, "sleep")

        items = []
        for i, responses in zip(indices, outputs):
            start = responses[0]["action_ranges"][0][0]
            items.append(
                {
                    "prompt_ids": torch.tensor(responses[0]["observation_tokens"][:start]),
                    "responses": [torch.tensor(r["observation_tokens"][start : self.args.data.max_len]) for r in responses],
                    "rewards": torch.tensor([float(r["reward"] if r["reward"] is not None else 0.0) for r in responses]),
                }
            )
        behavior = self._on_actors(
            "cropi_behavior_log_probs", items, self.cropi.behavior_temperature, self.args.train.max_tokens_per_gpu
        )
        return [
            PromptRollouts(
                index=i, text=dataset.prompts[i], label=dataset.labels[i], row=dict(rows[i]),
                prompt_ids=it["prompt_ids"], responses=it["responses"], rewards=it["rewards"],
                behavior_logprobs=behavior[n],
            )  # fmt: skip
            for n, (i, it) in enumerate(zip(indices, items))
        ]

    def _on_actors(self, method: str, items: list[dict], *args) -> list:
        """Run a CROPI method on every policy rank, rank r on items[r::world]; results in item order."""
        world = self.args.actor.num_nodes * self.args.actor.num_gpus_per_node
        shares = [items[r::world] for r in range(world)]
        passes = [num_passes(share, self.args.train.max_tokens_per_gpu) for share in shares]
        if self.args.ds.enable_sleep:
            ray.get(self.actor_model_group.async_run_method("reload_states"))
        # Nested in a list, the references reach the actors unresolved: each fetches its own share.
        refs = [ray.put(share) for share in shares]
        per_rank = ray.get(self.actor_model_group.async_run_method(method, refs, passes, *args))
        if self.args.ds.enable_sleep:
            ray.get(self.actor_model_group.async_run_method("offload_states"))
        out = [None] * len(items)
        for rank, results in enumerate(per_rank):
            out[rank::world] = results
        return out

    # ---- phases ------------------------------------------------------------------------------

    def _select(self, phase: int) -> dict:
        t0 = time.time()
        pool = self._records["pool"]
        has_variance = ~zero_variance(torch.stack([r.rewards for r in pool]))
        pass_rate = torch.stack([r.rewards.double().mean() for r in pool])
        if self.cropi.selector != "random" and not has_variance.any():
            raise RuntimeError(
                f"CROPI: all {len(pool)} pool prompts got the same reward in every behavior sample, so none can be "
                "selected: check the reward function, or raise --cropi.train_samples"
            )
        status = {"cropi/phase": phase, "cropi/prompts_zero_variance": float((~has_variance).sum())}
        if self.cropi.selector != "influence":
            selected, scores = select_prompts(
                self.cropi.selector, self.cropi.alpha, has_variance, pass_rate, seed=self.cropi.seed + phase
            )
            cosines, t_grad, t_score = [], 0.0, 0.0
        else:
            selected, scores, cosines, t_grad, grad_status = self._influence(has_variance, pass_rate)
            t_score = time.time() - t0 - t_grad
            status.update(grad_status)
            for v, c in enumerate(cosines):
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
        self._save_phase(phase, selected, scores, cosines, status)
        logger.info(f"CROPI phase {phase}: {len(selected)} prompts selected ({self.cropi.selector}): {status}")
        return status

    def _influence(self, has_variance: torch.Tensor, pass_rate: torch.Tensor):
        t0 = time.time()
        pool = self._records["pool"]
        val_splits = [s for s in self._records if s != "pool"]
        jobs = [("pool", i) for i in torch.nonzero(has_variance).flatten().tolist()]
        for split in val_splits:
            records = self._records[split]
            candidates = [i for i, r in enumerate(records) if not bool(zero_variance(r.rewards))]
            jobs += [(split, i) for i in choose_validation(candidates, self.cropi.max_val_prompts, self.cropi.seed)]
        items = [
            {"prompt_ids": r.prompt_ids, "responses": r.responses, "rewards": r.rewards, "behavior": r.behavior_logprobs}
            for r in (self._records[split][i] for split, i in jobs)
        ]
        projector = {"keep_ratio": self.cropi.keep_ratio, "proj_dim": self.cropi.proj_dim,
                     "kind": self.cropi.projector, "seed": self.cropi.seed}  # fmt: skip
        results = self._on_actors("cropi_project", items, projector, self.args.train.max_tokens_per_gpu)
        t_grad = time.time() - t0

        finite = torch.tensor([v is not None for v in results])
        vectors = torch.stack([v if v is not None else torch.zeros(self.cropi.proj_dim) for v in results])
        nonfinite = int((~finite).sum())
        scored = torch.zeros(len(pool), dtype=torch.bool)
        pool_vectors = torch.zeros(len(pool), self.cropi.proj_dim)
        cosines = []
        for n, (split, i) in enumerate(jobs):
            if split == "pool" and finite[n]:
                scored[i], pool_vectors[i] = True, vectors[n]
        for split in val_splits:
            rows = [n for n, (s, _) in enumerate(jobs) if s == split and finite[n]]
            if not rows:
                raise RuntimeError(f"CROPI: no finite validation gradient in {split}")
            c = cosine(pool_vectors, validation_vector(vectors[rows]))
            cosines.append(torch.where(scored, c, torch.full_like(c, float("nan"))))
        selected, scores = select_prompts(
            "influence", self.cropi.alpha, has_variance, pass_rate, cosines, scored, self.cropi.rrf_k
        )
        status = {"cropi/prompts_scored": float(scored.sum()), "cropi/prompts_nonfinite": float(nonfinite)}
        return selected, scores, cosines, t_grad, status

    def _save_phase(self, phase, selected: list[int], scores: torch.Tensor, cosines: list, status: dict) -> None:
        """phases/phase-NNN.json: the selection, each pool prompt's score and cosine per validation
        set (null where unscored); phase-NNN.jsonl: the selected rows, usable as a prompt dataset."""
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
        pool = self._records["pool"]
        subset = "".join(json.dumps(pool[i].row, ensure_ascii=False) + "\n" for i in sorted(selected))
        for name, text in ((f"phase-{phase:03d}.json", json.dumps(record)), (f"phase-{phase:03d}.jsonl", subset)):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, global_step: int = 0) -> None:
        t_rollouts = self._ensure_rollouts()
        # A resumed run finds its phase and subset in the checkpoint's sampler state.
        if self.init_checkpoint_states()["global_step"] == 0:
            if self.eval_dataloader is not None and self.args.eval.steps > 0:
                # The initial policy's accuracy, the point every curve starts from, with the
                # sampling settings PPOTrainer.fit evaluates with.
                eval_args = self.args.eval
                settings = {"temperature": eval_args.temperature, "n_samples_per_prompt": eval_args.n_samples_per_prompt}
                self.evaluate(0, **{**self.generate_kwargs, **settings})
            self._pending_status = {**self._select(0), "cropi/time_rollouts": t_rollouts}
        super().fit(global_step)

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
