"""The command line: the README's main job works, user errors are one line and non-zero."""

import json
import re
import subprocess
import sys

import pytest

from nnaccel import architectures, cli, load
from command_line import NNACCEL, in_process, nnaccel


def _train_the_default_recipe(tmp_path, *epochs):
    """`nnaccel train` as the README's first command runs it (optionally fewer epochs); the validation accuracy."""
    run = nnaccel("train", *epochs, "--save", "m.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "the default recipe: --model default" in run.stderr and "on mnist (6397 train, 1599 validation)" in run.stderr
    assert "on cpu" in run.stderr
    accuracy = float(run.stdout.split("validation accuracy")[1].split()[0])
    run = nnaccel("evaluate", "m.npz", "--json", cwd=tmp_path)  # no test split in the sample: the held-out fifth
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    return accuracy


def test_the_default_recipe_trains_on_the_sample_it_ships(tmp_path):
    """The README's first command, 3 of its 15 epochs (the whole run is the slow test below and
    benchmarks/recipes.py): the recipe and data it picks, and a model that has learned (97.7% here)."""
    accuracy = _train_the_default_recipe(tmp_path, "--epochs", "3")
    assert accuracy >= 0.95


@pytest.mark.slow
def test_train_with_no_arguments_reaches_98_percent(tmp_path):
    """The README's first command as it is, 15 epochs (about 40 s on 2 cores): 98.5% over 3 seeds."""
    accuracy = _train_the_default_recipe(tmp_path)
    assert accuracy >= 0.98


def test_train_save_evaluate_json(tmp_path, capsys):
    model = tmp_path / "m.npz"
    run = nnaccel("train", "--data", "digits", "--epochs", 3, "--layers", "64,32,10", "--save", model, "--json",
                  "--quiet", "--plot", tmp_path / "curves.png", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["epochs"] == 3 and 0.5 < result["accuracy"] <= 1.0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    code, out, err = in_process(capsys, "evaluate", model, "--data", "digits", "--split", "test", "--json")
    assert code == 0, err
    assert set(json.loads(out)) == {"accuracy", "loss"}
    code, out, err = in_process(capsys, "evaluate", model, "--data", "digits")
    assert code == 0 and "test accuracy" in out, err


def test_binary_cross_entropy_trains_one_vs_rest_and_its_model_evaluates(tmp_path, capsys):
    """--loss sigmoid_cross_entropy on a data set's labels (one-hot, one-vs-rest); evaluate and its confusion
    matrix read the loss from the checkpoint."""
    run = nnaccel("train", "--data", "digits", "--device", "cpu", "--quiet", "--layers", "64,16,10", "--epochs", 2,
                  "--loss", "sigmoid_cross_entropy", "--save", "m.npz", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    trained = json.loads(run.stdout)
    code, out, err = in_process(capsys, "evaluate", tmp_path / "m.npz", "--data", "digits", "--split", "validation",
                                "--json", "--confusion", tmp_path / "cm.png")
    assert code == 0, err
    assert json.loads(out)["loss"] == trained["loss"] and (tmp_path / "cm.png").stat().st_size > 1000


def test_plot_of_a_run_resumed_without_validation_draws_its_curves(tmp_path, capsys):
    """Validation in the first epoch only: --plot draws the validation curve where it has values."""
    small = ["--data", "digits", "--device", "cpu", "--quiet"]
    code, _, err = in_process(capsys, "train", *small, "--layers", "64,16,10", "--epochs", 1,
                              "--save", tmp_path / "m.npz")
    assert code == 0, err
    run = nnaccel("train", *small, "--resume", "m.npz", "--epochs", 2, "--validation-split", 0, "--plot",
                  "curves.png", cwd=tmp_path)
    assert run.returncode == 0 and not run.stderr, run.stderr
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("net", [["--layers", "784,32,10"], ["--model", "mlp"]], ids=["layers", "preset"])
def test_an_mlp_trains_with_augment_and_the_mlp_preset_fits_any_width(tmp_path, net):
    """--augment puts RandomShift and a Flatten before an MLP; the mlp preset takes the data's width."""
    run = nnaccel("train", "--data", "synthetic", *net, "--augment", "2", "--epochs", 1, "--save", "m.npz",
                  "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    from nnaccel import load

    model = load(tmp_path / "m.npz")
    assert model.input_shape == (1, 28, 28)
    assert [type(layer).__name__ for layer in model.layers[:3]] == ["RandomShift", "Flatten", "Dense"]
    if "mlp" in net:  # the preset on 8x8 digits: 64 inputs
        run = nnaccel("train", "--data", "digits", "--model", "mlp", "--epochs", 1, "--quiet", "--device", "cpu",
                      "--save", "d.npz", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert load(tmp_path / "d.npz").layers[0].in_features == 64


def test_a_conv_net_from_the_command_line_predicts_and_shows(tmp_path, capsys):
    """--layers with image layers and --augment; predict, show --weights (filters) and --activations (maps)."""
    run = nnaccel("train", "--layers", "conv4k5p2,maxpool2,bn,conv8k3,avgpool2,32,10", "--augment", "--epochs", 1,
                  "--save", "c.npz", "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    from nnaccel import load

    model = load(tmp_path / "c.npz")
    assert model.input_shape == (1, 28, 28) and type(model.layers[0]).__name__ == "RandomShift"
    picture = "docs/images/three.png"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    code, out, err = in_process(capsys, "predict", tmp_path / "c.npz", root / picture, "--json")
    assert code == 0 and json.loads(out)["digit"] in range(10), err
    code, _, err = in_process(capsys, "show", tmp_path / "c.npz", "--weights", tmp_path / "w.png", "--activations",
                              root / picture, "--out", tmp_path / "a.png", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "w.png").stat().st_size > 1000 and (tmp_path / "a.png").stat().st_size > 1000


def test_layers_name_their_own_activations_for_conv_bn_relu(tmp_path):
    """``conv:linear,bn:relu`` spells PyTorch's Conv2d-BatchNorm2d-ReLU; unnamed Dense and conv layers take
    --activation, an unnamed bn stays linear, and a resumed run rebuilds the same layers."""
    layers = "conv4k5p2:linear,bn:relu,maxpool2,conv4k3,bn,32:gelu,bn:relu,16,10"
    run = nnaccel("train", "--data", "synthetic", "--layers", layers, "--activation", "tanh", "--epochs", 1,
                  "--save", "m.npz", "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    from nnaccel import checkpoint

    saved = checkpoint.read(tmp_path / "m.npz")[0]["model"]["layers"]
    assert [(layer["type"], layer.get("activation")) for layer in saved] == [
        ("Conv2D", "linear"), ("BatchNorm", "relu"), ("MaxPool2D", None), ("Conv2D", "tanh"), ("BatchNorm", "linear"),
        ("Flatten", None), ("Dense", "gelu"), ("BatchNorm", "relu"), ("Dense", "tanh"), ("Dense", "linear")]
    run = nnaccel("train", "--resume", "m.npz", "--epochs", 2, "--save", "m.npz", "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert checkpoint.read(tmp_path / "m.npz")[0]["model"]["layers"] == saved


def test_a_layers_entry_with_an_activation_is_a_layer_wherever_it_stands():
    """A first entry naming an activation is a Dense layer, not the input width; spaces around the colon
    and a linear output layer spelled out are what they say."""
    from nnaccel import architectures

    def built(text):
        return [repr(layer) for layer in architectures.build(text, 784, 10)[0]]

    assert built("128:tanh,10") == ["Dense(784, 128, activation='tanh')", "Dense(128, 10)"]
    assert built("784,128:tanh,10:linear") == built("784,128 : tanh,10")
    assert built("conv4k3: Linear,BN :relu,10") == ["Conv2D(1, 4, 3)", "BatchNorm(4, activation='relu')",
                                                     "Flatten()", "Dense(2704, 10)"]


def test_activation_parameters_reach_the_layers(tmp_path):
    """``--activation leaky_relu:0.2`` is LeakyReLU(slope=0.2) in every hidden layer that names none, and a
    ``--layers`` entry's ``:elu:0.5`` ELU(alpha=0.5) in its own; the checkpoint keeps both."""
    run = nnaccel("train", "--data", "synthetic", "--layers", "784,16:elu:0.5,8,10", "--activation", "leaky_relu:0.2",
                  "--epochs", 1, "--save", "m.npz", "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    import nnaccel as nn

    first, second, output = nn.load(tmp_path / "m.npz").layers
    assert type(first.activation) is nn.ELU and first.activation.alpha == 0.5
    assert type(second.activation) is nn.LeakyReLU and second.activation.slope == 0.2
    assert output.activation == nn.Linear()


def test_layers_take_maxout_units_and_pieces(tmp_path):
    """``maxoutNpP`` trains a Maxout of N units and P pieces (2 unless given), flattened after image layers as a
    Dense is, with --dropout after it as after a hidden Dense layer; the checkpoint rebuilds it."""
    run = nnaccel("train", "--data", "synthetic", "--layers", "784,maxout16p3,maxout8,10", "--dropout", "0.25",
                  "--epochs", 1, "--save", "m.npz", "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    model = load(tmp_path / "m.npz")
    assert [repr(layer) for layer in model.layers] == [
        "Maxout(784, 16, pieces=3)", "Dropout(rate=0.25)", "Maxout(16, 8)", "Dropout(rate=0.25)", "Dense(8, 10)"]
    assert [repr(layer) for layer in architectures.build("conv4k3,maxout8p4,10", 784, 10)[0]] == [
        "Conv2D(1, 4, 3, activation='relu')", "Flatten()", "Maxout(2704, 8, pieces=4)", "Dense(8, 10)"]


def test_training_options_reach_the_library(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(capsys, "train", "--data", "digits", "--layers", "64,32,16,10", "--dropout", "0.2",
                              "--optimizer", "sgd", "--nesterov", "--weight-decay", "1e-4", "--schedule", "step",
                              "--step-size", 1, "--gamma", "0.5", "--loss", "mse", "--early-stopping", 2, "--csv",
                              "log.csv", "--epochs", 3, "--save", "m.npz", "--quiet", "--device", "cpu")
    assert code == 0, err
    from nnaccel import checkpoint

    meta = checkpoint.read(tmp_path / "m.npz")[0]
    assert [layer["type"] for layer in meta["model"]["layers"]] == ["Dense", "Dropout", "Dense", "Dropout", "Dense"]
    assert meta["optimizer"]["config"] == {"type": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                                           "weight_decay": 1e-4}
    assert meta["trainer"]["schedule"] == {"type": "StepLR", "step_size": 1, "gamma": 0.5}
    assert meta["trainer"]["loss"] == "mse" and meta["trainer"]["history"]["lr"] == [0.1, 0.05, 0.025]
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 4


def test_adam_betas_and_eps_reach_the_optimizer(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(capsys, "train", "--data", "digits", "--layers", "64,16,10", "--optimizer", "adamw",
                              "--betas", "0.8,0.99", "--eps", "1e-6", "--epochs", 1, "--save", "m.npz", "--quiet",
                              "--device", "cpu")
    assert code == 0, err
    from nnaccel import checkpoint

    assert checkpoint.read(tmp_path / "m.npz")[0]["optimizer"]["config"] == {
        "type": "AdamW", "lr": 0.001, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01}


def test_early_stopping_monitor_and_min_delta_reach_the_callback(tmp_path, capsys, monkeypatch):
    """--monitor accuracy watches the training accuracy (no validation part needed), highest best; a --min-delta
    of 2 counts no later epoch as better than the first, so patience 1 stops after the second."""
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(capsys, "train", "--data", "digits", "--layers", "64,16,10", "--validation-split", 0,
                              "--early-stopping", 1, "--monitor", "accuracy", "--min-delta", 2, "--epochs", 5, "--save",
                              "m.npz", "--device", "cpu")
    assert code == 0, err
    assert "early stopping after epoch 2: accuracy has not improved for 1 epoch since epoch 1" in err
    from nnaccel import checkpoint

    trainer = checkpoint.read(tmp_path / "m.npz")[0]["trainer"]
    assert len(trainer["history"]["accuracy"]) == 2
    assert [(state["monitor"], state["sign"]) for state in trainer["early_stopping"]] == [("accuracy", -1.0)]


def test_train_help_groups_the_options():
    run = nnaccel("train", "--help")
    for group in ("data:", "network:", "optimisation:", "the run:", "output:", "--layers grammar"):
        assert group in run.stdout, run.stdout


def test_every_option_of_every_command_says_what_it_does():
    """``--help`` of each command describes each option (the --device of evaluate, predict and show, evaluate's
    --json and train's --optimizer were bare)."""
    commands = next(action for action in cli.build_parser()._actions if action.dest == "command").choices
    bare = [f"{name} {action.option_strings[0]}" for name, command in commands.items() for action in command._actions
            if action.option_strings and not action.help]
    assert bare == []


def test_digits_without_scikit_learn_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['sklearn'] = None; from nnaccel import cli; "
            "sys.exit(cli.main(['train', '--data', 'digits', '--epochs', '1', '--device', 'cpu']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "nnaccel train: error: the digits data set needs scikit-learn, an optional extra: pip install "
        "'nnaccel[digits]'"], run.stderr


def test_evaluate_real_mnist_train_split(tmp_path, mnist_path, capsys):
    model = tmp_path / "m.npz"
    run = nnaccel("train", "--data", mnist_path, "--epochs", 1, "--layers", "784,32,10", "--save", model, "--quiet")
    assert run.returncode == 0, run.stderr
    code, out, err = in_process(capsys, "evaluate", model, "--data", mnist_path, "--split", "train", "--json")
    assert code == 0 and json.loads(out)["accuracy"] > 0.8, err


@pytest.mark.parametrize("options, message", [
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum is SGD's; the optimizer is adam"),
    (["--optimizer", "adamw", "--nesterov"], "--nesterov is SGD's; the optimizer is adamw"),
    (["--gamma", "0.5"], "--gamma is the step schedule's; the schedule is none (give --schedule step)"),
    (["--schedule", "cosine", "--step-size", "2"], "--step-size is the step schedule's; the schedule is cosine"),
    (["--schedule", "step", "--eta-min", "0.01"], "--eta-min is the cosine schedule's; the schedule is step (give "),
    (["--dropout", "0.5", "--layers", "784,10"], "--dropout 0.5 goes after each hidden Dense or Maxout layer, and the network "
                                                 "has none"),
    (["--betas", "0.8,0.99"], "--betas is Adam's and AdamW's; the optimizer is sgd (give --optimizer adam or adamw)"),
    (["--optimizer", "sgd", "--eps", "1e-6"], "--eps is Adam's and AdamW's; the optimizer is sgd"),
    (["--monitor", "loss"], "--monitor is early stopping's; give --early-stopping PATIENCE"),
    (["--min-delta", "0.01"], "--min-delta is early stopping's; give --early-stopping PATIENCE")])
def test_an_option_of_a_part_the_run_does_not_have_is_refused(options, message, tmp_path, monkeypatch, capsys):
    """SGD's momentum with Adam, a schedule's option without that schedule, Dropout with no hidden layer to
    follow: each would change nothing, so it is an error naming the part, before training."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "synthetic", "--layers", "784,16,10", "--device", "cpu", "--epochs", "1", "--save",
            "m.npz"]
    assert cli.main([*argv, *options]) == 2
    assert capsys.readouterr().err.startswith(f"nnaccel train: error: {message}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, unknown", [
    (["train", "--lerning-rate", "0.1"], "--lerning-rate 0.1"), (["info", "--json"], "--json"),
    (["evaluate", "m.npz", "extra.npz"], "extra.npz"), (["bench", "--quick", "--gpu"], "--gpu")])
def test_an_argument_no_option_takes_is_refused_by_its_command(argv, unknown, capsys):
    """The command names itself and its own help, which lists what it takes ('nnaccel: error: ...' and
    'nnaccel --help', argparse's, list only the commands)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"nnaccel {argv[0]}: error: unrecognized arguments: {unknown} (see "
                                       f"'nnaccel {argv[0]} --help')\n")


@pytest.mark.parametrize("args, what", [
    (["train", "--resume", "", "--save", "m.npz"], "--resume"), (["train", "--save", ""], "--save"),
    (["train", "--csv", ""], "--csv"), (["train", "--plot", ""], "--plot"), (["train", "--layers", ""], "--layers"),
    (["train", "--data", ""], "--data"), (["evaluate", ""], "the model"),
    (["evaluate", "m.npz", "--data", ""], "--data"),
    (["export", "m.npz", ""], "the ONNX file"), (["predict", "m.npz", "a.png", ""], "an IMAGE"),
    (["bench", "--networks", ""], "--networks"), (["bench", "--json", ""], "--json")])
def test_an_empty_value_is_refused_not_taken_as_left_out(args, what, tmp_path, monkeypatch, capsys):
    """``--resume "$RUN"`` with RUN unset must not start afresh and overwrite the checkpoint: an empty value is
    one error line naming the option, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.npz").write_bytes(b"a checkpoint")
    assert cli.main(args) == 2
    assert capsys.readouterr().err == f"nnaccel {args[0]}: error: {what} is an empty string; give a value or leave " \
                                      f"the option out\n"
    assert [path.name for path in tmp_path.iterdir()] == ["m.npz"]
    assert (tmp_path / "m.npz").read_bytes() == b"a checkpoint"


def test_named_choices_take_any_case_as_the_python_api_does(tmp_path, monkeypatch, capsys):
    """``optimizer="Adam"``, ``loss="MSE"`` and ``--activation ReLU`` are taken; so are ``--optimizer Adam`` and
    the other named choices of the commands (before, argparse refused them as invalid choices)."""
    from nnaccel import bench, cli

    parse = cli.build_parser().parse_args
    args = parse(["train", "--model", "MLP", "--loss", "MSE", "--optimizer", "AdamW", "--schedule", "Cosine",
                  "--early-stopping", "1", "--monitor", "Val_Accuracy", "--precision", "BF16"])
    assert (args.model, args.loss, args.optimizer, args.schedule, args.monitor, args.precision) == \
        ("mlp", "mse", "adamw", "cosine", "val_accuracy", "bf16")
    assert parse(["evaluate", "m.npz", "--split", "Train"]).split == "train"
    assert parse(["bench", "--compare", "Torch"]).compare == "torch"
    assert bench.parse_precisions("FP32,bf16,BF16") == ("fp32", "bf16")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--data", "synthetic", "--layers", "784,16,10", "--optimizer", "Adam", "--epochs", "1",
                     "--device", "cpu", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 1


@pytest.mark.parametrize("args, message", [
    (["train", "--epochs", "0"], "--epochs: must be a positive integer"),
    (["train", "--batch-size", "-3"], "--batch-size: must be a positive integer"),
    (["train", "--lr", "0"], "--lr: must be a positive number"),
    (["train", "--layers", "784,32"], "ends with 32 outputs but the data has 10 classes"),
    (["train", "--layers", "64,32,10"], "starts with 64 inputs but the data has 784 features"),
    (["train", "--model", "lenet5", "--data", "digits"], "--model lenet5: 'conv16k5'"),
    (["train", "--layers", "conv6k5,bogus,10"], "'bogus' is not a layer; the grammar"),
    (["train", "--activation", "swishy"], "--activation: unknown activation 'swishy'; valid: linear, relu"),
    (["train", "--activation", "", "--layers", "784,16,10"], "--activation: unknown activation ''"),
    (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["train", "--loss", "bce"], "invalid choice: 'bce' (choose from 'mse', 'sigmoid_cross_entropy', "),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--data", "no/such/folder"], "no/such/folder"),
    (["evaluate", "missing.npz"], "checkpoint missing.npz does not exist"),
    (["evaluate", "."], "checkpoint . is a folder, not a checkpoint file"),
    (["export", "missing.npz", "."], "the ONNX file . is a folder; name a file in it, such as model.onnx"),
    (["train", "--save", "no/such/dir/m.npz", "--epochs", "1"], "folder no/such/dir does not exist"),
    (["train", "--plot", "curves.xyz"], "--plot curves.xyz: cannot draw a '.xyz' file; use one of"),
    (["train", "--plot", "no/such/dir/c.png"], "--plot no/such/dir/c.png: folder no/such/dir does not exist"),
    (["show", "missing.npz", "--weights", "w.png/"],
     "--weights w.png/ names a folder (it ends in '/'), and there is none; to write a file, drop the '/': w.png"),
    (["export", "missing.npz", "m.onnx/"], "the ONNX file m.onnx/ names a folder (it ends in '/'), and there is none"),
    (["show", "missing.npz", "--weights", "w"],
     "--weights w has no extension to name the picture's format; add one, such as w.png"),
    (["evaluate", "missing.npz", "--errors", "worst"], "--errors worst has no extension"),
    (["show", "missing.npz", "--weights", "w."], "--weights w. has no extension to name the picture's format; add "
                                                 "one, such as w.png"),
    (["show", "missing.npz", "--weights", ".png"], "--weights .png is an extension without a name; give both, such as "
                                                   "picture.png"),
    (["train", "--layers", "64,10", "--activation", "bogus"], "unknown activation 'bogus'"),
    (["train", "--activation", "relu:0.2"], "--activation: relu takes no parameter; leaky_relu:SLOPE and elu:ALPHA "
                                            "take one"),
    (["train", "--activation", "elu:0"], "--activation: elu alpha must be a finite number > 0, got 0.0"),
    (["train", "--activation", "leaky_relu:nan"], "--activation: leaky_relu slope must be a finite number >= 0"),
    (["train", "--layers", "784,16:leaky_relu:x,10"],
     "--layers: '16:leaky_relu:x': leaky_relu's slope must be a number, like leaky_relu:0.01, got 'x'"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    run = nnaccel(*args, cwd=tmp_path)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_a_pgf_picture_without_its_tex_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """matplotlib writes .pgf through xelatex: without it, train and bench ran to the end and then failed
    with a traceback (no metrics printed), evaluate and show before their other checks. Refused up front now."""
    import shutil

    from nnaccel import plotting

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    message = ("--plot x.pgf: matplotlib writes a .pgf file with xelatex, which is not installed here; install "
               "it (TeX Live) or draw a .pdf, .svg or .png")
    for argv in (["train", "--data", "synthetic", "--layers", "784,10", "--epochs", "1", "--plot", "x.pgf"],
                 ["bench", "--quick", "--devices", "cpu", "--plot", "x.pgf"]):
        code, out, err = in_process(capsys, *argv)
        assert (code, out, err) == (2, "", f"nnaccel {argv[0]}: error: {message}\n")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    plotting.check_picture_path("x.pgf", "--plot")  # with its TeX there, taken
    assert list(tmp_path.iterdir()) == []


def test_evaluate_names_its_options_where_the_data_cannot_serve_them(tmp_path, monkeypatch, capsys):
    """--split test of a data set without one pointed the command line's user to the Python API's
    train_val_split; a --validation-split leaving a part empty was "fraction 0.99999 of 1024 samples
    leaves an empty training set", without the option: now as train says it."""
    monkeypatch.chdir(tmp_path)
    assert in_process(capsys, "train", "--data", "synthetic", "--layers", "784,10", "--epochs", "1", "--device",
                      "cpu", "--quiet", "--save", "m.npz")[0] == 0
    evaluate = ["evaluate", "m.npz", "--data", "synthetic", "--device", "cpu"]
    for extra, message in [
            (["--split", "test"], "--split test: --data synthetic has no test split; give --split validation (the "
                                  "part nnaccel train held out) or --split train"),
            (["--split", "validation", "--validation-split", "0.99999"],
             "--validation-split 0.99999 holds out 1024 of the 1024 samples: it must be from 1/1024 to 1023/1024, "
             "to leave at least 1 sample for training and 1 for validation"),
            (["--validation-split", "0.0001"], "--validation-split 0.0001 holds out 0 of the 1024 samples")]:
        code, out, err = in_process(capsys, *evaluate, *extra)
        assert code == 2 and out == "" and err.startswith(f"nnaccel evaluate: error: {message}"), err
        assert err.count("\n") == 1


def test_a_file_name_too_long_for_the_file_system_is_named_by_its_option(tmp_path, monkeypatch, capsys):
    """A 300-byte name was "error: [Errno 36] File name too long: 'aaa...'", naming no option."""
    monkeypatch.chdir(tmp_path)
    long = "a" * 300
    train = ["train", "--data", "synthetic", "--layers", "784,10", "--epochs", "1", "--device", "cpu"]
    for argv, what in [([*train, "--save", f"{long}.npz"], "--save"), ([*train, "--csv", f"{long}.csv"], "--csv"),
                       ([*train, "--plot", f"{long}.png"], "--plot"), (["evaluate", f"{long}.npz"], "checkpoint"),
                       (["export", "m.npz", f"{long}.onnx"], "the ONNX file")]:
        code, out, err = in_process(capsys, *argv)
        name = argv[-1]
        assert (code, out, err) == (2, "", f"nnaccel {argv[0]}: error: {what} {name}: the name is too long for the "
                                           f"file system (File name too long)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_behind_a_broken_link_says_how_it_is_broken(tmp_path, monkeypatch, capsys):
    """A link round in a loop was "checkpoint loop1 does not exist", where the output options said it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "gone.npz").symlink_to("nowhere.npz")
    (tmp_path / "chain.npz").symlink_to("gone.npz")  # named by the file at the chain's end
    for argv, problem in [(["evaluate", "loop1"], "checkpoint loop1 is a symbolic link that leads round in a loop"),
                          (["predict", "gone.npz", "x.png"],
                           "checkpoint gone.npz is a symbolic link to nowhere.npz, which does not exist"),
                          (["evaluate", "chain.npz"],
                           "checkpoint chain.npz is a symbolic link to nowhere.npz, which does not exist"),
                          (["evaluate", "missing.npz"], "checkpoint missing.npz does not exist")]:
        assert in_process(capsys, *argv, "--device", "cpu") == (2, "", f"nnaccel {argv[0]}: error: {problem}\n")


def test_data_of_another_width_names_the_data_and_the_checkpoint(tmp_path, monkeypatch, capsys):
    """evaluate and --resume on data of another width than the saved model's say which --data and which
    file disagree, not that some "x" has a wrong shape; a numpy.save file is named for what it is."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--data", "synthetic", "--layers", "784,16,10", "--epochs", "1", "--save", "m.npz",
                     "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    for command, split in ((["evaluate", "m.npz"], "test"), (["evaluate", "m.npz", "--split", "train"], "train"),
                           (["train", "--resume", "m.npz", "--epochs", "2"], "train")):
        assert cli.main([*command, "--data", "digits", "--device", "cpu"]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip().endswith(f"error: --data digits ({split} split) has 64 features per sample, but "
                                             f"m.npz holds a model of 784 inputs: give the data it was trained on"), \
            captured.err
    np.save("digits.npy", np.zeros((10, 784), np.float32))
    for command in (["train", "--epochs", "1"], ["evaluate", "m.npz"]):
        assert cli.main([*command, "--data", "digits.npy", "--device", "cpu"]) == 2
        assert "error: digits.npy is one .npy array, not a data set: give a folder of MNIST IDX files or a " \
               "Keras-style .npz" in capsys.readouterr().err


def test_evaluate_refuses_a_damaged_test_split_rather_than_score_the_validation_part(tmp_path, monkeypatch, capsys):
    """With no --split, evaluate falls back to the held-out part only where the data has no test split."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    train = {"x_train": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), "y_train": np.arange(40) % 10}
    np.savez("no-test.npz", **train)
    np.savez("bad-test.npz", **train, x_test=np.full((10, 28, 28), 300, np.uint16), y_test=np.arange(10))
    np.savez("half-test.npz", **train, x_test=train["x_train"][:10])
    assert cli.main(["train", "--data", "no-test.npz", "--layers", "784,10", "--epochs", "1", "--batch-size", "8",
                     "--save", "m.npz", "--quiet", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith(" after 1 epoch on cpu\n")  # one epoch, not "1 epochs"
    assert cli.main(["evaluate", "m.npz", "--data", "no-test.npz", "--device", "cpu"]) == 0
    assert "validation accuracy" in capsys.readouterr().out
    for data, message in (("bad-test.npz", "bad-test.npz[x_test]: uint16 pixels range from 300 to 300"),
                          ("half-test.npz", "half-test.npz: no 'y_test' array")):
        assert cli.main(["evaluate", "m.npz", "--data", data, "--device", "cpu"]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and not captured.out, captured


def test_an_output_over_an_input_or_another_output_is_refused_and_nothing_is_lost(tmp_path, monkeypatch, capsys):
    """Writing the ONNX file, a checkpoint, a CSV log or a picture over a file the command reads (or another
    output) would destroy it: refused up front, naming both; --save over --resume is how a run goes on."""
    import numpy as np

    from nnaccel import checkpoint, cli

    monkeypatch.chdir(tmp_path)
    train = ["train", "--layers", "64,16,10", "--epochs", "1", "--device", "cpu", "--quiet"]
    assert cli.main([*train, "--data", "digits", "--save", "m.npz"]) == 0
    np.savez("d.npz", x_train=np.zeros((20, 28, 28), np.uint8), y_train=np.arange(20) % 10)
    (tmp_path / "link.npz").symlink_to("m.npz")
    (tmp_path / "digit.png").write_bytes(b"a picture")
    (tmp_path / "idx").mkdir()  # an MNIST folder: its IDX files (of both splits) are the data
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "idx" / name).write_bytes(b"IDX bytes")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for args, message in [
            (["export", "m.npz", "./m.npz"], "the ONNX file ./m.npz would overwrite the model m.npz"),
            (["export", "link.npz", "m.npz"], "the ONNX file m.npz would overwrite the model link.npz"),
            ([*train, "--data", "d.npz", "--save", "d.npz"], "--save d.npz would overwrite the --data file d.npz"),
            ([*train, "--data", "d.npz", "--csv", "d.npz"], "--csv d.npz would overwrite the --data file d.npz"),
            ([*train, "--data", "digits", "--save", "new.npz", "--csv", "new.npz"],
             "--csv new.npz would overwrite the --save checkpoint new.npz"),
            ([*train, "--resume", "m.npz", "--data", "digits", "--csv", "m.npz"],
             "--csv m.npz would overwrite the --resume checkpoint m.npz"),
            ([*train, "--data", "idx", "--save", "idx/t10k-labels-idx1-ubyte.gz"],
             "--save idx/t10k-labels-idx1-ubyte.gz would overwrite the --data file idx/t10k-labels-idx1-ubyte.gz"),
            ([*train, "--data", "idx/", "--csv", "idx/train-images-idx3-ubyte"],
             "--csv idx/train-images-idx3-ubyte would overwrite the --data file idx/train-images-idx3-ubyte"),
            ([*train, "--data", "idx", "--plot", "idx/t10k-images-idx3-ubyte"],  # not there, but read first
             "--plot idx/t10k-images-idx3-ubyte would be read in place of the --data file "
             "idx/t10k-images-idx3-ubyte.gz"),
            (["show", "m.npz", "--activations", "digit.png", "--out", "digit.png"],
             "--out digit.png would overwrite the --activations image digit.png")]:
        assert cli.main(args) == 2, args
        assert f"error: {message}; give another file" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert cli.main(["train", "--resume", "m.npz", "--save", "m.npz", "--data", "digits", "--epochs", "2", "--device",
                     "cpu", "--quiet"]) == 0
    assert checkpoint.read(tmp_path / "m.npz")[0]["trainer"]["epoch"] == 2
    for _ in range(2):  # a built-in data set is not the file of its name
        assert cli.main([*train, "--data", "digits", "--save", "digits"]) == 0


def test_more_layers_than_a_checkpoint_holds_are_refused_before_training_and_saving(tmp_path, monkeypatch, capsys):
    """A checkpoint the loader would refuse (checkpoint.MAX_LAYERS, made 3 here) is never trained for nor written."""
    import nnaccel as nn
    from nnaccel import checkpoint, cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "MAX_LAYERS", 3)
    argv = ["train", "--data", "synthetic", "--layers", "784,10,10,10,10", "--save", "m.npz", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "nnaccel train: error: the network has 4 layers; a checkpoint holds at most 3\n"
    with pytest.raises(nn.ConfigError, match="a model of 4 layers cannot be saved: a checkpoint holds at most 3"):
        nn.Sequential(*(nn.Dense(4, 4) for _ in range(4))).save("m.npz")
    assert list(tmp_path.iterdir()) == []


def test_training_data_without_a_digit_still_makes_ten_outputs(tmp_path, monkeypatch, capsys):
    """A training split that lacks the 9s (a small subset) trains a 10-output network, which scores a test
    split that has them; --layers must end with 10 too."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("miss9.npz", x_train=rng.integers(0, 256, (90, 28, 28), dtype=np.uint8), y_train=np.arange(90) % 9,
             x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_test=np.arange(20) % 10)
    train = ["train", "--data", "miss9.npz", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet"]
    assert cli.main([*train, "--layers", "784,16,10", "--save", "m.npz"]) == 0
    assert cli.main(["evaluate", "m.npz", "--device", "cpu"]) == 0
    assert "\ntest accuracy " in capsys.readouterr().out
    assert cli.main([*train, "--layers", "784,16,9"]) == 2
    assert "--layers ends with 9 outputs but the data has 10 classes" in capsys.readouterr().err


def test_a_reader_that_leaves_ends_the_command_quietly():
    """``nnaccel info | head -0``: the output's reader is gone before the first write; no error line and no
    traceback, and the exit code of a writer killed by SIGPIPE (128 + 13), as git's."""
    process = subprocess.Popen([*NNACCEL, "info"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 141 and stderr == ""
    closed = subprocess.run(["bash", "-c", f"'{sys.executable}' -m nnaccel.cli info >&-"], capture_output=True,
                            text=True, timeout=300)  # no stdout at all: nothing to flush, nothing to say
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr


def test_a_command_started_with_stderr_closed_prints_its_results_alone(tmp_path):
    """``2>&-``: train failed (sys.stderr None has no isatty) and evaluate's status lines went into
    stdout, before its JSON; now what stderr would say goes nowhere and stdout holds the results alone."""
    command = (f"'{sys.executable}' -m nnaccel.cli train --data synthetic --layers 784,10 --epochs 1 --device cpu "
               f"--save m.npz --json 2>&- && '{sys.executable}' -m nnaccel.cli evaluate m.npz --data synthetic "
               f"--device cpu --json --confusion c.png 2>&-")
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and run.stderr == "", run.stdout + run.stderr
    trained, evaluated = map(json.loads, run.stdout.splitlines())
    assert trained["epochs"] == 1 and evaluated["accuracy"] == trained["accuracy"]
    assert (tmp_path / "c.png").exists()


def test_python_m_nnaccel_is_the_command():
    """``python -m nnaccel`` runs the nnaccel command (was: "No module named nnaccel.__main__")."""
    run = subprocess.run([sys.executable, "-m", "nnaccel", "--version"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("nnaccel "), run.stderr


def test_info():
    run = nnaccel("info")
    assert run.returncode == 0 and "nnaccel" in run.stdout and "numpy" in run.stdout
    assert "resolves to" in run.stdout


def test_save_takes_a_file_name_with_braces_as_it_is(tmp_path):
    """--save is a plain name; only ModelCheckpoint's own path is an {epoch} template, checked when made."""
    run = nnaccel("train", "--data", "synthetic", "--layers", "784,10", "--epochs", 1, "--save", "m{}{a}.npz",
                  "--quiet", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m{}{a}.npz"]
    import nnaccel as nn

    for template in ("m{a}.npz", "m{}.npz", "m{epoch[0]}.npz", "m{epoch.real.x}.npz", "m{epoch:q}.npz"):
        with pytest.raises(nn.ConfigError, match=rf"ModelCheckpoint path '{re.escape(template)}' is not a template of "
                                                 r"\{epoch\} only"):
            nn.ModelCheckpoint(template)
    assert nn.ModelCheckpoint("m{{a}}-{epoch}.npz").path.format(epoch=3) == "m{a}-3.npz"


def _strict_json(text):
    """``text`` parsed as RFC 8259 JSON, which has no NaN or Infinity (Python's json writes and reads them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_json_with_null_for_what_is_not_finite(tmp_path, monkeypatch, capsys):
    """A model whose outputs overflow has a NaN loss and NaN probabilities: --json writes null for them, as
    ``json.dumps(allow_nan=False)`` demands, not NaN, which JSON readers other than Python's refuse."""
    import numpy as np
    from PIL import Image

    import nnaccel as nn
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Dense(784, 10), device="cpu")
    model[0].params["weight"].data[...] = 3e38  # finite, so it loads; every logit overflows
    model.save("huge.npz")
    Image.fromarray(np.pad(np.full((20, 8), 255, np.uint8), 4)).save("one.png")
    with np.errstate(over="ignore", invalid="ignore"):
        assert cli.main(["evaluate", "huge.npz", "--data", "synthetic", "--json", "--device", "cpu"]) == 0
        result = _strict_json(capsys.readouterr().out)
    assert result["loss"] is None and 0 <= result["accuracy"] <= 1
    # predict names no digit for such outputs (the argmax of NaN named 0), and NumPy's warnings stay quiet
    for json_option in ([], ["--json"]):
        assert cli.main(["predict", "huge.npz", "one.png", "one.png", *json_option, "--device", "cpu"]) == 2
        captured = capsys.readouterr()
        assert captured.err == "nnaccel predict: error: huge.npz computes outputs that are not finite for one.png " \
                               "(and 1 more): its weighted sums overflow float32, so it names no digit; retrain it\n"
        assert not captured.out


def test_evaluate_refuses_a_validation_split_for_a_split_it_does_not_hold_out(tmp_path, monkeypatch, capsys):
    """--validation-split says what --split validation holds out: with the test or train split, given or the
    default where the data has a test split, it would change nothing, so it is refused naming the split."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("d.npz", x_train=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y_train=np.arange(40) % 10,
             x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10))
    assert cli.main(["train", "--data", "d.npz", "--layers", "784,10", "--epochs", "1", "--batch-size", "8",
                     "--save", "m.npz", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    evaluate = ["evaluate", "m.npz", "--validation-split", "0.2", "--device", "cpu"]
    for split, said in ((["--split", "test"], "test"), (["--split", "train"], "train"),
                        ([], "test (--data d.npz has one: evaluate's default)")):
        assert cli.main([*evaluate, *split]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"nnaccel evaluate: error: --validation-split is --split validation's; the split is " \
                               f"{said}: give --split validation, or leave --validation-split out\n"
        assert not captured.out
    assert cli.main([*evaluate, "--split", "validation"]) == 0
    assert capsys.readouterr().out.startswith("validation accuracy ")


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of bytes that are not UTF-8: Linux file systems")
def test_a_file_name_that_is_not_utf8_is_printed_as_given(tmp_path):
    """Python reads such a name's bytes into surrogates; printed under a UTF-8 locale (strict, unlike C.UTF-8's)
    they were a UnicodeEncodeError and a traceback, and on stderr '\\udcff'; now its bytes, as ls prints them."""
    import os

    import numpy as np
    from PIL import Image

    import nnaccel as nn

    nn.Sequential(nn.Dense(784, 10), device="cpu").save(tmp_path / "m.npz")
    picture = os.fsdecode(b"digit-\xff.png")
    Image.fromarray(np.pad(np.full((20, 8), 255, np.uint8), 4)).save(tmp_path / picture)
    run = subprocess.run([*NNACCEL, "predict", "m.npz", picture, "--device", "cpu"],
                         capture_output=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert run.returncode == 0 and run.stderr == b"", run.stderr.decode(errors="replace")
    assert run.stdout.startswith(b"digit-\xff.png: ")
    run = subprocess.run([*NNACCEL, "predict", "m.npz", os.fsdecode(b"gone-\xff.png"), "--device", "cpu"],
                         capture_output=True, cwd=tmp_path, timeout=300)  # on stderr too (it showed '\udcff')
    assert run.returncode == 2 and run.stderr == b"nnaccel predict: error: gone-\xff.png: no such image file\n", \
        run.stderr
    run = subprocess.run([*NNACCEL, "predict", "m.npz", os.fsdecode("café-".encode() + b"\xff.png"), "--device", "cpu"],
                         capture_output=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert run.returncode == 2, run.stderr  # a character the stream lacks: escaped, not a UnicodeEncodeError
    assert run.stderr == b"nnaccel predict: error: caf\\xe9-\xff.png: no such image file\n", run.stderr
