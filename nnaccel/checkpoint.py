"""Checkpoints: one ``.npz`` with the architecture, weights, optimizer and RNG state.

A checkpoint is written to a temporary file in the destination folder,
flushed to disk and renamed over the old one, so a process killed at any
moment leaves either the old checkpoint or the new one, never half of one.
Arrays are stored on the host and load on any device.

A checkpoint is a file from anyone, and loading one is safe. Nothing is
unpickled, ever: members are parsed as plain ``.npy`` arrays of numbers and
an object dtype is refused. The ``meta`` entry (at most ``META_LIMIT``
bytes) is read and checked first, and from the architecture it describes
the loader derives every array the file must hold: each parameter and
buffer with its shape in the model's dtype, and the optimizer's buffers
(SGD's velocity when it has momentum, Adam's m and v), one value per
parameter, and the best weights of each early stopping state that keeps
them. Before reading any array data it refuses a file whose members
are missing, extra, duplicated, compressed or encrypted (no zip bombs),
whose zip sizes disagree with their ``.npy`` headers, whose headers give
another shape or dtype, or whose architecture needs more bytes than the file
holds (a small file claiming 10^12 parameters is refused before anything is
allocated): a load allocates about the file's size, plus the model it
describes. Nonsense metadata (sizes that are zero, negative, not integers
or above ``MAX_SIZE``, NaN, unknown layers, optimizers, losses or
schedules, a malformed trainer state) is refused too. Every refusal is a
CheckpointError naming the file and the problem; no other exception
escapes ``read``, ``load``, ``model_from`` or ``Trainer.restore`` for a bad
file.
"""

import contextlib
import errno
import io
import json
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy
from numpy.lib import format as npy_format

from . import optimizers
from .errors import SPECIAL_FILE, CheckpointError, ConfigError, OutputError

FORMAT = "nnaccel-checkpoint"
VERSION = 1

# What a checkpoint may ask for; each is checked before anything is read or built.
META_LIMIT = 8 * 2**20  # bytes of the 'meta' entry (a JSON string: a real one holds a few KiB)
HEADER_LIMIT = 4096  # bytes of one member's .npy header (numpy writes about 128)
MAX_SIZE = 2**31 - 1  # any integer in a layer's config, and the values per sample anywhere in the model
MAX_LAYERS = 10_000
MAX_COUNT = 2**63 - 1  # epochs, steps, seeds, batch sizes, dropout counters
MAX_PATH = 4096  # characters of the data's path in a run's plan (Linux's PATH_MAX)
_CHUNK = 2**20  # array data is read in pieces of this many bytes straight into its array
FLOAT_NAMES = ("float32", "float64")


def _host(array):
    return array.get() if hasattr(array, "get") else numpy.asarray(array)


def expected_size(model, optimizer=None, weight_copies=0):
    """About how many bytes ``save`` writes for ``model``, ``optimizer``'s state and ``weight_copies``
    more copies of the weights (early stopping's best, and the last epoch's beside them)."""
    slots = len(optimizer.state_names) if optimizer is not None else 0
    return (model.flat_params.nbytes * (1 + slots + weight_copies) + model.flat_buffers.nbytes * (1 + weight_copies)
            + 2**14)  # and the metadata


def check_writable(path, what="checkpoint", size=0, example="model.npz", rewritten=False):
    """Refuse, before any work is done, an output file that could not be written: ``path`` is a
    folder, its folder does not exist or cannot be written, or holds less than ``size`` bytes free
    (a file ``rewritten`` every epoch needs room for two, less the file there now: ``atomic_write``
    keeps the last beside the new until the rename). The folder is probed with a real temporary
    file (permissions alone do not say, for root or on a read-only mount). ``example`` is the file
    name suggested when ``path`` is a folder. A symbolic link is checked where it leads, as
    ``atomic_write`` writes there. A name ending in a slash is a folder's, as the system reads it."""
    _refuse_a_folder_name(path, what)
    _refuse_a_name_too_long(path, what, OutputError)
    path = Path(path)
    target = _write_target(path, what)
    folder = target.parent
    shown = path if target == path else f"{path} (a link to {target})"
    if target.is_dir():
        raise OutputError(f"{what} {shown} is a folder; name a file in it, such as {path / example}")
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {shown}: {not_a_folder(folder)}")
    _refuse_special_file(path, what)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"cannot write {what} {path}: {error.strerror} (folder {folder})") from None
    free = shutil.disk_usage(folder).free
    there = target.stat().st_size if rewritten and target.is_file() else 0
    needed = max(size, 2 * size - there) if rewritten else size
    if free < needed:
        twice = " (and as much again while each epoch's replaces the last)" if free >= size else ""
        raise OutputError(f"cannot write {what} {path}: {folder} has {free / 2**20:.1f} MiB free, and "
                          f"the file takes about {size / 2**20:.1f} MiB{twice}")


def _refuse_a_folder_name(path, what):
    """A name ending in a slash is a folder's, as the system reads it; ``Path("w.png/")`` drops the slash.
    An empty name is none (``Path("")`` is the working folder, which a rename cannot replace)."""
    if str(path) == "":
        raise OutputError(f"{what} '' is an empty file name; name a file to write")
    if str(path).endswith(("/", os.sep)) and not Path(path).is_dir():
        raise OutputError(f"{what} {path} names a folder (it ends in '{str(path)[-1]}'), and there is none; to "
                          f"write a file, drop the '{str(path)[-1]}': {Path(path)}")


def _refuse_a_name_too_long(path, what, error_class):
    """A name the file system cannot hold, refused as ``what`` (the first stat's OSError named the file only)."""
    try:
        os.lstat(path)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise error_class(f"{what} {path}: the name is too long for the file system ({error.strerror})") \
                from None


def not_a_folder(folder):
    """Why a file cannot be written in ``folder``, which is no folder: it is missing, or a file."""
    return f"{folder} is a file, not a folder" if folder.exists() else f"folder {folder} does not exist"


def _broken_link(path):
    """How a symbolic link that opens no file is broken: it leads round in a loop, or to nothing."""
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        missing = path
        while missing.is_symlink():  # (no loop: resolve found a missing file at the chain's end)
            missing = missing.parent / os.readlink(missing)
        return f"is a symbolic link to {missing}, which does not exist"
    except (OSError, RuntimeError):  # RuntimeError before Python 3.13
        pass
    return "is a symbolic link that leads round in a loop"


def _write_target(path, what):
    """The file a write to ``path`` replaces: where a symbolic link leads (the link stays), else ``path``."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError before Python 3.13, which returns a link of the loop
        target = path
    if target.is_symlink():
        raise OutputError(f"cannot write {what} {path}: it is a symbolic link that leads round in a loop")
    return target


def _refuse_special_file(path, what):
    """The rename that writes a file would replace a device, pipe or socket there (/dev/null, for root)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it exists and is {SPECIAL_FILE}; name a new file or a "
                          f"regular one")


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file, fsync it, and rename it to ``path``; on any
    failure (a full disk, a signal) the temporary file is removed and ``path`` is as it was.
    A stop signal arriving while the temporary file is created and written is handled once it is
    (``_stop_signals_held``): landing in ``mkstemp`` between the file's creation and its name's
    return, it would leave a temporary file nobody knows of. A symbolic link is written through,
    as ``open`` does: the file it points to is replaced, the link stays. A name ending in a slash is
    refused, as ``open`` refuses it."""
    _refuse_a_folder_name(path, "file")
    path = Path(path)
    target = _write_target(path, "file")
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {not_a_folder(folder)}")
    _refuse_special_file(path, "file")
    tmp = None
    try:
        with _stop_signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as handle:
                _give_mode_of_open(handle, target)
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            previous = "; the previous file is intact" if path.is_file() else ""
            raise OutputError(f"cannot write {path}: {error.strerror or error}{previous}") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _give_mode_of_open(handle, path):
    """Give the temporary file what ``open(path, "w")`` would leave: the mode of the file it replaces,
    else 0666 less the umask (read from /proc where there is one: setting it to learn it races with other
    threads), not mkstemp's 0600. Best effort: a file system that refuses modes keeps the write."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        try:
            with open("/proc/self/status") as status:
                umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            umask = os.umask(0o022)
            os.umask(umask)
        mode = 0o666 & ~umask
    try:
        os.fchmod(handle.fileno(), mode)
    except (OSError, AttributeError):  # FAT, some network mounts; no fchmod on Windows
        pass


@contextlib.contextmanager
def _stop_signals_held():
    """A SIGINT or SIGTERM arriving in the block is handled when it ends, by the handler it would
    have met, each one caught in turn (the command line's: a first stops after the step, a second
    at once). Among the writers are ``zipfile``'s: a stop raised while it builds a member's handle
    leaves the archive counting that handle open, and its close then raises ValueError (again when
    collected), hiding the exit asked for behind a traceback. Python runs signal handlers in the
    main thread only, so only there is anything held; a handler not set from Python (None) is
    left alone, as it could not be put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, previous = [], {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(number) is not None:
                previous[number] = signal.signal(number, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in caught:
            signal.raise_signal(number)


def save(path, model, optimizer=None, trainer_state=None, trainer_arrays=None):
    """Write ``model`` (and optionally the optimizer and trainer state, with the trainer's arrays:
    early stopping's best weights) to ``path``."""
    from .layers import check_saveable_layers

    check_saveable_layers(model.layers)
    if len(model.layers) > MAX_LAYERS:  # the loader would refuse it
        raise ConfigError(f"a model of {len(model.layers):,} layers cannot be saved: a checkpoint holds at most "
                          f"{MAX_LAYERS:,}")
    meta = {"format": FORMAT, "version": VERSION, "model": model.config(),
            "dropout_counters": model.rng_state()}
    arrays = {f"param/{p.name}": _host(p.data) for p in model.parameters()}
    arrays.update({f"buffer/{name}": _host(buffer) for name, buffer in model.buffers()})
    if optimizer is not None:
        state = optimizer.state_dict()
        meta["optimizer"] = {"config": optimizers.saved_config(optimizer), "steps": state["steps"], "lr": state["lr"]}
        # In the model's dtype, as the loader expects (state restored from another dtype's checkpoint
        # is converted at the next step anyway).
        arrays.update({f"optim/{name}": numpy.asarray(buf, model.dtype) for name, buf in state["buffers"].items()})
    if trainer_state is not None:
        meta["trainer"] = trainer_state
        arrays.update({name: numpy.asarray(_host(array), model.dtype)
                       for name, array in (trainer_arrays or {}).items()})
    for key, array in arrays.items():  # what read() would refuse is not written, over a good file least of all
        if problem := _not_computable(key, array):
            raise OutputError(f"{path} was not written: its member {key!r} would hold {problem} (the weights "
                              f"overflowed), which no command could load")
    arrays["meta"] = numpy.array(json.dumps(meta))
    atomic_write(path, lambda handle: numpy.savez(handle, **arrays))


def read(path):
    """``(meta, arrays)`` from a checkpoint file, or a CheckpointError saying what is wrong.

    The metadata is read and checked first, and the arrays only once every
    member's zip entry and ``.npy`` header agree with the architecture it
    describes (see the module docstring): a file from anyone is safe here.
    """
    if str(path) == "":  # not Path(""), the working folder
        raise CheckpointError("checkpoint '' is an empty file name; name a checkpoint file")
    _refuse_a_name_too_long(path, "checkpoint", CheckpointError)
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():  # (a pipe is not opened: reading one would wait for a writer)
        problem = (f"is {SPECIAL_FILE}" if path.exists() else _broken_link(path) if path.is_symlink()
                   else "does not exist")
        raise CheckpointError(f"checkpoint {path} {problem}")
    try:
        with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            return _read_checked(path, os.fstat(handle.fileno()).st_size, archive)
    except CheckpointError:
        raise
    except Exception as error:  # an untrusted file fails in zipfile, zlib or numpy in many ways
        raise CheckpointError(f"{path} is not a readable nnaccel checkpoint (truncated or corrupt: "
                              f"{type(error).__name__}: {_brief(error)})") from None


def _brief(value, limit=200):
    """``value`` in words, cut to ``limit`` characters: hostile files hold megabyte-long strings."""
    text = value if isinstance(value, str) else str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _shown(value):
    """A value from the file as Python writes it (strings quoted), cut short."""
    return _brief(repr(value))


def _read_checked(path, size, archive):
    """``read`` on an open zip of ``size`` bytes: zip entries, then meta, then headers, then data."""
    members = {}
    for info in archive.infolist():
        if info.filename in members:
            raise CheckpointError(f"{path} holds two members named {_brief(info.filename)}")
        members[info.filename] = info
    claimed = sum(info.compress_size for info in members.values())
    if claimed > size:
        raise CheckpointError(f"{path}: its zip entries claim {claimed:,} bytes but the file holds {size:,} "
                              f"(overlapping or forged entries)")
    if "meta.npy" not in members:
        raise CheckpointError(f"{path} is not an nnaccel checkpoint (no 'meta' entry)")
    meta = _read_meta(path, archive, members["meta.npy"])
    expected = _expected_arrays(path, meta, members, size)
    unexpected = sorted(set(members) - set(expected) - {"meta.npy"})
    if unexpected:
        raise CheckpointError(f"{path} holds {len(unexpected)} member(s) its architecture has no place for: "
                              f"{_brief(', '.join(unexpected))}")
    missing = [name[:-4] for name in expected if name not in members]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} array(s) its architecture needs: "
                              f"{_brief(', '.join(missing))}")
    headers = {name: _check_member(path, archive, members[name], *spec) for name, spec in expected.items()}
    arrays = {spec[0]: _read_array(path, archive, members[name], *spec, headers[name])
              for name, spec in expected.items()}
    for key, array in arrays.items():
        _check_values(path, key, array)
    return meta, arrays


def _check_values(path, key, array):
    """A CheckpointError naming member ``key`` unless every output can be computed from its values: weights
    finite (NaN or inf make every output and the next loss NaN), early stopping's best and the last epoch's
    too (a fit puts them in the model), no NaN anywhere, a BatchNorm variance not
    negative (its square root is NaN). Buffers and optimizer state may hold inf, as training writes it: a
    BatchNorm variance of inputs near 1e19 overflows (that feature then normalises to 0), as Adam's second
    moment does for huge gradients (that weight's update is 0)."""
    if problem := _not_computable(key, array):
        raise CheckpointError(f"{path}: member {key!r} holds {problem}, from which nothing can "
                              f"be computed (a damaged or edited file, or a run whose weights overflowed)")
    if key.endswith(".running_var") and bool((array < 0).any()):
        raise CheckpointError(f"{path}: member {key!r} holds a negative variance ({float(array.min()):g}); the "
                              f"file is damaged or was edited")


def _not_computable(key, array):
    """'NaN or inf' where weights hold either, 'NaN' where any other member holds it, else None: values a
    checkpoint is refused for, on reading and on writing alike."""
    weights = _holds_weights(key)
    if bool((~numpy.isfinite(array) if weights else numpy.isnan(array)).any()):
        return "NaN or inf" if weights else "NaN"
    return None


def _holds_weights(key):
    """Whether member ``key`` holds weights: the model's, or early stopping's best and the last epoch's, which a
    fit puts in the model."""
    return key.startswith("param/") or key.endswith("/params")


def _check_entry(path, info, what):
    """Refuse a zip entry nnaccel does not write: encrypted, compressed, or sized inconsistently."""
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{path}: member {what!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: member {what!r} is compressed (zip method {info.compress_type}); "
                              f"nnaccel stores members uncompressed and refuses compressed ones, which could "
                              f"expand without bound (a zip bomb)")
    if info.file_size != info.compress_size:
        raise CheckpointError(f"{path}: member {what!r} claims {info.file_size:,} bytes but stores "
                              f"{info.compress_size:,}")


def _read_exactly(path, stream, count, what):
    data = b""
    while len(data) < count:
        chunk = stream.read(count - len(data))
        if not chunk:
            raise CheckpointError(f"{path}: member {what!r} is truncated")
        data += chunk
    return data


def _npy_header(path, stream, what):
    """``(shape, fortran_order, dtype, data offset)`` from a member's ``.npy`` header, its length bounded."""
    try:
        version = npy_format.read_magic(stream)
    except ValueError as error:  # not .npy: a pickle, another format, garbage
        raise CheckpointError(f"{path}: member {what!r} is not a .npy array ({_brief(error)})") from None
    if version not in ((1, 0), (2, 0)):
        raise CheckpointError(f"{path}: member {what!r} is .npy version {version[0]}.{version[1]}; "
                              f"nnaccel reads 1.0 and 2.0")
    prefix = _read_exactly(path, stream, 2 if version == (1, 0) else 4, what)
    length = int.from_bytes(prefix, "little")
    if length > HEADER_LIMIT:
        raise CheckpointError(f"{path}: member {what!r} has a {length:,}-byte .npy header, over the limit of "
                              f"{HEADER_LIMIT:,}")
    header = prefix + _read_exactly(path, stream, length, what)
    parse = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = parse(io.BytesIO(header), max_header_size=HEADER_LIMIT)
    except Exception as error:  # ValueError, SyntaxError, TypeError... from a literal_eval of anything
        raise CheckpointError(f"{path}: member {what!r} has a corrupt .npy header ({_brief(error)})") from None
    return shape, fortran_order, dtype, npy_format.MAGIC_LEN + len(header)


def _read_meta(path, archive, info):
    """The parsed JSON of the 'meta' entry: one string, bounded by ``META_LIMIT``."""
    _check_entry(path, info, "meta")
    if info.file_size > META_LIMIT:
        raise CheckpointError(f"{path}: its 'meta' entry is {info.file_size:,} bytes, over the limit of "
                              f"{META_LIMIT:,}")
    with archive.open(info) as stream:
        shape, _, dtype, offset = _npy_header(path, stream, "meta")
        if shape != () or dtype.str != f"<U{dtype.itemsize // 4}" or offset + dtype.itemsize != info.file_size:
            raise CheckpointError(f"{path} has a corrupt 'meta' entry (a {_brief(dtype.str)} array of shape "
                                  f"{_brief(shape)}, not one JSON string)")
        data = _read_exactly(path, stream, dtype.itemsize, "meta")
        if stream.read(1):  # (also where the zip's CRC is checked)
            raise CheckpointError(f"{path} has a corrupt 'meta' entry (data after its string)")
    try:  # UTF-32 as numpy stores it, trailing NULs dropped as numpy does; invalid code points refused
        return json.loads(data.decode("utf-32-le").rstrip("\0"))
    except (ValueError, RecursionError):  # bad JSON or code points; nesting deeper than Python's stack
        raise CheckpointError(f"{path} has a corrupt 'meta' entry") from None


def _check_member(path, archive, info, key, shape, dtype):
    """The data offset of member ``key`` once its entry and header say ``shape`` and ``dtype``."""
    _check_entry(path, info, key)
    with archive.open(info) as stream:
        found_shape, fortran_order, found, offset = _npy_header(path, stream, key)
    if found.hasobject:
        raise CheckpointError(f"{path}: member {key!r} holds Python objects (dtype {_brief(found.descr)}); a "
                              f"checkpoint holds numbers, and nnaccel never unpickles")
    if found != dtype:
        raise CheckpointError(f"{path}: member {key!r} has dtype {_brief(found.str)} but the model computes in "
                              f"{dtype} ({dtype.str})")
    if found_shape != shape:
        raise CheckpointError(f"{path}: member {key!r} has shape {_brief(found_shape)} but the architecture in "
                              f"its metadata implies {shape}")
    implied = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != implied:
        raise CheckpointError(f"{path}: member {key!r} is {info.file_size:,} bytes but its header implies "
                              f"{implied:,} ({shape} of {dtype})")
    return offset, fortran_order


def _read_array(path, archive, info, key, shape, dtype, header):
    """Member ``key``'s data, read in pieces into its array: no copy of the whole, nothing unpickled."""
    offset, fortran_order = header
    storage = numpy.empty(shape[::-1] if fortran_order else shape, dtype)  # the bytes in file order
    array = storage.T if fortran_order else storage
    view = memoryview(storage.reshape(-1)).cast("B")
    with archive.open(info) as stream:
        _read_exactly(path, stream, offset, key)
        position = 0
        while position < len(view):
            chunk = stream.read(min(_CHUNK, len(view) - position))
            if not chunk:
                raise CheckpointError(f"{path}: member {key!r} is truncated")
            view[position:position + len(chunk)] = chunk
            position += len(chunk)
        if stream.read(1):  # (also where the zip's CRC is checked)
            raise CheckpointError(f"{path}: member {key!r} has data after its array")
    return array


def _expected_arrays(path, meta, members, size):
    """``{member: (array name, shape, dtype)}`` of every array the metadata implies, once the metadata is
    checked and the architecture shown to fit in the file's ``size`` bytes (nothing is allocated)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an nnaccel checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {_shown(meta.get('version'))}; "
                              f"this nnaccel reads {VERSION}")
    parameters, buffers, dtype = _check_model(path, meta.get("model"))
    counters = meta.get("dropout_counters", [])
    if not isinstance(counters, list) or len(counters) != len(meta["model"]["layers"]):
        raise CheckpointError(f"{path}: its 'dropout_counters' must be a list of one counter per layer, found "
                              f"{_shown(counters)}")
    for counter in counters:
        _count(path, counter, "a dropout counter")
    state_names, idle = ((), ()) if meta.get("optimizer") is None else _check_optimizer(path, meta["optimizer"])
    if meta.get("trainer") is not None:
        _check_trainer(path, meta["trainer"])
    count = sum(math.prod(shape) for _, shape in parameters)
    needed = (count + sum(math.prod(shape) for _, shape in buffers)) * dtype.itemsize
    if needed > size:
        raise CheckpointError(f"{path} describes a network of {count:,} parameters ({needed:,} bytes of {dtype} "
                              f"weights and buffers) but the file holds {size:,} bytes; refused before "
                              f"allocating anything")
    expected = {f"param/{name}.npy": (f"param/{name}", shape, dtype) for name, shape in parameters}
    expected.update({f"buffer/{name}.npy": (f"buffer/{name}", shape, dtype) for name, shape in buffers})
    if any(name.startswith("optim/") for name in members):  # none before the first step: all or none
        expected.update({f"optim/{name}.npy": (f"optim/{name}", (count,), dtype) for name in state_names})
        expected.update({f"optim/{name}.npy": (f"optim/{name}", (count,), dtype) for name in idle
                         if f"optim/{name}.npy" in members})  # kept only where it was made
    stopping = (meta.get("trainer") or {}).get("early_stopping", [])
    sizes = {"params": count, "buffers": sum(math.prod(shape) for _, shape in buffers)}
    expected.update({f"early_stopping/{index}/{part}.npy": (f"early_stopping/{index}/{part}", (size,), dtype)
                     for index, saved in enumerate(stopping) if saved["weights_epoch"] is not None
                     for part, size in sizes.items()})
    if (meta.get("trainer") or {}).get("last_weights"):
        expected.update({f"last/{part}.npy": (f"last/{part}", (size,), dtype) for part, size in sizes.items()})
    return expected


def _count(path, value, what, minimum=0):
    """``value`` if it is an int in [minimum, MAX_COUNT] (bools refused), else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise CheckpointError(f"{path}: {what} must be an integer from {minimum} to 2**63 - 1, found "
                              f"{_shown(value)}")
    return value


def _real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(path, what, value):
    """Refuse integers above MAX_SIZE and non-finite floats anywhere in a layer's config."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int) and abs(value) > MAX_SIZE:
        raise CheckpointError(f"{path}: {what} is {_shown(value)}, over the limit of {MAX_SIZE:,}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{path}: {what} is {value}, not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(path, f"{what} {_brief(key, 40)}", item)
    elif isinstance(value, list):
        for item in value:
            _check_numbers(path, what, item)


def _check_model(path, config):
    """``(parameters, buffers, dtype)`` of the architecture ``config``, checked, with nothing allocated."""
    from .model import Sequential

    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise CheckpointError(f"{path} has an unreadable architecture: its 'model' needs a list of 'layers'")
    layers = config["layers"]
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise CheckpointError(f"{path} has an unreadable architecture: {len(layers):,} layers (1 to "
                              f"{MAX_LAYERS:,} allowed)")
    if config.get("dtype", "float32") not in FLOAT_NAMES:
        raise CheckpointError(f"{path} has an unreadable architecture: dtype {_shown(config.get('dtype'))}, "
                              f"not float32 or float64")
    _count(path, config.get("seed", 0), "the model's seed")
    _check_numbers(path, "the input shape", config.get("input_shape"))
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("type"), str):
            raise CheckpointError(f"{path} has an unreadable architecture: layer {index} is "
                                  f"{_shown(layer)}, not a layer's config")
        for key, value in layer.items():
            _check_numbers(path, f"layer {index} ({_brief(layer['type'], 40)}) {key}", value)
    try:
        parameters, buffers, shapes = Sequential.layout(config)
    except Exception as error:  # ConfigError mostly; TypeError and ValueError from constructors given nonsense
        what = "" if isinstance(error, ConfigError) else f"{type(error).__name__}: "
        raise CheckpointError(f"{path} has an unreadable architecture: {what}{_brief(error, 400)}") from None
    for index, shape in enumerate(shapes):
        if math.prod(shape) > MAX_SIZE:
            where = "its input" if index == 0 else f"layer {index - 1}'s output"
            raise CheckpointError(f"{path} has an unreadable architecture: {where} holds {math.prod(shape):,} "
                                  f"values per sample, over the limit of {MAX_SIZE:,}")
    return parameters, buffers, numpy.dtype(config.get("dtype", "float32"))


def _check_optimizer(path, saved):
    """The names of the buffers the saved optimizer uses and of those it may keep unused (``idle_state_names``),
    once its config builds and its counts are sane."""
    from . import optimizers

    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or \
            not isinstance(saved["config"].get("type"), str):
        raise CheckpointError(f"{path} has an unreadable optimizer state: {_shown(saved)}")
    _count(path, saved.get("steps"), "the optimizer's step count")
    lr = saved.get("lr")
    if not _real(lr) or not 0 <= lr < math.inf:
        raise CheckpointError(f"{path}: the optimizer's learning rate must be a finite number >= 0, found "
                              f"{_shown(lr)}")
    try:
        optimizer = optimizers.get(saved["config"])
        return optimizer.state_names, optimizer.idle_state_names
    except Exception as error:  # ConfigError; TypeError for unknown or mistyped options
        raise CheckpointError(f"{path} has an unreadable optimizer config: {_brief(error, 400)}") from None


def _check_rng(path, state, what):
    try:
        numpy.random.PCG64(0).state = state
    except Exception as error:  # TypeError, ValueError, KeyError, OverflowError for a forged state
        raise CheckpointError(f"{path}: {what} is not a PCG64 generator state ({type(error).__name__}: "
                              f"{_brief(error)})") from None


def _check_trainer(path, state):
    """Refuse a trainer state that ``Trainer.restore`` or ``nnaccel train --resume`` could not use."""
    from . import losses, optimizers

    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has an unreadable trainer state: {_shown(state)}")
    for key in ("epoch", "seed", "batch_size", "rng", "history", "loss"):
        if key not in state:
            raise CheckpointError(f"{path}: its trainer state has no {key!r}")
    _count(path, state["epoch"], "the trainer's epoch")
    _count(path, state["seed"], "the trainer's seed")
    _count(path, state["batch_size"], "the trainer's batch size", minimum=1)
    if "world_size" in state:
        _count(path, state["world_size"], "the trainer's world size", minimum=1)
    if state.get("samples") is not None:
        _count(path, state["samples"], "the trainer's training samples", minimum=1)
    if state["loss"] is not None:
        try:
            if not isinstance(state["loss"], str):
                raise ConfigError(f"a loss name, not {_shown(state['loss'])}")
            losses.get(state["loss"])
        except ConfigError as error:
            raise CheckpointError(f"{path}: its trainer state has an unreadable loss: {_brief(error)}") from None
    _check_rng(path, state["rng"], "the trainer's random state")
    history = state["history"]
    if not isinstance(history, dict) or not all(isinstance(values, list) and all(_real(v) for v in values)
                                                for values in history.values()):
        raise CheckpointError(f"{path}: its trainer history must map names to lists of numbers, found "
                              f"{_shown(history)}")
    point = state.get("resume_point")
    if point is not None:
        if not isinstance(point, dict) or not all(key in point for key in ("step", "rng", "loss_sum", "correct_sum")) \
                or not _real(point["loss_sum"]) or not _real(point["correct_sum"]):
            raise CheckpointError(f"{path}: its resume point must hold a step, a random state and two sums, found "
                                  f"{_shown(point)}")
        _count(path, point["step"], "the resume point's step")
        per_step = point.get("batch_size", state["batch_size"])  # (a point of an older checkpoint has none)
        if isinstance(per_step, bool) or per_step != state["batch_size"]:
            raise CheckpointError(f"{path}: its resume point's samples per step must be the run's batch size, "
                                  f"{state['batch_size']}, found {_shown(per_step)}")
        _check_rng(path, point["rng"], "the resume point's random state")
    stopping = state.get("early_stopping", [])
    if not isinstance(stopping, list) or len(stopping) > MAX_LAYERS:
        raise CheckpointError(f"{path}: its early stopping states must be a list, found {_shown(stopping)}")
    for saved in stopping:
        if not isinstance(saved, dict) or set(saved) != {"monitor", "sign", "since", "weights_epoch"} or \
                not isinstance(saved["monitor"], str) or not _real(saved["sign"]) or saved["sign"] not in (1, -1):
            raise CheckpointError(f"{path}: an early stopping state must hold a monitor, a sign of 1 or -1, the "
                                  f"epoch it began after and its weights' epoch, found {_shown(saved)}")
        _count(path, saved["since"], "the epoch early stopping began after")
        if saved["since"] > state["epoch"]:
            raise CheckpointError(f"{path}: early stopping began after epoch {saved['since']}, later than the "
                                  f"trainer's epoch {state['epoch']}")
        if saved["weights_epoch"] is not None:
            _count(path, saved["weights_epoch"], "the epoch of early stopping's best weights", minimum=1)
    if not isinstance(state.get("last_weights", False), bool):
        raise CheckpointError(f"{path}: whether it holds the last epoch's weights must be true or false, found "
                              f"{_shown(state['last_weights'])}")
    plan = state.get("plan")
    if plan is not None:
        data = plan.get("data", "mnist") if isinstance(plan, dict) else None  # older checkpoints have none
        if not isinstance(plan, dict) or set(plan) - {"data"} != {"epochs", "validation_split"} or \
                not _real(plan["validation_split"]) or not 0 <= plan["validation_split"] < 1 or \
                not isinstance(data, str) or not 0 < len(data) <= MAX_PATH or "\0" in data:
            raise CheckpointError(f"{path}: the run's plan must hold its epochs, a validation split from 0 to "
                                  f"below 1 and the data's name or path, found {_shown(plan)}")
        _count(path, plan["epochs"], "the run's planned epochs", minimum=1)
    schedule = state.get("schedule")
    if schedule is not None:
        try:
            if not isinstance(schedule, dict):
                raise ConfigError(f"a schedule's config, not {_shown(schedule)}")
            optimizers.schedule_from(schedule)
        except Exception as error:  # ConfigError; TypeError for unknown or mistyped options
            raise CheckpointError(f"{path}: its trainer state has an unreadable schedule: "
                                  f"{_brief(error)}") from None


def describe(config):
    """A network in words: ``64-256-10`` for layers of neurons, else its layers as they are built."""
    from .layers import from_config

    layers = config["layers"]
    if all(c.get("type") in ("Dense", "Maxout", "Dropout") for c in layers):
        sizes = [layers[0].get("in_features")] + [c.get("out_features") for c in layers]
        return "-".join(str(s) for s in sizes if s is not None)
    return ", ".join(repr(from_config(c)) for c in layers)


def restore_model(model, meta, arrays, path):
    """Copy the checkpoint's weights into ``model`` after ``check_model``."""
    check_model(model, meta, arrays, path)
    for parameter in model.parameters():
        parameter.data = model.backend.asarray(arrays[f"param/{parameter.name}"].astype(model.dtype, copy=False))
    with model.backend.activate():  # cuda:1 copies on GPU 1
        for name, buffer in model.buffers():
            buffer[...] = model.backend.asarray(arrays[f"buffer/{name}"].astype(model.dtype, copy=False))
    model.set_rng_state(int(meta["model"].get("seed", 0)), meta.get("dropout_counters", []))


def check_model(model, meta, arrays, path):
    """A CheckpointError unless the checkpoint holds ``model``'s architecture (its layers as this version
    builds them: a file from before a layer took a new option holds no value for it) and every array."""
    from .layers import from_config

    try:
        saved = [from_config(layer).config() for layer in meta["model"]["layers"]]
    except Exception as error:  # ConfigError, or a meta made by hand (a KeyError, an OverflowError...)
        raise CheckpointError(f"{path} has an unreadable architecture: {_brief(error, 400)}") from None
    if saved != model.config()["layers"]:
        raise CheckpointError(f"{path} holds a {describe(meta['model'])} network "
                              f"but the model is {describe(model.config())}")
    shape = meta["model"].get("input_shape", list(model.input_shape))
    if shape != list(model.input_shape):
        raise CheckpointError(f"{path} holds a network for inputs of shape {tuple(shape)} but the model takes "
                              f"{tuple(model.input_shape)}")
    for parameter in model.parameters():
        key = f"param/{parameter.name}"
        if key not in arrays or arrays[key].shape != parameter.shape:
            raise CheckpointError(f"{path} has no weights for {parameter.name} of shape {parameter.shape}")
    for name, buffer in model.buffers():
        key = f"buffer/{name}"
        if key not in arrays or arrays[key].shape != buffer.shape:
            raise CheckpointError(f"{path} has no buffer {name} of shape {buffer.shape}")
    for key, array in arrays.items():  # a float64 file loads into a float32 model: its weights must fit
        if _holds_weights(key) and array.dtype.itemsize > model.dtype.itemsize:
            with numpy.errstate(over="ignore"):
                beyond = numpy.abs(array[~numpy.isfinite(array.astype(model.dtype))])
            if beyond.size:
                raise CheckpointError(f"{path}: member {key!r} holds {float(beyond.max()):g}, beyond the range of "
                                      f"{model.dtype}, the model's dtype, where it would be inf; load it into a "
                                      f"{array.dtype} model")


def check_optimizer(optimizer, meta, path):
    """A CheckpointError unless the checkpoint holds the state of an optimizer of ``optimizer``'s type."""
    saved = meta.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state; it cannot resume training")
    if saved["config"]["type"] != optimizer.config()["type"]:
        raise CheckpointError(f"{path} was trained with {saved['config']['type']}, "
                              f"not {optimizer.config()['type']}")


def restore_optimizer(optimizer, meta, arrays, path):
    """Load the optimizer's settings and state saved by ``save`` (same optimizer type required)."""
    check_optimizer(optimizer, meta, path)
    saved = meta["optimizer"]
    buffers = {key[len("optim/"):]: value for key, value in arrays.items() if key.startswith("optim/")}
    optimizer.load_state_dict({"config": saved["config"], "steps": saved["steps"], "lr": saved["lr"],
                               "buffers": buffers})


def load(path, device="cpu"):
    """The model stored in a checkpoint, on ``device``."""
    return model_from(*read(path), path, device)


def model_from(meta, arrays, path, device="cpu"):
    """The model described by a checkpoint already ``read``, on ``device``."""
    from .model import Sequential

    try:  # meta from ``read`` builds; these guard a meta made or changed by hand
        model = Sequential.from_config(meta["model"], device=device)
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # ConfigError is a ValueError
        raise CheckpointError(f"{path} has an unreadable architecture: {_brief(error, 400)}") from None
    except MemoryError:
        raise CheckpointError(f"{path} holds a network too large for this machine's memory") from None
    restore_model(model, meta, arrays, path)
    return model
