"""Fixtures of the benchmark suite: devices, networks, batch sizes, and warmed-up GPU-aware timing.

Run it with ``python -m pytest benchmarks`` (``--bench-quick`` for one tiny
network and batch, e.g. with ``--benchmark-disable`` as a smoke test). The
784-4096-4096-10 network runs on the CPU only with NNACCEL_BENCH_LARGE=1.
"""

import os
from dataclasses import dataclass

import pytest

from nnaccel import bench
from nnaccel.backend import cuda_status, get_backend

GPU_COUNT, GPU_REASON = cuda_status()
DEVICES = ["cpu", pytest.param("cuda:0", marks=[
    pytest.mark.gpu, pytest.mark.skipif(GPU_COUNT == 0, reason=f"no usable GPU: {GPU_REASON}")])]
NETWORKS = tuple(bench.DEFAULT_BATCHES)
BATCHES = (32, 256, 1024)
QUICK_NETWORKS, QUICK_BATCHES = ("784-16-16-10",), (16,)
LARGE_ON_CPU = os.environ.get("NNACCEL_BENCH_LARGE") == "1"
GPU_TIMING = {"rounds": 20, "iterations": 5, "warmup_rounds": 3}


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true",
                     help=f"only network {QUICK_NETWORKS[0]} at batch {QUICK_BATCHES[0]}: a smoke test")


def pytest_generate_tests(metafunc):
    """Parametrise ``network`` and ``batch`` wherever a test or fixture takes them."""
    quick = metafunc.config.getoption("bench_quick")
    if "network" in metafunc.fixturenames:
        metafunc.parametrize("network", QUICK_NETWORKS if quick else NETWORKS)
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", QUICK_BATCHES if quick else BATCHES, ids=lambda batch: f"batch{batch}")


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn (the CPU always)."""
    return request.param


@pytest.fixture
def backend(device):
    """The device's backend, made current for the test (cuda:N computes on GPU N)."""
    ops = get_backend(device)
    with ops.activate():
        yield ops


@pytest.fixture
def sizes(device, network):
    """The network's name (layer sizes or a preset); the largest network is skipped on the CPU unless asked for."""
    if device == "cpu" and network in bench.GPU_ONLY_NETWORKS and not LARGE_ON_CPU:
        pytest.skip(f"{network} takes minutes on the CPU: set NNACCEL_BENCH_LARGE=1 to run it")
    return bench.parse_network(network)


@pytest.fixture
def model(backend, sizes):
    return bench.build_network(sizes, backend.name)


@pytest.fixture
def measure(benchmark, backend):
    """``measure(fn)`` times ``fn`` after a warm-up; on a GPU each timed call ends with a synchronize."""
    if backend.name == "cpu":
        def run(fn):
            fn()
            return benchmark(fn)
    else:
        def run(fn):
            def synchronized():
                fn()
                backend.synchronize()
            return benchmark.pedantic(synchronized, **GPU_TIMING)
    return run


@dataclass
class DenseOperands:
    """One Dense layer's operands for a batch: what its forward and backward ops read and write."""

    activation: object
    weight: object
    bias: object
    weight_grad: object
    bias_grad: object
    x: object  # input (batch, in)
    z: object  # pre-activation, activated in place (batch, out)
    dy: object  # gradient arriving from the next layer (batch, out)
    dz: object  # gradient before the activation (batch, out)
    dx: object  # gradient passed back to the previous layer (batch, in)


@pytest.fixture
def layers(backend, model, batch):
    """Every Dense layer's operands: the model's parameters, seeded activations and gradients."""
    if not all(type(layer).__name__ == "Dense" for layer in model.layers):
        pytest.skip("the per-op benchmarks take networks of Dense layers")
    operands = []
    for index, layer in enumerate(model.layers):
        weight, bias = layer.params["weight"], layer.params["bias"]
        inputs, outputs = (batch, layer.in_features), (batch, layer.out_features)
        operands.append(DenseOperands(layer.activation, weight.data, bias.data, weight.grad, bias.grad,
                                      x=centred_uniform(backend, inputs, index, 0),
                                      z=centred_uniform(backend, outputs, index, 1),
                                      dy=centred_uniform(backend, outputs, index, 2),
                                      dz=centred_uniform(backend, outputs, index, 3),
                                      dx=backend.empty(inputs)))
    return operands


def centred_uniform(backend, shape, seed, counter):
    """Seeded float32 values in [-0.5, 0.5) on the backend's device: half of them below ReLU's kink."""
    return backend.uniform(shape, seed, counter) - 0.5
