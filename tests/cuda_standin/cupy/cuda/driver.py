"""The stand-in's CUDA driver API: the errors a launch raises."""


class CUDADriverError(RuntimeError):
    pass
