"""Data-parallel training: 2 MPI ranks on the CPU match one process on the doubled batch,
failures end the job instead of hanging it, checkpoints move between world sizes.

The multi-process tests run ``mpiexec -n 2`` (MPICH's hydra with the fork
launcher: no ssh needed) as a subprocess with a timeout, and skip with the
reason when mpi4py or mpiexec is missing or MPI cannot start two processes
here. Nothing in this process initialises MPI.
"""

import importlib.util
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest

import nnaccel as nn
from nnaccel import checkpoint, distributed
from nnaccel.errors import ConfigError, DeviceError

from command_line import NNACCEL, in_process
from emulated_cuda import ENV as EMULATED_ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mpi_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).resolve().parent / "mpi_worker.py")
TIMEOUT = 120  # seconds for any one mpiexec run; a hang fails the test instead of blocking CI
MPIEXEC = distributed.mpiexec_path()
ENV = {**os.environ, "HYDRA_LAUNCHER": "fork", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _probe():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'nnaccel[mpi]')"
    if MPIEXEC is None:
        return "mpiexec not found (pip install 'nnaccel[mpi]' installs MPICH's)"
    try:
        run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c",
                              "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
                             env=ENV, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "mpiexec -n 2 did not finish a barrier in 60 s here"
    if run.returncode:
        return f"mpiexec -n 2 cannot start MPI here: {run.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def mpi():
    reason = _probe()
    if reason:
        pytest.skip(reason)


def mpiexec(ranks, *args, timeout=TIMEOUT, cwd=None, env=ENV):
    """``mpiexec -n ranks args...`` to completion; a run past ``timeout`` is stopped and fails the test."""
    process = subprocess.Popen([MPIEXEC, "-n", str(ranks), *map(str, args)], env=env, cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        pytest.fail(f"mpiexec -n {ranks} {' '.join(map(str, args))} hung for {timeout} s")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _stop(process):
    process.terminate()  # hydra tears its ranks down on SIGTERM
    try:
        process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def worker(ranks, out, *options, **kwargs):
    return mpiexec(ranks, sys.executable, WORKER, out, "--distributed", *options, **kwargs)


def reference(options, batch, epochs=None, callbacks=()):
    """The same run in this process, on one device with batch ``batch``: (model, trainer)."""
    args = mpi_worker.parse(["unused", *map(str, options)])
    model, trainer, (x, y) = mpi_worker.setup(args, batch=batch)
    trainer.fit(x, y, epochs=args.epochs if epochs is None else epochs, callbacks=callbacks,
                validation_data=mpi_worker.validation(args, x, y))
    return model, trainer


def assert_same_weights(weights, expected):
    """Equal within float32 rounding: 1e-6 of the largest weight (sums split over ranks round differently)."""
    expected = numpy.asarray(expected)
    scale = float(numpy.abs(expected).max())
    numpy.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-6 * scale)


# ----- no MPI needed ------------------------------------------------------------------------------
def test_communicator_follows_the_device():
    assert distributed.kind_for("cpu") == "mpi"
    assert distributed.kind_for("cuda:1") == "nccl"
    assert distributed.kind_for(nn.Sequential(nn.Dense(4, 2))) == "mpi"
    with pytest.raises(DeviceError, match="no communicator for device 'tpu'"):
        distributed.kind_for("tpu")


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'nnaccel[mpi]'")):
        distributed.mpi()
    assert distributed.mpi_status() == (False, "mpi4py not installed (pip install 'nnaccel[mpi]')")


def test_cuda_model_without_nccl_is_a_clear_error(monkeypatch):
    def no_nccl():
        raise ConfigError("NCCL could not be loaded (libnccl.so.2: cannot open shared object file); "
                          + distributed.NCCL_HINT)

    monkeypatch.setattr(distributed, "_nccl_module", no_nccl)
    monkeypatch.setattr(distributed, "_COMMUNICATORS", {})
    with pytest.raises(ConfigError, match=r"a model on cuda:0 all-reduces through NCCL: NCCL could not be loaded "
                                          r".*nvidia-nccl-cu12.*or train on the CPU over MPI \(--device cpu\)"):
        distributed.communicator_for("cuda:0")
    ok, text = distributed.nccl_status()
    assert not ok and "nvidia-nccl-cu12" in text


def test_real_nccl_status_needs_no_mpi():
    """Whatever this machine has (no CuPy, no libnccl, no GPU, or all of it), the status says it in one line."""
    ok, text = distributed.nccl_status()
    assert text and "\n" not in text
    assert ok == ("NCCL" in text and "GPU(s)" in text)
    assert "mpi4py.MPI" not in sys.modules or not sys.modules["mpi4py.MPI"].Is_initialized()


class OneRank:
    """A communicator of one rank without MPI: the distributed loop must then be the plain one."""

    kind, rank, size, device = "fake", 0, 1, "cpu"

    def check_model(self, model):
        pass

    def allreduce_sum_(self, array):
        return array

    broadcast_ = allreduce_sum_

    def allreduce_scalars(self, values):
        return [float(value) for value in values]

    def any_flags(self, *flags):
        return [bool(flag) for flag in flags]

    def broadcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj]


@pytest.mark.parametrize("options", [["--optimizer", "adam", "--dropout", "0.3"], ["--n", "193"]])
def test_one_rank_distributed_loop_is_the_plain_loop_bit_for_bit(options):
    args = mpi_worker.parse(["unused", *options])
    model, trainer, (x, y) = mpi_worker.setup(args)
    trainer.fit(x, y, epochs=2, validation_data=(x[:50], y[:50]))
    model1, trainer1, _ = mpi_worker.setup(args, communicator=OneRank())
    trainer1.fit(x, y, epochs=2, validation_data=(x[:50], y[:50]))
    numpy.testing.assert_array_equal(model1.flat_params, model.flat_params)
    assert trainer1.history["loss"] == pytest.approx(trainer.history["loss"], rel=1e-12)
    assert trainer1.history["val_loss"] == pytest.approx(trainer.history["val_loss"], rel=1e-12)


class SecondOfTwo(OneRank):
    """Rank 1 of 2 whose partner adds nothing: enough to walk its part of the loop without MPI."""

    rank, size = 1, 2


def test_batch_hooks_run_on_a_rank_a_short_last_batch_left_no_rows():
    """65 samples, 2 ranks x 32: the last global batch of 1 is rank 0's alone. Rank 1's hooks are still
    called for that step, with a NaN loss, so that step-counting callbacks (a warm-up) agree across ranks;
    they missed it, and the ranks' rates, then weights, drifted apart."""

    class Losses(nn.Callback):
        def __init__(self):
            self.seen = []

        def on_batch_end(self, trainer, step, loss):
            self.seen.append((step, float(loss)))

    args = mpi_worker.parse(["unused", "--n", "65"])
    _, trainer, (x, y) = mpi_worker.setup(args, batch=32, communicator=SecondOfTwo())
    hooks = Losses()
    trainer.fit(x, y, epochs=1, callbacks=[hooks])
    assert [step for step, _ in hooks.seen] == [0, 1]
    assert math.isfinite(hooks.seen[0][1]) and math.isnan(hooks.seen[1][1])


def test_train_step_of_a_distributed_trainer_is_refused():
    """train_step updates with this rank's gradient alone: on 2 ranks their weights drifted apart silently."""
    args = mpi_worker.parse(["unused"])
    model, trainer, (x, y) = mpi_worker.setup(args, communicator=SecondOfTwo())
    before = model.flat_params.copy()
    with pytest.raises(ConfigError, match="train_step trains this process alone, but the trainer is distributed "
                                          "over 2 ranks: its gradient would not be all-reduced"):
        trainer.train_step(*trainer.prepare(x[:16], y[:16]))
    numpy.testing.assert_array_equal(model.flat_params, before)
    _, alone, _ = mpi_worker.setup(args, communicator=OneRank())
    alone.train_step(*alone.prepare(x[:16], y[:16]))  # a world of one is one process


def test_mid_epoch_checkpoint_needs_the_same_samples_per_step(tmp_path):
    args = mpi_worker.parse(["unused"])
    _, trainer, (x, y) = mpi_worker.setup(args, batch=32)
    trainer.fit(x, y, epochs=2, callbacks=[mpi_worker.StopAt(0, 0, 2)])
    trainer.save_checkpoint(tmp_path / "c.npz")
    assert checkpoint.read(tmp_path / "c.npz")[0]["trainer"]["batch_size"] == 32
    _, other, _ = mpi_worker.setup(args, batch=16)
    with pytest.raises(nn.CheckpointError, match="stopped in the middle of epoch 1 .* 32 samples per step, but "
                                                 "this run takes 16"):
        other.load_checkpoint(tmp_path / "c.npz")


# ----- 2 MPI ranks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    ["--optimizer", "sgd"],  # 203 samples: the last global batch of 11 splits 6 + 5
    # last global batch of 1: rank 1 adds zeros; 41 validation samples split 20 + 21, weighted by their count
    ["--optimizer", "adam", "--dropout", "0.3", "--n", "193", "--validation", "41"],
])
def test_two_ranks_train_like_one_process_on_the_double_batch(mpi, tmp_path, options):
    run = worker(2, tmp_path / "w.npz", "--batch", 16, *options)
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["ranks"] == 2 and result["identical"], "the ranks' weights differ"
    model, trainer = reference(options, batch=32)
    assert_same_weights(result["weights"], model.flat_params)
    numpy.testing.assert_allclose(result["history_loss"], trainer.history["loss"], rtol=1e-6)
    numpy.testing.assert_allclose(result["history_val_loss"], trainer.history.get("val_loss", []), rtol=1e-6)


def test_ranks_seeding_their_models_apart_draw_as_one_process(mpi, tmp_path):
    """Rank 1's model has a seed of its own (``seed=rank``, a habit): the ranks start from rank 0's weights and
    draw rank 0's Dropout masks too, so they train as one process does; rank 1 dropped with its own seed."""
    common = [sys.executable, WORKER, tmp_path / "w.npz", "--distributed", "--dropout", "0.3", "--epochs", 2]
    run = mpiexec(1, *common, ":", "-n", 1, *common, "--model-seed", 9, timeout=60)
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["identical"]
    model, _ = reference(["--dropout", "0.3", "--epochs", 2], batch=32)
    assert_same_weights(result["weights"], model.flat_params)


def test_a_rank_stopping_alone_stops_every_rank_and_resumes_in_one_process(mpi, tmp_path):
    """Rank 1 alone asks to stop mid-epoch (as a Ctrl-C seen by one process): every rank stops after
    the same step, and one process resumes the checkpoint on the same 32 samples per step."""
    options = ["--dropout", "0.3"]
    run = worker(2, tmp_path / "w.npz", *options, "--stop", 1, 1, 3, "--save", tmp_path / "c.npz")
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["interrupted"] and result["identical"] and result["epoch"] == 1
    state = checkpoint.read(tmp_path / "c.npz")[0]["trainer"]
    assert state["resume_point"]["step"] == 4 and state["batch_size"] == 32 and state["world_size"] == 2

    args = mpi_worker.parse(["unused", *options])
    model, trainer, (x, y) = mpi_worker.setup(args, batch=32)
    trainer.load_checkpoint(tmp_path / "c.npz")
    trainer.fit(x, y, epochs=3 - trainer.epoch)
    straight, straight_trainer = reference(options, batch=32)
    assert_same_weights(model.flat_params, straight.flat_params)
    numpy.testing.assert_allclose(trainer.history["loss"], straight_trainer.history["loss"], rtol=1e-6)


def test_one_process_checkpoint_resumes_on_two_ranks(mpi, tmp_path):
    options = ["--dropout", "0.3", "--optimizer", "adam"]
    args = mpi_worker.parse(["unused", *options])
    _, trainer, (x, y) = mpi_worker.setup(args, batch=32)
    trainer.fit(x, y, epochs=3, callbacks=[mpi_worker.StopAt(0, 1, 2)])
    assert trainer.interrupted
    trainer.save_checkpoint(tmp_path / "c.npz")
    run = worker(2, tmp_path / "w.npz", *options, "--resume", tmp_path / "c.npz")
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["identical"] and result["epoch"] == 3
    straight, _ = reference(options, batch=32)
    assert_same_weights(result["weights"], straight.flat_params)


@pytest.mark.parametrize("check_every, step", [(1, 5), (5, 6)])
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(mpi, tmp_path, check_every, step):
    """Rank 1 alone sees a NaN loss in step 5 of epoch 2: every rank raises TrainingDiverged at the
    same check, with the same finite weights (``check_every=5`` is the GPU strategy, run on the CPU)."""
    run = worker(2, tmp_path / "w.npz", "--nan", 1, 1, 4, "--check-every", check_every)
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["diverged"].tolist() == [[2, step, 1], [2, step, 1]]
    assert result["identical"] and numpy.isfinite(result["weights"]).all()


def test_cli_divergence_is_one_error_from_rank_0(mpi, tmp_path):
    run = mpiexec(2, *NNACCEL, "train", "--distributed", "--data", "synthetic", "--layers", "784,32,10", "--lr", "1e30",
                  "--quiet",
                  "--save", "c.npz", cwd=tmp_path, timeout=60)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert errors == ["nnaccel train: error: loss became nan at epoch 1, step 2; training stopped and kept the "
                      "weights from before that step (try a lower learning rate)"], run.stderr
    assert numpy.isfinite(checkpoint.load(tmp_path / "c.npz").flat_params).all()


@pytest.mark.parametrize("rank_1, differs", [
    (["--n", 200], "samples 200 (rank 0: 203)"),
    (["--epochs", 4], "last_epoch 4 (rank 0: 3)"),  # one rank would train on alone, waiting for ever
    (["--validation", 30], "validation_samples 30 (rank 0: None)"),  # one rank in an all-reduce the other never makes
    (["--no-shuffle"], "shuffle False (rank 0: True)"),
    # another optimizer broadcasts other state buffers: the ranks' collectives would not match (a hang)
    (["--optimizer", "adam"], f"optimizer {nn.Adam(lr=0.01).config()} (rank 0: {nn.SGD(lr=0.05, momentum=0.9).config()})"),
], ids=["other data", "other epochs", "validation on one rank", "no shuffle on one rank", "another optimizer"])
def test_ranks_given_different_runs_are_refused_by_every_rank(mpi, tmp_path, rank_1, differs):
    """Each rank must pass the whole training set and fit with the same settings: a rank that does not is
    named, in one error line, instead of a hang."""
    common = [sys.executable, WORKER, tmp_path / "w.npz", "--distributed"]
    run = mpiexec(1, *common, ":", "-n", 1, *common, *rank_1, timeout=60)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert errors == [f"mpi_worker: error: rank 1 does not train the same run as rank 0: {differs}; "
                      "every rank must pass the whole training set and the same settings"], run.stderr


def test_batchnorm_estimates_are_rank_0s_on_every_rank_after_each_epoch(mpi, tmp_path):
    """Each rank normalises its part of the batch by its own statistics (no SyncBatchNorm), but at each
    epoch's end, before validating, every rank takes rank 0's running estimates (DDP's broadcast_buffers):
    the ranks validate, stop early and save one model."""
    run = worker(2, tmp_path / "w.npz", "--batchnorm", "--validation", 40, "--n", 150)
    assert run.returncode == 0, run.stderr
    assert bool(numpy.load(tmp_path / "w.npz")["identical"])  # weights and buffers


@pytest.mark.parametrize("how, says", [
    ("raise", "RuntimeError: boom in step 3"),
    ("exit", "exited with status 3"),
    ("mpi-error", "error: MPI failed talking to the other ranks ("),  # then the MPI library's words for it
])
def test_a_failing_rank_ends_the_job_naming_it(mpi, tmp_path, how, says):
    run = worker(2, tmp_path / "w.npz", "--epochs", 1000, "--fail", 1, 3, how)  # a hang fails in mpiexec()
    assert run.returncode != 0
    assert f"mpi_worker: rank 1: {says}" in run.stderr, run.stderr
    if how == "mpi-error":
        assert re.search(r"\); another rank has probably died \(rank 0 pid \d+ on .*, rank 1 pid \d+ on .*\)\n",
                         run.stderr), run.stderr
    assert ("Traceback" in run.stderr) == (how == "raise")  # an MPI failure is one line, not a traceback
    assert not (tmp_path / "w.npz").exists()


def test_an_uncaught_error_in_a_script_ends_the_job_naming_the_rank(mpi, tmp_path):
    """A user's script, with no run_guarded around it: rank 1's exception must not leave rank 0 waiting."""
    run = worker(2, tmp_path / "w.npz", "--epochs", 1000, "--fail", 1, 3, "raise", "--unguarded")
    assert run.returncode == 1, run.stderr
    assert "RuntimeError: boom in step 3" in run.stderr, run.stderr
    assert re.search(r"^rank 1: uncaught RuntimeError; ending all 2 ranks \(rank 0 pid \d+ on .*, rank 1 pid \d+",
                     run.stderr, re.M), run.stderr
    assert not (tmp_path / "w.npz").exists()


def test_a_failing_rank_aborts_once_the_launcher_has_read_its_last_lines(monkeypatch):
    """MPI_Abort reaching hydra's proxy before the rank's last lines lost them (one run in 15): the rank
    waits until the pipe its stderr goes to is empty."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stderr", open(write_end, "w"))
    print("mpi_worker: rank 1: exited with status 3", file=sys.stderr, flush=True)  # as run_guarded prints
    unread, read, reader = [], [], threading.Thread(target=lambda: read.append(os.read(read_end, 100)))
    measure = distributed._unread_bytes

    def reading_after_the_first_look(fd, buffer):
        unread.append(measure(fd, buffer))
        if len(unread) == 1:
            reader.start()
        return unread[-1]

    monkeypatch.setattr(distributed, "ABORT_OUTPUT_WAIT_S", 600.0)
    monkeypatch.setattr(distributed, "_unread_bytes", reading_after_the_first_look)
    distributed._wait_until_read()
    reader.join()
    assert unread[0] == len("mpi_worker: rank 1: exited with status 3\n") and unread[-1] == 0
    assert read == [b"mpi_worker: rank 1: exited with status 3\n"]
    sys.stderr.close()
    os.close(read_end)


def test_output_to_a_file_or_a_pipe_nobody_reads_does_not_hold_an_abort_up(monkeypatch, tmp_path):
    looked = []
    monkeypatch.setattr(distributed, "_unread_bytes", lambda fd, buffer: looked.append(fd) or 0)
    with open(tmp_path / "err.txt", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        distributed._wait_until_read()
    assert looked == []  # a file is never waited for
    monkeypatch.undo()
    read_end, write_end = os.pipe()
    with open(write_end, "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(distributed, "ABORT_OUTPUT_WAIT_S", 0.05)
        stream.write("nobody reads this\n")
        distributed._wait_until_read()  # returns at the deadline: a launcher that reads nothing hangs no one
    os.close(read_end)


class _OddStream:
    """A stderr a script may have put in place: a descriptor that is not one, a flush that fails."""

    def fileno(self):
        return None

    def flush(self):
        raise RuntimeError("logger closed")


class _BrokenStream(_OddStream):
    def write(self, text):
        raise RuntimeError("logger closed")


def _rank_1_of_2(monkeypatch):
    """A World of rank 1 of 2 whose MPI_Abort records its code (no MPI here), and that list."""
    aborted = []
    here = distributed.World(type("Comm", (), {"Abort": lambda self, code: aborted.append(code)})(), 1, 2, 1, 2,
                             (("vm", 11), ("vm", 12)))
    monkeypatch.setattr(distributed, "_COMMUNICATORS", {})
    return here, aborted


def test_streams_without_a_descriptor_do_not_keep_the_job_from_ending(monkeypatch):
    here, aborted = _rank_1_of_2(monkeypatch)
    monkeypatch.setattr(sys, "stdout", _OddStream())
    monkeypatch.setattr(sys, "stderr", _OddStream())
    distributed._end_the_job(here, 3)
    assert aborted == [3]


def test_a_broken_stderr_does_not_keep_a_failing_rank_from_ending_the_job(monkeypatch):
    """Neither ``run_guarded``'s line nor the uncaught-error hook's may stand between a failure and MPI_Abort."""
    here, aborted = _rank_1_of_2(monkeypatch)
    monkeypatch.setattr(distributed, "world", lambda: here)
    monkeypatch.setattr(distributed, "mpi", lambda: type("MPI", (), {"Exception": type("Error", (Exception,), {})}))
    monkeypatch.setattr(sys, "stderr", _BrokenStream())

    def fails():
        raise ConfigError("bad option")

    assert distributed.run_guarded(fails) == 2 and aborted == [2]
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    distributed._end_the_job_on_uncaught_errors(here)
    with pytest.raises(RuntimeError, match="logger closed"):  # once MPI_Abort was called
        sys.excepthook(ValueError, ValueError("boom"), None)
    assert aborted == [2, 1]


@pytest.mark.parametrize("last, cause", [
    ("copy_iovs(224)....................................: process_vm_readv failed (errno 3)",
     ": process_vm_readv failed (errno 3)"),
    ("MPID_nem_tcp_connpoll(1845)......................: Communication error with rank 1: Connection reset by peer",
     ": Communication error with rank 1: Connection reset by peer"),
    ("MPIC_Wait(99).....................................:", ""),
])
def test_an_mpi_error_stack_is_told_in_one_line(last, cause):
    """MPICH's stack from rank 0's all-reduce when rank 1 was killed during it (the first case seen in CI)."""
    stack = RuntimeError("""Other MPI error, error stack:
internal_Allreduce_c(342).........................: MPI_Allreduce_c(sendbuf=MPI_IN_PLACE, recvbuf=0x561172ffd130, \
count=50890, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD) failed
MPID_Allreduce(483)...............................:
MPIDI_CMA_copy_data(68)...........................:
""" + last)
    here = distributed.World(None, 0, 2, 0, 2, (("vm", 11), ("vm", 12)))
    assert distributed._collective_failure(stack, here) == (
        f"MPI failed talking to the other ranks (Other MPI error{cause}); another rank has probably died "
        f"(rank 0 pid 11 on vm, rank 1 pid 12 on vm)")


def _lines(stream, into):
    for line in stream:
        into.put(line)


def _follow(stream):
    """A queue receiving the lines of ``stream`` as they come, and the thread that ends at its end."""
    lines = queue.Queue()
    reader = threading.Thread(target=_lines, args=(stream, lines), daemon=True)
    reader.start()
    return lines, reader


def _rest(lines, reader, seen):
    """All of the output once the stream has ended (every process holding it has exited)."""
    reader.join(timeout=TIMEOUT)
    assert not reader.is_alive(), "the job's output did not end after it exited:\n" + "".join(seen)
    while not lines.empty():
        seen.append(lines.get())
    return "".join(seen)


@pytest.mark.parametrize("quiet", [[], ["--quiet"]], ids=["", "quiet"])
def test_a_killed_rank_ends_the_job(mpi, tmp_path, quiet):
    """mpiexec names an ended process by pid; nnaccel's first line maps every pid to its rank (with
    --quiet too, which prints no epoch lines: the kill may come before training then)."""
    process = subprocess.Popen([MPIEXEC, "-n", "2", *NNACCEL, "train", "--distributed", "--data", "synthetic",
                                "--layers", "784,64,10", "--epochs", "1000", "--batch-size", "8", *quiet],
                               env=ENV, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, reader = _follow(process.stdout)  # hydra writes its BAD TERMINATION report to stdout: read both
    seen, pid, deadline = [], None, time.monotonic() + TIMEOUT
    try:
        while pid is None or not (quiet or any(line.startswith("epoch 1/") for line in seen)):
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
            match = re.search(r"rank 1 pid (\d+) on", seen[-1])
            pid = int(match.group(1)) if match else pid
        os.kill(pid, signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
    except (queue.Empty, subprocess.TimeoutExpired):
        _stop(process)
        pytest.fail("the job neither started nor ended in time:\n" + "".join(seen))
    text = _rest(lines, reader, seen)
    assert process.returncode != 0
    # Either mpiexec sees the kill first and names a process that ended (the killed one; or rank 0, which
    # its clean-up killed, where it reaped both before reporting: seen once in CI), or rank 0's all-reduce
    # fails first (on a loaded machine) and rank 0 says so in one line, or MPICH ends rank 0 itself: an error
    # it raises as fatal (reading the dead rank's memory through CMA, process_vm_readv's ESRCH, seen once on
    # a loaded machine) aborts whatever the communicator's error handler, so no Python code can catch it.
    # nnaccel's first line maps the pids to their ranks in every case.
    named = re.search(r"PID (\d+) RUNNING AT", text)
    assert f"rank 1 pid {pid} on" in text, text
    assert (named is not None and f"pid {named.group(1)} on" in text) or "rank 0: error: MPI failed" in text \
        or re.search(r"^Abort\(\d+\) on node 0 \(rank 0 in comm 0\): Fatal error in ", text, re.MULTILINE), text
    assert "Traceback" not in text, text


def test_cli_checkpoints_move_between_two_ranks_and_one_process(mpi, tmp_path, capsys, monkeypatch):
    common = ["--data", "synthetic", "--layers", "784,32,10", "--quiet", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)

    def single(*args):
        """One process's run: the command line's code in this one (no interpreter to start)."""
        code, out, err = in_process(capsys, "train", *common, *args)
        assert code == 0, err
        return out

    straight = single("--epochs", 2, "--batch-size", 64, "--save", "straight.npz")
    run = mpiexec(2, *NNACCEL, "train", "--distributed", *common, "--epochs", 1, "--batch-size", 32,
                  "--save", "two.npz", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 1 and json.loads(run.stdout)["epochs"] == 1  # rank 0 alone reports
    resumed = single("--resume", "two.npz", "--epochs", 2, "--save", "two-then-one.npz")
    assert resumed == straight

    single("--epochs", 1, "--batch-size", 64, "--save", "one.npz")
    run = mpiexec(2, *NNACCEL, "train", "--distributed", *common, "--resume", "one.npz", "--epochs", 2,
                  "--save", "one-then-two.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    expected = checkpoint.load(tmp_path / "straight.npz").flat_params
    for name in ("two-then-one.npz", "one-then-two.npz"):
        assert_same_weights(checkpoint.load(tmp_path / name).flat_params, expected)
        assert checkpoint.read(tmp_path / name)[0]["trainer"]["batch_size"] == 64


def test_cli_resume_needs_ranks_that_share_the_global_batch(mpi, tmp_path):
    model = nn.Sequential(nn.Dense(64, 32, activation="relu"), nn.Dense(32, 10))
    nn.Trainer(model, batch_size=64).save_checkpoint(tmp_path / "c.npz")
    run = mpiexec(3, *NNACCEL, "train", "--distributed", "--resume", "c.npz", cwd=tmp_path, timeout=60)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert errors == ["nnaccel train: error: c.npz trains 64 samples per step, which 3 ranks cannot share evenly; "
                      "resume it on a number of ranks that divides 64"], run.stderr


def _interrupt_job(command, signum, cwd):
    """Start ``command`` (an mpiexec job), send ``signum`` to mpiexec once epoch 1 is reported
    (hydra passes SIGINT and SIGTERM to the ranks); the job's whole stderr once it has exited."""
    process = subprocess.Popen(command, env=ENV, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines, reader = _follow(process.stderr)
    seen, deadline = [], time.monotonic() + TIMEOUT
    try:
        while not any(line.startswith("epoch 1/") for line in seen):
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        process.send_signal(signum)
        process.wait(timeout=TIMEOUT)
    except (queue.Empty, subprocess.TimeoutExpired):
        _stop(process)
        pytest.fail(f"the job did not stop on {signal.Signals(signum).name}:\n" + "".join(seen))
    text = _rest(lines, reader, seen)
    assert process.returncode == 128 + signum, text
    return text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_a_stop_signal_stops_every_rank_at_one_step_and_resumes_bit_for_bit(mpi, tmp_path, signum):
    """Ctrl-C, or the SIGTERM a batch scheduler sends, to ``mpiexec``: every rank stops at the same
    step, one checkpoint and one resume command; the resumed job ends with the weights of a job
    never interrupted, bit for bit."""
    epochs = 30  # about 25 ms each here: the signal comes after epoch 1 is reported, well before the end
    train = [MPIEXEC, "-n", "2", *NNACCEL, "train", "--distributed", "--data", "synthetic", "--layers", "784,32,10",
             "--device", "cpu", "--batch-size", "8", "--epochs", str(epochs)]
    text = _interrupt_job([*train, "--save", "c.npz"], signum, tmp_path)
    notes = [line for line in text.splitlines() if line.startswith("nnaccel train: interrupted by ")]
    assert len(notes) == 1 and notes[0].startswith(f"nnaccel train: interrupted by {signal.Signals(signum).name} "), text
    resume = notes[0].split("resume with: ")[1].split()
    assert resume[:6] == ["mpiexec", "-n", "2", "nnaccel", "train", "--distributed"] and "--resume" in resume
    state = checkpoint.read(tmp_path / "c.npz")[0]["trainer"]
    assert state["world_size"] == 2 and state["batch_size"] == 16 and 1 <= state["epoch"] < epochs
    run = mpiexec(2, *NNACCEL, *resume[4:], "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0 and f"after {epochs} epochs" in run.stdout, run.stderr
    straight = mpiexec(2, *train[3:], "--save", "straight.npz", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    (_, resumed), (_, expected) = checkpoint.read(tmp_path / "c.npz"), checkpoint.read(tmp_path / "straight.npz")
    assert sorted(resumed) == sorted(expected)
    for name in expected:
        numpy.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


def test_cli_user_error_on_every_rank_ends_the_job(mpi, tmp_path):
    run = mpiexec(2, *NNACCEL, "train", "--distributed", "--data", "synthetic", "--layers", "64,32,10", cwd=tmp_path,
                  timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert re.search(r"nnaccel train: rank [01]: error: --layers starts with 64 inputs", run.stderr), run.stderr


def test_cli_two_ranks_with_validation_split_0_train_like_one_process_on_every_sample(mpi, tmp_path):
    """No validation part on any rank: the ranks shard the whole train split and train as one process with
    twice the batch does, and rank 0 reports on the data trained on."""
    common = ["--data", "synthetic", "--layers", "784,32,10", "--quiet", "--device", "cpu", "--epochs", "1",
              "--validation-split", "0", "--json"]
    run = mpiexec(2, *NNACCEL, "train", "--distributed", *common, "--batch-size", 32, "--save", "two.npz",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    single = subprocess.run([*NNACCEL, "train", *common, "--batch-size", "64", "--save", "one.npz"], env=ENV,
                            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    two, one = json.loads(run.stdout), json.loads(single.stdout)
    assert two["split"] == one["split"] == "train" and two["accuracy"] == pytest.approx(one["accuracy"], abs=2e-3)
    assert_same_weights(checkpoint.load(tmp_path / "two.npz").flat_params,
                        checkpoint.load(tmp_path / "one.npz").flat_params)


def test_cli_an_option_every_rank_refuses_is_one_line_from_rank_0(mpi, tmp_path):
    run = mpiexec(2, *NNACCEL, "train", "--distributed", "--data", "synthetic", "--validation-split", "1",
                  "--device", "auto", cwd=tmp_path, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == ("nnaccel train: error: --validation-split must be at least 0 (no validation) and "
                                  "below 1, got 1.0"), run.stderr


def test_cli_device_auto_on_the_cpu_is_said_once_as_by_one_process(mpi, tmp_path):
    """--device auto that finds no GPU says so on rank 0, as a run of one process does (a distributed run
    said nothing)."""
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # auto is the CPU here, GPUs or not
    common = ["train", "--data", "synthetic", "--layers", "784,10", "--epochs", "1"]
    run = mpiexec(2, *NNACCEL, *common, "--distributed", cwd=tmp_path, env=env)
    single = subprocess.run([*NNACCEL, *common], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert run.returncode == 0 and single.returncode == 0, run.stderr + single.stderr
    said = [[line for line in err.splitlines() if line.startswith("device auto: training on the CPU (")]
            for err in (run.stderr, single.stderr)]
    assert len(said[0]) == 1 and said[0] == said[1], (run.stderr, single.stderr)


def test_info_reports_mpi_and_nccl(mpi):
    run = subprocess.run([*NNACCEL, "info"], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^MPI: mpi4py \S+, .*not launched by mpiexec", run.stdout, re.M), run.stdout
    assert re.search(r"^NCCL( not usable)?: ", run.stdout, re.M)
    run = mpiexec(2, *NNACCEL, "info", timeout=60)
    assert run.returncode == 0 and "launched with 2 process(es)" in run.stdout


# ----- NCCL: between the emulated GPUs (the stand-in's NCCL carries it over MPI), and real ones -------------
def test_nccl_ranks_train_like_one_process(mpi, cuda_device, tmp_path):
    env, ranks = _emulated_nccl(cuda_device)
    options = ["--optimizer", "adam", "--dropout", "0.3"]
    run = worker(ranks, tmp_path / "w.npz", "--device", "cuda", *options, env=env)
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["ranks"] == ranks and result["identical"]
    model, _ = reference(options, batch=16 * ranks)
    numpy.testing.assert_allclose(result["weights"], model.flat_params, rtol=1e-5,
                                  atol=1e-5 * float(numpy.abs(model.flat_params).max()))


def _emulated_nccl(cuda_device):
    """The environment of worker runs over NCCL between this machine's GPUs, emulated or real, and how
    many ranks that is (skipped where NCCL does not load)."""
    ok, text = distributed.nccl_status()
    if not ok:
        pytest.skip(text)
    import cupy

    env = {**ENV, "PYTHONPATH": EMULATED_ENV["PYTHONPATH"]} if cupy.__version__.endswith("standin") else ENV
    return env, cupy.cuda.runtime.getDeviceCount()


def test_nccl_ranks_replay_cuda_graphs_as_they_step_eagerly(mpi, cuda_device, tmp_path):
    """The graphs hold the all-reduce; 193 samples in global batches of 32 end with a batch of one
    row, which leaves a rank without rows: that step runs eagerly on every rank."""
    env, ranks = _emulated_nccl(cuda_device)
    options = ["--device", "cuda", "--optimizer", "adam", "--dropout", "0.3", "--n", "193"]
    runs = {}
    for mode in ("graphs", "eager"):
        out = tmp_path / f"{mode}.npz"
        run = worker(ranks, out, *options, *(["--no-cuda-graphs"] if mode == "eager" else []), env=env)
        assert run.returncode == 0, run.stderr
        runs[mode] = numpy.load(out)
        assert runs[mode]["identical"]
    steps = 3 * -(-193 // (16 * ranks))
    assert runs["eager"]["replays"] == 0  # every step replayed but the first (captured) and the 3 short ones:
    assert runs["graphs"]["replays"] == steps - 1 - 3
    numpy.testing.assert_array_equal(runs["graphs"]["weights"], runs["eager"]["weights"])


def test_a_capture_failing_on_one_rank_turns_graphs_off_on_every_rank(mpi, cuda_device, tmp_path):
    env, ranks = _emulated_nccl(cuda_device)
    options = ["--device", "cuda", "--dropout", "0.3"]
    run = worker(ranks, tmp_path / "broken.npz", *options, "--break-capture", ranks - 1, env=env)
    assert run.returncode == 0, run.stderr
    broken = numpy.load(tmp_path / "broken.npz")
    run = worker(ranks, tmp_path / "eager.npz", *options, "--no-cuda-graphs", env=env)
    assert run.returncode == 0, run.stderr
    assert broken["replays"] == 0 and broken["identical"]  # rank 0 captured, and stepped eagerly all the same
    numpy.testing.assert_array_equal(broken["weights"], numpy.load(tmp_path / "eager.npz")["weights"])


def test_a_nan_on_one_rank_stops_every_rank_replaying_graphs_at_the_same_check(mpi, cuda_device, tmp_path):
    """Rank 1's loss is NaN in step 5 of epoch 2, a replayed step: the running losses are summed over
    the ranks at each check, so both stop at the next check (step 6), with the same finite weights."""
    env, ranks = _emulated_nccl(cuda_device)
    run = worker(ranks, tmp_path / "w.npz", "--device", "cuda", "--nan", 1, 1, 4, "--check-every", 5, env=env)
    assert run.returncode == 0, run.stderr
    result = numpy.load(tmp_path / "w.npz")
    assert result["replays"] > 0
    assert result["diverged"].tolist() == [[2, 6, 1]] * ranks
    assert result["identical"] and numpy.isfinite(result["weights"]).all()
