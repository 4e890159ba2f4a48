"""The command line: the README's main job works, user errors are one line and non-zero."""

import json
import subprocess
import sys

import pytest


def nnaccel(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nnaccel.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_train_with_no_arguments_works(tmp_path):
    """The README's first command: `nnaccel train` on the shipped digits (20 epochs)."""
    run = nnaccel("train", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "epoch 20/20" in run.stderr and "on cpu" in run.stderr
    accuracy = float(run.stdout.split("validation accuracy")[1].split()[0])
    assert accuracy >= 0.96


def test_train_save_evaluate_json(tmp_path):
    model = tmp_path / "m.npz"
    run = nnaccel("train", "--epochs", 3, "--layers", "64,32,10", "--save", model, "--json", "--quiet",
                  "--plot", tmp_path / "curves.png", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["epochs"] == 3 and 0.5 < result["accuracy"] <= 1.0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    run = nnaccel("evaluate", model, "--data", "digits", "--split", "test", "--json")
    assert run.returncode == 0, run.stderr
    assert set(json.loads(run.stdout)) == {"accuracy", "loss"}
    run = nnaccel("evaluate", model)
    assert run.returncode == 0 and "test accuracy" in run.stdout


def test_evaluate_real_mnist_train_split(tmp_path, mnist_path):
    model = tmp_path / "m.npz"
    run = nnaccel("train", "--data", mnist_path, "--epochs", 1, "--layers", "784,32,10", "--save", model, "--quiet")
    assert run.returncode == 0, run.stderr
    run = nnaccel("evaluate", model, "--data", mnist_path, "--split", "train", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["accuracy"] > 0.8


@pytest.mark.parametrize("args, message", [
    (["train", "--epochs", "0"], "--epochs: must be a positive integer"),
    (["train", "--batch-size", "-3"], "--batch-size: must be a positive integer"),
    (["train", "--lr", "0"], "--lr: must be a positive number"),
    (["train", "--layers", "64,32"], "ends with 32 outputs but the data has 10 classes"),
    (["train", "--layers", "784,32,10"], "starts with 784 inputs but the data has 64 features"),
    (["train", "--activation", "swishy"], "unknown activation 'swishy'; valid: linear, relu"),
    (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--data", "no/such/folder"], "no/such/folder"),
    (["evaluate", "missing.npz"], "checkpoint missing.npz does not exist"),
    (["train", "--save", "no/such/dir/m.npz", "--epochs", "1"], "folder no/such/dir does not exist"),
    (["train", "--plot", "curves.xyz"], "--plot curves.xyz: cannot draw a '.xyz' file; use one of"),
    (["train", "--plot", "no/such/dir/c.png"], "--plot no/such/dir/c.png: folder no/such/dir does not exist"),
    (["train", "--layers", "64,10", "--activation", "bogus"], "unknown activation 'bogus'"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    run = nnaccel(*args, cwd=tmp_path)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_info():
    run = nnaccel("info")
    assert run.returncode == 0 and "nnaccel" in run.stdout and "numpy" in run.stdout
    assert "resolves to" in run.stdout
