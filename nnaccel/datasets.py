"""Data sets: MNIST from IDX files or a Keras ``mnist.npz``, scikit-learn's
8x8 digits, and seeded synthetic data for benchmarks.

Every loader returns ``(x, y)``: ``x`` float32 of shape (n, features) scaled to
[0, 1] and C-contiguous, ``y`` int64 of shape (n,).

Data files are treated as untrusted input: headers are checked against the
bytes actually present before anything is allocated from them, decompressed
streams are read with a cap, a damaged gzip or zip stream is reported as
corrupt or truncated (not as whatever its garbled content looks like), and
every problem with a file is raised as a DataError naming the file and what
was found versus expected.
"""

import contextlib
import gzip
import math
import os
import re
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from nnaccel.backend import array_device, get_backend
from nnaccel.errors import (SPECIAL_FILE, ConfigError, DataError, DeviceError, ShapeError, _held, check_array,
                            check_int, check_range, described)

IMAGES_NDIM = 3  # count, rows, columns
LABELS_NDIM = 1  # count

# The third byte of an IDX magic number is the element type; data is big-endian.
_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_TYPE_LIST = ", ".join(f"0x{code:02X} {dtype.name}" for code, dtype in _IDX_TYPES.items())
_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"  # how a numpy.save file starts
_ZIP_MAGIC = b"PK"  # how every zip archive, so every .npz, starts
_CHUNK = 1 << 20
_CHECKSUM_READ_CHUNKS = 64  # at most 64 MiB read on to reach a damaged stream's checksum
_PIXEL_TOP = {"u": 255, "i": 255, "f": 1}  # integer pixels are 0..255, float pixels 0..1
CLASSES = 10  # every data set here holds digits, labels 0..9 (a split may lack some)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class MissingSplit(DataError):
    """The data set has no such split at all (a damaged one raises a plain DataError): what
    ``nnaccel evaluate`` checks to fall back from the test split to the validation part."""
_DIGITS_TRAIN_FRACTION = 0.8


def _check_split(split, known):
    """A ConfigError for a split name not in ``known`` (a typo), where a MissingSplit is a known split the data
    set lacks (which ``nnaccel evaluate`` falls back from)."""
    if split not in known:
        names = [repr(name) for name in known]
        raise ConfigError(f"split {split!r} is not known: expected {', '.join(names[:-1])} or {names[-1]}")


def _check_path(path, what):
    """A ConfigError saying what ``what`` takes unless ``path`` is a str or a path (Path() raised a TypeError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what}, got {described(path)}")
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


def _read_array(stream, shape, dtype, name):
    """Read exactly the bytes of a ``shape`` array of ``dtype``, as a flat array.

    Fewer or more bytes than the shape needs is a DataError naming ``name``;
    memory grows with the bytes present, never with the shape claimed.
    """
    _check_representable(shape, name)
    size = math.prod(shape) * dtype.itemsize
    payload = _read_at_most(stream, size + 1)
    if len(payload) != size:
        problem, found = ("truncated", len(payload)) if len(payload) < size else ("trailing", "more")
        raise DataError(
            f"{name}: {problem} data: shape {shape} of {dtype.name} needs {size} bytes, found {found}"
        )
    return np.frombuffer(payload, dtype=dtype)


@contextlib.contextmanager
def _checksum_first(stream):
    """Report a damaged compressed stream as such, not as the content it garbled.

    gzip and zip check a stream's CRC only at its end, so a flipped bit
    shows first as a wrong header or size. When the content is found wrong,
    read on (bounded) so that a failing checksum is what gets raised.
    """
    try:
        yield stream
    except DataError:
        for _ in range(_CHECKSUM_READ_CHUNKS):
            if not stream.read(_CHUNK):
                break
        raise


def _detail(exc):
    """An exception's message, or its type's name when it has none."""
    return str(exc) or type(exc).__name__


def read_idx(path, ndim=None):
    """Read one IDX file (plain or gzip, detected by its first bytes).

    Every IDX element type is read (uint8, int8, int16, int32, float32,
    float64; big-endian in the file) into a native-endian array of that
    dtype. With ``ndim`` (IMAGES_NDIM or LABELS_NDIM) the file must have
    that many dimensions. Raises DataError naming the file for anything
    missing, corrupt or inconsistent.
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
            if not is_gzip:
                return _parse_idx(raw, path, ndim)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream, _checksum_first(stream):
                return _parse_idx(stream, path, ndim)
    except (OSError, EOFError, zlib.error) as exc:
        problem = "corrupt or truncated gzip data" if is_gzip else "cannot read"
        raise DataError(f"{path}: {problem} ({_detail(exc)})") from exc


def _parse_idx(stream, path, ndim):
    """Check an IDX header, then read exactly the payload it announces."""
    head = _read_at_most(stream, 4)
    if len(head) < 4:
        raise DataError(
            f"{path}: truncated header: {len(head)} bytes, "
            "expected a 4-byte IDX magic number"
        )
    magic = int.from_bytes(head, "big")
    dtype_code, dims = head[2], head[3]
    if head[:2] != b"\0\0":
        raise DataError(
            f"{path}: not an IDX file: magic number 0x{magic:08X} "
            "does not start with two zero bytes"
        )
    if dtype_code not in _IDX_TYPES:
        raise DataError(
            f"{path}: IDX data type 0x{dtype_code:02X} is not one of the IDX types ({_IDX_TYPE_LIST})"
        )
    dtype = _IDX_TYPES[dtype_code]
    if dims == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions, expected at least 1")
    if ndim is not None and dims != ndim:
        raise DataError(
            f"{path}: magic number {magic} (0x{magic:08X}: {dtype.name}, {dims}-dimensional) "
            f"found, expected {ndim}-dimensional data"
        )
    dims_bytes = _read_at_most(stream, 4 * dims)
    if len(dims_bytes) < 4 * dims:
        raise DataError(
            f"{path}: truncated header: {dims} dimension sizes announced, "
            f"{len(dims_bytes)} of their {4 * dims} bytes present"
        )
    shape = struct.unpack(f">{dims}I", dims_bytes)
    array = _read_array(stream, shape, dtype, path).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _check_representable(shape, name):
    """Reject shapes numpy cannot hold, even empty ones like (0, 2**32, 2**32)."""
    if math.prod(max(dim, 1) for dim in shape) > np.iinfo(np.intp).max:
        raise DataError(f"{name}: shape {shape} is too large for numpy")


def load_mnist(path, split="train"):
    """Load MNIST-style digits from a folder of IDX files or a Keras .npz.

    ``split`` is "train", "test" (the ``t10k-*`` files, or ``x_test`` in an
    npz) or "all": every split it holds, train then test, as the digits' and
    the synthetic set's "all" is every sample. Images may be any rows x
    cols; x then has rows*cols features.
    Pixels may be of any integer type with values 0..255 (divided by 255,
    as uint8 MNIST always is) or float already in [0, 1] (taken as they
    are); anything else (negative, too large, NaN, infinity) is refused
    rather than guessed at. Labels may be of any integer type, 0..9.
    """
    _check_split(split, (*_SPLIT_PREFIX, "all"))
    _check_path(path, "load_mnist takes the path of a folder of MNIST IDX files or of a Keras .npz")
    path = Path(path)
    if split == "all":
        return _every_split(path)
    if path.is_dir():
        images_path, labels_path = _find_idx_pair(path, split)
        images = read_idx(images_path, IMAGES_NDIM)
        labels = read_idx(labels_path, LABELS_NDIM)
        return _to_xy(images, labels, str(images_path), str(labels_path))
    if path.is_file():
        if re.search(r"idx\d-ubyte(\.gz)?$", path.name):
            raise DataError(f"{path} is one IDX file; give the folder that holds it ({path.parent}), where its "
                            f"images and labels files are found by name")
        return _load_npz(path, split)
    raise DataError(f"{path}: {SPECIAL_FILE if path.exists() else 'no such file or folder'}")


def _every_split(path):
    """The splits ``path`` holds, train then test, joined; a MissingSplit naming both where it holds neither."""
    parts, missing = {}, []
    for split in _SPLIT_PREFIX:
        try:
            parts[split] = load_mnist(path, split)
        except MissingSplit as error:
            missing.append(str(error))
    if not parts:
        raise MissingSplit("; ".join(missing))
    widths = {split: x.shape[1] for split, (x, _) in parts.items()}
    if len(set(widths.values())) > 1:
        raise DataError(f"{path}: split 'all' cannot join its splits: the train images have {widths['train']} "
                        f"pixels each, the test images {widths['test']}")
    if len(parts) == 1:
        return next(iter(parts.values()))
    return tuple(np.concatenate(arrays) for arrays in zip(*parts.values()))


def _idx_candidates(folder, prefix, kind, dims):
    """The IDX names of one kind, in the order they are looked for, and how a message lists them."""
    names = (f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte")
    looked_for = " or ".join(f"{name}[.gz]" for name in names)
    return [folder / (name + suffix) for name in names for suffix in ("", ".gz")], looked_for


def _find_idx(folder, prefix, kind, dims):
    """Return the first existing IDX file of one kind, and the names looked for; with none, a folder of one
    of those names (an archive unpacked into folders named as its files) is a DataError."""
    candidates, looked_for = _idx_candidates(folder, prefix, kind, dims)
    found = next((c for c in candidates if c.is_file()), None)
    nested = next((c for c in candidates if c.is_dir()), None)
    if found is None and nested is not None:
        raise DataError(f"{nested} is a folder, not an IDX file: move the file it holds up into {folder}")
    return found, looked_for


def files_read(path):
    """``(name, file)`` for each file a data path is read from, and for each name looked for before it in a
    folder, which would be read in its place once it exists (what an output must not be written at)."""
    path = Path(path)
    if not path.is_dir():
        return [(path, path)]
    pairs = []
    for prefix in _SPLIT_PREFIX.values():
        for kind, dims in (("images", 3), ("labels", 1)):
            candidates, _ = _idx_candidates(path, prefix, kind, dims)
            found = next((index for index, name in enumerate(candidates) if name.is_file()), None)
            if found is not None:
                pairs += [(name, candidates[found]) for name in candidates[:found + 1]]
    return pairs


def _find_idx_pair(folder, split):
    """Locate the images and labels files of ``split`` in ``folder``."""
    prefix = _SPLIT_PREFIX[split]
    images, images_looked_for = _find_idx(folder, prefix, "images", 3)
    labels, labels_looked_for = _find_idx(folder, prefix, "labels", 1)
    if images is None and labels is None:
        other = "test" if split == "train" else "train"
        holds_other = any(_find_idx(folder, _SPLIT_PREFIX[other], kind, dims)[0]
                          for kind, dims in (("images", 3), ("labels", 1)))
        there = f" (it holds only the {other} split, {_SPLIT_PREFIX[other]}-*)" if holds_other else ""
        raise MissingSplit(
            f"no {split} split in {folder}: looked for {images_looked_for} "
            f"and {labels_looked_for}{there}"
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
    """Check that images (n, rows, cols) match labels (n,) and scale them to [0, 1]."""
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
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_name}: labels are {labels.dtype.name}, expected integers "
            f"(digits 0..{CLASSES - 1})"
        )
    if labels.min() < 0 or labels.max() >= CLASSES:
        raise DataError(
            f"{labels_name}: labels range from {labels.min()} to {labels.max()}, "
            f"expected digits 0..{CLASSES - 1}"
        )
    top = _pixel_top(images, images_name)
    x = np.array(images.reshape(count, rows * cols), dtype=np.float32, order="C")
    x /= np.float32(top)
    return x, labels.astype(np.int64)


def _pixel_top(images, name):
    """The value of white in ``images``: 255 for integers in 0..255, 1 for floats in [0, 1].

    Other values have no agreed meaning as pixels, so they are refused.
    """
    top = _PIXEL_TOP[images.dtype.kind]
    low, high = images.min(), images.max()
    if not (low >= 0 and high <= top):  # also false for NaN
        found = (f"range from {low} to {high}" if np.isfinite([low, high]).all()
                 else "include NaN or infinity")
        expected = ("0..255 for integer pixels (divided by 255)" if top == 255
                    else "[0, 1] for float pixels (taken as they are)")
        raise DataError(f"{name}: {images.dtype.name} pixels {found}, expected {expected}")
    return top


def _load_npz(path, split):
    """Load one split of a Keras-style ``mnist.npz`` without trusting it."""
    suffix = "train" if split == "train" else "test"
    try:
        with open(path, "rb") as file:
            head = file.read(len(_NPY_MAGIC))
        if head == _NPY_MAGIC:  # a common mistake: numpy.save's file, not savez's
            raise DataError(f"{path} is one .npy array, not a data set: give a folder of MNIST IDX files or a "
                            f"Keras-style .npz of images and labels (numpy.savez('digits.npz', "
                            f"x_train=images, y_train=labels))")
        if not _ZIP_MAGIC.startswith(head[:len(_ZIP_MAGIC)]):  # not one cut short: none of it is an archive
            gzipped = ": it is gzip-compressed (gunzip it)" if head.startswith(_GZIP_MAGIC) else ""
            raise DataError(f"{path} is not a .npz archive (a zip file){gzipped}; give a folder of MNIST IDX files "
                            f"(gzip'd or not, under their MNIST names) or a Keras-style .npz")
        with zipfile.ZipFile(path) as archive:
            if not {f"x_{suffix}.npy", f"y_{suffix}.npy"} & set(archive.namelist()):
                raise MissingSplit(f"{path}: no {split} split (no x_{suffix} or y_{suffix} array; found "
                                   f"{_npz_keys(archive)})")
            images = _read_npz_array(archive, path, f"x_{suffix}", 3)
            labels = _read_npz_array(archive, path, f"y_{suffix}", 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError,
            struct.error, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"{path}: corrupt or truncated .npz archive ({_detail(exc)})") from exc
    return _to_xy(images, labels, f"{path}[x_{suffix}]", f"{path}[y_{suffix}]")


def _npz_keys(archive, shown=10):
    """The names of an npz's arrays, as numpy.load gives them, for a message: the first ``shown`` of them."""
    keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
    return f"{keys[:shown]}" + (f" and {len(keys) - shown:,} more" if len(keys) > shown else "")


def _read_npz_array(archive, path, key, ndim):
    """Read one integer or float array of an npz, checking its header against its size.

    numpy's own reader would allocate whatever a member's header claims and
    can unpickle objects; this reader does neither.
    """
    try:
        info = archive.getinfo(key + ".npy")
    except KeyError:
        raise DataError(f"{path}: no {key!r} array (found {_npz_keys(archive)})") from None
    name = f"{path}[{key}]"
    with archive.open(info) as member, _checksum_first(member):
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{name}: .npy format version {version} is not supported")
        parse = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape, fortran_order, dtype = parse(member)
        except (ValueError, SyntaxError, TypeError, tokenize.TokenError, RecursionError, MemoryError) as exc:
            # what a literal_eval of any text raises
            raise DataError(f"{name}: corrupt .npy header ({_detail(exc)})") from None
        if dtype.kind not in "iuf":
            raise DataError(f"{name}: dtype {dtype}, expected integers or floats")
        if len(shape) != ndim or min(shape) < 0:
            raise DataError(f"{name}: shape {shape}, expected {ndim} non-negative dimensions")
        flat = _read_array(member, shape, dtype, name)
    return flat.reshape(shape, order="F" if fortran_order else "C")


SAMPLE = "mnist"  # the name of the embedded data set


def _sample_folder():
    from importlib.resources import files

    return files("nnaccel").joinpath("data", "mnist-sample")


def load_mnist_sample(split="train"):
    """The 7,996 real MNIST training images that ship inside nnaccel (CC BY-SA 3.0: see
    ``nnaccel/data/mnist-sample``), 28x28, as ``(x, y)`` like ``load_mnist``; nothing is downloaded.

    The sample has no test split: hold out part of it with ``train_val_split``; "all" is its train split.
    """
    _check_split(split, ("train", "test", "all"))
    if split == "test":
        raise MissingSplit(f"the embedded MNIST sample has only a train split (7,996 images), not {split!r}: "
                        f"hold out part of it (nnaccel train does: --validation-split)")
    folder = _sample_folder()
    images = read_idx(folder.joinpath("train-images-idx3-ubyte.gz"), IMAGES_NDIM)
    labels = read_idx(folder.joinpath("train-labels-idx1-ubyte.gz"), LABELS_NDIM)
    return _to_xy(images, labels, "the MNIST sample's images", "the MNIST sample's labels")


def load_digits(split="train"):
    """scikit-learn's 8x8 digits (1,797 images) as float32 in [0, 1].

    A fixed seeded shuffle puts 1,437 images (80%) in "train" and 360 in
    "test"; "all" returns every image in scikit-learn's order.
    """
    _check_split(split, ("train", "test", "all"))
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise DataError(
            "the digits data set needs scikit-learn, an optional extra: pip install 'nnaccel[digits]'"
        ) from None
    digits = sklearn_load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if split == "all":
        return x, y
    order = np.random.default_rng(0).permutation(len(y))
    n_train = int(len(y) * _DIGITS_TRAIN_FRACTION)
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return x[chosen], y[chosen]


BUILT_IN = (SAMPLE, "digits", "synthetic")  # names ``load`` takes before any path


def load(name_or_path, split="train"):
    """Load a data set by name ("mnist", the embedded sample; "digits"; "synthetic") or from a path
    (MNIST IDX files or a Keras mnist.npz).

    The sample and the synthetic set have no test split: hold out data with train_val_split.
    """
    _check_path(name_or_path, f"load takes a data set's name ({', '.join(map(repr, BUILT_IN))}) or a path")
    if name_or_path == SAMPLE:
        return load_mnist_sample(split)
    if name_or_path == "digits":
        return load_digits(split)
    if name_or_path == "synthetic":
        _check_split(split, ("train", "test", "all"))
        if split == "test":
            raise MissingSplit(
                f"no {split} split in the synthetic data set: "
                "use train_val_split to hold out data"
            )
        return synthetic()
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder (nor a built-in data set: {', '.join(map(repr, BUILT_IN))})"
        )
    return load_mnist(path, split)


def _rng(seed):
    """A numpy Generator, with a bad seed reported as ConfigError; a 0-d array seeds as the number it holds."""
    try:
        return np.random.default_rng(_held(seed))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"seed {seed!r} is not usable: {exc}") from exc


def synthetic(n=1024, features=784, classes=10, seed=0, dtype=np.float32):
    """A seeded, learnable classification set of any size, for benchmarks.

    Each class has a centroid drawn uniformly from [0, 1]^features; samples
    are centroid + Gaussian noise, clipped to [0, 1] like pixel data. Classes
    are balanced (sizes differ by at most one) and shuffled. ``features`` is
    a count, or a sample's shape (``(1, 28, 28)`` for images: x is then
    ``(n, 1, 28, 28)``, the same values as ``features=784`` reshaped).
    """
    n = check_int(n, "n")
    shape = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    if not shape:
        raise ConfigError("features must be a count or a non-empty shape, got ()")
    shape = tuple(check_int(size, "features" if len(shape) == 1 else "each size in features") for size in shape)
    features = math.prod(shape)
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
    return x.astype(dtype, copy=False).reshape((n,) + shape), y


def train_val_split(x, y, fraction=0.2, seed=0):
    """Shuffle (seeded) and hold out ``fraction`` of the samples for validation.

    Returns ``(x_train, y_train), (x_val, y_val)``; dtypes are kept, and so are devices: an array on a GPU
    (CuPy's, or any DLPack array there) is split there, into CuPy arrays, in the order a host copy would be.
    """
    (x, x_ops), (y, y_ops) = _on_its_device(x, "x"), _on_its_device(y, "y")
    fraction = check_range(fraction, "fraction", 0, 1, low_open=True, high_open=True)
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
    (x_train, x_val), (y_train, y_val) = (_rows(array, ops, order[n_val:], order[:n_val])
                                          for array, ops in ((x, x_ops), (y, y_ops)))
    return (x_train, y_train), (x_val, y_val)


def _on_its_device(array, what):
    """``array`` and the backend of its device: a host data set (a list too) as a NumPy array, one on a GPU as
    a CuPy array there, shared without a copy; a DeviceError for one on a device nnaccel has no backend for."""
    device = array_device(array)
    if device in (None, "cpu"):
        return check_array(array, what), get_backend("cpu")
    if not device.startswith("cuda:"):
        raise DeviceError(f"{what} is on {device}: train_val_split splits host arrays and CUDA ones")
    ops = get_backend(device)
    return ops.asarray(array, what=what), ops


def _rows(array, ops, *parts):
    """The rows of ``array`` at each host index array of ``parts``, gathered on its device (``ops``): only the
    indices are copied there."""
    with ops.activate():
        return [array[ops.asarray(index)] for index in parts]
