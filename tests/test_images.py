"""Pictures of digits become model inputs the way MNIST and the 8x8 digits were made; what
cannot be a picture of a digit is a DataError naming the file and the problem."""

import json
import os
import re
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import nnaccel as nn
from nnaccel import datasets, images
from command_line import in_process, nnaccel

INK = (30, 45, 140)  # blue ink
PAPER = (246, 240, 222)  # cream paper


def photo(pixels, side, colour=False, dark_on_light=True):
    """A data-set image made to look like a picture of a digit: enlarged 4x, shifted, ink on paper."""
    ink = Image.fromarray(np.round(pixels.reshape(side, side) * 255).astype(np.uint8))
    ink = np.asarray(ink.resize((4 * side, 4 * side), Image.LANCZOS), dtype=np.float64)[..., None] / 255
    canvas = np.zeros((6 * side, 5 * side, 1))
    canvas[side // 2:side // 2 + 4 * side, side:5 * side] = ink
    if colour:
        pixels = np.array(PAPER) * (1 - canvas) + np.array(INK) * canvas
    else:
        pixels = 255 * (1 - canvas[..., 0]) if dark_on_light else 255 * canvas[..., 0]
    return np.round(pixels).astype(np.uint8)


def save_png(array, path):
    Image.fromarray(array).save(path)
    return path


def png_header(path, width, height):
    """A grey PNG of ``width`` x ``height`` whose pixel data is cut short: only its header is whole."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


def train(x, y, sizes, epochs):
    layers = [nn.Dense(a, b, activation="relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
    model = nn.Sequential(*layers, nn.Dense(sizes[-2], sizes[-1]), device="cpu", seed=0)
    nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=64, seed=0, quiet=True).fit(
        x, y, epochs=epochs)
    return model


@pytest.fixture(scope="module")
def mnist(mnist_path):
    """A 784-64-10 net trained on 6,000 real MNIST digits, and 10 digits it did not see."""
    x, y = datasets.load(mnist_path, split="train")
    return train(x[:6000], y[:6000], [784, 64, 10], epochs=3), x[6000:6010]


def test_mnist_picture_comes_back_as_the_original(mnist, tmp_path):
    """Inverted, enlarged 4x, shifted and saved as PNG, each digit comes back within a small
    error and gets the same prediction."""
    model, originals = mnist
    recovered = np.stack([images.prepare_for_model(save_png(photo(x, 28), tmp_path / f"{i}.png"), 784)
                          for i, x in enumerate(originals)])
    assert recovered.shape == (10, 784) and recovered.dtype == np.float32
    assert 0.0 <= recovered.min() and recovered.max() == 1.0
    errors = np.abs(recovered - originals).mean(axis=1)
    assert errors.max() < 0.1, errors
    assert list(model.predict(recovered).argmax(1)) == list(model.predict(originals).argmax(1))


@pytest.mark.parametrize("size", [28, 8])
def test_polarity_and_colour_do_not_matter(size):
    pixels = datasets.load_digits("test")[0][0]
    reference = images.preprocess_digit(photo(pixels, 8), size)
    for variant in (photo(pixels, 8, dark_on_light=False), photo(pixels, 8, colour=True)):
        np.testing.assert_allclose(images.preprocess_digit(variant, size), reference, atol=0.02)


def test_digits_8x8_picture_comes_back_as_the_original():
    """The 8x8 grid is coarse: an edge pixel lost to resampling moves the whole digit, so this
    checks the average error and that nearly every prediction survives."""
    x_train, y_train = datasets.load_digits("train")
    x, _ = datasets.load_digits("test")
    model = train(x_train, y_train, [64, 64, 10], epochs=10)
    originals = x[:40]
    recovered = np.stack([images.preprocess_digit(photo(pixels, 8), size=8) for pixels in originals])
    assert recovered.shape == (40, 64)
    assert np.abs(recovered - originals).mean() < 0.1
    assert (model.predict(recovered).argmax(1) == model.predict(originals).argmax(1)).mean() >= 0.9


def test_mnist_style_layout():
    """A solid bar ends up 20 pixels tall with its centre of mass on pixel (14, 14), as in MNIST."""
    picture = np.full((300, 200), 255, np.uint8)
    picture[50:250, 120:160] = 0
    digit = images.preprocess_digit(picture).reshape(28, 28)
    rows, cols = np.nonzero(digit > 0.5)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 4
    mass = digit.sum()
    centre = (np.indices(digit.shape) * digit).sum(axis=(1, 2)) / mass
    assert np.all(np.abs(centre - 14) <= 0.5)


def test_blank_and_malformed_inputs():
    with pytest.raises(nn.DataError, match="no digit found"):
        images.preprocess_digit(np.full((40, 40), 200, np.uint8))
    with pytest.raises(nn.DataError, match="the picture is 7x9 pixels, too small"):
        images.preprocess_digit(np.eye(9, 7))
    speck = np.eye(10)
    speck[4, 4] = np.nan
    with pytest.raises(nn.DataError, match="the picture has 1 NaN or infinite pixel$"):
        images.preprocess_digit(speck)
    with pytest.raises(nn.ShapeError, match="got shape"):
        images.preprocess_digit(np.zeros((4, 4, 2)))
    with pytest.raises(nn.ConfigError, match="size must be 28"):
        images.preprocess_digit(np.eye(10), size=16)


def test_file_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(nn.DataError, match="missing.png: no such image file"):
        images.load_image(tmp_path / "missing.png")
    if os.path.exists("/dev/null"):
        with pytest.raises(nn.DataError, match=r"/dev/null: not a regular file \(a device"):
            images.load_image("/dev/null")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(nn.DataError, match=r"notes.png: not a picture Pillow can read \(cannot identify"):
        images.load_image(tmp_path / "notes.png")
    with pytest.raises(nn.ConfigError, match="784 .* or 64"):
        images.prepare_for_model(tmp_path / "notes.png", 100)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(nn.ConfigError, match=r"pip install 'nnaccel\[image\]'"):
        images.load_image(tmp_path / "notes.png")


PNG_TAIL = 20  # the pixel data's Adler-32, the IDAT chunk's CRC and IEND: cutting only these loses no pixel


def data_error(call):
    """The message of the DataError ``call`` raises, checked to be one line."""
    with pytest.raises(nn.DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", np.random.default_rng(0).bytes(1000),
                                     b"\x89PNG\r\n\x1a\n"], ids=["empty", "text", "random", "png magic only"])
def test_files_that_are_not_pictures(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    message = data_error(lambda: images.prepare_for_model(path, 784))
    assert message == f"{path}: not a picture Pillow can read (cannot identify image file)"


def test_truncated_png_anywhere_in_its_pixels(tmp_path):
    save_png(np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8), tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    path = tmp_path / "cut.png"
    for cut in np.linspace(0, len(data) - PNG_TAIL - 1, 40).astype(int):
        path.write_bytes(data[:cut])
        message = data_error(lambda: images.prepare_for_model(path, 64))
        assert message.startswith(f"{path}: not a picture Pillow can read ("), (cut, message)


def test_folders_and_missing_files(tmp_path):
    assert data_error(lambda: images.prepare_for_model(tmp_path, 784)) == f"{tmp_path}: a folder, not an image file"
    missing = tmp_path / "gone.png"
    assert data_error(lambda: images.prepare_for_model(missing, 784)) == f"{missing}: no such image file"


@pytest.mark.parametrize("colour", [0, 255, 128, (200, 30, 30)], ids=["black", "white", "grey", "red"])
@pytest.mark.parametrize("n_inputs", [784, 64])
def test_blank_pictures(tmp_path, colour, n_inputs):
    shape = (50, 40, 3) if isinstance(colour, tuple) else (50, 40)
    path = save_png(np.full(shape, colour, np.uint8), tmp_path / "blank.png")
    message = data_error(lambda: images.prepare_for_model(path, n_inputs))
    assert message == f"{path}: no digit found: the picture is one uniform colour"


def test_fully_transparent_picture_is_blank(tmp_path):
    path = save_png(np.zeros((30, 30, 4), np.uint8), tmp_path / "clear.png")
    assert "no digit found: the picture is one uniform colour" in data_error(
        lambda: images.prepare_for_model(path, 784))


@pytest.mark.parametrize("height,width", [(1, 1), (1, 200), (7, 7)])
def test_too_small_pictures(tmp_path, height, width):
    pixels = np.full((height, width), 255, np.uint8)
    pixels[0, 0] = 0
    path = save_png(pixels, tmp_path / "tiny.png")
    message = data_error(lambda: images.prepare_for_model(path, 784))
    assert message == (f"{path}: the picture is {width}x{height} pixels, too small to show a digit "
                       f"(at least 8x8 needed)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_arrays_with_nan_or_infinity(bad):
    pixels = np.zeros((20, 20, 3))
    pixels[5:15, 8:12] = 1.0
    pixels[3, 3, 1] = pixels[4, 4, 0] = bad
    assert data_error(lambda: images.preprocess_digit(pixels)) == "the picture has 2 NaN or infinite pixels"


def test_16_bit_picture_keeps_its_ink(tmp_path):
    """A 16-bit grey PNG is not clipped to 0..255 (which would turn a light page and its ink
    into one white): it gives what its 8-bit version does."""
    picture = np.full((60, 40), 255, np.uint8)
    picture[10:50, 15:25] = 100
    deep = save_png((picture.astype(np.uint16) * 257), tmp_path / "deep.png")
    assert images.load_image(deep).dtype == np.uint16
    np.testing.assert_allclose(images.prepare_for_model(deep, 784),
                               images.prepare_for_model(save_png(picture, tmp_path / "flat.png"), 784), atol=1e-6)


@pytest.mark.parametrize("transparent", [0, 65535], ids=["black", "white"])
def test_16_bit_picture_with_a_transparent_grey(tmp_path, transparent):
    """A 16-bit grey PNG whose tRNS makes one grey see-through is laid over white in its own
    range (Pillow's RGBA of it is all white): it gives what its 8-bit version on white does."""
    picture = np.full((60, 40), 255, np.uint8)
    picture[10:50, 15:25] = 100
    deep = np.where(picture == 255, transparent, picture.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "clear.png", transparency=transparent)
    pixels = images.load_image(tmp_path / "clear.png")
    assert pixels.dtype == np.uint16 and pixels[0, 0] == 65535 and pixels[30, 20] == 100 * 257
    np.testing.assert_allclose(images.prepare_for_model(tmp_path / "clear.png", 784),
                               images.prepare_for_model(save_png(picture, tmp_path / "flat.png"), 784), atol=1e-6)


def test_pictures_too_large_are_refused_from_their_header(tmp_path):
    """Above MAX_PIXELS (Pillow's default limit, where it warns of a decompression bomb) and above
    twice it (where Pillow refuses) a picture is refused by its size, without a warning and before
    its pixels are decoded: these headers' pixel data is cut short."""
    huge, bomb = png_header(tmp_path / "huge.png", 10000, 10000), png_header(tmp_path / "bomb.png", 14000, 14000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning let through fails the test
        assert data_error(lambda: images.prepare_for_model(huge, 784)) == (
            f"{huge}: the picture is 10000x10000 pixels, too large to read (at most 89,478,485 pixels, "
            f"Pillow's decompression-bomb limit): shrink it")
        assert data_error(lambda: images.load_image(bomb)) == (
            f"{bomb}: the picture has more than 178,956,970 pixels, too large to read (at most 89,478,485 "
            f"pixels, Pillow's decompression-bomb limit): shrink it")
    big = png_header(tmp_path / "big.png", 9000, 9000)  # under the limit: decoded, and found cut short
    assert data_error(lambda: images.load_image(big)).startswith(f"{big}: not a picture Pillow can read (")


def seven(shape=(60, 40)):
    """A dark 7 on white, as grey pixels of ``shape``."""
    picture = np.full(shape, 255, np.uint8)
    picture[10:50, 15:25] = picture[10:20, 15:35] = 40
    return picture


def enlarged(pixels, factor=4):
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


@pytest.mark.parametrize("kind", ["grey", "colour", "see-through ink", "16-bit transparent"])
def test_large_pictures_are_shrunk_by_block_means(tmp_path, monkeypatch, kind):
    """prepare_for_model reads a picture over WORKING_PIXELS as the means of blocks of its pixels, a
    band of rows at a time, transparent ones laid over white first: a picture enlarged 4x gives
    what the original does, bit for bit."""
    grey = pixels = seven()
    if kind == "colour":
        pixels = np.where(grey[..., None] < 255, np.array(INK, np.uint8), np.array(PAPER, np.uint8))
    elif kind == "see-through ink":
        pixels = np.zeros(grey.shape + (4,), np.uint8)
        pixels[grey < 255] = (0, 0, 90, 160)
    for name, picture in (("small", pixels), ("large", enlarged(pixels))):
        if kind == "16-bit transparent":
            deep = np.where(picture == 255, 0, picture.astype(np.uint16) * 257).astype(np.uint16)
            Image.fromarray(deep).save(tmp_path / f"{name}.png", transparency=0)
        else:
            save_png(picture, tmp_path / f"{name}.png")
    monkeypatch.setattr(images, "WORKING_PIXELS", grey.size)
    monkeypatch.setattr(images, "BAND_PIXELS", 2 * grey.shape[1] * 4 * 4)  # bands of 8 rows
    assert images._load(tmp_path / "large.png", images.WORKING_PIXELS).shape[:2] == grey.shape
    for n_inputs in (784, 64):
        np.testing.assert_array_equal(images.prepare_for_model(tmp_path / "large.png", n_inputs),
                                      images.prepare_for_model(tmp_path / "small.png", n_inputs))


def test_shrinking_lays_transparent_pixels_over_white_first(tmp_path, monkeypatch):
    """White ink on a transparent black page is a blank white picture, shrunk or not (averaged
    before being laid over white, its blocks at the ink's edges would be grey ink)."""
    rgba = np.zeros((243, 161, 4), np.uint8)
    rgba[41:201, 61:99] = 255  # edges inside blocks of 5x5, the shrink factor
    path = save_png(rgba, tmp_path / "white-ink.png")
    monkeypatch.setattr(images, "WORKING_PIXELS", 60 * 40)
    assert data_error(lambda: images.prepare_for_model(path, 784)) == (
        f"{path}: no digit found: the picture is one uniform colour")


def test_large_jpeg_is_decoded_at_a_smaller_scale(tmp_path, monkeypatch):
    """A JPEG over WORKING_PIXELS is decoded at 1/2 to 1/8 of its size, not decoded whole then shrunk."""
    Image.fromarray(enlarged(seven())).save(tmp_path / "large.jpg", quality=95)
    monkeypatch.setattr(images, "WORKING_PIXELS", 60 * 40)
    pixels = images._load(tmp_path / "large.jpg", images.WORKING_PIXELS)
    assert pixels.shape == (60, 40) and pixels.dtype == np.uint8  # decoded at a quarter: no block means left
    assert np.abs(pixels.astype(int) - seven()).max() <= 16  # JPEG's noise


def test_shrinking_leaves_the_shorter_side_at_least_min_side(tmp_path, monkeypatch):
    """A strip 9 pixels high is read whole, never shrunk to fewer than MIN_SIDE rows."""
    strip = np.full((9, 2000), 255, np.uint8)
    strip[2:7, 900:904] = 0
    path = save_png(strip, tmp_path / "strip.png")
    unshrunk = images.prepare_for_model(path, 784)
    monkeypatch.setattr(images, "WORKING_PIXELS", 100)
    np.testing.assert_array_equal(images.prepare_for_model(path, 784), unshrunk)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """A phone photo stored on its side with EXIF orientation 6 (turn 90 degrees clockwise to view)
    is read upright: exactly in a PNG, within JPEG's noise in a JPEG."""
    upright = np.full((60, 40), 255, np.uint8)
    upright[10:50, 15:25] = upright[10:20, 15:35] = 0  # a 7: not the same turned
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / f"side{suffix}", exif=exif,
                                                                       quality=95)
    pixels = images.load_image(tmp_path / f"side{suffix}")
    assert pixels.shape == upright.shape
    assert np.abs(pixels.astype(int) - upright).max() <= (0 if suffix == ".png" else 16)


def test_transparent_picture_is_read_over_white(tmp_path):
    rgba = np.zeros((60, 60, 4), np.uint8)
    rgba[10:50, 25:35] = (0, 0, 0, 255)  # a black bar; the rest is transparent
    pixels = images.load_image(save_png(rgba, tmp_path / "bar.png"))
    assert pixels.shape == (60, 60, 3) and pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[30, 30].tolist() == [0, 0, 0]


def test_predict_command(mnist, tmp_path):
    model, originals = mnist
    model.save(tmp_path / "m.npz")
    files = [save_png(photo(x, 28, colour=True), tmp_path / f"digit{i}.png") for i, x in enumerate(originals[:3])]
    expected = model.predict(originals[:3]).argmax(1)
    run = nnaccel("predict", tmp_path / "m.npz", *files, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3
    top3 = r"[01]\.\d\d(, \d [01]\.\d\d){2}\)"
    for line, path, digit in zip(lines, files, expected):
        assert re.fullmatch(rf"{re.escape(str(path))}: {digit}  \({digit} " + top3, line), line
    run = nnaccel("predict", tmp_path / "m.npz", *files, "--json")
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["digit"] for r in results] == list(expected)
    assert all(r["file"] == str(path) and len(r["top3"]) == 3 and r["top3"][0][0] == r["digit"]
               for r, path in zip(results, files))
    assert all(1 >= r["top3"][0][1] >= r["top3"][1][1] >= r["top3"][2][1] >= 0 for r in results)


def test_predict_errors_are_one_line(tmp_path, capsys):
    """Each a one-line error and exit 2; the first through the real command line (no traceback reaches a
    terminal), the rest through cli.main, the same code in this process."""
    nn.Sequential(nn.Dense(10, 10), device="cpu").save(tmp_path / "ten.npz")
    nn.Sequential(nn.Dense(64, 10), device="cpu").save(tmp_path / "digits.npz")
    save_png(np.zeros((8, 8), np.uint8), tmp_path / "black.png")
    save_png(np.full((1, 1), 90, np.uint8), tmp_path / "dot.png")
    (tmp_path / "notes.png").write_text("not a picture")
    digits = tmp_path / "digits.npz"
    for args, message in [
            ((digits, tmp_path / "nope.png"), "nope.png: no such image file"),
            ((tmp_path / "ten.npz", tmp_path / "black.png"), "the model takes 10 inputs"),
            ((digits, tmp_path / "black.png"), "black.png: no digit found: the picture is one uniform colour"),
            ((digits, tmp_path / "notes.png"), "notes.png: not a picture Pillow can read (cannot identify image file)"),
            ((digits, tmp_path / "dot.png"), "dot.png: the picture is 1x1 pixels, too small to show a digit"),
            ((digits, png_header(tmp_path / "huge.png", 10000, 10000)),
             "huge.png: the picture is 10000x10000 pixels, too large to read"),
            ((digits, png_header(tmp_path / "bomb.png", 14000, 14000)),
             "bomb.png: the picture has more than 178,956,970 pixels, too large to read"),
            ((digits, tmp_path), f"{tmp_path}: a folder, not an image file")]:
        if message.startswith("nope.png"):
            run = nnaccel("predict", *args)
            code, stderr = run.returncode, run.stderr
        else:
            code, _, stderr = in_process(capsys, "predict", *args)
        assert code == 2 and "Traceback" not in stderr
        assert len(stderr.splitlines()) == 1 and message in stderr, stderr
        assert stderr.startswith("nnaccel predict: error: ")
