"""Fixtures for tests that run the real OpenRLHF host stack (Ray, vLLM, DeepSpeed) on CPU."""

import os
import pathlib
import sys

import pytest

pytest.importorskip("openrlhf", reason="host stack not installed: run launch/local/setup_cpu.sh")

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cpu_env():
    """What launch/local/cpu_env.sh exports, for Ray workers started from the test process."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
        or str(pathlib.Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "torch_extensions"),
    }
    os.environ.update(env)
    # Scripts the tests start find this interpreter's `python` and `ray` even when the venv
    # was not activated (CI runs `.venv/bin/python -m pytest`).
    os.environ["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return env


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two tiny models of one architecture with different weights (seeds 0 and 1)."""
    from openrlhf_cropi.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(root / "seed0", seed=0), build_tiny_model(root / "seed1", seed=1)
