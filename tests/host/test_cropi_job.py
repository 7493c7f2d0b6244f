"""A whole CROPI job on the CPU stack: phases, killed after the first boundary, resumed.

One job (tiny model, 16-prompt pool, one validation set, 3 phases x 2 steps, behavior responses
sampled at temperature 0.5 while the policy trains at 1.0) is killed as soon as its step-2
checkpoint (taken right after the phase-1 selection) is on disk, then resumed with
--ckpt.load_enable. Checked:
- only the prompts that can be scored were teacher-forced (not the zero-variance ones);
- phases re-scored at new weights, the sampler switched to each new subset, ties broken by
  one recorded permutation;
- the in-job phase-1 cosines equal `cropi score` (the offline CLI) on the step-2 checkpoint, both
  with gradients of the top block and the head only (--cropi.grad_layers 1 / --grad-layers 1),
  with the job's responses and rewards but log beta recomputed here from the INITIAL model at
  the training temperature: log beta and log pi share one temperature;
- resuming with a validation set added stops with an error naming it (its rollouts would have
  to come from the initial policy, which the resumed job no longer holds), writing nothing;
- the resumed job trains phase 1 on the same subset, generates no rollout, redoes no
  selection, selects phase 2 at step 4 and trains on to the end.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from openrlhf_cropi.core.store import PromptRollouts, RolloutStore

pytestmark = [pytest.mark.host, pytest.mark.e2e]

ROOT = pathlib.Path(__file__).resolve().parents[2]
REWARD = ROOT / "launch/local/smoke/reward.py"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _job_command(tmp_path, model, *extra, reward=REWARD, val_label=lambda a: str(2 * a), more_val=()):
    pool = _jsonl(tmp_path / "pool.jsonl", [{"prompt": f"What is {a} - {b}?", "label": str(a - b)}
                                            for a, b in zip(range(30, 46), range(3, 50, 3))])  # fmt: skip
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": f"What is {a} + {a}?", "label": val_label(a)} for a in range(11, 17)])
    flags = [
        "--actor.model_name_or_path", model, "--reward.remote_url", reward,
        "--data.prompt_dataset", pool, "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.apply_chat_template", "--data.max_len", "64", "--rollout.max_new_tokens", "12",
        "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
        "--rollout.batch_size", "2", "--rollout.micro_batch_size", "4", "--train.batch_size", "8",
        "--train.micro_batch_size", "4", "--actor.adam.lr", "5e-3", "--actor.lr_warmup_ratio", "0",
        "--algo.kl.init_coef", "1e-3", "--algo.kl.use_loss", "--algo.kl.estimator", "k3",
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
        "--vllm.num_engines", "1", "--vllm.sync_backend", "gloo", "--vllm.enforce_eager",
        "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--ds.attn_implementation", "eager", "--train.seed", "0",
        "--ckpt.path", tmp_path / "ckpt", "--ckpt.save_steps", "2", "--ckpt.save_hf",
        "--ckpt.output_dir", tmp_path / "final", "--logger.tensorboard_dir", tmp_path / "tb",
        "--cropi.enable", "--cropi.val_datasets", val, *more_val, "--cropi.alpha", "0.25",
        "--cropi.steps_per_phase", "2", "--cropi.num_phases", "3", "--cropi.train_samples", "4",
        "--cropi.val_samples", "4", "--cropi.keep_ratio", "0.5", "--cropi.proj_dim", "256",
        "--cropi.behavior_temperature", "0.5", "--rollout.temperature", "1.0", "--cropi.grad_layers", "1", *extra,
    ]  # fmt: skip
    script = '. launch/local/cpu_env.sh; start_ray 3; trap stop_ray EXIT; python -m openrlhf_cropi.cli.train_ppo_ray "$@"'
    return ["bash", "-c", script, "cropi-job", *map(str, flags)]


def _run_until(command, done, log, timeout=900):
    """Run the job; when done() turns true, kill it (its whole process group) as a crash would."""
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while job.poll() is None and time.time() < deadline:
            if done():
                os.killpg(job.pid, signal.SIGTERM)
                break
            time.sleep(0.5)
        else:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        return job.wait(60)


def _tensorboard_runs(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for run in sorted(p for p in tb_dir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run))
        events.Reload()
        runs.append({t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]})
    return runs


def _sampler_state(checkpoint_file):
    def find(node):
        if isinstance(node, dict):
            if "subset" in node and "phase" in node:
                return node
            for value in node.values():
                if (found := find(value)) is not None:
                    return found
        return None

    return find(torch.load(checkpoint_file, map_location="cpu", weights_only=False))


def _with_log_beta_from(initial_model, job_store, out, temperature):
    """The job's responses and rewards with log beta recomputed from the initial model (plain
    transformers, response by response, full-vocab log_softmax of logits / temperature) for the
    prompts the job teacher-forced; the others stay without, as in the job's store."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(initial_model, dtype=torch.float32).eval()
    source = RolloutStore(job_store)
    store = RolloutStore.create(out, {"logprob_temperature": temperature, "max_tokens": source.meta["max_tokens"]})
    records = []
    for i in source.indices():
        rec = source.get(i)
        behavior = None
        if rec.behavior_logprobs is not None:
            behavior = []
            for ids in rec.responses:
                with torch.no_grad():
                    logits = model(torch.cat([rec.prompt_ids, ids]).unsqueeze(0)).logits[0, len(rec.prompt_ids) - 1 : -1]
                behavior.append(torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1))
        records.append(PromptRollouts(i, rec.text, rec.label, rec.row, rec.prompt_ids, rec.responses, rec.rewards, behavior,
                                      truncated=rec.truncated))
    store.append(records)
    return out


def test_two_phases_offline_equality_and_resume(cpu_env, tiny_models, tmp_path):
    model = str(tiny_models[0])
    store = tmp_path / "ckpt/cropi"
    step2 = tmp_path / "ckpt/global_step2_hf"

    # The HF copy is written after the DeepSpeed checkpoint, its tokenizer last.
    rc = _run_until(_job_command(tmp_path, model), (step2 / "tokenizer_config.json").exists, tmp_path / "run1.log")
    log1 = (tmp_path / "run1.log").read_text()
    assert (step2 / "tokenizer_config.json").exists(), f"job ended (rc={rc}) before its step-2 checkpoint:\n{log1[-5000:]}"
    assert not (tmp_path / "ckpt/_actor/global_step4").exists(), "the job was killed too late"

    # Teacher forcing only where a score can come of it; the log says what that saved.
    for split in ("pool", "val0"):
        summary = RolloutStore(store / "rollouts" / split).summary()
        assert summary.teacher_forced.tolist() == summary.usable.tolist()
    pool = RolloutStore(store / "rollouts/pool").summary()
    forced = int(pool.teacher_forced.sum()) + int(RolloutStore(store / "rollouts/val0").summary().teacher_forced.sum())
    assert f"CROPI teacher forcing: {forced} of 22 prompts need log beta" in log1
    print(f"pool: {len(pool)} generated, {int(pool.teacher_forced.sum())} teacher-forced, "
          f"{int(pool.zero_variance.sum())} zero-variance, {int(pool.zero_gradient.sum())} zero-gradient")

    phases = [json.loads((store / f"phases/phase-{m:03d}.json").read_text()) for m in (0, 1)]
    assert [p["phase"] for p in phases] == [0, 1]
    assert all(len(p["selected"]) == 4 for p in phases)
    assert phases[0]["cosines"] != phases[1]["cosines"]  # re-scored at the new weights
    assert phases[0]["tie_break"] == phases[1]["tie_break"] and phases[0]["tie_break"]["seed"] == 0
    assert sorted(phases[0]["tie_break"]["permutation"]) == list(range(16))
    assert len((store / "phases/phase-001.jsonl").read_text().splitlines()) == 4

    # The offline CLI at the step-2 checkpoint, on the job's responses and rewards with log beta
    # recomputed from the initial model at the training temperature (1.0; the responses were
    # sampled at 0.5), scores like the job did.
    offline_stores = {split: _with_log_beta_from(model, store / "rollouts" / split, tmp_path / "offline" / split, 1.0)
                      for split in ("pool", "val0")}  # fmt: skip
    out = tmp_path / "offline.json"
    subprocess.run(
        [sys.executable, "-m", "openrlhf_cropi.cli.cropi", "score", "--model", str(step2),
         "--train", str(offline_stores["pool"]), "--val", str(offline_stores["val0"]), "--keep-ratio", "0.5",
         "--proj-dim", "256", "--projector", "sjlt", "--seed", "0", "--out", str(out), "--grad-layers", "1",
         "--loss-agg-mode", "token-mean"],  # the job's: OpenRLHF's default
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    offline = {e["index"]: e["cosines"] for e in json.loads(out.read_text())["prompts"]}
    in_job = phases[1]["cosines"][0]
    scored = [i for i, c in enumerate(in_job) if c is not None]
    assert scored and all(offline[i] is not None for i in scored)
    assert all(offline[i] is None for i, c in enumerate(in_job) if c is None)
    print("in-job vs offline phase-1 cosines, max |difference|:",
          max(abs(offline[i][0] - in_job[i]) for i in scored))  # fmt: skip
    # float32 on both sides (--ds.param_dtype fp32): seen 1.5e-7 apart.
    torch.testing.assert_close(torch.tensor([offline[i][0] for i in scored]), torch.tensor([in_job[i] for i in scored]),
                               atol=1e-5, rtol=0)  # fmt: skip

    # Resume with a validation set added: its rollouts would come from the resumed policy. It stops.
    chunks = {p: p.stat().st_mtime_ns for p in (store / "rollouts").rglob("*.pt")}
    val2 = _jsonl(tmp_path / "val2.jsonl", [{"prompt": f"What is {a} + 1?", "label": str(a + 1)} for a in range(4)])
    rc = _run_until(_job_command(tmp_path, model, "--ckpt.load_enable", more_val=(val2,)), lambda: False,
                    tmp_path / "run-val2.log")  # fmt: skip
    log = (tmp_path / "run-val2.log").read_text()
    assert rc != 0, log[-5000:]
    assert f"--cropi.val_datasets: {val2} (val1): the rollout store {store / 'rollouts/val1'} lacks behavior rollouts of " \
           "4 prompts, and this job resumes from step 2" in log, log[-5000:]  # fmt: skip
    assert not list((store / "rollouts/val1").glob("*.pt"))
    assert {p: p.stat().st_mtime_ns for p in (store / "rollouts").rglob("*.pt")} == chunks
    assert not (store / "phases/phase-002.json").exists()

    # Resume: no rollout regenerated, no selection redone, same phase and subset, training goes on.
    state = _sampler_state(tmp_path / "ckpt/_actor/global_step2/mp_rank_00_model_states.pt")
    assert state["phase"] == 1 and sorted(state["subset"]) == sorted(phases[1]["selected"])
    phase_files = {p: p.stat().st_mtime_ns for p in (store / "phases").glob("phase-00[01].*")}
    rc = _run_until(_job_command(tmp_path, model, "--ckpt.load_enable"), lambda: False, tmp_path / "run2.log")
    log2 = (tmp_path / "run2.log").read_text()
    assert rc == 0, log2[-5000:]
    assert {p: p.stat().st_mtime_ns for p in (store / "rollouts").rglob("*.pt")} == chunks
    assert {p: p.stat().st_mtime_ns for p in (store / "phases").glob("phase-00[01].*")} == phase_files
    assert "CROPI behavior rollouts" not in log2
    assert "CROPI phase 0" not in log2 and "CROPI phase 1" not in log2 and "CROPI phase 2" in log2

    resumed = _tensorboard_runs(tmp_path / "tb")[-1]
    assert [s for s, _ in resumed["train/policy_loss"]] == [3, 4, 5, 6]
    assert [v for _, v in resumed["train/cropi/phase"]] == [1.0, 1.0, 2.0, 2.0]  # the phase each step trained on
    phase2 = json.loads((store / "phases/phase-002.json").read_text())
    state = _sampler_state(tmp_path / "ckpt/_actor/global_step6/mp_rank_00_model_states.pt")
    assert state["phase"] == 2 and sorted(state["subset"]) == sorted(phase2["selected"])
    assert (tmp_path / "final/model.safetensors").exists()


def test_validation_set_without_reward_variance_stops_before_training(cpu_env, tiny_models, tmp_path):
    """Every validation prompt gets the same reward in all its samples: no validation gradient
    exists. The job must say so and stop before any training step, keeping the rollouts."""
    reward = tmp_path / "reward.py"
    reward.write_text(
        "import torch\n"
        "def reward_func(queries, prompts, labels, **kw):\n"
        "    # The validation rows are labelled 'same': a constant reward. Pool prompts: a varied one.\n"
        "    r = torch.tensor([1.0 if l == 'same' else float(len(q) % 3) for q, l in zip(queries, labels)])\n"
        "    return {'rewards': r, 'scores': r, 'extra_logs': {}}\n"
    )
    rc = _run_until(_job_command(tmp_path, str(tiny_models[0]), reward=reward, val_label=lambda a: "same"),
                    lambda: False, tmp_path / "run.log")  # fmt: skip
    log = (tmp_path / "run.log").read_text()
    assert rc != 0
    assert f"--cropi.val_datasets: {tmp_path / 'val.jsonl'}: all 6 prompts have the same reward" in log
    store = tmp_path / "ckpt/cropi"
    assert len(list((store / "rollouts/val0").glob("chunk-*.pt"))) == 1  # the rollouts are kept
    assert not (store / "phases").exists()  # nothing selected
    assert not any("train/policy_loss" in run for run in _tensorboard_runs(tmp_path / "tb"))  # nor trained


def test_embedding_selector_scores_the_initial_policys_prompt_states(cpu_env, tiny_models, tmp_path):
    """--cropi.selector embedding: the pool's cosines with the validation mean of the initial
    policy's mean-pooled last hidden states equal plain transformers' (output_hidden_states), are
    kept in the store, and pick the top alpha among prompts with variance, the same in every
    phase; nothing is teacher-forced."""
    from transformers import AutoModelForCausalLM

    model = str(tiny_models[0])
    extra = ("--cropi.selector", "embedding", "--cropi.num_phases", "2", "--cropi.steps_per_phase", "1",
             "--ckpt.save_steps", "-1")  # fmt: skip
    rc = _run_until(_job_command(tmp_path, model, *extra), lambda: False, tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    assert rc == 0, log[-5000:]
    assert "CROPI teacher forcing: 0 of 22 prompts need log beta" in log
    store = tmp_path / "ckpt/cropi"
    saved = torch.load(store / "embedding_cosines.pt")["cosines"]

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def embedding(split, i):
        ids = RolloutStore(store / "rollouts" / split).get(i).prompt_ids
        with torch.no_grad():
            return hf(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True).hidden_states[-1][0].double().mean(0)

    target = torch.stack([embedding("val0", i) for i in range(6)]).mean(0)
    oracle = torch.stack([torch.nn.functional.cosine_similarity(embedding("pool", i), target, dim=0) for i in range(16)])
    print("embedding cosines vs plain transformers, max |difference|:", (saved[0].double() - oracle).abs().max().item())
    torch.testing.assert_close(saved[0].double(), oracle, atol=1e-5, rtol=0)

    usable = RolloutStore(store / "rollouts/pool").summary().usable
    expected = sorted(sorted(torch.nonzero(usable).flatten().tolist(), key=lambda i: -oracle[i].item())[:4])
    phases = [json.loads((store / f"phases/phase-{m:03d}.json").read_text()) for m in (0, 1)]
    assert [sorted(p["selected"]) for p in phases] == [expected, expected]
