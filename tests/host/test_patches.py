"""patches/ is in place in the installed OpenRLHF and does what it claims on a CUDA-less torch."""

import pathlib
import subprocess

import pytest
import torch

pytestmark = pytest.mark.host

PATCHES = sorted((pathlib.Path(__file__).resolve().parents[2] / "patches").glob("*.patch"))


def test_there_are_patches():
    assert PATCHES


@pytest.mark.parametrize("patch_file", PATCHES, ids=lambda p: p.name)
def test_patch_is_applied_to_installed_openrlhf(patch_file):
    import openrlhf

    site = pathlib.Path(openrlhf.__file__).parents[1]
    # A patch is in place exactly when reversing it would apply cleanly.
    check = subprocess.run(
        ["patch", "-d", str(site), "-p1", "-R", "--dry-run", "-F0", "-f", "-i", str(patch_file)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, f"{patch_file.name} is not (fully) applied to {site}:\n{check.stdout}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_device_helpers_fall_back_to_cpu():
    from openrlhf.utils.distributed_util import cuda_synchronize, get_current_device

    assert get_current_device() == torch.device("cpu")
    cuda_synchronize()  # torch.cuda.synchronize() would raise on this torch
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.synchronize()
