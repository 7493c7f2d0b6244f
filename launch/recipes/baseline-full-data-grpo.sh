# shellcheck shell=bash
# Baseline: plain GRPO on the whole pool (CROPI off), one epoch.
# MODEL_PRESET picks the model: qwen2.5-1.5b-instruct (default), qwen2.5-7b-instruct,
# r1-distill-qwen-1.5b.
# Environment and overrides: launch/recipes/_common.sh. Run it with launch/ray/submit.sh or
# launch/slurm/cropi.sbatch.
RECIPE_NAME=baseline-full-data-grpo
# shellcheck source=launch/recipes/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
recipe_build none "${MODEL_PRESET:-qwen2.5-1.5b-instruct}"
