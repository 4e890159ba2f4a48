"""CI smoke run of the benchmark tooling (tiny sizes, one round) so that it cannot rot."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

from emulated_cuda import ENV
from nnaccel import Sequential, bench, cli, datasets

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """``nnaccel bench --quick`` with JSON and plot (and ``--compare torch`` where PyTorch imports)."""
    folder = tmp_path_factory.mktemp("bench")
    compare = ["--compare", "torch"] if HAS_TORCH else []
    done = run("-m", "nnaccel.cli", "bench", "--quick", *compare,
               "--json", folder / "bench.json", "--plot", folder / "bench.png")
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads((folder / "bench.json").read_text()), folder / "bench.png"


def assert_share_of_paired_gemm_rounds(result):
    """The share of the GEMM peak is the median over the rounds of the round's GFLOP/s over the GEMM
    round timed after it, not one peak measured at the start."""
    seconds, peaks = result["seconds"], result["peak_gflops"]
    assert len(peaks) == len(seconds) and all(p > 0 for p in peaks)
    gflop = result["gflops"] * statistics.median(seconds)  # one round's work
    assert math.isclose(result["peak_share"], statistics.median(gflop / s / p for s, p in zip(seconds, peaks)),
                        rel_tol=1e-9)


def test_bench_table(quick_bench):
    stdout, _, _ = quick_bench
    lines = stdout.splitlines()
    header = lines[1].split()
    assert header[:3] == ["device", "network", "batch"] and "GFLOP/s" in header
    assert ("ratio" in header) == HAS_TORCH
    rows = [line.split() for line in lines[2:]]
    assert [row[:3] for row in rows if row[0] == "cpu"] == [["cpu", "784-16-16-10", "16"],
                                                             ["cpu", "784-16-16-10", "64"]]
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned columns end together
    shares = [row[header.index("%")] for row in rows]  # "% peak" splits in two words, its cells in one
    assert all(share == "unreliable" or float(share) <= 100 for share in shares), shares


def test_bench_json(quick_bench):
    _, report, _ = quick_bench
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["machine"]["versions"]["nnaccel"] and report["machine"]["threadpools"]
    assert report["settings"]["optimizer"] == {"type": "SGD", "lr": 0.01, "momentum": 0.9}
    assert report["settings"]["settle_seconds_at_most"] == 0.0  # --quick waits for no idle threads
    assert report["settings"]["steps"] == 2 and report["settings"]["warmup_seconds"] == 0.0
    assert report["gemm_peak"]["cpu"]["gflops"] > 0
    cpu = [r for r in report["results"] if r["device"] == "cpu"]
    assert [r["batch"] for r in cpu] == [16, 64]
    for result in cpu:
        assert result["samples_per_s"] > 0 and result["gflops"] > 0 and 0 < result["peak_share"]
        assert len(result["seconds"]) == 1 and result["steps"] == 2
        assert_share_of_paired_gemm_rounds(result)
        assert (result["ratio"] is not None and result["torch_samples_per_s"] > 0) == HAS_TORCH
    for key, peak in report["gemm_peak"].items():  # a share above 100% anywhere marks that device's peak
        mine = [r for r in report["results"] if r["device"] == key]
        assert peak["reliable"] == all(r["peak_share"] <= 1 for r in mine)
        assert all(r["peak_reliable"] == peak["reliable"] for r in mine)


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_bench_json_names_the_commit_it_measured(quick_bench, tmp_path, monkeypatch):
    """The report's ``source``: this checkout's commit and whether its tracked files changed; None for
    nnaccel files that no checkout tracks (a copy, as an installed wheel is)."""
    source = quick_bench[1]["machine"]["source"]
    if _git("ls-files", "--error-unmatch", "nnaccel/bench.py").returncode:
        assert source is None  # these tests run from files git does not track here
    else:
        assert source == {"commit": _git("rev-parse", "HEAD").stdout.strip(),
                          "modified": bool(_git("status", "--porcelain", "--untracked-files=no").stdout.strip())}
    copy = tmp_path / "nnaccel" / "bench.py"
    copy.parent.mkdir()
    copy.write_text("")
    monkeypatch.setattr(bench, "__file__", str(copy))
    assert bench.source_revision() is None


def test_bench_plot(quick_bench):
    _, _, png = quick_bench
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_bench_fit_times_whole_fit_calls(tmp_path):
    """``bench --fit``: whole ``Trainer.fit`` calls (beside a plain PyTorch loop where it imports)."""
    compare = ["--compare", "torch"] if HAS_TORCH else []
    done = run("-m", "nnaccel.cli", "bench", "--fit", "--quick", "--epochs", "2", "--devices", "cpu", *compare,
               "--rounds", "2", "--json", tmp_path / "fit.json")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["settings"]["mode"] == "fit" and report["settings"]["epochs"] == 2
    assert report["settings"]["samples"] == 512  # the quick run's MNIST images
    # Its warm-up is a fit call, and its steps are the epochs': none of the step benchmark's settings.
    assert report["settings"]["warmup"] == "one untimed fit call of each"
    assert "steps" not in report["settings"] and "warmup_seconds" not in report["settings"]
    for result in report["results"]:
        assert result["mode"] == "fit" and result["epochs"] == 2 and result["samples_per_s"] > 0
        assert result["steps"] == 2 * -(-512 // result["batch"])
        assert (result["ratio"] is not None and result["torch_samples_per_s"] > 0) == HAS_TORCH
        assert len(result["seconds"]) == 2
        assert_share_of_paired_gemm_rounds(result)
    assert "784-16-16-10" in done.stdout


class _Clocks:
    """Wall and process CPU clocks that ``sleep`` advances: the process's other threads use
    ``busy[i]`` of a core during the i-th sleep (the last value from then on)."""

    def __init__(self, busy):
        self.busy, self.wall, self.cpu, self.sleeps = list(busy), 0.0, 0.0, 0

    def sleep(self, seconds):
        self.wall += seconds
        self.cpu += seconds * self.busy[min(self.sleeps, len(self.busy) - 1)]
        self.sleeps += 1


@pytest.fixture
def clocks(monkeypatch):
    def install(busy):
        fake = _Clocks(busy)
        monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: fake.wall,
                                                          process_time=lambda: fake.cpu, sleep=fake.sleep))
        return fake
    return install


def test_a_round_waits_until_the_thread_pools_idle(clocks):
    """A BLAS pool spinning after its last call (a core busy for 0.13 s) is waited for."""
    fake = clocks([1.0] * 6 + [0.7, 0.0])  # the spinner stops within the 7th window
    assert bench.wait_until_idle(1.0, window_s=0.02)
    assert fake.sleeps == 8 and math.isclose(fake.wall, 0.16)


def test_the_wait_for_idle_threads_ends_at_its_limit(clocks):
    fake = clocks([1.0])
    assert not bench.wait_until_idle(0.5, window_s=0.02)
    assert math.isclose(fake.wall, 0.5)
    waited = fake.wall
    assert bench.wait_until_idle(0.0) is False and fake.wall == waited  # no limit, no wait (--quick)


def test_paired_rounds_wait_for_idle_threads_before_every_round(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "wait_until_idle", lambda limit_s: calls.append(("wait", limit_s)) or len(calls) > 1)

    def call(name):
        return lambda: calls.append(name) or len(calls)

    mine, peaks, others = bench.paired_rounds(2, call("ours"), call("gemm"), call("theirs"), 0.75)
    wait = ("wait", 0.75)
    assert calls == [wait, "ours", wait, "gemm", wait, "theirs", wait, "theirs", wait, "gemm", wait, "ours"]
    assert (mine, peaks, others) == ([2, 12], [4, 10], [6, 8])
    assert "1 round(s) started with this process still busy after 0.75 s" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--networks", "784-x-10"], "network '784-x-10' is not a list of positive layer sizes"),
    (["--networks", "784"], "network '784' is not a list of positive layer sizes"),
    (["--batches", "32,0"], "--batches '32,0' is not a list of positive batch sizes"),
    (["--devices", "tpu"], "unknown device 'tpu'"),
    (["--precision", "fp32,fp16"], "--precision 'fp32,fp16' is not a list of fp32, tf32, bf16"),
    (["--fit", "--precision", "bf16"], "--precision applies to the step benchmark; --fit times fp32 fit calls"),
    (["--fit", "--networks", "64-10"], "--networks 64-10: --fit trains on the MNIST sample, 784 inputs and 10 "
                                       "classes; its networks start with 784 and end with at least 10 outputs"),
    (["--fit", "--networks", "lenet5,784-5"], "--networks 784-5: --fit trains on the MNIST sample"),
    (["--devices", "cpu", "--precision", "fp32,bf16"], "--precision fp32,bf16 applies to the GPU steps; the CPU "
                                                       "computes fp32, and the devices timed (cpu) hold no GPU"),
    (["--networks", "lenet5-bn", "--batches", "16,1"], "--batches 1: lenet5-bn's BatchNorm(120) cannot train on one "
                                                      "sample, which a step gives it; choose another batch size"),
    (["--fit", "--networks", "784-16-10,lenet5-bn", "--batches", "511"], "--batches 511: lenet5-bn's BatchNorm(120) "
     "cannot train on one sample, which the last step of each epoch over 512 images gives it"),
    (["--fit", "--steps", "5"], "--steps counts the steps of a round of the step benchmark; --fit times whole fit "
                                "calls (--epochs)"),
    (["--json", "no/such/dir/b.json"], "--json no/such/dir/b.json: folder no/such/dir does not exist"),
    (["--json", "."], "--json . is a folder; name a file in it, such as bench.json"),
])
def test_bench_user_errors_are_one_line(args, message, capsys):
    assert cli.main(["bench", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnaccel bench: error: ") and message in err and err.count("\n") == 1


def test_a_network_or_batch_named_twice_is_timed_once(tmp_path, capsys):
    """Network names are read case-insensitively and layer sizes as numbers: ``lenet5`` and ``LENET5``,
    ``784-16-10`` and ``784-016-10`` are one network each, timed (and reported) once, as is a batch given
    twice; the repeats are said, naming the option."""
    assert cli.main(["bench", "--quick", "--devices", "cpu", "--networks", "784-16-10,784-016-10,LeNet5,lenet5",
                     "--batches", "16,16", "--json", str(tmp_path / "b.json")]) == 0
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["network"], r["batch"]) for r in results] == [("784-16-10", 16), ("lenet5", 16)]
    err = capsys.readouterr().err
    assert "--networks names 784-16-10, lenet5 more than once: each is timed once" in err
    assert "--batches names 16 more than once: each is timed once" in err


def test_compare_torch_without_torch_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert cli.main(["bench", "--quick", "--compare", "torch"]) == 2
    assert "--compare torch needs PyTorch" in capsys.readouterr().err


def test_benchmark_suite_runs():
    """The pytest-benchmark suite, once per test at its tiniest size, without timing."""
    done = run("-m", "pytest", "benchmarks", "-q", "--bench-quick", "--benchmark-disable", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout


def test_fused_kernel_benchmark(tmp_path):
    """benchmarks/fused_kernels.py: fused vs unfused on a GPU; a clear exit where none answers."""
    from nnaccel.backend import cuda_status

    args = [sys.executable, str(ROOT / "benchmarks" / "fused_kernels.py"), "--rows", "512", "--cols", "1024",
            "--repeat", "5", "--json", str(tmp_path / "fused.json")]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if not cuda_status()[0]:
        assert run.returncode == 2 and "no usable GPU" in run.stderr and "Traceback" not in run.stderr
        return
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "fused.json").read_text())["results"]
    assert {r["op"].split()[0] for r in results} >= {"bias_act", "act_backward+bias_grad", "sgd_update",
                                                     "batchnorm_stats", "batchnorm_backward", "act_backward_from_nchw"}
    assert all(r["fused_s"] > 0 and r["unfused_s"] > 0 for r in results)


def test_the_gpu_check_script_runs_on_the_emulated_device(tmp_path):
    """benchmarks/gpu_check.sh, dry-run on the CuPy stand-in: the day a GPU is lent it cannot fail for a typo.

    The same script runs the full GPU tests and benchmarks there; --quick keeps one test and tiny sizes."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick", str(tmp_path / "out")],
                          env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert files == ["bench.json", "bench.log", "fit.json", "fit.log", "fused-kernels.json", "fused-kernels.log",
                     "gpu-tests.log", "machine.txt"]  # at most 8 files come back from the device machine
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {(r["device"], r["precision"]) for r in bench["results"]} == {("cpu", "fp32"), ("cuda:0", "fp32"),
                                                                         ("cuda:0", "bf16")}
    assert set(bench["gemm_peak"]) == {"cpu", "cuda:0", "cuda:0 bf16"}
    fit = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert {(r["device"], r["mode"]) for r in fit["results"]} == {("cuda:0", "fit")}
    assert "nnaccel CUDA emulator" in (tmp_path / "out" / "machine.txt").read_text()
    assert ' passed' in (tmp_path / "out" / "gpu-tests.log").read_text()


def test_a_stop_signal_keeps_the_configurations_measured(tmp_path, monkeypatch, capsys):
    """gpu_check.sh's time limit sends SIGTERM (the command line's handler raises SystemExit(143)): the
    configurations measured by then are reported and written, marked stopped, and the exit status is kept."""
    measure, calls = bench.measure, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise SystemExit(143)
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench, "measure", stopped_at_the_second)
    assert cli.main(["bench", "--quick", "--devices", "cpu", "--json", str(tmp_path / "b.json")]) == 143
    report = json.loads((tmp_path / "b.json").read_text())
    assert calls == [16, 64] and [r["batch"] for r in report["results"]] == [16]
    assert report["settings"]["stopped_early"] is True
    assert "stopped (exit status 143) after 1 configuration(s)" in capsys.readouterr().err


def test_a_share_above_the_peak_flags_the_peak_unreliable(tmp_path, monkeypatch, capsys):
    """A GEMM round far slower than the steps (a busy machine, a GEMM too small) gives shares above 100%:
    the report says that device's peak is unreliable and prints no share of it; the JSON keeps the
    measured shares, marked."""
    gemm_round, asked = bench.gemm_round, []

    def slow_gemm_round(backend, size, warmup_s, precision="fp32"):
        asked.append((size, warmup_s))
        timed = gemm_round(backend, 64, 0.0, precision)
        return lambda: timed() * 1e-9  # a peak of well under 1 GFLOP/s

    monkeypatch.setattr(bench, "gemm_round", slow_gemm_round)
    assert cli.main(["bench", "--quick", "--devices", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    assert asked == [(1024, 0.05)]  # --quick's own GEMM: big enough, and warmed up
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "cpu" in lines[0] and "unreliable: a share passed 100%, % peak not shown" in lines[0]
    assert [line.split()[-1] for line in lines[2:]] == ["unreliable", "unreliable"]
    assert "% peak of cpu is unreliable and not shown" in err and "784-16-16-10 batch " in err
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["gemm_peak"]["cpu"]["reliable"] is False
    assert all(r["peak_share"] > 1 and r["peak_reliable"] is False for r in report["results"])


def test_one_share_above_100_percent_flags_every_share_of_that_peak_only():
    def result(device, share, precision="fp32"):
        return bench.Result(device, "784-16-16-10", 16, 2, [1.0], 16.0, 1.0, share, False, precision=precision)

    results = [result("cpu", 0.4), result("cpu", 0.9), result("cuda:0", 0.3), result("cuda:0", 1.5),
               result("cuda:0", 2.5, "bf16"), result("cuda:0", 0.2, "bf16")]
    peaks = {key: {"size": 8, "gflops": 1.0} for key in ("cpu", "cuda:0", "cuda:0 bf16")}
    over = bench.flag_unreliable_peaks(peaks, results)
    assert {key: r.peak_share for key, r in over.items()} == {"cuda:0": 1.5, "cuda:0 bf16": 2.5}
    assert {key: peak["reliable"] for key, peak in peaks.items()} == {"cpu": True, "cuda:0": False,
                                                                      "cuda:0 bf16": False}
    assert [r.peak_reliable for r in results] == [True, True, False, False, False, False]
    shares = [line.split()[5] for line in bench.format_table(results).splitlines()[1:]]
    assert shares == ["40.0", "90.0", "unreliable", "unreliable", "unreliable", "unreliable"]


def test_the_plot_draws_a_line_per_precision_and_names_what_was_timed(tmp_path, monkeypatch):
    """A GPU's fp32 and bf16 steps are two lines, not one zigzag through both; --fit's plot says fit calls."""
    from matplotlib.axes import Axes

    drawn = []
    monkeypatch.setattr(Axes, "plot", lambda axis, x, y, *args, _original=Axes.plot, label=None, **kwargs:
                        drawn.append((x, y, label)) or _original(axis, x, y, *args, label=label, **kwargs))
    monkeypatch.setattr(Axes, "set_title", lambda axis, text, *args, **kwargs: drawn.append(text))

    def result(batch, speed, precision="fp32", mode="step"):
        return bench.Result("cuda:0", "784-16-16-10", batch, 2, [1.0], speed, 1.0, 0.5, False, precision=precision,
                            mode=mode)

    bench.plot_results([result(16, 1.0), result(64, 2.0), result(16, 3.0, "bf16"), result(64, 4.0, "bf16")],
                       tmp_path / "steps.png")
    assert drawn == [([16, 64], [1.0, 2.0], "cuda:0 784-16-16-10"), ([16, 64], [3.0, 4.0], "cuda:0 784-16-16-10 bf16"),
                     f"nnaccel {bench.__version__} training-step throughput (fp32/bf16, SGD)"]
    bench.plot_results([result(16, 1.0, mode="fit")], tmp_path / "fit.png")
    assert drawn[-1] == f"nnaccel {bench.__version__} whole-fit throughput (float32, SGD)"


def test_threads_beyond_the_cores_time_the_gemm_peak_on_the_cores(tmp_path, monkeypatch, capsys):
    """--threads above the cores available runs the steps on that many BLAS threads, as PyTorch's
    set_num_threads would, but the GEMM peak they are a share of on the cores (more threads only
    contend for them), and the report says so."""
    threadpool_info = pytest.importorskip("threadpoolctl").threadpool_info  # the bench extra: sets the threads

    def blas_threads():
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    seen = {"gemm": set(), "steps": set()}
    gemm_round, measure = bench.gemm_round, bench.measure

    def watched_gemm_round(*args):
        timed = gemm_round(*args)
        return lambda: seen["gemm"].update(blas_threads()) or timed()

    monkeypatch.setattr(bench, "gemm_round", watched_gemm_round)
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: seen["steps"].update(blas_threads())
                        or measure(*args, **kwargs))
    monkeypatch.setattr(bench, "default_threads", lambda: 1)
    assert cli.main(["bench", "--quick", "--devices", "cpu", "--threads", "3", "--json", str(tmp_path / "b.json")]) == 0
    assert seen == {"gemm": {1}, "steps": {3}}
    out, err = capsys.readouterr()
    assert "--threads 3 is more than the 1 core(s) this process may run on" in err
    assert "3 CPU threads on 1 core(s), the CPU GEMM on 1," in out
    settings = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert (settings["threads"], settings["gemm_threads"]) == (3, 1)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed: no peer loop to compare")
@pytest.mark.parametrize("network", ["784-16-16-10", "lenet5"])
def test_the_fit_peer_loop_trains_what_the_fit_trains(network, monkeypatch):
    """``bench --fit --compare torch`` times the same training on both sides: from the same weights, over the
    same shuffled batches (a short last one too), PyTorch's loop ends at the Trainer's weights; the MNIST
    images go in flat and reach an image network (lenet5) in its input shape."""
    import torch

    models, nets = [], []
    build, to_torch = bench.build_network, Sequential.to_torch
    monkeypatch.setattr(bench, "build_network", lambda *args: models.append(build(*args)) or models[-1])
    monkeypatch.setattr(Sequential, "to_torch", lambda model: nets.append(to_torch(model)) or nets[-1])
    x, y = datasets.load_mnist_sample()
    x, y = x[:40], y[:40]
    bench.nnaccel_fit(network, 16, "cpu", 2, x, y)
    bench.torch_fit(torch, network, 16, "cpu", 2, x, y)
    (peer,) = nets  # the Trainer's model is models[0]; models[1] is the one PyTorch's net copies
    ours = to_torch(models[0]).state_dict()
    for name, value in peer.state_dict().items():
        numpy.testing.assert_allclose(value.detach().numpy(), ours[name].numpy(), rtol=1e-5, atol=1e-6,
                                      err_msg=name)
