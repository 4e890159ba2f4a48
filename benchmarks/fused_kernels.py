"""Fused CUDA kernels against the unfused CuPy sequences they replace, and against copy bandwidth.

The unfused sequence is the base backend's generic op run on the same CuPy
backend (``Backend.op(ops, ...)``), so the comparison is exactly what the
fusion removes. Bandwidth is bytes the op must move (each input read once,
each output written once) over its median GPU time (CUDA events, after
warm-up), next to a device-to-device copy of the same tensor in the same run.

    python benchmarks/fused_kernels.py --json benchmarks/results/fused-kernels-<gpu>.json
"""

import argparse
import json
import platform
import sys
from datetime import datetime, timezone

import numpy

import nnaccel
from nnaccel import activations
from nnaccel.backend import Backend, cuda_status, get_backend


def gpu_time(function, repeat):
    """Median GPU seconds of ``function()`` over ``repeat`` runs (CUDA events), after warm-up."""
    from cupyx.profiler import benchmark

    result = benchmark(function, n_repeat=repeat, n_warmup=max(3, repeat // 10))
    return float(numpy.median(result.gpu_times[0]))


def cases(ops, rows, cols):
    """``(name, bytes moved, fused, unfused)`` for every fused op."""
    cupy = ops.xp
    rng = cupy.random.default_rng(0)
    z = rng.standard_normal((rows, cols), dtype=numpy.float32)
    bias = rng.standard_normal(cols, dtype=numpy.float32)
    dy = rng.standard_normal((rows, cols), dtype=numpy.float32)
    out, dz = cupy.empty_like(z), cupy.empty_like(z)
    db = cupy.empty(cols, numpy.float32)
    n = z.size * 4
    for name in ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "gelu", "silu"):
        act = activations.get(name)
        y = act.forward(ops, z.copy(), cupy.empty_like(z))
        saved = y if act.uses_output else z
        yield (f"bias_act {name}", 2 * n + (0 if act.uses_output else n),
               lambda act=act: ops.bias_act(z, bias, act, out if not act.uses_output else z),
               lambda act=act: Backend.bias_act(ops, z, bias, act, out if not act.uses_output else z))
        yield (f"act_backward+bias_grad {name}", 3 * n,
               lambda act=act, saved=saved: ops.act_backward(dy, saved, saved, act, dz, db),
               lambda act=act, saved=saved: Backend.act_backward(ops, dy, saved, saved, act, dz, db))
    logits = rng.standard_normal((rows, 10), dtype=numpy.float32)
    labels = rng.integers(0, 10, rows)
    grad = cupy.empty_like(logits)
    yield ("softmax_cross_entropy 10 classes", 2 * logits.size * 4 + labels.size * 8,
           lambda: ops.softmax_cross_entropy(logits, labels, grad),
           lambda: Backend.softmax_cross_entropy(ops, logits, labels, grad))
    p, g = z.ravel(), dy.ravel()
    v, m, v2 = cupy.zeros_like(p), cupy.zeros_like(p), cupy.zeros_like(p)
    yield ("sgd_update momentum+nesterov+wd", 5 * n,
           lambda: ops.sgd_update(p, g, v, 1e-6, 0.9, 1e-4, True),
           lambda: Backend.sgd_update(ops, p, g, v, 1e-6, 0.9, 1e-4, True))
    yield ("adamw_update", 7 * n,
           lambda: ops.adam_update(p, g, m, v2, 1e-6, 0.9, 0.999, 1e-8, 0.01, True, 10),
           lambda: Backend.adam_update(ops, p, g, m, v2, 1e-6, 0.9, 0.999, 1e-8, 0.01, True, 10))
    yield from channel_cases(ops, rng, z.size)


def channel_cases(ops, rng, values, channels=6, side=28):
    """The per-channel reductions on about ``values`` values (at least 2 images) of the default recipe's
    first BatchNorm's shape (6 channels of 28x28): few channels, many values each."""
    cupy, l = ops.xp, side * side
    images = max(2, values // (channels * l))
    x3, dy3 = (rng.standard_normal((images, channels, l), dtype=numpy.float32) for _ in range(2))
    n = x3.size * 4
    mean, invstd, rm, rv, gamma, dgamma, dbeta, db = (cupy.ones(channels, numpy.float32) for _ in range(8))
    dx3 = cupy.empty_like(x3)
    yield (f"batchnorm_stats {channels}x{side}x{side}", n,
           lambda: ops.batchnorm_stats(x3, mean, invstd, 1e-5, rm, rv, 0.1),
           lambda: Backend.batchnorm_stats(ops, x3, mean, invstd, 1e-5, rm, rv, 0.1))
    yield (f"batchnorm_backward {channels}x{side}x{side}", 3 * n,
           lambda: ops.batchnorm_backward(dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta),
           lambda: Backend.batchnorm_backward(ops, dy3, x3, mean, invstd, gamma, dx3, dgamma, dbeta))
    relu = activations.get("relu")
    rows = x3.transpose(1, 0, 2).reshape(channels, images * l).copy()  # a convolution's output, channel-major
    dz = cupy.empty_like(rows)
    yield (f"act_backward_from_nchw relu {channels}x{side}x{side}", 3 * n,
           lambda: ops.act_backward_from_nchw(dy3, rows, rows, relu, dz, db),
           lambda: Backend.act_backward_from_nchw(ops, dy3, rows, rows, relu, dz, db))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    count, reason = cuda_status()
    if not count:
        print(f"fused_kernels: no usable GPU: {reason}", file=sys.stderr)
        return 2
    import cupy

    ops = get_backend("cuda:0")
    src = cupy.ones((args.rows, args.cols), numpy.float32)
    dst = cupy.empty_like(src)
    copy_s = gpu_time(lambda: cupy.copyto(dst, src), args.repeat)
    copy_bw = 2 * src.nbytes / copy_s
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"{props['name'].decode()}: device-to-device copy {copy_bw / 1e9:,.0f} GB/s "
          f"({args.rows}x{args.cols} float32)")
    print(f"{'op':38} {'fused us':>9} {'unfused us':>11} {'speed-up':>9} {'GB/s':>7} {'% copy':>7}")
    rows = []
    for name, moved, fused, unfused in cases(ops, args.rows, args.cols):
        fused_s, unfused_s = gpu_time(fused, args.repeat), gpu_time(unfused, args.repeat)
        row = {"op": name, "bytes": moved, "fused_s": fused_s, "unfused_s": unfused_s,
               "speedup": unfused_s / fused_s, "fused_GBps": moved / fused_s / 1e9,
               "share_of_copy_bandwidth": moved / fused_s / copy_bw}
        rows.append(row)
        print(f"{name:38} {fused_s * 1e6:9.1f} {unfused_s * 1e6:11.1f} {row['speedup']:8.2f}x "
              f"{row['fused_GBps']:7.0f} {100 * row['share_of_copy_bandwidth']:6.0f}%")
    if args.json:
        info = {"date": datetime.now(timezone.utc).isoformat(), "gpu": props["name"].decode(),
                "nnaccel": nnaccel.__version__, "cupy": cupy.__version__, "numpy": numpy.__version__,
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "python": platform.python_version(),
                "shape": [args.rows, args.cols], "copy_GBps": copy_bw / 1e9, "results": rows}
        with open(args.json, "w") as handle:
            json.dump(info, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
