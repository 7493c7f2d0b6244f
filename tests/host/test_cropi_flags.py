"""The --cropi.* group on OpenRLHF's own parser: bad input fails at startup, naming the flag."""

import contextlib
import json
import subprocess
import sys

import pytest

from openrlhf_cropi.cli.train_ppo_ray import main, parse_args
from openrlhf_cropi.flags import CropiFlagError, check_exact_memory, check_projection_cost, cropi_args

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
            "--rollout.n_samples_per_prompt", "4", "--algo.kl.init_coef", "0", "--ckpt.path", str(tmp_path / "ckpt"),
            *extra]  # fmt: skip


def test_valid_flags_reach_every_actor_as_args_cropi(files):
    tmp_path, pool, val = files
    args = parse_args(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val), str(val),
                            "--cropi.alpha", "0.25", "--cropi.projector", "rademacher"))  # fmt: skip
    assert args.cropi.enable and args.cropi.alpha == 0.25 and args.cropi.projector == "rademacher"
    assert args.cropi.val_datasets == [str(val), str(val)]
    assert args.actor.model_name_or_path == "m"  # OpenRLHF's own parsing is intact


def test_without_enable_cropi_checks_nothing(files):
    tmp_path, pool, _ = files
    args = parse_args(_argv(tmp_path, pool, "--train.async_enable"))
    assert not args.cropi.enable


@pytest.mark.parametrize("flag", ["--cropi.alpha", "--cropi.alph", "--cropi.val_datasets"])
def test_a_cropi_flag_without_enable_is_an_error(files, flag, capsys):
    """CROPI would silently be off: plain OpenRLHF. (argparse also takes an abbreviation.)"""
    tmp_path, pool, val = files
    with pytest.raises(SystemExit) as exit_:
        main(_argv(tmp_path, pool, flag, str(val) if "val" in flag else "0.2"))
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"train_ppo_ray: error: {flag}: given without --cropi.enable")


def test_another_openrlhf_version_is_refused(files, capsys, monkeypatch):
    import importlib.metadata

    tmp_path, pool, val = files
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0" if name == "openrlhf" else real(name))
    with pytest.raises(SystemExit) as exit_:
        main(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val)))
    assert exit_.value.code == 2
    assert "openrlhf 0.12.0 is installed; openrlhf-cropi works with openrlhf 0.11.2 only" in capsys.readouterr().err


def test_openrlhfs_own_classes_cannot_run_in_a_cropi_job(files, monkeypatch):
    """After an upgrade train() might reach OpenRLHF's trainer or policy actor by a name the class
    swap does not cover: starting either stops the job instead of training without CROPI."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    import openrlhf_cropi.cli.train_ppo_ray as cli
    from openrlhf_cropi.ray.trainer import CropiPPOTrainer

    tmp_path, pool, val = files
    kept = {"trainer": ppo_trainer.PPOTrainer, "actor": ppo_actor.PolicyModelActor}  # references taken earlier
    seen = {}

    real_run = cli._run_openrlhf_cli

    def fake_run(argv, *patches):  # what train() would see while the job runs
        if len(patches) == 2:  # parse_args' dry run
            return real_run(argv, *patches)
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            seen["swapped"] = ppo_trainer.PPOTrainer is CropiPPOTrainer
            for name, cls in kept.items():
                with pytest.raises(RuntimeError, match=rf"started OpenRLHF's own {cls.__ray_actor_class__.__name__} "
                                                       "instead of CROPI's"):  # fmt: skip
                    cls.options(num_gpus=1)
                with pytest.raises(RuntimeError):
                    cls.remote()
                seen[name] = True

    monkeypatch.setattr(cli, "_run_openrlhf_cli", fake_run)
    main(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val)))
    assert seen == {"swapped": True, "trainer": True, "actor": True}
    assert ppo_trainer.PPOTrainer is kept["trainer"] and callable(kept["trainer"].options)  # restored


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cropi.val_datasets", "{tmp}/nope.jsonl"], "--cropi.val_datasets: no such file: {tmp}/nope.jsonl"),
        (["--cropi.val_datasets", "{val}", "--cropi.alpha", "1.5"], "--cropi.alpha: must be in (0, 1]"),
        (["--cropi.val_datasets", "{val}", "--cropi.alpha", "0"], "--cropi.alpha: must be in (0, 1]"),
        (["--cropi.val_datasets", "{val}", "--cropi.keep_ratio", "0"], "--cropi.keep_ratio"),
        (["--cropi.val_datasets", "{val}", "--cropi.train_samples", "1"], "--cropi.train_samples"),
        ([], "--cropi.val_datasets: the influence selector needs at least one validation set"),
        (["--cropi.selector", "embedding"], "--cropi.val_datasets: the embedding selector needs at least one validation set"),
        (["--cropi.val_datasets", "{val}", "--train.async_enable"], "--train.async_enable"),
        (["--cropi.val_datasets", "{val}", "--ds.tensor_parallel_size", "2"], "--ds.tensor_parallel_size"),
        (["--cropi.val_datasets", "{val}", "--data.dataloader_num_workers", "2"], "--data.dataloader_num_workers"),
        (["--cropi.val_datasets", "{val}", "--train.num_episodes", "2"], "--train.num_episodes"),
        (["--cropi.val_datasets", "{badkey}"], "--cropi.val_datasets: {badkey} has no column 'prompt'"),
        (["--cropi.val_datasets", "{val}", "--cropi.max_tokens_per_gpu", "0"], "--cropi.max_tokens_per_gpu: must be >= 1"),
        (["--cropi.val_datasets", "{val}", "--cropi.cascade", "3"], "--cropi.cascade: its cheap stage is the gradients of"),
        (["--cropi.val_datasets", "{val}", "--cropi.cascade", "0.5", "--cropi.grad_layers", "1"], "--cropi.cascade: must be 0"),
        (["--cropi.val_datasets", "{val}", "--cropi.cascade", "3", "--cropi.grad_layers", "1", "--cropi.selector", "bm25"],
         "--cropi.cascade: scores influence only"),
        (["--cropi.val_datasets", "{val}", "--actor.gradient_checkpointing_enable",
          "--actor.gradient_checkpointing_reentrant"], "--actor.gradient_checkpointing_reentrant: reentrant"),
        # What CROPI cannot score from a prompt's own behavior rollouts, or does not implement.
        *[(["--cropi.val_datasets", "{val}", "--algo.advantage.estimator", e], f"--algo.advantage.estimator {e}: ")
          for e in ("gae", "reinforce", "reinforce_baseline", "flash_reinforce")],
        (["--cropi.val_datasets", "{val}", "--actor.policy_loss_type", "gspo"], "--actor.policy_loss_type gspo: "),
        (["--cropi.val_datasets", "{val}", "--algo.kl.init_coef", "0.01"], "--algo.kl.init_coef 0.01 without --algo.kl.use_loss"),
        (["--cropi.val_datasets", "{val}", "--reward.overlong_buffer_len", "5000"], "--reward.overlong_buffer_len: "),
    ],
)
def test_bad_input_is_a_clear_startup_error(files, extra, message, capsys):
    """The job exits 2 before anything starts (no Ray, no checkpoint directory), and the last line
    of stderr names the flag."""
    import ray

    tmp_path, pool, val = files
    badkey = tmp_path / "badkey.jsonl"
    badkey.write_text(json.dumps({"question": "q", "label": "1"}) + "\n")
    fill = {"tmp": tmp_path, "val": val, "badkey": badkey}
    argv = _argv(tmp_path, pool, "--cropi.enable", *[e.format(**fill) for e in extra])
    with pytest.raises(CropiFlagError) as error:
        parse_args(argv)
    assert str(error.value).startswith("--")  # names the flag first
    assert message.format(**fill) in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and not ray.is_initialized() and not (tmp_path / "ckpt").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("train_ppo_ray: error: --")


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


def test_exact_scores_that_do_not_fit_are_refused(files):
    """--cropi.projector none keeps (V + 1) float32 model-sized vectors per rank: checked against free memory."""
    from openrlhf_cropi.ray.policy_actor import free_device_bytes

    tmp_path, pool, val = files
    args = parse_args(_argv(tmp_path, pool, "--cropi.enable", "--cropi.val_datasets", str(val), str(val),
                            "--cropi.projector", "none"))  # fmt: skip
    check_exact_memory(cropi_args(args), 1000, 12_000)  # 3 x 1000 x 4 bytes: fits exactly
    with pytest.raises(CropiFlagError, match=r"^--cropi\.projector none: .* 2 validation mean gradient\(s\) and one "
                                             r"gradient buffer of 7,615,616,512 float32 parameters on each policy rank, "
                                             r"85\.1 GiB, but the device has 80\.0 GiB free .* --cropi\.projector sjlt"):
        check_exact_memory(cropi_args(args), 7_615_616_512, 80 * 2**30)  # Qwen2.5-7B, two validation sets
    with open("/proc/meminfo") as f:  # on a CPU, the host's available memory
        total = int(f.readline().split()[1]) * 1024
    assert 0 < free_device_bytes() <= total


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


def test_bm25_without_bm25s_is_refused_at_startup(monkeypatch):
    import importlib.util

    from openrlhf_cropi.flags import CropiArgs, CropiFlagError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "bm25s" else real(name, *args))
    with pytest.raises(CropiFlagError, match=r"^--cropi.selector bm25: needs bm25s: pip install 'openrlhf-cropi\[bm25\]'"):
        CropiArgs(enable=True, selector="bm25", val_datasets=["org/some-dataset"])
    monkeypatch.undo()
    assert CropiArgs(enable=True, selector="bm25", val_datasets=["org/some-dataset"]).selector == "bm25"
