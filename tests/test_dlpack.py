"""Arrays of other frameworks (anything with ``__dlpack__``): predict and fit take them on the model's device,
sharing the memory where the device allows (a torch CPU tensor on the CPU); on another device they are
refused naming both."""

import numpy as np
import pytest

import nnaccel as nn

torch = pytest.importorskip("torch")


def model(device="cpu"):
    return nn.Sequential(nn.Dense(6, 8, activation="relu"), nn.Dense(8, 3), device=device, seed=0)


def test_a_torch_cpu_tensor_is_shared_not_copied():
    ops = model().backend
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shared = ops.asarray(tensor)
    assert isinstance(shared, np.ndarray) and np.shares_memory(shared, tensor.numpy())


def test_predict_and_fit_take_torch_tensors():
    x, y = nn.datasets.synthetic(n=64, features=6, classes=3, seed=1)
    reference = model()
    np.testing.assert_array_equal(reference.predict(torch.from_numpy(x)), reference.predict(x))
    a, b = model(), model()
    nn.Trainer(a, batch_size=16, quiet=True).fit(torch.from_numpy(x), torch.from_numpy(y), epochs=2)
    nn.Trainer(b, batch_size=16, quiet=True).fit(x, y, epochs=2)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)


def test_the_calls_that_take_device_arrays_refuse_a_tensor_naming_the_conversion():
    """``model(x)``, ``backward``, a loss and ``train_step`` take the backend's own arrays (as ``prepare`` makes
    them): a tensor on the CPU passed the device check and failed on its torch dtype ("x has dtype torch.float32
    but the model computes in float32", an AttributeError in a loss). A parameter still takes one's values."""
    net, x = model(), np.ones((2, 6), np.float32)
    message = r"is a Tensor, not a numpy array: make it one with model.backend.asarray\(...\) \(an array on cpu"
    for call in (lambda: net(torch.from_numpy(x)), lambda: net.backward(torch.ones(2, 3)),
                 lambda: nn.SoftmaxCrossEntropy().forward(net(x), torch.tensor([0, 1])),
                 lambda: nn.Trainer(net, quiet=True).train_step(torch.from_numpy(x), torch.tensor([0, 1]))):
        with pytest.raises(nn.DeviceError, match=message):
            call()
    np.testing.assert_array_equal(net(net.backend.asarray(torch.from_numpy(x))), net(x))
    net.parameters()[1].data = torch.full((8,), 0.5)
    np.testing.assert_array_equal(net.parameters()[1].data, np.full(8, 0.5, np.float32))


def test_a_tensor_that_cannot_be_shared_is_a_clear_error():
    tensor = torch.zeros(2, 6, requires_grad=True)
    with pytest.raises(nn.DeviceError, match="x: a Tensor on cpu could not be shared through DLPack"):
        model().predict(tensor)
    with pytest.raises(nn.DeviceError, match="x is on a device DLPack has no type for .*meta.* but the model is on cpu"):
        nn.Trainer(model(), quiet=True).fit(torch.zeros(4, 6, device="meta"), np.zeros(4, np.int64))


def test_a_lazily_negated_view_is_refused_not_read_with_its_sign_lost():
    """DLPack carries no negative bit: ``z.conj().imag`` would come in as -imag."""
    z = torch.complex(torch.zeros(2, 6), torch.ones(2, 6))
    view = z.conj().imag
    assert view.is_neg()
    with pytest.raises(nn.DeviceError, match=r"x: a Tensor with its lazy neg bit set cannot be shared through "
                                             r"DLPack without losing it; pass its resolve_neg\(\)"):
        model().predict(view)
    np.testing.assert_array_equal(model().predict(view.resolve_neg()), model().predict(-np.ones((2, 6), np.float32)))


def test_a_host_tensor_goes_to_the_emulated_gpu_and_a_device_mismatch_names_both(emulated):
    x = torch.rand(5, 6)
    on_gpu = model("cuda")
    np.testing.assert_allclose(on_gpu.predict(x), model().predict(x.numpy()), rtol=1e-5, atol=1e-6)

    class CudaTensor:  # what a torch CUDA tensor of GPU 1 answers
        def __dlpack_device__(self):
            return (2, 1)

    with pytest.raises(nn.DeviceError, match="x is on cuda:1 but the model is on cuda:0"):
        on_gpu.predict(CudaTensor())
