"""Shared fixtures: every device (the CPU, the emulated CUDA device, a real GPU where one answers),
and the real MNIST subset when present."""

import os
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:  # one BLAS thread per test process: several share the cores
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import pytest  # noqa: E402

from emulated_cuda import emulated_cuda, emulator_seed  # noqa: E402
from nnaccel.backend import cuda_status  # noqa: E402

MNIST_SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-subset"
GPU_COUNT, GPU_REASON = cuda_status()
REAL_GPU = [pytest.mark.gpu, pytest.mark.skipif(GPU_COUNT == 0, reason=f"no usable GPU: {GPU_REASON}")]
DEVICES = ["cpu", pytest.param("emulated", id="cuda-emulated"), pytest.param("cuda:0", id="cuda", marks=REAL_GPU)]
CUDA_DEVICES = DEVICES[1:]


def _enter(request):
    """The device name for a fixture parameter; the emulated device is swapped in for the test."""
    if request.param != "emulated":
        return request.param
    context = emulated_cuda()
    context.__enter__()
    request.addfinalizer(lambda: context.__exit__(None, None, None))
    return "cuda:0"


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device in turn: the conformance suite runs every test body on each."""
    return _enter(request)


@pytest.fixture(params=CUDA_DEVICES)
def cuda_device(request):
    """The CUDA devices only (emulated, and real where one answers), for the kernels' own tests."""
    return _enter(request)


@pytest.fixture
def emulated():
    """The emulated CUDA device, for tests of the emulator itself."""
    with emulated_cuda():
        yield "cuda:0"


@pytest.fixture(scope="session")
def mnist_path():
    if not MNIST_SUBSET.is_dir():
        pytest.skip(f"real MNIST subset not found at {MNIST_SUBSET}")
    return MNIST_SUBSET


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return ("CUDA emulator: the order of threads changes with every launch; a failure prints "
            "CUDA_EMULATOR_SEED to repeat it")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = emulator_seed()
    if report.failed and seed is not None:
        report.sections.append(("CUDA emulator", f"schedules of this run: CUDA_EMULATOR_SEED={seed}"))
