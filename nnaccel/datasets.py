"""Data sets: MNIST from IDX files or a Keras ``mnist.npz``, scikit-learn's
8x8 digits, and seeded synthetic data for benchmarks.

Every loader returns ``(x, y)``: ``x`` float32 of shape (n, features) scaled to
[0, 1] and C-contiguous, ``y`` int64 of shape (n,).

Data files are treated as untrusted input: headers are checked against the
bytes actually present before anything is allocated from them, decompressed
streams are read with a cap, and every problem with a file is raised as a
DataError naming the file and what was found versus expected.
"""

import gzip
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from nnaccel.errors import ConfigError, DataError, ShapeError, check_int

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_MAGIC_MEANING = {
    IMAGES_MAGIC: "an images file (uint8, 3 dimensions)",
    LABELS_MAGIC: "a labels file (uint8, 1 dimension)",
}
_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_MNIST_CLASSES = 10
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_DIGITS_TRAIN_FRACTION = 0.8
_SYNTHETIC_NOISE = 0.25  # std of the noise around centroids drawn from [0, 1]


def _read_at_most(stream, limit):
    """Read up to ``limit`` bytes in chunks.

    Memory then grows with the data actually present, never with a size
    claimed by a (possibly lying) header or a gzip bomb.
    """
    buffer = bytearray()
    while len(buffer) < limit:
        chunk = stream.read(min(_CHUNK, limit - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


def read_idx(path, expected_magic=None):
    """Read one IDX file (plain or gzip, detected by its first bytes) as uint8.

    Only the unsigned-byte IDX type is supported. With ``expected_magic``
    (IMAGES_MAGIC or LABELS_MAGIC) the file must carry exactly that magic.
    Raises DataError naming the file for anything missing, corrupt or
    inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise DataError(f"{path}: {problem}")
    is_gzip = False
    try:
        with path.open("rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
            return _parse_idx(stream, path, expected_magic)
    except (OSError, EOFError, zlib.error) as exc:
        problem = "corrupt gzip data" if is_gzip else "cannot read"
        raise DataError(f"{path}: {problem} ({exc or type(exc).__name__})") from exc


def _parse_idx(stream, path, expected_magic):
    """Check an IDX header, then read exactly the payload it announces."""
    head = _read_at_most(stream, 4)
    if len(head) < 4:
        raise DataError(
            f"{path}: truncated header: {len(head)} bytes, "
            "expected a 4-byte IDX magic number"
        )
    magic = int.from_bytes(head, "big")
    dtype_code, ndim = head[2], head[3]
    if expected_magic is not None and magic != expected_magic:
        found = _MAGIC_MEANING.get(magic, f"type 0x{dtype_code:02X}, {ndim} dimensions")
        raise DataError(
            f"{path}: magic number {magic} (0x{magic:08X}, {found}) found, "
            f"expected {expected_magic} (0x{expected_magic:08X}, "
            f"{_MAGIC_MEANING[expected_magic]})"
        )
    if head[:2] != b"\0\0":
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{magic:08X} "
            "does not start with two zero bytes"
        )
    if dtype_code != _IDX_UINT8:
        raise DataError(
            f"{path}: IDX data type 0x{dtype_code:02X} is not supported, "
            f"expected 0x{_IDX_UINT8:02X} (unsigned byte)"
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions, expected at least 1")
    dims_bytes = _read_at_most(stream, 4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(
            f"{path}: truncated header: {ndim} dimension sizes announced, "
            f"{len(dims_bytes)} of their {4 * ndim} bytes present"
        )
    shape = struct.unpack(f">{ndim}I", dims_bytes)
    _check_representable(shape, path)
    size = math.prod(shape)
    payload = _read_at_most(stream, size + 1)
    if len(payload) < size:
        raise DataError(
            f"{path}: truncated data: header shape {shape} needs {size} bytes, "
            f"file holds {len(payload)}"
        )
    if len(payload) > size:
        raise DataError(
            f"{path}: trailing data: header shape {shape} needs {size} bytes, "
            "file holds more"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _check_representable(shape, name):
    """Reject shapes numpy cannot hold, even empty ones like (0, 2**32, 2**32)."""
    if math.prod(max(dim, 1) for dim in shape) > np.iinfo(np.intp).max:
        raise DataError(f"{name}: shape {shape} is too large for numpy")


def load_mnist(path, split="train"):
    """Load MNIST-style digits from a folder of IDX files or a Keras .npz.

    ``split`` is "train" or "test" (the ``t10k-*`` files, or ``x_test`` in an
    npz). Images may be any rows x cols; x then has rows*cols features.
    """
    if split not in _SPLIT_PREFIX:
        raise ConfigError(f"split {split!r} is not known: expected 'train' or 'test'")
    path = Path(path)
    if path.is_dir():
        images_path, labels_path = _find_idx_pair(path, split)
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        return _to_xy(images, labels, str(images_path), str(labels_path))
    if path.is_file():
        return _load_npz(path, split)
    raise DataError(f"{path}: no such file or folder")


def _find_idx(folder, prefix, kind, dims):
    """Return the first existing IDX file of one kind, and the names looked for."""
    names = (f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte")
    looked_for = " or ".join(f"{name}[.gz]" for name in names)
    candidates = (folder / (name + suffix) for name in names for suffix in ("", ".gz"))
    return next((c for c in candidates if c.is_file()), None), looked_for


def _find_idx_pair(folder, split):
    """Locate the images and labels files of ``split`` in ``folder``."""
    prefix = _SPLIT_PREFIX[split]
    images, images_looked_for = _find_idx(folder, prefix, "images", 3)
    labels, labels_looked_for = _find_idx(folder, prefix, "labels", 1)
    if images is None and labels is None:
        raise DataError(
            f"no {split} split in {folder}: looked for {images_looked_for} "
            f"and {labels_looked_for}"
        )
    if images is None:
        raise DataError(
            f"{folder}: found {labels.name} but no images for the {split} split: "
            f"looked for {images_looked_for}"
        )
    if labels is None:
        raise DataError(
            f"{folder}: found {images.name} but no labels for the {split} split: "
            f"looked for {labels_looked_for}"
        )
    return images, labels


def _to_xy(images, labels, images_name, labels_name):
    """Check that images (n, rows, cols) match labels (n,) and scale them."""
    count, rows, cols = images.shape
    if labels.shape[0] != count:
        raise DataError(
            f"{images_name} holds {count} images but {labels_name} "
            f"holds {labels.shape[0]} labels"
        )
    if count == 0:
        raise DataError(f"{images_name}: holds no images")
    if rows == 0 or cols == 0:
        raise DataError(f"{images_name}: images are {rows}x{cols}, expected a non-empty size")
    if labels.min() < 0 or labels.max() >= _MNIST_CLASSES:
        raise DataError(
            f"{labels_name}: labels range from {labels.min()} to {labels.max()}, "
            f"expected digits 0..{_MNIST_CLASSES - 1}"
        )
    x = np.array(images.reshape(count, rows * cols), dtype=np.float32, order="C")
    x /= np.float32(255)
    return x, labels.astype(np.int64)


def _load_npz(path, split):
    """Load one split of a Keras-style ``mnist.npz`` without trusting it."""
    suffix = "train" if split == "train" else "test"
    try:
        with zipfile.ZipFile(path) as archive:
            images = _read_npz_array(archive, path, f"x_{suffix}", 3)
            labels = _read_npz_array(archive, path, f"y_{suffix}", 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError,
            struct.error, NotImplementedError, RuntimeError) as exc:
        raise DataError(
            f"{path}: not a readable .npz archive ({exc or type(exc).__name__})"
        ) from exc
    if images.dtype != np.uint8:
        raise DataError(f"{path}[x_{suffix}]: dtype {images.dtype}, expected uint8")
    return _to_xy(images, labels, f"{path}[x_{suffix}]", f"{path}[y_{suffix}]")


def _read_npz_array(archive, path, key, ndim):
    """Read one integer array of an npz, checking its header against its size.

    numpy's own reader would allocate whatever a member's header claims and
    can unpickle objects; this reader does neither.
    """
    try:
        info = archive.getinfo(key + ".npy")
    except KeyError:
        keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
        raise DataError(f"{path}: no {key!r} array (found {keys})") from None
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise DataError(f"{path}[{key}]: .npy format version {version} is not supported")
        if dtype.kind not in "iu":
            raise DataError(f"{path}[{key}]: dtype {dtype}, expected integers")
        if len(shape) != ndim or min(shape) < 0:
            raise DataError(
                f"{path}[{key}]: shape {shape}, expected {ndim} non-negative dimensions"
            )
        _check_representable(shape, f"{path}[{key}]")
        size = math.prod(shape) * dtype.itemsize
        payload = _read_at_most(member, size + 1)
    if len(payload) != size:
        found = "more" if len(payload) > size else str(len(payload))
        raise DataError(f"{path}[{key}]: shape {shape} needs {size} bytes, member holds {found}")
    order = "F" if fortran_order else "C"
    return np.frombuffer(payload, dtype=dtype).reshape(shape, order=order)


def load_digits(split="train"):
    """scikit-learn's 8x8 digits (1,797 images) as float32 in [0, 1].

    A fixed seeded shuffle puts 1,437 images (80%) in "train" and 360 in
    "test"; "all" returns every image in scikit-learn's order.
    """
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split {split!r} is not known: expected 'train', 'test' or 'all'")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise DataError(
            "the digits data set needs scikit-learn: pip install scikit-learn"
        ) from exc
    digits = sklearn_load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if split == "all":
        return x, y
    order = np.random.default_rng(0).permutation(len(y))
    n_train = int(len(y) * _DIGITS_TRAIN_FRACTION)
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return x[chosen], y[chosen]


def load(name_or_path, split="train"):
    """Load a data set by name ("digits", "synthetic") or from a path (MNIST).

    The synthetic set has no test split: hold out data with train_val_split.
    """
    if name_or_path == "digits":
        return load_digits(split)
    if name_or_path == "synthetic":
        if split not in ("train", "all"):
            raise DataError(
                f"no {split} split in the synthetic data set: "
                "use train_val_split to hold out data"
            )
        return synthetic()
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder (nor a built-in data set: 'digits', 'synthetic')"
        )
    return load_mnist(path, split)


def _rng(seed):
    """A numpy Generator, with a bad seed reported as ConfigError."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"seed {seed!r} is not usable: {exc}") from exc


def synthetic(n=1024, features=784, classes=10, seed=0, dtype=np.float32):
    """A seeded, learnable classification set of any size, for benchmarks.

    Each class has a centroid drawn uniformly from [0, 1]^features; samples
    are centroid + Gaussian noise, clipped to [0, 1] like pixel data. Classes
    are balanced (sizes differ by at most one) and shuffled.
    """
    n = check_int(n, "n")
    features = check_int(features, "features")
    classes = check_int(classes, "classes")
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise ConfigError(f"dtype {dtype!r} is not a numpy dtype") from exc
    if dtype not in (np.float16, np.float32, np.float64):
        raise ConfigError(f"dtype {dtype} is not supported: expected float16, float32 or float64")
    draw_dtype = np.float64 if dtype == np.float64 else np.float32
    rng = _rng(seed)
    centroids = rng.random((classes, features), dtype=draw_dtype)
    y = rng.permutation(np.arange(n, dtype=np.int64) % classes)
    x = rng.standard_normal((n, features), dtype=draw_dtype)
    x *= _SYNTHETIC_NOISE
    x += centroids[y]
    np.clip(x, 0, 1, out=x)
    return x.astype(dtype, copy=False), y


def train_val_split(x, y, fraction=0.2, seed=0):
    """Shuffle (seeded) and hold out ``fraction`` of the samples for validation.

    Returns ``(x_train, y_train), (x_val, y_val)``; dtypes are kept.
    """
    x, y = np.asarray(x), np.asarray(y)
    is_number = isinstance(fraction, (int, float, np.floating)) and not isinstance(fraction, bool)
    if not (is_number and 0 < fraction < 1):
        raise ConfigError(f"fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ShapeError(
            f"x and y must hold the same number of samples, got shapes {x.shape} and {y.shape}"
        )
    n_val = round(len(x) * fraction)
    if n_val == 0 or n_val == len(x):
        raise ConfigError(
            f"fraction {fraction} of {len(x)} samples leaves an empty "
            f"{'validation' if n_val == 0 else 'training'} set"
        )
    order = _rng(seed).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])
