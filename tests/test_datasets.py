"""Tests of nnaccel.datasets: real MNIST, IDX/npz round trips of every IDX
element type, pixel and label values, corrupt and hostile files (always
DataError naming the file), digits, synthetic data and train/validation
splits. Damaged gzip and zip streams are in test_damaged_data.py."""

import gzip
import os
import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nnaccel as nn
from nnaccel import datasets
from nnaccel.errors import ConfigError, DataError, ShapeError

MNIST_SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-subset"
MNIST_SUBSET_CLASS_COUNTS = [795, 905, 788, 811, 798, 701, 797, 853, 753, 795]
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


IDX_TYPE_CODES = {np.dtype(name): code for name, code in [
    ("uint8", 0x08), ("int8", 0x09), ("int16", 0x0B), ("int32", 0x0C), ("float32", 0x0D), ("float64", 0x0E)]}


def idx_bytes(array, dtype=np.uint8):
    """Encode an array as an IDX file of ``dtype``, big-endian as the format has it."""
    dtype = np.dtype(dtype)
    array = np.asarray(array, dtype=dtype.newbyteorder(">"))
    header = struct.pack(">I", IDX_TYPE_CODES[dtype] << 8 | array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write(path, data, compress=False):
    """Write bytes to ``path``, gzip-compressed if asked; return the path."""
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def sample_digits(count=5, rows=28, cols=28, seed=0):
    """Random uint8 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    return images, labels


def write_split(folder, images, labels, prefix="train", compress=False, dotted=False):
    """Write an images/labels IDX pair named like the MNIST originals."""
    sep = "." if dotted else "-"
    suffix = ".gz" if compress else ""
    images_name = f"{prefix}-images{sep}idx3-ubyte{suffix}"
    labels_name = f"{prefix}-labels{sep}idx1-ubyte{suffix}"
    images_path = write(folder / images_name, idx_bytes(images), compress)
    labels_path = write(folder / labels_name, idx_bytes(labels), compress)
    return images_path, labels_path


def expected_x(images):
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255)


def assert_data_error(call, *fragments):
    """``call`` raises DataError whose message holds every fragment."""
    with pytest.raises(DataError) as caught:
        call()
    for fragment in fragments:
        assert str(fragment) in str(caught.value)
    return str(caught.value)


# Real MNIST --------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_subset():
    if not MNIST_SUBSET.is_dir():
        pytest.skip(f"real MNIST subset not found at {MNIST_SUBSET}")
    return datasets.load_mnist(MNIST_SUBSET)


def test_real_mnist_shape_range_and_class_counts(mnist_subset):
    x, y = mnist_subset
    assert x.shape == (7996, 784) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.shape == (7996,) and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == MNIST_SUBSET_CLASS_COUNTS


def test_real_mnist_through_load(mnist_subset):
    x, y = datasets.load(str(MNIST_SUBSET))
    np.testing.assert_array_equal(x, mnist_subset[0])
    np.testing.assert_array_equal(y, mnist_subset[1])


def test_real_mnist_has_no_test_split(mnist_subset):
    assert_data_error(lambda: datasets.load_mnist(MNIST_SUBSET, split="test"),
                      "t10k-images-idx3-ubyte", str(MNIST_SUBSET), "test")


# Round trips -------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("split,prefix", [("train", "train"), ("test", "t10k")])
@pytest.mark.parametrize("dotted", [False, True])
def test_idx_folder_round_trip(tmp_path, compress, split, prefix, dotted):
    images, labels = sample_digits(seed=len(prefix) + compress)
    write_split(tmp_path, images, labels, prefix, compress, dotted)
    x, y = datasets.load_mnist(tmp_path, split=split)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, expected_x(images))
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)


def test_both_splits_in_one_folder(tmp_path):
    train, test = sample_digits(6, seed=1), sample_digits(3, seed=2)
    write_split(tmp_path, *train, "train", compress=True)
    write_split(tmp_path, *test, "t10k")
    assert datasets.load_mnist(tmp_path, "train")[0].shape == (6, 784)
    np.testing.assert_array_equal(datasets.load(tmp_path, "test")[1], test[1])


def test_split_all_of_mnist_is_every_split_it_holds_train_then_test(tmp_path):
    """load_mnist, load and the sample refused split "all", which the digits and the synthetic set take as every
    sample: now it is train then test of a folder or an npz, the one split of one that holds one; a folder of
    neither names both, and splits of other image sizes are not joined."""
    train, test = sample_digits(6, seed=1), sample_digits(3, seed=2)
    both, npz = tmp_path / "both", tmp_path / "mnist.npz"
    both.mkdir()
    write_split(both, *train, "train", compress=True)
    write_split(both, *test, "t10k")
    np.savez(npz, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    for path in (both, npz):
        for x, y in (datasets.load_mnist(path, "all"), datasets.load(str(path), "all")):
            assert x.dtype == np.float32 and y.dtype == np.int64 and x.flags.c_contiguous
            np.testing.assert_array_equal(x, expected_x(np.concatenate([train[0], test[0]])))
            np.testing.assert_array_equal(y, np.concatenate([train[1], test[1]]))
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        folder = tmp_path / prefix
        folder.mkdir()
        write_split(folder, images, labels, prefix)
        x, y = datasets.load_mnist(folder, "all")
        np.testing.assert_array_equal(x, expected_x(images))
        np.testing.assert_array_equal(y, labels)
    with pytest.raises(datasets.MissingSplit) as caught:
        datasets.load_mnist(tmp_path, "all")
    assert str(caught.value) == (f"no train split in {tmp_path}: looked for train-images-idx3-ubyte[.gz] or "
                                 f"train-images.idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] or "
                                 f"train-labels.idx1-ubyte[.gz]; no test split in {tmp_path}: looked for "
                                 f"t10k-images-idx3-ubyte[.gz] or t10k-images.idx3-ubyte[.gz] and "
                                 f"t10k-labels-idx1-ubyte[.gz] or t10k-labels.idx1-ubyte[.gz]")
    write_split(tmp_path / "train", *sample_digits(2, rows=20, cols=20), "t10k")
    assert_data_error(lambda: datasets.load_mnist(tmp_path / "train", "all"),
                      f"{tmp_path / 'train'}: split 'all' cannot join its splits: the train images have 784 pixels "
                      f"each, the test images 400")
    for x, y in (datasets.load_mnist_sample("all"), datasets.load("mnist", "all")):
        np.testing.assert_array_equal(x, datasets.load_mnist_sample()[0])
        np.testing.assert_array_equal(y, datasets.load_mnist_sample()[1])


def test_any_image_size_gives_rows_times_cols_features(tmp_path):
    images, labels = sample_digits(4, rows=3, cols=5)
    write_split(tmp_path, images, labels)
    x, _ = datasets.load_mnist(tmp_path)
    assert x.shape == (4, 15)
    np.testing.assert_array_equal(x, expected_x(images))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 3, 4), (1, 1, 1, 5)])
def test_read_idx_round_trip(tmp_path, compress, shape):
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    path = write(tmp_path / "anything.bin", idx_bytes(array), compress)
    result = datasets.read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_round_trip(tmp_path, save):
    (x_train, y_train), (x_test, y_test) = sample_digits(6, seed=3), sample_digits(4, seed=4)
    path = tmp_path / "mnist.npz"
    save(path, x_train=x_train, y_train=y_train.astype(np.int64), x_test=x_test, y_test=y_test)
    x, y = datasets.load_mnist(path)
    np.testing.assert_array_equal(x, expected_x(x_train))
    np.testing.assert_array_equal(y, y_train)
    x, y = datasets.load(str(path), "test")
    assert x.flags.c_contiguous and y.dtype == np.int64
    np.testing.assert_array_equal(x, expected_x(x_test))
    np.testing.assert_array_equal(y, y_test)


def test_npz_fortran_order_is_read_correctly(tmp_path):
    images, labels = sample_digits(3, seed=5)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=np.asfortranarray(images), y_train=labels)
    x, _ = datasets.load_mnist(path)
    assert x.flags.c_contiguous
    np.testing.assert_array_equal(x, expected_x(images))


# IDX element types, pixel and label values ---------------------------------

IDX_TYPE_LIST = "0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64"
EXTREMES = {  # values whose bytes differ in every position, to catch a wrong byte order
    "uint8": [0, 1, 127, 128, 255, 0x5A],
    "int8": [-128, -1, 0, 1, 127, 0x5A],
    "int16": [-32768, -2, 258, 32767, 0x1234, 0],
    "int32": [-2**31, -2, 2**31 - 1, 0x01020304, 258, 0],
    "float32": [-1.5, 3.4e38, 1e-45, -0.0, np.inf, np.nan],
    "float64": [-1.5, 1.7e308, 5e-324, -0.0, -np.inf, np.nan],
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_read_idx_every_element_type(tmp_path, name, compress):
    array = np.array(EXTREMES[name], dtype=name).reshape(2, 3)
    path = write(tmp_path / f"{name}.idx", idx_bytes(array, name), compress)
    result = datasets.read_idx(path)
    assert result.dtype == np.dtype(name) and result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_idx_data_is_big_endian(tmp_path):
    path = write(tmp_path / "short.idx", b"\0\0\x0b\x01\0\0\0\x02" + b"\x01\x02\xff\xfe")
    assert datasets.read_idx(path).tolist() == [258, -2]
    path = write(tmp_path / "float.idx", b"\0\0\x0d\x01\0\0\0\x01" + b"\x3f\xc0\0\0")
    assert datasets.read_idx(path).tolist() == [1.5]


@pytest.mark.parametrize("code", [0x00, 0x07, 0x0A, 0x0F, 0x10, 0xFF])
def test_unknown_idx_type_is_refused_by_name(tmp_path, code):
    path = write(tmp_path / "odd.idx", bytes([0, 0, code, 1]) + struct.pack(">I", 1) + bytes(8))
    message = assert_data_error(lambda: datasets.read_idx(path), path)
    assert message == (f"{path}: IDX data type 0x{code:02X} is not one of the IDX types "
                       f"({IDX_TYPE_LIST})")


@pytest.mark.parametrize("name", ["int16", "int32", "float64"])
def test_multibyte_types_count_bytes_not_elements(tmp_path, name):
    data = idx_bytes(np.zeros((3, 2), name), name)
    itemsize = np.dtype(name).itemsize
    cut = write(tmp_path / "cut.idx", data[:-1])
    assert_data_error(lambda: datasets.read_idx(cut), cut, "truncated data",
                      f"of {name} needs {6 * itemsize} bytes, found {6 * itemsize - 1}")
    longer = write(tmp_path / "longer.idx", data + bytes(itemsize))
    assert_data_error(lambda: datasets.read_idx(longer), longer, "trailing data")


@pytest.mark.parametrize("name", ["int16", "float32"])
def test_dimension_count_is_checked_for_every_type(tmp_path, name):
    images, labels = sample_digits(3, rows=4, cols=4)
    flat = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images.reshape(3, 16), name))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), flat,
                      f"{name}, 2-dimensional) found, expected 3-dimensional data")
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images))
    square = write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels[:, None], name))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), square,
                      f"{name}, 2-dimensional) found, expected 1-dimensional data")


@pytest.mark.parametrize("name", ["int8", "int16", "int32", "float32", "float64"])
def test_pixels_of_any_type_in_range_load(tmp_path, name):
    """Integer pixels 0..255 are divided by 255 like uint8; floats in [0, 1] are kept."""
    images, labels = sample_digits(4, rows=3, cols=3)
    if name == "int8":
        images //= 2  # int8 holds 0..127
    pixels = images / 255.0 if name.startswith("float") else images
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(pixels, name), compress=True)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels, "int16"))
    x, y = datasets.load_mnist(tmp_path)
    assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int64
    np.testing.assert_allclose(x, expected_x(images), rtol=1e-6)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("name,pixels,found", [
    ("int8", [-1, 9], "int8 pixels range from -1 to 9, expected 0..255 for integer pixels"),
    ("int16", [0, 256], "int16 pixels range from 0 to 256, expected 0..255 for integer pixels"),
    ("int32", [-70000, 9], "int32 pixels range from -70000 to 9, expected 0..255"),
    ("float32", [0, 255], "float32 pixels range from 0.0 to 255.0, expected [0, 1] for float pixels"),
    ("float64", [-0.5, 0.5], "float64 pixels range from -0.5 to 0.5, expected [0, 1]"),
    ("float32", [np.nan, 0.5], "float32 pixels include NaN or infinity, expected [0, 1]"),
    ("float64", [0.5, np.inf], "float64 pixels include NaN or infinity, expected [0, 1]"),
])
def test_pixels_outside_their_range_are_refused(tmp_path, name, pixels, found):
    images = np.array(pixels, name).reshape(2, 1, 1)
    path = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, name))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes([1, 2]))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), path, found)


@pytest.mark.parametrize("name", ["float32", "float64"])
def test_float_labels_are_refused_by_name(tmp_path, name):
    images, labels = sample_digits(3)
    _, labels_path = write_split(tmp_path, images, labels)
    write(labels_path, idx_bytes(labels, name))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), labels_path,
                      f"labels are {name}, expected integers (digits 0..9)")


def test_signed_labels_out_of_range(tmp_path):
    images, labels = sample_digits(3)
    _, labels_path = write_split(tmp_path, images, labels)
    write(labels_path, idx_bytes([3, -1, 2], "int8"))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), labels_path,
                      "labels range from -1 to 3, expected digits 0..9")


def test_npz_pixels_follow_the_same_rules(tmp_path):
    images, labels = sample_digits(3, 4, 4)
    floats = write(tmp_path / "floats.npz", npz_bytes(x_train=images / 255.0, y_train=labels))
    np.testing.assert_allclose(datasets.load_mnist(floats)[0], expected_x(images), rtol=1e-6)
    wide = write(tmp_path / "wide.npz", npz_bytes(x_train=images.astype(">i2"), y_train=labels))
    np.testing.assert_array_equal(datasets.load_mnist(wide)[0], expected_x(images))
    bright = write(tmp_path / "bright.npz", npz_bytes(x_train=images * 2.0, y_train=labels))
    assert_data_error(lambda: datasets.load_mnist(bright), f"{bright}[x_train]",
                      "float64 pixels range from", "expected [0, 1]")
    float_labels = write(tmp_path / "labels.npz", npz_bytes(x_train=images, y_train=labels * 1.0))
    assert_data_error(lambda: datasets.load_mnist(float_labels), f"{float_labels}[y_train]",
                      "labels are float64")


# Bad arguments and missing files ------------------------------------------

def test_unknown_split_is_config_error(tmp_path):
    """A split no loader knows is a typo, in every loader (the sample and the synthetic set raised MissingSplit,
    which is a known split the data set lacks); a name or path that is neither was Path()'s TypeError."""
    with pytest.raises(ConfigError, match="validation"):
        datasets.load_mnist(tmp_path, split="validation")
    with pytest.raises(ConfigError, match="validation"):
        datasets.load_digits(split="validation")
    for name, known in (("mnist", "'train', 'test' or 'all'"), ("synthetic", "'train', 'test' or 'all'")):
        with pytest.raises(ConfigError) as caught:
            datasets.load(name, "bogus")
        assert str(caught.value) == f"split 'bogus' is not known: expected {known}"
        with pytest.raises(datasets.MissingSplit):
            datasets.load(name, "test")
    with pytest.raises(ConfigError) as caught:
        datasets.load(123)
    assert str(caught.value) == "load takes a data set's name ('mnist', 'digits', 'synthetic') or a path, got 123"
    with pytest.raises(ConfigError, match="load_mnist takes the path of a folder of MNIST IDX files .*, got None"):
        datasets.load_mnist(None)


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    assert_data_error(lambda: datasets.load_mnist(missing), missing)
    assert_data_error(lambda: datasets.load(str(missing)), missing, "digits")
    assert_data_error(lambda: datasets.read_idx(missing), missing, "no such file")
    assert_data_error(lambda: datasets.read_idx(tmp_path), tmp_path, "not a file")
    if os.path.exists("/dev/null"):  # there, but not a file to read data from
        assert_data_error(lambda: datasets.load("/dev/null"), "/dev/null", "not a regular file (a device")


def test_missing_split_names_folder_split_and_files(tmp_path):
    write_split(tmp_path, *sample_digits())
    assert_data_error(lambda: datasets.load_mnist(tmp_path, "test"),
                      "no test split", tmp_path, "t10k-images-idx3-ubyte[.gz]", "(it holds only the train split, train-*)")


def test_one_idx_file_given_for_a_folder_says_to_give_the_folder(tmp_path):
    write_split(tmp_path, *sample_digits())
    images = tmp_path / "train-images-idx3-ubyte"
    assert images.is_file()
    assert_data_error(lambda: datasets.load_mnist(images), images, "is one IDX file; give the folder that holds it")


def test_missing_half_of_a_pair(tmp_path):
    images, labels = sample_digits()
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), "train-images-idx3-ubyte",
                      "no labels", "train-labels-idx1-ubyte[.gz]")
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels), compress=True)
    assert_data_error(lambda: datasets.load_mnist(tmp_path, "test"), "t10k-labels-idx1-ubyte.gz",
                      "no images", "t10k-images-idx3-ubyte[.gz]")


def test_idx_files_unpacked_into_folders_of_their_names_say_so(tmp_path):
    """Some MNIST archives unpack each file into a folder of its name (train-images-idx3-ubyte/
    train-images-idx3-ubyte): the folder is named as one, not reported as no train split at all."""
    for kind, data in zip(("images-idx3", "labels-idx1"), sample_digits()):
        nested = tmp_path / f"train-{kind}-ubyte"
        nested.mkdir()
        write(nested / nested.name, idx_bytes(data))
    message = assert_data_error(lambda: datasets.load_mnist(tmp_path))
    assert message == f"{tmp_path / 'train-images-idx3-ubyte'} is a folder, not an IDX file: move the file it holds " \
                      f"up into {tmp_path}"


def test_synthetic_has_no_test_split():
    assert_data_error(lambda: datasets.load("synthetic", "test"), "synthetic", "train_val_split")


# Corrupt IDX files ---------------------------------------------------------

VALID_IMAGES = idx_bytes(sample_digits(3, rows=4, cols=4)[0])
VALID_LABELS = idx_bytes(np.array([1, 2, 3], dtype=np.uint8))

CORRUPT_IMAGE_FILES = {
    "empty": (b"", "truncated header"),
    "short magic": (b"\0\0\x08", "truncated header"),
    "dims cut short": (VALID_IMAGES[:9], "truncated header"),
    "labels magic": (VALID_LABELS, "2049"),
    "two dimensions": (idx_bytes(np.zeros((3, 16), np.uint8)), "2050"),
    "unknown type": (b"\0\0\x0a\x03" + VALID_IMAGES[4:], "0x0A is not one of the IDX types"),
    "float32 cut short": (b"\0\0\x0d\x03" + VALID_IMAGES[4:], "truncated data"),
    "truncated data": (VALID_IMAGES[:-1], "truncated data"),
    "trailing data": (VALID_IMAGES + b"\0", "trailing data"),
    "huge count": (struct.pack(">IIII", 2051, 2**32 - 1, 28, 28) + bytes(84), "truncated data"),
    "huge float64 count": (struct.pack(">IIII", 0x0E03, 2**32 - 1, 28, 28) + bytes(84),
                           "truncated data"),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPT_IMAGE_FILES))
def test_corrupt_images_file_is_data_error_naming_it(tmp_path, case, compress):
    data, fragment = CORRUPT_IMAGE_FILES[case]
    images_path = write(tmp_path / "train-images-idx3-ubyte", data, compress)
    write(tmp_path / "train-labels-idx1-ubyte", VALID_LABELS)
    tracemalloc.start()
    try:  # a lying header must not make the loader allocate what it promises
        assert_data_error(lambda: datasets.load_mnist(tmp_path), images_path, fragment)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_wrong_magic_says_found_and_expected(tmp_path):
    path = write(tmp_path / "train-images-idx3-ubyte", VALID_LABELS)
    message = assert_data_error(lambda: datasets.read_idx(path, datasets.IMAGES_NDIM), path)
    assert message.index("2049") < message.index("expected 3-dimensional")


def test_empty_but_unrepresentable_shape(tmp_path):
    path = write(tmp_path / "empty.idx", struct.pack(">IIII", 2051, 0, 2**32 - 1, 2**32 - 1))
    assert_data_error(lambda: datasets.read_idx(path), path, "too large")


def test_non_idx_and_unsupported_type_via_read_idx(tmp_path):
    path = write(tmp_path / "x.idx", b"\x01\x02\x08\x01\0\0\0\0")
    assert_data_error(lambda: datasets.read_idx(path), path, "two zero bytes")
    path = write(tmp_path / "y.idx", b"\0\0\x0a\x01\0\0\0\0")
    assert_data_error(lambda: datasets.read_idx(path), path, "0x0A", "0x08 uint8")
    path = write(tmp_path / "z.idx", b"\0\0\x08\0")
    assert_data_error(lambda: datasets.read_idx(path), path, "0 dimensions")


def test_huge_header_does_not_allocate(tmp_path):
    path = write(tmp_path / "lying.gz", struct.pack(">IIII", 2051, 2**32 - 1, 2**14, 2**14), True)
    tracemalloc.start()
    try:
        assert_data_error(lambda: datasets.read_idx(path), path, "truncated data")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_count_mismatch_names_both_files_and_counts(tmp_path):
    images, labels = sample_digits(5)
    images_path, labels_path = write_split(tmp_path, images, labels[:4])
    assert_data_error(lambda: datasets.load_mnist(tmp_path), images_path, labels_path, "5", "4")


def test_label_above_nine(tmp_path):
    images, labels = sample_digits(3)
    labels[1] = 10
    _, labels_path = write_split(tmp_path, images, labels)
    assert_data_error(lambda: datasets.load_mnist(tmp_path), labels_path, "10")


def test_empty_images(tmp_path):
    images_path, _ = write_split(tmp_path, *sample_digits(0))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), images_path, "no images")
    images_path, _ = write_split(tmp_path, *sample_digits(2, rows=0))
    assert_data_error(lambda: datasets.load_mnist(tmp_path), images_path, "0x28")


@pytest.mark.parametrize("damage", ["flip", "cut", "garbage after"])
def test_corrupt_gzip_stream(tmp_path, damage):
    packed = gzip.compress(VALID_IMAGES + bytes(2000))
    middle = len(packed) // 2
    damaged = {
        "flip": packed[:middle] + bytes([packed[middle] ^ 0xFF]) + packed[middle + 1:],
        "cut": packed[:middle],
        "garbage after": packed + b"not gzip",
    }[damage]
    path = write(tmp_path / "images.gz", damaged)
    assert_data_error(lambda: datasets.read_idx(path), path)


# Corrupt npz files ---------------------------------------------------------

def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def fake_npy(header_dict):
    """An .npy member whose header says anything, with 10 bytes of data."""
    header = repr(header_dict).encode("latin1")
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(10)


def test_npz_missing_key(tmp_path):
    images, labels = sample_digits()
    path = write(tmp_path / "mnist.npz", npz_bytes(x_train=images))
    assert_data_error(lambda: datasets.load_mnist(path), path, "y_train")
    assert_data_error(lambda: datasets.load_mnist(path, "test"), path, "x_test")


def test_npz_of_other_keys_names_the_keys_it_has(tmp_path):
    """numpy.savez(f, images, labels) names its arrays arr_0 and arr_1: the error says so, as it does where
    one of x_train and y_train is missing."""
    path = write(tmp_path / "mnist.npz", npz_bytes(arr_0=sample_digits()[0], arr_1=sample_digits()[1]))
    with pytest.raises(datasets.MissingSplit) as caught:
        datasets.load_mnist(path)
    assert str(caught.value) == f"{path}: no train split (no x_train or y_train array; found ['arr_0', 'arr_1'])"
    path = write(tmp_path / "many.npz", npz_bytes(**{f"a{index:05}": np.zeros(1) for index in range(10_002)}))
    message = assert_data_error(lambda: datasets.load_mnist(path))  # one short line, however many arrays
    assert message.endswith(f"found {[f'a{index:05}' for index in range(10)]} and 9,992 more)")


def test_npz_wrong_dims_and_dtypes(tmp_path):
    images, labels = sample_digits()
    flat = write(tmp_path / "flat.npz", npz_bytes(x_train=images.reshape(5, -1), y_train=labels))
    assert_data_error(lambda: datasets.load_mnist(flat), flat, "x_train", "expected 3")
    bools = write(tmp_path / "bools.npz", npz_bytes(x_train=images > 9, y_train=labels))
    assert_data_error(lambda: datasets.load_mnist(bools), bools, "x_train", "dtype bool")
    matrix = write(tmp_path / "matrix.npz", npz_bytes(x_train=images, y_train=labels[:, None]))
    assert_data_error(lambda: datasets.load_mnist(matrix), matrix, "y_train")


def test_npz_pickled_objects_are_refused(tmp_path):
    images, _ = sample_digits()
    objects = np.array([1, "a"], dtype=object)
    path = write(tmp_path / "pickled.npz", npz_bytes(x_train=images, y_train=objects))
    assert_data_error(lambda: datasets.load_mnist(path), path, "object")


@pytest.mark.parametrize("shape", [(2**40, 28, 28), (-2, -5, 1), (0, 2**40, 2**40), (10, 28, 28)])
def test_npz_lying_header_is_data_error(tmp_path, shape):
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, key_shape in (("x_train", shape), ("y_train", (10,))):
            header = {"descr": "|u1", "fortran_order": False, "shape": key_shape}
            archive.writestr(f"{key}.npy", fake_npy(header))
    assert_data_error(lambda: datasets.load_mnist(path), path, "x_train", str(shape))


@pytest.mark.parametrize("content", [b"", b"hello, not a zip", b"PK\x03\x04" + bytes(40)])
def test_npz_not_a_zip(tmp_path, content):
    path = write(tmp_path / "mnist.npz", content)
    assert_data_error(lambda: datasets.load_mnist(path), path)


@pytest.mark.parametrize("compress, said", [(True, ": it is gzip-compressed (gunzip it); "), (False, "; ")])
def test_a_file_that_is_no_zip_is_not_called_a_damaged_npz(tmp_path, compress, said):
    """A gzip'd mnist.npz or any other file that does not start as a zip does is named for what it is, not
    as an archive cut short or corrupted (what a file starting as one is)."""
    data = npz_bytes(x_train=sample_digits()[0], y_train=sample_digits()[1])
    path = write(tmp_path / "mnist.npz.gz", data if compress else b"x_train,y_train\n", compress)
    message = assert_data_error(lambda: datasets.load_mnist(path))
    assert message == f"{path} is not a .npz archive (a zip file){said}give a folder of MNIST IDX files (gzip'd or " \
                      f"not, under their MNIST names) or a Keras-style .npz"


def test_npz_truncated(tmp_path):
    data = npz_bytes(x_train=sample_digits()[0], y_train=sample_digits()[1])
    path = write(tmp_path / "mnist.npz", data[: len(data) // 2])
    assert_data_error(lambda: datasets.load_mnist(path), path)


# Property tests: hostile bytes load or raise DataError, never anything else --

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


def load_or_data_error(call):
    """Run ``call``; return its result or None if it raised DataError."""
    try:
        return call()
    except DataError:
        return None


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=200), compress=st.booleans())
def test_random_bytes_load_or_data_error(scratch, data, compress):
    path = write(scratch / "random.idx", data, compress)
    result = load_or_data_error(lambda: datasets.read_idx(path))
    if result is not None:
        assert result.dtype in IDX_TYPE_CODES


@PROPERTY_SETTINGS
@given(shape=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3),
       payload=st.integers(0, 64), compress=st.booleans())
def test_any_header_reads_only_what_is_there(scratch, shape, payload, compress):
    header = struct.pack(f">I{len(shape)}I", 0x0800 | len(shape), *shape)
    path = write(scratch / "header.idx", header + bytes(payload), compress)
    result = load_or_data_error(lambda: datasets.read_idx(path))
    representable = np.prod([max(dim, 1) for dim in shape], dtype=object) < 2**63
    assert (result is not None) == (representable and np.prod(shape, dtype=object) == payload)
    if result is not None:
        assert result.shape == tuple(shape)


@PROPERTY_SETTINGS
@given(cut=st.integers(0, 10**6), compress=st.booleans())
def test_any_truncation_is_data_error(scratch, cut, compress):
    data = gzip.compress(VALID_IMAGES, mtime=0) if compress else VALID_IMAGES
    path = write(scratch / "cut.idx", data[: cut % len(data)])
    assert_data_error(lambda: datasets.read_idx(path), path)


@PROPERTY_SETTINGS
@given(position=st.integers(0, 10**6), xor=st.integers(1, 255), compress=st.booleans(),
       damage_labels=st.booleans())
def test_byte_flips_load_or_data_error(scratch, position, xor, compress, damage_labels):
    files = [bytearray(gzip.compress(data, mtime=0) if compress else data)
             for data in (VALID_IMAGES, VALID_LABELS)]
    damaged = files[damage_labels]
    damaged[position % len(damaged)] ^= xor
    write(scratch / "train-images-idx3-ubyte", bytes(files[0]))
    write(scratch / "train-labels-idx1-ubyte", bytes(files[1]))
    result = load_or_data_error(lambda: datasets.load_mnist(scratch))
    if result is not None:
        x, y = result
        assert x.dtype == np.float32 and len(x) == len(y) and y.max() <= 9


VALID_NPZ = npz_bytes(x_train=sample_digits(3, 4, 4)[0], y_train=sample_digits(3)[1])


@PROPERTY_SETTINGS
@given(position=st.integers(0, 10**6), xor=st.integers(1, 255))
def test_npz_byte_flips_load_or_data_error(scratch, position, xor):
    damaged = bytearray(VALID_NPZ)
    damaged[position % len(damaged)] ^= xor
    path = write(scratch / "mnist.npz", bytes(damaged))
    result = load_or_data_error(lambda: datasets.load_mnist(path))
    if result is not None:
        assert result[0].dtype == np.float32


# Digits --------------------------------------------------------------------

def test_digits_splits():
    x_train, y_train = datasets.load_digits()
    x_test, y_test = datasets.load_digits("test")
    x_all, y_all = datasets.load("digits", "all")
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64) and x_all.shape == (1797, 64)
    for x, y in ((x_train, y_train), (x_test, y_test), (x_all, y_all)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.min() >= 0 and x.max() <= 1
    assert x_all.max() == 1.0
    train_rows = {row.tobytes() + bytes([label]) for row, label in zip(x_train, y_train)}
    test_rows = {row.tobytes() + bytes([label]) for row, label in zip(x_test, y_test)}
    assert not train_rows & test_rows
    assert sorted(np.concatenate([y_train, y_test])) == sorted(y_all)


def test_digits_deterministic():
    first, second = datasets.load_digits("test"), datasets.load("digits", "test")
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_digits_without_scikit_learn(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    assert_data_error(datasets.load_digits, "pip install 'nnaccel[digits]'")


# Synthetic -----------------------------------------------------------------

def test_synthetic_defaults():
    x, y = datasets.synthetic()
    assert x.shape == (1024, 784) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1024,) and y.dtype == np.int64
    assert x.min() >= 0 and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))
    assert datasets.load("synthetic")[0].shape == (1024, 784)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_synthetic_any_shape_and_dtype(dtype):
    x, y = datasets.synthetic(n=7, features=3, classes=4, seed=5, dtype=dtype)
    assert x.shape == (7, 3) and x.dtype == dtype
    assert y.min() >= 0 and y.max() < 4


def test_synthetic_images_are_the_flat_set_in_their_shape():
    """features=(1, 28, 28): image samples a convolution takes, the values of features=784 reshaped."""
    images, labels = datasets.synthetic(n=12, features=(1, 28, 28), seed=3)
    flat, flat_labels = datasets.synthetic(n=12, features=784, seed=3)
    assert images.shape == (12, 1, 28, 28) and images.flags.c_contiguous
    np.testing.assert_array_equal(images.reshape(12, -1), flat)
    np.testing.assert_array_equal(labels, flat_labels)
    model = nn.Sequential(nn.Conv2D(1, 2, 3), nn.Flatten(), nn.Dense(2 * 26 * 26, 10), input_shape=(1, 28, 28))
    assert nn.Trainer(model, quiet=True).fit(images, labels, epochs=1)["loss"]
    for bad, message in [((), r"features must be a count or a non-empty shape, got \(\)"),
                         ((1, 0, 28), "each size in features must be a positive integer")]:
        with pytest.raises(nn.ConfigError, match=message):
            datasets.synthetic(n=4, features=bad)


def test_synthetic_deterministic_per_seed():
    a, b = datasets.synthetic(64, 8, seed=1), datasets.synthetic(64, 8, seed=1)
    c = datasets.synthetic(64, 8, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier fitted on one half does well on the other."""
    x, y = datasets.synthetic(n=2000, features=32, classes=10)
    (x_fit, y_fit), (x_check, y_check) = datasets.train_val_split(x, y, 0.5)
    means = np.stack([x_fit[y_fit == c].mean(axis=0) for c in range(10)])
    distances = ((x_check[:, None, :] - means[None]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == y_check).mean() > 0.9


@pytest.mark.parametrize("arguments", [
    {"n": 0}, {"features": -1}, {"classes": 0}, {"n": 2.5}, {"n": True}, {"dtype": np.int32},
    {"dtype": "nonsense"}, {"seed": -1}, {"seed": "abc"},
])
def test_synthetic_rejects_bad_arguments(arguments):
    with pytest.raises(ConfigError):
        datasets.synthetic(**arguments)


# train_val_split -------------------------------------------------------------

def test_train_val_split_sizes_disjoint_and_typed():
    x = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(100, dtype=np.int64)
    (x_train, y_train), (x_val, y_val) = datasets.train_val_split(x, y)
    assert len(x_train) == len(y_train) == 80 and len(x_val) == len(y_val) == 20
    assert x_train.dtype == x_val.dtype == np.float32
    np.testing.assert_array_equal(x_train[:, 0], y_train)
    np.testing.assert_array_equal(x_val[:, 0], y_val)
    assert not set(y_train) & set(y_val)
    assert set(y_train) | set(y_val) == set(range(100))
    again = datasets.train_val_split(x, y)
    np.testing.assert_array_equal(again[1][1], y_val)
    assert not np.array_equal(datasets.train_val_split(x, y, seed=1)[1][1], y_val)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True, "0.2"])
def test_train_val_split_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError):
        datasets.train_val_split(np.zeros((10, 2)), np.zeros(10), fraction)


def test_train_val_split_takes_0_d_arrays_as_the_numbers_they_hold():
    """A fraction or seed that is a 0-d array (numpy.array(0.2), a CuPy reduction's result) splits as its
    number does, as the Python API's other number checks take it; one out of range names its range."""
    x, y = np.arange(20, dtype=np.float32)[:, None], np.arange(20)
    expected = datasets.train_val_split(x, y, 0.25, seed=3)
    got = datasets.train_val_split(x, y, np.array(0.25), seed=np.array(3))
    for part, want in zip(got, expected):
        np.testing.assert_array_equal(part[1], want[1])
    assert np.array_equal(datasets.synthetic(16, 4, seed=np.array(5))[0], datasets.synthetic(16, 4, seed=5)[0])
    with pytest.raises(ConfigError, match=r"fraction must be a finite number > 0 and < 1, got array\(1\.5\)"):
        datasets.train_val_split(x, y, np.array(1.5))


@pytest.fixture
def cp(emulated):
    import cupy

    return cupy


def test_train_val_split_splits_device_arrays_on_their_device(cp, monkeypatch):
    """CuPy arrays were refused ('x is not an array of numbers: Implicit conversion to a NumPy array is not
    allowed'), where PyTorch's random_split and Keras's validation_split take data where it is: now they are
    split on their device, without copying them to the host, into the rows a host split gives; a host y beside
    them stays on the host."""
    x_host, y_host = np.arange(60, dtype=np.float32).reshape(20, 3), np.arange(20, dtype=np.int64)
    x, y = cp.asarray(x_host), cp.asarray(y_host)
    expected = datasets.train_val_split(x_host, y_host, 0.25, seed=4)

    def refused(*args, **kwargs):
        raise AssertionError("a device array was copied to the host")

    with monkeypatch.context() as patched:
        patched.setattr(type(x), "get", refused)
        patched.setattr(cp, "asnumpy", refused)
        on_device = datasets.train_val_split(x, y, 0.25, seed=4)
        mixed = datasets.train_val_split(x, y_host, 0.25, seed=4)
    for (xs, ys), (mixed_xs, host_ys), (want_x, want_y) in zip(on_device, mixed, expected):
        for part in (xs, mixed_xs):
            assert isinstance(part, cp.ndarray) and part.dtype == np.float32 and part.device == x.device
            np.testing.assert_array_equal(cp.asnumpy(part), want_x)
        assert isinstance(ys, cp.ndarray) and isinstance(host_ys, np.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(ys), want_y)
        np.testing.assert_array_equal(host_ys, want_y)
    with pytest.raises(ShapeError, match=r"x and y must hold the same number of samples, got shapes \(20, 3\) and "
                                         r"\(19,\)"):
        datasets.train_val_split(x, y[:19])


def test_train_val_split_names_an_array_on_a_device_without_a_backend():
    class MetalArray:  # what a torch tensor on "mps" answers
        def __dlpack_device__(self):
            return (8, 0)

    with pytest.raises(nn.DeviceError, match="^y is on DLPack device type 8: train_val_split splits host arrays "
                                             "and CUDA ones$"):
        datasets.train_val_split(np.zeros((4, 2)), MetalArray())


def test_train_val_split_rejects_empty_split_and_mismatch():
    with pytest.raises(ConfigError):
        datasets.train_val_split(np.zeros((3, 2)), np.zeros(3), 0.1)
    with pytest.raises(ShapeError):
        datasets.train_val_split(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ConfigError):
        datasets.train_val_split(np.zeros((3, 2)), np.zeros(3), seed=-1)
