"""The base backend: every op written once against an array module ``xp``.

Subclasses bind ``xp`` (NumPy or CuPy) and override only the ops they do
faster; an override keeps the base signature (a test checks it). Ops write
into preallocated outputs (``out=``) so a training step allocates little.
"""

import contextlib
import math
from typing import NamedTuple

import numpy

from ..errors import DeviceError


DLPACK_DEVICES = {1: "cpu", 2: "cuda"}  # DLPack's device types: kDLCPU, kDLCUDA
PRECISIONS = ("fp32", "tf32", "bf16")  # how float32 weighted sums may compute (Backend.matmul_precision)


def array_device(array):
    """``"cpu"`` for a NumPy array, ``"cuda:N"`` for a CuPy one, the device of any other array that
    speaks DLPack (a torch tensor), None otherwise."""
    if isinstance(array, numpy.ndarray):
        return "cpu"
    if type(array).__module__.startswith("cupy"):
        return f"cuda:{array.device.id}"
    if hasattr(array, "__dlpack_device__") and not isinstance(array, numpy.generic):
        try:
            kind, index = array.__dlpack_device__()
        except (BufferError, RuntimeError, TypeError, ValueError) as error:  # a torch tensor on "meta"
            return f"a device DLPack has no type for ({error})"
        name = DLPACK_DEVICES.get(int(kind), f"DLPack device type {int(kind)}")
        return f"cuda:{int(index)}" if name == "cuda" else name
    return None


def _mix32(x, xp):
    """Wellons' lowbias32 integer hash over a uint32 array (in place)."""
    x ^= x >> 16
    x *= xp.uint32(0x7FEB352D)
    x ^= x >> 15
    x *= xp.uint32(0x846CA68B)
    x ^= x >> 16
    return x


class Window(NamedTuple):
    """A sliding window over (height, width): its size, step and zero padding (convolution, pooling)."""

    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int

    def output_size(self, height, width):
        """(out height, out width) of the window positions that fit, as PyTorch counts them (no ceil mode)."""
        return ((height + 2 * self.ph - self.kh) // self.sh + 1, (width + 2 * self.pw - self.kw) // self.sw + 1)

    def padded_size(self, height, width):
        """(height, width) of an input inside its border of padding."""
        return height + 2 * self.ph, width + 2 * self.pw

    def inside(self, height, width):
        """The index of a (..., height, width) input within its padded array."""
        return ..., slice(self.ph, self.ph + height), slice(self.pw, self.pw + width)

    def corners(self, xp, out_height, out_width, width):
        """(rows, cols, corner): the first input row and column of each window position (below 0 in the
        padding), and ``corner`` (OH, OW) its place ``row * width + col`` in the input plane, all int32."""
        rows = xp.arange(out_height, dtype=numpy.int32) * self.sh - self.ph
        cols = xp.arange(out_width, dtype=numpy.int32) * self.sw - self.pw
        return rows, cols, rows[:, None] * width + cols[None, :]


def _windows(array, window, out_height, out_width):
    """The (i, j) offset's view of every window position: ``[(i, j, view (N, C, OH, OW))]`` over ``array``
    (already padded)."""
    return [(i, j, array[:, :, i:i + window.sh * (out_height - 1) + 1:window.sh,
                         j:j + window.sw * (out_width - 1) + 1:window.sw])
            for i in range(window.kh) for j in range(window.kw)]


IMAGE_BATCHES_KEPT = 4  # a training batch, its short last one, an evaluation's batch and its last


def memory_order(array):
    """``array``'s axes from the outermost in memory: ``array.transpose(memory_order(array))`` is
    contiguous where ``array`` is a dense array in any axis order."""
    return tuple(int(axis) for axis in numpy.argsort(array.strides, kind="stable")[::-1])


def _kept_batch_size(store, key, batch):
    """``(key, batch)``, the key of a batch-last image work array in ``store``; a new one drops the least
    recently made of that ``key`` beyond ``IMAGE_BATCHES_KEPT``, so that calls at ever new batch sizes
    (predictions one sample at a time, then two, ...) hold a bounded amount of memory."""
    sized = (key, batch)
    if sized not in store:
        others = [other for other in store if isinstance(other, tuple) and other[0] == key]
        for other in others[:max(0, len(others) - IMAGE_BATCHES_KEPT + 1)]:
            del store[other]
    return sized


class Allocations(list):
    """The device allocations made while recording, as ``(size, address)`` in their order."""

    def temporary_sizes(self, lasting):
        """The sizes of those the work let go: less, for each array of ``lasting`` (work arrays, snapshots:
        what outlives the recording), the last allocation at its address, which still holds it."""
        addresses = {getattr(array.data, "ptr", None) for array in lasting if array is not None and array.size}
        addresses.discard(None)  # host arrays (state restored from a checkpoint, not yet moved): not allocations
        kept = set()
        for index in range(len(self) - 1, -1, -1):
            address = self[index][1]
            if address in addresses:
                kept.add(index)
                addresses.discard(address)
        return [size for index, (size, _) in enumerate(self) if index not in kept]


INFERENCE_BATCH = 1024  # the batch of predict and evaluate unless told: few, large passes


class Backend:
    """Generic ops over ``self.xp``; one instance per device."""

    xp = None
    name = ""
    batch_last = False  # the order of a convolution's positions in its columns: see ``by_image``
    inference_bytes = None  # the most a pass of predict or evaluate may give one work array: no bound

    def __init__(self):
        self._scratch_arrays = {}

    def inference_batch(self, sample_bytes, at_least=1):
        """The batch that predict and evaluate use unless told: ``INFERENCE_BATCH`` samples, fewer where
        ``inference_bytes`` bounds the largest work array of a pass (``sample_bytes`` for one sample), but
        at least ``at_least`` (the training batch, whose work arrays are there already)."""
        batch = INFERENCE_BATCH
        if self.inference_bytes is not None:
            batch = min(batch, max(1, self.inference_bytes // sample_bytes))
        return max(batch, at_least)

    # ----- arrays and transfers -------------------------------------------------
    def asarray(self, array, dtype=None, what="array"):
        """``array`` on this device (host arrays are copied over once).

        Arrays already on another device are refused with both device names:
        moving them silently would hide a copy in a hot loop.
        """
        with self.activate():  # on a GPU: copied to this device, whichever is current
            where = array_device(array)
            if where not in (None, "cpu", self.name):
                raise DeviceError(f"{what} is on {where} but the model is on {self.name}")
            native = numpy if where == "cpu" else self.xp
            if where is not None and not isinstance(array, native.ndarray):  # another framework's array:
                lazy = [bit for bit in ("neg", "conj") if getattr(array, f"is_{bit}", lambda: False)()]
                if lazy:  # a view that negates (PyTorch's conj().imag) or conjugates when read: DLPack drops the bit
                    raise DeviceError(f"{what}: a {type(array).__name__} with its lazy {lazy[0]} bit set cannot be "
                                      f"shared through DLPack without losing it; pass its resolve_{lazy[0]}()")
                try:  # shared through DLPack, no copy
                    array = native.from_dlpack(array)
                except (BufferError, RuntimeError, TypeError, ValueError) as error:
                    raise DeviceError(f"{what}: a {type(array).__name__} on {where} could not be shared through DLPack "
                                      f"({error})") from None
            return self.xp.asarray(array, dtype=dtype)

    def check(self, array, what="array"):
        """Raise a DeviceError unless ``array`` is an array of this backend (NumPy's, CuPy's) on this device."""
        where = array_device(array)
        if where is not None and where != self.name:
            raise DeviceError(f"{what} is on {where} but the model is on {self.name}; "
                              f"move it with model.backend.asarray(...)")
        if not isinstance(array, self.xp.ndarray):  # a list; a torch tensor, whose dtype NumPy does not read
            raise DeviceError(f"{what} is a {type(array).__name__}, not a {self.xp.__name__} array: make it one with "
                              f"model.backend.asarray(...) (an array on {self.name} that speaks DLPack, as a torch "
                              f"tensor, is shared without a copy)")
        return array

    def to_host(self, array):
        """A NumPy copy: later device work (reused buffers) cannot change it."""
        return numpy.array(array)

    def empty(self, shape, dtype=numpy.float32):
        with self.activate():
            return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype=numpy.float32):
        with self.activate():
            return self.xp.zeros(shape, dtype=dtype)

    def synchronize(self):
        """Wait for queued device work; a no-op where work is synchronous."""

    def activate(self):
        """A context in which the array module works on this device (every public entry point
        enters it, so that ``cuda:1`` computes on GPU 1, not on the current device)."""
        return contextlib.nullcontext()

    def flushing_subnormals(self):
        """A context in which this thread's arithmetic flushes subnormal numbers to zero, where the
        device pays for them (the CPU); the optimizers update in it. Momentum and Adam moments of
        parameters whose gradient stays zero (dead ReLU units, blank pixels) decay geometrically
        through the subnormal range, where x86 CPUs take microcode assists of about 100 cycles per
        operation: without the flush such an update ran 17 times slower. GPUs need none."""
        return contextlib.nullcontext()

    def erf(self, x):
        raise NotImplementedError

    def matmul_precision(self, precision):
        """A context in which float32 weighted sums compute in ``precision`` (one of
        ``PRECISIONS``): "tf32" and "bf16" let a GPU's tensor cores round the inputs; the CPU
        computes fp32 whatever is asked (the Trainer says so)."""
        return contextlib.nullcontext()

    def precision_note(self, precision):
        """What a user asking for ``precision`` should know of how this device computes it, or None."""
        return None

    def storage_dtype(self, dtype, activation):
        """The dtype a weighted-sum layer (Dense, Conv2D) with ``activation`` keeps its activations and
        gradients in, its weights being ``dtype``: ``dtype`` itself, except where a backend stores them
        in a narrower type (bfloat16 on a GPU under ``matmul_precision("bf16")``)."""
        return dtype

    def convert(self, x, out):
        """``out = x`` in ``out``'s dtype (to and from a storage dtype); returns ``out``."""
        out[...] = x
        return out

    # ----- graphs: work recorded once and replayed ---------------------------------
    def recording_allocations(self):
        """A context yielding the ``Allocations`` made inside it (none where nothing is captured: the CPU)."""
        return contextlib.nullcontext(Allocations())

    def capture(self, run, sizes):
        """``run()`` captured as a graph whose ``replay()`` does its device work again, drawing the
        memory it allocates from blocks of ``sizes`` set aside first; None where there are no graphs
        (the CPU, whose work runs as it is issued)."""
        return None

    def memory_report(self, error, batch_size):
        """What to tell a user whose training ran out of memory."""
        return (f"out of memory on {self.name} during training with batch size {batch_size} ({error}); "
                f"try a smaller --batch-size or a smaller network")

    # ----- layers ---------------------------------------------------------------
    def matmul(self, a, b, out, trans_a=False, trans_b=False):
        """The batched weighted sum ``out = op(a) @ op(b)``; transposes (of the last two axes) are views,
        and leading axes broadcast, one product per image of a convolution."""
        return self.xp.matmul(a.swapaxes(-1, -2) if trans_a else a, b.swapaxes(-1, -2) if trans_b else b, out=out)

    def take_rows(self, x, index, out):
        """``out = x[index]`` along the first axis, into ``out`` (a batch of a shuffled epoch)."""
        return self.xp.take(x, index, axis=0, out=out)

    def bias_act(self, z, bias, activation, out):
        """``z += bias`` (none where ``bias`` is None) then ``out = activation(z)``; ``out`` may be ``z``."""
        if bias is not None:
            self.xp.add(z, bias, out=z)
        return activation.forward(self, z, out)

    def act_backward(self, dy, y, z, activation, out, bias_grad=None):
        """``out = dy * activation'(.)``, and the bias gradient (batch sum) when asked."""
        activation.backward(self, dy, y, z, out)
        if bias_grad is not None:
            self.bias_grad(out, bias_grad)
        return out

    def bias_grad(self, dz, out):
        """Sum of ``dz`` over the batch, into ``out``."""
        return dz.sum(axis=0, out=out)

    def relu(self, z, out):
        """``out = max(z, 0)``, a NaN kept: ReLU, and the positive part of ELU and softplus."""
        return self.xp.maximum(z, 0, out=out)

    def sigmoid(self, z, out):
        """The logistic function as ``1 / (1 + e^-z)`` for z >= 0 and ``e^z / (1 + e^z)`` below: ``e^-|z|``
        never overflows, and no tail cancels (``0.5 tanh(z / 2) + 0.5`` gave 0 below z = -17 in float32)."""
        xp = self.xp
        numerator = xp.minimum(z, 0)  # read before ``out``, which may be ``z``, is written
        xp.exp(numerator, out=numerator)  # 1 for z >= 0, e^z below
        tail = xp.abs(z)
        xp.negative(tail, out=tail)
        xp.exp(tail, out=tail)
        xp.add(tail, 1.0, out=out)
        return xp.divide(numerator, out, out=out)

    def softmax(self, z, out):
        """Row-wise softmax, shifted by the row maximum for stability."""
        xp = self.xp
        xp.subtract(z, z.max(axis=1, keepdims=True), out=out)
        xp.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def softmax_backward(self, dy, y, out):
        """The softmax Jacobian times ``dy``: ``y * (dy - sum(dy * y))`` per row."""
        inner = (dy * y).sum(axis=1, keepdims=True)
        return self.xp.multiply(y, dy - inner, out=out)

    def maxout_forward(self, z3, out, index):
        """Max over the last axis of ``z3`` (batch, units, pieces) and its index."""
        index[...] = z3.argmax(axis=2)
        return z3.max(axis=2, out=out)

    def maxout_backward(self, dy, index, out3):
        """Route ``dy`` to the winning piece; the other pieces get zero (exactly: a mask multiply would give
        0 * inf = NaN, and took twice as long on the CPU)."""
        out3.fill(0)
        batch, units = index.shape  # put_along_axis's fancy index (CuPy 13 has no put_along_axis)
        out3[self.xp.arange(batch)[:, None], self.xp.arange(units), index] = dy
        return out3

    # ----- convolution and pooling over NCHW arrays --------------------------------------------
    def _padded(self, x, window, fill, slot):
        """``x`` (N, C, H, W) inside a border of ``fill`` (a reused work array), or ``x`` itself."""
        if not (window.ph or window.pw):
            return x
        n, c, h, w = x.shape
        padded = self._work((n, c, *window.padded_size(h, w)), x.dtype, slot)
        padded.fill(fill)
        padded[window.inside(h, w)] = x
        return padded

    def in_image_layout(self, x, store, key):
        """``x`` (N, C, H, W) as ``image_array`` lays images out: itself, or where that is batch-last a copy
        in the work array ``store[key]``: a gradient coming back through Flatten (the CPU's pooling
        backward of LeNet-5's last pool took 0.37 ms from NCHW against 0.15 with the copy), Dropout's mask
        (its two products over mixed layouts ran 10x slower). An ``x`` of other dimensions is no image:
        itself."""
        if not self.batch_last or x.ndim != 4:
            return x
        out = self.leading_rows(store, key, x.shape, x.dtype, images=True)
        out[...] = x
        return out

    def by_image(self, columns, lead, n, spatial):
        """``columns`` (*lead, N*L), a convolution's positions in this backend's order, viewed as
        (*lead, N, *spatial). Image-major (each image's positions in turn) unless ``batch_last``
        (each position's images in turn): then a window's copy in ``im2col`` and ``col2im`` runs over
        OW*N contiguous values, not OW, and NumPy, which loops in C over the last axis only, ran
        im2col 2-3x and col2im 2.7x faster for LeNet's convolutions at batch 32 (AMD EPYC)."""
        if not self.batch_last:
            return columns.reshape(*lead, n, *spatial)
        view = columns.reshape(*lead, *spatial, n)
        k = len(lead)
        return view.transpose(*range(k), view.ndim - 1, *range(k, view.ndim - 1))

    def _padded_work(self, c, n, height, width, dtype, slot):
        """A (C, N, height, width) view of the work array ``slot``, its images in the columns' order."""
        return self.by_image(self._work((c, n * height * width), dtype, slot), (c,), n, (height, width))

    def _channels_first(self, x, window, slot):
        """``x`` (N, C, H, W) as a zero-padded (C, N, H + 2 ph, W + 2 pw) view of a work array in the
        columns' order: im2col's columns are channel-major, so its windows copy without a transpose each."""
        n, c, h, w = x.shape
        padded = self._padded_work(c, n, *window.padded_size(h, w), x.dtype, slot)
        if window.ph or window.pw:
            padded.fill(0)
        padded[window.inside(h, w)] = x.transpose(1, 0, 2, 3)
        return padded

    def im2col(self, x, window, out):
        """The windows of ``x`` (N, C, H, W) as the columns of ``out`` (C*kh*kw, N*OH*OW), its rows in the
        order a PyTorch weight (out, C, kh, kw) flattens, its columns in this backend's order (``by_image``):
        one matmul by the weight then computes every output position of the batch."""
        n, c, h, w = x.shape
        oh, ow = window.output_size(h, w)
        columns = self.by_image(out, (c, window.kh, window.kw), n, (oh, ow))
        for i, j, view in _windows(self._channels_first(x, window, "im2col"), window, oh, ow):
            columns[:, i, j] = view
        return out

    def col2im(self, columns, window, out):
        """The adjoint of ``im2col``: every column entry added back to the input position it came from,
        into ``out`` (N, C, H, W), offsets in increasing order (a fixed, deterministic sum)."""
        n, c, h, w = out.shape
        oh, ow = window.output_size(h, w)
        padded = self._padded_work(c, n, *window.padded_size(h, w), out.dtype, "col2im")
        padded.fill(0)
        windows = self.by_image(columns, (c, window.kh, window.kw), n, (oh, ow))
        for i, j, view in _windows(padded, window, oh, ow):
            view += windows[:, i, j]
        out[...] = padded[window.inside(h, w)].transpose(1, 0, 2, 3)
        return out

    def image_rows(self, images):
        """``images`` (N, C, *spatial) as a convolution's (C, N*L) rows in the columns' order (``by_image``):
        a view where its memory already lies so (a batch-last image array), else None."""
        if not self.batch_last:
            return None
        memory = images.transpose(1, *range(2, images.ndim), 0)
        return memory.reshape(images.shape[1], -1) if memory.flags.c_contiguous else None

    def bias_act_to_nchw(self, z, bias, activation, rows, out):
        """A convolution's output from its matmul ``z`` (C, N*L): ``rows = activation(z + bias)`` with the bias
        per row (channel), and the same values in ``out`` (N, C, *spatial), NCHW. ``rows`` may be ``z``;
        otherwise ``z`` keeps ``z + bias`` (the derivative of gelu and silu reads it). ``rows`` may be
        ``out``'s ``image_rows``: no copy then."""
        self.bias_act(z.T, bias, activation, rows.T)  # (N*L, C) views: the bias runs along their rows
        n, c = out.shape[:2]
        # rows are out's image_rows or a buffer of their own, so bounds tell (CuPy's shares_memory sorts every
        # element's address on the device and reads the answer on the host: a sync, refused in a CUDA graph)
        if not self.xp.may_share_memory(rows, out):  # (out.reshape would be a copy of a strided out)
            out[...] = self.by_image(rows, (c,), n, out.shape[2:]).swapaxes(0, 1)
        return out

    def act_backward_from_nchw(self, dy, y, z, activation, out, bias_grad=None):
        """``bias_act_to_nchw``'s backward: ``dy`` (N, C, *spatial) times the derivative (at ``y`` or ``z``,
        (C, N*L) like ``out``) as ``out`` (C, N*L), and the bias gradient, a sum per channel; read from
        ``dy``'s ``image_rows`` where it has them, else from a copy in ``out``."""
        n, c = dy.shape[:2]
        rows = self.image_rows(dy)
        if rows is None:
            rows = out
            self.by_image(out, (c,), n, (-1,))[...] = dy.reshape(n, c, -1).transpose(1, 0, 2)
        activation.backward(self, rows.T, y.T, z.T, out.T)  # (N*L, C) views, as forward: softmax runs over C
        if bias_grad is not None:
            out.sum(axis=1, out=bias_grad)
        return out

    def _tiles(self, window, shape):
        """Whether the windows tile an (N, C, H, W) input exactly: no overlap, no gap, no padding (the
        usual 2x2 pooling), so that a reshape makes every window an axis."""
        return (window.sh, window.sw) == (window.kh, window.kw) and not (window.ph or window.pw) \
            and shape[2] % window.kh == 0 and shape[3] % window.kw == 0

    def maxpool_forward(self, x, window, out, index):
        """The maximum of each window of ``x`` (N, C, H, W) into ``out``, and in ``index`` (int32) where it is
        (h * W + w in the input plane), PyTorch CPU's choice: ties go to the first in row-major order, a NaN
        counts as the maximum (the last NaN where a window holds several: each replaces the maximum so far),
        and the padding never wins (a window of -inf has its first real input)."""
        xp = self.xp
        n, c, h, w = x.shape
        oh, ow = out.shape[2:]
        rows, cols, corner = window.corners(xp, oh, ow, w)
        if (window.kh, window.kw) == (2, 2) and self._tiles(window, x.shape):
            self._maxpool_2x2(x, corner, out, index)
            if not bool(xp.isnan(out).any()):  # (a window holding a NaN has it as its maximum)
                return out
        windows = _windows(self._padded(x, window, -numpy.inf, "maxpool"), window, oh, ow)
        out[...] = windows[0][2]
        for _, _, view in windows[1:]:
            xp.maximum(out, view, out=out)  # NaN propagates
        for i, j, view in reversed(windows):  # the first position holding the maximum wins
            xp.copyto(index, corner + numpy.int32(i * w + j), where=view == out)
        if window.ph or window.pw:  # -inf windows matched their padding first: their first real input instead
            xp.copyto(index, xp.maximum(rows, 0)[:, None] * w + xp.maximum(cols, 0)[None, :], where=out == -numpy.inf)
        if bool(xp.isnan(out).any()):  # NaN == NaN is false: the NaN windows' index is their last NaN's
            for i, j, view in windows:
                xp.copyto(index, corner + numpy.int32(i * w + j), where=view != view)
        return out

    def _maxpool_2x2(self, x, corner, out, index):
        """``maxpool_forward`` of 2x2 tiles, right where no window holds a NaN, as a tournament: the better of
        each row's pair, then of the two rows, the first winning ties (half the passes of the general loop).
        It runs over the windows' four corners copied out as contiguous planes: NumPy's passes over strided
        views, and its masked copies, ran up to 15x slower (2.6-2.8x for the whole op at (64, 6, 28, 28), EPYC)."""
        xp = self.xp
        n, c, h, w = x.shape
        oh, ow = out.shape[2:]
        planes = self._work((2, 2) + out.shape, x.dtype, "maxpool_2x2", images=True)
        planes[...] = x.reshape(n, c, oh, 2, ow, 2).transpose(3, 5, 0, 1, 2, 4)
        (v00, v01), (v10, v11) = planes
        top, bottom = xp.maximum(v00, v01), xp.maximum(v10, v11)
        right_top, right_bottom = (v01 > v00).view(numpy.int8), (v11 > v10).view(numpy.int8)
        lower = (bottom > top).view(numpy.int8)
        xp.maximum(top, bottom, out=out)
        xp.subtract(right_bottom, right_top, out=index)  # index = corner + right_top + lower * (w + that)
        index += numpy.int32(w)
        index *= lower
        index += right_top
        index += corner
        return out

    def maxpool_backward(self, dy, index, window, out):
        """Each output's gradient to the input its window's maximum came from, summed where windows
        overlap (in a fixed order), into ``out`` (N, C, H, W)."""
        xp = self.xp
        n, c, h, w = out.shape
        oh, ow = dy.shape[2:]
        corner = window.corners(xp, oh, ow, w)[2]
        if self._tiles(window, out.shape):  # each input belongs to one window: write, no sum
            # dy's bits and'ed with all ones or all zeros: exact beside inf and NaN, where a product by the mask
            # gives NaN (0 * inf), and as fast as that product (masked copies took 5x as long)
            bits = numpy.dtype(f"i{dy.dtype.itemsize}")
            windows = out.reshape(n, c, oh, window.kh, ow, window.kw).view(bits)
            for i, j in numpy.ndindex(window.kh, window.kw):
                mask = -(index == corner + numpy.int32(i * w + j)).view(numpy.int8)  # -1 at the maximum, else 0
                xp.bitwise_and(dy.view(bits), mask, out=windows[:, :, :, i, :, j])
            return out
        padded = self._work((n, c, *window.padded_size(h, w)), out.dtype, "maxpool_backward")
        padded.fill(0)
        for i, j, view in _windows(padded, window, oh, ow):
            view += xp.where(index == corner + numpy.int32(i * w + j), dy, 0)
        out[...] = padded[window.inside(h, w)]
        return out

    def avgpool_forward(self, x, window, out):
        """The mean of each window of ``x``, zero padding counted (PyTorch's count_include_pad)."""
        oh, ow = out.shape[2:]
        out.fill(0)
        for _, _, view in _windows(self._padded(x, window, 0, "avgpool"), window, oh, ow):
            out += view
        out *= 1.0 / (window.kh * window.kw)
        return out

    def avgpool_backward(self, dy, window, out):
        """Each output's gradient shared equally by its window's inputs, into ``out`` (N, C, H, W)."""
        n, c, h, w = out.shape
        oh, ow = dy.shape[2:]
        padded = self._work((n, c, *window.padded_size(h, w)), out.dtype, "avgpool_backward")
        padded.fill(0)
        share = self._work(dy.shape, dy.dtype, "avgpool_share")
        self.xp.multiply(dy, 1.0 / (window.kh * window.kw), out=share)
        for _, _, view in _windows(padded, window, oh, ow):
            view += share
        out[...] = padded[window.inside(h, w)]
        return out

    # ----- batch normalisation over (N, C, L) views ---------------------------------------------
    def _channel_sums(self, x3, out):
        """The sums per channel of ``x3`` (N, C, L) into ``out``: over the batch, then along each channel's
        values (NumPy ran that 2.2x faster than one sum over axes (0, 2) at (64, 6, 784), EPYC)."""
        return x3.sum(axis=0, dtype=out.dtype).sum(axis=1, out=out)

    def _by_channel(self, values, x3):
        """``values`` (C,) as a (1, C, L) array to broadcast against ``x3`` (N, C, L): each repeated along L,
        so that NumPy's loop runs over C*L contiguous values (``values[None, :, None]`` ran 1.7x slower)."""
        return self.xp.repeat(values, x3.shape[2]).reshape(1, -1, x3.shape[2])

    def batchnorm_stats(self, x3, mean, invstd, eps, running_mean, running_var, momentum):
        """The batch's mean and 1/sqrt(var + eps) per channel of ``x3`` (N, C, L), with the biased variance;
        the running estimates move by ``momentum`` towards the mean and the unbiased variance (PyTorch's)."""
        xp = self.xp
        count = x3.shape[0] * x3.shape[2]
        self._channel_sums(x3, mean)
        mean *= 1.0 / count
        centred = self._scratch(x3, "batchnorm")
        xp.subtract(x3, self._by_channel(mean, x3), out=centred)
        centred *= centred
        var = self._channel_sums(centred, xp.empty_like(mean))
        var *= 1.0 / count
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += (momentum * count / (count - 1)) * var
        var += eps
        xp.sqrt(var, out=invstd)
        xp.divide(1.0, invstd, out=invstd)
        return mean, invstd

    def batchnorm_apply(self, x3, mean, invstd, gamma, beta, out3):
        """``x * scale + shift`` per channel of (N, C, L) arrays, with ``scale = invstd * gamma`` and
        ``shift = beta - mean * scale``: ``(x - mean) * invstd * gamma + beta`` in PyTorch's CPU form, two
        passes over the values."""
        scale = invstd * gamma
        self.xp.multiply(x3, self._by_channel(scale, x3), out=out3)
        out3 += self._by_channel(beta - mean * scale, x3)
        return out3

    def batchnorm_backward(self, dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta, training=True):
        """The gradients of a batch norm: ``dgamma = sum(dy xhat)`` and ``dbeta = sum(dy)`` per channel, and
        in training ``dx = gamma invstd / M (M dy - dbeta - xhat dgamma)`` over the M values of each (the
        batch statistics depend on x), in eval ``dx = gamma invstd dy``."""
        xp = self.xp
        count = x3.shape[0] * x3.shape[2]
        centred = self._scratch(x3, "batchnorm")
        xp.subtract(x3, self._by_channel(mean, x3), out=centred)
        self._channel_sums(dy3, dbeta)
        self._channel_sums(xp.multiply(dy3, centred, out=dx3), dgamma)
        dgamma *= invstd
        scale = gamma * invstd
        if not training:
            return xp.multiply(dy3, self._by_channel(scale, x3), out=dx3)
        # dx = scale dy - (scale invstd dgamma / M) (x - mean) - scale dbeta / M
        xp.multiply(dy3, self._by_channel(scale, x3), out=dx3)
        centred *= self._by_channel(scale * invstd * dgamma * (1.0 / count), x3)
        dx3 -= centred
        dx3 -= self._by_channel(scale * dbeta * (1.0 / count), x3)
        return dx3

    # ----- data augmentation --------------------------------------------------------------------
    def random_shifts(self, batch, max_shift, seed, counter):
        """(batch, 2) int32 shifts, rows then columns, uniform in [-max_shift, max_shift]: a pure function
        of (seed, counter), like Dropout's masks."""
        u = self.uniform((batch, 2), seed, counter)
        u *= 2 * max_shift + 1
        return u.astype(numpy.int32) - numpy.int32(max_shift)

    def shift_images(self, x, shifts, out):
        """Each image of ``x`` (N, C, H, W) moved by its (rows, columns) shift, zeros coming in: one gather
        from ``x`` inside a border of zeros, where a source outside the image is sent (no mask: an edge's
        inf times 0 would be NaN). 2.4x faster than picking with four broadcast index arrays and a masked
        copy, at (64, 1, 28, 28) on the EPYC. The indices lie in ``out``'s memory order, so the gather
        writes in order: into a batch-last ``out`` at (256, 1, 28, 28), 0.37 ms in all against 0.84."""
        xp = self.xp
        n, c, h, w = x.shape
        padded = self._work((n, c, h + 2, w + 2), x.dtype, "shift")
        padded.fill(0)
        padded[:, :, 1:-1, 1:-1] = x
        plane = (h + 2) * (w + 2)
        rows = xp.clip(xp.arange(h, dtype=numpy.intp)[None, :] - shifts[:, :1], -1, h) + 1  # (N, H) in padded
        rows *= w + 2
        rows += (xp.arange(n, dtype=numpy.intp) * (c * plane))[:, None]
        starts = rows[:, None, :, None] + (xp.arange(c, dtype=numpy.intp) * plane)[None, :, None, None]
        cols = xp.clip(xp.arange(w, dtype=numpy.intp)[None, :] - shifts[:, 1:], -1, w) + 1  # (N, W)
        order = memory_order(out)
        index = self._work(tuple(out.shape[axis] for axis in order), numpy.intp, "shift_index")
        # Small addends made contiguous in that order first: the add then reads along its inner axis.
        xp.add(xp.ascontiguousarray(starts.transpose(order)),
               xp.ascontiguousarray(cols[:, None, None, :].transpose(order)), out=index)
        self.take_rows(padded.reshape(-1), index, out.transpose(order))
        return out

    def dropout_mask(self, shape, rate, seed, counter, dtype):
        """A scaled keep-mask: 0 with probability ``rate``, else ``1/(1-rate)``."""
        keep = self.uniform(shape, seed, counter) >= rate
        return keep.astype(dtype) * (1.0 / (1.0 - rate))

    # ----- losses ----------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels, grad):
        """Mean cross-entropy of softmax(logits) and its gradient, in one pass.

        ``grad`` receives ``(softmax - onehot) / batch``; returns a 0-d array. The ``labels`` must be
        class indices: the loss checks a data set's labels once, not every batch.
        """
        if not grad.flags.c_contiguous:  # its flat view below would be a copy: computed in a contiguous one
            work = self.empty(grad.shape, grad.dtype)
            loss = self.softmax_cross_entropy(logits, labels, work)
            grad[...] = work
            return loss
        xp = self.xp
        (batch, classes), flat = logits.shape, grad.reshape(-1)
        starts = xp.arange(0, batch * classes, classes)  # where each row starts in the flat arrays
        # The row maxima as the values at the rows' argmax: NumPy's argmax over short rows is a faster
        # pass than its max (1.5 us of 11.9 at (32, 10) on the Xeon, 12 of 35 at (256, 10)). A NaN or
        # inf in a row makes its loss and gradient NaN, whichever element the argmax finds.
        top = logits.reshape(-1).take(logits.argmax(axis=1) + starts)
        xp.subtract(logits, top[:, None], out=grad)
        picks = labels + starts  # the labels' places in the flat rows
        picked = flat.take(picks)
        xp.exp(grad, out=grad)
        total = grad.sum(axis=1)
        grad /= total[:, None]
        losses = xp.log(total)
        losses -= picked
        flat[picks] -= 1.0
        grad *= 1.0 / batch
        return losses.sum() / batch

    def mse(self, y, target, grad):
        """Mean squared error over all elements and its gradient."""
        self.xp.subtract(y, target, out=grad)
        loss = (grad * grad).mean()
        grad *= 2.0 / grad.size
        return loss

    def sigmoid_cross_entropy(self, logits, target, grad):
        """Binary cross-entropy on logits (stable form) and its gradient."""
        xp = self.xp
        loss = (xp.maximum(logits, 0) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))).mean()
        self.sigmoid(logits, grad)
        grad -= target
        grad *= 1.0 / grad.size
        return loss

    def count_correct(self, y, labels):
        """How many rows of ``y`` have their maximum at ``labels`` (0-d array)."""
        return (y.argmax(axis=1) == labels).sum()

    # ----- work arrays kept between calls ---------------------------------------------
    def _work(self, shape, dtype, slot, images=False):
        """A work array named ``slot`` of ``shape`` and ``dtype``, kept between calls, so that a step
        allocates (and page-faults) nothing once it has run; ``images`` (..., N, C, H, W) laid out by
        ``image_array``."""
        key = (slot, tuple(shape), numpy.dtype(dtype))
        if key not in self._scratch_arrays:
            self._scratch_arrays[key] = self.image_array(shape, dtype) if images else self.empty(shape, dtype)
        return self._scratch_arrays[key]

    def leading_rows(self, store, key, shape, dtype, images=False):
        """The first ``shape[0]`` rows of the work array ``store[key]``, made anew (of ``shape``) when it has
        fewer rows, other trailing axes or another dtype: a short last batch reuses the full batch's.
        ``images``: a layer's (N, C, H, W) activations or gradients, laid out by ``image_array``; where that
        is batch-last, one per batch size, the last ``IMAGE_BATCHES_KEPT`` sizes kept (the leading rows of a
        larger one would leave gaps between each pixel's images: a training step at batch 64 ran 1.2-1.6x
        slower after a prediction at 1024)."""
        if images and self.batch_last:
            key = _kept_batch_size(store, key, shape[0])
        buf = store.get(key)
        if buf is not None and buf.shape == shape and buf.dtype == dtype:  # the usual case, in half the time
            return buf
        if buf is None or buf.shape[1:] != tuple(shape[1:]) or buf.shape[0] < shape[0] or buf.dtype != dtype:
            store[key] = buf = self.image_array(shape, dtype) if images else self.empty(shape, dtype)
            return buf
        return buf[: shape[0]]

    def image_array(self, shape, dtype):
        """A new array of images (..., N, C, H, W) passed between layers: contiguous, unless ``batch_last``,
        where each pixel's images lie together, as in the convolution's columns (``by_image``), so that
        copies between the two and the passes of pools and BatchNorm run over whole batches at a time
        (a view in NCHW order, whose strides every op takes)."""
        if not self.batch_last:
            return self.empty(shape, dtype)
        k = len(shape) - 4  # the batch axis
        memory = self.empty((*shape[:k], *shape[k + 1:], shape[k]), dtype)
        return memory.transpose(*range(k), len(shape) - 1, *range(k, len(shape) - 1))

    def _scratch(self, like, slot):
        """Work array ``slot`` shaped like ``like`` (the optimizers' and BatchNorm's temporaries)."""
        return self._work(like.shape, like.dtype, slot)

    # ----- optimizers --------------------------------------------------------------
    def _descend(self, param, step, scale, work):
        """``param -= scale * step``, the optimizers' last pass; ``work`` (which may be ``step``) takes the
        product."""
        param -= self.xp.multiply(step, scale, out=work)
        return param

    def _blend(self, average, keep, value, scale, work):
        """``average = keep * average + scale * value``, a moving average's pass (momentum, Adam's
        moments); ``work`` (which may be ``value``) takes the product."""
        average *= keep
        average += value if scale == 1.0 else self.xp.multiply(value, scale, out=work)
        return average

    def sgd_update(self, param, grad, velocity, lr, momentum, weight_decay, nesterov):
        """PyTorch's SGD step over flat buffers, in place.

        ``velocity`` starts at zero, which equals PyTorch's first-step copy.
        """
        xp = self.xp
        step, work = grad, self._scratch(param, 0)
        if weight_decay:  # step = grad + weight_decay * param
            step = xp.multiply(param, weight_decay, out=self._scratch(param, 1))
            step += grad
        if momentum:
            self._blend(velocity, momentum, step, 1.0, work)
            if nesterov:  # step = step + momentum * velocity
                xp.multiply(velocity, momentum, out=work)
                step = xp.add(step, work, out=self._scratch(param, 1))
            else:
                step = velocity
        return self._descend(param, step, lr, work)

    def adam_update(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        """PyTorch's Adam (``decoupled=False``) or AdamW step over flat buffers, in place."""
        xp = self.xp
        work, denom = self._scratch(param, 0), self._scratch(param, 1)
        if weight_decay and decoupled:
            param *= 1.0 - lr * weight_decay
        elif weight_decay:  # grad + weight_decay * param, kept in denom until denom is needed
            grad = xp.add(xp.multiply(param, weight_decay, out=denom), grad, out=denom)
        self._blend(m, beta1, grad, 1.0 - beta1, work)
        self._blend(v, beta2, xp.multiply(grad, grad, out=work), 1.0 - beta2, work)
        xp.sqrt(v, out=denom)
        denom *= 1.0 / math.sqrt(1.0 - beta2 ** step)
        denom += eps
        xp.divide(m, denom, out=work)
        return self._descend(param, work, lr / (1.0 - beta1 ** step), work)

    # ----- random numbers ------------------------------------------------------------
    def uniform(self, shape, seed, counter):
        """Counter-based uniform floats in [0, 1): a pure function of (seed, counter).

        The same numbers on every device, and the state to checkpoint is one
        integer, so resumed runs draw exactly what an uninterrupted run would.
        ``counter`` is an int, or a 0-d uint64 device array (what a CUDA graph
        reads at each replay): the keys are then computed on the device, the
        same way (only their low 32 bits count, which wrapping keeps).
        """
        xp = self.xp
        size = math.prod(shape)
        # the seed's terms are cut to 32 bits on the host: a large seed times a uint64 device counter
        # would overflow before the mask (an OverflowError from NumPy's and CuPy's promotion rules)
        key_lo = (counter * 0x85EBCA6B + ((seed * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF
        key_hi = (counter * 0xC2B2AE35 + ((seed + 0x27D4EB2F) & 0xFFFFFFFF)) & 0xFFFFFFFF
        key_lo, key_hi = (xp.uint32(key) if isinstance(key, int) else key.astype(xp.uint32)
                          for key in (key_lo, key_hi))
        x = xp.arange(size, dtype=xp.uint32)
        x += key_lo
        _mix32(x, xp)
        x ^= key_hi
        _mix32(x, xp)
        x >>= 8
        return (x.astype(xp.float32) * (1.0 / (1 << 24))).reshape(shape)
