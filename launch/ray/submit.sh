#!/usr/bin/env bash
# Submit a recipe to a running Ray cluster with `ray job submit`.
#   usage: launch/ray/submit.sh [options] RECIPE [--] [TRAIN_PPO_RAY_FLAGS...]
#   e.g.   NNODES=2 PROMPT_DATA=/data/pool.jsonl REWARD_FUNC=/data/math_reward.py \
#          VAL_DATASETS="/data/val_a.jsonl /data/val_b.jsonl" \
#          launch/ray/submit.sh --address http://HEAD:8265 launch/recipes/cropi-qwen2.5-1.5b-instruct.sh
# Options:
#   --address URL        the cluster's dashboard (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS,
#                        else http://127.0.0.1:8265)
#   --submission-id ID   job id (default: RECIPE_NAME-YYYYmmdd-HHMMSS)
#   --no-wait            return once submitted instead of streaming the job's logs
#   --check              also parse-and-validate the flags here first (needs OpenRLHF 0.11.2
#                        installed here and the data paths visible from this machine)
#   --print              print the ray job submit command and exit (contacts nothing)
# Flags after the recipe are appended to its flag list and win over it. Paths in the recipe
# are read on the cluster: give absolute paths on its shared filesystem. The recipe's
# environment variables are documented in launch/recipes/_common.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=launch/ray/_lib.sh
. "$ROOT/launch/ray/_lib.sh"

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

address=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
submission_id='' wait_opt=() check=0 print=0
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address=${2:?--address needs a URL}; shift 2 ;;
    --submission-id) submission_id=${2:?--submission-id needs a value}; shift 2 ;;
    --no-wait) wait_opt=(--no-wait); shift ;;
    --check) check=1; shift ;;
    --print) print=1; shift ;;
    -h | --help) usage 0 ;;
    -*) cropi_log "ERROR: unknown option $1"; usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage
recipe=$1
shift
[ "${1:-}" != -- ] || shift
[ -f "$recipe" ] || { cropi_log "ERROR: no such recipe: $recipe"; exit 2; }
case "$address" in *://*) ;; *) address=http://$address ;; esac

# shellcheck source=launch/recipes/cropi-qwen2.5-1.5b-instruct.sh
. "$recipe"
args=("${RECIPE_ARGS[@]}" "$@")
recipe_require_filled
submission_id=${submission_id:-$RECIPE_NAME-$(date +%Y%m%d-%H%M%S)}

cropi_submit_cmd "$address" "$submission_id" "$ROOT" ${wait_opt[@]+"${wait_opt[@]}"} -- "${args[@]}"
if [ "$print" = 1 ]; then
  printf '%q ' "${CROPI_SUBMIT_CMD[@]}"
  echo
  exit 0
fi

cropi_check_versions ray
cluster_ray=$(cropi_dashboard_version "$address") || { cropi_log "ERROR: no Ray dashboard at $address"; exit 1; }
[ "$cluster_ray" = "$CROPI_RAY_VERSION" ] || { cropi_log "ERROR: the cluster runs Ray $cluster_ray, want $CROPI_RAY_VERSION"; exit 1; }
if [ "$check" = 1 ]; then
  cropi_log "dry run of the flags (OpenRLHF's parser + --cropi.*)"
  cropi_dry_run "$ROOT" "${args[@]}"
fi
cropi_log "submitting $submission_id ($recipe) to $address"
exec "${CROPI_SUBMIT_CMD[@]}"
