"""The --cropi.* group on OpenRLHF's own parser: bad input fails at startup, naming the flag."""

import json
import subprocess
import sys

import pytest

from openrlhf_cropi.cli.train_ppo_ray import main, parse_args
from openrlhf_cropi.flags import CropiFlagError, check_projection_cost, cropi_args

pytestmark = pytest.mark.host


@pytest.fixture
def files(tmp_path):
    pool, val = tmp_path / "pool.jsonl", tmp_path / "val.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q{i}", "label": str(i)}) + "\n" for i in range(8)))
    val.write_text("".join(json.dumps({"prompt": f"v{i}", "label": str(i)}) + "\n" for i in range(4)))
    return tmp_path, pool, val


def _argv(tmp_path, pool, *extra):
    return ["--actor.model_name_or_path", "m", "--reward.remote_url", "r.py", "--data.prompt_dataset", str(pool),
            "--data.input_key", "prompt", "--data.label_key", "label", "--algo.advantage.estimator", "group_norm",
            "--rollout.n_samples_per_prompt", "4", "--ckpt.path", str(tmp_path / "ckpt"), *extra]  # fmt: skip


def test_valid_flags_reach_every_actor_as_args_cropi(files):
    tmp_path, pool, val = files
    args = parse_args(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val), str(val),
                            "--cropi.alpha", "0.25", "--cropi.projector", "rademacher"))  # fmt: skip
    assert args.cropi.enable and args.cropi.alpha == 0.25 and args.cropi.projector == "rademacher"
    assert args.cropi.val_datasets == [str(val), str(val)]
    assert args.actor.model_name_or_path == "m"  # OpenRLHF's own parsing is intact


def test_without_enable_cropi_checks_nothing(files):
    tmp_path, pool, _ = files
    args = parse_args(_argv(tmp_path, pool, "--cropi.alpha", "7", "--train.async_enable"))
    assert not args.cropi.enable


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cropi.val_datasets", "{tmp}/nope.jsonl"], "--cropi.val_datasets: no such file: {tmp}/nope.jsonl"),
        (["--cropi.val_datasets", "{val}", "--cropi.alpha", "1.5"], "--cropi.alpha: must be in (0, 1]"),
        (["--cropi.val_datasets", "{val}", "--cropi.alpha", "0"], "--cropi.alpha: must be in (0, 1]"),
        (["--cropi.val_datasets", "{val}", "--cropi.keep_ratio", "0"], "--cropi.keep_ratio"),
        (["--cropi.val_datasets", "{val}", "--cropi.train_samples", "1"], "--cropi.train_samples"),
        ([], "--cropi.val_datasets: the influence selector needs at least one validation set"),
        (["--cropi.val_datasets", "{val}", "--train.async_enable"], "--train.async_enable"),
        (["--cropi.val_datasets", "{val}", "--ds.tensor_parallel_size", "2"], "--ds.tensor_parallel_size"),
        (["--cropi.val_datasets", "{val}", "--data.dataloader_num_workers", "2"], "--data.dataloader_num_workers"),
        (["--cropi.val_datasets", "{val}", "--train.num_episodes", "2"], "--train.num_episodes"),
        (["--cropi.val_datasets", "{badkey}"], "--cropi.val_datasets: {badkey} has no column 'prompt'"),
        (["--cropi.val_datasets", "{val}", "--cropi.max_tokens_per_gpu", "0"], "--cropi.max_tokens_per_gpu: must be >= 1"),
        (["--cropi.val_datasets", "{val}", "--actor.gradient_checkpointing_enable",
          "--actor.gradient_checkpointing_reentrant"], "--actor.gradient_checkpointing_reentrant: reentrant"),
    ],
)
def test_bad_input_is_a_clear_startup_error(files, extra, message):
    tmp_path, pool, val = files
    badkey = tmp_path / "badkey.jsonl"
    badkey.write_text(json.dumps({"question": "q", "label": "1"}) + "\n")
    fill = {"tmp": tmp_path, "val": val, "badkey": badkey}
    with pytest.raises(CropiFlagError) as error:
        parse_args(_argv(tmp_path, pool, "--cropi.enable", *[e.format(**fill) for e in extra]))
    assert str(error.value).startswith("--")  # names the flag first
    assert message.format(**fill) in str(error.value)


def test_micro_batch_budget_defaults_to_the_training_micro_batch(files):
    tmp_path, pool, val = files
    base = _argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val), "--data.max_len", "3072")
    assert cropi_args(parse_args(base + ["--train.micro_batch_size", "4"])).max_tokens_per_gpu == 4 * 3072
    dynamic = ["--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", "9000", "--ds.packing_samples",
               "--vllm.num_engines", "1"]  # what OpenRLHF requires with dynamic batching
    assert cropi_args(parse_args(base + dynamic)).max_tokens_per_gpu == 9000
    assert cropi_args(parse_args(base + ["--cropi.max_tokens_per_gpu", "5000"])).max_tokens_per_gpu == 5000


def test_dense_projector_too_costly_for_the_model_is_refused(files):
    tmp_path, pool, val = files
    args = parse_args(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val),
                            "--cropi.projector", "gaussian"))  # fmt: skip
    check_projection_cost(cropi_args(args), 10_000)  # a tiny model: fine
    with pytest.raises(CropiFlagError, match=r"^--cropi\.projector gaussian: .* matrix entries per gradient .* use "
                                             r"--cropi\.projector sjlt"):  # fmt: skip
        check_projection_cost(cropi_args(args), 1_500_000_000)


def test_unknown_projector_is_rejected_by_the_parser(files, capsys):
    tmp_path, pool, val = files
    with pytest.raises(SystemExit) as exit_:
        parse_args(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val), "--cropi.projector", "fft"))
    assert exit_.value.code == 2
    assert "--cropi.projector: invalid choice: 'fft'" in capsys.readouterr().err


def test_main_exits_2_with_the_message_and_writes_nothing(files, capsys):
    tmp_path, pool, val = files
    with pytest.raises(SystemExit) as exit_:
        main(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val), "--cropi.alpha", "2"))
    assert exit_.value.code == 2
    assert "train_ppo_ray: error: --cropi.alpha: must be in (0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_help_lists_the_cropi_group_next_to_openrlhf_flags():
    out = subprocess.run([sys.executable, "-m", "openrlhf_cropi.cli.train_ppo_ray", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "CROPI (openrlhf-cropi):" in out and "--cropi.val_datasets" in out and "--actor.model_name_or_path" in out
