"""One rank of the distributed tests: ``mpiexec -n 2 python tests/mpi_worker.py OUT.npz [options]``.

Trains a small seeded network on a synthetic set, data parallel when
``--distributed`` is given (over however many ranks mpiexec started), and
rank 0 writes the final weights, and whether every rank ended with the same
weights, to OUT.npz. ``setup`` builds the same run in one process for the
tests' reference. Failure options make one rank raise or die mid-training.
"""

import argparse
import hashlib
import os
import signal
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nnaccel as nn  # noqa: E402
from nnaccel import datasets  # noqa: E402


def parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="npz written by rank 0: the final weights")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=203, help="training samples")
    parser.add_argument("--batch", type=int, default=16, help="batch size (per rank when distributed)")
    parser.add_argument("--epochs", type=int, default=3, help="total epochs")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batchnorm", action="store_true", help="a BatchNorm after the first layer")
    parser.add_argument("--model-seed", type=int, default=5, help="the model's seed (its weights, Dropout's draws)")
    parser.add_argument("--validation", type=int, help="validate on the first N training samples every epoch")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--resume", help="checkpoint to resume from")
    parser.add_argument("--save", help="checkpoint written (by rank 0) when training stops")
    parser.add_argument("--stop", nargs=3, type=int, metavar=("RANK", "EPOCH", "STEP"),
                        help="that rank alone requests a stop (as Ctrl-C would) after that step (0-based epoch)")
    parser.add_argument("--fail", nargs=3, metavar=("RANK", "STEP", "HOW"),
                        help="that rank fails after that step of its first epoch: raise, exit, mpi-error or kill")
    parser.add_argument("--unguarded", action="store_true",
                        help="run main() bare, as a user's script does, not under distributed.run_guarded")
    parser.add_argument("--check-every", type=int, help="Trainer.nan_check_every (5: the GPU strategy)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="CUDA steps run eagerly")
    parser.add_argument("--break-capture", type=int, metavar="RANK", help="that rank's CUDA graph captures fail")
    parser.add_argument("--nan", nargs=3, type=int, metavar=("RANK", "EPOCH", "STEP"),
                        help="that rank alone sees a NaN loss at that step (0-based epoch); the divergence "
                             "is recorded in OUT instead of raised")
    return parser.parse_args(argv)


def setup(args, device="cpu", communicator=None, batch=None):
    """The model, trainer and data of a run: identical in every process and in the tests."""
    x, y = datasets.synthetic(n=args.n, features=20, classes=4, seed=1)
    layers = [nn.Dense(20, 32, activation="tanh")] + ([nn.BatchNorm(32)] if args.batchnorm else [])
    if args.dropout:
        layers.append(nn.Dropout(args.dropout))
    layers += [nn.Dense(32, 16, activation="relu"), nn.Dense(16, 4)]
    model = nn.Sequential(*layers, device=device, seed=args.model_seed)
    optimizer = nn.SGD(lr=0.05, momentum=0.9) if args.optimizer == "sgd" else nn.Adam(lr=0.01)
    if communicator == "auto":
        from nnaccel import distributed

        communicator = distributed.communicator_for(model)
    trainer = nn.Trainer(model, optimizer=optimizer, batch_size=batch or args.batch, seed=3, quiet=True,
                         communicator=communicator, cuda_graphs=not args.no_cuda_graphs)
    return model, trainer, (x, y)


def validation(args, x, y):
    """The validation data of ``--validation N``: the first N training samples (None without it)."""
    return None if args.validation is None else (x[:args.validation], y[:args.validation])


class StopAt(nn.Callback):
    """Requests a stop on one rank only, after one step of one epoch (Ctrl-C seen by one process)."""

    def __init__(self, rank, epoch, step):
        self.rank, self.epoch, self.step = rank, epoch, step

    def on_batch_end(self, trainer, step, loss):
        if trainer.rank == self.rank and trainer.epoch == self.epoch and step == self.step:
            trainer.request_stop()


class FailAt(nn.Callback):
    def __init__(self, rank, step, how, pid_dir):
        self.rank, self.step, self.how, self.pid_dir = int(rank), int(step), how, pid_dir

    def on_batch_end(self, trainer, step, loss):
        if trainer.rank != self.rank or step != self.step or trainer.epoch:
            return
        if self.how == "raise":
            raise RuntimeError(f"boom in step {step}")
        if self.how == "exit":
            sys.exit(3)
        if self.how == "mpi-error":  # what a collective raises when a peer has died
            from mpi4py import MPI
            raise MPI.Exception(MPI.ERR_OTHER)
        os.kill(os.getpid(), signal.SIGKILL)


class PoisonLoss(nn.Callback):
    """Makes ``rank``'s loss NaN at one step (``step`` >= 1 of a 0-based epoch), as a bad sample in its
    part of the batch would: the loss is multiplied by a device scalar, set to NaN after the step before,
    so that steps replayed from CUDA graphs see it too."""

    def __init__(self, trainer, rank, epoch, step):
        self.rank, self.epoch, self.step = rank, epoch, step
        self.scale = trainer.model.backend.asarray(numpy.ones((), trainer.model.dtype))
        original = trainer._loss_step

        def loss_step(xb, yb):
            value, correct = original(xb, yb)
            return value * self.scale, correct

        trainer._loss_step = loss_step

    def on_batch_end(self, trainer, step, loss):
        if trainer.rank == self.rank and trainer.epoch == self.epoch and step in (self.step - 1, self.step):
            self.scale.fill(numpy.nan if step == self.step - 1 else 1.0)


def count_replays():
    """A list whose one item counts the CUDA graph replays of this process."""
    from nnaccel.backend import cupy_backend

    count, replay = [0], cupy_backend._Graph.replay

    def counted(graph):
        count[0] += 1
        return replay(graph)

    cupy_backend._Graph.replay = counted
    return count


def main(args):
    device = args.device
    communicator = None
    if args.distributed:
        from nnaccel import distributed

        device = distributed.rank_device(args.device)
        communicator = "auto"
    model, trainer, (x, y) = setup(args, device=device, communicator=communicator)
    callbacks = []
    if args.stop:
        callbacks.append(StopAt(*args.stop))
    if args.fail:
        callbacks.append(FailAt(*args.fail, pid_dir=None))
    if args.resume:
        trainer.load_checkpoint(args.resume)
    if args.nan:
        callbacks.append(PoisonLoss(trainer, *args.nan))
    replays = count_replays() if model.backend.name.startswith("cuda") else [0]
    if args.break_capture == trainer.rank:
        def refuse(run, sizes):
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: planted by the test")

        model.backend.capture = refuse
    trainer.nan_check_every = args.check_every
    diverged = None
    try:
        trainer.fit(x, y, epochs=args.epochs - trainer.epoch, callbacks=callbacks, shuffle=not args.no_shuffle,
                    validation_data=validation(args, x, y))
    except nn.TrainingDiverged as error:
        if not args.nan:
            raise
        diverged = [error.epoch, error.step, getattr(error, "all_ranks", False)]
    if args.save:
        trainer.save_checkpoint(args.save)
    weights = model.backend.to_host(model.flat_params)
    digests = [hashlib.sha256(weights.tobytes() + model.backend.to_host(model.flat_buffers).tobytes()).hexdigest()]
    if trainer.communicator is not None:
        digests = trainer.communicator.allgather_object(digests[0])
    if diverged is not None and trainer.communicator is not None:
        diverged = trainer.communicator.allgather_object(diverged)
    if trainer.rank == 0:
        numpy.savez(args.out, weights=weights, identical=len(set(digests)) == 1, ranks=len(digests),
                    diverged=numpy.array(diverged if diverged is not None else []),
                    epoch=trainer.epoch, interrupted=trainer.interrupted, replays=replays[0],
                    history_loss=numpy.array(trainer.history.get("loss", [])),
                    history_val_loss=numpy.array(trainer.history.get("val_loss", [])))
    return 0


if __name__ == "__main__":
    arguments = parse()
    if arguments.distributed and not arguments.unguarded:
        from nnaccel import distributed

        sys.exit(distributed.run_guarded(main, arguments, prog="mpi_worker"))
    sys.exit(main(arguments))
