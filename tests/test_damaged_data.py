"""Damaged compressed data files: gzip IDX files and .npz archives cut short or
with flipped bytes at many places each give a one-line DataError naming the
file and saying it is corrupt or truncated (or, where the damage hits bytes
no checksum covers, load exactly as before)."""

import gzip
import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from test_datasets import MNIST_SUBSET, assert_data_error, idx_bytes, write

from nnaccel import datasets
from nnaccel.errors import DataError

GZIP_HEADER = 10  # magic, method, flags, mtime, extra flags, OS
GZIP_TRAILER = 8  # CRC-32 and length of the uncompressed data
POINTS = 60
REAL_FILES = {"real images": "train-images-idx3-ubyte.gz", "real labels": "train-labels-idx1-ubyte.gz"}


def spread(start, stop, count=POINTS):
    """``count`` distinct positions from ``start`` to ``stop - 1``, evenly spread."""
    return sorted(set(np.linspace(start, stop - 1, count).astype(int).tolist()))


def cut_points(length):
    """Where to cut a gzip file: inside its header, all along the deflate stream, inside the trailer."""
    return sorted(set(range(GZIP_HEADER + 1)) | set(spread(GZIP_HEADER, length - GZIP_TRAILER))
                  | set(range(length - GZIP_TRAILER - 1, length)))


def small_gzip_idx():
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    return images, gzip.compress(idx_bytes(images), mtime=0)


@pytest.fixture(params=["small", *REAL_FILES])
def gzip_idx(request):
    """An IDX array and its gzip file: a small random one, or the real MNIST subset's when present."""
    if request.param == "small":
        return small_gzip_idx()
    path = MNIST_SUBSET / REAL_FILES[request.param]
    if not path.is_file():
        pytest.skip(f"real MNIST subset not found at {MNIST_SUBSET}")
    return datasets.read_idx(path), path.read_bytes()


def one_line(message):
    assert "\n" not in message, message
    return message


def test_gzip_cut_anywhere_is_corrupt_or_truncated(tmp_path, gzip_idx):
    _, packed = gzip_idx
    path = tmp_path / "cut.gz"
    for cut in cut_points(len(packed)):
        write(path, packed[:cut])
        message = one_line(assert_data_error(lambda: datasets.read_idx(path), path))
        if cut < 2:  # not even the gzip magic is left: read as a (too short) plain IDX file
            assert message == f"{path}: truncated header: {cut} bytes, expected a 4-byte IDX magic number"
        else:
            assert message.startswith(f"{path}: corrupt or truncated gzip data ("), (cut, message)


def test_gzip_byte_flips_are_corrupt_or_harmless(tmp_path, gzip_idx):
    """A flip is reported as corruption, even where it garbles the IDX header before the CRC
    is reached; flips in the mtime, extra flags and OS bytes change nothing."""
    array, packed = gzip_idx
    path = tmp_path / "flipped.gz"
    positions = sorted(set(range(GZIP_HEADER)) | set(spread(0, len(packed))))
    for position, xor in zip(positions, [0xFF, 0x01, 0x80, 0x5A] * len(positions)):
        damaged = bytearray(packed)
        damaged[position] ^= xor
        write(path, bytes(damaged))
        try:
            result = datasets.read_idx(path)
        except DataError as error:
            message = one_line(str(error))
            expected = "not an IDX file" if position < 2 else "corrupt or truncated gzip data ("
            assert message.startswith(f"{path}: {expected}"), (position, message)
        else:
            assert 4 <= position < GZIP_HEADER, position
            np.testing.assert_array_equal(result, array)


def test_damaged_gzip_never_allocates_much(tmp_path):
    _, packed = small_gzip_idx()
    path = tmp_path / "damaged.gz"
    tracemalloc.start()
    try:
        for cut in cut_points(len(packed)):
            write(path, packed[:cut])
            assert_data_error(lambda: datasets.read_idx(path), path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_a_damaged_stream_is_read_on_only_so_far(tmp_path, monkeypatch):
    """Reading on to reach the CRC stops after a bounded amount, so a gzip bomb cannot keep it busy."""
    content = idx_bytes(np.zeros(1, np.uint8)) + bytes(3 * 2**20)  # the header announces 1 byte
    packed = bytearray(gzip.compress(content, mtime=0))
    packed[-GZIP_TRAILER] ^= 1
    path = write(tmp_path / "long.gz", bytes(packed))
    assert_data_error(lambda: datasets.read_idx(path), path, "corrupt or truncated gzip data (CRC check failed")
    monkeypatch.setattr(datasets, "_CHECKSUM_READ_CHUNKS", 2)
    assert_data_error(lambda: datasets.read_idx(path), path, "trailing data")


def test_wrong_content_of_a_sound_gzip_is_reported_as_such(tmp_path):
    path = write(tmp_path / "labels.gz", idx_bytes(np.arange(5)), compress=True)
    assert_data_error(lambda: datasets.read_idx(path, datasets.IMAGES_NDIM), path,
                      "1-dimensional) found, expected 3-dimensional data")


# .npz archives ---------------------------------------------------------------

IMAGES = np.random.default_rng(1).integers(0, 256, (20, 8, 8), dtype=np.uint8)
LABELS = np.random.default_rng(2).integers(0, 10, 20, dtype=np.uint8)


def npz_archive(save):
    buffer = io.BytesIO()
    save(buffer, x_train=IMAGES, y_train=LABELS)
    return buffer.getvalue()


def member_span(data, name):
    """Where the stored (possibly compressed) bytes of member ``name`` lie in a zip archive."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.compress_size


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_cut_anywhere_is_corrupt_or_truncated(tmp_path, save):
    data = npz_archive(save)
    path = tmp_path / "mnist.npz"
    for cut in spread(0, len(data)):
        write(path, data[:cut])
        message = one_line(assert_data_error(lambda: datasets.load_mnist(path), path))
        assert message.startswith(f"{path}: corrupt or truncated .npz archive ("), (cut, message)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_byte_flips_are_data_errors_or_harmless(tmp_path, save):
    data = npz_archive(save)
    path = tmp_path / "mnist.npz"
    for position, xor in zip(spread(0, len(data)), [0xFF, 0x01, 0x80, 0x5A] * POINTS):
        damaged = bytearray(data)
        damaged[position] ^= xor
        write(path, bytes(damaged))
        try:
            x, y = datasets.load_mnist(path)
        except DataError as error:
            assert one_line(str(error)).startswith(str(path)), (position, str(error))
        else:  # a flip in a date or another field no check covers
            np.testing.assert_array_equal(x, IMAGES.reshape(20, -1) / np.float32(255))
            np.testing.assert_array_equal(y, LABELS)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("member", ["x_train.npy", "y_train.npy"])
@pytest.mark.parametrize("damage", ["zeroed tail", "flipped byte", "flipped header"])
def test_npz_damaged_member_is_corrupt(tmp_path, save, member, damage):
    """A member damaged behind an intact directory (a download cut short and padded, a bad
    sector) fails its CRC, even where the damage garbles the .npy header first."""
    data = bytearray(npz_archive(save))
    start, end = member_span(bytes(data), member)
    if damage == "zeroed tail":
        middle = (start + end) // 2
        data[middle:end] = bytes(end - middle)
    else:
        data[start + 20 if damage == "flipped header" else (start + end) // 2] ^= 0x10
    path = write(tmp_path / "mnist.npz", bytes(data))
    message = one_line(assert_data_error(lambda: datasets.load_mnist(path), path))
    assert message.startswith(f"{path}: corrupt or truncated .npz archive ("), message


@pytest.mark.parametrize("header", [
    "{'descr': '|u1', 'fortran_order': False, 'shape': (20, 8, 8",  # tokenize.TokenError in numpy's parser
    "{'descr': '|u1', 'fortran_order': False, 'shape': (20, 8, 8)) }",  # SyntaxError
    "{'descr': 'bogus', 'fortran_order': False, 'shape': (20, 8, 8), }",  # ValueError
    "{'descr': '|u1', 'fortran_order': False, 'shape': (" + "-" * 5000 + "20, 8, 8), }",  # RecursionError
])
def test_npz_member_with_a_corrupt_header_and_a_good_crc_is_a_data_error(tmp_path, header):
    """The member's CRC is right, so only the header parse sees the damage (a file written wrong)."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path = tmp_path / "mnist.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + IMAGES.tobytes())
        archive.writestr("y_train.npy", b"")
    message = one_line(assert_data_error(lambda: datasets.load_mnist(path), path))
    assert message.startswith(f"{path}[x_train]: corrupt .npy header ("), message
