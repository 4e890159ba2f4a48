"""Pictures with matplotlib (an optional extra: pip install 'nnaccel[plot]')."""

import math
import shutil
from pathlib import Path

from .checkpoint import atomic_write
from .errors import ConfigError


def pyplot():
    """matplotlib's pyplot on a file-only backend, or a clear error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib: pip install 'nnaccel[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_picture_path(path, option):
    """Refuse, before any work is done, a picture that cannot be written: a missing folder, no
    matplotlib, or a format matplotlib does not write. A name without an extension is refused too,
    though ``save_figure`` (as matplotlib) would add ``.png``: the command would then write another
    file than the one it was given. The name is checked before matplotlib is imported (half a second)."""
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise ConfigError(f"{option} {path}: folder {path.parent} does not exist")
    if not path.suffix:
        if path.name.startswith("."):  # '.png': to Path a hidden file's name, with no extension
            raise ConfigError(f"{option} {path} is an extension without a name; give both, such as "
                              f"{path.with_name('picture' + path.name.rstrip('.'))}")
        suggestion = path.with_name(path.name + "png") if path.name.endswith(".") else picture_path(path)
        raise ConfigError(f"{option} {path} has no extension to name the picture's format; add one, such as "
                          f"{suggestion}")
    plt = pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"{option} {path}: cannot draw a '{path.suffix}' file; use one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    if path.suffix.lower() == ".pgf":  # the one format matplotlib writes through another program
        tex = plt.rcParams["pgf.texsystem"]
        if shutil.which(tex) is None:
            raise ConfigError(f"{option} {path}: matplotlib writes a .pgf file with {tex}, which is not installed "
                              f"here; install it (TeX Live) or draw a .pdf, .svg or .png")


def plot_history(history, path):
    """Loss and accuracy curves per epoch, training and validation, as a PNG: gaps where an epoch lacks
    a value (NaN: a fit without validation). A list not of one value per epoch, which an older history
    could hold, is left out: its epochs are unknown, as is one of NaN alone (no fit had validation). A
    history of no epoch (a fit stopped or diverged in its first) draws empty axes."""
    plt = pyplot()
    epochs = history.get("epoch", [])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric, [])
            if len(values) == len(epochs) and not all(math.isnan(value) for value in values):
                axis.plot(epochs, values, style, marker="o", label="validation" if prefix else "training")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        if axis.lines:  # matplotlib warns of a legend with nothing in it
            axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
    plt.close(figure)


def picture_path(path):
    """``path`` as matplotlib names a picture: one without an extension gets ``.png``."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


def save_figure(figure, path, **options):
    """Write ``figure`` to ``path`` (``picture_path``) in the format its extension names, whole or not at
    all: a full disk leaves an older file there as it was, and the error names the file."""
    path = picture_path(path)
    file_format = path.suffix.lower().lstrip(".")
    atomic_write(path, lambda handle: figure.savefig(handle, format=file_format, **options))
