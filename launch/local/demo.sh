#!/usr/bin/env bash
# The CPU demo: CROPI GRPO (alpha 0.1) on a synthetic arithmetic suite, on the real OpenRLHF
# pipeline (vLLM engine, DeepSpeed actor, Ray), from a tiny model warm-started with OpenRLHF's
# SFT trainer. Sets up what is missing first (environment, suite, warm start: cached).
#   bash launch/local/demo.sh [OUT_DIR]      (default runs/demo)
# Prints the per-phase table and writes OUT_DIR/report.md, accuracy.png and subsets.png.
# Environment (optional):
#   DEMO_CACHE        suite + warm-started model, shared by runs (runs/demo-cache)
#   DEMO_SELECTOR     influence (CROPI), random, learnability, pass_rate; "full" = random at alpha 1
#   DEMO_SEED         --train.seed and --cropi.seed (0); the suite and warm start use seed 0
#   DEMO_PHASES DEMO_STEPS_PER_PHASE   the curriculum (4 phases x 4 steps)
#   DEMO_SFT_EXAMPLES DEMO_SFT_EPOCHS  warm-start size, used when the cache is built (8000, 3)
#   DEMO_EXTRA_ARGS   more train_ppo_ray flags, appended (they win)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/runs/demo}" && cd "${1:-$ROOT/runs/demo}" && pwd)
CACHE=$(mkdir -p "${DEMO_CACHE:-$ROOT/runs/demo-cache}" && cd "${DEMO_CACHE:-$ROOT/runs/demo-cache}" && pwd)
SELECTOR=${DEMO_SELECTOR:-influence} SEED=${DEMO_SEED:-0}
ALPHA=0.1
if [ "$SELECTOR" = full ]; then SELECTOR=random ALPHA=1.0; fi

[ -n "${VIRTUAL_ENV:-}" ] || bash "$ROOT/launch/local/setup_cpu.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
# shellcheck source=launch/local/cpu_env.sh
. "$ROOT/launch/local/cpu_env.sh"

python -m openrlhf_cropi.demo.warm_start "$CACHE" \
  --sft-examples "${DEMO_SFT_EXAMPLES:-8000}" --sft-epochs "${DEMO_SFT_EPOCHS:-3}"
SUITE=$CACHE/suite

# Actor and vLLM engine each take one logical Ray "GPU"; no reference model (KL coefficient 0).
start_ray 2
trap stop_ray EXIT

# float32 on CPU, like every local run (see grpo_smoke.sh).
# shellcheck disable=SC2086
python -m openrlhf_cropi.cli.train_ppo_ray \
  --actor.model_name_or_path "$CACHE/warm_start" \
  --reward.remote_url "$ROOT/openrlhf_cropi/demo/reward.py" \
  --data.prompt_dataset "$SUITE/pool.jsonl" --data.input_key prompt --data.label_key label \
  --data.apply_chat_template --data.max_len 96 --rollout.max_new_tokens 8 \
  --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 --rollout.temperature 1.0 \
  --rollout.batch_size 16 --rollout.micro_batch_size 32 --train.batch_size 128 --train.micro_batch_size 32 \
  --algo.kl.init_coef 0 --actor.adam.lr 2e-3 --actor.lr_warmup_ratio 0 \
  --actor.num_nodes 1 --actor.num_gpus_per_node 1 \
  --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.sync_backend gloo --vllm.enforce_eager \
  --ds.zero_stage 2 --ds.param_dtype fp32 --ds.attn_implementation eager \
  --train.num_episodes 1 --train.seed "$SEED" \
  --eval.dataset "$SUITE/test.jsonl" --eval.steps 2 --eval.temperature 1.0 --eval.n_samples_per_prompt 8 \
  --ckpt.path "$OUT/ckpt" --ckpt.save_steps 4 --ckpt.output_dir "$OUT/final" \
  --logger.tensorboard_dir "$OUT/tensorboard" \
  --cropi.enable --cropi.selector "$SELECTOR" --cropi.alpha "$ALPHA" \
  --cropi.val_datasets "$SUITE/val_add.jsonl" "$SUITE/val_linear.jsonl" \
  --cropi.num_phases "${DEMO_PHASES:-4}" --cropi.steps_per_phase "${DEMO_STEPS_PER_PHASE:-4}" \
  --cropi.train_samples 8 --cropi.val_samples 16 --cropi.keep_ratio 0.1 --cropi.proj_dim 8192 \
  --cropi.seed "$SEED" \
  ${DEMO_EXTRA_ARGS:-}

python -m openrlhf_cropi.demo.report "$OUT" --suite "$SUITE"
