# shellcheck shell=bash
# CROPI (influence selector) on Qwen2.5-1.5B-Instruct, 2048 response tokens.
# Environment and overrides: launch/recipes/_common.sh. Run it with launch/ray/submit.sh or
# launch/slurm/cropi.sbatch.
RECIPE_NAME=cropi-qwen2.5-1.5b-instruct
# shellcheck source=launch/recipes/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
recipe_build influence "qwen2.5-1.5b-instruct"
