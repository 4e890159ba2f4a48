"""Storage: a full disk, a folder that cannot be written, a --save that is a folder, and two
processes at one file. Each loses nothing: one line naming the path and the reason, the previous
checkpoint intact, no temporary file left; what can be known before training is refused before
the first epoch.

A full disk is a real one where this machine lets a test mount a small tmpfs in its own user and
mount namespace (``unshare -rm``, no root needed), and an ``OSError(ENOSPC)`` injected at each step
of a save everywhere. A read-only folder is a read-only mount there, and permissions where the
tests do not run as root (root writes through them).
"""

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import pytest

import nnaccel as nn
from nnaccel import checkpoint, cli
from command_line import NNACCEL, nnaccel

SMALL = ["train", "--data", "digits", "--device", "cpu", "--layers", "64,16,10", "--batch-size", "32", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _one_error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nnaccel train: error: "), lines
    return lines[0]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----- a full disk, injected ------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_enospc(handle, **arrays):
    handle.write(b"PK\x03\x04" + b"\0" * 1000)  # the start of a zip, as a full disk would cut it
    _enospc()


FAULTS = {"write": ("nnaccel.checkpoint.numpy.savez", _half_then_enospc),
          "fsync": ("nnaccel.checkpoint.os.fsync", _enospc),
          "rename": ("nnaccel.checkpoint.os.replace", _enospc),
          "temporary file": ("nnaccel.checkpoint.tempfile.mkstemp", _enospc)}


@pytest.mark.parametrize("where", FAULTS)
def test_a_disk_that_fills_mid_run_ends_with_one_line_and_the_last_checkpoint(tmp_path, monkeypatch, capsys, where):
    """Epoch 1's checkpoint is written; the disk is full at epoch 2's: exit 2, one line naming the
    file and the reason, epoch 1's checkpoint intact and loadable, no temporary file."""
    target, fault = FAULTS[where]
    monkeypatch.chdir(tmp_path)

    class FullAfterEpoch1(nn.ModelCheckpoint):
        def on_epoch_end(self, trainer, logs):
            if logs["epoch"] == 2:
                monkeypatch.setattr(target, fault)
            super().on_epoch_end(trainer, logs)

    monkeypatch.setattr(cli, "ModelCheckpoint", FullAfterEpoch1)
    assert cli.main([*SMALL, "--epochs", "3", "--save", "ck.npz"]) == 2
    monkeypatch.undo()
    line = _one_error_line(capsys)
    assert line == "nnaccel train: error: cannot write ck.npz: No space left on device; the previous file is intact"
    assert checkpoint.read(tmp_path / "ck.npz")[0]["trainer"]["epoch"] == 1
    assert nn.load(tmp_path / "ck.npz").num_parameters() == 64 * 16 + 16 + 16 * 10 + 10
    assert _leftovers(tmp_path) == []


def test_a_full_disk_on_the_first_save_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr("nnaccel.checkpoint.numpy.savez", _half_then_enospc)
    model = nn.Sequential(nn.Dense(4, 3))
    with pytest.raises(nn.OutputError, match=r"cannot write .*m\.npz: No space left on device$"):
        model.save(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_full_disk_leaves_no_half_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    nn.Sequential(nn.Dense(4, 3)).save(tmp_path / "m.npz")
    monkeypatch.setattr("nnaccel.checkpoint.os.fsync", _enospc)
    assert cli.main(["export", str(tmp_path / "m.npz"), str(tmp_path / "m.onnx")]) == 2
    assert "cannot write" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


def test_a_csv_log_on_a_full_disk_names_the_file_and_keeps_its_whole_rows(tmp_path, monkeypatch, capsys):
    """The disk fills in the middle of epoch 2's row: one line naming the log, which keeps its header and
    epoch 1's row and no piece of epoch 2's (a resumed run appends after it)."""
    monkeypatch.chdir(tmp_path)
    real_write = os.write

    class FullAfterEpoch1(nn.CSVLogger):
        def on_epoch_end(self, trainer, logs):
            if logs["epoch"] == 2:
                def half_then_full(fd, data):
                    real_write(fd, bytes(data[:len(data) // 2]))
                    _enospc()

                monkeypatch.setattr("nnaccel.callbacks.os.write", half_then_full)
            super().on_epoch_end(trainer, logs)

    monkeypatch.setattr(cli, "CSVLogger", FullAfterEpoch1)
    assert cli.main([*SMALL, "--epochs", "3", "--csv", "log.csv"]) == 2
    monkeypatch.undo()
    assert _one_error_line(capsys) == "nnaccel train: error: cannot write the CSV log log.csv: No space left on device"
    header, *rows = (tmp_path / "log.csv").read_text().splitlines()
    assert header.startswith("epoch,") and [row.split(",")[0] for row in rows] == ["1"]
    assert len(rows[0].split(",")) == len(header.split(","))


def test_bench_json_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "b.json").write_text('{"results": []}\n')
    monkeypatch.setattr("nnaccel.checkpoint.os.fsync", _enospc)
    assert cli.main(["bench", "--quick", "--devices", "cpu", "--networks", "784-10", "--batches", "2",
                     "--json", str(tmp_path / "b.json")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"nnaccel bench: error: cannot write {tmp_path / 'b.json'}: No space left on device; the previous file is intact"
    assert (tmp_path / "b.json").read_text() == '{"results": []}\n' and _leftovers(tmp_path) == []


# ----- refused before the first epoch ---------------------------------------------------------
def _no_data_read(monkeypatch):
    """Fail the test if training reads its data: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the output path was checked")

    monkeypatch.setattr(cli.datasets, "load", refuse)


@pytest.mark.parametrize("option, path, message", [
    ("--save", ".", "--save . is a folder; name a file in it, such as model.npz"),
    ("--save", "no/such/ck.npz", "cannot write --save no/such/ck.npz: folder no/such does not exist"),
    ("--csv", "no/such/log.csv", "cannot write --csv no/such/log.csv: folder no/such does not exist"),
    ("--csv", ".", "--csv . is a folder; name a file in it, such as log.csv"),
])
def test_an_output_path_that_cannot_work_is_refused_before_training(tmp_path, monkeypatch, capsys, option, path,
                                                                     message):
    monkeypatch.chdir(tmp_path)
    _no_data_read(monkeypatch)
    assert cli.main([*SMALL, option, path]) == 2
    assert _one_error_line(capsys) == f"nnaccel train: error: {message}"


def test_an_output_in_a_folder_that_is_a_file_says_it_is_a_file(tmp_path, monkeypatch, capsys):
    """``--save notes/ck.npz`` with ``notes`` a file: not "folder notes does not exist", which it does."""
    monkeypatch.chdir(tmp_path)
    _no_data_read(monkeypatch)
    Path("notes").write_text("a file")
    for option in ("--save", "--csv"):
        assert cli.main([*SMALL, option, "notes/out"]) == 2
        assert _one_error_line(capsys) == f"nnaccel train: error: cannot write {option} notes/out: notes is a " \
                                          f"file, not a folder"
    with pytest.raises(nn.OutputError, match="^cannot write notes/m.npz: notes is a file, not a folder$"):
        nn.Sequential(nn.Dense(4, 2)).save("notes/m.npz")


def test_a_save_to_a_name_ending_in_a_slash_writes_no_file(tmp_path):
    """``model.save("runs/")``, as ``open`` does, is a folder's name: not a file named ``runs``."""
    model = nn.Sequential(nn.Dense(4, 2))
    for save in (model.save, nn.Trainer(model).save_checkpoint):
        with pytest.raises(nn.OutputError, match=r"file .*runs/ names a folder \(it ends in '/'\), and there is none"):
            save(f"{tmp_path}/runs/")
        assert not list(tmp_path.iterdir())


def test_an_empty_file_name_is_refused_as_one(tmp_path, monkeypatch):
    """``model.save("")`` (a variable left empty) is no name, as ``open("")`` says: not "cannot write .: Device
    or resource busy" from a rename over the working folder, which ``Path("")`` is; nor, on load, "checkpoint
    . is a folder"."""
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Dense(4, 2))
    trainer = nn.Trainer(model, quiet=True)
    for save in (model.save, trainer.save_checkpoint):
        with pytest.raises(nn.OutputError, match="^file '' is an empty file name; name a file to write$"):
            save("")
    with pytest.raises(nn.OutputError, match="^ModelCheckpoint path '' is an empty file name"):
        trainer.fit(numpy.zeros((4, 4)), [0, 1, 0, 1], callbacks=[nn.ModelCheckpoint("", monitor="loss")])
    for load in (nn.load, trainer.load_checkpoint):
        with pytest.raises(nn.CheckpointError, match="^checkpoint '' is an empty file name; name a checkpoint file$"):
            load("")
    assert not list(tmp_path.iterdir())


def test_a_symbolic_link_is_checked_where_it_leads_before_training(tmp_path, monkeypatch, capsys):
    """A link into a purged scratch folder, or a loop of links, fails before the data is read, not after
    the first epoch (or as a traceback)."""
    monkeypatch.chdir(tmp_path)
    _no_data_read(monkeypatch)
    Path("ck.npz").symlink_to("scratch/gone/ck.npz")
    Path("log.csv").symlink_to("scratch/gone/log.csv")
    Path("loop1").symlink_to("loop2")
    Path("loop2").symlink_to("loop1")
    gone = tmp_path.resolve() / "scratch" / "gone"
    for option, path, message in [
            ("--save", "ck.npz", f"cannot write --save ck.npz (a link to {gone / 'ck.npz'}): folder {gone} does not exist"),
            ("--csv", "log.csv", f"cannot write --csv log.csv (a link to {gone / 'log.csv'}): folder {gone} does not "
                                 f"exist"),
            ("--save", "loop1", "cannot write --save loop1: it is a symbolic link that leads round in a loop")]:
        assert cli.main([*SMALL, option, path]) == 2
        assert _one_error_line(capsys) == f"nnaccel train: error: {message}"


def test_a_device_pipe_or_socket_is_not_replaced_by_a_file(tmp_path, monkeypatch, capsys):
    """The rename that writes a file would replace what is there: a FIFO stands for /dev/null here."""
    monkeypatch.chdir(tmp_path)
    _no_data_read(monkeypatch)
    os.mkfifo("pipe")
    assert cli.main([*SMALL, "--save", "pipe"]) == 2
    assert _one_error_line(capsys) == ("nnaccel train: error: cannot write --save pipe: it exists and is not a regular "
                                       "file (a device, pipe or socket); name a new file or a regular one")
    with pytest.raises(nn.OutputError, match="cannot write file pipe: it exists and is not a regular file"):
        checkpoint.atomic_write("pipe", lambda handle: handle.write(b"x"))
    assert stat.S_ISFIFO(os.stat("pipe").st_mode) and os.listdir() == ["pipe"]
    with pytest.raises(nn.CheckpointError, match=r"^checkpoint pipe is not a regular file \(a device, pipe or socket"):
        nn.load("pipe")  # (not "does not exist"; and not opened, which would wait for a writer)


@pytest.mark.parametrize("path, message", [
    ("no/such/ck-{epoch}.npz", "cannot write ModelCheckpoint path no/such/ck-3.npz: folder no/such does not exist"),
    (".", "ModelCheckpoint path . is a folder; name a file in it, such as model.npz"),
    ("pipe", "cannot write ModelCheckpoint path pipe: it exists and is not a regular file"),
])
def test_a_model_checkpoint_that_cannot_be_written_is_refused_before_a_step(tmp_path, monkeypatch, path, message):
    """In Python, as ``--save`` is: a fit with a ModelCheckpoint into a missing folder (the file its next epoch
    writes, 3 after two), a folder or a pipe trains no step before the OutputError, not a whole epoch."""
    monkeypatch.chdir(tmp_path)
    os.mkfifo("pipe")
    x, y = numpy.random.default_rng(0).standard_normal((64, 4)), numpy.arange(64) % 2
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 2)), batch_size=16, quiet=True)
    trainer.fit(x, y, epochs=2)
    weights = trainer.model.flat_params.copy()
    with pytest.raises(nn.OutputError, match=f"^{re.escape(message)}"):
        trainer.fit(x, y, epochs=1, callbacks=[nn.ModelCheckpoint(path, monitor="loss")])
    assert trainer.epoch == 2 and trainer.optimizer.steps == 8
    numpy.testing.assert_array_equal(trainer.model.flat_params, weights)
    assert sorted(os.listdir()) == ["pipe"]


def test_a_folder_that_refuses_files_is_found_before_training(tmp_path, monkeypatch, capsys):
    """Injected: the folder refuses new files (EACCES), as a read-only share does for everyone."""
    monkeypatch.chdir(tmp_path)
    _no_data_read(monkeypatch)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert cli.main([*SMALL, "--save", "ck.npz"]) == 2
    assert _one_error_line(capsys) == "nnaccel train: error: cannot write --save ck.npz: Permission denied (folder .)"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_a_folder_without_write_permission_is_found_before_training(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        run = nnaccel(*SMALL, "--save", folder / "ck.npz", env=ENV)
    finally:
        folder.chmod(0o700)
    assert run.returncode == 2 and f"cannot write --save {folder / 'ck.npz'}: Permission denied" in run.stderr


def test_no_writable_working_folder_warns_that_an_interrupt_would_have_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_mkstemp = tempfile.mkstemp

    def denied_here(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == str(tmp_path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied_here)
    assert cli.main([*SMALL[:-1], "--epochs", "1"]) == 0
    assert "warning: cannot write the interrupted-run checkpoint nnaccel-interrupted.npz: Permission denied" \
           in capsys.readouterr().err


# ----- a real full disk and a read-only folder: a small tmpfs of our own --------------------------
def _can_mount():
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs here: {probe.stderr.strip()}"


NO_MOUNT = _can_mount()
needs_mount = pytest.mark.skipif(NO_MOUNT is not None, reason=str(NO_MOUNT))
MID = ["-m", "nnaccel.cli", "train", "--data", "digits", "--device", "cpu", "--layers", "64,256,10",
       "--batch-size", "32", "--quiet"]
CHECK = ("import sys; from nnaccel import checkpoint; print('epoch', "
         "checkpoint.read(sys.argv[1])[0]['trainer']['epoch'])")


def _in_a_tmpfs(tmp_path, size, options, *args, then=""):
    """``python ARGS`` (``-m nnaccel.cli ...``) with a tmpfs of ``size`` at tmp_path/disk (mounted
    ``options``), then ``then``, all in a private mount namespace; (its returncode, stdout and stderr of it all)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "$0" && mount -o remount,{options} "$0" && '
              f'python="$1"; shift; "$python" "$@"; echo "rc=$?"; ls -a "$0"; {then}')
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(disk), sys.executable, *args],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    rc = int(run.stdout.split("rc=")[1].split()[0])
    return rc, run.stdout, run.stderr


FILLING = """
import sys
import nnaccel as nn
x, y = nn.datasets.load("digits")
trainer = nn.Trainer(nn.Sequential(nn.Dense(64, 256, activation="relu"), nn.Dense(256, 10)),
                     optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=32, quiet=True)
trainer.fit(x, y, epochs=3, callbacks=[nn.ModelCheckpoint(sys.argv[1])])
"""


@needs_mount
def test_a_real_full_tmpfs_keeps_the_last_checkpoint(tmp_path):
    """240 KiB: room for one checkpoint of 64-256-10 with momentum (about 160 KiB), not two: epoch 2's
    cannot be written beside epoch 1's (a library run: the command line refuses such a disk before training)."""
    rc, out, err = _in_a_tmpfs(tmp_path, "240k", "rw", "-c", FILLING, str(tmp_path / "disk/ck.npz"),
                               then=f'"{sys.executable}" -c "{CHECK}" "$0/ck.npz"')
    assert rc == 1, err
    assert f"nnaccel.errors.OutputError: cannot write {tmp_path / 'disk/ck.npz'}: No space left on device; the " \
           f"previous file is intact" in err.splitlines()
    assert "epoch 1" in out.splitlines()  # epoch 1's checkpoint, readable
    assert [name for name in out.splitlines() if name.endswith(".tmp")] == []


@needs_mount
@pytest.mark.parametrize("size, needs", [("64k", ""),
                                         ("240k", " (and as much again while each epoch's replaces the last)")],
                         ids=["not one", "one, not two"])
def test_a_tmpfs_too_small_for_the_checkpoints_is_refused_before_training(tmp_path, size, needs):
    rc, out, err = _in_a_tmpfs(tmp_path, size, "rw", *MID, "--epochs", "3", "--save", str(tmp_path / "disk/ck.npz"))
    assert rc == 2 and "epoch 1/" not in err
    assert re.search(rf"cannot write --save {re.escape(str(tmp_path / 'disk/ck.npz'))}: "
                     rf"{re.escape(str(tmp_path / 'disk'))} has 0\.\d MiB free, and the file takes about 0\.2 MiB"
                     rf"{re.escape(needs)}$", err, re.M), err


@needs_mount
def test_a_run_that_writes_one_checkpoint_needs_room_for_one(tmp_path):
    rc, out, err = _in_a_tmpfs(tmp_path, "240k", "rw", *MID, "--epochs", "1", "--save", str(tmp_path / "disk/ck.npz"),
                               then=f'"{sys.executable}" -c "{CHECK}" "$0/ck.npz"')
    assert rc == 0 and "epoch 1" in out.splitlines(), (out, err)


@needs_mount
def test_a_checkpoint_there_counts_towards_the_room_for_two(tmp_path):
    """Resuming onto a disk that holds the checkpoint (160 KiB) and room for one more, not two: the run
    may go on, as the new file replaces the one there."""
    save = ["--save", str(tmp_path / "disk/ck.npz")]
    rc, out, err = _in_a_tmpfs(tmp_path, "400k", "rw", *MID, "--epochs", "1", *save,
                               then=f'head -c 40k /dev/zero > "$0/filler" && "{sys.executable}" -m nnaccel.cli '
                                    f'{" ".join(MID[2:])} --epochs 3 --resume "$0/ck.npz" {" ".join(save)} && '
                                    f'"{sys.executable}" -c "{CHECK}" "$0/ck.npz"')
    assert rc == 0 and "epoch 3" in out.splitlines(), (out, err)  # two epochs left: each replaces the last


@needs_mount
def test_a_read_only_folder_is_refused_before_training(tmp_path):
    rc, out, err = _in_a_tmpfs(tmp_path, "1m", "ro", *MID, "--save", str(tmp_path / "disk/ck.npz"))
    assert rc == 2 and "epoch 1/" not in err
    assert f"cannot write --save {tmp_path / 'disk/ck.npz'}: Read-only file system (folder {tmp_path / 'disk'})" in err


# ----- two processes, one file ----------------------------------------------------------------
WRITER = """
import sys
import nnaccel as nn
path, tag, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
model = nn.Sequential(nn.Dense(64, 256), nn.Dense(256, 10), seed=0)
for i in range(count):
    model.flat_params[...] = tag + i
    model.save(path)
"""


def test_two_writers_and_a_reader_always_see_one_whole_checkpoint(tmp_path):
    """Two processes save 40 checkpoints each to one file while this one loads it over and over:
    every load is one whole checkpoint (every weight from the same save), never a mixture or an
    error, and the file left is one writer's last. The rename is atomic and an open file keeps the
    contents it had: last writer wins, and a reader sees the file before or after a save."""
    path, count = tmp_path / "shared.npz", 40
    first = nn.Sequential(nn.Dense(64, 256), nn.Dense(256, 10), seed=0)
    first.flat_params[...] = 0.0
    first.save(path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tag), str(count)], env=ENV)
               for tag in (1000.0, 2000.0)]
    expected = {0.0} | {tag + i for tag in (1000.0, 2000.0) for i in range(count)}
    reads = 0
    try:
        while reads < 5 or any(writer.poll() is None for writer in writers):
            weights = nn.load(path).flat_params
            assert numpy.all(weights == weights[0]) and float(weights[0]) in expected, "a mixed checkpoint"
            reads += 1
    finally:
        for writer in writers:
            writer.wait(timeout=300)
    assert [writer.returncode for writer in writers] == [0, 0]
    assert float(nn.load(path).flat_params[0]) in {1000.0 + count - 1, 2000.0 + count - 1}
    assert _leftovers(tmp_path) == []


def test_two_training_runs_saving_to_one_file_leave_a_checkpoint_that_resumes(tmp_path):
    """Two ``nnaccel train --save same.npz`` at once: the file is always one run's whole checkpoint
    (whichever saved last), and it resumes."""
    runs = [subprocess.Popen([*NNACCEL, *SMALL, "--epochs", "4", "--seed", str(seed),
                              "--save", "same.npz"], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
        run.stderr.close()
    meta = checkpoint.read(tmp_path / "same.npz")[0]
    assert meta["trainer"]["seed"] in (1, 2) and meta["trainer"]["epoch"] == 4
    resumed = nnaccel("train", "--resume", "same.npz", "--data", "digits", "--epochs", "5", "--device", "cpu",
                      "--quiet", "--save", "same.npz", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.read(tmp_path / "same.npz")[0]["trainer"]["epoch"] == 5
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_written_file_has_the_permissions_open_would_give(tmp_path, umask):
    """Not mkstemp's 0600: a checkpoint others in the group may read where the umask lets them."""
    previous = os.umask(umask)
    try:
        checkpoint.atomic_write(tmp_path / "m.npz", lambda handle: handle.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == 0o666 & ~umask


def test_an_overwritten_file_keeps_its_permissions(tmp_path):
    """As open(path, "w") does: a checkpoint made private stays private when saved again."""
    path = tmp_path / "m.npz"
    checkpoint.atomic_write(path, lambda handle: handle.write(b"x"))
    os.chmod(path, 0o600)
    checkpoint.atomic_write(path, lambda handle: handle.write(b"y"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"y"
