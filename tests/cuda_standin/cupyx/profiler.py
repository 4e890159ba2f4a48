"""The stand-in's ``cupyx.profiler.benchmark``: wall-clock times of the emulated device."""

import time

import numpy


class _Result:
    def __init__(self, name, cpu_times, gpu_times):
        self.name, self.cpu_times, self.gpu_times = name, numpy.asarray(cpu_times), numpy.asarray([gpu_times])

    def __repr__(self):
        return f"{self.name}: CPU {self.cpu_times.mean() * 1e6:.1f} us (emulated device)"


def benchmark(func, args=(), kwargs=None, n_repeat=10000, *, name=None, n_warmup=10, max_duration=float("inf"),
              devices=None):
    kwargs = kwargs or {}
    for _ in range(n_warmup):
        func(*args, **kwargs)
    times, start = [], time.perf_counter()
    for _ in range(n_repeat):
        t0 = time.perf_counter()
        func(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_duration:
            break
    return _Result(name or getattr(func, "__name__", "function"), times, times)
