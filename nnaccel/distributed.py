"""Data-parallel training over several processes: MPI between CPUs, NCCL between GPUs.

The ChainerMN / Horovod pattern, on existing engines: the same program runs
in every process (a *rank*), started by ``mpiexec``; every rank holds the
whole model, trains on its own part of each global batch, and the ranks sum
their gradients with one all-reduce per step over the model's contiguous
gradient buffer (``model.flat_grads``), so the weights stay identical.

* CPU models (NumPy arrays) all-reduce through MPI (mpi4py).
* CUDA models (CuPy arrays) all-reduce through NCCL (``cupy.cuda.nccl``);
  MPI only launches the ranks and shares NCCL's unique id. Each rank uses
  the GPU of its local rank (its index among the ranks on its machine).

From Python (run it with ``mpiexec -n 4 python train.py``)::

    import nnaccel as nn
    from nnaccel import distributed

    device = distributed.rank_device("auto")      # "cpu", or "cuda:<local rank>"
    model = nn.Sequential(nn.Dense(784, 256, activation="relu"), nn.Dense(256, 10), device=device)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=64,
                         communicator=distributed.communicator_for(model))
    trainer.fit(x_train, y_train, epochs=10)      # every rank passes the whole training set

``batch_size`` is per rank: a step trains on ``batch_size * ranks`` samples.
Only rank 0 prints and writes checkpoints and logs. mpi4py is imported on
first use only; ``pip install 'nnaccel[mpi]'`` installs it with MPICH.
"""

import atexit
import importlib
import os
import re
import shutil
import socket
import stat
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy

from .errors import ConfigError, DeviceError, NnaccelError

INSTALL_HINT = "pip install 'nnaccel[mpi]'"
NCCL_HINT = "pip install 'nvidia-nccl-cu12>=2.18' (or nvidia-nccl-cu13 with cupy-cuda13x)"
# Environment variables an MPI launcher sets in the processes it starts (MPICH/Intel MPI hydra,
# Open MPI, MVAPICH, Slurm's PMI/PMIx): read without initialising MPI.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


# ----- MPI and the world of ranks ---------------------------------------------------------
def mpi():
    """mpi4py's ``MPI`` module, MPI initialised; a ConfigError saying what to install if it fails."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ConfigError(f"distributed training needs mpi4py and an MPI library: {INSTALL_HINT} "
                          f"({error})") from None
    except Exception as error:  # mpi4py 4 raises RuntimeError when it finds no MPI library to load
        raise ConfigError(f"mpi4py is installed but could not load an MPI library ({type(error).__name__}: "
                          f"{error}); {INSTALL_HINT} installs MPICH") from None
    if not MPI.Is_initialized():  # imported earlier without initialising (``status_lines``)
        MPI.Init_thread()
        atexit.register(lambda: MPI.Is_finalized() or MPI.Finalize())
    return MPI


def launched_size():
    """How many processes the MPI launcher started (1 outside ``mpiexec``); does not initialise MPI."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of ``MPI.COMM_WORLD``."""

    comm: object  # the mpi4py communicator
    rank: int
    size: int
    local_rank: int  # index among the ranks on this machine: picks the GPU
    local_size: int
    hosts: tuple  # (hostname, pid) of every rank, by rank

    def describe(self):
        """One line naming every rank's process (mpiexec names a killed rank only by its pid)."""
        shown = [f"rank {r} pid {pid} on {host}" for r, (host, pid) in enumerate(self.hosts[:8])]
        more = f", ... ({self.size - 8} more)" if self.size > 8 else ""
        return ", ".join(shown) + more


_WORLD = None


def world():
    """The World of this process, created once (a collective call: every rank must make it)."""
    global _WORLD
    if _WORLD is None:
        MPI = mpi()
        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        hosts = tuple(tuple(item) for item in comm.allgather((socket.gethostname(), os.getpid())))
        _WORLD = World(comm, comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), hosts)
        if _WORLD.size > 1:
            _end_the_job_on_uncaught_errors(_WORLD)
    return _WORLD


def _end_the_job_on_uncaught_errors(here):
    """Make an exception that a script leaves uncaught on one rank end the whole job (as ``python -m
    mpi4py`` does): its traceback, a line naming the rank, then MPI_Abort, instead of the other ranks
    waiting forever in the next all-reduce (the command line's ``run_guarded`` catches its own)."""
    previous = sys.excepthook

    def hook(kind, error, trace):
        try:  # One write: mpiexec may stop forwarding a rank's output as soon as it aborts, mid-traceback.
            told = ""
            if previous is sys.__excepthook__:
                told = "".join(traceback.format_exception(kind, error, trace))
            else:  # a hook of the script's own prints as it likes
                previous(kind, error, trace)
            sys.stderr.write(f"{told}rank {here.rank}: uncaught {kind.__name__}; ending all {here.size} ranks "
                             f"({here.describe()})\n")
            sys.stderr.flush()
        finally:  # a broken stderr, or the script's hook failing, must not leave the other ranks waiting
            _end_the_job(here, 130 if issubclass(kind, KeyboardInterrupt) else 1)

    sys.excepthook = hook


def _end_the_job(here, code):
    """Free what the engines hold blocked, then MPI_Abort every rank with exit status ``code``, once the
    launcher has read what this rank printed (``_wait_until_read``)."""
    for communicator in _COMMUNICATORS.values():
        communicator.abort_engine()
    try:
        _wait_until_read()
    finally:  # whatever stdout and stderr turn out to be, the job ends
        here.comm.Abort(code)


ABORT_OUTPUT_WAIT_S = 2.0  # at most, for the launcher to read a failing rank's last lines before MPI_Abort


def _wait_until_read():
    """Wait, up to ``ABORT_OUTPUT_WAIT_S``, until the pipes this rank's stdout and stderr go to are read:
    hydra's proxy drops what it has not read when MPI_Abort reaches it first (one run in 15 lost its error
    line here), and a pipe is read in order. Terminals and files need no wait. What Python still
    buffers is flushed first (flushing in a thread of its own, to bound a flush on a full pipe, was
    tried: one abort in 25 then hung)."""
    _flush_output()
    deadline = time.monotonic() + ABORT_OUTPUT_WAIT_S
    pipes = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                pipes.append(fd)
        except Exception:  # closed, replaced by an object without a descriptor, or one that fails otherwise
            pass
    unread = bytearray(4)
    while pipes and time.monotonic() < deadline:
        pipes = [fd for fd in pipes if _unread_bytes(fd, unread)]
        if pipes:
            time.sleep(0.001)


def _flush_output():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # closed, or an object of the script's that fails: nothing more can be told
            pass


def _tell(text):
    """``text`` on stderr, for a rank about to end the job: a broken stderr must not keep it from ending."""
    try:
        print(text, file=sys.stderr, flush=True)
    except Exception:
        pass


def _unread_bytes(fd, buffer):
    """How many bytes written to the pipe ``fd`` nobody has read yet (0 where the system cannot say)."""
    try:
        import fcntl  # POSIX only
        import termios

        fcntl.ioctl(fd, termios.FIONREAD, buffer)
    except (ImportError, OSError):
        return 0
    return int.from_bytes(buffer, sys.byteorder)


def rank_device(device="auto"):
    """The device this rank trains on: ``"cpu"``, or the GPU of its local rank for ``cuda``/``auto``.

    ``cuda:N`` is pinned like ``cuda``: in a distributed run each rank of a
    machine takes its own GPU (rank ``local_rank`` of the machine takes
    ``cuda:<local_rank mod GPUs>``; with one visible GPU per rank, as set by
    ``CUDA_VISIBLE_DEVICES`` per rank, every rank takes its ``cuda:0``).
    """
    from .backend import cuda_status, resolve_device

    name = resolve_device(device)
    if name == "cpu":
        return name
    count = cuda_status()[0]
    here = world()
    if here.local_size > count > 1:
        raise DeviceError(f"{here.local_size} ranks run on {socket.gethostname()} but it has only {count} GPUs: "
                          f"NCCL needs one GPU per rank; start at most {count} ranks per machine")
    return f"cuda:{here.local_rank % count}"


# ----- NCCL ---------------------------------------------------------------------------------
def _nccl_module():
    """``cupy.cuda.nccl`` when it loads NCCL, else a ConfigError saying why and what to install."""
    try:
        importlib.import_module("cupy")
    except ImportError:
        raise ConfigError("CuPy is not installed (pip install 'nnaccel[cuda12]' or 'nnaccel[cuda13]')") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CuPy warns once when libnccl is missing; the error says it
        from cupy.cuda import nccl
    if not getattr(nccl, "available", False):
        try:
            importlib.import_module("cupy_backends.cuda.libs.nccl")  # (its ImportError gives the loader's reason)
            reason = "cupy.cuda.nccl is not available"
        except ImportError as error:
            reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"NCCL could not be loaded ({reason}); {NCCL_HINT}")
    return nccl


def nccl_version_string(code):
    """NCCL's version code as ``major.minor.patch`` (2.9+ codes are M*10000 + m*100 + p)."""
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


# ----- communicators --------------------------------------------------------------------------
class Communicator:
    """What the Trainer needs from an engine: the rank, the size, and in-place collectives.

    ``allreduce_sum_`` and ``broadcast_`` work in place on an array of the
    model's device; ``allreduce_scalars`` sums a few numbers (floats or 0-d
    device arrays) and returns host floats; ``any_flags`` ORs a few host
    booleans over MPI (no device involved); the ``*_object`` calls move
    small picklable values over MPI.
    """

    kind = ""

    def __init__(self, here):
        self.world = here
        self.rank, self.size = here.rank, here.size
        self.local_rank = here.local_rank
        self._flags = numpy.zeros(2, numpy.int32)

    def check_model(self, model):
        raise NotImplementedError

    def allreduce_sum_(self, array):
        raise NotImplementedError

    def broadcast_(self, array, root=0):
        raise NotImplementedError

    def allreduce_scalars(self, values):
        raise NotImplementedError

    def any_flags(self, *flags):
        """Each flag ORed over the ranks (a tiny host all-reduce)."""
        MPI = mpi()
        buf = self._flags if len(flags) == self._flags.size else numpy.zeros(len(flags), numpy.int32)
        buf[:] = [bool(flag) for flag in flags]
        self.world.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return [bool(flag) for flag in buf]

    def broadcast_object(self, obj, root=0):
        return self.world.comm.bcast(obj, root=root)

    def allgather_object(self, obj):
        return self.world.comm.allgather(obj)

    def barrier(self):
        self.world.comm.Barrier()

    def abort_engine(self):
        """Free what a dying job leaves blocked in the engine (MPI_Abort does it for MPI)."""

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class MpiCommunicator(Communicator):
    """Collectives on NumPy arrays through MPI (``MPI.COMM_WORLD``)."""

    kind = "mpi"
    device = "cpu"

    def __init__(self, here=None):
        super().__init__(here or world())
        self._mpi = mpi()

    def check_model(self, model):
        if model.device != "cpu":
            raise DeviceError(f"the model is on {model.device} but this communicator all-reduces NumPy arrays "
                              f"over MPI; use nnaccel.distributed.communicator_for(model), which takes NCCL "
                              f"for CUDA models")

    def _check(self, array):
        if not isinstance(array, numpy.ndarray) or not array.flags.c_contiguous:
            raise DeviceError(f"MPI collectives here take contiguous NumPy arrays, got {type(array).__name__}")
        return array

    def allreduce_sum_(self, array):
        self.world.comm.Allreduce(self._mpi.IN_PLACE, self._check(array), op=self._mpi.SUM)
        return array

    def broadcast_(self, array, root=0):
        self.world.comm.Bcast(self._check(array), root=root)
        return array

    def allreduce_scalars(self, values):
        buf = numpy.array([float(value) for value in values], dtype=numpy.float64)
        self.world.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        return buf.tolist()


class NcclCommunicator(Communicator):
    """Collectives on CuPy arrays of one GPU per rank through NCCL.

    Rank 0 draws NCCL's unique id and broadcasts it over MPI; every rank
    then joins ``nccl.NcclCommunicator(size, id, rank)`` on its GPU. The
    collectives are queued on the current CUDA stream, like the training
    step's kernels, so they wait for the backward pass without a host sync.
    """

    kind = "nccl"

    def __init__(self, device_id=None, here=None):
        nccl = _nccl_module()  # before MPI or the GPU: the most likely failure, said first
        import cupy

        here = here or world()
        super().__init__(here)
        self._nccl, self._cupy = nccl, cupy
        count = cupy.cuda.runtime.getDeviceCount()
        device_id = here.local_rank % max(count, 1) if device_id is None else int(device_id)
        if not 0 <= device_id < count:
            raise DeviceError(f"rank {here.rank} was given cuda:{device_id} but {count} GPU(s) answer here")
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        self._device = cupy.cuda.Device(device_id)
        self._device.use()  # pin this rank's GPU for the whole process
        self._check_one_gpu_per_rank(here)
        uid = nccl.get_unique_id() if here.rank == 0 else None
        uid = here.comm.bcast(uid, root=0)
        with self._device:
            self.comm = nccl.NcclCommunicator(here.size, uid, here.rank)
        self._dtypes = {numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32, numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64}

    def _check_one_gpu_per_rank(self, here):
        """Two ranks of one machine on one GPU make NCCL fail obscurely: say it here, by bus id."""
        bus = self._device.pci_bus_id
        local = here.comm.Split_type(mpi().COMM_TYPE_SHARED)
        taken = local.allgather((here.rank, bus))
        local.Free()
        same = [rank for rank, other in taken if other == bus]
        if len(same) > 1:
            raise DeviceError(f"ranks {', '.join(map(str, same))} on {socket.gethostname()} all use the GPU at "
                              f"{bus} ({self.device}); NCCL needs one GPU per rank: create each rank's model on "
                              f"nnaccel.distributed.rank_device(), or set CUDA_VISIBLE_DEVICES per rank")

    def check_model(self, model):
        if model.device != self.device:
            raise DeviceError(f"the model is on {model.device} but this rank's NCCL communicator is on "
                              f"{self.device}; create the model on nnaccel.distributed.rank_device()")

    def _buffer(self, array):
        from .backend import array_device

        where = array_device(array)
        if where != self.device or not array.flags.c_contiguous:
            raise DeviceError(f"NCCL collectives here take contiguous CuPy arrays on {self.device}, got "
                              f"{'a non-contiguous array' if where == self.device else where or type(array).__name__}")
        if array.dtype not in self._dtypes:
            raise DeviceError(f"NCCL collectives here take float32 or float64 arrays, got {array.dtype}")
        return array.data.ptr, array.size, self._dtypes[array.dtype]

    def allreduce_sum_(self, array):
        pointer, count, dtype = self._buffer(array)
        with self._device:
            stream = self._cupy.cuda.get_current_stream().ptr
            self.comm.allReduce(pointer, pointer, count, dtype, self._nccl.NCCL_SUM, stream)
        return array

    def broadcast_(self, array, root=0):
        pointer, count, dtype = self._buffer(array)
        with self._device:
            stream = self._cupy.cuda.get_current_stream().ptr
            self.comm.bcast(pointer, count, dtype, root, stream)
        return array

    def allreduce_scalars(self, values):
        cupy = self._cupy
        with self._device:
            buf = cupy.stack([cupy.asarray(value, dtype=cupy.float64).reshape(()) for value in values])
            self.allreduce_sum_(buf)
            return cupy.asnumpy(buf).tolist()

    def abort_engine(self):
        try:
            self.comm.abort()  # ncclCommAbort: frees this rank's GPU stuck in an NCCL kernel (NCCL 2.4+)
        except Exception:
            pass


def kind_for(device):
    """``"mpi"`` for the CPU, ``"nccl"`` for a CUDA device: the engine that all-reduces its arrays."""
    name = str(getattr(device, "device", device)).strip().lower()
    if name == "cpu":
        return "mpi"
    if name.startswith(("cuda", "gpu")):
        return "nccl"
    raise DeviceError(f"no communicator for device {name!r}; valid: 'cpu' (MPI), 'cuda:N' (NCCL)")


_COMMUNICATORS = {}


def communicator_for(model_or_device):
    """The communicator for a model (or a device name): created on first use, then shared.

    MPI for a CPU model, NCCL for a CUDA one. A collective call the first
    time: every rank must make it.
    """
    device = getattr(model_or_device, "device", model_or_device)
    kind = kind_for(device)
    key = (kind, str(device))
    if key not in _COMMUNICATORS:
        if kind == "mpi":
            _COMMUNICATORS[key] = MpiCommunicator()
        else:
            _, _, index = str(device).partition(":")
            try:
                _COMMUNICATORS[key] = NcclCommunicator(int(index) if index else None)
            except ConfigError as error:
                raise ConfigError(f"a model on {device} all-reduces through NCCL: {error}; or train on the "
                                  f"CPU over MPI (--device cpu)") from None
    communicator = _COMMUNICATORS[key]
    if hasattr(model_or_device, "flat_grads"):
        communicator.check_model(model_or_device)
    return communicator


# ----- running a rank -------------------------------------------------------------------------
def run_guarded(main, *args, prog="nnaccel"):
    """``main(*args)`` on this rank; if it fails, print why with the rank and end the whole job.

    Without this, a rank that raises would leave the others waiting forever
    in the next all-reduce. User errors print one line and end the job with
    exit status 2; an MPI error from a lost peer (another rank died) prints
    one line and anything else its traceback, and ends it with 1; a second
    Ctrl-C ends it with 130.
    """
    here, MPI = world(), mpi()
    try:
        return main(*args)
    except SystemExit as error:
        if error.code in (None, 0):
            raise
        told, code = f"exited with status {error.code}", error.code if isinstance(error.code, int) else 1
    except KeyboardInterrupt:
        told, code = "interrupted", 130
    except (NnaccelError, OSError) as error:
        if getattr(error, "all_ranks", False):  # raised by every rank at the same point: no one is left waiting
            if here.rank == 0:
                print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
            return 2
        told, code = f"error: {error}", 2
    except BaseException as error:
        if isinstance(error, MPI.Exception) and error.Get_error_class() in _peer_lost_classes(MPI):
            told = f"error: {_collective_failure(error, here)}"
        else:
            told = traceback.format_exc().rstrip()
        code = 1
    _tell("\n".join(f"{prog}: rank {here.rank}: {line}" for line in told.splitlines()))
    if here.size == 1:
        return code
    _end_the_job(here, code)
    return code  # not reached


def _peer_lost_classes(MPI):
    """The MPI error classes of a collective whose peer died (killed, out of memory): MPICH's generic one,
    and ULFM's where the library has it; other classes (a count or type mismatch) keep their traceback."""
    return {MPI.ERR_OTHER, getattr(MPI, "ERR_PROC_FAILED", MPI.ERR_OTHER)}


def _collective_failure(error, here):
    """One line for an MPI error from a lost peer: its class, its deepest cause (MPICH's stack has a line
    per layer, ``function(line)....: cause``) and every rank's pid."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["MPI error"]
    what = lines[0].removesuffix(", error stack:")
    cause = re.sub(r"^\S+\(\d+\)\.*:\s*", "", lines[-1]) if len(lines) > 1 else ""
    return (f"MPI failed talking to the other ranks ({what}{': ' + cause if cause else ''}); another rank has "
            f"probably died ({here.describe()})")


# ----- status, for ``nnaccel info`` -------------------------------------------------------------
def mpiexec_path():
    """``mpiexec`` next to this Python (where the ``mpich`` wheel puts it), else on the PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def mpi_status():
    """``(usable, text)``: mpi4py and MPI library versions and the launch, without initialising MPI
    unless this process was started by an MPI launcher."""
    try:
        import mpi4py
    except ImportError:
        return False, f"mpi4py not installed ({INSTALL_HINT})"
    try:
        if "mpi4py.MPI" not in sys.modules and launched_size() == 1:
            mpi4py.rc.initialize = False  # versions only: no MPI_Init outside a launcher
        from mpi4py import MPI
        library = MPI.Get_library_version().strip().splitlines()[0]
        standard = ".".join(map(str, MPI.Get_version()))
    except Exception as error:
        return False, f"mpi4py {mpi4py.__version__} cannot load an MPI library ({error}); {INSTALL_HINT}"
    text = f"mpi4py {mpi4py.__version__}, {' '.join(library.split())} (MPI {standard})"
    if MPI.Is_initialized():
        comm = MPI.COMM_WORLD
        text += f"; launched with {comm.Get_size()} process(es), this is rank {comm.Get_rank()}"
    else:
        text += "; not launched by mpiexec (single process)"
    return True, text


def nccl_status():
    """``(usable, text)``: the NCCL that ``cupy.cuda.nccl`` loads, or why it does not."""
    from .backend import cuda_status

    try:
        nccl = _nccl_module()
        version = nccl_version_string(nccl.get_version())
    except ConfigError as error:
        return False, str(error)
    except Exception as error:
        return False, f"cupy.cuda.nccl failed: {type(error).__name__}: {error}"
    count, reason = cuda_status()
    if not count:
        return False, f"NCCL {version} loads (cupy.cuda.nccl), but no GPU answers: {reason}"
    return True, f"NCCL {version} (cupy.cuda.nccl), {count} GPU(s) on this machine"


def status_lines():
    """What ``nnaccel info`` prints about distributed training."""
    mpi_ok, mpi_text = mpi_status()
    nccl_ok, nccl_text = nccl_status()
    launcher = mpiexec_path()
    return [f"MPI: {mpi_text}" if mpi_ok else f"MPI not usable: {mpi_text}",
            f"mpiexec: {launcher}" if launcher else "mpiexec: not found",
            f"NCCL: {nccl_text}" if nccl_ok else f"NCCL not usable: {nccl_text}"]
