"""The CPU backend: NumPy, with BLAS doing the weighted sums."""

import ctypes
import functools
import platform

import numpy

from .. import special
from .base import Backend, memory_order
from .blas import numpy_blas


LONG_REDUCTION = 8  # inner size, in multiples of the product's larger side, from which ``matmul`` turns it
TURN_FROM = 1 << 16  # multiply-adds below which turning a product costs more than it saves
SMALL_GEMM = 1 << 20  # multiply-adds up to which OpenBLAS runs a product by its small-matrix kernel
WIDE_PRODUCT_BYTES = 8 << 20  # of ``b``, up to which a product of a small ``a`` runs chunk by chunk
CHUNK_FROM = 2048  # the size of a chunk below which a long reduction or a wide product runs whole
RELU_ZEROS_FROM = 1 << 16  # bytes from which ReLU's maximum takes an array of zeros, not the scalar
UPDATE_BLOCK_BYTES = 1 << 19  # of each buffer an optimizer step updates at a time: its passes then read the caches
BLAS_UPDATE_FROM = 1 << 18  # bytes of parameters from which an optimizer's passes go to BLAS's threads


def _small_chunk(size, length):
    """How much of a product's ``length`` (its inner size or its columns) to take at a time, each chunk
    ``size`` multiply-adds per unit of it: the largest power of two that fits OpenBLAS's small-matrix
    kernel (``SMALL_GEMM``), or None where that is under ``CHUNK_FROM`` or ``length`` under two fits."""
    fits = SMALL_GEMM // size
    return 1 << fits.bit_length() - 1 if CHUNK_FROM <= fits <= length // 2 else None


class NumpyBackend(Backend):
    """Generic ops on NumPy arrays; overrides only what NumPy lacks or runs faster another way.

    ``erf`` (for GELU) comes from ``nnaccel.special``, so no SciPy is needed.
    The optimizers' ``axpy``/``axpby`` passes call NumPy's own OpenBLAS
    (``blas.numpy_blas``), not SciPy's: SciPy's has a thread pool of its own,
    and the two pools spinning against each other made a step up to 20 times
    slower when that was tried.
    """

    xp = numpy
    name = "cpu"
    batch_last = True
    # A pass over fresh memory costs more than many smaller ones: the default recipe's first evaluation
    # of 1,599 samples took 0.54-0.78 s at batch 1024 (its first convolution's columns 80 MB), 0.10-0.24 s
    # at 213 (16 MiB), warm passes 70-100 ms either way (2-core AMD EPYC). The MLPs' arrays stay far below.
    inference_bytes = 16 << 20

    def erf(self, x):
        return special.erf(x)

    def matmul(self, a, b, out, trans_a=False, trans_b=False):
        # OpenBLAS runs a long reduction ``a @ b.T`` up to twice as fast with the longer side of the
        # product as its rows (measured 1.4-1.9x for convolutions' weight gradients, whose filters are
        # fewer than their inputs' C*kh*kw): such a product is computed transposed and copied back.
        if trans_b and not trans_a and a.ndim == b.ndim == 2 and out.shape[0] < out.shape[1] \
                and a.shape[1] >= LONG_REDUCTION * out.shape[1] and out.size * a.shape[1] >= TURN_FROM:
            transposed = self._work(out.shape[::-1], out.dtype, "matmul_transposed")
            self._long_product(b, a.T, transposed)
            out[...] = transposed.T
            return out
        if not (trans_a or trans_b) and a.ndim == b.ndim == 2 and b.nbytes <= WIDE_PRODUCT_BYTES:
            chunk = _small_chunk(a.size, out.shape[1])
            if chunk:
                return self._wide_product(a, b, out, chunk)
        return super().matmul(a, b, out, trans_a, trans_b)

    def _long_product(self, a, b, out):
        """``out = a @ b`` (2-D), a product of few outputs over a long inner size summed chunk by chunk, each
        small enough for OpenBLAS's small-matrix kernel (no packing of the operands; LeNet-5's first
        weight gradient, 25x6 over 50,176 positions at batch 64: 0.28 against 0.72 ms in one product,
        EPYC); the chunks in order, so the sum is deterministic. A product that chunks of ``CHUNK_FROM``
        would not fit runs whole."""
        chunk, inner = _small_chunk(out.size, a.shape[1]), a.shape[1]
        if not chunk:
            return numpy.matmul(a, b, out=out)
        part = self._work(out.shape, out.dtype, "matmul_chunk")
        numpy.matmul(a[:, :chunk], b[:chunk], out=out)
        for start in range(chunk, inner, chunk):
            out += numpy.matmul(a[:, start:start + chunk], b[start:start + chunk], out=part)
        return out

    @staticmethod
    def _wide_product(a, b, out, chunk):
        """``out = a @ b`` (2-D), few rows by a small ``a`` over many columns, ``chunk`` columns at a time,
        each product small enough for OpenBLAS's small-matrix kernel: a convolution's forward with few
        filters over few inputs (LeNet-5's first, 6x25 by 25x50,176 at batch 64: 0.50 against 0.77 ms a
        training step, EPYC). On one core, so only while ``b`` is small (``WIDE_PRODUCT_BYTES``): at
        batch 213 (17 MB of columns) chunks took 2.3-3.6 ms, the product on two threads 1.4-1.9.
        No output's sum is split between chunks."""
        for start in range(0, out.shape[1], chunk):
            numpy.matmul(a, b[:, start:start + chunk], out=out[:, start:start + chunk])
        return out

    def take_rows(self, x, index, out):
        # "clip" (the indices are a permutation's) writes straight into ``out``; "raise" writes a copy first.
        # The method skips ``numpy.take``'s Python wrapper: 0.5 us of 3 for a batch of 32 MNIST rows.
        return x.take(index, axis=0, out=out, mode="clip")

    def relu(self, z, out):
        # NumPy's SIMD maximum takes two arrays; against the scalar 0 it runs another loop, 2.5-3x slower
        # (0.13-0.15 against 0.04-0.05 ms over 1.2 MB of float32, EPYC, NumPy 2.4): from 64 KiB the zeros
        # come as an array laid out like ``z``, a view of one kept zero vector (below that size, making the
        # view costs more than it saves).
        if z.nbytes < RELU_ZEROS_FROM:
            return super().relu(z, out)
        zeros = self._scratch_arrays.get(("relu_zeros", z.dtype))
        if zeros is None or zeros.size < z.size:
            zeros = self._scratch_arrays[("relu_zeros", z.dtype)] = numpy.zeros(z.size, z.dtype)
        order = memory_order(z)
        memory = zeros[:z.size].reshape([z.shape[axis] for axis in order])
        return numpy.maximum(z, memory.transpose(numpy.argsort(order)), out=out)

    # Images pass between layers batch-last (``image_array``): BatchNorm's (N, C, L) views of them then hold
    # each channel's values together, as (L, N) rows; its sums and per-channel terms run along those.
    @staticmethod
    def _batch_last(x3):
        return x3.strides[0] < x3.strides[2]

    def _channel_sums(self, x3, out):
        if not self._batch_last(x3):
            return super()._channel_sums(x3, out)
        return x3.transpose(1, 2, 0).reshape(x3.shape[1], -1).sum(axis=1, dtype=out.dtype, out=out)

    def _by_channel(self, values, x3):
        return values[None, :, None] if self._batch_last(x3) else super()._by_channel(values, x3)

    def _scratch(self, like, slot):
        return super()._scratch(like, slot) if like.flags.c_contiguous else self._like(like, slot)

    def _like(self, like, slot):
        """The work array ``slot`` laid out like ``like``, its axes in the same order in memory: NumPy's
        passes over arrays laid out otherwise are transposing copies."""
        key = (slot, like.shape, like.dtype, memory_order(like))
        work = self._scratch_arrays.get(key)
        if work is None:
            work = self._scratch_arrays[key] = numpy.empty_like(like)
        return work

    def sgd_update(self, param, grad, velocity, lr, momentum, weight_decay, nesterov):
        return self._in_blocks(super().sgd_update, (param, grad, velocity), lr, momentum, weight_decay, nesterov)

    def adam_update(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        return self._in_blocks(super().adam_update, (param, grad, m, v), lr, beta1, beta2, eps, weight_decay,
                               decoupled, step)

    # The two passes of an SGD step with momentum (and Adam's moment and last passes) go to NumPy's own
    # OpenBLAS, one threaded pass each, where it is found (NumPy's wheels bundle it) and the parameters
    # fill 256 KiB; elsewhere NumPy's. Measured on the Xeon, 2 threads, against NumPy's passes (the last
    # one then written back by a copy, which spared its stores the wait on lines another BLAS thread had
    # read): 784-128-64-10's step at batch 64 484-495 against 541-548 us, 784-1024-1024-10's fit at
    # batch 256 7-8% faster; but 784-16-16-10's (51 KB) at batch 32 15% slower, waking BLAS's threads for
    # so little. OpenBLAS fuses the multiply-add, so the numbers differ from NumPy's by a rounding.
    def _blend(self, average, keep, value, scale, work):
        blas = numpy_blas()
        if blas is None or average.nbytes < BLAS_UPDATE_FROM or not blas.takes(average, value):
            return super()._blend(average, keep, value, scale, work)
        return blas.axpby(scale, value, keep, average)

    def _descend(self, param, step, scale, work):
        blas = numpy_blas()
        if blas is None or param.nbytes < BLAS_UPDATE_FROM or not blas.takes(param, step):
            return super()._descend(param, step, scale, work)
        return blas.axpy(-scale, step, param)

    @staticmethod
    def _in_blocks(update, buffers, *options):
        """``update`` over 512 KiB of each flat buffer (None stays None) at a time: the same numbers, but
        a block's passes read the caches instead of memory. Measured on the EPYC (1 MiB L2, 32 MiB L3)
        with 1 MiB blocks, the update alone: SGD with momentum 1.5x, Adam 1.7x over 5.8M float32
        parameters (1.1x and 1.35x over 1.9M, which fit the L3 unblocked); a wide net's whole step with
        Adam 1.11-1.16x. On the Xeon (2 MiB L2), where the 4-6 buffers of a 1 MiB block overflowed the L2,
        512 KiB blocks took whole fits of the wide nets 1.3-5.6% (Adam) and 0.6-2.2% (SGD) below 1 MiB
        blocks, and left 784-128-64-10's (one block) as they were."""
        param = buffers[0]
        block = UPDATE_BLOCK_BYTES // param.itemsize
        if param.size <= block:
            return update(*buffers, *options)
        for start in range(0, param.size, block):
            part = slice(start, start + block)
            update(*(buffer if buffer is None else buffer[part] for buffer in buffers), *options)
        return param

    def flushing_subnormals(self):
        return _SubnormalFlush() if _libm() is not None else super().flushing_subnormals()

    def precision_note(self, precision):
        if precision == "fp32":
            return None
        return (f"precision {precision!r} is a GPU feature (tensor-core weighted sums); on the CPU the steps "
                f"compute in fp32")


class _FloatEnvironment(ctypes.Structure):
    """glibc's and musl's x86-64 ``fenv_t``: the 28-byte x87 environment, then the SSE control word."""

    _fields_ = [("x87", ctypes.c_ubyte * 28), ("mxcsr", ctypes.c_uint32)]


MXCSR_FLUSH = 0x8040  # FTZ (bit 15: subnormal results become 0) and DAZ (bit 6: subnormal inputs read as 0)


@functools.cache
def _libm():
    """The C maths library, whose ``fegetenv``/``fesetenv`` reach the MXCSR, on x86-64 Linux; else None."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        libm = ctypes.CDLL("libm.so.6")
    except OSError:  # musl names it otherwise; its libc holds the same functions
        try:
            libm = ctypes.CDLL(None)
            libm.fegetenv  # noqa: B018 (an AttributeError where it is missing)
        except (OSError, AttributeError):
            return None
    return libm  # both take a fenv_t* and return an int: ctypes' defaults, and faster unchecked


class _SubnormalFlush:
    """Sets FTZ and DAZ in this thread's MXCSR for the ``with`` block, then restores what was there,
    so code outside it keeps IEEE subnormals (TensorFlow flushes in its compute threads likewise;
    PyTorch leaves it to ``torch.set_flush_denormal``). About 3 microseconds a block. (A
    KeyboardInterrupt landing in ``__enter__`` after its ``fesetenv``, a few bytecodes, would leave
    this thread flushing: ``with`` runs no ``__exit__`` for an ``__enter__`` that raised.)"""

    __slots__ = ("saved",)

    def __enter__(self):
        libm, self.saved = _libm(), _FloatEnvironment()
        if libm.fegetenv(ctypes.byref(self.saved)) != 0 or self.saved.mxcsr & MXCSR_FLUSH == MXCSR_FLUSH:
            self.saved = None  # nothing to change, or nothing known to restore
            return self
        flushing = _FloatEnvironment.from_buffer_copy(self.saved)
        flushing.mxcsr |= MXCSR_FLUSH
        libm.fesetenv(ctypes.byref(flushing))
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            _libm().fesetenv(ctypes.byref(self.saved))
        return False
