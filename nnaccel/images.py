"""Pictures of handwritten digits turned into model inputs, prepared like the training data.

A photo or drawing (any size up to MAX_PIXELS, dark ink on light paper or the
reverse, colour or grey) becomes what a digit net was trained on:

* 28x28, as MNIST was made (LeCun et al.): white ink on black, the digit
  scaled to fit a 20x20 box keeping its aspect ratio, then placed so that its
  centre of mass falls on pixel (14, 14), shifted by whole pixels.
* 8x8, as scikit-learn's digits (UCI optdigits) were made: the digit scaled
  to fill a 32x32 bitmap keeping its aspect ratio (full height for most
  digits), centred by its bounding box, then each 4x4 block averaged.

In both, the contrast is stretched first (background 0, strongest ink 1,
pixels fainter than INK_THRESHOLD dropped as noise) and the strongest pixel
of the result is 1, as in the data sets.

What cannot be a picture of a digit is a DataError saying why: a file Pillow
cannot read, a picture of one uniform colour, one smaller than MIN_SIDE or
larger than MAX_PIXELS, or pixels that are NaN or infinite.
"""

import math
import struct
import warnings
from pathlib import Path

import numpy

from .errors import SPECIAL_FILE, ConfigError, DataError, ShapeError

MNIST_BOX = 20  # MNIST digits fit a 20x20 box inside the 28x28 image
DIGITS_BITMAP = 32  # scikit-learn's 8x8 digits are 4x4 block averages of 32x32 bitmaps
INK_THRESHOLD = 0.2  # after stretching, fainter pixels are paper grain or JPEG noise
LUMA = numpy.array([0.299, 0.587, 0.114])  # ITU-R 601 grey, as Pillow's convert("L")
SIZE_FOR_INPUTS = {784: 28, 64: 8}
MIN_SIDE = 8  # scikit-learn's digits, the smallest the nets learn from, are 8x8
DEEP_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # convert("L") would clip these to 0..255
# Pillow's default MAX_IMAGE_PIXELS, above which it warns of a decompression bomb: a 64-megapixel phone
# photo fits; larger is refused from the header, before anything is decoded.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# What prepare_for_model turns into floats: larger pictures are first shrunk by whole-pixel block means
# (a 12-megapixel photo to a quarter of its pixels), which still leave a digit a tenth of the picture high ~100 pixels,
# more than the 20 or 32 a net's input is drawn at, and keep its float arrays near 100 MB.
WORKING_PIXELS = 2048 * 2048
BAND_PIXELS = 2 ** 20  # a shrunk picture is converted a band of rows at a time, so its copies stay small
DEEP_WHITE = 65535  # white paper under a deep picture's transparent pixels: only 16-bit PNGs have them
# What Pillow raises for malformed files, besides OSError: its plugins parse with struct and
# indexing and signal broken headers with SyntaxError.
PILLOW_ERRORS = (OSError, ValueError, TypeError, IndexError, SyntaxError, EOFError, struct.error)


def load_image(path):
    """The pixels of an image file (PNG, JPEG, ...): (h, w) grey or (h, w, 3) colour.

    Pixels are uint8, except that 16-bit and float grey pictures keep their
    depth (preprocess_digit takes any range; squeezing them into 0..255
    would clip a light page and its ink to the same white). Transparent
    pixels are laid over white paper. A photo's EXIF orientation is applied,
    so a phone picture comes upright. A picture of more than MAX_PIXELS is
    refused before it is decoded. Needs Pillow, imported only here.
    """
    return _load(path)


def _load(path, shrink_above=None):
    """load_image's pixels; with ``shrink_above``, a picture of more pixels comes as the float64 means of
    blocks of pixels (JPEGs decoded at a smaller scale where they can be), so that no full-size copy of
    it is made beyond the decoded picture."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ConfigError("reading images needs Pillow: pip install 'nnaccel[image]' (or pip install pillow)") from None
    path = Path(path)
    if not path.is_file():
        problem = ("a folder, not an image file" if path.is_dir() else
                   SPECIAL_FILE if path.exists() else "no such image file")
        raise DataError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():  # refused below by size, by name, rather than warned of
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{path}: the picture is {width}x{height} pixels, too large to read (at most "
                                f"{MAX_PIXELS:,} pixels, Pillow's decompression-bomb limit): shrink it")
            factor = _shrink_factor(image.size, shrink_above)
            if factor > 1:
                image.draft(image.mode, (width // factor, height // factor))  # JPEG: decoded at 1/2 to 1/8
            ImageOps.exif_transpose(image, in_place=True)  # no copy of a picture already upright
            factor = _shrink_factor(image.size, shrink_above)
            if factor == 1:
                return _pixels(image)
            width, height = image.size
            band = factor * max(1, BAND_PIXELS // (factor * width))
            return numpy.concatenate([_block_means(_pixels(image.crop((0, top, width, min(top + band, height)))),
                                      factor) for top in range(0, height, band)])
    except Image.UnidentifiedImageError:  # its message repeats the path
        raise DataError(f"{path}: not a picture Pillow can read (cannot identify image file)") from None
    except Image.DecompressionBombError:  # raised from the header, before the size can be read
        raise DataError(f"{path}: the picture has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, too large to "
                        f"read (at most {MAX_PIXELS:,} pixels, Pillow's decompression-bomb limit): shrink it") from None
    except PILLOW_ERRORS as error:
        raise DataError(f"{path}: not a picture Pillow can read ({str(error) or type(error).__name__})") from None


def _pixels(image):
    """A Pillow picture's pixels as load_image returns them."""
    from PIL import Image

    if image.mode in DEEP_MODES:  # before RGBA below, which turns all their pixels white
        pixels = numpy.asarray(image)
        if "transparency" in image.info:  # a 16-bit PNG's tRNS: one see-through grey
            pixels = numpy.where(pixels == image.info["transparency"], DEEP_WHITE, pixels)
        return pixels
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return numpy.asarray(image.convert("L" if len(image.getbands()) == 1 else "RGB"))


def _shrink_factor(size, shrink_above):
    """The side of the pixel blocks that bring a picture of ``size`` to at most about ``shrink_above`` pixels,
    leaving its shorter side at least MIN_SIDE (too small is said of the picture as it is)."""
    pixels = size[0] * size[1]
    if shrink_above is None or pixels <= shrink_above:
        return 1
    return max(1, min(math.ceil(math.sqrt(pixels / shrink_above)), min(size) // MIN_SIDE))


def _block_means(pixels, factor):
    """The float64 means of ``factor`` x ``factor`` blocks of (h, w) or (h, w, 3) ``pixels``; those at the
    right and bottom edges average the pixels they have."""
    height, width = pixels.shape[:2]
    rows, cols = numpy.arange(0, height, factor), numpy.arange(0, width, factor)
    sums = numpy.add.reduceat(numpy.add.reduceat(pixels.astype(numpy.float64), rows, axis=0), cols, axis=1)
    counts = numpy.outer(numpy.diff(rows, append=height), numpy.diff(cols, append=width))
    return sums / counts.reshape(counts.shape + (1,) * (pixels.ndim - 2))


def preprocess_digit(array, size=28):
    """A picture of one digit as a flat float32 model input in [0, 1] of ``size * size`` pixels.

    ``array`` is (h, w) grey or (h, w, 3) colour pixels in any numeric range.
    ``size`` 28 prepares it like MNIST, 8 like scikit-learn's 8x8 digits.
    The background is whichever of light or dark the picture's border mostly
    is; the ink is made bright on black, as in both data sets.
    """
    if size not in (28, 8):
        raise ConfigError(f"size must be 28 (MNIST style) or 8 (scikit-learn digits style), got {size!r}")
    ink = _ink(_grey(array))
    rows, cols = numpy.nonzero(ink)
    digit = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    if size == 28:
        digit = _fit(digit, MNIST_BOX)
        canvas = _paste(digit, size, *_offsets_by_mass(digit, size))
    else:
        digit = _fit(digit, DIGITS_BITMAP)
        height, width = digit.shape
        bitmap = _paste(digit, DIGITS_BITMAP, (DIGITS_BITMAP - height + 1) // 2, (DIGITS_BITMAP - width + 1) // 2)
        block = DIGITS_BITMAP // size
        canvas = bitmap.reshape(size, block, size, block).mean(axis=(1, 3))
    canvas /= canvas.max()
    return canvas.astype(numpy.float32).ravel()


def prepare_for_model(path, n_inputs):
    """The image file at ``path`` as an input for a model with ``n_inputs`` (784: 28x28, 64: 8x8)."""
    if n_inputs not in SIZE_FOR_INPUTS:
        raise ConfigError(f"the model takes {n_inputs} inputs; pictures fit only models with 784 "
                          f"(28x28, MNIST) or 64 (8x8, scikit-learn digits) inputs")
    pixels = _load(path, shrink_above=WORKING_PIXELS)
    try:
        return preprocess_digit(pixels, SIZE_FOR_INPUTS[n_inputs])
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def _grey(array):
    """A 2-D float64 image from grey or colour pixels, refusing what cannot show a digit."""
    image = numpy.asarray(array)
    if image.dtype.kind not in "biuf":
        raise ShapeError(f"expected numeric pixels, got dtype {image.dtype}")
    image = image.astype(numpy.float64)
    if image.ndim == 3 and image.shape[2] == 3:
        image = image @ LUMA
    if image.ndim != 2 or 0 in image.shape:
        raise ShapeError(f"expected a (height, width) grey or (height, width, 3) colour image, "
                         f"got shape {numpy.shape(array)}")
    height, width = image.shape
    if min(height, width) < MIN_SIDE:
        raise DataError(f"the picture is {width}x{height} pixels, too small to show a digit "
                        f"(at least {MIN_SIDE}x{MIN_SIDE} needed)")
    bad = numpy.count_nonzero(~numpy.isfinite(image))
    if bad:
        raise DataError(f"the picture has {bad} NaN or infinite pixel{'s' if bad > 1 else ''}")
    return image


def _ink(image):
    """Bright ink on a zero background, stretched so the strongest ink is 1; faint noise zeroed.

    The border's median is the background: light (then the picture is
    inverted) when it is nearer the brightest pixel than the darkest. Only
    a picture of one uniform colour then has no pixel stronger than it.
    """
    border = numpy.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = numpy.median(border)
    if background > (image.min() + image.max()) / 2:
        image, background = -image, -background
    strongest = image.max()
    if strongest <= background:
        raise DataError("no digit found: the picture is one uniform colour")
    ink = numpy.clip((image - background) / (strongest - background), 0.0, 1.0)
    ink[ink < INK_THRESHOLD] = 0.0
    return ink


def _fit(image, box):
    """``image`` resized so its longer side is ``box`` pixels, keeping the aspect ratio."""
    height, width = image.shape
    scale = box / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    return _resampling(height, new_height) @ image @ _resampling(width, new_width).T


def _resampling(n_in, n_out):
    """The (n_out, n_in) matrix of a linear (triangle) filter widened when shrinking.

    Shrinking averages every input pixel under an output pixel (anti-aliased,
    like Pillow's BILINEAR); enlarging interpolates linearly.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (numpy.arange(n_out) + 0.5) * scale
    distance = numpy.abs(numpy.arange(n_in)[None, :] + 0.5 - centres[:, None])
    weights = numpy.maximum(0.0, 1.0 - distance / support)
    return weights / weights.sum(axis=1, keepdims=True)


def _paste(digit, size, top, left):
    """A black ``size`` x ``size`` image with ``digit`` at row ``top``, column ``left``."""
    canvas = numpy.zeros((size, size))
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return canvas


def _offsets_by_mass(digit, size):
    """Top-left corner that puts the digit's centre of mass on pixel (size/2, size/2), in whole pixels."""
    rows, cols = numpy.indices(digit.shape)
    mass = digit.sum()
    offsets = []
    for coordinates, length in ((rows, digit.shape[0]), (cols, digit.shape[1])):
        centre = (coordinates * digit).sum() / mass
        offsets.append(int(numpy.clip(numpy.floor(size / 2 - centre + 0.5), 0, size - length)))
    return offsets
