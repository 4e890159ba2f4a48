"""The nnaccel command: train, evaluate, predict, show, export, bench, info.

User errors (bad options, bad files, unusable devices) print one line and
exit non-zero, with no traceback.
"""

import argparse
import codecs
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import sys

import numpy

from . import (__version__, activations, architectures, bench, checkpoint, datasets, images, losses, optimizers,
               plotting, visualize)
from .backend import PRECISIONS, cuda_status, resolve_device
from .callbacks import CSVLogger, EarlyStopping, ModelCheckpoint
from .errors import CheckpointError, ConfigError, DataError, NnaccelError, OutputError, describe_range, number_option
from .layers import Dense, Dropout, Flatten, Maxout, RandomShift, describe_shape
from .model import Sequential
from .trainer import Trainer, TrainingDiverged

DEFAULT_LR = {"sgd": 0.1, "adam": 0.001, "adamw": 0.001}
DEFAULT_EPOCHS = 20
DEFAULT_VALIDATION_SPLIT = 0.2
DEFAULT_DATA = datasets.SAMPLE  # the embedded MNIST digits
# What `nnaccel train` trains on 28x28 images when no architecture is given: the best recipe found for
# the MNIST sample within 2 minutes on a 2-core CPU (benchmarks/recipes.py; README, "The default recipe").
INTERRUPTED_RUN_FILE = "nnaccel-interrupted.npz"  # where a stopped run without --save is checkpointed (first)
DEFAULT_RECIPE = {"model": "default", "augment": 2, "schedule": "cosine", "lr": 0.05, "epochs": 15}


def _int_from(minimum, maximum=None):
    """An argparse type for integers from ``minimum`` (to ``maximum``)."""
    return number_option(minimum, maximum, integer=True)


# The numeric options' types: each refuses NaN, infinities and what is out of its range, and says the range.
_positive_int = _int_from(1)
_non_negative_int = _int_from(0)
# Counts a checkpoint keeps (epochs, a step schedule's size, the batch, early stopping's patience) go up to the
# 2**63 - 1 it reads back: a larger --epochs trained, but no command could open its checkpoints.
_saved_count = _int_from(1, checkpoint.MAX_COUNT)
_saved_patience = _int_from(0, checkpoint.MAX_COUNT)
# Only the seed's low 32 bits reach the Dropout and RandomShift streams (backend.base.uniform): a larger
# seed would repeat a smaller one's draws.
_seed = _int_from(0, 2**32 - 1)
_positive_float = number_option(0, low_open=True)
_non_negative_float = number_option(0)
_rate = number_option(0, 1, high_open=True)  # dropout; momentum too: at >= 1 SGD's velocity never decays
_fraction = number_option(0, 1, low_open=True, high_open=True)  # --validation-split
_decay = number_option(0, 1, low_open=True)  # the step schedule's gamma: above 1 it would raise the rate


def _betas(text):
    """``train --betas B1,B2``: Adam's two decay rates, each in [0, 1) (at 1 its averages never forget)."""
    parts = text.split(",")
    try:
        betas = tuple(float(part) for part in parts)
    except ValueError:
        betas = ()
    if len(betas) != 2 or any(not 0.0 <= beta < 1.0 for beta in betas):  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2, each >= 0 and < 1, such as Adam's default "
                                         f"0.9,0.999, got {text!r}")
    return betas


def _split_text(text):
    """``train --validation-split`` as argparse reads it: a number (its range, which depends on the data too,
    is checked once the data is loaded)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 and < 1, got {text!r}") from None


# argparse takes '-inf', '-nan' and '-1e-3' for option names ("expected one argument"); these are values.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and a hint), not the whole usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own: -5 and -.5 only

    commands = None  # the top parser's subparsers action

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but the command refuses the arguments none of its options takes, pointing at its own
        help (argparse's top parser says ``nnaccel: error: ...`` and points at ``nnaccel --help``)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.choices.get(getattr(namespace, "command", None)) if self.commands else None
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


DEVICE_HELP = "cpu, cuda, cuda:N or auto (default)"  # every command's --device
# What EarlyStopping can watch: the metrics every epoch logs.
MONITORED = ["val_loss", "val_accuracy", "loss", "accuracy"]


def build_parser():
    parser = _Parser(prog="nnaccel", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nnaccel {__version__}")
    commands = parser.commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a network (default: a small CNN on the MNIST sample)",
                                description="Train a network and report its accuracy on a held-out part of the "
                                            "data. " + architectures.__doc__.split("Grammar:")[0].strip(),
                                epilog="--layers grammar, comma-separated, input to output: N (Dense of N units; "
                                       "a list of Dense widths alone starts with the input width: 784,256,10), "
                                       "maxoutN[pP] (Maxout: N units, each the max of P pieces, default 2), "
                                       "convCkK[sS][pP] (Conv2D: C filters K x K, stride S, padding P), "
                                       "maxpoolK[sS][pP], avgpoolK[sS][pP], bn (BatchNorm), dropR (Dropout R), "
                                       "shiftM (RandomShift M px), flatten (added before the first Dense or "
                                       "Maxout after image layers). Dense and conv take --activation and bn is "
                                       "linear, unless one names its own: N:ACT, conv...:ACT, bn:ACT (not the "
                                       "output layer: the loss takes its logits); ACT is NAME[:VALUE] as "
                                       "--activation's, e.g. 128:leaky_relu:0.2. E.g. "
                                       "conv6k5p2,maxpool2,conv16k5,maxpool2,120,84,10, or with PyTorch's "
                                       "Conv2d-BatchNorm2d-ReLU blocks conv6k5p2:linear,bn:relu,maxpool2,120,10. "
                                       "Presets (--model): "
                                       f"{', '.join(f'{k} = {v}' for k, v in architectures.PRESETS.items())}.")
    data = train.add_argument_group("data")
    data.add_argument("--data",
                      help="'mnist' (the 7,996 real 28x28 MNIST digits nnaccel ships, default; with --resume the "
                           "checkpoint's data), 'digits' "
                           "(scikit-learn's 8x8 digits: pip install 'nnaccel[digits]'), 'synthetic', an MNIST "
                           "folder of IDX files, or a Keras mnist.npz")
    data.add_argument("--validation-split", type=_split_text,
                      help="fraction of the training split held out for validation, in [0, 1): 0 trains on "
                           "all of it and validates on none, as Keras's validation_split=0 (default 0.2; with "
                           "--resume, the run's)")
    data.add_argument("--augment", type=_non_negative_int, nargs="?", const=2, metavar="PIXELS",
                      help="shift each training image by up to PIXELS (default 2) in each direction, drawn per "
                           "image and epoch (a RandomShift layer first, and a Flatten after it for an MLP; square "
                           "images only; below half the side)")
    net = train.add_argument_group("network")
    shape = net.add_mutually_exclusive_group()
    shape.add_argument("--layers", help="the architecture, e.g. 784,256,10 or conv6k5p2,maxpool2,120,10 (grammar "
                                        "below; default: on 28x28 images the default recipe, " +
                                        ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULT_RECIPE.items()) +
                                        "; on other data inputs,256,classes)")
    shape.add_argument("--model", type=str.lower, choices=sorted(architectures.PRESETS),
                       help="a named architecture")
    net.add_argument("--activation", metavar="NAME[:VALUE]",
                     help=f"hidden-layer activation: {', '.join(activations.ACTIVATIONS)} (default relu); a "
                          "parametrised one takes its value after a colon: leaky_relu:0.2 (slope, default 0.01), "
                          "elu:0.5 (alpha, default 1)")
    net.add_argument("--dropout", type=_rate, metavar="RATE",
                     help="Dropout of RATE, in [0, 1), after every hidden Dense or Maxout layer")
    fit = train.add_argument_group("optimisation")
    fit.add_argument("--loss", type=str.lower, choices=sorted(losses.LOSSES),
                     help="softmax_cross_entropy (default); mse on one-hot labels; sigmoid_cross_entropy on one-hot "
                          "labels, one-vs-rest (its accuracy per output, as Keras's binary accuracy)")
    fit.add_argument("--optimizer", type=str.lower, choices=sorted(optimizers.OPTIMIZERS), help="default sgd")
    fit.add_argument("--lr", type=_positive_float, help="learning rate, > 0 (default 0.1 for SGD, 0.001 for Adam; "
                                                        "the default recipe's on 28x28 images)")
    fit.add_argument("--momentum", type=_rate, help="SGD momentum, in [0, 1) (default 0.9)")
    fit.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (SGD)")
    fit.add_argument("--weight-decay", type=_non_negative_float, default=None,
                     help="L2 weight decay (SGD, Adam) or decoupled decay (AdamW; its default 0.01), >= 0")
    fit.add_argument("--betas", type=_betas, metavar="B1,B2",
                     help="Adam's and AdamW's decay rates of the gradient's averages, each in [0, 1) (default "
                          "0.9,0.999)")
    fit.add_argument("--eps", type=_positive_float, help="Adam's and AdamW's epsilon, > 0 (default 1e-8)")
    fit.add_argument("--schedule", type=str.lower, choices=["step", "cosine"],
                     help="learning-rate schedule over the epochs")
    fit.add_argument("--step-size", type=_saved_count, help="step schedule: epochs per decay (default 10)")
    fit.add_argument("--gamma", type=_decay,
                     help="step schedule: the decay factor, in (0, 1] (default 0.1)")
    fit.add_argument("--eta-min", type=_non_negative_float,
                     help="cosine schedule: the final learning rate, >= 0 and below --lr (default 0; over "
                          "--epochs epochs)")
    fit.add_argument("--epochs", type=_saved_count, help="total epochs (default 20; the default recipe's on 28x28 "
                                                          "images; with --resume, the run's own total)")
    fit.add_argument("--batch-size", type=_saved_count,
                     help="samples per step, at most the training samples (default 64)")
    fit.add_argument("--seed", type=_seed, help=f"0 to {2**32 - 1} (default 0)")
    run = train.add_argument_group("the run")
    run.add_argument("--device", default="auto", help=DEVICE_HELP)
    run.add_argument("--save", metavar="FILE", help="checkpoint (.npz) written after every epoch")
    run.add_argument("--resume", metavar="CHECKPOINT", help="continue training from a checkpoint")
    run.add_argument("--early-stopping", type=_saved_patience, metavar="PATIENCE",
                     help="stop when the validation loss (--monitor) has not improved for PATIENCE epochs, >= 0 "
                          "(0, Keras's default patience, stops at the first epoch without improvement, as 1 "
                          "does; the best weights are kept, and --save ends with them)")
    run.add_argument("--monitor", type=str.lower, choices=MONITORED,
                     help="early stopping: the metric watched (default val_loss; loss and accuracy, of the "
                          "training data, need no validation part)")
    run.add_argument("--min-delta", type=_non_negative_float, metavar="DELTA",
                     help="early stopping: the least change of the metric that counts as an improvement, >= 0 "
                          "(default 0)")
    run.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                     help="on CUDA, run every step eagerly instead of replaying it from a CUDA graph")
    run.add_argument("--precision", type=str.lower, choices=PRECISIONS, default="fp32",
                     help="how a GPU computes the float32 weighted sums: fp32 (default), tf32 or bf16 on the "
                          "tensor cores (inputs rounded, fp32 accumulation; bf16 also stores the Dense and conv "
                          "layers' activations and gradients in bfloat16); the CPU computes fp32")
    run.add_argument("--distributed", action="store_true",
                     help="data-parallel over the processes of 'mpiexec -n N' (MPI on CPUs, NCCL between "
                          "GPUs, one GPU per rank); --batch-size is per rank; only rank 0 prints and saves")
    report = train.add_argument_group("output")
    report.add_argument("--csv", metavar="FILE", help="write one row of metrics per epoch to a CSV file (a fresh "
                        "run starts it afresh; with --resume, appended to)")
    report.add_argument("--plot", metavar="FILE", help="draw the training curves to a PNG")
    report.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    report.add_argument("--quiet", action="store_true", help="no progress output")

    evaluate = commands.add_parser("evaluate", help="loss and accuracy of a saved model on a data set")
    evaluate.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    evaluate.add_argument("--data", help="'mnist' (the sample nnaccel ships), 'digits', 'synthetic', an MNIST folder "
                                         "or a mnist.npz (default: the data the checkpoint was trained on, else mnist)")
    evaluate.add_argument("--split", type=str.lower, choices=["test", "train", "validation"],
                          help="default: test where the data has one, else validation: the part 'nnaccel train' "
                               "held out (--validation-split of the train split, with the checkpoint's seed)")
    evaluate.add_argument("--validation-split", type=_fraction,
                          help="the fraction --split validation holds out, in (0, 1) (default: the one the "
                               "checkpoint was trained with, else 0.2)")
    evaluate.add_argument("--device", default="auto", help=DEVICE_HELP)
    evaluate.add_argument("--json", action="store_true", help="print the loss and accuracy as one JSON object")
    evaluate.add_argument("--confusion", metavar="FILE", help="draw the confusion matrix to a PNG and list "
                                                              "the most confused pairs")
    evaluate.add_argument("--errors", metavar="FILE", help="draw the worst-classified images to a PNG")

    predict = commands.add_parser("predict", help="the digit in each picture (PNG, JPEG, ...), with the top-3 "
                                                  "probabilities")
    predict.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="pictures of one handwritten digit each")
    predict.add_argument("--device", default="auto", help=DEVICE_HELP)
    predict.add_argument("--json", action="store_true", help="one JSON object per picture, one per line")

    show = commands.add_parser("show", help="pictures of what a model learned: first-layer weights, activations")
    show.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    show.add_argument("--weights", metavar="FILE", help="draw the first layer's weights to a PNG")
    show.add_argument("--activations", metavar="IMAGE", help="a picture of a digit whose activations to draw")
    show.add_argument("--out", metavar="FILE", help="the PNG for --activations")
    show.add_argument("--device", default="auto", help=DEVICE_HELP)

    export = commands.add_parser("export", help="write a saved model as ONNX (pip install 'nnaccel[onnx]')")
    export.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    export.add_argument("onnx_path", metavar="OUT.onnx", help="the ONNX file to write (batch dimension dynamic)")

    commands.add_parser("info", help="versions, devices found, and why a GPU is not usable")
    bench.add_parser(commands)
    return parser


def _refusal(message):
    """A ConfigError that every rank of a distributed run raises alike, so rank 0 says it once."""
    error = ConfigError(message)
    error.all_ranks = True
    return error


def _check_validation_split(args, samples):
    """The samples ``--validation-split`` holds out of ``samples``, or a ConfigError unless it leaves at least
    one on each side (train's and evaluate's --split validation alike)."""
    held_out = round(samples * args.validation_split)  # as datasets.train_val_split rounds
    if args.validation_split:  # 0 holds out none: every sample trains
        if samples < 2:
            raise _refusal(f"--data {args.data} has {samples} sample{'s' * (samples != 1)}: training and its "
                           f"validation need at least 2")
        if not 0 < held_out < samples:
            raise _refusal(f"--validation-split {args.validation_split} holds out {held_out} of the {samples} "
                           f"samples: it must be from 1/{samples} to {samples - 1}/{samples}, to leave at least 1 "
                           f"sample for training and 1 for validation")
    return held_out


def _check_ranges_against_data(args, trainer, samples):
    """The ranges of ``nnaccel train``'s options that depend on the data (``samples``, before the validation
    split) or on other options: a ConfigError naming the option and its valid range; a warning where a
    setting is valid but cannot take effect."""
    held_out = _check_validation_split(args, samples)
    train_samples, ranks, batch = samples - held_out, trainer.world_size, trainer.batch_size
    if train_samples < ranks:
        raise _refusal(f"--validation-split {args.validation_split} leaves {train_samples} training "
                       f"sample{'s' * (train_samples != 1)} for "
                       f"{ranks} ranks: each rank needs at least 1")
    if batch * ranks > train_samples:
        option = f"the batch size of {args.resume}" if args.resume else "--batch-size"
        within = (f"the {train_samples} training sample{'s' * (train_samples != 1)}"
                  + (f" over {ranks} ranks" if ranks > 1 else ""))
        raise _refusal(f"{option} must be {describe_range(1, train_samples // ranks, integer=True)} ({within}), "
                       f"got {batch}")
    if args.augment and not args.resume:
        height, width = trainer.model.input_shape[1:]
        widest = (min(height, width) - 1) // 2
        if args.augment > widest:
            raise _refusal(f"--augment must be {describe_range(0, widest, integer=True)} on {height}x{width} "
                           f"images (below half the side: each image's centre stays in it), got {args.augment}")
    lr = trainer.optimizer.base_lr
    if args.schedule == "cosine" and not args.resume and not args.eta_min < lr:
        raise _refusal(f"--eta-min must be {describe_range(0, lr, high_open=True)} (below the learning rate, "
                       f"which the cosine schedule lowers to --eta-min), got {args.eta_min}")
    epochs = args.epochs - trainer.epoch
    waits = max(args.early_stopping or 0, 1)  # the epochs without improvement it stops after (patience 0: 1)
    if args.early_stopping is not None and 0 < epochs <= waits:
        _say(args, f"warning: --early-stopping {args.early_stopping} cannot stop a run of {epochs} more epoch(s): "
                   f"it stops after {waits} epoch{'s' * (waits != 1)} without improvement")
    if args.schedule == "step" and not args.resume and args.step_size >= args.epochs:
        _say(args, f"warning: --step-size {args.step_size} >= --epochs {args.epochs}: the step schedule never "
                   f"lowers the learning rate")


def _json(value):
    """``value`` as one line of strict JSON, which has no NaN or infinities: those are null (a loss or
    probability of a model whose outputs overflow)."""
    def finite(item):
        if isinstance(item, float):
            return item if math.isfinite(item) else None
        if isinstance(item, dict):
            return {key: finite(value) for key, value in item.items()}
        return [finite(value) for value in item] if isinstance(item, (list, tuple)) else item

    return json.dumps(finite(value), allow_nan=False)


def _say(args, message):
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _apply_default_recipe(args, features):
    """With no architecture given on 28x28 images, the default recipe fills the options left unset."""
    if args.model or args.layers or args.resume or features != 28 * 28:
        return
    for option, value in DEFAULT_RECIPE.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    _say(args, "the default recipe: " + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in DEFAULT_RECIPE)
         + f" ({architectures.PRESETS['default']})")


def _build_model(args, features, classes, device):
    """The network the options describe (``--model``/``--layers``, ``--dropout``, ``--augment``)."""
    layers, input_shape = architectures.build(args.model or args.layers or f"{features},256,{classes}", features,
                                              classes, activations.from_text(args.activation))
    if args.dropout:
        hidden = [i for i, layer in enumerate(layers[:-1]) if isinstance(layer, (Dense, Maxout))]
        if not hidden:
            raise _refusal(f"--dropout {args.dropout} goes after each hidden Dense or Maxout layer, and the network "
                           f"has none")
        for index in reversed(hidden):
            layers.insert(index + 1, Dropout(args.dropout))
    if args.augment:
        if len(input_shape) != 3:
            side = math.isqrt(features)
            if side * side != features:
                raise ConfigError(f"--augment shifts images, but the data's {features} values per sample are not "
                                  f"a square image")
            input_shape = (1, side, side)
            layers.insert(0, Flatten())  # the shifted images go on flat to the first Dense
        layers.insert(0, RandomShift(args.augment))
    if len(layers) > checkpoint.MAX_LAYERS:  # refused before training, not at its first checkpoint
        raise _refusal(f"the network has {len(layers):,} layers; a checkpoint holds at most "
                       f"{checkpoint.MAX_LAYERS:,}")
    return Sequential(*layers, device=device, seed=args.seed, input_shape=input_shape)


def _schedule(args):
    if args.schedule == "step":
        return optimizers.StepLR(args.step_size, args.gamma)
    if args.schedule == "cosine":
        return optimizers.CosineAnnealing(args.epochs, args.eta_min)
    return None


# The options of one optimizer: whose they are, and the --optimizer that takes them.
OPTIMIZER_OPTIONS = {"momentum": ("SGD's", "sgd"), "nesterov": ("SGD's", "sgd"),
                     "betas": ("Adam's and AdamW's", "adam or adamw"), "eps": ("Adam's and AdamW's", "adam or adamw")}


def _trainer_from_options(args, features, classes, device):
    model = _build_model(args, features, classes, device)
    lr = args.lr or DEFAULT_LR[args.optimizer]
    own = ("momentum", "nesterov") if args.optimizer == "sgd" else ("betas", "eps")
    options = {option: getattr(args, option) for option in own if getattr(args, option) is not None}
    for option, (owner, optimizer) in OPTIMIZER_OPTIONS.items():
        if option in args.given and option not in own:
            raise _refusal(f"--{option} is {owner}; the optimizer is {args.optimizer} (give --optimizer {optimizer})")
    for option, schedule in (("step_size", "step"), ("gamma", "step"), ("eta_min", "cosine")):
        if option in args.given and args.schedule != schedule:
            raise _refusal(f"--{option.replace('_', '-')} is the {schedule} schedule's; the schedule is "
                           f"{args.schedule or 'none'} (give --schedule {schedule})")
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    return Trainer(model, loss=args.loss, optimizer=optimizers.get(args.optimizer, lr=lr, **options),
                   batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, schedule=_schedule(args),
                   **_run_settings(args))


def _run_settings(args):
    """The Trainer's settings of how this run computes, the same for a new run and a resumed one."""
    return {"communicator": getattr(args, "communicator", None), "cuda_graphs": args.cuda_graphs,
            "precision": args.precision}


def _trainer_from_checkpoint(args, device):
    """Model, optimizer, batch size and seed as saved: a resumed run continues the same run."""
    meta, arrays = checkpoint.read(args.resume)
    state = meta.get("trainer")
    if state is None or "optimizer" not in meta:
        raise CheckpointError(f"{args.resume} holds a model but no training state; it cannot be resumed")
    trainer = Trainer(checkpoint.model_from(meta, arrays, args.resume, device), loss=state["loss"],
                      optimizer=optimizers.get(meta["optimizer"]["config"]),
                      batch_size=_rank_batch(args, state["batch_size"]), seed=state["seed"], quiet=args.quiet,
                      schedule=optimizers.schedule_from(state.get("schedule")),
                      **_run_settings(args))
    return trainer.restore(meta, arrays, args.resume)


# Ctrl-C, and what Slurm, Kubernetes and spot-instance reclaims send before they kill.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_at_once(signum, frame):
    """Outside training's own handling: stop now, through the ``finally`` blocks, with exit status
    128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as training does."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _stopping_on_signals(trainer):
    """While training and saving: the first SIGINT or SIGTERM asks ``trainer`` to stop after the
    current step (yields the list that receives it); a second one stops at once, exiting 128 + its
    number through the ``finally`` blocks, so a save it cuts short removes its temporary file.
    Once a stopped run is saved, more stop signals are ignored while the command ends (``main``
    restores the handlers when called from Python): Python's own would raise KeyboardInterrupt
    anywhere, even in the interpreter's shutdown."""
    received = []

    def stop_after_the_step(signum, frame):
        for number in STOP_SIGNALS:
            signal.signal(number, _stop_at_once)
        received.append(signum)
        trainer.request_stop()

    previous = {number: signal.signal(number, stop_after_the_step) for number in STOP_SIGNALS}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_IGN if received else handler)


def _fit_and_save(trainer, args, data, validation_data):
    """fit(), with Ctrl-C or SIGTERM finishing the current step and the checkpoint always written;
    the signal that stopped it, else None."""
    # --save is a plain file name: its braces are not ModelCheckpoint's {epoch} template
    callbacks = [ModelCheckpoint(args.save.replace("{", "{{").replace("}", "}}"))] if args.save else []
    if args.early_stopping is not None:
        callbacks.append(EarlyStopping(monitor=args.monitor, patience=args.early_stopping, min_delta=args.min_delta))
    if args.csv:
        # a resumed run appends to the log of the epochs it goes on from; one stopped before its first epoch
        # ended wrote none, so a log there is an older run's, replaced as a fresh run's would be
        callbacks.append(CSVLogger(args.csv, append=bool(args.resume) and trainer.epoch > 0))
    with _stopping_on_signals(trainer) as received:
        try:
            trainer.fit(*data, epochs=args.epochs - trainer.epoch, validation_data=validation_data,
                        callbacks=callbacks)
        except TrainingDiverged as error:
            if args.save:
                try:
                    trainer.save_checkpoint(args.save)
                except OutputError as refused:  # the weights overflowed a step before the loss did
                    error.args = (f"{error}; {refused}",)  # the same error (every rank's, when distributed)
            raise
        if trainer.interrupted:
            args.stop_checkpoint = args.save or _interrupted_run_file(args.resume)
            trainer.save_checkpoint(args.stop_checkpoint)
        elif args.save and args.early_stopping is not None:  # the best epoch's weights, put back: what train reports
            trainer.save_checkpoint(args.save)
    return received[0] if trainer.interrupted else None


def _interrupted_run_file(resume):
    """Where a run stopped without --save writes its checkpoint: the file it resumed from where that is one
    of these here, else ``nnaccel-interrupted.npz`` or, while another run's is there, the first free
    ``nnaccel-interrupted-N.npz``: one stopped run never overwrites another's. Picked when the run stops."""
    stem, suffix = os.path.splitext(INTERRUPTED_RUN_FILE)
    own = os.path.basename(resume or "")
    if re.fullmatch(rf"{re.escape(stem)}(-[0-9]+)?{re.escape(suffix)}", own) and _same_file(own, resume):
        return own
    numbered = (f"{stem}-{number}{suffix}" for number in itertools.count(2))
    return next(path for path in itertools.chain([INTERRUPTED_RUN_FILE], numbered) if not os.path.lexists(path))


def _check_outputs(args, trainer=None):
    """Refuse the output files that could not be written: before the data is read, the paths;
    once the trainer is built, the free space its checkpoints need too (room for two where one
    replaces another: more than one epoch left, or early stopping's save of the best after the last)."""
    if args.communicator is not None and args.communicator.rank != 0:  # rank 0 writes for every rank
        return
    if args.save:
        left = args.epochs - trainer.epoch if trainer is not None else 0
        size = (checkpoint.expected_size(trainer.model, trainer.optimizer, 2 * (args.early_stopping is not None))
                if left > 0 else 0)
        checkpoint.check_writable(args.save, "--save", size, rewritten=left > 1 or args.early_stopping is not None)
    elif trainer is None:
        try:
            checkpoint.check_writable(_interrupted_run_file(args.resume), "the interrupted-run checkpoint")
        except OutputError as error:
            _say(args, f"warning: {error}; an interrupted run will end without a checkpoint (use --save)")
    if args.csv and trainer is None:
        checkpoint.check_writable(args.csv, "--csv", example="log.csv")


def cmd_train(args):
    if args.distributed:  # a rank that fails ends the whole job, naming itself, instead of hanging it
        from . import distributed

        return distributed.run_guarded(_train, args, prog="nnaccel train")
    return _train(args)


def _plan_resumed_epochs(args, trainer):
    """--epochs of a resumed run: without it, the run goes on to the total it planned (a checkpoint
    from ``nnaccel train`` holds it; a cosine schedule's is its own). With a cosine schedule a different
    --epochs plans the schedule again over the new total (the rates of the epochs left are then those of
    a run started with it), saying so, instead of training the epochs past the old total at the
    schedule's last rate."""
    schedule = trainer.schedule
    if not isinstance(schedule, optimizers.CosineAnnealing):
        args.epochs = args.epochs or (trainer.plan or {}).get("epochs", DEFAULT_EPOCHS)
    elif args.epochs is None:
        args.epochs = schedule.t_max
    elif trainer.epoch < args.epochs != schedule.t_max:
        trainer.schedule = optimizers.CosineAnnealing(args.epochs, schedule.eta_min)
        rate = trainer.schedule.lr_at(trainer.epoch, trainer.optimizer.base_lr)
        _say(args, f"the cosine schedule of {args.resume} runs over {schedule.t_max} "
                   f"epoch{'s' * (schedule.t_max != 1)}; --epochs {args.epochs} plans it again over {args.epochs}: "
                   f"learning rate {rate:.4g} in epoch {trainer.epoch + 1}")
    if args.epochs <= trainer.epoch:
        _say(args, f"{args.resume} has trained {trainer.epoch} epoch{'s' * (trainer.epoch != 1)} and --epochs is "
                   f"{args.epochs}: nothing is left to train (a larger --epochs goes on)")


def _shell_path(path):
    """``path`` as a word of a command to paste into a shell: quoted, and not taken for an option."""
    path = str(path)
    return shlex.quote(f"./{path}" if path.startswith("-") else path)


def _rank_batch(args, global_batch):
    """The per-rank batch that keeps a checkpoint's samples per step (its global batch)."""
    communicator = getattr(args, "communicator", None)
    size = communicator.size if communicator is not None else 1
    if global_batch % size:
        error = ConfigError(f"{args.resume} trains {global_batch} samples per step, which {size} ranks cannot "
                            f"share evenly; resume it on a number of ranks that divides {global_batch}")
        error.all_ranks = True  # every rank finds it: rank 0 says it once, none is left waiting
        raise error
    return global_batch // size


# What a resumed run takes from its checkpoint, not from the command line.
SAVED_WITH_THE_RUN = ("layers", "model", "activation", "dropout", "augment", "loss", "optimizer", "lr", "momentum",
                      "nesterov", "weight_decay", "betas", "eps", "schedule", "step_size", "gamma", "eta_min",
                      "batch_size", "seed")


# train's defaults of the options above, and early stopping's, that have one, filled in once the given ones are
# known (the parser leaves them None, so that a default given explicitly counts as given); the rest default to None.
TRAIN_DEFAULTS = {"activation": "relu", "loss": "softmax_cross_entropy", "optimizer": "sgd", "momentum": 0.9,
                  "nesterov": False, "step_size": 10, "gamma": 0.1, "eta_min": 0.0, "batch_size": 64, "seed": 0,
                  "monitor": "val_loss", "min_delta": 0.0}


def _options_a_resume_ignores(args):
    """The options of ``SAVED_WITH_THE_RUN`` given on the command line (before ``TRAIN_DEFAULTS`` fills the
    rest), as ``--name value``."""
    shown = {name: ",".join(map(str, value)) if isinstance(value, tuple) else value for name in SAVED_WITH_THE_RUN
             if (value := getattr(args, name)) is not None}
    return [f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}") for name, value in shown.items()]


def _check_resumed_data(args, trainer, samples):
    """A resumed run trains on the samples its checkpoint trained on: mid-epoch it must (else a
    ConfigError); at an epoch's end other data is a warning (its validation part may hold samples the
    model trained on)."""
    saved = trainer._samples
    if saved is None or saved == samples:
        return
    message = (f"{args.resume} trained on {saved:,} samples, but --data {args.data} with --validation-split "
               f"{args.validation_split} leaves {samples:,}")
    if trainer._resume_point is not None:
        error = ConfigError(f"{message}; it stopped in the middle of an epoch: resume it on the same data and split")
        error.all_ranks = True  # every rank finds it: rank 0 says it once, none is left waiting
        raise error
    if samples < saved:  # a larger validation part: it takes in samples trained on (a smaller one does not)
        _say(args, f"warning: {message}: its validation part may hold samples it trained on")


def _say_what_the_resume_keeps(args, trainer, ignored):
    """Warn of the ``ignored`` options and of early stopping state the checkpoint lacks; say where it resumes."""
    if ignored:
        _say(args, f"warning: --resume continues {args.resume} with its own model, loss, optimizer, schedule, "
                   f"batch size and seed; {', '.join(ignored)} given here {'is' if len(ignored) == 1 else 'are'} "
                   f"not used")
    saved = [state["monitor"] for state, _ in trainer._restored_early_stopping]
    if args.early_stopping is not None and args.monitor not in saved:
        held = (f"early stopping state of --monitor {', '.join(saved)}, not of --monitor {args.monitor}"
                if saved else "no early stopping state (trained without --early-stopping)")
        _say(args, f"warning: {args.resume} holds {held}: "
                   f"--early-stopping {args.early_stopping} counts its patience (and the best epoch) from epoch "
                   f"{trainer.epoch + 1}")
    _say(args, f"resuming {args.resume} after epoch {trainer.epoch}"
               + (f", step {trainer._resume_point['step']}" if trainer._resume_point else ""))


def _say_how_to_resume(args, trainer, stopped_by):
    """The line a run stopped by signal ``stopped_by`` prints: where its checkpoint is, the command resuming it."""
    path = args.stop_checkpoint
    step = trainer._resume_point["step"] if trainer._resume_point else 0
    launch = f"mpiexec -n {trainer.world_size} nnaccel train --distributed" if args.distributed else "nnaccel train"
    quoted = _shell_path(path)
    print(f"nnaccel train: interrupted by {signal.Signals(stopped_by).name} in epoch {trainer.epoch + 1} "
          f"after step {step}; checkpoint written to {path}; resume with: {launch} --resume {quoted} "
          f"--save {quoted} --data {_shell_path(args.data)} --validation-split {args.validation_split} "
          f"--epochs {args.epochs}" + _options_of_the_run(args), file=sys.stderr)


def _train(args):
    from . import distributed

    args.communicator = None
    if args.validation_split is not None and not 0.0 <= args.validation_split < 1.0:
        raise _refusal(f"--validation-split must be at least 0 (no validation) and below 1, got "
                       f"{args.validation_split}")
    if args.distributed:
        device = distributed.rank_device(args.device)
        args.communicator = distributed.communicator_for(device)
        if args.communicator.rank == 0:  # even with --quiet: mpiexec names a killed rank by its pid only
            print(f"distributed over {args.communicator.size} rank(s) with {args.communicator.kind.upper()}: "
                  f"{args.communicator.world.describe()}", file=sys.stderr, flush=True)
        args.quiet = args.quiet or args.communicator.rank != 0
    else:
        device = resolve_device(args.device)
    if args.device.strip().lower() == "auto" and device == "cpu":  # (rank 0 alone says it)
        _say(args, f"device auto: training on the CPU ({cuda_status()[1]})")
    if not args.distributed and distributed.launched_size() > 1:
        _say(args, f"warning: {distributed.launched_size()} processes were started but without --distributed each "
                   f"trains alone")
    ignored = _options_a_resume_ignores(args) if args.resume else []
    args.given = {name for name in (*SAVED_WITH_THE_RUN, *TRAIN_DEFAULTS) if getattr(args, name) is not None}
    for name, value in TRAIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for option in ("monitor", "min_delta"):
        if option in args.given and args.early_stopping is None:
            raise _refusal(f"--{option.replace('_', '-')} is early stopping's; give --early-stopping PATIENCE")
    _check_outputs(args)
    trainer = _trainer_from_checkpoint(args, device) if args.resume else None
    planned_split = args.validation_split is None and args.resume
    _default_to_the_plan(args, trainer.plan if trainer else None, args.resume)
    if args.early_stopping is not None and args.monitor.startswith("val_") and not args.validation_split:
        raise _refusal(f"--early-stopping watches the validation {args.monitor[len('val_'):]}, but --validation-split 0"
                       f"{f' (the one {args.resume} was trained with)' if planned_split else ''} holds out no "
                       f"validation part: give a --validation-split above 0, or --monitor "
                       f"{args.monitor[len('val_'):]}")
    x, y = _load_data(args, "train")
    _apply_default_recipe(args, x.shape[1])
    if args.resume:
        _check_data_fits(trainer.model, x, args, "train", args.resume)
        _say_what_the_resume_keeps(args, trainer, ignored)
        _plan_resumed_epochs(args, trainer)
    else:
        args.epochs = args.epochs or DEFAULT_EPOCHS
        trainer = _trainer_from_options(args, x.shape[1], datasets.CLASSES, device)  # any digit a split lacks too
    trainer.plan = {"epochs": args.epochs, "validation_split": args.validation_split, "data": args.data}
    model = trainer.model
    _check_ranges_against_data(args, trainer, x.shape[0])
    if args.validation_split:
        (x_train, y_train), validation = datasets.train_val_split(x, y, args.validation_split, seed=trainer.seed)
    else:  # --validation-split 0: every sample trains, none validates
        (x_train, y_train), validation = (x, y), None
    if args.resume:
        _check_resumed_data(args, trainer, x_train.shape[0])
    held_out = f"{validation[0].shape[0]} validation" if validation else "no validation: --validation-split 0"
    doing = "training" if args.epochs > trainer.epoch else "evaluating"  # a resume with nothing left to train
    _say(args, f"{doing} {checkpoint.describe(model.config())} ({model.num_parameters():,} parameters) on "
               f"{args.data} ({x_train.shape[0]} train, {held_out}) on {device}")
    _check_outputs(args, trainer)
    stopped_by = None
    if args.epochs > trainer.epoch:  # else nothing is left to train (_plan_resumed_epochs said so)
        stopped_by = _fit_and_save(trainer, args, (x_train, y_train), validation)
    if stopped_by is not None:
        if trainer.rank == 0:
            _say_how_to_resume(args, trainer, stopped_by)
        return 128 + stopped_by
    if trainer.rank != 0:  # the other ranks are done; rank 0 reports
        return 0
    if args.plot:
        from .plotting import plot_history

        plot_history(trainer.history, args.plot)
        _say(args, f"training curves written to {args.plot}")
    split = "validation" if validation else "train"  # with no validation part, the data it trained on
    result = trainer.evaluate(*(validation or (x_train, y_train)))
    result.update({"epochs": trainer.epoch, "device": device, "data": args.data, "split": split})
    if args.json:
        print(_json(result))
    else:
        print(f"{split} accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
              f"after {trainer.epoch} epoch{'s' * (trainer.epoch != 1)} on {device}")
    return 0


def _options_of_the_run(args):
    """The options a resume command repeats beyond the checkpoint's own: what the checkpoint does not hold
    (the device, how it computes, early stopping's settings) and where the run reports."""
    given = [(f"--early-stopping {args.early_stopping}", args.early_stopping is not None),
             *((f"--{option.replace('_', '-')} {getattr(args, option)}", option in args.given)
               for option in ("monitor", "min_delta")),
             (f"--device {args.device}", args.device != "auto"),
             (f"--precision {args.precision}", args.precision != "fp32"), ("--no-cuda-graphs", not args.cuda_graphs),
             *((f"--{option} {_shell_path(getattr(args, option))}", getattr(args, option))
               for option in ("csv", "plot")),
             ("--json", args.json), ("--quiet", args.quiet)]
    return "".join(f" {text}" for text, wanted in given if wanted)


def _default_to_the_plan(args, plan, checkpoint_path):
    """--data and --validation-split, left out: what the ``plan`` of the checkpoint at ``checkpoint_path``
    was trained with (checkpoints before the data was recorded: the default data), else the defaults."""
    plan = plan or {}
    args.planned_data = None  # the checkpoint whose plan named the data, for _load_data's errors
    if args.data is None:
        args.data = plan.get("data", DEFAULT_DATA)
        args.planned_data = checkpoint_path if "data" in plan else None
        _refuse_outputs_over_inputs(args)  # with the data named now
    if args.validation_split is None:
        args.validation_split = plan.get("validation_split", DEFAULT_VALIDATION_SPLIT)


def _load_data(args, split):
    """``datasets.load`` of --data's ``split``; data a checkpoint's plan named that cannot be read says so."""
    try:
        return datasets.load(args.data, split=split)
    except datasets.MissingSplit:
        raise
    except DataError as error:
        if args.planned_data is None or os.path.exists(args.data):  # there, but unreadable: the error says why
            raise
        raise DataError(f"{error} (the data {args.planned_data} was trained on, as its run named it; give --data "
                        f"where it is now)") from None


def _check_data_fits(model, x, args, split, path):
    """A DataError naming --data and the checkpoint unless ``x``'s samples are as wide as ``model``'s input
    (before ``Trainer.prepare`` calls them an x of the wrong shape)."""
    if x.shape[1] != model.in_features:
        images = f" ({describe_shape(model.input_shape)} images)" if len(model.input_shape) > 1 else ""
        raise DataError(f"--data {args.data} ({split} split) has {x.shape[1]} features per sample, but {path} holds a "
                        f"model of {model.in_features} inputs{images}: give the data it was trained on")


def _evaluation_data(args, meta):
    """``(x, y, split)``: ``--split``, or the test split where there is one, else the validation part
    ``nnaccel train`` held out (same fraction, the checkpoint's seed)."""
    state = meta.get("trainer") or {}
    split_given = args.validation_split is not None  # before the plan fills it in
    _default_to_the_plan(args, state.get("plan"), args.model)
    split, data = args.split, None
    if split is None:
        try:
            split, data = "test", _load_data(args, "test")
        except datasets.MissingSplit:  # a damaged test split is an error, not a reason to score another
            split = "validation"
    if split != "validation":
        if split_given:  # it would change nothing
            default = "" if args.split else f" (--data {args.data} has one: evaluate's default)"
            raise ConfigError(f"--validation-split is --split validation's; the split is {split}{default}: give "
                              f"--split validation, or leave --validation-split out")
        try:
            return (*(data or _load_data(args, split)), split)
        except datasets.MissingSplit:  # (the Python API's message names train_val_split)
            raise ConfigError(f"--split {split}: --data {args.data} has no {split} split; give --split validation "
                              f"(the part nnaccel train held out) or --split train") from None
    if not args.validation_split:  # the run's plan: it trained on every sample
        raise ConfigError(f"{args.model} was trained with --validation-split 0: it held out no validation part "
                          f"to evaluate on; give --split train{'' if args.split else ' (--data has no test split)'}")
    x, y = _load_data(args, "train")
    _check_validation_split(args, x.shape[0])
    (x_train, _), validation = datasets.train_val_split(x, y, args.validation_split, seed=int(state.get("seed", 0)))
    # the validation part is the permutation's head: of the data trained on, a larger fraction than trained
    # takes in trained samples
    if state.get("samples") is not None and x_train.shape[0] < state["samples"] and \
            not _other_data(args.data, (state.get("plan") or {}).get("data", DEFAULT_DATA)):
        raise ConfigError(f"{args.model} trained on {state['samples']:,} samples, but --validation-split "
                          f"{args.validation_split} of {args.data} leaves {x_train.shape[0]:,} to train on: give "
                          f"the --validation-split (and --data) it was trained with, or the validation part would "
                          f"hold samples it trained on")
    return (*validation, "validation")


def cmd_evaluate(args):
    model, loss, meta = _load_trained(args)
    x, y, args.split = _evaluation_data(args, meta)
    _check_data_fits(model, x, args, args.split, args.model)
    result = Trainer(model, loss=loss, quiet=True).evaluate(x, y)
    if args.confusion or args.errors:
        probs = visualize.predict_proba(model, x, loss)
    if args.errors:  # first: only this picture can be refused for the data (images that are not square)
        visualize.plot_errors(x, y, probs, args.errors)
        _say(args, f"worst-classified images written to {args.errors}")
    if args.confusion:
        cm = visualize.confusion_matrix(y, probs.argmax(axis=1), classes=probs.shape[1])
        visualize.plot_confusion(cm, args.confusion)
        _say(args, f"confusion matrix written to {args.confusion}")
        result["most_confused"] = [{"true": t, "predicted": p, "count": n} for t, p, n in visualize.most_confused(cm)]
    if args.json:
        print(_json(result))
    else:
        print(f"{args.split} accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
              f"({x.shape[0]} samples, {args.data})")
        if "most_confused" in result:
            print("most confused (true -> predicted: count): " + ", ".join(
                f"{pair['true']} -> {pair['predicted']}: {pair['count']}" for pair in result["most_confused"]))
    return 0


def _trained_with(meta):
    """The loss a checkpoint's model was trained with (softmax cross-entropy for a model saved alone):
    it says what the model's outputs are, logits or probabilities."""
    return losses.get((meta.get("trainer") or {}).get("loss"))


def _load_trained(args):
    """The model of ``args.model`` on ``--device``, the loss it was trained with and the checkpoint's meta."""
    meta, arrays = checkpoint.read(args.model)
    return checkpoint.model_from(meta, arrays, args.model, resolve_device(args.device)), _trained_with(meta), meta


def cmd_predict(args):
    model, loss, _ = _load_trained(args)
    inputs = numpy.stack([images.prepare_for_model(path, model.in_features) for path in args.images])
    with numpy.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, naming the picture
        probabilities = visualize.predict_proba(model, inputs, loss)
    broken = [path for path, probs in zip(args.images, probabilities) if not numpy.isfinite(probs).all()]
    if broken:  # the argmax of NaN would name digit 0
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise CheckpointError(f"{args.model} computes outputs that are not finite for {broken[0]}{more}: its "
                              f"weighted sums overflow {model.dtype}, so it names no digit; retrain it")
    for path, probs in zip(args.images, probabilities):
        top = numpy.argsort(-probs, kind="stable")[:3]
        if args.json:
            print(_json({"file": path, "digit": int(top[0]),
                         "top3": [[int(c), round(float(probs[c]), 4)] for c in top]}))
        else:
            print(f"{path}: {top[0]}  ({', '.join(f'{c} {probs[c]:.2f}' for c in top)})")
    return 0


def cmd_show(args):
    if not (args.weights or args.activations):
        raise ConfigError("show needs --weights FILE.png and/or --activations IMAGE --out FILE.png")
    if bool(args.activations) != bool(args.out):
        raise ConfigError("--activations IMAGE and --out FILE.png go together")
    model, loss, _ = _load_trained(args)
    if args.weights:
        visualize.plot_weights(model, args.weights)
        _say(args, f"first-layer weights written to {args.weights}")
    if args.activations:
        visualize.plot_activations(model, images.prepare_for_model(args.activations, model.in_features), args.out,
                                   loss)
        _say(args, f"activations of {args.activations} written to {args.out}")
    return 0


def cmd_export(args):
    from . import onnx

    checkpoint.check_writable(args.onnx_path, "the ONNX file", example="model.onnx")
    model = checkpoint.load(args.model, device="cpu")
    path = onnx.export(model, args.onnx_path)
    print(f"{args.model} written to {path} (ONNX: input 'input' of shape [batch, "
          f"{', '.join(map(str, model.input_shape))}], output 'logits' [batch, {model.out_features}])")
    return 0


def cmd_info(args):
    print(f"nnaccel {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")
    print(f"numpy {numpy.__version__}")
    count, reason = cuda_status()
    try:
        import cupy

        print(f"cupy {cupy.__version__}")
    except ImportError:
        print("cupy not installed")
    if count:
        import cupy

        for index in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(index)
            print(f"cuda:{index} {props['name'].decode()} ({props['totalGlobalMem'] / 2**30:.1f} GiB)")
    else:
        print(f"GPU not usable: {reason}")
    print(f"device 'auto' resolves to {resolve_device('auto')}")
    from . import distributed

    for line in distributed.status_lines():  # MPI and NCCL, for 'nnaccel train --distributed'
        print(line)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "show": cmd_show,
            "export": cmd_export, "info": cmd_info, "bench": bench.run}


PICTURE_OPTIONS = ("plot", "weights", "out", "confusion", "errors")
# The files a command reads and writes, by argument name: how an error names each, as an option and as a file.
INPUT_FILES = {"data": "the --data file", "resume": "the --resume checkpoint", "model": "the model",
               "images": "the image", "activations": "the --activations image"}
OUTPUT_FILES = {"save": ("--save", "the --save checkpoint"), "csv": ("--csv", "the --csv log"),
                "onnx_path": ("the ONNX file", "the ONNX file"), "json": ("--json", "the --json file"),
                **{option: (f"--{option}", f"the --{option} picture") for option in PICTURE_OPTIONS}}


def _files(args, names):
    """``(argument, path)`` of each file named by the arguments ``names`` (flags and unset ones left out)."""
    for name in names:
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path:
                yield name, path


POSITIONALS = {"model": "the model", "onnx_path": "the ONNX file", "images": "an IMAGE"}


def _refuse_empty_values(args):
    """A ConfigError for an empty value (an unset shell variable: ``--resume "$RUN"``): it is no file, layer
    list or network, and never "not given", which would start a run afresh over the checkpoint."""
    for name, value in vars(args).items():
        if value == "" or (isinstance(value, list) and "" in value):
            what = POSITIONALS.get(name, f"--{name.replace('_', '-')}")
            raise ConfigError(f"{what} is an empty string; give a value or leave the option out")


def _other_data(data, trained_on):
    """Whether ``data`` is known not to be ``trained_on`` (a plan's path, relative to where it trained, may
    name nothing from here: then it may be the same)."""
    known = trained_on in datasets.BUILT_IN or os.path.exists(trained_on)
    return known and not _same_file(data, trained_on)


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there yet: the same path
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_outputs_over_inputs(args):
    """A ConfigError when an output would be written over an input's file or another output's: it would
    destroy that file (``--save`` over ``--resume`` is how a run goes on, and allowed)."""
    inputs = [(name, str(at), str(file)) for name, path in _files(args, INPUT_FILES)
              if os.path.exists(path) and not (name == "data" and path in datasets.BUILT_IN)
              for at, file in (datasets.files_read(path) if name == "data" else [(path, path)])]
    outputs = list(_files(args, OUTPUT_FILES))
    for index, (name, path) in enumerate(outputs):
        for other, at, other_path in inputs + [(other, at, at) for other, at in outputs[:index]]:
            if (name, other) != ("save", "resume") and _same_file(path, at):
                what = INPUT_FILES.get(other) or OUTPUT_FILES[other][1]
                harm = "overwrite" if at == other_path else "be read in place of"
                raise ConfigError(f"{OUTPUT_FILES[name][0]} {path} would {harm} {what} {other_path}; give "
                                  f"another file")


def _as_given(error):
    """An encoding error handler for the command's output: a path is printed as given, a file name's bytes that
    are not UTF-8 (surrogates, as Python reads them) as they came in, as ls prints them (not a UnicodeEncodeError
    on stdout, nor a '\\udcff' on stderr); a character the stream's encoding lacks as a backslash escape."""
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(error)


AS_GIVEN = "nnaccel.as_given"
codecs.register_error(AS_GIVEN, _as_given)


def main(argv=None):
    if argv is None and sys.stderr is None:  # started with stderr closed (2>&-): print(file=None) would write the
        sys.stderr = open(os.devnull, "w")  # status lines into stdout, before the results read from it
    for stream in (sys.stdout, sys.stderr) if argv is None else ():
        if hasattr(stream, "reconfigure"):  # (None: that stream was closed at the start)
            stream.reconfigure(errors=AS_GIVEN)
    args = build_parser().parse_args(argv)
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    try:
        for number in STOP_SIGNALS:  # from the start (imports, data, the checkpoint read), not only in fit
            signal.signal(number, _stop_at_once)
        _refuse_outputs_over_inputs(args)
        for option in PICTURE_OPTIONS:
            if getattr(args, option, None):
                checkpoint.check_writable(getattr(args, option), f"--{option}", example="picture.png")
                plotting.check_picture_path(getattr(args, option), f"--{option}")
        if getattr(args, "activation", None) is not None:  # '' too: named here, not as a --layers entry
            try:
                activations.from_text(args.activation)
            except ConfigError as error:
                raise ConfigError(f"--activation: {error}") from None
        _refuse_empty_values(args)
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:  # (None: started with stdout closed)
            sys.stdout.flush()  # here, so that a reader gone is seen below, not at exit
        return code
    except BrokenPipeError:  # the output's reader left (``nnaccel predict ... | head -1``): quiet, as a killed writer
        if argv is None:  # the command line's own process: Python's flush at exit then writes nowhere
            with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor to point away
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
        return 128 + 13  # SIGPIPE's number (signal.SIGPIPE is not on Windows)
    except NnaccelError as error:
        print(f"nnaccel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable output paths and the like
        print(f"nnaccel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except MemoryError as error:  # a network too large for this machine, before training
        print(f"nnaccel {args.command}: error: out of memory{f': {error}' if str(error) else ''} (a smaller "
              f"--layers or --batch-size fits)", file=sys.stderr)
        return 2
    finally:
        if argv is not None:  # called from Python, which goes on: its signal handlers as they were
            for number, handler in handlers.items():
                signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
