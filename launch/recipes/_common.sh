# shellcheck shell=bash
# What every recipe shares: the paper's GRPO settings in OpenRLHF 0.11.2 flags, the model
# presets, the placement on NNODES x GPUS_PER_NODE GPUs, and the CROPI flags. A recipe file sets
# RECIPE_NAME, sources this file and calls `recipe_build SELECTOR PRESET`; that defines
#   RECIPE_ARGS=(...)   the complete flag list of `python -m openrlhf_cropi.cli.train_ppo_ray`
# Sourced by launch/slurm/cropi.sbatch and launch/ray/submit.sh; starts nothing, prints nothing.
# Flags appended after RECIPE_ARGS win (argparse keeps the last value), so any setting can be
# overridden at submission without editing a recipe.
#
# Environment (all optional; "/path/to/..." defaults are placeholders the launchers refuse):
#   MODEL            HF id or local path of the policy (default: the preset's model)
#   PROMPT_DATA      the training pool, --data.prompt_dataset syntax   (/path/to/train_pool.jsonl)
#   INPUT_KEY LABEL_KEY  dataset keys of prompt and reference answer     (prompt, label)
#   APPLY_CHAT_TEMPLATE  1: wrap prompts in the model's chat template    (1)
#   REWARD_FUNC      reward .py exporting reward_func, or an HTTP URL    (this checkout's
#                    openrlhf_cropi/rewards/math_verify.py: the last \boxed{} or the final
#                    number of the response vs the label, by math-verify; needs math-verify)
#   VAL_DATASETS     space-separated targeted validation sets, same keys as the pool
#                    (/path/to/val_target_1.jsonl /path/to/val_target_2.jsonl)
#   EVAL_DATASET     optional held-out evaluation set (--eval.dataset), every EVAL_STEPS steps
#   RUN_DIR          checkpoints, final model, TensorBoard, CROPI store; made absolute
#                    against $PWD (runs/$RECIPE_NAME)
#   NNODES GPUS_PER_NODE  the GPUs the job gets                          (1, 8)
#   VLLM_TP VLLM_GPU_MEM  vLLM tensor parallel size, memory fraction      (preset, 0.6)
#   ZERO_STAGE TRAIN_MICRO_BATCH ROLLOUT_MICRO_BATCH GRAD_CKPT  memory knobs (preset; GRAD_CKPT=1)
#   PROMPT_MAX_LEN   prompt tokens budgeted on top of the response length (1024)
#   CROPI_STEPS_PER_PHASE CROPI_NUM_PHASES CROPI_ALPHA  the curriculum   (16, 8, 0.1)
#   RESPONSE_LEN     response tokens (--rollout.max_new_tokens)          (preset: 2048, 4096, 8192)
#   SEED             --train.seed and --cropi.seed                       (42)

RECIPE_PLACEHOLDER=/path/to/
RECIPE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RECIPE_PRESETS=(qwen2.5-1.5b-instruct qwen2.5-7b-instruct r1-distill-qwen-1.5b)

# recipe_preset NAME: the model and the per-GPU memory settings for 80 GiB GPUs.
# Sets _PRESET_MODEL _PRESET_RESPONSE_LEN _PRESET_TRAIN_MB _PRESET_ROLLOUT_MB _PRESET_ZERO _PRESET_TP.
recipe_preset() {
  case "$1" in
    qwen2.5-1.5b-instruct)
      _PRESET_MODEL=Qwen/Qwen2.5-1.5B-Instruct _PRESET_RESPONSE_LEN=2048
      _PRESET_TRAIN_MB=4 _PRESET_ROLLOUT_MB=8 _PRESET_ZERO=2 _PRESET_TP=1 ;;
    qwen2.5-7b-instruct)
      _PRESET_MODEL=Qwen/Qwen2.5-7B-Instruct _PRESET_RESPONSE_LEN=4096
      _PRESET_TRAIN_MB=1 _PRESET_ROLLOUT_MB=2 _PRESET_ZERO=3 _PRESET_TP=2 ;;
    r1-distill-qwen-1.5b)
      _PRESET_MODEL=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B _PRESET_RESPONSE_LEN=8192
      _PRESET_TRAIN_MB=1 _PRESET_ROLLOUT_MB=4 _PRESET_ZERO=2 _PRESET_TP=1 ;;
    *)
      echo "recipe: unknown model preset '$1' (one of: ${RECIPE_PRESETS[*]})" >&2
      return 1 ;;
  esac
}

# recipe_build SELECTOR PRESET: SELECTOR is influence | random | learnability | pass_rate
# (CROPI with that --cropi.selector) or none (full-data GRPO, CROPI off). Defines RECIPE_ARGS.
recipe_build() {
  local selector=$1
  recipe_preset "$2" || return 1
  case "$selector" in
    influence | random | learnability | pass_rate | none) ;;
    *) echo "recipe: unknown selector '$selector'" >&2; return 1 ;;
  esac

  local model=${MODEL:-$_PRESET_MODEL}
  local response_len=${RESPONSE_LEN:-$_PRESET_RESPONSE_LEN}
  local nnodes=${NNODES:-1} gpus=${GPUS_PER_NODE:-8} tp=${VLLM_TP:-$_PRESET_TP}
  local run_dir=${RUN_DIR:-runs/${RECIPE_NAME:-recipe}}
  [[ $run_dir = /* ]] || run_dir=$PWD/$run_dir   # the job runs elsewhere: absolute paths only
  local steps_per_phase=${CROPI_STEPS_PER_PHASE:-16}
  if (( nnodes * gpus % tp != 0 )); then
    echo "recipe: NNODES x GPUS_PER_NODE = $((nnodes * gpus)) GPUs is not a multiple of VLLM_TP=$tp" >&2
    return 1
  fi

  RECIPE_ARGS=(
    # Model, data, reward
    --actor.model_name_or_path "$model"
    --data.prompt_dataset "${PROMPT_DATA:-${RECIPE_PLACEHOLDER}train_pool.jsonl}"
    --data.input_key "${INPUT_KEY:-prompt}" --data.label_key "${LABEL_KEY:-label}"
    --reward.remote_url "${REWARD_FUNC:-$RECIPE_ROOT/openrlhf_cropi/rewards/math_verify.py}"
    --data.max_len $(( ${PROMPT_MAX_LEN:-1024} + response_len )) --rollout.max_new_tokens "$response_len"

    # GRPO as in the paper (verl): group-normalised advantages, 8 responses per prompt,
    # 128 prompts per step (one optimizer step on all 1024 responses), lr 1e-6 (constant),
    # KL as a loss with coefficient 0.001 and the k3 (low-variance) estimator, entropy 0.001,
    # loss averaged over tokens of each response, then over responses.
    --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8
    --rollout.batch_size 128 --train.batch_size 1024
    --rollout.temperature 1.0
    --algo.kl.init_coef 0.001 --algo.kl.use_loss --algo.kl.estimator k3
    --actor.entropy_coef 0.001 --actor.loss_agg_mode seq-mean-token-mean
    --actor.adam.lr 1e-6 --actor.lr_scheduler constant --actor.lr_warmup_ratio 0
    --train.num_episodes 1 --train.seed "${SEED:-42}"

    # Placement: actor, reference and vLLM engines share every GPU (sleep mode in between).
    --actor.num_nodes "$nnodes" --actor.num_gpus_per_node "$gpus"
    --ref.num_nodes "$nnodes" --ref.num_gpus_per_node "$gpus"
    --vllm.num_engines $(( nnodes * gpus / tp )) --vllm.tensor_parallel_size "$tp"
    --train.colocate_all --vllm.enable_sleep --ds.enable_sleep
    --vllm.gpu_memory_utilization "${VLLM_GPU_MEM:-0.6}"
    --ds.zero_stage "${ZERO_STAGE:-$_PRESET_ZERO}" --ds.param_dtype bf16
    --train.micro_batch_size "${TRAIN_MICRO_BATCH:-$_PRESET_TRAIN_MB}"
    --rollout.micro_batch_size "${ROLLOUT_MICRO_BATCH:-$_PRESET_ROLLOUT_MB}"

    # Outputs
    --ckpt.path "$run_dir/ckpt" --ckpt.save_steps "$steps_per_phase" --ckpt.output_dir "$run_dir/final"
    --logger.tensorboard_dir "$run_dir/tensorboard"
  )
  if [ "${APPLY_CHAT_TEMPLATE:-1}" = 1 ]; then RECIPE_ARGS+=(--data.apply_chat_template); fi
  if [ "${GRAD_CKPT:-1}" = 1 ]; then RECIPE_ARGS+=(--actor.gradient_checkpointing_enable); fi
  if [ -n "${EVAL_DATASET:-}" ]; then
    RECIPE_ARGS+=(--eval.dataset "$EVAL_DATASET" --eval.steps "${EVAL_STEPS:-$steps_per_phase}")
  fi

  if [ "$selector" = none ]; then
    return 0
  fi
  # CROPI: K=8 behavior responses per pool prompt and 32 per validation prompt from the
  # initial policy; 10% of coordinates kept, projected to 32768 dimensions; the top 10% of the
  # pool trains each phase. The baselines run the identical pipeline with another selector.
  RECIPE_ARGS+=(
    --cropi.enable --cropi.selector "$selector"
    --cropi.alpha "${CROPI_ALPHA:-0.1}"
    --cropi.steps_per_phase "$steps_per_phase" --cropi.num_phases "${CROPI_NUM_PHASES:-8}"
    --cropi.train_samples 8 --cropi.val_samples 32 --cropi.max_val_prompts 100
    --cropi.keep_ratio 0.1 --cropi.proj_dim 32768 --cropi.projector sjlt
    --cropi.seed "${SEED:-42}" --cropi.store_dir "$run_dir/cropi"
  )
  if [ "$selector" = influence ]; then
    local val_sets
    read -r -a val_sets <<<"${VAL_DATASETS:-${RECIPE_PLACEHOLDER}val_target_1.jsonl ${RECIPE_PLACEHOLDER}val_target_2.jsonl}"
    RECIPE_ARGS+=(--cropi.val_datasets ${val_sets[@]+"${val_sets[@]}"})
  fi
}

# recipe_require_filled: fail, naming them, while RECIPE_ARGS still holds placeholder paths.
recipe_require_filled() {
  local arg missing=()
  for arg in "${RECIPE_ARGS[@]}"; do
    case "$arg" in "$RECIPE_PLACEHOLDER"*) missing+=("$arg") ;; esac
  done
  if (( ${#missing[@]} )); then
    echo "recipe ${RECIPE_NAME:-?}: fill in the placeholder paths (PROMPT_DATA, VAL_DATASETS): ${missing[*]}" >&2
    return 1
  fi
}
