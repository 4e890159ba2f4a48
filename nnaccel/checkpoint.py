"""Checkpoints: one ``.npz`` with the architecture, weights, optimizer and RNG state.

A checkpoint is written to a temporary file in the destination folder,
flushed to disk and renamed over the old one, so a process killed at any
moment leaves either the old checkpoint or the new one, never half of one.
Arrays are stored on the host and load on any device.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy

from .errors import CheckpointError

FORMAT = "nnaccel-checkpoint"
VERSION = 1


def _host(array):
    return array.get() if hasattr(array, "get") else numpy.asarray(array)


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file, fsync it, and rename it to ``path``."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise CheckpointError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save(path, model, optimizer=None, trainer_state=None):
    """Write ``model`` (and optionally the optimizer and trainer state) to ``path``."""
    meta = {"format": FORMAT, "version": VERSION, "model": model.config(),
            "dropout_counters": model.rng_state()}
    arrays = {f"param/{p.name}": _host(p.data) for p in model.parameters()}
    arrays.update({f"buffer/{name}": _host(buffer) for name, buffer in model.buffers()})
    if optimizer is not None:
        state = optimizer.state_dict()
        meta["optimizer"] = {"config": optimizer.config(), "steps": state["steps"], "lr": state["lr"]}
        arrays.update({f"optim/{name}": buf for name, buf in state["buffers"].items()})
    if trainer_state is not None:
        meta["trainer"] = trainer_state
    arrays["meta"] = numpy.array(json.dumps(meta))
    atomic_write(path, lambda handle: numpy.savez(handle, **arrays))


def read(path):
    """``(meta, arrays)`` from a checkpoint file, or a CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as handle, numpy.load(handle, allow_pickle=False) as archive:
            if "meta" not in archive.files:
                raise CheckpointError(f"{path} is not an nnaccel checkpoint (no 'meta' entry)")
            arrays = {name: archive[name] for name in archive.files}
    except CheckpointError:
        raise
    except Exception as error:  # an untrusted file fails in zipfile, zlib or numpy in many ways
        raise CheckpointError(f"{path} is not a readable nnaccel checkpoint (truncated or corrupt: "
                              f"{type(error).__name__}: {error})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError:
        raise CheckpointError(f"{path} has a corrupt 'meta' entry") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an nnaccel checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {meta.get('version')}; this nnaccel reads {VERSION}")
    return meta, arrays


def describe(config):
    """A network in words: ``64-256-10`` for layers of neurons, else its layers as they are built."""
    from .layers import from_config

    layers = config["layers"]
    if all(c.get("type") in ("Dense", "Maxout", "Dropout") for c in layers):
        sizes = [layers[0].get("in_features")] + [c.get("out_features") for c in layers]
        return "-".join(str(s) for s in sizes if s is not None)
    return ", ".join(repr(from_config(c)) for c in layers)


def restore_model(model, meta, arrays, path):
    """Copy the checkpoint's weights into ``model`` after checking the architecture."""
    if meta["model"]["layers"] != model.config()["layers"] or \
            meta["model"].get("input_shape", list(model.input_shape)) != list(model.input_shape):
        raise CheckpointError(f"{path} holds a {describe(meta['model'])} network "
                              f"but the model is {describe(model.config())}")
    for parameter in model.parameters():
        key = f"param/{parameter.name}"
        if key not in arrays or arrays[key].shape != parameter.shape:
            raise CheckpointError(f"{path} has no weights for {parameter.name} of shape {parameter.shape}")
        parameter.data = model.backend.asarray(arrays[key].astype(model.dtype, copy=False))
    for name, buffer in model.buffers():
        key = f"buffer/{name}"
        if key not in arrays or arrays[key].shape != buffer.shape:
            raise CheckpointError(f"{path} has no buffer {name} of shape {buffer.shape}")
        buffer[...] = model.backend.asarray(arrays[key].astype(model.dtype, copy=False))
    model.set_rng_state(meta.get("dropout_counters", []))


def restore_optimizer(optimizer, meta, arrays, path):
    """Load the optimizer state saved by ``save`` (same optimizer type required)."""
    saved = meta.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state; it cannot resume training")
    if saved["config"]["type"] != optimizer.config()["type"]:
        raise CheckpointError(f"{path} was trained with {saved['config']['type']}, "
                              f"not {optimizer.config()['type']}")
    buffers = {key[len("optim/"):]: value for key, value in arrays.items() if key.startswith("optim/")}
    optimizer.load_state_dict({"steps": saved["steps"], "lr": saved["lr"], "buffers": buffers})


def load(path, device="cpu"):
    """The model stored in a checkpoint, on ``device``."""
    return model_from(*read(path), path, device)


def model_from(meta, arrays, path, device="cpu"):
    """The model described by a checkpoint already ``read``, on ``device``."""
    from .model import Sequential

    try:
        model = Sequential.from_config(meta["model"], device=device)
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path} has an unreadable architecture: {error}") from None
    restore_model(model, meta, arrays, path)
    return model
