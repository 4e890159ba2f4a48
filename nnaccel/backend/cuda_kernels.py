"""The CUDA kernels of ``kernels/*.cu``: lazy compilation and checked launchers.

Importing this module touches neither CuPy nor the GPU. Each ``.cu`` file is
read once and compiled by CuPy's ``RawModule`` (NVRTC) the first time one of
its kernels runs, once per (file, dtype); CuPy also caches the binary on disk,
keyed by the source text, which is why local ``#include "x.cuh"`` lines are
inlined here rather than found through ``-I`` (an edited header then
recompiles).

Every wrapper checks dtypes, shapes and C-contiguity with ``.dtype``,
``.shape`` and ``.flags`` only, before any CuPy call, and raises
:class:`~nnaccel.errors.ShapeError` naming the array; then that every array
is a CuPy array and all are on one GPU, else a
:class:`~nnaccel.errors.DeviceError` naming the array and where it is (a
NumPy array has no device pointer to launch with). Scalars go to the
kernels with their exact C types (``numpy.int32`` for ``int``,
``numpy.int64`` for ``long long``, ``numpy.float64`` for ``double``).
"""

import functools
import re
from pathlib import Path

import numpy

from ..activations import ACTIVATIONS
from ..errors import ConfigError, DeviceError, ShapeError
from .base import array_device

# Activation codes of the elementwise kernels (enum Act in activations.cuh), taken from
# nnaccel.activations; softmax has its own row kernels.
ACT_CODES = {name: cls.code for name, cls in ACTIVATIONS.items() if name != "softmax"}
# Activations whose derivative reads z; the others read the output y.
GRAD_FROM_Z = frozenset(cls.code for cls in ACTIVATIONS.values() if not cls.uses_output)

# The kernel templates of each source file, instantiated per dtype.
KERNELS = {
    "elementwise.cu": ("bias_act", "act_backward", "act_backward_bias_grad", "bias_grad_reduce",
                       "softmax_rows", "softmax_backward", "to_storage", "from_storage"),
    "loss.cu": ("softmax_cross_entropy",),
    "optimizer.cu": ("sgd_update", "adam_update"),
    "maxout.cu": ("maxout_forward", "maxout_backward"),
    "conv.cu": ("im2col", "col2im", "bias_act_to_nchw", "act_backward_from_nchw", "maxpool_forward",
                "maxpool_backward", "avgpool_forward", "avgpool_backward"),
    "batchnorm.cu": ("batchnorm_stats", "batchnorm_stats_merge", "batchnorm_apply", "batchnorm_backward_reduce",
                     "batchnorm_backward_apply"),
}
# bfloat16 values, held as their bits (bfloat16.cuh): CuPy 13 has no bfloat16 dtype and CuPy 14's
# (ml_dtypes.bfloat16) is a partial one on an extra dependency; the kernels and gemmEx read the bits.
BF16 = numpy.dtype(numpy.uint16)
CUDA_R_16BF = 14  # cudaDataType of bfloat16 (library_types.h): CuPy 13 has no name for it
FLOATS = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
CTYPES = {FLOATS[0]: "float", FLOATS[1]: "double", BF16: "nna::bf16"}
COMPUTE = {FLOATS[0]: FLOATS[0], FLOATS[1]: FLOATS[1], BF16: FLOATS[0]}  # the dtype a stored value computes in
# The storage types of each kernel: the steps of Dense, Conv2D, the poolings and BatchNorm also run
# on bf16 storage; the conversions exist for it only; the rest (softmax, the loss, the optimizers,
# Maxout) take float32 and float64.
STORAGE = (*FLOATS, BF16)
STORAGE_DTYPES = {**dict.fromkeys(("bias_act", "act_backward", "act_backward_bias_grad", "im2col", "col2im",
                                   "bias_act_to_nchw", "act_backward_from_nchw", "maxpool_forward",
                                   "maxpool_backward", "avgpool_forward", "avgpool_backward", "batchnorm_stats",
                                   "batchnorm_apply", "batchnorm_backward_reduce", "batchnorm_backward_apply"),
                                  STORAGE),
                  "to_storage": (BF16,), "from_storage": (BF16,)}
# No fused multiply-adds (NVRTC's default contracts a*b + c): each kernel rounds as NumPy does, bit for bit
# where its order of operations is NumPy's (pooling, the optimizer updates).
OPTIONS = ("-std=c++17", "--fmad=false")
NULL = numpy.uint64(0)  # a null pointer argument: CuPy 13 passes None as a garbage pointer (cupy#9046)

THREADS = 256  # threads per block of the 1-D launches
ROWS_PER_BLOCK = THREADS // 32  # the row kernels run one warp per row
BLOCKS_PER_SM = 32  # grid cap of the grid-stride loops
BIAS_GRAD_BLOCK = (32, 8)  # (BG_COLS, BG_ROWS) in elementwise.cu
BIAS_GRAD_BLOCKS_PER_SM = 8  # enough row chunks to fill the GPU...
BIAS_GRAD_MIN_CHUNK_ROWS = 64  # ...but at least 8 rows per thread
BN_THREADS = 256  # BN_THREADS in batchnorm.cu: the per-channel reductions' blocks
CONV_THREADS = 256  # CONV_THREADS in conv.cu: the bias gradient's blocks
CHANNEL_BLOCKS_PER_SM = 8  # (channel, chunk of images) blocks of the per-channel reductions, enough to fill the GPU...
CHANNEL_MIN_CHUNK_VALUES = 2048  # ...but at least 8 values per thread of a 256-thread block

_INCLUDE = re.compile(r'^#include "([^"]+)"[ \t]*$', re.MULTILINE)
_FILE_OF = {name: filename for filename, names in KERNELS.items() for name in names}


def kernels_dir():
    """The folder of the ``.cu`` sources: the ``nnaccel.kernels`` package
    data, or ``kernels/`` of a source checkout when that package is absent."""
    try:
        from importlib.resources import files

        return files("nnaccel.kernels")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels"


@functools.lru_cache(maxsize=None)
def source(filename):
    """The text of one kernel file with its local includes inlined."""
    text = kernels_dir().joinpath(filename).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda match: source(match.group(1)), text)


def name_expressions(filename, dtype):
    """The instantiations of ``filename``'s kernels for ``dtype``, e.g. ``bias_act<float>`` (none of a
    kernel that does not take ``dtype``)."""
    dtype = numpy.dtype(dtype)
    return [f"{name}<{CTYPES[dtype]}>" for name in KERNELS[filename] if dtype in STORAGE_DTYPES.get(name, FLOATS)]


@functools.lru_cache(maxsize=None)
def _module(filename, dtype):
    import cupy

    return cupy.RawModule(code=source(filename), options=OPTIONS,
                          name_expressions=name_expressions(filename, dtype))


@functools.lru_cache(maxsize=None)
def _kernel(name, dtype):
    """The compiled ``name<ctype>`` (CuPy loads it again per device as needed)."""
    return _module(_FILE_OF[name], dtype).get_function(f"{name}<{CTYPES[dtype]}>")


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    from cupy.cuda import runtime

    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)


def _grid(array, work_items, per_block=THREADS):
    """Blocks for a grid-stride loop over ``work_items``: enough for one
    pass, capped at BLOCKS_PER_SM per multiprocessor."""
    return min(-(-work_items // per_block), BLOCKS_PER_SM * _sm_count(array.device.id))


def _launch(name, anchor, grid, block, args):
    """Run kernel ``name`` for ``anchor``'s dtype on ``anchor``'s device (an argument None: a null pointer)."""
    with anchor.device:
        _kernel(name, anchor.dtype)(grid, block, tuple(NULL if arg is None else arg for arg in args))


# ----- validation (no CuPy calls) ---------------------------------------------------

def _float_array(what, array, dtypes=FLOATS):
    """Check the array whose dtype the others must share (one of ``dtypes``,
    contiguous); returns that dtype."""
    if array.dtype not in dtypes:
        names = " or ".join("bfloat16 bits (uint16)" if d == BF16 else str(d) for d in dtypes)
        raise ShapeError(f"{what} has dtype {array.dtype}; this CUDA kernel takes {names}")
    _contiguous(what, array)
    return array.dtype


def _contiguous(what, array):
    if not array.flags.c_contiguous:
        raise ShapeError(f"{what} (shape {array.shape}) is not C-contiguous; the CUDA kernels need "
                         f"contiguous arrays")


def _like(what, array, dtype, shape):
    """Check ``array`` has ``dtype`` and ``shape`` and is C-contiguous."""
    if array is None:
        raise ShapeError(f"{what} is None; expected a {numpy.dtype(dtype)} array of shape {tuple(shape)}")
    if array.dtype != dtype:
        raise ShapeError(f"{what} has dtype {array.dtype}; expected {numpy.dtype(dtype)}")
    if tuple(array.shape) != tuple(shape):
        raise ShapeError(f"{what} has shape {tuple(array.shape)}; expected {tuple(shape)}")
    _contiguous(what, array)


def _one_device(**arrays):
    """Check the arrays (None skipped) are CuPy arrays on one GPU: a host array has no device pointer,
    and one on another GPU than the launch's would be read across devices. (Every launch pays this: it
    compares device ids, and names places only for an error.)"""
    first = None
    for what, array in arrays.items():
        if array is None:
            continue
        if not type(array).__module__.startswith("cupy"):
            where = array_device(array)
            kind = "NumPy array" if where == "cpu" else type(array).__name__
            place = "the host (cpu)" if where == "cpu" else where or "no device"
            raise DeviceError(f"{what} is a {kind} on {place}; the CUDA kernels take CuPy arrays on the GPU "
                              f"(cupy.asarray copies it over)")
        device = array.device.id
        if first is None:
            first = what, device
        elif device != first[1]:
            raise DeviceError(f"{what} is on cuda:{device} but {first[0]} is on cuda:{first[1]}; a CUDA kernel "
                              f"takes all its arrays from one GPU")


def _rows_cols(what, array):
    """(rows, cols) of an array seen as rows of its last axis."""
    if array.ndim < 1:
        raise ShapeError(f"{what} is 0-d; expected at least one axis")
    cols = array.shape[-1]
    return (array.size // cols if cols else 0), cols


def _act_code(act_code):
    if act_code not in ACT_CODES.values():
        raise ConfigError(f"activation code {act_code!r} has no elementwise kernel; valid: {ACT_CODES}")
    return int(act_code)


def _i64(value):
    return numpy.int64(value)


# ----- wrappers ------------------------------------------------------------------------

def bias_act(z, bias, act_code, param, out):
    """``out = act(z + bias)`` with the bias over the last axis (``bias=None``:
    no add); ``out`` may be ``z``, else ``z`` keeps z + bias (gelu and silu's
    derivatives read it), as the base backend's ``bias_act`` leaves it. Returns
    ``out``."""
    dtype = _float_array("z", z, STORAGE)
    rows, cols = _rows_cols("z", z)
    if bias is not None:
        _like("bias", bias, COMPUTE[dtype], (cols,))
    _like("out", out, dtype, z.shape)
    code = _act_code(act_code)
    _one_device(z=z, bias=bias, out=out)
    if z.size:
        _launch("bias_act", z, (_grid(z, z.size),), (THREADS,),
                (z, bias, out, _i64(rows), _i64(cols), numpy.int32(code), numpy.float64(param)))
    return out


def act_backward(dy, y, z, act_code, param, dz, db=None):
    """``dz = dy * act'(.)``, reading ``y`` or ``z`` (gelu, silu) as the
    activation needs (the other may be None); with ``db``, also the bias
    gradient ``db = dz.sum(axis=0)`` over all but the last axis, fused and
    deterministic. ``dz`` may be ``dy``. Returns ``dz``."""
    dtype = _float_array("dy", dy, STORAGE)
    _like("dz", dz, dtype, dy.shape)
    code = _act_code(act_code)
    what, x = ("z", z) if code in GRAD_FROM_Z else ("y", y)
    if code == ACT_CODES["linear"]:
        x = None
    elif x is None:
        raise ShapeError(f"act_backward: activation code {code} needs {what}, got None")
    else:
        _like(what, x, dtype, dy.shape)
    if db is not None:
        rows, cols = _rows_cols("dy", dy)
        _like("db", db, COMPUTE[dtype], (cols,))
    _one_device(**{"dy": dy, what: x, "dz": dz, "db": db})
    if db is None:
        if dy.size:
            _launch("act_backward", dy, (_grid(dy, dy.size),), (THREADS,),
                    (dy, x, dz, _i64(dy.size), numpy.int32(code), numpy.float64(param)))
        return dz
    if rows == 0:
        db.fill(0)
    elif cols:
        _bias_grad(dy, x, dz, db, rows, cols, code, param)
    return dz


def convert(x, out):
    """``out = x`` across storage types: float32 to bfloat16 bits (rounded to nearest, ties to even)
    or back (exact). Returns ``out``."""
    source, target = ((BF16,), (FLOATS[0],)) if x.dtype == BF16 else ((FLOATS[0],), (BF16,))
    _float_array("x", x, source)
    _float_array("out", out, target)
    name, anchor = ("from_storage", x) if x.dtype == BF16 else ("to_storage", out)
    if tuple(out.shape) != tuple(x.shape):
        raise ShapeError(f"out has shape {tuple(out.shape)}; expected {tuple(x.shape)}")
    _one_device(x=x, out=out)
    if x.size:
        _launch(name, anchor, (_grid(x, x.size),), (THREADS,), (x, out, _i64(x.size)))
    return out


def gemm_bf16(a, b, out, trans_a=False, trans_b=False):
    """``out = op(a) @ op(b)`` for 2-D C-contiguous bfloat16 ``a`` and ``b`` through cuBLAS's
    ``cublasGemmEx``: products accumulated in float32 (``CUBLAS_COMPUTE_32F``), ``out`` float32 or
    bfloat16 (rounded once, at the end). Float32 ``a`` and ``b`` (and ``out``) go to the tensor cores
    rounded to bfloat16 (``CUBLAS_COMPUTE_32F_FAST_16BF``): CuPy's own products take no bfloat16
    compute type (its ``COMPUTE_TYPE_BF16`` computes float32 ones in plain float32). Returns ``out``."""
    inputs = BF16 if BF16 in (a.dtype, b.dtype) else FLOATS[0]
    for what, array in (("a", a), ("b", b)):
        _float_array(what, array, (inputs,))
        if array.ndim != 2:
            raise ShapeError(f"{what} has shape {tuple(array.shape)}; the bfloat16 GEMM takes 2-D arrays")
    rows, inner = a.shape[::-1] if trans_a else a.shape
    inner_b, cols = b.shape[::-1] if trans_b else b.shape
    if inner != inner_b:
        raise ShapeError(f"op(a) is {rows}x{inner} but op(b) is {inner_b}x{cols}")
    _float_array("out", out, (FLOATS[0], BF16) if inputs == BF16 else (FLOATS[0],))
    if tuple(out.shape) != (rows, cols):
        raise ShapeError(f"out has shape {tuple(out.shape)}; expected {(rows, cols)}")
    _one_device(a=a, b=b, out=out)
    if out.size == 0:
        return out
    if inner == 0:
        out.fill(0)
        return out
    import cupy
    from cupy.cuda import cublas, runtime

    types = {BF16: CUDA_R_16BF, FLOATS[0]: runtime.CUDA_R_32F}
    one, zero = numpy.ones(1, numpy.float32), numpy.zeros(1, numpy.float32)  # host scalars
    # Row-major out = op(a) op(b) is column-major out^T = op(b)^T op(a)^T: b and a swap places.
    with out.device:
        handle = cupy.cuda.get_cublas_handle()
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
                      cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N, cols, rows, inner,
                      one.ctypes.data, b.data.ptr, types[inputs], b.shape[1], a.data.ptr, types[inputs], a.shape[1],
                      zero.ctypes.data, out.data.ptr, types[out.dtype], cols,
                      cublas.CUBLAS_COMPUTE_32F if inputs == BF16 else cublas.CUBLAS_COMPUTE_32F_FAST_16BF,
                      cublas.CUBLAS_GEMM_DEFAULT)
    return out


def bias_grad_chunks(rows, cols, sm_count):
    """(chunks, chunk_rows): the row chunks of act_backward_bias_grad, enough
    blocks to fill ``sm_count`` multiprocessors but at least
    BIAS_GRAD_MIN_CHUNK_ROWS rows each, and none empty."""
    col_blocks = -(-cols // BIAS_GRAD_BLOCK[0])
    wanted = -(-BIAS_GRAD_BLOCKS_PER_SM * sm_count // col_blocks)
    chunks = max(1, min(rows // BIAS_GRAD_MIN_CHUNK_ROWS, wanted))
    chunk_rows = -(-rows // chunks)
    return -(-rows // chunk_rows), chunk_rows


def channel_chunks(n, c, l, sm_count):
    """(chunks, chunk_images): the chunks of images of the per-channel reductions over (n, c, l), enough
    (channel, chunk) blocks to fill ``sm_count`` multiprocessors but at least CHANNEL_MIN_CHUNK_VALUES
    values each, and none empty."""
    if n == 0:
        return 1, 1
    wanted = -(-CHANNEL_BLOCKS_PER_SM * sm_count // max(c, 1))
    chunks = max(1, min(n * l // CHANNEL_MIN_CHUNK_VALUES, wanted, n))
    chunk_images = -(-n // chunks)
    return -(-n // chunk_images), chunk_images


def _chunk_rows(out, chunks):
    """Where a reduction over ``chunks`` chunks writes each chunk's values of ``out``: ``out`` itself for
    one chunk, else new (chunks, out.size) rows (which ``_add_chunks`` adds up)."""
    if chunks == 1:
        return out
    import cupy

    with out.device:
        return cupy.empty((chunks, out.size), dtype=out.dtype)


def _add_chunks(rows, out):
    """``out`` = the sum of the chunks' ``rows`` (chunks, out.size), in chunk order (deterministic)."""
    if rows is not out:
        _launch("bias_grad_reduce", out, (_grid(out, out.size),), (THREADS,),
                (rows, out, _i64(rows.shape[0]), _i64(out.size)))


def _bias_grad(dy, x, dz, db, rows, cols, code, param):
    """Launch act_backward_bias_grad over row chunks, then add the chunks up."""
    chunks, chunk_rows = bias_grad_chunks(rows, cols, _sm_count(dy.device.id))
    partial = _chunk_rows(db, chunks)
    _launch("act_backward_bias_grad", dy, (-(-cols // BIAS_GRAD_BLOCK[0]), chunks), BIAS_GRAD_BLOCK,
            (dy, x, dz, partial, _i64(rows), _i64(cols), _i64(chunk_rows), numpy.int32(code),
             numpy.float64(param)))
    _add_chunks(partial, db)


def softmax(z, out):
    """``out`` = softmax over the last axis of ``z``; ``out`` may be ``z``."""
    dtype = _float_array("z", z)
    _like("out", out, dtype, z.shape)
    _one_device(z=z, out=out)
    rows, cols = _rows_cols("z", z)
    if rows and cols:
        _launch("softmax_rows", z, (_grid(z, rows, ROWS_PER_BLOCK),), (THREADS,),
                (z, out, _i64(rows), _i64(cols)))
    return out


def softmax_backward(dy, y, dz):
    """``dz = y * (dy - sum(dy * y))`` per row (last axis); ``dz`` may be ``dy``."""
    dtype = _float_array("dy", dy)
    _like("y", y, dtype, dy.shape)
    _like("dz", dz, dtype, dy.shape)
    _one_device(dy=dy, y=y, dz=dz)
    rows, cols = _rows_cols("dy", dy)
    if rows and cols:
        _launch("softmax_backward", dy, (_grid(dy, rows, ROWS_PER_BLOCK),), (THREADS,),
                (dy, y, dz, _i64(rows), _i64(cols)))
    return dz


def softmax_cross_entropy(logits, labels, grad):
    """Mean cross-entropy of softmax(logits) against integer labels (a 0-d
    array), with ``grad = (softmax - onehot) / batch``; ``grad`` may be
    ``logits``. A label outside [0, classes) makes the loss NaN."""
    dtype = _float_array("logits", logits)
    if logits.ndim != 2 or 0 in logits.shape:
        raise ShapeError(f"logits has shape {tuple(logits.shape)}; expected (batch, classes), both > 0")
    _like("grad", grad, dtype, logits.shape)
    rows, cols = logits.shape
    if labels.dtype.kind not in "iu":
        raise ShapeError(f"labels has dtype {labels.dtype}; expected integer class indices")
    if tuple(labels.shape) != (rows,):
        raise ShapeError(f"labels has shape {tuple(labels.shape)}; expected ({rows},) like the logits' rows")
    _one_device(logits=logits, grad=grad, labels=None if isinstance(labels, numpy.ndarray) else labels)
    import cupy

    with logits.device:
        labels = cupy.asarray(labels, dtype=numpy.int64, order="C")  # int64 on this device (host labels copied)
        row_loss = cupy.empty(rows, dtype=dtype)
    _launch("softmax_cross_entropy", logits, (_grid(logits, rows, ROWS_PER_BLOCK),), (THREADS,),
            (logits, labels, grad, row_loss, _i64(rows), _i64(cols), numpy.float64(1.0 / rows)))
    with logits.device:
        return row_loss.mean()


def sgd_update(p, g, v, lr, momentum, weight_decay, nesterov):
    """PyTorch's SGD step in place over flat buffers (``v`` starts at zeros;
    it is left alone, and may be None, when ``momentum`` is 0). Returns ``p``."""
    dtype = _float_array("param", p)
    _like("grad", g, dtype, p.shape)
    if v is not None or momentum:
        _like("velocity", v, dtype, p.shape)
    _one_device(param=p, grad=g, velocity=v)
    if p.size:
        _launch("sgd_update", p, (_grid(p, p.size),), (THREADS,),
                (p, g, v, _i64(p.size), numpy.float64(lr), numpy.float64(momentum),
                 numpy.float64(weight_decay), numpy.int32(bool(nesterov))))
    return p


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """PyTorch's Adam (``decoupled=False``) or AdamW step number ``step``
    (from 1) in place over flat buffers. Returns ``p``."""
    dtype = _float_array("param", p)
    _like("grad", g, dtype, p.shape)
    _like("m", m, dtype, p.shape)
    _like("v", v, dtype, p.shape)
    if step < 1:
        raise ConfigError(f"adam step must count from 1, got {step}")
    _one_device(param=p, grad=g, m=m, v=v)
    if p.size:
        _launch("adam_update", p, (_grid(p, p.size),), (THREADS,),
                (p, g, m, v, _i64(p.size), numpy.float64(lr), numpy.float64(beta1), numpy.float64(beta2),
                 numpy.float64(eps), numpy.float64(weight_decay), numpy.int32(bool(decoupled)),
                 numpy.float64(1.0 - beta1 ** step), numpy.float64(1.0 - beta2 ** step)))
    return p


def _maxout_shapes(what, array3, y_what, y, idx):
    """Check a (batch, units, pieces) array against its (batch, units) partners."""
    dtype = _float_array(what, array3)
    if array3.ndim != 3 or array3.shape[2] == 0:
        raise ShapeError(f"{what} has shape {tuple(array3.shape)}; expected (batch, units, pieces > 0)")
    _like(y_what, y, dtype, array3.shape[:2])
    _like("index", idx, numpy.int32, array3.shape[:2])
    _one_device(**{what: array3, y_what: y, "index": idx})
    return array3.shape[0] * array3.shape[1], array3.shape[2]


def maxout_forward(z3, y, idx):
    """``y`` = max of ``z3`` (batch, units, pieces) over pieces and ``idx``
    (int32) its first index, NaN counting as the max. Returns ``y``."""
    n_out, pieces = _maxout_shapes("z3", z3, "y", y, idx)
    if n_out:
        _launch("maxout_forward", z3, (_grid(z3, n_out),), (THREADS,),
                (z3, y, idx, _i64(n_out), numpy.int32(pieces)))
    return y


def maxout_backward(dy, idx, dz3):
    """``dz3[b, u, k] = dy[b, u]`` where ``k == idx[b, u]``, else 0. Returns ``dz3``."""
    n_out, pieces = _maxout_shapes("dz3", dz3, "dy", dy, idx)
    if n_out:
        _launch("maxout_backward", dz3, (_grid(dz3, dz3.size),), (THREADS,),
                (dy, idx, dz3, _i64(n_out), numpy.int32(pieces)))
    return dz3


# ----- convolution and pooling (NCHW) ------------------------------------------------------------------

def _images(what, array, dtype=None):
    """Check a contiguous (N, C, H, W) array of a storage dtype; returns its dtype."""
    dtype = _float_array(what, array, STORAGE) if dtype is None else dtype
    if array.ndim != 4:
        raise ShapeError(f"{what} has shape {tuple(array.shape)}; expected (batch, channels, height, width)")
    if array.dtype != dtype:
        raise ShapeError(f"{what} has dtype {array.dtype}; expected {numpy.dtype(dtype)}")
    _contiguous(what, array)
    return dtype


def _geometry(image_shape, window):
    """The int geometry arguments of the conv.cu kernels: n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow."""
    n, c, h, w = image_shape
    return tuple(numpy.int32(v) for v in (n, c, h, w, *window, *window.output_size(h, w)))


def _pooled_shape(image_shape, window):
    return (*image_shape[:2], *window.output_size(*image_shape[2:]))


def im2col(x, window, columns):
    """``columns`` (C*kh*kw, N*OH*OW) = the windows of ``x`` (N, C, H, W) (see Backend.im2col)."""
    dtype = _images("x", x)
    n, c, h, w = x.shape
    oh, ow = window.output_size(h, w)
    _like("columns", columns, dtype, (c * window.kh * window.kw, n * oh * ow))
    _one_device(x=x, columns=columns)
    if columns.size:
        _launch("im2col", x, (_grid(x, columns.size),), (THREADS,), (x, columns, *_geometry(x.shape, window)))
    return columns


def col2im(columns, window, dx):
    """``dx`` (N, C, H, W) = the adjoint of im2col of ``columns``, gathered in a fixed order."""
    dtype = _images("dx", dx)
    n, c, h, w = dx.shape
    oh, ow = window.output_size(h, w)
    _like("columns", columns, dtype, (c * window.kh * window.kw, n * oh * ow))
    _one_device(columns=columns, dx=dx)
    if dx.size:
        _launch("col2im", dx, (_grid(dx, dx.size),), (THREADS,), (columns, dx, *_geometry(dx.shape, window)))
    return dx


def _nchw(what, array):
    """(dtype, n, c, l) of a contiguous (N, C, *spatial) array of a storage dtype."""
    dtype = _float_array(what, array, STORAGE)
    if array.ndim < 2:
        raise ShapeError(f"{what} has shape {tuple(array.shape)}; expected (batch, channels, ...)")
    n, c = array.shape[:2]
    return dtype, n, c, (array.size // (n * c) if n * c else 0)


def bias_act_to_nchw(z, bias, act_code, param, rows, y):
    """``rows`` = act(``z`` (C, N*L) + bias per channel), the same values in ``y`` (N, C, *spatial); ``rows``
    may be ``z``, else ``z`` keeps z + bias. Returns ``y``."""
    dtype, n, c, l = _nchw("y", y)
    _like("z", z, dtype, (c, n * l))
    _like("rows", rows, dtype, (c, n * l))
    _like("bias", bias, COMPUTE[dtype], (c,))
    code = _act_code(act_code)
    _one_device(z=z, bias=bias, rows=rows, y=y)
    if y.size:
        _launch("bias_act_to_nchw", y, (_grid(y, y.size),), (THREADS,),
                (z, bias, rows, y, _i64(n), numpy.int32(c), _i64(l), numpy.int32(code), numpy.float64(param)))
    return y


def act_backward_from_nchw(dy, rows, z, act_code, param, dz, db=None):
    """``dz`` (C, N*L) = ``dy`` (N, C, *spatial) times the activation's derivative (at ``rows`` or ``z``, as
    it needs), and with ``db`` the bias gradient per channel: (channel, chunk of images) blocks, then the
    chunks added in order; deterministic. Returns ``dz``."""
    dtype, n, c, l = _nchw("dy", dy)
    _like("dz", dz, dtype, (c, n * l))
    code = _act_code(act_code)
    what, saved = ("z", z) if code in GRAD_FROM_Z else ("rows", rows)
    if code == ACT_CODES["linear"]:
        rows = z = None
    else:
        if saved is None:
            raise ShapeError(f"act_backward_from_nchw: activation code {code} needs {what}, got None")
        _like(what, saved, dtype, (c, n * l))
    if db is not None:
        _like("db", db, COMPUTE[dtype], (c,))
    _one_device(dy=dy, rows=rows, z=z, dz=dz, db=db)
    if c and n * l:
        chunks, chunk_images = channel_chunks(n, c, l, _sm_count(dy.device.id))
        partial = _chunk_rows(db, chunks) if db is not None else None
        _launch("act_backward_from_nchw", dy, (c, chunks), (CONV_THREADS,),
                (dy, rows, z, dz, partial, _i64(n), numpy.int32(c), _i64(l), _i64(chunk_images), numpy.int32(code),
                 numpy.float64(param)))
        if db is not None:
            _add_chunks(partial, db)
    elif db is not None:
        db.fill(0)
    return dz


def maxpool_forward(x, window, out, idx):
    """``out`` = each window's maximum, ``idx`` (int32) = where in the input plane. Returns ``out``."""
    dtype = _images("x", x)
    shape = _pooled_shape(x.shape, window)
    _like("out", out, dtype, shape)
    _like("index", idx, numpy.int32, shape)
    _one_device(x=x, out=out, index=idx)
    if out.size:
        _launch("maxpool_forward", x, (_grid(x, out.size),), (THREADS,), (x, out, idx, *_geometry(x.shape, window)))
    return out


def maxpool_backward(dy, idx, window, dx):
    """``dx`` = each output's gradient at its window's maximum, summed where windows overlap."""
    dtype = _images("dx", dx)
    shape = _pooled_shape(dx.shape, window)
    _like("dy", dy, dtype, shape)
    _like("index", idx, numpy.int32, shape)
    _one_device(dy=dy, index=idx, dx=dx)
    if dx.size:
        _launch("maxpool_backward", dx, (_grid(dx, dx.size),), (THREADS,),
                (dy, idx, dx, *_geometry(dx.shape, window)))
    return dx


def avgpool_forward(x, window, out):
    """``out`` = each window's mean, the padding counted as zeros. Returns ``out``."""
    dtype = _images("x", x)
    _like("out", out, dtype, _pooled_shape(x.shape, window))
    _one_device(x=x, out=out)
    if out.size:
        _launch("avgpool_forward", x, (_grid(x, out.size),), (THREADS,), (x, out, *_geometry(x.shape, window)))
    return out


def avgpool_backward(dy, window, dx):
    """``dx`` = each output's gradient shared by its window. Returns ``dx``."""
    dtype = _images("dx", dx)
    _like("dy", dy, dtype, _pooled_shape(dx.shape, window))
    _one_device(dy=dy, dx=dx)
    if dx.size:
        _launch("avgpool_backward", dx, (_grid(dx, dx.size),), (THREADS,), (dy, dx, *_geometry(dx.shape, window)))
    return dx


# ----- batch normalisation over (n, c, l) ---------------------------------------------------------------

def _channels(x3, *vectors):
    """Check a contiguous (n, c, l) array of a storage dtype and its per-channel (c,) vectors (name,
    array) in its compute dtype."""
    dtype = _float_array("x", x3, STORAGE)
    if x3.ndim != 3:
        raise ShapeError(f"x has shape {tuple(x3.shape)}; expected (batch, channels, values per channel)")
    for what, vector in vectors:
        _like(what, vector, COMPUTE[dtype], (x3.shape[1],))
    return dtype, (_i64(x3.shape[0]), numpy.int32(x3.shape[1]), _i64(x3.shape[2]))


def batchnorm_stats(x3, mean, invstd, eps, running_mean, running_var, momentum):
    """The batch's mean and 1/sqrt(var + eps) per channel; the running estimates updated (PyTorch's
    momentum, unbiased variance). (channel, chunk of images) blocks, each chunk's mean and centred sum of
    squares, merged in chunk order: deterministic."""
    _, dims = _channels(x3, ("mean", mean), ("invstd", invstd), ("running_mean", running_mean),
                        ("running_var", running_var))
    _one_device(x=x3, mean=mean, invstd=invstd, running_mean=running_mean, running_var=running_var)
    n, c, l = x3.shape
    if n * l < 2:
        raise ShapeError(f"batch norm statistics need at least 2 values per channel, got x of shape {x3.shape}")
    if not c:
        return mean, invstd
    chunks, chunk_images = channel_chunks(n, c, l, _sm_count(x3.device.id))
    chunk_stats = (_chunk_rows(mean, chunks), _chunk_rows(invstd, chunks))  # each chunk's mean, squares
    stats = (mean, invstd, running_mean, running_var)
    _launch("batchnorm_stats", x3, (c, chunks), (BN_THREADS,),
            (x3, *stats, *chunk_stats, *dims, _i64(chunk_images), numpy.float64(eps), numpy.float64(momentum)))
    if chunks > 1:
        _launch("batchnorm_stats_merge", mean, (_grid(mean, c),), (THREADS,),
                (*chunk_stats, *stats, *dims, _i64(chunk_images), numpy.float64(eps), numpy.float64(momentum)))
    return mean, invstd


def batchnorm_apply(x3, mean, invstd, gamma, beta, y3):
    """``y3`` = (x - mean) invstd gamma + beta per channel. Returns ``y3``."""
    dtype, dims = _channels(x3, ("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta))
    _like("y", y3, dtype, x3.shape)
    _one_device(x=x3, mean=mean, invstd=invstd, gamma=gamma, beta=beta, y=y3)
    if x3.size:
        _launch("batchnorm_apply", x3, (_grid(x3, x3.size),), (THREADS,), (x3, mean, invstd, gamma, beta, y3, *dims))
    return y3


def batchnorm_backward(dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta, training=True):
    """``dgamma``, ``dbeta`` (per-channel sums over (channel, chunk of images) blocks, the chunks added in
    order) and ``dx3``. Returns ``dx3``."""
    dtype, dims = _channels(x3, ("mean", mean), ("invstd", invstd), ("gamma", gamma), ("dgamma", dgamma),
                            ("dbeta", dbeta))
    _like("dy", dy3, dtype, x3.shape)
    _like("dx", dx3, dtype, x3.shape)
    _one_device(dy=dy3, x=x3, mean=mean, invstd=invstd, gamma=gamma, dx=dx3, dgamma=dgamma, dbeta=dbeta)
    n, c, l = x3.shape
    if not c:
        return dx3
    if not n * l:
        dgamma.fill(0)
        dbeta.fill(0)
        return dx3
    chunks, chunk_images = channel_chunks(n, c, l, _sm_count(x3.device.id))
    sums = (_chunk_rows(dgamma, chunks), _chunk_rows(dbeta, chunks))
    _launch("batchnorm_backward_reduce", x3, (c, chunks), (BN_THREADS,),
            (dy3, x3, mean, invstd, *sums, *dims, _i64(chunk_images)))
    for rows, out in zip(sums, (dgamma, dbeta)):
        _add_chunks(rows, out)
    if x3.size:
        _launch("batchnorm_backward_apply", x3, (_grid(x3, x3.size),), (THREADS,),
                (dy3, x3, mean, invstd, gamma, dgamma, dbeta, dx3, *dims, numpy.int32(bool(training))))
    return dx3
