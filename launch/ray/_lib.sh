# shellcheck shell=bash
# Shared by launch/ray/submit.sh and launch/slurm/cropi.sbatch: version pins, the runtime env
# that makes this plugin importable on every Ray node, the flag dry run, `ray job submit`.
# Defines functions and constants only.
#
# Why `py_modules` (and not `working_dir` or `pip`): the job's runtime env uploads the
# openrlhf_cropi package directory of this checkout (a few hundred kB) to the cluster; Ray puts
# it on PYTHONPATH of the job's driver and of every actor on every node, ahead of any installed
# copy, so all nodes run exactly the submitted code and need no install of their own.
# `working_dir` would upload the whole checkout (runs/, logs/, checkpoints) and move the
# driver's current directory into a temporary copy, so relative output paths would vanish with
# it; `pip` would build a virtualenv per node at job start and needs the package index from
# every node. The host stack itself (OpenRLHF 0.11.2, vLLM, DeepSpeed, flash-attn, Ray) is the
# nodes' own environment: it is far too heavy (and flash-attn too slow to build) for a runtime env.

CROPI_RAY_VERSION=2.55.0      # what openrlhf==0.11.2 pins: ray[default]==2.55.0
CROPI_OPENRLHF_VERSION=0.11.2
CROPI_ENTRYPOINT_DEFAULT="python -m openrlhf_cropi.cli.train_ppo_ray"
# Environment variables copied from the submitting shell into the job (when set there).
CROPI_FORWARD_ENV_DEFAULT="HF_HOME HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE \
NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE GLOO_SOCKET_IFNAME TOKENIZERS_PARALLELISM"

cropi_py() { "${CROPI_PYTHON:-python}" "$@"; }
cropi_log() { printf '[cropi %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

# cropi_check_versions PACKAGE...: this node's versions of ray / openrlhf equal the pins.
cropi_check_versions() {
  cropi_py - "$@" <<EOF
import importlib.metadata as md, socket, sys
pins = {"ray": "$CROPI_RAY_VERSION", "openrlhf": "$CROPI_OPENRLHF_VERSION"}
have = {}
for name in sys.argv[1:]:
    try:
        have[name] = md.version(name)
    except md.PackageNotFoundError:
        have[name] = "not installed"
bad = [f"{n} {v} (want {pins[n]})" for n, v in have.items() if v != pins[n]]
host = socket.gethostname()
if bad:
    sys.exit(f"[cropi] ERROR on {host}: " + ", ".join(bad))
print(f"[cropi] {host}: " + ", ".join(f"{n} {v}" for n, v in have.items()), file=sys.stderr)
EOF
}

# cropi_runtime_env_json ROOT: the job's runtime env (see the top of this file), as JSON.
# RAY_OVERRIDE_JOB_RUNTIME_ENV=1 lets OpenRLHF's own ray.init(runtime_env={"env_vars": ...})
# (NCCL_DEBUG, TOKENIZERS_PARALLELISM, ...) merge with the job's env vars instead of failing
# on a key both set.
cropi_runtime_env_json() {
  cropi_py - "$1/openrlhf_cropi" "${CROPI_FORWARD_ENV:-$CROPI_FORWARD_ENV_DEFAULT}" <<'EOF'
import json, os, sys
package, names = sys.argv[1], sys.argv[2].split()
if not os.path.isfile(os.path.join(package, "__init__.py")):
    sys.exit(f"[cropi] ERROR: {package} is not the openrlhf_cropi package")
env_vars = {n: os.environ[n] for n in names if n in os.environ}
env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
print(json.dumps({"py_modules": [package], "excludes": ["__pycache__/", "*.pyc"], "env_vars": env_vars}))
EOF
}

# cropi_dry_run ROOT FLAG...: parse and validate the flags with OpenRLHF's own parser plus the
# --cropi group (openrlhf_cropi.cli.train_ppo_ray.parse_args), starting nothing.
cropi_dry_run() {
  local root=$1
  shift
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" cropi_py - "$@" <<'EOF'
import sys
from openrlhf_cropi.cli.train_ppo_ray import parse_args
from openrlhf_cropi.flags import CropiFlagError
try:
    parse_args(sys.argv[1:])
except CropiFlagError as error:
    sys.exit(f"train_ppo_ray: error: {error}")
except AssertionError as error:
    sys.exit(f"train_ppo_ray: error: {error}")
EOF
}

# cropi_check_entrypoint_args FLAG...: `ray job submit` joins the entrypoint into one string
# with subprocess.list2cmdline (Windows quoting) and the cluster runs it with /bin/sh, so only
# values that survive that round trip unchanged are allowed through.
cropi_check_entrypoint_args() {
  local arg plain='^[A-Za-z0-9_./:=,@+%^-]+$' quoted_unsafe='[$`"\\]'
  for arg in "$@"; do
    if [[ $arg =~ $plain ]]; then continue; fi
    if [[ $arg =~ [[:space:]] && ! $arg =~ $quoted_unsafe && $arg != *$'\n'* ]]; then continue; fi
    cropi_log "ERROR: cannot pass '$arg' through ray job submit's entrypoint string unchanged"
    return 1
  done
}

# cropi_submit_cmd ADDRESS SUBMISSION_ID ROOT [SUBMIT_OPTION...] -- FLAG...: sets CROPI_SUBMIT_CMD
# to the `ray job submit` command line of the training entry point (CROPI_ENTRYPOINT overrides
# the command) with the plugin's runtime env. That command streams the job's logs and exits 0
# if the job succeeded, 1 if it failed (unless --no-wait is among the options).
cropi_submit_cmd() {
  local address=$1 submission_id=$2 root=$3 runtime_env entry
  shift 3
  local submit_opts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do submit_opts+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  read -r -a entry <<<"${CROPI_ENTRYPOINT:-$CROPI_ENTRYPOINT_DEFAULT}"
  cropi_check_entrypoint_args "$@" || return 1
  runtime_env=$(cropi_runtime_env_json "$root") || return 1
  # shellcheck disable=SC2034  # read by the scripts that source this file
  CROPI_SUBMIT_CMD=(ray job submit --address "$address" --submission-id "$submission_id"
    --runtime-env-json "$runtime_env" ${submit_opts[@]+"${submit_opts[@]}"} -- "${entry[@]}" "$@")
}

# cropi_dashboard_version URL: the Ray version a running cluster's dashboard reports.
cropi_dashboard_version() {
  cropi_py - "$1" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/version", timeout=10) as response:
    print(json.load(response)["ray_version"])
EOF
}

# cropi_wait_cluster GCS_ADDRESS DASHBOARD_URL NODES GPUS TIMEOUT_S: wait until the dashboard
# answers (and runs the pinned Ray) and NODES nodes with GPUS GPUs in all have joined.
cropi_wait_cluster() {
  cropi_py - "$@" "$CROPI_RAY_VERSION" <<'EOF'
import json, sys, time, urllib.request

gcs, url, nodes, gpus, timeout, pin = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/version", timeout=5) as response:
            version = json.load(response)["ray_version"]
        break
    except Exception as error:  # not up yet
        if time.monotonic() > deadline:
            sys.exit(f"[cropi] ERROR: Ray dashboard {url} not reachable after {timeout:.0f} s: {error}")
        time.sleep(3)
if version != pin:
    sys.exit(f"[cropi] ERROR: the cluster runs Ray {version}, want {pin}")

import ray

ray.init(address=gcs, logging_level="ERROR", log_to_driver=False)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    have = sum(n["Resources"].get("GPU", 0) for n in alive)
    if len(alive) >= nodes and have >= gpus:
        break
    if time.monotonic() > deadline:
        sys.exit(f"[cropi] ERROR: {len(alive)}/{nodes} nodes and {have:g}/{gpus:g} GPUs joined within {timeout:.0f} s")
    time.sleep(3)
print(f"[cropi] Ray {version}: {len(alive)} nodes, {have:g} GPUs joined", file=sys.stderr)
ray.shutdown()
EOF
}
