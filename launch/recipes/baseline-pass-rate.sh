# shellcheck shell=bash
# Baseline: the 10% of the pool with the lowest behavior pass rate (among prompts whose
# rewards vary), per phase.
# MODEL_PRESET picks the model: qwen2.5-1.5b-instruct (default), qwen2.5-7b-instruct,
# r1-distill-qwen-1.5b.
# Environment and overrides: launch/recipes/_common.sh. Run it with launch/ray/submit.sh or
# launch/slurm/cropi.sbatch.
RECIPE_NAME=baseline-pass-rate
# shellcheck source=launch/recipes/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
recipe_build pass_rate "${MODEL_PRESET:-qwen2.5-1.5b-instruct}"
