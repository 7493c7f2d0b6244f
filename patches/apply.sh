#!/usr/bin/env bash
# Apply patches/*.patch to the installed openrlhf 0.11.2 (the python on PATH decides which
# install), or take them off with --revert. Re-running changes nothing: a patch that is already
# in place is skipped. A patch that neither applies nor is in place stops with patch's own
# report, which names the file and the hunk.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { printf '[patches] ERROR: %s\n' "$*" >&2; exit 1; }
command -v patch >/dev/null || die "the 'patch' program is missing (apt-get install patch)"

read -r version site < <(python - <<'PY'
import importlib.metadata, importlib.util, pathlib
spec = importlib.util.find_spec("openrlhf")
print(importlib.metadata.version("openrlhf"), pathlib.Path(spec.origin).parents[1] if spec else "-")
PY
) || die "openrlhf is not installed for $(command -v python)"
[ "$version" = 0.11.2 ] || die "these patches are for openrlhf 0.11.2, found $version in $site"

for p in "$HERE"/*.patch; do
  name=$(basename "$p")
  if patch -d "$site" -p1 -R --dry-run -s -f <"$p" >/dev/null 2>&1; then in_place=1; else in_place=0; fi
  if [ "${1:-}" = --revert ]; then
    [ $in_place = 1 ] || { echo "[patches] $name: not applied"; continue; }
    patch -d "$site" -p1 -R -s -f --no-backup-if-mismatch <"$p"
    echo "[patches] $name: reverted"
  elif [ $in_place = 1 ]; then
    echo "[patches] $name: already applied"
  else
    if ! report=$(patch -d "$site" -p1 -F0 --dry-run -f <"$p" 2>&1); then
      die "$name does not apply to $site:"$'\n'"$report"
    fi
    patch -d "$site" -p1 -F0 -s -f --no-backup-if-mismatch <"$p"
    echo "[patches] $name: applied"
  fi
done
