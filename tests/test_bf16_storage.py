"""bfloat16 storage (precision="bf16" on a GPU): the Dense layers keep their activations and
gradients in bfloat16 (as uint16 bits: ``cuda_kernels.BF16``) and compute in float32; the
weights, their gradients, the optimizer and the loss stay float32. On the CUDA devices (emulated,
and real where one answers), against PyTorch's bfloat16 conversion and float32 references."""

import math

import numpy
import pytest
import torch

import nnaccel as nn
from nnaccel import activations, datasets
from nnaccel.backend import cuda_kernels, get_backend
from nnaccel.backend.base import Window

BF16 = cuda_kernels.BF16


def _bits(x):
    """float32 ``x`` as bfloat16 bits, converted by PyTorch (to nearest, ties to even)."""
    tensor = torch.from_numpy(numpy.ascontiguousarray(x, numpy.float32)).to(torch.bfloat16)
    return tensor.view(torch.int16).numpy().view(numpy.uint16)


def _widen(bits):
    return (numpy.asarray(bits, numpy.uint16).astype(numpy.uint32) << 16).view(numpy.float32)


def _ulp(values):
    """A bfloat16 ulp at each of ``values`` (7 explicit mantissa bits)."""
    return numpy.ldexp(1.0, numpy.frexp(numpy.abs(values).astype(numpy.float64))[1] - 8)


def _on_device(ops, bits):
    return ops.asarray(numpy.ascontiguousarray(bits, numpy.uint16))


def test_storage_conversions_round_as_pytorch_does(cuda_device):
    ops = get_backend(cuda_device)
    rng = numpy.random.default_rng(0)
    x = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-42, 39, 20_000)).astype(numpy.float32)
    ties = numpy.float32(1) + numpy.arange(16, dtype=numpy.float32) * numpy.float32(2.0 ** -8)
    special = numpy.array([0.0, -0.0, numpy.inf, -numpy.inf, numpy.nan, 3.3961e38, -3.3961e38, 1e-45],
                          numpy.float32)
    x = numpy.concatenate([x, ties, -ties, special]).astype(numpy.float32)
    bits = ops.to_host(ops.convert(ops.asarray(x), ops.empty(x.shape, BF16)))
    assert bits.dtype == numpy.uint16
    number = ~numpy.isnan(x)
    numpy.testing.assert_array_equal(bits[number], _bits(x)[number])
    assert numpy.isnan(_widen(bits[~number])).all()
    back = ops.to_host(ops.convert(ops.asarray(bits), ops.empty(x.shape, numpy.float32)))
    numpy.testing.assert_array_equal(back.view(numpy.uint32), _widen(bits).view(numpy.uint32))  # exact


def _cuda_bits(x):
    """float32 ``x`` as bfloat16 bits as CUDA's ``__float2bfloat16`` converts (cuda_bf16.h): the top
    16 bits, plus one where the 16 dropped are over half, or half with the kept ones odd; every NaN to
    the canonical 0x7fff (CUDART_NAN_BF16)."""
    words = numpy.ascontiguousarray(x, numpy.float32).view(numpy.uint32)
    top, remainder = (words >> 16).astype(numpy.uint32), (words << 16).astype(numpy.uint32)
    up = (remainder > 0x80000000) | ((remainder == 0x80000000) & (top & 1 == 1))
    bits = (top + up).astype(numpy.uint16)
    return numpy.where((words & 0x7FFFFFFF) > 0x7F800000, numpy.uint16(0x7FFF), bits)


def _awkward_floats():
    """NaNs of either sign and any payload, infinities, the largest floats (which round to infinity),
    float32 subnormals and the smallest bfloat16 ones with ties among them, signed zeros."""
    words = numpy.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA0BEEF,
                         0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001,
                         0x80000001, 0x00008000, 0x00018000, 0x00017FFF, 0x00008001, 0x007FFFFF, 0x807FFFFF,
                         0x00800000, 0x00000000, 0x80000000], numpy.uint32)
    return words.view(numpy.float32)


def test_storage_conversions_handle_nan_infinity_and_subnormals_as_cuda_does(cuda_device):
    ops = get_backend(cuda_device)
    x = _awkward_floats()
    bits = ops.to_host(ops.convert(ops.asarray(x), ops.empty(x.shape, BF16)))
    assert [hex(b) for b in bits] == [hex(b) for b in _cuda_bits(x)]
    assert [hex(b) for b in bits[:7]] == ["0x7fff"] * 7 and [hex(b) for b in bits[9:11]] == ["0x7f80", "0xff80"]


def test_the_stand_ins_cublas_converts_as_cuda_does(emulated):
    from cupy._core import _routines_linalg  # the stand-in's, which its gemmEx rounds bfloat16 outputs with

    rng = numpy.random.default_rng(3)
    with numpy.errstate(over="ignore"):  # beyond float32's range: infinities, as meant
        spread = (rng.standard_normal(5_000) * 10.0 ** rng.integers(-42, 39, 5_000)).astype(numpy.float32)
    x = numpy.concatenate([_awkward_floats(), spread])  # in float32: the NaN payloads stay as they are
    numpy.testing.assert_array_equal(_routines_linalg.to_bfloat16_bits(x), _cuda_bits(x))


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("out_dtype", [numpy.float32, BF16], ids=["float32-out", "bf16-out"])
def test_bf16_weighted_sums_accumulate_in_float32(cuda_device, trans_a, trans_b, out_dtype):
    ops = get_backend(cuda_device)
    rng = numpy.random.default_rng(1)
    a = _bits(rng.standard_normal((300, 33) if trans_a else (33, 300)))
    b = _bits(rng.standard_normal((17, 300) if trans_b else (300, 17)))
    out = ops.empty((33, 17), out_dtype)
    ops.matmul(_on_device(ops, a), _on_device(ops, b), out, trans_a=trans_a, trans_b=trans_b)
    wa, wb = _widen(a).astype(numpy.float64), _widen(b).astype(numpy.float64)
    wa, wb = (wa.T if trans_a else wa), (wb.T if trans_b else wb)
    exact, bound = wa @ wb, 300 * 2.0 ** -24 * (numpy.abs(wa) @ numpy.abs(wb))  # float32 accumulation
    got = ops.to_host(out)
    if out_dtype == BF16:
        got, bound = _widen(got), bound + _ulp(exact) / 2  # rounded once, at the end
    assert (numpy.abs(got - exact) <= bound).all()


def test_a_bf16_weighted_sum_refuses_a_float32_operand_by_name(cuda_device):
    ops = get_backend(cuda_device)
    a, b = ops.empty((4, 3), BF16), ops.zeros((3, 2), numpy.float32)
    with pytest.raises(nn.ShapeError, match=r"b has dtype float32; this CUDA kernel takes bfloat16 bits \(uint16\)"):
        ops.matmul(a, b, ops.empty((4, 2), numpy.float32))


@pytest.mark.parametrize("name", sorted(cuda_kernels.ACT_CODES))
def test_bf16_activations_compute_in_float32_and_round_once(cuda_device, name):
    """bias + activation, its derivative and the fused bias gradient on bfloat16 storage, against
    NumPy in float32 on the widened values: within one bfloat16 ulp (float32 math libraries differ
    in the last bits, which can move a rounding by one)."""
    ops, cpu = get_backend(cuda_device), get_backend("cpu")
    activation = activations.get(name)
    rng = numpy.random.default_rng(2)
    rows, cols = 300, 45  # several row chunks for the bias gradient
    z, dy = _bits(rng.standard_normal((rows, cols)) * 3), _bits(rng.standard_normal((rows, cols)))
    bias = rng.standard_normal(cols).astype(numpy.float32)
    z_dev = _on_device(ops, z)
    out = z_dev if activation.uses_output else ops.empty((rows, cols), BF16)
    ops.bias_act(z_dev, ops.asarray(bias), activation, out)
    z_kept = ops.to_host(z_dev)  # z + bias, as the derivative reads it
    summed = _widen(z) + bias
    if not activation.uses_output:  # the bias is added and stored first, then activated
        summed = _widen(_bits(summed))
        assert (numpy.abs(_widen(z_kept) - summed) == 0).all()
    expected = _widen(_bits(activation.forward(cpu, summed, numpy.empty_like(summed))))
    y = ops.to_host(out)
    assert (numpy.abs(_widen(y) - expected) <= _ulp(expected)).all()

    dz, db = ops.empty((rows, cols), BF16), ops.empty(cols, numpy.float32)
    ops.act_backward(_on_device(ops, dy), out, z_dev, activation, dz, bias_grad=db)
    grad = activation.backward(cpu, _widen(dy), _widen(y), _widen(z_kept), numpy.empty((rows, cols), numpy.float32))
    expected = _widen(_bits(grad))
    dz = _widen(ops.to_host(dz))
    assert (numpy.abs(dz - expected) <= _ulp(expected)).all()
    sums, magnitude = dz.astype(numpy.float64).sum(axis=0), numpy.abs(dz).astype(numpy.float64).sum(axis=0)
    assert (numpy.abs(ops.to_host(db) - sums) <= rows * 2.0 ** -24 * magnitude).all()  # float32 sums of dz


def _as_bf16(ops, host):
    return _on_device(ops, _bits(host))


def _rounded(ops, array):
    """A float32 device result as the bfloat16 it rounds to, widened (host)."""
    return _widen(_bits(ops.to_host(array)))


@pytest.mark.parametrize("window", [Window(3, 3, 1, 1, 1, 1), Window(2, 3, 2, 1, 0, 1)], ids=["3x3-pad", "2x3-stride"])
def test_bf16_convolution_and_pooling_kernels_round_the_float32_kernels_once(cuda_device, window):
    """The bfloat16 kernels compute in float32 what the float32 kernels compute on the widened
    values, in the same order, and round once: equal to the float32 kernels' results rounded."""
    ops = get_backend(cuda_device)
    rng = numpy.random.default_rng(4)
    images = _widen(_bits(rng.standard_normal((3, 2, 7, 6))))
    n, c, h, w = images.shape
    oh, ow = window.output_size(h, w)
    depth, positions = c * window.kh * window.kw, n * oh * ow
    x16, x32 = _as_bf16(ops, images), ops.asarray(images)

    cols16 = ops.im2col(x16, window, ops.empty((depth, positions), BF16))
    cols32 = ops.im2col(x32, window, ops.empty((depth, positions), numpy.float32))
    numpy.testing.assert_array_equal(_widen(ops.to_host(cols16)), ops.to_host(cols32))  # a copy: exact
    columns = _widen(_bits(rng.standard_normal((depth, positions))))
    dx16 = ops.col2im(_as_bf16(ops, columns), window, ops.empty(images.shape, BF16))
    dx32 = ops.col2im(ops.asarray(columns), window, ops.empty(images.shape, numpy.float32))
    numpy.testing.assert_array_equal(_widen(ops.to_host(dx16)), _rounded(ops, dx32))

    pooled = (n, c, oh, ow)
    index16, index32 = ops.empty(pooled, numpy.int32), ops.empty(pooled, numpy.int32)
    max16 = ops.maxpool_forward(x16, window, ops.empty(pooled, BF16), index16)
    max32 = ops.maxpool_forward(x32, window, ops.empty(pooled, numpy.float32), index32)
    numpy.testing.assert_array_equal(_widen(ops.to_host(max16)), ops.to_host(max32))  # a maximum: exact
    numpy.testing.assert_array_equal(ops.to_host(index16), ops.to_host(index32))
    grads = _widen(_bits(rng.standard_normal(pooled)))
    back16 = ops.maxpool_backward(_as_bf16(ops, grads), index16, window, ops.empty(images.shape, BF16))
    back32 = ops.maxpool_backward(ops.asarray(grads), index32, window, ops.empty(images.shape, numpy.float32))
    numpy.testing.assert_array_equal(_widen(ops.to_host(back16)), _rounded(ops, back32))
    mean16 = ops.avgpool_forward(x16, window, ops.empty(pooled, BF16))
    mean32 = ops.avgpool_forward(x32, window, ops.empty(pooled, numpy.float32))
    numpy.testing.assert_array_equal(_widen(ops.to_host(mean16)), _rounded(ops, mean32))
    back16 = ops.avgpool_backward(_as_bf16(ops, grads), window, ops.empty(images.shape, BF16))
    back32 = ops.avgpool_backward(ops.asarray(grads), window, ops.empty(images.shape, numpy.float32))
    numpy.testing.assert_array_equal(_widen(ops.to_host(back16)), _rounded(ops, back32))


@pytest.mark.parametrize("shape", [(5, 3, 7), (64, 3, 400)], ids=["one chunk", "chunks"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_bf16_batchnorm_kernels_round_the_float32_kernels_once(cuda_device, training, shape):
    """Statistics and parameter gradients in float32 from the widened values (equal to the float32
    kernels', in one block per channel or in chunks of images merged in order), the normalised values
    and the input gradient rounded once."""
    ops = get_backend(cuda_device)
    rng = numpy.random.default_rng(6)
    x, dy = (_widen(_bits(rng.standard_normal(shape) * 2 + 1)) for _ in range(2))
    gamma, beta = (rng.standard_normal(3).astype(numpy.float32) for _ in range(2))
    results = []
    for dtype, on_device in ((BF16, lambda a: _as_bf16(ops, a)), (numpy.float32, ops.asarray)):
        mean, invstd, running_mean, running_var, dgamma, dbeta = (ops.zeros(3, numpy.float32) for _ in range(6))
        running_var.fill(1.0)
        x_dev = on_device(x)
        ops.batchnorm_stats(x_dev, mean, invstd, 1e-5, running_mean, running_var, 0.1)
        y = ops.batchnorm_apply(x_dev, mean, invstd, ops.asarray(gamma), ops.asarray(beta), ops.empty(x.shape, dtype))
        dx = ops.batchnorm_backward(on_device(dy), x_dev, mean, invstd, ops.asarray(gamma), ops.empty(x.shape, dtype),
                                    dgamma, dbeta, training)
        results.append([ops.to_host(a) for a in (mean, invstd, running_mean, running_var, dgamma, dbeta, y, dx)])
    (*stats16, y16, dx16), (*stats32, y32, dx32) = results
    for mine, theirs in zip(stats16, stats32):
        numpy.testing.assert_array_equal(mine, theirs)
    numpy.testing.assert_array_equal(_widen(y16), _widen(_bits(y32)))
    numpy.testing.assert_array_equal(_widen(dx16), _widen(_bits(dx32)))


@pytest.mark.parametrize("name", ["relu", "gelu"])  # the derivative from the output, and from z
def test_bf16_convolution_bias_and_activation_round_the_float32_kernels_once(cuda_device, name):
    """A convolution's bias and activation on bfloat16 storage round as Dense's do: an activation that
    overwrites z rounds once; one whose derivative reads z applies itself to the z + bias that z keeps."""
    ops = get_backend(cuda_device)
    activation = activations.get(name)
    rng = numpy.random.default_rng(5)
    n, c, spatial = 3, 4, (5, 2)
    l = math.prod(spatial)
    z = _widen(_bits(rng.standard_normal((c, n * l)) * 2))
    bias = rng.standard_normal(c).astype(numpy.float32)
    dy = _widen(_bits(rng.standard_normal((n, c, *spatial))))

    def forward(dtype, on_device, z, bias):
        z_dev = on_device(z)
        rows = z_dev if activation.uses_output else ops.empty(z.shape, dtype)
        y = ops.bias_act_to_nchw(z_dev, ops.asarray(bias), activation, rows, ops.empty((n, c, *spatial), dtype))
        return z_dev, rows, y

    saved16 = forward(BF16, lambda a: _as_bf16(ops, a), z, bias)
    if activation.uses_output:  # z becomes the output: rounded once, from the float32 kernel's
        expected = [_rounded(ops, a) for a in forward(numpy.float32, ops.asarray, z, bias)]
    else:  # as Dense's bias_act: z keeps z + bias in bfloat16, and the activation is applied to what z keeps
        kept = _rounded(ops, ops.asarray(z + bias[:, None]))
        expected = [kept] + [_rounded(ops, a) for a in forward(numpy.float32, ops.asarray, kept,
                                                                numpy.zeros(c, numpy.float32))[1:]]
    for mine, theirs in zip(saved16, expected):  # z + bias, act, NCHW
        numpy.testing.assert_array_equal(_widen(ops.to_host(mine)), theirs)
    z16, rows16, _ = saved16
    db = ops.empty(c, numpy.float32)
    dz16 = ops.act_backward_from_nchw(_as_bf16(ops, dy), rows16, z16, activation, ops.empty(z.shape, BF16),
                                      bias_grad=db)
    widened = [ops.asarray(_widen(ops.to_host(a))) for a in (rows16, z16)]
    dz32 = ops.act_backward_from_nchw(ops.asarray(dy), *widened, activation, ops.empty(z.shape, numpy.float32))
    numpy.testing.assert_array_equal(_widen(ops.to_host(dz16)), _rounded(ops, dz32))
    dz = _widen(ops.to_host(dz16)).astype(numpy.float64)
    assert (numpy.abs(ops.to_host(db) - dz.sum(axis=1)) <= n * l * 2.0 ** -24 * numpy.abs(dz).sum(axis=1)).all()


def _mixed_model(device):
    """The layers that store bfloat16 (Conv2D, BatchNorm, the poolings, Flatten, Dense) around one
    that computes in float32 (Dropout), and a Dense softmax, which has no bfloat16 kernel; the BatchNorm applies a ReLU of its own."""
    return nn.Sequential(nn.Conv2D(1, 4, 3, padding=1, activation="tanh"), nn.BatchNorm(4, activation="relu"),
                         nn.MaxPool2D(2),
                         nn.Conv2D(4, 4, 3, padding=1, activation="silu"), nn.AvgPool2D(2), nn.Flatten(),
                         nn.Dense(16, 32, activation="gelu"), nn.Dropout(0.2), nn.Dense(32, 16, activation="sigmoid"),
                         nn.Dense(16, 10), nn.Dense(10, 5, activation="softmax"), input_shape=(1, 8, 8), seed=4,
                         device=device)


def _one_step(device, precision):
    x, y = datasets.synthetic(n=64, features=64, classes=5, seed=3)
    model = _mixed_model(device)
    trainer = nn.Trainer(model, loss="mse", optimizer=nn.SGD(lr=0.01), batch_size=64, quiet=True,
                         precision=precision)
    loss, _ = trainer.train_step(*trainer.prepare(x, y))
    return model, loss


def test_under_bf16_the_layers_with_kernels_store_bfloat16_and_the_rest_stays_float32(cuda_device):
    model, loss = _one_step(cuda_device, "bf16")
    conv, batchnorm, maxpool, conv2, avgpool, _, gelu, dropout, sigmoid, linear, softmax = model.layers
    for layer in (conv, conv2, gelu, sigmoid, linear):
        assert {"weight", "z", "dz"} <= set(layer._work)
    for layer in (conv, batchnorm, maxpool, conv2, avgpool, gelu, sigmoid, linear):
        kept = {name: buf.dtype for name, buf in layer._work.items() if name not in ("index", "mean", "invstd")}
        assert kept == dict.fromkeys(kept, BF16), type(layer).__name__
    assert batchnorm._work["mean"].dtype == batchnorm._work["invstd"].dtype == numpy.float32
    # converted: the images, and Dropout's output for the Dense after it; the rest come in bfloat16
    assert {"x"} <= {*conv._work} & {*sigmoid._work} and not {"x"} & {*conv2._work, *gelu._work, *linear._work}
    for layer in (dropout, softmax):  # they compute in float32; the model converts for them
        assert all(buf.dtype == numpy.float32 for buf in layer._work.values()), type(layer).__name__
    assert "input" in dropout._work and "output_grad" in dropout._work
    assert model.flat_params.dtype == model.flat_grads.dtype == numpy.float32
    assert loss.dtype == numpy.float32 and numpy.isfinite(float(loss))
    with model.backend.matmul_precision("bf16"):
        assert model.forward(model.backend.zeros((2, 64))).dtype == numpy.float32


def test_a_batchnorm_whose_activation_has_no_bf16_kernel_normalises_in_float32(cuda_device):
    """A softmax after a BatchNorm of bfloat16 features: the BatchNorm converts them, and computes what
    the float32 run computes, to bfloat16 accuracy (the features were rounded)."""
    x, y = datasets.synthetic(n=16, features=12, classes=3, seed=3)

    def step(precision):
        model = nn.Sequential(nn.Dense(12, 6), nn.BatchNorm(6, activation="softmax"), nn.Dense(6, 3), seed=4,
                              device=cuda_device)
        trainer = nn.Trainer(model, batch_size=16, quiet=True, precision=precision)
        loss, _ = trainer.train_step(*trainer.prepare(x, y))
        return model, float(loss)

    model, loss = step("bf16")
    dense, batchnorm = model.layers[:2]
    assert dense._work["z"].dtype == BF16
    assert {name: buf.dtype for name, buf in batchnorm._work.items()} == dict.fromkeys(batchnorm._work, numpy.float32)
    assert "x" in batchnorm._work  # the bfloat16 features, converted
    exact, exact_loss = step("fp32")
    numpy.testing.assert_allclose(loss, exact_loss, rtol=2e-2)
    rounded, grads = (m.backend.to_host(m.flat_grads) for m in (model, exact))
    assert numpy.linalg.norm(rounded - grads) < 0.03 * numpy.linalg.norm(grads)  # as the mixed model's below


def test_bf16_gradients_are_the_float32_gradients_to_bfloat16_accuracy(cuda_device):
    fp32, _ = _one_step(cuda_device, "fp32")
    bf16, _ = _one_step(cuda_device, "bf16")
    exact, rounded = fp32.backend.to_host(fp32.flat_grads), bf16.backend.to_host(bf16.flat_grads)
    error = numpy.linalg.norm(rounded - exact) / numpy.linalg.norm(exact)
    assert 0 < error < 0.03  # several bfloat16 roundings (2**-9 each) on the way; a wrong GEMM is ~1
    for mine, theirs in zip(bf16.parameters(), fp32.parameters()):
        a, b = bf16.backend.to_host(mine.grad), fp32.backend.to_host(theirs.grad)
        cosine = float(a.ravel() @ b.ravel()) / (numpy.linalg.norm(a) * numpy.linalg.norm(b))
        assert cosine > 0.998, mine.name


def test_a_precision_nested_in_another_holds_inside_it(cuda_device):
    from cupy._core import _routines_linalg as linalg

    ops, linear = get_backend(cuda_device), activations.get(None)
    outside = linalg.get_compute_type(numpy.float32)
    with ops.matmul_precision("bf16"):
        assert ops.storage_dtype(numpy.dtype(numpy.float32), linear) == BF16
        with ops.matmul_precision("fp32"):
            assert ops.storage_dtype(numpy.dtype(numpy.float32), linear) == numpy.float32
            assert linalg.get_compute_type(numpy.float32) == outside
        assert ops.storage_dtype(numpy.dtype(numpy.float32), linear) == BF16
        assert linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_BF16
    assert ops.storage_dtype(numpy.dtype(numpy.float32), linear) == numpy.float32
    assert linalg.get_compute_type(numpy.float32) == outside


@pytest.mark.parametrize("precision, kind", [("bf16", "bfloat16"), ("tf32", "TensorFloat-32")])
def test_a_gpu_older_than_ampere_computes_fp32_and_says_why(emulated, monkeypatch, precision, kind):
    """As CuPy there (which warns at each TF32 or BF16 compute type set and uses DEFAULT): one note
    when the Trainer is made, no warning at each step, float32 stored and computed."""
    import warnings

    import cupy
    from cupy._core import _routines_linalg as linalg

    from nnaccel.backend.cupy_backend import CupyBackend

    assert get_backend(emulated).precision_note(precision) is None  # the emulated device is an 8.0
    monkeypatch.setattr(cupy.cuda.Device, "compute_capability", property(lambda self: "75"))
    ops = CupyBackend(0)
    assert ops.precision_note(precision) == (f"precision '{precision}': cuda:0 has compute capability 75, and the "
                                             f"tensor cores' {kind} GEMMs need 8.0 or later, so the steps compute "
                                             f"in fp32")
    outside = linalg.get_compute_type(numpy.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ops.matmul_precision(precision):
            assert ops.storage_dtype(numpy.dtype(numpy.float32), activations.get("relu")) == numpy.float32
            assert linalg.get_compute_type(numpy.float32) == outside


def test_strided_inputs_are_converted_to_bf16_storage(cuda_device):
    ops = get_backend(cuda_device)
    wide = numpy.random.default_rng(7).standard_normal((6, 10)).astype(numpy.float32)
    strided = ops.asarray(wide)[:, ::2]
    bits = ops.to_host(ops.convert(strided, ops.empty(strided.shape, BF16)))
    numpy.testing.assert_array_equal(bits, _bits(wide[:, ::2]))
