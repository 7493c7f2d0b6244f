"""The core stays importable without the host stack: it never imports OpenRLHF, vLLM, DeepSpeed, Ray."""

import subprocess
import sys

FORBIDDEN = ("openrlhf", "vllm", "deepspeed", "ray", "transformers")


def test_core_imports_no_host_stack():
    code = (
        "import sys\n"
        "import openrlhf_cropi.core.advantages, openrlhf_cropi.core.gradients, openrlhf_cropi.core.projection\n"
        "import openrlhf_cropi.core.scoring, openrlhf_cropi.core.store\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
