"""The CUDA backend: CuPy arrays, with the hot elementwise ops in fused kernels.

Each override routes one op to a kernel of ``kernels/`` (see
``cuda_kernels``) and falls back to the generic CuPy version for what the
kernels do not cover (dtypes other than float32/float64, strided arrays;
bfloat16 storage, which only the kernels compute on, is refused instead).
It also captures work into CUDA graphs (``capture``), for the Trainer's step.

Under ``matmul_precision("bf16")`` the Dense and Conv2D layers store their
activations and gradients in bfloat16 (``storage_dtype``), held as uint16
bits (see ``cuda_kernels.BF16``): their GEMMs, and the float32 ones of the
other layers (on the tensor cores, inputs rounded to bfloat16), go to cuBLAS's
``gemmEx`` and their elementwise and pooling work to the kernels' bfloat16
instantiations, which compute in float32; weights, their gradients and the
optimizer stay float32.
"""

import contextlib

import numpy

from ..errors import ShapeError
from . import cuda_kernels
from .base import Allocations, Backend

BF16 = cuda_kernels.BF16


INDEX = (numpy.dtype(numpy.int32),)  # the kernels' index arrays (maxout, max pooling)


def _fused(*arrays, dtypes=cuda_kernels.FLOATS, index=None):
    """True when the kernels take these arrays (of ``dtypes``, C-contiguous) and ``index`` (int32,
    C-contiguous, or None)."""
    return (all(a.dtype in dtypes and a.flags.c_contiguous for a in arrays if a is not None)
            and (index is None or _fused(index, dtypes=INDEX)))


def _fused_storage(*arrays, index=None):
    """``_fused`` for the kernels that also take bfloat16 storage, which only they can compute on."""
    if _fused(*arrays, dtypes=cuda_kernels.STORAGE, index=index):
        return True
    if any(a is not None and a.dtype == BF16 for a in arrays):
        raise ShapeError("bfloat16 storage is computed by the CUDA kernels only, which need C-contiguous arrays "
                         f"of bfloat16 and float32; got {[(a.dtype, a.shape) for a in arrays if a is not None]}")
    return False


def _elementwise(activation):
    """Whether the elementwise kernels compute ``activation`` (all but softmax, which has row kernels)."""
    return activation.code in cuda_kernels.ACT_CODES.values()


_COMPUTE_TYPES = {"tf32": "COMPUTE_TYPE_TF32", "bf16": "COMPUTE_TYPE_BF16"}  # cuBLAS compute types


class CupyBackend(Backend):
    """Ops on one CUDA device through CuPy and the fused kernels."""

    # CuPy's float32 compute type outside every matmul_precision of every device (CuPy has one per process)
    _outside_compute_type = None

    def __init__(self, device_id):
        import cupy

        super().__init__()
        self.xp = cupy
        self.device = cupy.cuda.Device(device_id)
        self.name = f"cuda:{device_id}"
        # cuBLAS's bfloat16 and TF32 GEMMs need compute capability 8.0 (Ampere) or later
        self.bf16_capable = int(self.device.compute_capability) >= 80
        self.bf16_storage = False  # set by matmul_precision("bf16")

    def activate(self):
        return self.device

    def to_host(self, array):
        return self.xp.asnumpy(array)

    def synchronize(self):
        self.device.synchronize()

    def erf(self, x):
        from cupyx.scipy.special import erf

        return erf(x)

    @contextlib.contextmanager
    def matmul_precision(self, precision):
        """cuBLAS's compute type for float32 GEMMs, set for the context: TF32 or bfloat16 inputs on the
        tensor cores (GPUs of compute capability 8.0 or later), float32 accumulation either way; "fp32"
        restores the type set outside every such context (nested in another precision, too). Under
        "bf16" the Dense and Conv2D layers also store bfloat16 (``storage_dtype``), and ``matmul``
        sends the float32 GEMMs to ``gemmEx`` itself (CuPy computes them in float32 whatever its type)."""
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(numpy.float32), self.bf16_storage, CupyBackend._outside_compute_type
        if previous[2] is None:
            CupyBackend._outside_compute_type = previous[0]
        # CuPy warns at every TF32 or BF16 compute type set on a GPU without them, and sets DEFAULT
        tensor_cores = precision != "fp32" and self.bf16_capable
        linalg.set_compute_type(numpy.float32, getattr(linalg, _COMPUTE_TYPES[precision]) if tensor_cores else
                                CupyBackend._outside_compute_type)
        self.bf16_storage = precision == "bf16" and self.bf16_capable
        try:
            yield
        finally:
            linalg.set_compute_type(numpy.float32, previous[0])
            self.bf16_storage, CupyBackend._outside_compute_type = previous[1:]

    def precision_note(self, precision):
        if precision == "fp32" or self.bf16_capable:
            return None
        return (f"precision {precision!r}: {self.name} has compute capability {self.device.compute_capability}, "
                f"and the tensor cores' {'bfloat16' if precision == 'bf16' else 'TensorFloat-32'} GEMMs need 8.0 "
                f"or later, so the steps compute in fp32")

    def storage_dtype(self, dtype, activation):
        if self.bf16_storage and dtype == numpy.float32 and _elementwise(activation):
            return BF16
        return dtype

    def convert(self, x, out):
        if BF16 not in (x.dtype, out.dtype):
            return super().convert(x, out)
        return cuda_kernels.convert(self.xp.ascontiguousarray(x), out)

    def matmul(self, a, b, out, trans_a=False, trans_b=False):
        """Through cuBLAS's ``gemmEx`` where bfloat16 is stored, and under "bf16" for the float32
        products of 2-D C-contiguous arrays too (on the tensor cores, inputs rounded to bfloat16),
        which CuPy's compute types cannot ask for; CuPy's matmul otherwise."""
        if BF16 in (a.dtype, b.dtype, out.dtype) or (self.bf16_storage and a.ndim == b.ndim == 2
                                                     and _fused(a, b, out, dtypes=cuda_kernels.FLOATS[:1])):
            return cuda_kernels.gemm_bf16(a, b, out, trans_a, trans_b)
        return super().matmul(a, b, out, trans_a, trans_b)

    @contextlib.contextmanager
    def recording_allocations(self):
        allocations, pool = Allocations(), self.xp.get_default_memory_pool()

        def malloc(size):
            memory = pool.malloc(size)
            allocations.append((size, memory.ptr))
            return memory

        with self.device, self.xp.cuda.using_allocator(malloc):
            yield allocations

    def capture(self, run, sizes):
        """CUDA stream capture of ``run()`` on a stream of its own. CUDA refuses synchronisation, host
        transfers and memory-pool allocation while it captures, so the memory ``run`` allocates comes
        from an arena of ``sizes`` allocated before the capture, which lives as long as the graph."""
        cupy = self.xp
        with self.device:
            arena = _Arena(cupy, sizes)
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream, cupy.cuda.using_allocator(arena.malloc):
                stream.begin_capture()
                try:
                    outputs = run()
                except BaseException:
                    with contextlib.suppress(Exception):  # leave capture mode; the first error is the one
                        stream.end_capture()
                    raise
                graph = stream.end_capture()
        return _Graph(graph, arena, outputs, self.device)

    def memory_report(self, error, batch_size):
        pool = self.xp.get_default_memory_pool()
        free, total = self.xp.cuda.runtime.memGetInfo()
        return (f"out of GPU memory on {self.name} with batch size {batch_size}: {error}; the memory pool "
                f"holds {pool.total_bytes() / 2**20:,.0f} MiB ({pool.used_bytes() / 2**20:,.0f} MiB in use), "
                f"{free / 2**20:,.0f} of {total / 2**20:,.0f} MiB free on the device; "
                f"try a smaller --batch-size")

    def bias_act(self, z, bias, activation, out):
        if not _elementwise(activation) or not _fused_storage(z, bias, out):
            return super().bias_act(z, bias, activation, out)
        return cuda_kernels.bias_act(z, bias, activation.code, activation.param, out)

    def act_backward(self, dy, y, z, activation, out, bias_grad=None):
        if not _elementwise(activation) or not _fused_storage(dy, y, z, out, bias_grad):
            return super().act_backward(dy, y, z, activation, out, bias_grad)
        return cuda_kernels.act_backward(dy, y, z, activation.code, activation.param, out, bias_grad)

    def softmax(self, z, out):
        if not _fused(z, out):
            return super().softmax(z, out)
        return cuda_kernels.softmax(z, out)

    def softmax_backward(self, dy, y, out):
        if not _fused(dy, y, out):
            return super().softmax_backward(dy, y, out)
        return cuda_kernels.softmax_backward(dy, y, out)

    def softmax_cross_entropy(self, logits, labels, grad):
        if not _fused(logits, grad):
            return super().softmax_cross_entropy(logits, labels, grad)
        return cuda_kernels.softmax_cross_entropy(logits, labels, grad)

    def maxout_forward(self, z3, out, index):
        if not _fused(z3, out, index=index):
            return super().maxout_forward(z3, out, index)
        return cuda_kernels.maxout_forward(z3, out, index)

    def maxout_backward(self, dy, index, out3):
        if not _fused(dy, out3, index=index):
            return super().maxout_backward(dy, index, out3)
        return cuda_kernels.maxout_backward(dy, index, out3)

    def sgd_update(self, param, grad, velocity, lr, momentum, weight_decay, nesterov):
        if not _fused(param, grad, velocity):
            return super().sgd_update(param, grad, velocity, lr, momentum, weight_decay, nesterov)
        return cuda_kernels.sgd_update(param, grad, velocity, lr, momentum, weight_decay, nesterov)

    def adam_update(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        if not _fused(param, grad, m, v):
            return super().adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay,
                                       decoupled, step)
        return cuda_kernels.adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay,
                                        decoupled, step)

    def bias_grad(self, dz, out):
        if dz.ndim != 2 or not _fused(dz, out):
            return super().bias_grad(dz, out)
        cuda_kernels.act_backward(dz, None, None, cuda_kernels.ACT_CODES["linear"], 0.0, dz, out)
        return out

    def im2col(self, x, window, out):
        if not _fused_storage(x, out):
            return super().im2col(x, window, out)
        return cuda_kernels.im2col(x, window, out)

    def col2im(self, columns, window, out):
        if not _fused_storage(columns, out):
            return super().col2im(columns, window, out)
        return cuda_kernels.col2im(columns, window, out)

    def bias_act_to_nchw(self, z, bias, activation, rows, out):
        if not _elementwise(activation) or not _fused_storage(z, bias, rows, out):
            return super().bias_act_to_nchw(z, bias, activation, rows, out)
        return cuda_kernels.bias_act_to_nchw(z, bias, activation.code, activation.param, rows, out)

    def act_backward_from_nchw(self, dy, y, z, activation, out, bias_grad=None):
        if not _elementwise(activation) or not _fused_storage(dy, y, z, out, bias_grad):
            return super().act_backward_from_nchw(dy, y, z, activation, out, bias_grad)
        return cuda_kernels.act_backward_from_nchw(dy, y, z, activation.code, activation.param, out, bias_grad)

    def maxpool_forward(self, x, window, out, index):
        if not _fused_storage(x, out, index=index):
            return super().maxpool_forward(x, window, out, index)
        return cuda_kernels.maxpool_forward(x, window, out, index)

    def maxpool_backward(self, dy, index, window, out):
        if not _fused_storage(dy, out, index=index):
            return super().maxpool_backward(dy, index, window, out)
        return cuda_kernels.maxpool_backward(dy, index, window, out)

    def avgpool_forward(self, x, window, out):
        if not _fused_storage(x, out):
            return super().avgpool_forward(x, window, out)
        return cuda_kernels.avgpool_forward(x, window, out)

    def avgpool_backward(self, dy, window, out):
        if not _fused_storage(dy, out):
            return super().avgpool_backward(dy, window, out)
        return cuda_kernels.avgpool_backward(dy, window, out)

    def batchnorm_stats(self, x3, mean, invstd, eps, running_mean, running_var, momentum):
        if not _fused_storage(x3, mean, invstd, running_mean, running_var):
            return super().batchnorm_stats(x3, mean, invstd, eps, running_mean, running_var, momentum)
        return cuda_kernels.batchnorm_stats(x3, mean, invstd, eps, running_mean, running_var, momentum)

    def batchnorm_apply(self, x3, mean, invstd, gamma, beta, out3):
        if not _fused_storage(x3, mean, invstd, gamma, beta, out3):
            return super().batchnorm_apply(x3, mean, invstd, gamma, beta, out3)
        return cuda_kernels.batchnorm_apply(x3, mean, invstd, gamma, beta, out3)

    def batchnorm_backward(self, dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta, training=True):
        if not _fused_storage(dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta):
            return super().batchnorm_backward(dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta, training)
        return cuda_kernels.batchnorm_backward(dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta, training)


class _Arena:
    """Device memory set aside before a capture and handed out during it: a block of each size
    asked for when the work ran eagerly, in one allocation that the graph keeps."""

    ALIGN = 512

    def __init__(self, cupy, sizes):
        rounded = [-(-size // self.ALIGN) * self.ALIGN for size in sizes]
        self.base = cupy.get_default_memory_pool().malloc(max(sum(rounded), self.ALIGN))
        self.free, offset = {}, 0
        for size, room in zip(sizes, rounded):
            self.free.setdefault(size, []).append(offset)
            offset += room

    def malloc(self, size):
        blocks = self.free.get(size)
        if not blocks:
            raise MemoryError(f"the captured work asked for {size:,} bytes, which it did not ask for when it "
                              f"ran eagerly")
        return self.base + blocks.pop(0)


class _Graph:
    """A captured CUDA graph with what it needs alive: its arena and the arrays it wrote."""

    def __init__(self, graph, arena, outputs, device):
        self.graph, self.arena, self.outputs, self.device = graph, arena, outputs, device

    def replay(self):
        with self.device:
            self.graph.launch()
