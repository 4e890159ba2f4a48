"""The stand-in's CUDA runtime API: device queries of the emulated machine."""

from .. import _core


_STATUS = {"cudaErrorInvalidValue": 1, "cudaErrorMemoryAllocation": 2, "cudaErrorInvalidDevice": 101,
           "cudaErrorIllegalState": 401, "cudaErrorIllegalAddress": 700, "cudaErrorStreamCaptureUnsupported": 900,
           "cudaErrorStreamCaptureInvalidated": 901, "cudaErrorStreamCaptureImplicit": 906,
           "cudaErrorStreamCaptureWrongThread": 908}


class CUDARuntimeError(RuntimeError):
    """A CUDA runtime error: the message starts with the error's name; ``status`` is its code, as in CuPy."""

    def __init__(self, message):
        super().__init__(message)
        self.status = _STATUS.get(str(message).split(":", 1)[0], 0)


streamCaptureModeGlobal, streamCaptureModeThreadLocal, streamCaptureModeRelaxed = 0, 1, 2
streamCaptureStatusNone, streamCaptureStatusActive, streamCaptureStatusInvalidated = 0, 1, 2


cudaDevAttrMaxThreadsPerBlock = 1
cudaDevAttrMaxSharedMemoryPerBlock = 8
cudaDevAttrWarpSize = 10
cudaDevAttrMultiProcessorCount = 16
CUDA_R_32F = 0  # cudaDataType (library_types.h); CuPy 13 names no CUDA_R_16BF (14), so neither does this


def getDeviceCount():
    from . import DEVICES

    return DEVICES


def getDevice():
    return _core.current_device_id()


def setDevice(device):
    _core.use_device(int(device))


def deviceSynchronize():
    _core.refuse_during_capture("synchronizing the device")


def deviceGetAttribute(attrib, device):
    from . import SMS

    values = {cudaDevAttrMaxThreadsPerBlock: 1024, cudaDevAttrMaxSharedMemoryPerBlock: 48 * 1024,
              cudaDevAttrWarpSize: 32, cudaDevAttrMultiProcessorCount: SMS}
    if attrib not in values:
        raise CUDARuntimeError(f"cudaErrorInvalidValue: attribute {attrib} is not emulated")
    return values[attrib]


def getDeviceProperties(device):
    from . import SMS

    return {"name": f"nnaccel CUDA emulator {device} (CPU)".encode(), "totalGlobalMem": _core.DEVICE_MEMORY,
            "multiProcessorCount": SMS, "major": 8, "minor": 0, "maxThreadsPerBlock": 1024,
            "sharedMemPerBlock": 48 * 1024, "warpSize": 32, "clockRate": 1000000, "memoryClockRate": 1000000,
            "memoryBusWidth": 256, "pciBusID": device + 1}


def memGetInfo():
    used = _core.get_default_memory_pool().total_bytes()
    return _core.DEVICE_MEMORY - used, _core.DEVICE_MEMORY


def runtimeGetVersion():
    return 12080


def driverGetVersion():
    return 12080
