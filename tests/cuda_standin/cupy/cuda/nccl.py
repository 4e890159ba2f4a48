"""The stand-in's NCCL: collectives between the emulated GPUs of MPI ranks, carried by MPI.

Each rank is one process, so the all-reduce reads and writes the device
buffers (host memory here) in place over ``MPI.COMM_WORLD``, in the order
NCCL would. Available where mpi4py imports.
"""

import ctypes
import importlib.util

import numpy

available = importlib.util.find_spec("mpi4py") is not None  # imported on use: importing MPI initialises it

NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT32, NCCL_INT64 = 7, 8, 2, 4
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3
_DTYPES = {NCCL_FLOAT32: numpy.float32, NCCL_FLOAT64: numpy.float64, NCCL_INT32: numpy.int32,
           NCCL_INT64: numpy.int64}


class NcclError(RuntimeError):
    pass


def get_version():
    return 22105


def get_unique_id():
    return tuple(numpy.random.default_rng().integers(0, 128, 128).tolist())


def _buffer(pointer, count, datatype):
    dtype = numpy.dtype(_DTYPES[datatype])
    return numpy.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(pointer), dtype=dtype)


def _issue(stream, label, run):
    """Run a collective now, or record it into the graph that ``stream`` (its pointer) captures, as NCCL can."""
    from .. import _core

    capture = _core.recording(stream)
    if capture is None:
        run()
    else:
        capture.add(label, run)


class NcclCommunicator:
    def __init__(self, ndev, commId, rank):
        if not available:
            raise NcclError("NCCL (the stand-in's, over MPI) needs mpi4py")
        from mpi4py import MPI

        self._mpi, self._comm = MPI, MPI.COMM_WORLD
        if self._comm.Get_size() != ndev or self._comm.Get_rank() != rank:
            raise NcclError(f"rank {rank} of {ndev} does not match MPI's rank {self._comm.Get_rank()} of "
                            f"{self._comm.Get_size()}")
        self.rank, self.size = rank, ndev

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        mpi = self._mpi
        ops = {NCCL_SUM: mpi.SUM, NCCL_PROD: mpi.PROD, NCCL_MAX: mpi.MAX, NCCL_MIN: mpi.MIN}
        receive = _buffer(recvbuf, count, datatype)
        send = mpi.IN_PLACE if sendbuf == recvbuf else _buffer(sendbuf, count, datatype)
        _issue(stream, "ncclAllReduce", lambda: self._comm.Allreduce(send, receive, op=ops[op]))

    def bcast(self, buff, count, datatype, root, stream):
        buffer = _buffer(buff, count, datatype)
        _issue(stream, "ncclBcast", lambda: self._comm.Bcast(buffer, root=root))

    def abort(self):
        pass

    def destroy(self):
        pass
