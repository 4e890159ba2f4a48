"""Shared fixtures: every available device, and the real MNIST subset when present."""

from pathlib import Path

import pytest

from nnaccel.backend import cuda_status

MNIST_SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-subset"
GPU_COUNT, GPU_REASON = cuda_status()
DEVICES = ["cpu", pytest.param("cuda:0", marks=[
    pytest.mark.gpu, pytest.mark.skipif(GPU_COUNT == 0, reason=f"no usable GPU: {GPU_REASON}")])]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn: the conformance suite runs every test body on each."""
    return request.param


@pytest.fixture(scope="session")
def mnist_path():
    if not MNIST_SUBSET.is_dir():
        pytest.skip(f"real MNIST subset not found at {MNIST_SUBSET}")
    return MNIST_SUBSET
