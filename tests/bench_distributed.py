"""Data-parallel throughput on CPU ranks: ``mpiexec -n R python tests/bench_distributed.py [options]``.

Trains a network on synthetic 784-pixel data with ``--batch`` samples per
rank per step (one process when started without mpiexec) and prints, from
rank 0, one JSON line: the median samples/s over the timed epochs (the
first epoch is warm-up), the median time of one all-reduce of the gradient
buffer alone, and the bytes it moves. Set OMP_NUM_THREADS so that ranks x
threads matches the cores.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nnaccel as nn  # noqa: E402
from nnaccel import datasets, distributed  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="784,128,64,10")
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--samples", type=int, default=8192, help="training set size")
    parser.add_argument("--epochs", type=int, default=6, help="epochs, the first one untimed")
    args = parser.parse_args()
    sizes = [int(s) for s in args.layers.split(",")]
    launched = distributed.launched_size() > 1
    layers = [nn.Dense(a, b, activation="relu") for a, b in zip(sizes[:-2], sizes[1:-1])]
    model = nn.Sequential(*layers, nn.Dense(sizes[-2], sizes[-1]), seed=0)
    communicator = distributed.communicator_for(model) if launched else None
    x, y = datasets.synthetic(n=args.samples, features=sizes[0], classes=sizes[-1], seed=0)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.01, momentum=0.9), batch_size=args.batch, quiet=True,
                         communicator=communicator)
    trainer.fit(x, y, epochs=args.epochs)
    rates = trainer.history["samples_per_s"][1:]
    allreduce_s = None
    if communicator is not None:
        times = []
        for _ in range(50):
            communicator.barrier()
            start = time.perf_counter()
            communicator.allreduce_sum_(model.flat_grads)
            times.append(time.perf_counter() - start)
        allreduce_s = statistics.median(times)
    if trainer.rank == 0:
        ranks = trainer.world_size
        print(json.dumps({"layers": args.layers, "ranks": ranks, "threads": os.environ.get("OMP_NUM_THREADS"),
                          "batch_per_rank": args.batch, "global_batch": args.batch * ranks,
                          "parameters": model.num_parameters(),
                          "allreduce_bytes": 4 * model.num_parameters(),
                          "samples_per_s": round(statistics.median(rates)),
                          "samples_per_s_all": [round(r) for r in rates],
                          "step_ms": round(1000 * args.batch * ranks / statistics.median(rates), 3),
                          "allreduce_ms": None if allreduce_s is None else round(1000 * allreduce_s, 3)}))


if __name__ == "__main__":
    main()
