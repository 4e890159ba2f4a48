"""The ``nnaccel`` command: train, evaluate, predict, show, info.

User errors (bad options, bad files, unusable devices) print one line and
exit non-zero, with no traceback.
"""

import argparse
import json
import math
import platform
import signal
import sys

import numpy

from . import (__version__, activations, architectures, bench, checkpoint, datasets, images, losses, optimizers,
               plotting, visualize)
from .backend import cuda_status, resolve_device
from .callbacks import CSVLogger, EarlyStopping, ModelCheckpoint
from .errors import CheckpointError, ConfigError, NnaccelError
from .layers import Dense, Dropout, RandomShift
from .model import Sequential
from .trainer import Trainer, TrainingDiverged

DEFAULT_LR = {"sgd": 0.1, "adam": 0.001, "adamw": 0.001}
DEFAULT_EPOCHS = 20
# What `nnaccel train` trains on 28x28 images when no architecture is given: the best recipe found for
# the MNIST sample within 2 minutes on a 2-core CPU (benchmarks/recipes.py; README, "The default recipe").
DEFAULT_RECIPE = {"model": "default", "augment": 2, "schedule": "cosine", "lr": 0.05, "epochs": 15}


def _int_from(minimum, meaning):
    """An argparse type for integers >= ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {meaning} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {meaning} integer, got {value}")
        return value

    return parse


_positive_int = _int_from(1, "positive")
_non_negative_int = _int_from(0, "non-negative")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _rate(text):
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and a hint), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    parser = _Parser(prog="nnaccel", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nnaccel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a network (default: a small CNN on the MNIST sample)",
                                description="Train a network and report its accuracy on a held-out part of the "
                                            "data. " + architectures.__doc__.split("Grammar:")[0].strip(),
                                epilog="--layers grammar, comma-separated, input to output: N (Dense of N units), "
                                       "convCkK[sS][pP] (Conv2D: C filters K x K, stride S, padding P), "
                                       "maxpoolK[sS][pP], avgpoolK[sS][pP], bn (BatchNorm), dropR (Dropout R), "
                                       "shiftM (RandomShift M px), flatten (added before the first Dense after "
                                       "image layers). E.g. conv6k5p2,maxpool2,conv16k5,maxpool2,120,84,10. "
                                       f"Presets (--model): {', '.join(f'{k} = {v}' for k, v in architectures.PRESETS.items())}.")
    data = train.add_argument_group("data")
    data.add_argument("--data", default="mnist",
                      help="'mnist' (the 7,996 real 28x28 MNIST digits nnaccel ships, default), 'digits' "
                           "(scikit-learn's 8x8 digits: pip install 'nnaccel[digits]'), 'synthetic', an MNIST "
                           "folder of IDX files, or a Keras mnist.npz")
    data.add_argument("--validation-split", type=float, default=0.2,
                      help="fraction of the training split held out for validation (default 0.2)")
    data.add_argument("--augment", type=_non_negative_int, nargs="?", const=2, metavar="PIXELS",
                      help="shift each training image by up to PIXELS (default 2) in each direction, drawn per "
                           "image and epoch (a RandomShift layer first; images only)")
    net = train.add_argument_group("network")
    shape = net.add_mutually_exclusive_group()
    shape.add_argument("--layers", help="the architecture, e.g. 784,256,10 or conv6k5p2,maxpool2,120,10 (grammar "
                                        "below; default: on 28x28 images the default recipe, " +
                                        ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULT_RECIPE.items()) +
                                        "; on other data inputs,256,classes)")
    shape.add_argument("--model", choices=sorted(architectures.PRESETS), help="a named architecture")
    net.add_argument("--activation", default="relu", help="hidden-layer activation (default relu)")
    net.add_argument("--dropout", type=_rate, metavar="RATE", help="Dropout of RATE after every hidden Dense layer")
    fit = train.add_argument_group("optimisation")
    fit.add_argument("--loss", default="softmax_cross_entropy", choices=sorted(losses.LOSSES))
    fit.add_argument("--optimizer", default="sgd", choices=sorted(optimizers.OPTIMIZERS))
    fit.add_argument("--lr", type=_positive_float, help="learning rate (default 0.1 for SGD, 0.001 for Adam; "
                                                        "the default recipe's on 28x28 images)")
    fit.add_argument("--momentum", type=_non_negative_float, default=0.9, help="SGD momentum (default 0.9)")
    fit.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    fit.add_argument("--weight-decay", type=_non_negative_float, default=None,
                     help="L2 weight decay (SGD, Adam) or decoupled decay (AdamW; its default 0.01)")
    fit.add_argument("--schedule", choices=["step", "cosine"], help="learning-rate schedule over the epochs")
    fit.add_argument("--step-size", type=_positive_int, default=10, help="step schedule: epochs per decay (default 10)")
    fit.add_argument("--gamma", type=_positive_float, default=0.1, help="step schedule: the decay factor (default 0.1)")
    fit.add_argument("--eta-min", type=_non_negative_float, default=0.0,
                     help="cosine schedule: the final learning rate (default 0; over --epochs epochs)")
    fit.add_argument("--epochs", type=_positive_int, help="total epochs (default 20; the default recipe's on 28x28 "
                                                          "images)")
    fit.add_argument("--batch-size", type=_positive_int, default=64)
    fit.add_argument("--seed", type=_non_negative_int, default=0)
    run = train.add_argument_group("the run")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument("--save", metavar="FILE", help="checkpoint (.npz) written after every epoch")
    run.add_argument("--resume", metavar="CHECKPOINT", help="continue training from a checkpoint")
    run.add_argument("--early-stopping", type=_positive_int, metavar="PATIENCE",
                     help="stop when the validation loss has not improved for PATIENCE epochs (the best weights "
                          "are kept)")
    run.add_argument("--distributed", action="store_true",
                     help="data-parallel over the processes of 'mpiexec -n N' (MPI on CPUs, NCCL between "
                          "GPUs, one GPU per rank); --batch-size is per rank; only rank 0 prints and saves")
    report = train.add_argument_group("output")
    report.add_argument("--csv", metavar="FILE", help="append one row of metrics per epoch to a CSV file")
    report.add_argument("--plot", metavar="FILE", help="draw the training curves to a PNG")
    report.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    report.add_argument("--quiet", action="store_true", help="no progress output")

    evaluate = commands.add_parser("evaluate", help="loss and accuracy of a saved model on a data set")
    evaluate.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    evaluate.add_argument("--data", default="mnist", help="'mnist' (the sample nnaccel ships, default), 'digits', an "
                                                        "MNIST folder or a mnist.npz")
    evaluate.add_argument("--split", choices=["test", "train", "validation"],
                          help="default: test where the data has one, else validation: the part 'nnaccel train' "
                               "held out (--validation-split of the train split, with the checkpoint's seed)")
    evaluate.add_argument("--validation-split", type=float, default=0.2,
                          help="the fraction --split validation holds out, as in training (default 0.2)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--confusion", metavar="FILE", help="draw the confusion matrix to a PNG and list "
                                                              "the most confused pairs")
    evaluate.add_argument("--errors", metavar="FILE", help="draw the worst-classified images to a PNG")

    predict = commands.add_parser("predict", help="the digit in each picture (PNG, JPEG, ...), with the top-3 "
                                                  "probabilities")
    predict.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="pictures of one handwritten digit each")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--json", action="store_true", help="one JSON object per picture, one per line")

    show = commands.add_parser("show", help="pictures of what a model learned: first-layer weights, activations")
    show.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    show.add_argument("--weights", metavar="FILE", help="draw the first layer's weights to a PNG")
    show.add_argument("--activations", metavar="IMAGE", help="a picture of a digit whose activations to draw")
    show.add_argument("--out", metavar="FILE", help="the PNG for --activations")
    show.add_argument("--device", default="auto")

    export = commands.add_parser("export", help="write a saved model as ONNX (pip install 'nnaccel[onnx]')")
    export.add_argument("model", help="a checkpoint written by 'nnaccel train --save'")
    export.add_argument("onnx_path", metavar="OUT.onnx", help="the ONNX file to write (batch dimension dynamic)")

    commands.add_parser("info", help="versions, devices found, and why a GPU is not usable")
    bench.add_parser(commands)
    return parser


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
                                              classes, args.activation)
    if args.dropout:
        hidden = [i for i, layer in enumerate(layers[:-1]) if isinstance(layer, Dense)]
        for index in reversed(hidden):
            layers.insert(index + 1, Dropout(args.dropout))
    if args.augment:
        if len(input_shape) != 3:
            side = math.isqrt(features)
            if side * side != features:
                raise ConfigError(f"--augment shifts images, but the data's {features} values per sample are not "
                                  f"a square image")
            input_shape = (1, side, side)
        layers.insert(0, RandomShift(args.augment))
    return Sequential(*layers, device=device, seed=args.seed, input_shape=input_shape)


def _schedule(args):
    if args.schedule == "step":
        return optimizers.StepLR(args.step_size, args.gamma)
    if args.schedule == "cosine":
        return optimizers.CosineAnnealing(args.epochs, args.eta_min)
    return None


def _trainer_from_options(args, features, classes, device):
    model = _build_model(args, features, classes, device)
    lr = args.lr or DEFAULT_LR[args.optimizer]
    options = {"momentum": args.momentum, "nesterov": args.nesterov} if args.optimizer == "sgd" else {}
    if args.nesterov and args.optimizer != "sgd":
        raise ConfigError(f"--nesterov is SGD's; the optimizer is {args.optimizer}")
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    return Trainer(model, loss=args.loss, optimizer=optimizers.get(args.optimizer, lr=lr, **options),
                   batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, schedule=_schedule(args),
                   communicator=getattr(args, "communicator", None))


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
                      communicator=getattr(args, "communicator", None))
    return trainer.restore(meta, arrays, args.resume)


def _fit_until_done_or_interrupted(trainer, args, data, validation_data):
    """fit(), with Ctrl-C finishing the current step and the checkpoint always written."""
    callbacks = [ModelCheckpoint(args.save)] if args.save else []
    if args.early_stopping:
        callbacks.append(EarlyStopping(patience=args.early_stopping))
    if args.csv:
        callbacks.append(CSVLogger(args.csv, append=bool(args.resume)))

    def on_interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        trainer.request_stop()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        trainer.fit(*data, epochs=max(args.epochs - trainer.epoch, 0), validation_data=validation_data,
                    callbacks=callbacks)
    except TrainingDiverged:
        if args.save:
            trainer.save_checkpoint(args.save)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args):
    if args.distributed:  # a rank that fails ends the whole job, naming itself, instead of hanging it
        from . import distributed

        return distributed.run_guarded(_train, args, prog="nnaccel train")
    return _train(args)


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


def _train(args):
    from . import distributed

    args.communicator = None
    if args.distributed:
        device = distributed.rank_device(args.device)
        args.communicator = distributed.communicator_for(device)
        args.quiet = args.quiet or args.communicator.rank != 0
        _say(args, f"distributed over {args.communicator.size} rank(s) with {args.communicator.kind.upper()}: "
                   f"{args.communicator.world.describe()}")
    else:
        device = resolve_device(args.device)
        if args.device == "auto" and device == "cpu":
            _say(args, f"device auto: training on the CPU ({cuda_status()[1]})")
        if distributed.launched_size() > 1:
            _say(args, f"warning: {distributed.launched_size()} processes were started but without --distributed "
                       f"each trains alone")
    if not 0.0 < args.validation_split < 1.0:
        raise ConfigError(f"--validation-split must be between 0 and 1, got {args.validation_split}")
    x, y = datasets.load(args.data, split="train")
    _apply_default_recipe(args, x.shape[1])
    args.epochs = args.epochs or DEFAULT_EPOCHS
    if args.resume:
        trainer = _trainer_from_checkpoint(args, device)
        _say(args, f"resuming {args.resume} after epoch {trainer.epoch}"
                   + (f", step {trainer._resume_point['step']}" if trainer._resume_point else ""))
    else:
        trainer = _trainer_from_options(args, x.shape[1], int(y.max()) + 1, device)
    model = trainer.model
    (x_train, y_train), (x_val, y_val) = datasets.train_val_split(x, y, args.validation_split, seed=trainer.seed)
    _say(args, f"training {checkpoint.describe(model.config())} ({model.num_parameters():,} parameters) on "
               f"{args.data} ({x_train.shape[0]} train, {x_val.shape[0]} validation) on {device}")
    _fit_until_done_or_interrupted(trainer, args, (x_train, y_train), (x_val, y_val))
    if trainer.interrupted:
        path = args.save or "nnaccel-interrupted.npz"
        trainer.save_checkpoint(path)
        step = trainer._resume_point["step"] if trainer._resume_point else 0
        launch = f"mpiexec -n {trainer.world_size} nnaccel train --distributed" if args.distributed else "nnaccel train"
        if trainer.rank == 0:
            print(f"nnaccel train: interrupted in epoch {trainer.epoch + 1} after step {step}; checkpoint written "
                  f"to {path}; resume with: {launch} --resume {path} --save {path} --data {args.data} "
                  f"--validation-split {args.validation_split} --epochs {args.epochs}"
                  + (f" --early-stopping {args.early_stopping}" if args.early_stopping else "")
                  + (f" --csv {args.csv}" if args.csv else ""),
                  file=sys.stderr)
        return 130
    if trainer.rank != 0:  # the other ranks are done; rank 0 reports
        return 0
    if args.plot:
        from .plotting import plot_history

        plot_history(trainer.history, args.plot)
        _say(args, f"training curves written to {args.plot}")
    result = trainer.evaluate(x_val, y_val)
    result.update({"epochs": trainer.epoch, "device": device, "data": args.data})
    if args.json:
        print(json.dumps(result))
    else:
        print(f"validation accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
              f"after {trainer.epoch} epochs on {device}")
    return 0


def _evaluation_data(args, meta):
    """``(x, y, split)``: ``--split``, or the test split where there is one, else the validation part
    ``nnaccel train`` held out (same fraction, the checkpoint's seed)."""
    split = args.split
    if split is None:
        try:
            return (*datasets.load(args.data, split="test"), "test")
        except NnaccelError:
            split = "validation"
    if split != "validation":
        return (*datasets.load(args.data, split=split), split)
    seed = int((meta.get("trainer") or {}).get("seed", 0))
    x, y = datasets.load(args.data, split="train")
    return (*datasets.train_val_split(x, y, args.validation_split, seed=seed)[1], "validation")


def cmd_evaluate(args):
    device = resolve_device(args.device)
    meta, arrays = checkpoint.read(args.model)
    model = checkpoint.model_from(meta, arrays, args.model, device)
    loss = losses.get((meta.get("trainer") or {}).get("loss"))
    x, y, args.split = _evaluation_data(args, meta)
    result = Trainer(model, loss=loss, quiet=True).evaluate(x, y)
    if args.confusion or args.errors:
        probs = visualize.predict_proba(model, x)
    if args.confusion:
        cm = visualize.confusion_matrix(y, probs.argmax(axis=1), classes=probs.shape[1])
        visualize.plot_confusion(cm, args.confusion)
        _say(args, f"confusion matrix written to {args.confusion}")
        result["most_confused"] = [{"true": t, "predicted": p, "count": n} for t, p, n in visualize.most_confused(cm)]
    if args.errors:
        visualize.plot_errors(x, y, probs, args.errors)
        _say(args, f"worst-classified images written to {args.errors}")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.split} accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
              f"({x.shape[0]} samples, {args.data})")
        if "most_confused" in result:
            print("most confused (true -> predicted: count): " + ", ".join(
                f"{pair['true']} -> {pair['predicted']}: {pair['count']}" for pair in result["most_confused"]))
    return 0


def cmd_predict(args):
    model = checkpoint.load(args.model, device=resolve_device(args.device))
    inputs = numpy.stack([images.prepare_for_model(path, model.in_features) for path in args.images])
    for path, probs in zip(args.images, visualize.predict_proba(model, inputs)):
        top = numpy.argsort(-probs, kind="stable")[:3]
        if args.json:
            print(json.dumps({"file": path, "digit": int(top[0]),
                              "top3": [[int(c), round(float(probs[c]), 4)] for c in top]}))
        else:
            print(f"{path}: {top[0]}  ({', '.join(f'{c} {probs[c]:.2f}' for c in top)})")
    return 0


def cmd_show(args):
    if not (args.weights or args.activations):
        raise ConfigError("show needs --weights FILE.png and/or --activations IMAGE --out FILE.png")
    if bool(args.activations) != bool(args.out):
        raise ConfigError("--activations IMAGE and --out FILE.png go together")
    model = checkpoint.load(args.model, device=resolve_device(args.device))
    if args.weights:
        visualize.plot_weights(model, args.weights)
        _say(args, f"first-layer weights written to {args.weights}")
    if args.activations:
        visualize.plot_activations(model, images.prepare_for_model(args.activations, model.in_features), args.out)
        _say(args, f"activations of {args.activations} written to {args.out}")
    return 0


def cmd_export(args):
    from . import onnx

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


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        for option in PICTURE_OPTIONS:
            if getattr(args, option, None):
                plotting.check_picture_path(getattr(args, option), f"--{option}")
        if getattr(args, "activation", None):
            activations.get(args.activation)
        return COMMANDS[args.command](args)
    except NnaccelError as error:
        print(f"nnaccel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable output paths and the like
        print(f"nnaccel {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
