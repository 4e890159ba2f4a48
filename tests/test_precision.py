"""precision="tf32" | "bf16": float32 weighted sums on a GPU's tensor cores (cuBLAS compute types),
on the emulated device whose matmul rounds the inputs as the tensor cores do; the CPU says it
computes fp32."""

import numpy
import pytest
import torch

import nnaccel as nn
from nnaccel import cli, datasets
from nnaccel.backend import get_backend

BITS = {"tf32": 10, "bf16": 7}  # explicit mantissa bits of the inputs


def _rounded(x, bits):
    """``x`` rounded to ``bits`` mantissa bits, to nearest with ties to even, computed in float64."""
    mantissa, exponent = numpy.frexp(x.astype(numpy.float64))
    return numpy.ldexp(numpy.rint(mantissa * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), exponent).astype(numpy.float32)


def test_the_stand_in_rounds_as_the_tensor_cores_do(emulated):
    from cupy._core import _routines_linalg  # the stand-in's

    rng = numpy.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)).astype(numpy.float32)
    ties = numpy.float32(1) + numpy.arange(8, dtype=numpy.float32) * numpy.float32(2.0 ** -8)  # halfway for bf16
    x = numpy.concatenate([x, ties, -ties]).astype(numpy.float32)
    for bits in BITS.values():
        numpy.testing.assert_array_equal(_routines_linalg.round_mantissa(x, bits), _rounded(x, bits))
    bf16 = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()  # PyTorch rounds to nearest even
    numpy.testing.assert_array_equal(_routines_linalg.round_mantissa(x, 7), bf16)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_weighted_sums_round_their_inputs_and_accumulate_in_float32(emulated, precision):
    ops = get_backend(emulated)
    rng = numpy.random.default_rng(1)
    a, b = rng.standard_normal((33, 300), numpy.float32), rng.standard_normal((300, 17), numpy.float32)
    out = ops.empty((33, 17), numpy.float32)
    with ops.matmul_precision(precision):
        ops.matmul(ops.asarray(a), ops.asarray(b), out)
        rounded = ops.to_host(out).copy()
    ops.matmul(ops.asarray(a), ops.asarray(b), out)  # the compute type is restored after the context
    exact = a.astype(numpy.float64) @ b.astype(numpy.float64)
    bits = BITS[precision]
    expected = _rounded(a, bits).astype(numpy.float64) @ _rounded(b, bits).astype(numpy.float64)
    bound = 300 * 2.0 ** -24 * (numpy.abs(a) @ numpy.abs(b))  # float32 accumulation of 300 products
    assert (numpy.abs(rounded - expected) <= bound).all()
    numpy.testing.assert_allclose(ops.to_host(out), exact, rtol=0, atol=1e-4)
    assert numpy.abs(rounded - exact).max() > 10 * numpy.abs(ops.to_host(out) - exact).max()
    assert rounded.dtype == numpy.float32


def test_the_stand_in_takes_the_compute_types_as_cupy_does(emulated):
    """CuPy's float32 products: TF32 in 2-D ones (``CUBLAS_COMPUTE_32F_FAST_TF32``), none in batched
    ones, and COMPUTE_TYPE_BF16 is plain float32 (``CUBLAS_COMPUTE_32F``)."""
    import cupy
    from cupy._core import _routines_linalg as linalg

    rng = numpy.random.default_rng(4)
    a, b = rng.standard_normal((2, 9, 40), numpy.float32), rng.standard_normal((40, 5), numpy.float32)
    device_a, device_b = cupy.asarray(a), cupy.asarray(b)
    outside = linalg.get_compute_type(numpy.float32)
    try:
        for compute_type, bits in ((linalg.COMPUTE_TYPE_TF32, 10), (linalg.COMPUTE_TYPE_BF16, None)):
            linalg.set_compute_type(numpy.float32, compute_type)
            flat = cupy.matmul(device_a[0], device_b).get()
            rounded = a[0] if bits is None else _rounded(a[0], bits)
            numpy.testing.assert_array_equal(flat, rounded @ (b if bits is None else _rounded(b, bits)))
            numpy.testing.assert_array_equal(cupy.matmul(device_a, device_b).get(), a @ b)  # batched: float32
    finally:
        linalg.set_compute_type(numpy.float32, outside)


def test_fp32_keeps_the_compute_type_cupy_tf32_gives_as_cupy_does(emulated, monkeypatch):
    """CUPY_TF32=1 makes CuPy's float32 products TF32 (decided at the first get_compute_type); "fp32", the
    default, leaves CuPy's type as the process has it, and float64 products stay DEFAULT."""
    from cupy._core import _routines_linalg as linalg

    ops = get_backend(emulated)
    rng = numpy.random.default_rng(5)
    a, b = rng.standard_normal((7, 60), numpy.float32), rng.standard_normal((60, 3), numpy.float32)
    out = ops.empty((7, 3), numpy.float32)
    saved = dict(linalg._compute_types)
    monkeypatch.setenv("CUPY_TF32", "1")
    linalg._compute_types.clear()  # a fresh process: every type TBD
    try:
        with ops.matmul_precision("fp32"):
            ops.matmul(ops.asarray(a), ops.asarray(b), out)
        assert linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32
        assert linalg.get_compute_type(numpy.float64) == linalg.COMPUTE_TYPE_DEFAULT
    finally:
        linalg._compute_types.clear()
        linalg._compute_types.update(saved)
    expected = _rounded(a, 10).astype(numpy.float64) @ _rounded(b, 10).astype(numpy.float64)
    bound = 60 * 2.0 ** -24 * (numpy.abs(a) @ numpy.abs(b))
    assert (numpy.abs(ops.to_host(out) - expected) <= bound).all()
    assert not numpy.array_equal(ops.to_host(out), a @ b)


SEEDS = (0, 1, 2)


def _mnist_runs():
    """784-128-10 for 3 epochs of the MNIST sample on the emulated device in each precision, from
    three seeds (rounding makes each run's accuracy wander by a few tenths of a point; the mean
    over seeds is what a precision costs): (mean held-out accuracy, seed 0's weights)."""
    from emulated_cuda import emulated_cuda

    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_mnist_sample())
    runs = {}
    with emulated_cuda():
        for precision in ("fp32", "tf32", "bf16"):
            accuracies = []
            for seed in SEEDS:
                model = nn.Sequential(nn.Dense(784, 128, activation="relu"), nn.Dense(128, 10), device="cuda",
                                      seed=seed)
                trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=128, quiet=True,
                                     precision=precision, seed=seed)
                trainer.fit(x, y, epochs=3)
                accuracies.append(trainer.evaluate(xv, yv)["accuracy"])
                if seed == SEEDS[0]:
                    weights = model.backend.to_host(model.flat_params)
            runs[precision] = (float(numpy.mean(accuracies)), weights)
    return runs


def test_training_the_mnist_sample_ends_within_half_a_point_of_fp32():
    """tf32 and bf16 in one test: one worker trains the nine runs (a fixture shared by a test per precision
    trained them on each worker that ran one)."""
    runs = _mnist_runs()
    fp32_accuracy, fp32_weights = runs["fp32"]
    assert fp32_accuracy > 0.93
    for precision in ("tf32", "bf16"):
        accuracy, weights = runs[precision]
        assert abs(accuracy - fp32_accuracy) <= 0.005, (precision, accuracy, fp32_accuracy)
        assert weights.dtype == numpy.float32 and not numpy.array_equal(weights, fp32_weights), precision  # it rounded


def test_the_cpu_says_it_computes_fp32(capsys):
    x, y = datasets.synthetic(n=64, features=8, classes=3, seed=0)
    expected = nn.Trainer(nn.Sequential(nn.Dense(8, 3), seed=0), batch_size=32, quiet=True)
    trainer = nn.Trainer(nn.Sequential(nn.Dense(8, 3), seed=0), batch_size=32, precision="bf16")
    assert "precision 'bf16' is a GPU feature (tensor-core weighted sums); on the CPU the steps compute in fp32" \
        in capsys.readouterr().err
    expected.fit(x, y, epochs=2)
    trainer.fit(x, y, epochs=2)
    numpy.testing.assert_array_equal(trainer.model.flat_params, expected.model.flat_params)


def test_an_unknown_precision_is_refused_by_name(capsys):
    with pytest.raises(nn.ConfigError, match="precision 'fp16' is not one of 'fp32', 'tf32', 'bf16'"):
        nn.Trainer(nn.Sequential(nn.Dense(8, 3)), precision="fp16")
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--data", "synthetic", "--precision", "fp16"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision: invalid choice: 'fp16'" in err and err.count("\n") == 1


def test_a_precision_takes_any_case_as_the_command_line_does(emulated):
    """precision="TF32" is tf32 (the CLI's --precision TF32 is too); "FP16" is refused as written."""
    trainer = nn.Trainer(nn.Sequential(nn.Dense(8, 3), device="cuda", seed=0), precision="TF32", quiet=True)
    assert trainer.precision == "tf32"
    with pytest.raises(nn.ConfigError, match="^precision 'FP16' is not one of"):
        nn.Trainer(nn.Sequential(nn.Dense(8, 3)), precision="FP16")


def test_fp32_on_one_gpu_inside_tf32_on_another_computes_fp32(emulated):
    """CuPy's compute type is one per process: fp32 entered on cuda:1 inside tf32 on cuda:0 (an
    evaluation of another model from a callback) restores the type set outside both, and each exit
    the type its entry found."""
    from cupy._core import _routines_linalg as linalg

    first, second = get_backend("cuda:0"), get_backend("cuda:1")
    outside = linalg.get_compute_type(numpy.float32)
    with first.matmul_precision("tf32"):
        with second.matmul_precision("fp32"):
            assert linalg.get_compute_type(numpy.float32) == outside
        assert linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32
        with second.matmul_precision("bf16"):
            with first.matmul_precision("fp32"):
                assert linalg.get_compute_type(numpy.float32) == outside
    assert linalg.get_compute_type(numpy.float32) == outside
