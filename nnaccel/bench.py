"""``nnaccel bench``: training throughput per device, against the GEMM peak and PyTorch.

Each configuration (device, network, batch size) is warmed up, then timed in
rounds of training steps on one synthetic batch kept on the device; the
median round gives samples/s and achieved GFLOP/s, shown as a share of the
GEMM peak of the same device (in each precision: under bf16 a GEMM of
bfloat16 operands, as the Dense layers then run), timed in a short GEMM
round beside each round of the configuration: the share is the median of the
paired ratios, so a burst of load on a shared machine moves both. With
``--compare torch`` the same step in PyTorch (same network, batch, optimizer
and thread count) runs in rounds alternating with nnaccel's, so both see the
same machine noise, and the ratio is the median over the paired rounds. Every
round starts once this process's threads are idle: a BLAS thread pool spins
for a while after its last call, and the round after it would lose a core.

With ``--fit`` a round is instead a whole ``Trainer.fit`` call, as a user
runs it, over the MNIST sample nnaccel ships (moving the data to the device,
its checks, the shuffles, every step and the metrics), against a plain
PyTorch loop doing the same training: the same initial weights, the same
shuffle of every epoch, the same batches and thread count.
"""

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import numpy

from . import __version__, activations, architectures, checkpoint, datasets
from .backend import PRECISIONS, cuda_status, get_backend, resolve_device
from .errors import ConfigError, number_option
from .layers import BatchNorm, Conv2D, Dense, Maxout
from .losses import SoftmaxCrossEntropy
from .model import Sequential
from .optimizers import SGD
from .trainer import Trainer

LR, MOMENTUM = 0.01, 0.9
# The networks and batch sizes the CPU ratio targets are judged on.
TARGET_BATCHES = {"784-16-16-10": 32, "784-128-64-10": 64, "784-1024-1024-10": 256, "784-2048-2048-10": 512,
                  "lenet5": 64}
DEFAULT_BATCHES = {
    "784-16-16-10": (32, 128, 512),
    "784-128-64-10": (64, 256, 1024),
    "784-1024-1024-10": (64, 256, 1024),
    "784-2048-2048-10": (128, 512, 2048),
    "784-4096-4096-10": (512, 4096, 8192),
    "lenet5": (64, 256),
    "wide-cnn": (256,),
}
OTHER_BATCHES = (32, 256, 1024)  # for networks given with --networks but not listed above
GPU_ONLY_NETWORKS = ("784-4096-4096-10", "wide-cnn")  # minutes per configuration on a CPU
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}
ROUNDS = 5
ROUND_SECONDS = 0.25  # a round's length when --steps is not given
GEMM_ROUND_SECONDS = 0.1  # the GEMM round beside each configuration round (at least one matmul)
WARMUP_SECONDS = 0.5  # untimed runs before the rounds: caches, allocators, clocks and thread pools settle
SETTLE_SECONDS = 1.0  # at most, before each timed round, waiting for this process's threads to idle
# --quick's GEMM: 256x256 without a warm-up ran at 1 to 180 GFLOP/s from one round to the next on a shared 2-core
# host (shares of 248% to 5580%); 1024x1024 after a 0.05 s warm-up came within 3% of the 2048x2048 peak there
# (205 and 210 GFLOP/s, the host quiet), in about 0.3 s (the warm-up and one round).
QUICK = {"networks": ("784-16-16-10",), "batches": (16, 64), "rounds": 1, "steps": 2, "warmup_s": 0.0,
         "settle_s": 0.0, "gemm_size": 1024, "gemm_warmup_s": 0.05, "fit_samples": 512}
FIT_EPOCHS = 2
# The --fit configurations: the CPU's target networks at their target batches; on a GPU the ones its
# targets are judged on.
FIT_BATCHES = {"cpu": {name: (batch,) for name, batch in TARGET_BATCHES.items() if name != "lenet5"},
               "cuda": {"784-128-64-10": (128,), "784-4096-4096-10": (4096,)}}


class Step(NamedTuple):
    """One unit of timed work, and the call that waits until the device has finished it."""

    run: Callable
    synchronize: Callable


@dataclass
class Result:
    """One configuration's measurements; seconds are per round of ``steps`` steps."""

    device: str
    network: str
    batch: int
    steps: int
    seconds: list
    samples_per_s: float
    gflops: float
    peak_share: float  # of the GEMM peak: the median over the rounds of GFLOP/s over the GEMM round's beside it
    target: bool  # a configuration the CPU ratio targets are judged on
    peak_gflops: list = field(default_factory=list)  # the GEMM rounds' GFLOP/s, one beside each round
    torch_seconds: list = field(default_factory=list)
    torch_samples_per_s: float = None
    ratio: float = None  # nnaccel samples/s over PyTorch samples/s, median of the paired rounds
    speedup: float = None  # this GPU's samples/s over the CPU's, same network and batch
    mode: str = "step"  # "step": rounds of steps on one batch; "fit": whole Trainer.fit calls of `epochs`
    epochs: int = None
    precision: str = "fp32"  # how the weighted sums computed (Trainer precision; PyTorch's equivalent)
    peak_reliable: bool = True  # False when a share of this device's peak (this one's or another's) passed 100%

    @property
    def peak_key(self):
        """The GEMM peak this result is a share of: its device, and the precision when not fp32."""
        return self.device if self.precision == "fp32" else f"{self.device} {self.precision}"


# ----- what is measured --------------------------------------------------------------
def parse_network(text):
    """A network's name: layer sizes like ``784-128-64-10`` (ReLU hidden layers, a linear output) or an
    architecture preset of ``nnaccel train --model`` (``lenet5``) on 28x28 images."""
    name = text.strip().lower()
    if name in architectures.PRESETS:
        return name
    try:
        sizes = tuple(int(part) for part in name.split("-"))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or min(sizes) <= 0:
        raise ConfigError(f"network {text!r} is not a list of positive layer sizes like 784-128-64-10 nor one of "
                          f"{', '.join(architectures.PRESETS)}")
    return "-".join(map(str, sizes))


def build_network(name, device):
    """The network ``name`` stands for, float32, on ``device``."""
    if name in architectures.PRESETS:
        layers, shape = architectures.build(name, 28 * 28, 10)
        return Sequential(*layers, input_shape=shape, device=device, seed=0, dtype=numpy.float32)
    sizes = [int(size) for size in name.split("-")]
    layers = [Dense(a, b, activation="relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
    layers.append(Dense(sizes[-2], sizes[-1]))
    return Sequential(*layers, device=device, seed=0, dtype=numpy.float32)


def step_flops(model, batch):
    """Floating-point operations of one training step: its weighted sums.

    Each weighted layer costs 2*batch*(multiply-adds per sample) forward and
    twice that backward (weight and input gradients), but the first layer's
    input gradient is not computed.
    """
    total = 0
    for index, (layer, shape) in enumerate(zip(model.layers, model.shapes[1:])):
        if isinstance(layer, Conv2D):
            per_sample = math.prod(shape) * layer.in_channels * math.prod(layer.kernel_size)
        elif isinstance(layer, (Dense, Maxout)):
            per_sample = math.prod(layer.params["weight"].shape)
        else:
            continue
        total += 2 * batch * per_sample * (3 if index else 2)
    return total


def synthetic_batch(model, batch):
    """One seeded float32 batch (host arrays) of the model's inputs and classes."""
    return datasets.synthetic(batch, model.in_features, model.out_features, seed=0, dtype=numpy.float32)


def training_step(name, batch, device, precision="fp32"):
    """nnaccel's training step (softmax cross-entropy, SGD with momentum) on a batch kept on ``device``,
    its weighted sums in ``precision``."""
    model = build_network(name, device)
    trainer = Trainer(model, loss=SoftmaxCrossEntropy(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                      batch_size=batch, quiet=True, precision=precision)
    x, y = trainer.prepare(*synthetic_batch(model, batch))
    return model, Step(lambda: trainer.train_step(x, y), model.backend.synchronize)


def torch_training_step(torch, name, batch, device, precision="fp32"):
    """The same step in PyTorch, the same weights (``to_torch``); the input needs no gradient, as in nnaccel.
    On a GPU "tf32" allows TF32 matmuls and "bf16" runs forward and loss under ``torch.autocast``
    (bfloat16), PyTorch's ways to the tensor cores."""
    model = build_network(name, "cpu")
    net = model.to_torch().to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = synthetic_batch(model, batch)
    x = torch.from_numpy(x.reshape((batch,) + model.input_shape)).to(device)
    y = torch.from_numpy(y).to(device)

    def run():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    if device == "cpu":
        return Step(run, lambda: None)

    def run_on_gpu():
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return run()

    return Step(run_on_gpu, lambda: torch.cuda.synchronize(device))


# ----- timing -------------------------------------------------------------------------
def time_round(step, steps):
    """Seconds for ``steps`` runs of ``step``, with the device drained before and after."""
    step.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step.run()
    step.synchronize()
    return time.perf_counter() - start


def warm_up(step, seconds):
    """Run ``step`` once (allocations, kernel compilation), then in rounds of doubling length until
    one lasts ``seconds``; returns that round's seconds per run, to size the timed rounds."""
    step.run()
    runs = 1
    while (elapsed := time_round(step, runs)) < seconds:
        runs *= 2
    return elapsed / runs


def gemm_round(backend, size, warmup_s, precision="fp32"):
    """A call that times one round (about ``GEMM_ROUND_SECONDS``) of ``size`` x ``size`` matmuls on
    ``backend`` in ``precision``, in the dtype its Dense layers then store (float32; bfloat16 under
    bf16), and returns its GFLOP/s."""
    with backend.matmul_precision(precision):
        dtype = backend.storage_dtype(numpy.dtype(numpy.float32), activations.get(None))

        def operand(seed):
            x = backend.uniform((size, size), seed=seed, counter=0)
            return x if x.dtype == dtype else backend.convert(x, backend.empty(x.shape, dtype))

        a, b, out = operand(1), operand(2), backend.empty((size, size), dtype)
        step = Step(lambda: backend.matmul(a, b, out=out), backend.synchronize)
        calls = max(1, math.ceil(GEMM_ROUND_SECONDS / warm_up(step, warmup_s)))

    def timed():
        with backend.matmul_precision(precision):
            return 2 * size ** 3 * calls / time_round(step, calls) / 1e9

    return timed


def wait_until_idle(limit_s, window_s=0.02, busy_share=0.1):
    """Wait, at most ``limit_s`` seconds, until this process's threads use less than ``busy_share`` of
    a core over ``window_s``; True once they do. (A BLAS pool spins after its last call, OpenBLAS's
    for about 0.13 s, and a round started beside it has a core less.)"""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        wall, cpu = time.perf_counter(), time.process_time()
        time.sleep(window_s)
        if time.process_time() - cpu < busy_share * (time.perf_counter() - wall):
            return True
    return False


def paired_rounds(rounds, ours, gemm, theirs, settle_s):
    """``rounds`` rounds of ``ours()``, ``gemm()`` and ``theirs()`` (each returns its measurement;
    ``theirs`` may be None): the GEMM round between the other two, and every other round in the
    opposite order, so that neither always runs right after the GEMM (caches flushed, clocks
    lowered); each starts once the thread pools idle (``wait_until_idle``, at most ``settle_s``).
    Three lists."""
    mine, peaks, others = [], [], []
    busy = 0
    for number in range(rounds):
        order = [(mine, ours), (peaks, gemm)] + ([(others, theirs)] if theirs is not None else [])
        for results, call in (reversed(order) if number % 2 else order):
            busy += settle_s > 0 and not wait_until_idle(settle_s)
            results.append(call())
    if busy:
        _say(f"{busy} round(s) started with this process still busy after {settle_s} s (a thread that keeps "
             f"spinning, e.g. OMP_WAIT_POLICY=active): those rounds may have had a core less")
    return mine, peaks, others


def measure(name, batch, device, gemm, rounds, steps, warmup_s, torch, precision, *, settle_s):
    """Time nnaccel's step (and PyTorch's, when ``torch`` is given) in rounds with ``gemm``'s
    (``gemm_round``, ``paired_rounds``)."""
    model, ours = training_step(name, batch, device, precision)
    per_step = warm_up(ours, warmup_s)
    theirs = None
    if torch is not None:
        theirs = torch_training_step(torch, name, batch, device, precision)
        warm_up(theirs, warmup_s)
    steps = steps or max(1, math.ceil(ROUND_SECONDS / per_step))
    seconds, peaks, torch_seconds = paired_rounds(
        rounds, lambda: time_round(ours, steps), gemm, None if theirs is None else lambda: time_round(theirs, steps),
        settle_s)
    samples_per_s = batch * steps / statistics.median(seconds)
    flops = step_flops(model, batch) * steps / 1e9
    result = Result(device, name, batch, steps, seconds, samples_per_s, flops / statistics.median(seconds),
                    statistics.median(flops / s / p for s, p in zip(seconds, peaks)),
                    target=device == "cpu" and TARGET_BATCHES.get(name) == batch, peak_gflops=peaks,
                    precision=precision)
    if theirs is not None:
        result.torch_seconds = torch_seconds
        result.torch_samples_per_s = batch * steps / statistics.median(torch_seconds)
        result.ratio = statistics.median(t / s for s, t in zip(seconds, torch_seconds))
    return result


def fit_flops(model, samples, batch, epochs):
    """Floating-point operations of ``epochs`` epochs over ``samples`` in batches of ``batch``."""
    full, rest = divmod(samples, batch)
    return epochs * (full * step_flops(model, batch) + (step_flops(model, rest) if rest else 0))


def _timed(run, synchronize):
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


def nnaccel_fit(name, batch, device, epochs, x, y):
    """Seconds of one ``Trainer.fit`` call of ``epochs`` epochs from fresh weights (seed 0)."""
    model = build_network(name, device)
    trainer = Trainer(model, loss=SoftmaxCrossEntropy(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                      batch_size=batch, seed=0, quiet=True)
    return _timed(lambda: trainer.fit(x, y, epochs=epochs), model.backend.synchronize)


def torch_fit(torch, name, batch, device, epochs, x, y):
    """The same training as ``nnaccel_fit`` in a plain PyTorch loop: the same initial weights
    (``to_torch``) and every epoch's shuffle drawn as the Trainer draws it (``default_rng(seed)``); the
    flat images go in as the network's input shape (``lenet5``'s (1, 28, 28)), as the Trainer views them."""
    model = build_network(name, "cpu")
    net = model.to_torch().to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    synchronize = (lambda: None) if device == "cpu" else (lambda: torch.cuda.synchronize(device))

    def loop():
        inputs = torch.from_numpy(x.reshape((len(x),) + model.input_shape)).to(device)
        labels = torch.from_numpy(y).to(device)
        rng = numpy.random.default_rng(0)
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(x))).to(device)
            for begin in range(0, len(x), batch):
                rows = order[begin:begin + batch]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(inputs[rows]), labels[rows])
                loss.backward()
                optimizer.step()

    return _timed(loop, synchronize)


def measure_fit(name, batch, device, gemm, rounds, epochs, data, torch, *, settle_s):
    """Time whole fit calls (and PyTorch's loop, when ``torch`` is given) in rounds with ``gemm``'s
    (``paired_rounds``); one untimed call of each first warms caches, allocators and thread pools."""
    x, y = data

    def ours():
        return nnaccel_fit(name, batch, device, epochs, x, y)

    theirs = None if torch is None else lambda: torch_fit(torch, name, batch, device, epochs, x, y)
    for call in (ours, gemm, theirs):
        if call is not None:
            call()
    seconds, peaks, torch_seconds = paired_rounds(rounds, ours, gemm, theirs, settle_s)
    flops = fit_flops(build_network(name, "cpu"), len(x), batch, epochs) / 1e9
    result = Result(device, name, batch, epochs * -(-len(x) // batch), seconds,
                    epochs * len(x) / statistics.median(seconds), flops / statistics.median(seconds),
                    statistics.median(flops / s / p for s, p in zip(seconds, peaks)),
                    target=device == "cpu" and TARGET_BATCHES.get(name) == batch, peak_gflops=peaks,
                    mode="fit", epochs=epochs)
    if torch is not None:
        result.torch_seconds = torch_seconds
        result.torch_samples_per_s = epochs * len(x) / statistics.median(result.torch_seconds)
        result.ratio = statistics.median(t / s for s, t in zip(seconds, result.torch_seconds))
    return result


def add_speedups(results):
    """Fill each GPU result's speed-up over the CPU result of the same network and batch."""
    cpu = {(r.network, r.batch): r.samples_per_s for r in results if r.device == "cpu"}
    for result in results:
        if result.device != "cpu" and (result.network, result.batch) in cpu:
            result.speedup = result.samples_per_s / cpu[result.network, result.batch]


# ----- options -------------------------------------------------------------------------
def parse_devices(text):
    """Canonical device names from ``"cpu,cuda"``; by default every device that answers."""
    if text is None:
        return ["cpu"] + [f"cuda:{index}" for index in range(cuda_status()[0])]
    devices = [resolve_device(name) for name in text.split(",") if name.strip()]
    if not devices:
        raise ConfigError("--devices names no device; expected e.g. cpu,cuda")
    return list(dict.fromkeys(devices))


def parse_precisions(text):
    """Precisions from ``"fp32,tf32,bf16"``, each one of ``PRECISIONS``."""
    precisions = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if not precisions or unknown:
        raise ConfigError(f"--precision {text!r} is not a list of {', '.join(PRECISIONS)}")
    return precisions


MAX_BATCH = 2 ** 20  # a synthetic batch of 784 floats a sample: 3 GiB


def parse_batches(text):
    """Batch sizes from ``"32,64,256"``."""
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) <= 0:
        raise ConfigError(f"--batches {text!r} is not a list of positive batch sizes like 32,64,256")
    if max(batches) > MAX_BATCH:
        raise ConfigError(f"--batches: each batch size must be from 1 to {MAX_BATCH:,}, got {max(batches):,}")
    return _once(batches, "--batches")


def _once(values, option):
    """``values`` without repeats, in order, as --devices and --precision take theirs; a repeat (``lenet5`` and
    ``LENET5``, ``64`` and ``064``) would be timed twice and counted twice in the report, so it is said."""
    unique = tuple(dict.fromkeys(values))
    repeated = [str(value) for value in unique if values.count(value) > 1]
    if repeated:
        _say(f"{option} names {', '.join(repeated)} more than once: each is timed once")
    return unique


def plan(args, devices):
    """``(device, sizes, batches)`` for every network to run on every device."""
    batches = parse_batches(args.batches) if args.batches else QUICK["batches"] if args.quick else None
    networks = args.networks and _once([parse_network(name) for name in args.networks.split(",")], "--networks")
    grid = []
    for device in devices:
        defaults = FIT_BATCHES[device.split(":")[0]] if args.fit else DEFAULT_BATCHES
        for name in networks or (QUICK["networks"] if args.quick else defaults):
            if not args.networks and device == "cpu" and name in GPU_ONLY_NETWORKS:
                continue
            grid.append((device, name, batches or defaults.get(name) or DEFAULT_BATCHES.get(name, OTHER_BATCHES)))
    return grid


# --rounds, --steps, --threads and --epochs: NaN, 1.5 and 0 refused by argparse, naming the option and the range
_count = number_option(1, integer=True)
# Threads past the thousands crashed OpenMP and threadpoolctl (a segfault, an allocation of 400 GB, an overflow)
MAX_THREADS = 1024
_threads = number_option(1, MAX_THREADS, integer=True)


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ConfigError(f"--compare torch needs PyTorch, which does not import here ({error}): "
                          "pip install torch") from None
    return torch


def default_threads():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----- reports ---------------------------------------------------------------------------
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(devices, torch=None):
    """Where and with what the numbers were measured, for the JSON report."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "threadpools": _threadpool_info(), "gpus": {},
            "versions": {"nnaccel": __version__, "numpy": numpy.__version__}, "source": source_revision()}
    if torch is not None:
        info["versions"]["torch"] = torch.__version__
    try:
        import cupy
    except Exception:  # not installed, or a broken install: cuda_status() says which
        return info
    info["versions"]["cupy"] = cupy.__version__
    for device in devices:
        if device.startswith("cuda"):
            props = cupy.cuda.runtime.getDeviceProperties(int(device.split(":")[1]))
            info["gpus"][device] = props["name"].decode()
    return info


def source_revision():
    """``{"commit", "modified"}``: the git commit of the checkout nnaccel runs from and whether its tracked
    files have uncommitted changes, so that a recorded result names the code it measured; None where
    nnaccel's files are not a checkout's tracked files (an installed wheel, even in a venv inside another
    repository) or git is missing."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=30)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode:
            return None
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode or status.returncode:
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def flag_unreliable_peaks(peaks, results):
    """Mark each peak (``peaks[key]["reliable"]``) and the results against it: a share above 100% means
    that device's GEMM rounds fell short of its peak, so none of its shares is printed as real. Returns
    ``{key: its result with the highest share}`` for the unreliable peaks."""
    over = {}
    for result in results:
        if result.peak_share > max(1.0, getattr(over.get(result.peak_key), "peak_share", 0.0)):
            over[result.peak_key] = result
    for key, peak in peaks.items():
        peak["reliable"] = key not in over
    for result in results:
        result.peak_reliable = result.peak_key not in over
    return over


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(results):
    """Aligned text columns; those empty in every row (no PyTorch, one device) are left out."""
    header = ("device", "network", "batch", "samples/s", "GFLOP/s", "% peak", "torch samples/s",
              "ratio", "GPU/CPU", "precision")
    mixed = any(r.precision != "fp32" for r in results)
    rows = [(r.device, r.network, str(r.batch), _cell(r.samples_per_s, ",.0f"), _cell(r.gflops, ".1f"),
             _cell(100 * r.peak_share, ".1f") if r.peak_reliable else "unreliable",
             _cell(r.torch_samples_per_s, ",.0f"), _cell(r.ratio, ".2f"),
             _cell(r.speedup, ".1f"), r.precision if mixed else "-") for r in results]
    shown = [i for i in range(len(header)) if i < 6 or any(row[i] != "-" for row in rows)]
    widths = {i: max(len(row[i]) for row in [header, *rows]) for i in shown}
    lines = ["  ".join(row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in shown).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def plot_results(results, path):
    """Samples/s against batch size, one line per device, network and precision (PyTorch dashed), log axes."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for key in dict.fromkeys((r.device, r.network, r.precision) for r in results):
        rows = sorted((r for r in results if (r.device, r.network, r.precision) == key), key=lambda r: r.batch)
        batches, label = [r.batch for r in rows], " ".join(key[:2] if key[2] == "fp32" else key)
        (line,) = axis.plot(batches, [r.samples_per_s for r in rows], marker="o", label=label)
        if all(r.torch_samples_per_s for r in rows):
            axis.plot(batches, [r.torch_samples_per_s for r in rows], "--", marker="x", color=line.get_color(),
                      label=f"{label} PyTorch")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("batch size")
    axis.set_ylabel("training samples/s")
    what = "whole-fit" if all(r.mode == "fit" for r in results) else "training-step"
    precisions = "/".join(dict.fromkeys(r.precision for r in results))
    axis.set_title(f"nnaccel {__version__} {what} throughput ({'float32' if precisions == 'fp32' else precisions}, "
                   f"SGD)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
    plt.close(figure)


# ----- the command -------------------------------------------------------------------------
def add_parser(subparsers):
    """Register ``nnaccel bench`` and its options on the command line's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="training-step throughput per device, against the GEMM peak and PyTorch",
        description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--devices", help="comma-separated devices, e.g. cpu,cuda (default: every one that answers)")
    parser.add_argument("--networks", help="comma-separated layer sizes, e.g. 784-128-64-10,784-1024-1024-10 "
                                           "(default: the four CPU target networks, and 784-4096-4096-10 on GPUs)")
    parser.add_argument("--batches", help="comma-separated batch sizes for every network "
                                          "(default: three per network, its target batch among them)")
    parser.add_argument("--rounds", type=_count,
                        help=f"timed rounds per configuration; the median counts (default {ROUNDS})")
    parser.add_argument("--steps", type=_count,
                        help=f"training steps per round (default: enough for about {ROUND_SECONDS} s)")
    parser.add_argument("--threads", type=_threads,
                        help=f"CPU threads for NumPy's BLAS and for PyTorch (default: {default_threads()}, "
                             "the cores available; more share the cores, and the GEMM peak is then timed on "
                             "the cores)")
    parser.add_argument("--compare", type=str.lower, choices=["torch"],
                        help="also time the same step in PyTorch, in alternating rounds, and add the ratio")
    parser.add_argument("--fit", action="store_true",
                        help="time whole Trainer.fit calls on the MNIST sample instead of steps, against a plain "
                             "PyTorch loop with the same weights and shuffles (default networks: the CPU targets "
                             "at their target batches; on GPUs 784-128-64-10/128 and 784-4096-4096-10/4096)")
    parser.add_argument("--epochs", type=_count, help=f"--fit: epochs per fit call (default {FIT_EPOCHS})")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated precisions of the GPU steps, e.g. fp32,tf32,bf16 (nnaccel's Trainer "
                             "precision; PyTorch with TF32 allowed or under autocast(bfloat16)); each against the "
                             "GEMM peak in that precision; the CPU computes fp32 (default fp32)")
    parser.add_argument("--json", metavar="FILE", help="write the results and machine information (with the git "
                                                       "commit of a checkout nnaccel runs from) as JSON")
    parser.add_argument("--plot", metavar="FILE", help="draw samples/s against batch size to a PNG")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one round, against a warmed-up 1024x1024 GEMM: a smoke test for CI")
    return parser


def run(args):
    """Measure the grid the options ask for, print the table, write the JSON and the plot."""
    threads = args.threads or default_threads()
    gemm_threads = min(threads, default_threads())
    if gemm_threads < threads:
        _say(f"--threads {threads} is more than the {gemm_threads} core(s) this process may run on: the threads "
             f"share them, and % peak is of the GEMM on {gemm_threads} thread(s), what the cores can do")
    rounds = args.rounds or (QUICK["rounds"] if args.quick else ROUNDS)
    steps = args.steps or (QUICK["steps"] if args.quick else None)
    warmup_s = QUICK["warmup_s"] if args.quick else WARMUP_SECONDS
    settle_s = QUICK["settle_s"] if args.quick else SETTLE_SECONDS
    epochs = args.epochs or (1 if args.quick else FIT_EPOCHS)
    if args.epochs is not None and not args.fit:
        raise ConfigError("--epochs counts the epochs of --fit; without --fit bench times steps (--steps)")
    if args.steps is not None and args.fit:
        raise ConfigError("--steps counts the steps of a round of the step benchmark; --fit times whole fit calls "
                          "(--epochs)")
    devices = parse_devices(args.devices)
    precisions = parse_precisions(args.precision)
    if args.fit and precisions != ("fp32",):
        raise ConfigError("--precision applies to the step benchmark; --fit times fp32 fit calls")
    if set(precisions) != {"fp32"} and all(device == "cpu" for device in devices):
        raise ConfigError(f"--precision {args.precision} applies to the GPU steps; the CPU computes fp32, and the "
                          f"devices timed ({', '.join(devices)}) hold no GPU")
    grid = plan(args, devices)
    torch = _import_torch() if args.compare == "torch" else None
    if args.json:  # --plot is checked with the other pictures' options (cli.main)
        checkpoint.check_writable(args.json, "--json", example="bench.json")
    if args.plot:
        from .plotting import pyplot

        pyplot()  # a missing matplotlib is reported now, not after the measurements
    try:
        fit = _fit_data(args.quick, epochs) if args.fit else None
        largest = max(batch for _, _, batches in grid for batch in batches)
        if fit and largest > len(fit[1][0]):
            raise ConfigError(f"--batches: a fit's batch size must be from 1 to {len(fit[1][0]):,} (the images it "
                              f"trains on), got {largest:,}")
        if fit:
            _check_fit_networks(grid, *fit[1])
        _check_batchnorm_batches(grid, len(fit[1][0]) if fit else None)
        peaks, results, stopped = measure_grid(grid, threads, rounds, steps, warmup_s, settle_s, torch,
                                               quick=args.quick, fit=fit, precisions=precisions)
    except MemoryError as error:  # a batch or layer size beyond what the device holds (CuPy's OOM is one too)
        raise ConfigError(f"a network or batch size does not fit in memory ({error}); choose smaller --networks "
                          f"or --batches") from None
    add_speedups(results)
    for key, result in flag_unreliable_peaks(peaks, results).items():
        _say(f"{key}: {result.network} batch {result.batch} measured {100 * result.peak_share:.0f}% of the GEMM "
             f"rounds beside it, so those rounds fell short of {key}'s peak (other work on the machine, or a GEMM "
             f"too small): % peak of {key} is unreliable and not shown")
    gemm = ", ".join(f"{d} {p['gflops']:,.1f} GFLOP/s ({p['size']}x{p['size']}"
                     f"{'' if p['reliable'] else '; unreliable: a share passed 100%, % peak not shown'})"
                     for d, p in peaks.items())
    what = (f"whole fit calls of {epochs} epoch(s) on {len(fit[1][0]):,} MNIST images against a plain PyTorch "
            f"loop" if args.fit else "training steps")
    oversubscribed = f" on {gemm_threads} core(s), the CPU GEMM on {gemm_threads}" if gemm_threads < threads else ""
    print(f"nnaccel {__version__} bench: {what}, float32, SGD(lr={LR}, momentum={MOMENTUM}), {threads} CPU "
          f"thread{'s' * (threads > 1)}{oversubscribed}, median of {rounds} round(s); % peak is of the GEMM (float32 "
          f"operands; bfloat16 under bf16) timed beside each round, median of the paired ratios; at the "
          f"start: {gemm}")
    print(format_table(results))
    if args.json:
        report = {"machine": machine_info(devices, torch),
                  "settings": {"dtype": "float32", "optimizer": {"type": "SGD", "lr": LR, "momentum": MOMENTUM},
                               "loss": "softmax_cross_entropy", "threads": threads, "gemm_threads": gemm_threads,
                               "rounds": rounds, "settle_seconds_at_most": settle_s, "compare": args.compare,
                               "stopped_early": stopped is not None,
                               "mode": "fit" if args.fit else "step", "precisions": list(precisions),
                               **({"epochs": epochs, "data": "mnist sample", "samples": len(fit[1][0]),
                                   "warmup": "one untimed fit call of each"} if args.fit else
                                  {"steps": steps or "auto", "warmup_seconds": warmup_s})},
                  "gemm_peak": peaks, "results": [asdict(result) for result in results]}
        text = json.dumps(report, indent=2) + "\n"
        checkpoint.atomic_write(args.json, lambda handle: handle.write(text.encode()))  # a full disk: no half file
        _say(f"results written to {args.json}")
    if args.plot:
        plot_results(results, args.plot)
        _say(f"plot written to {args.plot}")
    return 0 if stopped is None else stopped


def _check_fit_networks(grid, x, y):
    """Refuse, before anything is timed, a --fit network that cannot train on the MNIST sample ``x, y``: one
    whose inputs are not its pixels or whose outputs are fewer than its classes."""
    classes = int(y.max()) + 1
    for _, name, _ in grid:
        sizes = () if name in architectures.PRESETS else [int(size) for size in name.split("-")]
        if sizes and (sizes[0] != x.shape[1] or sizes[-1] < classes):
            raise ConfigError(f"--networks {name}: --fit trains on the MNIST sample, {x.shape[1]} inputs and "
                              f"{classes} classes; its networks start with {x.shape[1]} and end with at least "
                              f"{classes} outputs, like {x.shape[1]}-128-{classes}")


def _check_batchnorm_batches(grid, samples):
    """Refuse, before anything is timed, a batch that gives a BatchNorm of features one sample to train on
    (``lenet5-bn`` at batch 1; with --fit over ``samples``, a last step of one), naming it."""
    for _, name, batches in grid:
        if name not in architectures.PRESETS:  # layer sizes: Dense layers only
            continue
        layers, shape = architectures.build(name, 28 * 28, 10)
        for layer in layers:
            if isinstance(layer, BatchNorm) and len(shape) == 1:
                for batch in batches:
                    if batch == 1 or samples is not None and samples % batch == 1:
                        step = "a step" if batch == 1 else f"the last step of each epoch over {samples:,} images"
                        raise ConfigError(f"--batches {batch}: {name}'s {layer!r} cannot train on one sample, "
                                          f"which {step} gives it; choose another batch size")
            shape = layer.output_shape(shape)


def _fit_data(quick, epochs):
    """``(epochs, (x, y))`` for --fit: the MNIST sample (its first images with --quick)."""
    x, y = datasets.load_mnist_sample()
    if quick:
        x, y = x[:QUICK["fit_samples"]], y[:QUICK["fit_samples"]]
    return epochs, (x, y)


def measure_grid(grid, threads, rounds, steps, warmup_s, settle_s, torch=None, quick=False, fit=None,
                 precisions=("fp32",)):
    """Each device's GEMM peak (the median of ``rounds`` GEMM rounds), then every configuration (steps,
    or with ``fit = (epochs, data)`` whole fit calls), all under one CPU thread count (the CPU's GEMM
    on at most the cores available, whose peak more threads only contend for); steps on a GPU
    in each of ``precisions``, each against GEMM rounds in that precision beside its own rounds (the
    CPU computes fp32 only).

    Returns ``({device or "device precision": {"size", "gflops"}}, [Result, ...], stopped)``: ``stopped`` is
    None, or the exit status of a Ctrl-C or SIGTERM (a time limit's) that ended the grid after at least one
    configuration, whose results are kept.
    """
    peaks, gemms, results, stopped = {}, {}, [], None
    gemm_threads = min(threads, default_threads())
    saved_torch_threads = torch.get_num_threads() if torch is not None else None
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32 if torch is not None else None
    try:
        with _blas_threads(threads):
            if torch is not None:
                torch.set_num_threads(threads)
            for device, sizes, batches in grid:
                backend = get_backend(device)
                peer = torch if torch is not None and (device == "cpu" or torch.cuda.is_available()) else None
                if torch is not None and peer is None:
                    _say(f"{device}: PyTorch {torch.__version__} has no CUDA here, so no comparison on it")
                for precision in ("fp32",) if device == "cpu" or fit is not None else precisions:
                    key = device if precision == "fp32" else f"{device} {precision}"
                    with backend.activate():  # cuda:N computes on GPU N
                        if key not in peaks:
                            size, gemm_warmup_s = ((QUICK["gemm_size"], QUICK["gemm_warmup_s"]) if quick else
                                                   (GEMM_SIZE[device.split(":")[0]], warmup_s))
                            gemms[key] = _on_threads(lambda: gemm_round(backend, size, gemm_warmup_s, precision),
                                                     gemm_threads)
                            gflops = statistics.median(gemms[key]() for _ in range(rounds))
                            peaks[key] = {"size": size, "gflops": gflops}
                            operands = "bfloat16" if precision == "bf16" else "float32"
                            _say(f"{key}: {operands} GEMM {size}x{size}: {peaks[key]['gflops']:,.1f} GFLOP/s")
                        for batch in batches:
                            if fit is not None:
                                result = measure_fit(sizes, batch, device, gemms[key], rounds, *fit, peer,
                                                     settle_s=settle_s)
                            else:
                                result = measure(sizes, batch, device, gemms[key], rounds, steps, warmup_s, peer,
                                                 precision, settle_s=settle_s)
                            results.append(result)
                            _say(f"{key} {result.network} batch {batch}: {result.samples_per_s:,.0f} samples/s"
                                 + (f", PyTorch ratio {result.ratio:.2f}" if result.ratio else ""))
    except SystemExit as stop:  # the command line's Ctrl-C and SIGTERM handler: keep what was measured
        if not results:
            raise
        stopped = stop.code
        _say(f"stopped (exit status {stop.code}) after {len(results)} configuration(s): reporting those")
    finally:
        if torch is not None:
            torch.set_num_threads(saved_torch_threads)
            torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return peaks, results, stopped


def _threadpool_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed (pip install 'nnaccel[bench]')"
    return threadpool_info()


def _blas_threads(threads):
    """A context in which NumPy's BLAS uses ``threads`` threads (threadpoolctl, the ``bench`` extra); without
    it, the thread count BLAS started with, which must then be ``threads``."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if threads != default_threads():
            raise ConfigError(f"--threads {threads} needs threadpoolctl to set BLAS's threads: "
                              f"pip install 'nnaccel[bench]' (or set OPENBLAS_NUM_THREADS={threads})") from None
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _on_threads(make_round, threads):
    """``make_round()``'s timed call, made and called with BLAS on ``threads`` threads."""
    with _blas_threads(threads):
        timed = make_round()

    def limited():
        with _blas_threads(threads):
            return timed()

    return limited


def _say(message):
    print(message, file=sys.stderr, flush=True)
