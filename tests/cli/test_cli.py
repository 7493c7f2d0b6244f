"""`cropi` end to end on a tiny model: import -> score -> select, resume, and malformed inputs."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_cropi.cli.cropi import main
from openrlhf_cropi.core.scoring import select_prompts
from openrlhf_cropi.core.store import PromptRollouts, RolloutStore
from openrlhf_cropi.tiny_model import build_tiny_model

ANSWERS = ["The answer is 5.", "Answer: 12", "x - y = 3, so the answer is \\boxed{3}.", "I think 7", "42"]


def rows(n: int, seed: int, flat=()):
    """n rows in the reference layout; rows listed in ``flat`` get K equal rewards."""
    out = []
    for i in range(n):
        k = 2 + (i + seed) % 3
        rewards = [float(i in flat and i % 2)] * k if i in flat else [float((i + j + seed) % 2) for j in range(k)]
        out.append({
            "prompt": f"What is {i} + {seed}?",
            "label": str(i + seed),
            "responses": [ANSWERS[(i + j) % len(ANSWERS)] + " " * j for j in range(k)],
            "rewards": rewards,
            "source": "test",
        })
    return out


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    beta = build_tiny_model(root / "beta", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=128, seed=0)
    # The checkpoint to score at: theta != beta (perturbed weights, saved in float32).
    model = AutoModelForCausalLM.from_pretrained(beta, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "theta")
    AutoTokenizer.from_pretrained(beta).save_pretrained(root / "theta")

    data = {"train": rows(12, 0, flat=(3, 7)), "val1": rows(5, 1, flat=(2,)), "val2": rows(3, 2)}
    for name, items in data.items():
        write_jsonl(root / f"{name}.jsonl", items)
        assert run("rollouts", "import", "--jsonl", root / f"{name}.jsonl", "--model", beta, "--out", root / name,
                   "--apply-chat-template", "--dtype", "float32", "--max-tokens", 64, "--chunk-size", 5,
                   "--logprob-temperature", 0.9) == 0
    return root, beta, data


def test_import_writes_tokens_and_teacher_forced_log_probs(env):
    root, beta, data = env
    store = RolloutStore(root / "train")
    assert store.indices() == list(range(12))
    assert len(list((root / "train").glob("chunk-*.pt"))) == 3  # chunk size 5
    # No forward pass for the prompts that can never be scored (3 and 7: all rewards equal).
    assert [i for i in range(12) if not store.teacher_forced(i)] == [3, 7]
    assert store.get(3).behavior_logprobs is None
    tok = AutoTokenizer.from_pretrained(beta)
    model = AutoModelForCausalLM.from_pretrained(beta, dtype=torch.float32).eval()
    for i in (0, 5, 11):
        rec, row = store.get(i), data["train"][i]
        assert rec.row == {k: v for k, v in row.items() if k not in ("responses", "rewards")}
        assert rec.label == row["label"] and rec.rewards.tolist() == row["rewards"]
        assert rec.text == tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True)
        assert rec.prompt_ids.tolist() == tok(rec.text, add_special_tokens=False)["input_ids"]
        for resp, ids, lp in zip(row["responses"], rec.responses, rec.behavior_logprobs):
            assert ids.tolist() == tok(resp, add_special_tokens=False)["input_ids"]
            full = torch.cat([rec.prompt_ids, ids]).unsqueeze(0)
            with torch.no_grad():
                logits = model(full).logits[0, len(rec.prompt_ids) - 1 : -1] / 0.9
            want = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_import_resumes_without_redoing_work(env, tmp_path, capsys):
    root, beta, data = env
    src = write_jsonl(tmp_path / "part.jsonl", data["train"][:4])
    args = ["rollouts", "import", "--model", beta, "--out", tmp_path / "s", "--dtype", "float32", "--max-tokens", 64]
    assert run(*args, "--jsonl", src) == 0
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    write_jsonl(src, data["train"][:6])  # the source grew: only rows 4 and 5 are new
    assert run(*args, "--jsonl", src) == 0
    assert "4 already in" in capsys.readouterr().err
    assert RolloutStore(tmp_path / "s").indices() == list(range(6))
    assert set(before) < {p.name for p in (tmp_path / "s").iterdir()}
    assert run(*args[:-1], 32, "--jsonl", src) == 2  # other options: refuses to mix
    assert "made with" in capsys.readouterr().err
    running = RolloutStore.create(tmp_path / "s", RolloutStore(tmp_path / "s").meta, exist_ok=True)  # a writer now
    assert run(*args, "--jsonl", src) == 2  # a second writer stops at once, naming the store and the holder
    assert f"s: another process is writing this store (pid {os.getpid()} on " in capsys.readouterr().err
    running.close()
    assert run(*args, "--jsonl", src) == 0


def explicit_gradient(model, rec):
    """Independent oracle: response by response, full-vocab log_softmax, flattened in parameter order."""
    params = list(model.parameters())
    r = rec.rewards.tolist()
    adv = [(x - statistics.mean(r)) / (statistics.stdev(r) + 1e-9) for x in r]
    total = torch.zeros(sum(p.numel() for p in params))
    for a, ids, b in zip(adv, rec.responses, rec.behavior_logprobs):
        full = torch.cat([rec.prompt_ids, ids]).unsqueeze(0)
        logits = model(full).logits[0, len(rec.prompt_ids) - 1 : -1] / 0.9
        lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        j = a * torch.exp(lp - b).mean() / len(r)
        total += torch.cat([g.flatten() for g in torch.autograd.grad(j, params)])
    return total


def test_identity_scores_equal_exact_full_gradient_cosines(env, tmp_path):
    root, _, _ = env
    out = tmp_path / "scores.json"
    model = AutoModelForCausalLM.from_pretrained(root / "theta", dtype=torch.float32).eval()
    total = sum(p.numel() for p in model.parameters())
    assert run("score", "--model", root / "theta", "--train", root / "train", "--val", root / "val1",
               "--projector", "identity", "--keep-ratio", 1, "--proj-dim", total, "--val-cap", 0,
               "--dtype", "float32", "--out", out) == 0
    scores = json.loads(out.read_text())
    assert scores["counts"] == {"prompts": 12, "scored": 10, "zero_variance": 2, "zero_gradient": 0, "nonfinite": 0}
    assert scores["validation_sets"][0] | {"path": None} == {
        "path": None, "prompts": 5, "zero_variance": 1, "zero_gradient": 0, "chosen": 4, "used": 4, "nonfinite": 0,
        "indices": [0, 1, 3, 4]}
    val = RolloutStore(root / "val1")
    target = torch.stack([explicit_gradient(model, val.get(i)) for i in (0, 1, 3, 4)]).mean(0)
    train = RolloutStore(root / "train")
    for entry in scores["prompts"]:
        if entry["index"] in (3, 7):
            assert entry["status"] == "zero_variance" and entry["cosines"] is None
            continue
        want = torch.nn.functional.cosine_similarity(explicit_gradient(model, train.get(entry["index"])), target, dim=0)
        assert entry["cosines"][0] == pytest.approx(want.item(), abs=2e-5)


def test_score_then_select_two_validation_sets(env, tmp_path):
    root, _, data = env
    out, subset = tmp_path / "scores.json", tmp_path / "subset.jsonl"
    assert run("score", "--model", root / "theta", "--train", root / "train", "--val", root / "val1",
               "--val", root / "val2", "--keep-ratio", 0.5, "--proj-dim", 512, "--dtype", "float32",
               "--val-cap", 3, "--out", out) == 0
    scores = json.loads(out.read_text())
    assert [v["path"] for v in scores["validation_sets"]] == [str(root / "val1"), str(root / "val2")]
    v1 = scores["validation_sets"][0]
    assert v1["chosen"] == v1["used"] == 3 and set(v1["indices"]) < {0, 1, 3, 4}  # capped, seeded subset
    cos = [e["cosines"] for e in scores["prompts"] if e["status"] == "scored"]
    assert all(len(c) == 2 and all(-1 <= x <= 1 for x in c) for c in cos)
    assert len({round(c[0], 6) for c in cos}) == len(cos)  # real, distinct scores

    assert run("select", "--scores", out, "--alpha", 0.25, "--out", subset) == 0
    chosen = [json.loads(line) for line in subset.read_text().splitlines()]
    entries = scores["prompts"]
    want, _ = select_prompts(
        "influence", 0.25,
        torch.tensor([e["status"] != "zero_variance" for e in entries]),
        torch.tensor([e["pass_rate"] for e in entries], dtype=torch.float64),
        [torch.tensor([e["cosines"][v] if e["cosines"] else 0.0 for e in entries]) for v in range(2)],
        torch.tensor([e["status"] == "scored" for e in entries]),
    )
    expected_rows = [{k: v for k, v in data["train"][i].items() if k not in ("responses", "rewards")} for i in sorted(want)]
    assert chosen == expected_rows and len(chosen) == 3
    assert all(data["train"][i]["prompt"] != r["prompt"] for i in (3, 7) for r in chosen)

    assert run("select", "--scores", out, "--alpha", 0.5, "--method", "learnability", "--out", subset) == 0
    picked = [json.loads(line)["prompt"] for line in subset.read_text().splitlines()]
    rates = {r["prompt"]: statistics.mean(r["rewards"]) for r in data["train"]}
    assert len(picked) == 6 and all(0 < rates[p] < 1 for p in picked)
    best = sorted(rates.values(), key=lambda p: -p * (1 - p))[5]
    assert min(rates[p] * (1 - rates[p]) for p in picked) >= best * (1 - best) - 1e-12


def test_nonfinite_gradients_are_counted_skipped_and_reported(env, tmp_path, capsys):
    root, _, _ = env
    src = RolloutStore(root / "train")
    bad = RolloutStore.create(tmp_path / "bad", src.meta)
    records = [src.get(i) for i in src.indices()]
    r0 = records[0]
    # log beta = -1e30: rho = exp(~1e30) overflows to inf, so the gradient is not finite.
    records[0] = PromptRollouts(r0.index, r0.text, r0.label, r0.row, r0.prompt_ids, r0.responses, r0.rewards,
                                [torch.full_like(b, -1e30) for b in r0.behavior_logprobs])
    bad.append(records)
    out = tmp_path / "scores.json"
    assert run("score", "--model", root / "theta", "--train", tmp_path / "bad", "--val", root / "val1",
               "--keep-ratio", 0.5, "--proj-dim", 64, "--dtype", "float32", "--out", out) == 0
    assert "1 training prompts had non-finite gradients" in capsys.readouterr().err
    scores = json.loads(out.read_text())
    assert scores["counts"]["nonfinite"] == 1 and scores["prompts"][0]["status"] == "nonfinite"
    assert run("select", "--scores", out, "--alpha", 1.0, "--out", tmp_path / "all.jsonl") == 0
    assert "only 9 eligible prompts for 12 requested" in capsys.readouterr().err
    picked = [json.loads(line)["prompt"] for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(picked) == 9 and r0.row["prompt"] not in picked


def test_validation_store_teacher_forces_only_the_scored_choice(env, tmp_path, capsys):
    """--val-cap: log beta only for the seeded choice that `score --val-cap --seed` uses."""
    root, beta, data = env
    src = write_jsonl(tmp_path / "val.jsonl", rows(9, 1, flat=(2,)))
    assert run("rollouts", "import", "--jsonl", src, "--model", beta, "--out", tmp_path / "v", "--dtype", "float32",
               "--max-tokens", 64, "--logprob-temperature", 0.9, "--val-cap", 3, "--val-seed", 5) == 0
    assert "teacher forcing 3 of 9 prompts" in capsys.readouterr().err
    store = RolloutStore(tmp_path / "v")
    forced = [i for i in store.indices() if store.teacher_forced(i)]
    assert len(forced) == 3 and 2 not in forced
    common = ["score", "--model", root / "theta", "--train", root / "train", "--val", tmp_path / "v", "--dtype", "float32",
              "--proj-dim", 64, "--out", tmp_path / "o.json"]
    assert run(*common, "--val-cap", 3, "--seed", 5) == 0
    assert json.loads((tmp_path / "o.json").read_text())["validation_sets"][0]["indices"] == forced
    assert run(*common, "--val-cap", 4, "--seed", 5) == 2
    assert "prompts chosen for validation (--val-cap 4 --seed 5) were not teacher-forced" in capsys.readouterr().err
    # Rerunning with the larger cap adds only the missing log-probs, from the behavior model.
    assert run("rollouts", "import", "--jsonl", src, "--model", beta, "--out", tmp_path / "v", "--dtype", "float32",
               "--max-tokens", 64, "--logprob-temperature", 0.9, "--val-cap", 4, "--val-seed", 5) == 0
    assert "teacher forcing 1 of 9 prompts (3 done before" in capsys.readouterr().err
    assert run(*common, "--val-cap", 4, "--seed", 5) == 0


def test_identical_responses_with_different_rewards_get_no_score(env, tmp_path, capsys):
    """Zero gradient although the rewards vary: no teacher forcing, no cosine, a warning."""
    root, beta, data = env
    items = data["train"][:4]
    items[1] = {**items[1], "responses": [items[1]["responses"][0]] * 4, "rewards": [0.0, 1.0, 1.0, 0.0]}
    src = write_jsonl(tmp_path / "pool.jsonl", items)
    assert run("rollouts", "import", "--jsonl", src, "--model", beta, "--out", tmp_path / "p", "--dtype", "float32",
               "--max-tokens", 64, "--logprob-temperature", 0.9) == 0
    assert "1 with a zero gradient" in capsys.readouterr().err
    assert not RolloutStore(tmp_path / "p").teacher_forced(1)
    out = tmp_path / "scores.json"
    assert run("score", "--model", root / "theta", "--train", tmp_path / "p", "--val", root / "val1",
               "--proj-dim", 64, "--dtype", "float32", "--out", out) == 0
    assert "1 training prompts got different rewards for identical responses" in capsys.readouterr().err
    scores = json.loads(out.read_text())
    assert scores["prompts"][1]["status"] == "zero_gradient" and scores["prompts"][1]["cosines"] is None
    assert scores["counts"] | {"prompts": 0} == {"prompts": 0, "scored": 2, "zero_variance": 1, "zero_gradient": 1, "nonfinite": 0}
    assert run("select", "--scores", out, "--alpha", 1.0, "--out", tmp_path / "all.jsonl") == 0
    assert items[1]["prompt"] not in (tmp_path / "all.jsonl").read_text()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "responses": ["a"], "rewards": [1.0]}\n{"prompt": "q", "responses": ["a", "b"]',
         "bad.jsonl:2: invalid JSON"),
        ('\n\n{"prompt": "p", "responses": ["a", "b"], "rewards": [1.0]}', "bad.jsonl:3: 2 responses but 1 rewards"),
        ('{"prompt": "p", "responses": ["a", "b"]}', "bad.jsonl:1: missing key 'rewards'"),
        ('{"prompt": "p", "responses": "ab", "rewards": [1.0]}', "bad.jsonl:1: 'responses' must be"),
        ('[1, 2]', "bad.jsonl:1: expected a JSON object"),
        ('{"prompt": "p", "responses": ["a", ""], "rewards": [1.0, 0.0]}',
         "bad.jsonl:1: the prompt or a response tokenises to nothing"),
    ],
)
def test_malformed_rows_name_file_and_line(env, tmp_path, capsys, line, message):
    _, beta, _ = env
    (tmp_path / "bad.jsonl").write_text(line)
    assert run("rollouts", "import", "--jsonl", tmp_path / "bad.jsonl", "--model", beta, "--out", tmp_path / "s",
               "--dtype", "float32") == 2
    assert message in capsys.readouterr().err


def test_bad_validation_sets_and_scores_files(env, tmp_path, capsys):
    root, beta, _ = env
    write_jsonl(tmp_path / "flat.jsonl", rows(3, 0, flat=(0, 1, 2)))
    assert run("rollouts", "import", "--jsonl", tmp_path / "flat.jsonl", "--model", beta, "--out", tmp_path / "flat",
               "--dtype", "float32") == 0
    RolloutStore.create(tmp_path / "empty", {"logprob_temperature": 1.0, "max_tokens": 64})
    common = ["score", "--model", root / "theta", "--train", root / "train", "--dtype", "float32",
              "--proj-dim", 32, "--out", tmp_path / "o.json"]
    assert run(*common, "--val", tmp_path / "flat") == 2
    assert "all 3 prompts have zero reward variance" in capsys.readouterr().err
    assert run(*common, "--val", tmp_path / "empty") == 2
    assert "is empty" in capsys.readouterr().err
    assert run(*common, "--val", tmp_path / "nowhere") == 2
    assert "not a rollout store" in capsys.readouterr().err
    assert run(*common, "--val", root / "val1", "--keep-ratio", 0) == 2
    assert "keep_ratio" in capsys.readouterr().err
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    assert run("select", "--scores", tmp_path / "x.json", "--out", tmp_path / "s.jsonl") == 2
    assert "not a cropi-scores" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "openrlhf_cropi.cli.cropi", "score", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--keep-ratio" in out.stdout and "--projector" in out.stdout
