# shellcheck shell=bash
# Baseline: the 10% of the pool with the highest p(1-p) of the behavior pass rate p, per phase.
# MODEL_PRESET picks the model: qwen2.5-1.5b-instruct (default), qwen2.5-7b-instruct,
# r1-distill-qwen-1.5b.
# Environment and overrides: launch/recipes/_common.sh. Run it with launch/ray/submit.sh or
# launch/slurm/cropi.sbatch.
RECIPE_NAME=baseline-learnability
# shellcheck source=launch/recipes/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
recipe_build learnability "${MODEL_PRESET:-qwen2.5-1.5b-instruct}"
