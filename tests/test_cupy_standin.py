"""The CuPy stand-in behaves like CuPy where nnaccel's bugs would show: device arrays stay on their
device, nothing converts to the host implicitly, memory runs out like a GPU's; and nnaccel runs on
it unmodified, from the library and from the command line."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy
import pytest

import nnaccel as nn
from nnaccel import visualize
from command_line import nnaccel
from emulated_cuda import ENV, ROOT

pytestmark = pytest.mark.usefixtures("emulated")


@pytest.fixture
def cp():
    import cupy

    return cupy


def test_device_arrays_are_not_numpy_arrays_and_do_not_convert_implicitly(cp):
    x = cp.arange(6, dtype=numpy.float32).reshape(2, 3)
    assert not isinstance(x, numpy.ndarray) and type(x).__module__.startswith("cupy")
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        numpy.asarray(x)
    for mixed in (lambda: x + numpy.ones(3, numpy.float32), lambda: numpy.ones(3, numpy.float32) * x,
                  lambda: cp.add(x, numpy.ones(3)), lambda: x.__setitem__(0, numpy.ones(3))):
        with pytest.raises(TypeError, match="Unsupported type"):
            mixed()
    assert (x * numpy.float32(2)).dtype == numpy.float32  # NumPy scalars are fine, as in CuPy
    numpy.testing.assert_array_equal(cp.asnumpy(x.T), numpy.arange(6).reshape(2, 3).T)
    assert float(x.sum()) == 15.0 and x[1, 2].shape == ()


def test_matmul_works_after_cupy_max_is_served(cp):
    """The stand-in serves NumPy's functions as module globals on first use (``cupy.max`` among them):
    its own code must not then call its ``max`` for Python's."""
    a = cp.ones((2, 3), dtype=numpy.float32)
    assert float(cp.max(a)) == 1.0
    numpy.testing.assert_array_equal(cp.asnumpy(cp.matmul(a, a.T)), numpy.full((2, 2), 3, numpy.float32))


def test_what_cupy_13_lacks_is_missing_here_too(cp):
    """nnaccel takes CuPy 13: a NumPy function or a constant only CuPy 14 has would fail on such a GPU."""
    from cupy.cuda import runtime

    for name in ("put_along_axis", "concat", "astype"):
        with pytest.raises(AttributeError, match=f"no attribute '{name}' .CuPy 13"):
            getattr(cp, name)
    assert not hasattr(runtime, "CUDA_R_16BF") and callable(cp.take_along_axis)


@pytest.fixture(scope="module")
def real_cupy():
    """What ``real_cupy_api.py`` finds, in a process of its own: it reads the real CuPy, then swaps the stand-in in
    for good (no test process should live with that swap afterwards)."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("real_cupy_api.py"))], capture_output=True,
                          text=True, timeout=300, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    if "skip" in found:
        pytest.skip(found["skip"])
    return found


def test_what_the_stand_in_has_real_cupy_has_with_the_same_parameters(real_cupy):
    """Every public name of the stand-in's modules and classes is in the real CuPy's module (where its CUDA
    library is missing here, its binary) and a call the stand-in takes, by position or keyword, binds to the real
    signature too (gemmEx's 19 parameters in order, RawModule's keywords, Stream.begin_capture's mode, the ndarray
    methods' parameters ...): code that passes on the stand-in cannot fail on a GPU for a name or an argument."""
    assert not real_cupy["problems"], "\n".join(real_cupy["problems"])


def test_the_numpy_functions_the_stand_in_serves_real_cupy_has(cp, real_cupy):
    """The stand-in serves NumPy's functions on device arrays, less those CuPy 13 or 14 lacks."""
    assert not real_cupy["numpy_not_in_cupy"], real_cupy["numpy_not_in_cupy"]
    with pytest.raises(AttributeError, match="'matrix' .CuPy lacks it"):
        cp.matrix


def test_raw_modules_take_the_arguments_cupy_takes(cp):
    """CuPy's RawModule refuses what its Cython signature and checks refuse: nnaccel's loader must not
    pass here and fail there."""
    code = 'template <typename T> __global__ void one(T* p) { p[0] = 1; }'
    with pytest.raises(ValueError, match=r"need to specify C\+\+ standard"):
        cp.RawModule(code=code, name_expressions=["one<int>"])
    with pytest.raises(TypeError, match="expected tuple, got list"):
        cp.RawModule(code=code, options=["-std=c++17"], name_expressions=["one<int>"])
    with pytest.raises(TypeError):
        cp.RawModule(code)  # keywords only
    with pytest.raises(TypeError, match="Exactly one of `code` and `path`"):
        cp.RawModule()
    out = cp.zeros(1, numpy.int32)
    cp.RawModule(code=code, options=("--std=c++17",), name_expressions=["one<int>"]).get_function("one<int>")(
        (1,), (1,), (out,))
    assert int(out[0]) == 1


def test_a_strided_gradient_takes_maxouts_generic_backward(cp):
    """The kernel takes contiguous arrays; the base class's fancy index serves the rest, on CuPy 13 too."""
    ops = nn.get_backend("cuda")
    dy = numpy.arange(6, dtype=numpy.float32).reshape(3, 2).T
    index = numpy.array([[0, 2, 1], [1, 1, 0]], numpy.int32)
    strided = ops.asarray(numpy.ascontiguousarray(dy.T)).T
    out = ops.maxout_backward(strided, ops.asarray(index), ops.empty((2, 3, 3)))
    expected = numpy.zeros((2, 3, 3), numpy.float32)
    numpy.put_along_axis(expected, index[..., None], dy[..., None], axis=2)
    numpy.testing.assert_array_equal(cp.asnumpy(out), expected)


def test_views_share_device_memory(cp):
    flat = cp.zeros(10, numpy.float32)
    part = flat[2:6].reshape(2, 2)
    part += 1
    assert flat.get().tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert part.data.ptr == flat.data.ptr + 8


def test_arrays_belong_to_their_device(cp):
    with cp.cuda.Device(1):
        on_one = cp.ones(4, numpy.float32)
    assert on_one.device.id == 1
    with pytest.raises(ValueError, match="array device = 1 while current = 0"):
        on_one + on_one
    with cp.cuda.Device(1):
        assert float((on_one + on_one).sum()) == 8.0


def test_the_memory_pool_limit_raises_cupys_out_of_memory_error(cp):
    pool = cp.get_default_memory_pool()
    pool.set_limit(size=pool.used_bytes() + 4096)
    try:
        kept = cp.empty(1024, numpy.float32)
        with pytest.raises(cp.cuda.memory.OutOfMemoryError, match="Out of memory allocating 4,096 bytes") as error:
            cp.empty(1024, numpy.float32)
        assert isinstance(error.value, MemoryError)
    finally:
        pool.set_limit(size=0)
    del kept
    free, total = cp.cuda.runtime.memGetInfo()
    assert 0 < free <= total


def test_fresh_device_memory_is_garbage(cp):
    values = cp.empty(1000, numpy.uint32).get()
    assert (values != 0).mean() > 0.9


def test_the_emulated_machine(cp):
    assert cp.cuda.runtime.getDeviceCount() == 2
    sms = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMultiProcessorCount, 0)
    assert 1 <= sms <= 4  # few, so that grid-stride loops take several passes
    assert b"emulator" in cp.cuda.runtime.getDeviceProperties(0)["name"]
    with cp.cuda.Device(1) as device:
        device.synchronize()
        assert cp.cuda.runtime.getDevice() == 1


def test_erf(cp):
    from cupyx.scipy.special import erf

    x = numpy.linspace(-6, 6, 1001)
    numpy.testing.assert_array_equal(erf(cp.asarray(x)).get(), [math.erf(v) for v in x])
    assert erf(cp.asarray(x, dtype=numpy.float32)).dtype == numpy.float32


# ----- nnaccel on the emulated device ---------------------------------------------------------------------
def test_cuda_1_computes_on_the_second_device(cp):
    """Every entry point enters the model's device: an op on the wrong current device would raise."""
    x, y = nn.datasets.synthetic(n=200, features=12, classes=3, seed=0)
    model = nn.Sequential(nn.Dense(12, 16, activation="gelu"), nn.Dropout(0.2), nn.Dense(16, 3), device="cuda:1")
    assert model.flat_params.device.id == 1
    trainer = nn.Trainer(model, optimizer=nn.Adam(lr=0.01), batch_size=32, quiet=True)
    trainer.fit(x, y, epochs=2, validation_data=(x, y))
    assert trainer.evaluate(x, y)["accuracy"] > 0.5 and model.predict(x).shape == (200, 3)


def test_cuda_1_loads_moves_prepares_and_steps_on_the_second_device(cp, tmp_path):
    """The entry points beyond fit, evaluate and predict enter the model's device too: moving a model there,
    setting a parameter, loading a model or a checkpoint onto it, preparing data and a single step."""
    x, y = nn.datasets.synthetic(n=64, features=12, classes=3, seed=0)

    def build(device):
        return nn.Sequential(nn.Dense(12, 16), nn.BatchNorm(16), nn.Dense(16, 3), device=device)

    trainer = nn.Trainer(build("cpu"), optimizer=nn.Adam(lr=0.01), quiet=True)
    trainer.fit(x, y, epochs=1)
    trainer.save_checkpoint(tmp_path / "run.npz")
    moved = build("cpu").to("cuda:1")
    assert moved.flat_params.device.id == 1 and moved.flat_grads.device.id == 1
    weight = moved.parameters()[0]
    weight.data = moved.backend.asarray(numpy.ones(weight.shape, numpy.float32))
    numpy.testing.assert_array_equal(moved.backend.to_host(weight.data), 1.0)
    with pytest.raises(nn.DeviceError, match="the new data of parameter 0.weight is on cpu but the model is "
                                             "on cuda:1"):
        weight.data = numpy.zeros(weight.shape, numpy.float32)
    loaded = nn.load(tmp_path / "run.npz", device="cuda:1")
    for flat in ("flat_params", "flat_buffers"):
        numpy.testing.assert_array_equal(loaded.backend.to_host(getattr(loaded, flat)), getattr(trainer.model, flat))
    resumed = nn.Trainer(build("cuda:1"), optimizer=nn.Adam(lr=0.01), quiet=True)
    resumed.load_checkpoint(tmp_path / "run.npz")
    resumed.fit(x, y, epochs=2)
    xb, yb = resumed.prepare(x, y)
    assert xb.device.id == 1 and yb.device.id == 1
    loss, _ = resumed.train_step(xb[:32], yb[:32])
    assert numpy.isfinite(resumed.model.backend.to_host(loss)).all()


def test_cuda_1_predicts_and_shows_activations_of_inputs_in_another_dtype(cp):
    """predict converts uint8 or float64 inputs on the model's device; layer_activations runs there too."""
    x = numpy.random.default_rng(0).integers(0, 256, (8, 12), dtype=numpy.uint8)

    def build(device):
        return nn.Sequential(nn.Dense(12, 16, activation="relu"), nn.Dense(16, 3), device=device, seed=3)

    model, reference = build("cuda:1"), build("cpu")
    expected = reference.predict(x.astype(numpy.float32))
    for given in (x, x.astype(numpy.float64)):
        numpy.testing.assert_allclose(model.predict(given), expected, rtol=1e-5, atol=1e-4)
    activations = visualize.layer_activations(model, x[0].astype(numpy.float32))
    numpy.testing.assert_allclose(activations[-1], expected[0], rtol=1e-5, atol=1e-4)


def test_train_step_goes_on_after_the_model_moves_to_another_device(cp):
    """Steps on cuda:0, then cuda:1, then the CPU, momentum and all, end where steps on the CPU alone do."""
    x = numpy.random.default_rng(0).uniform(0, 1, (16, 20)).astype(numpy.float32)
    y = numpy.arange(16) % 4

    def run(devices):
        trainer = nn.Trainer(nn.Sequential(nn.Dense(20, 4), device=devices[0]), optimizer=nn.SGD(lr=0.1, momentum=0.9),
                             batch_size=16, quiet=True)
        for device in devices:
            trainer.model.to(device)
            trainer.train_step(*trainer.prepare(x, y))
        return trainer.model.backend.to_host(trainer.model.flat_params)

    numpy.testing.assert_allclose(run(["cuda:0", "cuda:1", "cpu"]), run(["cpu"] * 3), rtol=1e-5, atol=1e-6)


def test_a_model_on_auto_with_a_gpu_goes_there_without_a_warning(cp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nn.Sequential(nn.Dense(3, 2), device="auto").backend.name == "cuda:0"


def test_from_torch_onto_cuda_1(cp):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                 torch.nn.Linear(16, 3)).eval()
    model = nn.Sequential.from_torch(module, device="cuda:1")
    x = numpy.random.default_rng(0).standard_normal((8, 12)).astype(numpy.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    numpy.testing.assert_allclose(model.eval().predict(x), expected, rtol=1e-5, atol=1e-6)


def test_nnaccel_train_on_the_emulated_gpu_end_to_end(tmp_path):
    run = nnaccel("train", "--data", "digits", "--device", "cuda", "--epochs", "3", "--layers", "64,32,10",
                  "--save", "m.npz", "--json", "--quiet", env=ENV, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    result = __import__("json").loads(run.stdout)
    assert result["device"] == "cuda:0" and result["accuracy"] > 0.85
    evaluate = nnaccel("evaluate", "m.npz", "--data", "digits", "--device", "cuda", "--json", env=ENV, cwd=tmp_path,
                       timeout=600)
    assert evaluate.returncode == 0 and __import__("json").loads(evaluate.stdout)["accuracy"] > 0.85, evaluate.stderr
    info = nnaccel("info", env=ENV)
    assert "cuda:1 nnaccel CUDA emulator 1 (CPU)" in info.stdout and "'auto' resolves to cuda:0" in info.stdout


def test_every_cupy_backend_method_runs_here(monkeypatch):
    """A run that needs them all (GELU's erf, Maxout, Dropout, a softmax output, both optimizers, convolutions,
    both poolings, BatchNorm, a capped memory pool) calls every override of CupyBackend, so each runs on the
    emulated device in CI."""
    import cupy

    from nnaccel.backend import get_backend
    from nnaccel.backend.cupy_backend import CupyBackend

    called = set()
    for name, method in vars(CupyBackend).items():
        if callable(method) and not name.startswith("__"):
            def spy(self, *args, _name=name, _method=method, **kwargs):
                called.add(_name)
                return _method(self, *args, **kwargs)
            monkeypatch.setattr(CupyBackend, name, spy)
    x, y = nn.datasets.synthetic(n=96, features=8, classes=3, seed=0)
    for optimizer, output in ((nn.SGD(lr=0.1, momentum=0.9), None), (nn.Adam(lr=0.01), "softmax")):
        model = nn.Sequential(nn.Dense(8, 12, activation="gelu"), nn.Maxout(12, 6, pieces=2), nn.Dropout(0.2),
                              nn.Dense(6, 3, activation=output), device="cuda")
        loss = nn.MSE() if output else nn.SoftmaxCrossEntropy()
        nn.Trainer(model, loss=loss, optimizer=optimizer, batch_size=32, quiet=True).fit(x, y, epochs=1)
        model.predict(x)
    plain = nn.Sequential(nn.Dense(8, 3), device="cuda")  # no random layer, SGD: a step CUDA graphs replay
    nn.Trainer(plain, batch_size=32, quiet=True).fit(x, y, epochs=1)
    nn.Trainer(plain, batch_size=32, quiet=True, precision="bf16").fit(x, y, epochs=1)  # bfloat16 storage
    images = numpy.random.default_rng(0).random((96, 1, 8, 8)).astype(numpy.float32)
    for pool_layer in (nn.MaxPool2D(2), nn.AvgPool2D(3, stride=1, padding=1)):
        front = [nn.RandomShift(1), nn.Conv2D(1, 4, 3, padding=1, activation="silu"), nn.BatchNorm(4), pool_layer,
                 nn.Conv2D(4, 3, 2, activation="relu"), nn.Flatten()]
        width = nn.Sequential(*front, input_shape=(1, 8, 8)).out_features
        conv = nn.Sequential(*front, nn.Dense(width, 3), input_shape=(1, 8, 8), device="cuda")
        nn.Trainer(conv, batch_size=32, quiet=True).fit(images, y, epochs=1)
        conv.predict(images)
    pool = cupy.get_default_memory_pool()
    pool.set_limit(size=pool.used_bytes() + 1024)
    try:
        with pytest.raises(nn.OutOfMemory):
            nn.Trainer(model, quiet=True).fit(x, y, epochs=1)
    finally:
        pool.set_limit(size=0)
    ops = get_backend("cuda")
    z = ops.asarray(numpy.linspace(-3, 3, 7, dtype=numpy.float32))
    nn.GELU().forward(ops, z, ops.empty(z.shape))  # the generic activation (what unfused dtypes take): erf
    ops.synchronize()
    overrides = {name for name, member in vars(CupyBackend).items() if callable(member) and not name.startswith("__")}
    assert called == overrides, f"never ran on the emulated device: {sorted(overrides - called)}"
