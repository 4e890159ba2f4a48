"""Nonsense numbers: every numeric option of every command refuses NaN, infinities, zero or negative sizes
where they make no sense, and sizes beyond what the data allows, in one line that names the option and
its valid range (exit code 2, no traceback).

Ranges: --validation-split in [0, 1) (0: no validation) and, above 0, holding out 1 to N-1 of the N samples;
--dropout, --momentum and each of --betas in [0, 1); --gamma in (0, 1]; --lr and --eps > 0; --weight-decay,
--min-delta and --eta-min >= 0 (and --eta-min below the learning rate for the cosine schedule); --epochs,
--batch-size, --step-size >= 1 (the batch at most the training samples); --early-stopping >= 0 (Keras's patience);
--seed 0 to 2**32 - 1; --augment from 0 to below half the image's side; the numbers in --layers as each layer
takes them. The library stays as permissive as PyTorch (a batch larger than the data trains one short batch,
SGD takes momentum >= 1); the command line does not.
"""

import json

import numpy
import pytest

import nnaccel as nn
from nnaccel import checkpoint, cli
from nnaccel.errors import check_range, describe_range
from command_line import nnaccel

TRAIN = ["train", "--data", "synthetic", "--layers", "784,10", "--epochs", "1", "--device", "cpu", "--quiet"]
SYNTHETIC, HELD_OUT, TRAIN_SAMPLES = 1024, 205, 819  # the synthetic set; round(0.2 * 1024) held out
NAN, INF = float("nan"), float("inf")


def _exit_code(argv):
    """The exit code of ``nnaccel ARGV``, run in this process: argparse's refusals exit, the commands return."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def _refused(capsys, argv, *expected):
    """Exit code 2 and one error line on stderr, ``nnaccel COMMAND: error: ...``, holding each ``expected``
    (bench's progress lines may come before it)."""
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert lines[0].startswith(f"nnaccel {argv[0]}: error: ")
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ----- the options' own ranges, refused by argparse before anything loads -----------------------------
# up to the 2**63 - 1 a checkpoint reads back: a larger --epochs trained, and no command opened its checkpoints
POSITIVE_INT = f"must be a positive integer up to {2**63 - 1}"
SIZES = [(option, value, POSITIVE_INT) for option in ("--epochs", "--batch-size", "--step-size")
         for value in ("0", "-1", str(2**63), "99999999999999999999")]
SIZES += [("--early-stopping", value, f"must be a non-negative integer up to {2**63 - 1}") for value in ("-1", str(2**63))]
SIZES += [(option, value, f"expected a positive integer up to {2**63 - 1}") for option in ("--epochs", "--batch-size")
          for value in ("nan", "inf", "-inf", "1.5")]
FLOATS = [
    *[("--lr", value, "must be a positive number (finite, > 0)") for value in ("nan", "inf", "-inf", "0", "-0.1",
                                                                             "1e400")],
    *[("--momentum", value, "must be a finite number >= 0 and < 1") for value in ("nan", "inf", "-inf", "-0.5",
                                                                                 "1", "5")],
    *[("--dropout", value, "must be a finite number >= 0 and < 1") for value in ("nan", "inf", "-inf", "-0.1",
                                                                                "1")],
    *[("--weight-decay", value, "must be a finite number >= 0") for value in ("nan", "inf", "-inf", "-1e-3")],
    *[("--gamma", value, "must be a finite number > 0 and <= 1") for value in ("nan", "inf", "-inf", "0", "-0.5",
                                                                              "1.5")],
    *[("--eta-min", value, "must be a finite number >= 0") for value in ("nan", "inf", "-inf", "-1")],
    *[("--seed", value, "must be a non-negative integer up to 4294967295") for value in ("-1", str(2**32),
                                                                                        str(10**30))],
    ("--seed", "nan", "expected a non-negative integer up to 4294967295"),
    *[("--augment", value, "expected a non-negative integer") for value in ("nan", "inf", "1.5")],
    ("--augment", "-1", "must be a non-negative integer"),
    ("--validation-split", "abc", "expected a finite number >= 0 and < 1"),  # its range: with the data, below
    *[("--min-delta", value, "must be a finite number >= 0") for value in ("nan", "inf", "-0.1")],
    *[("--eps", value, "must be a positive number (finite, > 0)") for value in ("nan", "inf", "0", "-1e-8")],
    *[("--betas", value, "expected two numbers B1,B2, each >= 0 and < 1, such as Adam's default 0.9,0.999") for value
      in ("1,0.999", "0.9,-0.1", "nan,0.9", "0.9,inf", "0.9", "0.9,0.99,0.999", "a,b")],
]


def test_early_stopping_0_is_keras_patience_0_as_in_the_python_api(capsys, tmp_path, monkeypatch):
    """--early-stopping 0 is EarlyStopping(patience=0), Keras's default: it stops at the first epoch without
    improvement, where 1 does (it was refused, while the Python API and Keras take it)."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "digits", "--device", "cpu", "--layers", "64,16,10", "--batch-size", "32", "--lr", "1",
            "--epochs", "10", "--json"]
    stopped = {}
    for patience in ("0", "1"):
        assert cli.main([*argv, "--early-stopping", patience, "--save", f"p{patience}.npz"]) == 0
        err, out = capsys.readouterr()[::-1]
        assert f"(patience {patience})" in err, err
        stopped[patience] = json.loads(out)
    assert stopped["0"] == stopped["1"] and stopped["0"]["epochs"] < 10
    assert checkpoint.read(tmp_path / "p0.npz")[0]["trainer"]["early_stopping"][0]["monitor"] == "val_loss"


@pytest.mark.parametrize("option, value, expected", SIZES + FLOATS, ids=[f"{o} {v}" for o, v, _ in SIZES + FLOATS])
def test_train_refuses_nonsense_numbers_with_the_range(option, value, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, [*TRAIN, option, value], f"argument {option}: {expected}, got", value)
    assert "expected one argument" not in line  # '-inf' and '-1e-3' are values, not option names


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "1", "-0.5", "1.5"])
def test_evaluate_refuses_a_validation_split_outside_0_1(value, capsys):
    _refused(capsys, ["evaluate", "missing.npz", "--validation-split", value],
             "argument --validation-split: must be a finite number > 0 and < 1, got", value)


BENCH_COUNTS = [["--rounds"], ["--steps"], ["--threads"], ["--epochs", "--fit"]]  # --epochs is --fit's
BENCH_UP_TO = {"--threads": " up to 1024"}  # the counts with a maximum, as their range says it


@pytest.mark.parametrize("option", BENCH_COUNTS, ids=lambda option: option[0])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5"])
def test_bench_refuses_counts_that_are_not_integers(option, value, capsys):
    up_to = BENCH_UP_TO.get(option[0], "")
    _refused(capsys, ["bench", "--quick", option[0], value, *option[1:]],
             f"argument {option[0]}: expected a positive integer{up_to}, got")


@pytest.mark.parametrize("option", BENCH_COUNTS, ids=lambda option: option[0])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bench_refuses_counts_below_1_as_argparse_refuses_the_rest(option, value, capsys):
    """In argparse's form, as every other option's range: ``argument --steps: must be ...`` and the hint."""
    line = _refused(capsys, ["bench", "--quick", option[0], value, *option[1:]])
    up_to = BENCH_UP_TO.get(option[0], "")
    assert line == (f"nnaccel bench: error: argument {option[0]}: must be a positive integer{up_to}, got {value} "
                    f"(see 'nnaccel bench --help')")


@pytest.mark.parametrize("value", ["1025", str(2**63), "99999999999999999999"])
def test_bench_refuses_more_threads_than_openmp_survives(value, capsys):
    """Thousands of threads crashed PyTorch's OpenMP (a segfault, a 400 GB allocation) and threadpoolctl
    (an integer overflow); a 2**32 + 1 was taken and shown as such."""
    line = _refused(capsys, ["bench", "--quick", "--threads", value])
    assert line == (f"nnaccel bench: error: argument --threads: must be a positive integer up to 1024, got {value} "
                    f"(see 'nnaccel bench --help')")


def test_bench_sizes_beyond_memory_are_one_line(capsys):
    # 784 x 10**14 float64 weights: beyond any address space (2**57 bytes), within numpy's size limit (2**63)
    _refused(capsys, ["bench", "--quick", "--devices", "cpu", "--networks", f"784-{10**14}-10"],
             "does not fit in memory", "--networks")


# ----- ranges that depend on the data or on other options, checked once the data is loaded --------------
BEYOND_THE_DATA = [
    (["--batch-size", str(TRAIN_SAMPLES + 1)],
     f"--batch-size must be a positive integer up to {TRAIN_SAMPLES} (the {TRAIN_SAMPLES} training samples), "
     f"got {TRAIN_SAMPLES + 1}"),
    (["--batch-size", "100000"], f"up to {TRAIN_SAMPLES}"),
    (["--validation-split", "0.0001"],
     f"--validation-split 0.0001 holds out 0 of the {SYNTHETIC} samples: it must be from 1/{SYNTHETIC} to "
     f"{SYNTHETIC - 1}/{SYNTHETIC}"),
    (["--validation-split", "0.9999"], f"holds out {SYNTHETIC} of the {SYNTHETIC} samples"),
    (["--validation-split", "nan"], "--validation-split must be at least 0 (no validation) and below 1, got nan"),
    (["--validation-split", "inf"], "--validation-split must be at least 0 (no validation) and below 1, got inf"),
    (["--validation-split", "1"], "--validation-split must be at least 0 (no validation) and below 1, got 1.0"),
    (["--validation-split=-0.5"], "--validation-split must be at least 0 (no validation) and below 1, got -0.5"),
    (["--validation-split", "0", "--early-stopping", "2"],
     "--early-stopping watches the validation loss, but --validation-split 0 holds out no validation part: give a "
     "--validation-split above 0, or --monitor loss"),
    (["--validation-split", "0", "--early-stopping", "2", "--monitor", "val_accuracy"],
     "--early-stopping watches the validation accuracy, but --validation-split 0 holds out no validation part"),
    (["--layers", "conv4k3,10", "--augment", "14"],
     "--augment must be a non-negative integer up to 13 on 28x28 images (below half the side"),
    (["--layers", "conv4k3,10", "--augment", "1000"], "up to 13 on 28x28 images"),
    (["--schedule", "cosine", "--lr", "0.1", "--eta-min", "0.1"],
     "--eta-min must be a finite number >= 0 and < 0.1 (below the learning rate"),
    (["--schedule", "cosine", "--optimizer", "adam", "--eta-min", "0.5"], "--eta-min must be a finite number >= 0 "
                                                                          "and < 0.001"),
]


@pytest.mark.parametrize("args, expected", BEYOND_THE_DATA, ids=[" ".join(args) for args, _ in BEYOND_THE_DATA])
def test_sizes_beyond_what_the_data_allows(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, [*TRAIN, *args], expected)


def test_data_of_one_sample_cannot_be_split(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    numpy.savez("one.npz", x_train=numpy.zeros((1, 28, 28), numpy.uint8), y_train=numpy.zeros(1, numpy.uint8))
    _refused(capsys, [*TRAIN[:2], "one.npz", *TRAIN[3:]],
             "--data one.npz has 1 sample: training and its validation need at least 2")


LAYERS = [
    ("784,0,10", "--layers: '0': Dense out_features must be a positive integer, got 0"),
    ("conv0k5,10", "--layers: 'conv0k5': Conv2D out_channels must be a positive integer, got 0"),
    ("conv4k0,10", "--layers: 'conv4k0': Conv2D kernel_size must be a positive integer"),
    ("conv4k3s0,10", "--layers: 'conv4k3s0': Conv2D stride must be a positive integer"),
    ("maxpool0,10", "--layers: 'maxpool0': MaxPool2D kernel_size must be a positive integer"),
    ("drop1.5,784,10", "--layers: 'drop1.5': Dropout rate must be a finite number >= 0 and < 1, got 1.5"),
    ("dropnan,784,10", "--layers: 'dropnan': Dropout rate must be a finite number >= 0 and < 1, got nan"),
    ("dropinf,784,10", "Dropout rate must be a finite number >= 0 and < 1, got inf"),
    ("drop-1,784,10", "Dropout rate must be a finite number >= 0 and < 1, got -1"),
    ("dropx,784,10", "--layers: 'dropx' needs a rate in [0, 1)"),
    ("shift-1,conv4k3,10", "--layers: 'shift-1' needs a whole number of 0 to 13 pixels on 1x28x28 images"),
    ("shift14,conv4k3,10", "--layers: 'shift14' needs a whole number of 0 to 13 pixels on 1x28x28 images"),
    ("conv4k3,maxpool2,shift7,10", "--layers: 'shift7' needs a whole number of 0 to 6 pixels on 4x13x13 images"),
    ("784,\u00b2,10", "--layers: '\u00b2' is not a layer; the grammar: N (Dense),"),  # a digit to isdigit, not int
    ("shift\u00b2,conv4k3,10", "--layers: 'shift\u00b2' needs a whole number of 0 to 13 pixels on 1x28x28 images"),
    ("conv4k3,16,conv4k3,10", "--layers: 'conv4k3': convolves images (channels, height, width) but gets a 16 "
                              "input: image layers go before any flatten and the first Dense width"),  # not 16 channels
    ("maxpool2s99999999999999999999,10", "--layers: 'maxpool2s99999999999999999999': MaxPool2D stride must be at "
                                         "most 2,147,483,647 (what a checkpoint holds"),  # was an OverflowError
    ("conv4k3s2147483648,10", "--layers: 'conv4k3s2147483648': Conv2D stride must be at most 2,147,483,647"),
    ("784,,10", "--layers '784,,10' has an empty entry (entry 2): remove the extra comma or name the layer there"),
    ("784,64,10,", "--layers '784,64,10,' has an empty entry (entry 4)"),
    ("maxpool2:relu,10", "--layers: 'maxpool2:relu': maxpool2 takes no activation; a Dense width, conv or bn does"),
    ("784,maxout0,10", "--layers: 'maxout0': Maxout out_features must be a positive integer, got 0"),
    ("784,maxout16p0,10", "--layers: 'maxout16p0': Maxout pieces must be a positive integer, got 0"),
    ("784,maxout16:relu,10", "--layers: 'maxout16:relu': maxout16 takes no activation; a Dense width, conv or bn does"),
    ("dense64:relu,10", "--layers: 'dense64' is not a layer; the grammar: N (Dense),"),
    ("conv4k3,bn:,10", "--layers: 'bn:' names no activation after ':'; like bn:relu"),
    ("conv4k3:relu6,10", "--layers: 'conv4k3:relu6': unknown activation 'relu6'; valid: linear, relu,"),
    ("drop:relu,784,10", "--layers: 'drop' needs a rate in [0, 1), like drop0.5"),
    ("784,64,10:softmax", "--layers ends with '10:softmax', but the output layer is linear: the loss takes its logits "
                      "(end with 10)"),
    ("conv4k3:linear,bn:softmax,10", "--layers: 'bn:softmax' (BatchNorm(4, activation='softmax')) after a 4x26x26 "
                                     "output: applies a softmax only over features, not over the channels"),
]


@pytest.mark.parametrize("layers, expected", LAYERS, ids=[layers for layers, _ in LAYERS])
def test_numbers_in_layers_out_of_range(layers, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*TRAIN, "--layers", layers]
    del argv[argv.index("784,10")], argv[argv.index("--layers")]
    _refused(capsys, argv, expected)


EDGES = [
    ["--batch-size", str(TRAIN_SAMPLES)],
    ["--validation-split", str(1 / SYNTHETIC)],
    ["--validation-split", str((SYNTHETIC - 1) / SYNTHETIC), "--batch-size", "1"],
    ["--layers", "shift13,conv4k3,10"],
    ["--layers", "conv4k3s2147483647,maxpool1s2147483647,10"],
    ["--layers", "conv4k3,10", "--augment", "13"],
    ["--schedule", "cosine", "--lr", "0.1", "--eta-min", "0.099"],
    ["--momentum", "0", "--gamma", "1", "--schedule", "step", "--seed", str(2**32 - 1), "--dropout", "0"],
]


@pytest.mark.parametrize("args", EDGES, ids=[" ".join(args) for args in EDGES])
def test_the_edges_of_the_ranges_train(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*TRAIN, *args]
    if argv.count("--layers") == 2:
        del argv[argv.index("784,10")], argv[argv.index("--layers")]
    assert cli.main(argv) == 0, capsys.readouterr().err


def test_settings_that_cannot_take_effect_are_warned_about(capsys, tmp_path, monkeypatch):
    """Valid, as in Keras and PyTorch, but said: patience >= the epochs never stops, a step size >= the epochs
    never decays."""
    monkeypatch.chdir(tmp_path)
    argv = [option for option in TRAIN if option != "--quiet"]
    assert cli.main([*argv, "--epochs", "2", "--early-stopping", "1", "--schedule", "step", "--step-size", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli.main([*argv, "--early-stopping", "3", "--schedule", "step", "--step-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: --early-stopping 3 cannot stop a run of 1 more epoch(s)" in err
    assert "warning: --step-size 5 >= --epochs 1: the step schedule never lowers the learning rate" in err
    assert cli.main([*argv, "--early-stopping", "1"]) == 0
    assert "it stops after 1 epoch without improvement\n" in capsys.readouterr().err  # not '1 epochs'
    assert cli.main([*argv, "--early-stopping", "0"]) == 0  # Keras's patience 0 stops where 1 does
    assert ("warning: --early-stopping 0 cannot stop a run of 1 more epoch(s): it stops after 1 epoch without "
            "improvement\n") in capsys.readouterr().err


# ----- end to end: the installed command ----------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["train", "--lr", "-inf"], "nnaccel train: error: argument --lr: must be a positive number (finite, > 0), "
                                "got -inf (see 'nnaccel train --help')"),
    ([*TRAIN, "--batch-size", "5000"], "nnaccel train: error: --batch-size must be a positive integer up to 819 "
                                       "(the 819 training samples), got 5000"),
    ([*TRAIN, "--batch-size", "2", "--validation-split", "0.999"], "nnaccel train: error: --batch-size must be a "
     "positive integer up to 1 (the 1 training sample), got 2"),
])
def test_the_command_says_the_range_in_one_line(args, expected, tmp_path):
    run = nnaccel(*args, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [expected]


def test_a_network_too_large_for_memory_is_one_line(capsys):
    assert cli.main(["train", "--data", "digits", "--layers", "64,99999999999999,10", "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("nnaccel train: error: out of memory: ") and "(a smaller --layers or --batch-size fits)" in line


@pytest.mark.parametrize("layers", [f"64,{10**20},10", f"conv{10**20}k3,10", f"conv4k3p{10**20},10"])
def test_a_network_beyond_any_address_space_is_one_line(capsys, layers):
    """Sizes past numpy's own limit (it raises 'Maximum allowed dimension exceeded'): the largest layer named."""
    assert cli.main(["train", "--data", "digits", "--layers", layers, "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("nnaccel train: error: the model has ") and "more than any memory holds in float32: " \
        "layer " in line, line


@pytest.mark.parametrize("args, message", [
    (["--batches", str(10**20)], "--batches: each batch size must be from 1 to 1,048,576, got 100,000,000,000,000"),
    (["--fit", "--batches", "100000"], "--batches: a fit's batch size must be from 1 to 512 (the images it trains on)"),
])
def test_bench_batches_beyond_their_range_are_one_line(capsys, args, message):
    _refused(capsys, ["bench", "--quick", "--devices", "cpu", *args], message)


# ----- the library: the constructors the options reach ----------------------------------------------------
LIBRARY = [
    ("Dropout('0.5')", lambda: nn.Dropout("0.5"), "Dropout rate"),
    ("Dropout(None)", lambda: nn.Dropout(None), "Dropout rate"),
    ("Dropout(True)", lambda: nn.Dropout(True), "Dropout rate"),
    ("Dropout(-inf)", lambda: nn.Dropout(-INF), "Dropout rate"),
    ("Adam(betas=None)", lambda: nn.Adam(betas=None), "Adam betas"),
    ("Adam(betas=('a', 0.9))", lambda: nn.Adam(betas=("a", 0.9)), "Adam betas"),
    ("Adam(betas=(inf, 0.9))", lambda: nn.Adam(betas=(INF, 0.9)), "Adam betas"),
    ("AdamW(eps=nan)", lambda: nn.AdamW(eps=NAN), "eps"),
    ("RandomShift(nan)", lambda: nn.RandomShift(NAN), "RandomShift max_shift"),
    ("BatchNorm(momentum=nan)", lambda: nn.BatchNorm(4, momentum=NAN), "BatchNorm momentum"),
    ("BatchNorm(eps=inf)", lambda: nn.BatchNorm(4, eps=INF), "BatchNorm eps"),
    ("CosineAnnealing(inf)", lambda: nn.CosineAnnealing(INF), "t_max"),
    ("Trainer(batch_size=inf)", lambda: nn.Trainer(nn.Sequential(nn.Dense(4, 3)), batch_size=INF), "batch_size"),
    ("EarlyStopping(patience=nan)", lambda: nn.EarlyStopping(patience=NAN), "patience"),
    ("EarlyStopping(patience=-1)", lambda: nn.EarlyStopping(patience=-1), "patience"),
    ("EarlyStopping(min_delta=nan)", lambda: nn.EarlyStopping(min_delta=NAN), "min_delta"),
    # float() takes a string and a bool: refused as Dropout refuses them, naming the type
    ("Dropout('0.5') named a str", lambda: nn.Dropout("0.5"), r"Dropout rate .*, got '0.5' \(a str\)$"),
    ("SGD(lr='0.1')", lambda: nn.SGD(lr="0.1"), r"^learning rate must be a finite number > 0, got '0.1' \(a str\)$"),
    ("SGD(momentum=True)", lambda: nn.SGD(momentum=True), r"^momentum must be .*, got True \(a bool\)$"),
    ("Adam(weight_decay=b'0')", lambda: nn.Adam(weight_decay=b"0"), r"^weight_decay .*, got b'0' \(a bytes\)$"),
    ("Adam(betas=('0.9', 0.999))", lambda: nn.Adam(betas=("0.9", 0.999)), "Adam betas"),
    ("Adam(betas=(False, 0.9))", lambda: nn.Adam(betas=(False, 0.9)), "Adam betas"),
    ("BatchNorm(momentum=True)", lambda: nn.BatchNorm(4, momentum=True), r"BatchNorm momentum .*True \(a bool\)$"),
    ("BatchNorm(eps=numpy.True_)", lambda: nn.BatchNorm(4, eps=numpy.True_), r"BatchNorm eps .* \(a bool\)$"),
    ("LeakyReLU('0.1')", lambda: nn.LeakyReLU("0.1"), r"leaky_relu slope .*, got '0.1' \(a str\)$"),
    ("StepLR(gamma='0.5')", lambda: nn.StepLR(2, gamma="0.5"), r"StepLR gamma .*, got '0.5' \(a str\)$"),
    ("EarlyStopping(min_delta=True)", lambda: nn.EarlyStopping(min_delta=True), r"min_delta .*True \(a bool\)$"),
    ("Dense(True, 3)", lambda: nn.Dense(True, 3), r"Dense in_features .*, got True \(a bool\)$"),
    # bool() takes any string, "False" too: a flag is True, False, 1 or 0
    ("SGD(nesterov='False')", lambda: nn.SGD(momentum=0.9, nesterov="False"),
     r"^nesterov must be True or False, got 'False' \(a str\)$"),
    ("Trainer(cuda_graphs='no')", lambda: nn.Trainer(nn.Sequential(nn.Dense(4, 3)), cuda_graphs="no"),
     r"^cuda_graphs must be True or False, got 'no' \(a str\)$"),
    ("model.train('eval')", lambda: nn.Sequential(nn.Dense(4, 3)).train("eval"),
     r"^mode must be True or False, got 'eval' \(a str\)$"),
    ("EarlyStopping(restore_best_weights='False')", lambda: nn.EarlyStopping(restore_best_weights="False"),
     r"^restore_best_weights must be True or False, got 'False' \(a str\)$"),
    ("ModelCheckpoint(save_best_only='False')", lambda: nn.ModelCheckpoint("m.npz", save_best_only="False"),
     r"^save_best_only must be True or False, got 'False' \(a str\)$"),
    ("CSVLogger(append='no')", lambda: nn.CSVLogger("log.csv", append="no"),
     r"^append must be True or False, got 'no' \(a str\)$"),
    ("Trainer(quiet='False')", lambda: nn.Trainer(nn.Sequential(nn.Dense(4, 3)), quiet="False"),
     r"^quiet must be True or False, got 'False' \(a str\)$"),
    ("fit(shuffle='False')", lambda: nn.Trainer(nn.Sequential(nn.Dense(4, 3)), quiet=True).fit(
        numpy.zeros((2, 4), numpy.float32), numpy.zeros(2, numpy.int64), shuffle="False"),
     r"^shuffle must be True or False, got 'False' \(a str\)$"),
]


@pytest.mark.parametrize("case, make, name", LIBRARY, ids=[case for case, _, _ in LIBRARY])
def test_library_constructors_refuse_nonsense_naming_the_argument(case, make, name):
    with pytest.raises(nn.ConfigError, match=name):
        make()


def test_the_library_keeps_pytorchs_latitude():
    """What PyTorch accepts, the library accepts; only the command line is strict."""
    assert nn.SGD(lr=0.1, momentum=1.5).momentum == 1.5
    assert nn.StepLR(3, gamma=2.0).gamma == 2.0
    assert nn.Dropout(0.0).rate == 0.0
    assert nn.SGD(momentum=0.9, nesterov=numpy.True_).nesterov is True and nn.SGD(nesterov=0).nesterov is False
    assert nn.SGD(lr=numpy.float32(0.5), momentum=numpy.float64(0.9)).momentum == 0.9  # NumPy's scalars are numbers
    assert nn.Adam(betas=numpy.array([0.5, 0.25])).betas == (0.5, 0.25)
    assert nn.BatchNorm(4, momentum=numpy.int64(0)).momentum == 0.0
    assert nn.EarlyStopping(min_delta=numpy.float32(-0.5)).min_delta == 0.5  # Keras takes a negative one as its size
    # 0-d arrays (numpy.array(x), what a CuPy reduction returns) are numbers and flags, as float() and bool() took them
    assert nn.EarlyStopping(min_delta=numpy.array(0.25)).min_delta == 0.25
    assert nn.Adam(betas=(numpy.array(0.5), numpy.array(0.25))).betas == (0.5, 0.25)
    assert nn.SGD(momentum=0.9, nesterov=numpy.array(True)).nesterov is True
    assert nn.Sequential(nn.Dense(4, 3)).train(numpy.array(False)).training is False
    with pytest.raises(nn.ConfigError, match=r"nesterov must be True or False, got array\(2\)"):
        nn.SGD(momentum=0.9, nesterov=numpy.array(2))
    with pytest.raises(nn.ConfigError, match=r"learning rate must be a finite number > 0, got array\(True"):
        nn.SGD(lr=numpy.array(True))  # a bool, as True is
    assert nn.SGD(lr=numpy.array(0.5)).lr == 0.5
    with pytest.raises(nn.ConfigError, match=r"min_delta must be a finite number, got array\('0.1'"):
        nn.EarlyStopping(min_delta=numpy.array("0.1"))  # a string, as "0.1" is
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3)), batch_size=100, quiet=True)
    history = trainer.fit(numpy.ones((5, 4)), numpy.array([0, 1, 2, 0, 1]), epochs=1)  # one short batch
    assert len(history["loss"]) == 1


@pytest.mark.parametrize("value, kwargs, words", [
    (NAN, {"low": 0, "high": 1, "high_open": True}, "a finite number >= 0 and < 1"),
    (-INF, {"low": 0, "low_open": True}, "a positive number (finite, > 0)"),
    (2.0, {"low": 0, "high": 1, "low_open": True}, "a finite number > 0 and <= 1"),
    (0, {"low": 1, "integer": True}, "a positive integer"),
    (5000, {"low": 1, "high": 819, "integer": True}, "a positive integer up to 819"),
    (-1, {"low": 0, "high": 2**32 - 1, "integer": True}, "a non-negative integer up to 4294967295"),
    (1.0, {"low": 1, "integer": True}, "a positive integer"),  # a float is not an integer
])
def test_check_range_names_the_argument_and_the_range(value, kwargs, words):
    assert describe_range(**kwargs) == words
    with pytest.raises(nn.ConfigError) as error:
        check_range(value, "the option", **kwargs)
    assert str(error.value) == f"the option must be {words}, got {value!r}"
