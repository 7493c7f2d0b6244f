# shellcheck shell=bash
# CROPI (influence selector) on DeepSeek-R1-Distill-Qwen-1.5B, 8192 response tokens.
# Environment and overrides: launch/recipes/_common.sh. Run it with launch/ray/submit.sh or
# launch/slurm/cropi.sbatch.
RECIPE_NAME=cropi-r1-distill-qwen-1.5b
# shellcheck source=launch/recipes/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
recipe_build influence "r1-distill-qwen-1.5b"
