"""Training recipes on the MNIST sample: held-out accuracy and wall time, nnaccel beside PyTorch.

Each recipe trains on the same 80% of the 7,996 images (the split ``nnaccel
train`` makes, seed 0) and is scored on the other 20%, which it never sees.
PyTorch runs the same architecture, optimizer, batch size, epochs and data
order (its own initialisation), so its accuracy is the bar a recipe is held
to. Several seeds per recipe; the mean and the spread are reported.

    python benchmarks/recipes.py --recipes lenet5 --seeds 0,1,2 --torch --json benchmarks/results/recipes.json
"""

import argparse
import json
import platform
import statistics
import sys
import time

import numpy

import nnaccel as nn
from nnaccel import architectures, datasets

RECIPES = {  # name: (architecture, optimizer, lr, epochs, batch, augment, schedule)
    "lenet5": ("lenet5", "sgd", 0.05, 15, 64, 0, None),
    "default": ("default", "sgd", 0.05, 15, 64, 2, "cosine"),  # nnaccel train's default recipe
    "default-25-epochs": ("lenet5-bn", "sgd", 0.05, 25, 64, 2, "cosine"),
    "wide-20-epochs": ("conv12k5p2,bn,maxpool2,conv24k5,bn,maxpool2,120,bn,84,10", "sgd", 0.05, 20, 64, 2,
                                "cosine"),
}


def sample(path=None):
    x, y = datasets.load_mnist_sample() if path is None else datasets.load_mnist(path)
    return datasets.train_val_split(x, y, 0.2, seed=0)


def run_nnaccel(recipe, seed, data, threads):
    text, optimizer, lr, epochs, batch, augment, schedule = RECIPES[recipe]
    (x, y), (xv, yv) = data
    layers, shape = architectures.build(text, x.shape[1], 10)
    if augment:
        layers.insert(0, nn.RandomShift(augment))
    model = nn.Sequential(*layers, input_shape=shape, seed=seed)
    trainer = nn.Trainer(model, optimizer=nn.optimizers.get(optimizer, lr=lr, momentum=0.9), batch_size=batch,
                         seed=seed, quiet=True,
                         schedule=nn.CosineAnnealing(epochs) if schedule == "cosine" else None)
    start = time.perf_counter()
    trainer.fit(x, y, epochs=epochs)
    seconds = time.perf_counter() - start
    return trainer.evaluate(xv, yv)["accuracy"], seconds


def run_torch(recipe, seed, data, threads):
    """The same architecture and schedule in PyTorch, batches in the order nnaccel's trainer draws them."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text, optimizer, lr, epochs, batch, augment, schedule = RECIPES[recipe]
    (x, y), (xv, yv) = data
    layers, shape = architectures.build(text, x.shape[1], 10)
    twin = nn.Sequential(*layers, input_shape=shape, seed=seed).to_torch()
    for module in twin.modules():  # PyTorch's own initialisation
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if schedule == "cosine" else None
    rng = numpy.random.default_rng(seed)
    tx, ty = torch.from_numpy(x.reshape(-1, *shape)), torch.from_numpy(y)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y)))
        twin.train()
        for begin in range(0, len(y), batch):
            chosen = order[begin:begin + batch]
            xb = tx[chosen]
            if augment:  # the same shifts, per image, zeros coming in (their draws differ)
                padded = torch.nn.functional.pad(xb, (augment,) * 4)
                corners = torch.randint(0, 2 * augment + 1, (len(xb), 2)).tolist()
                xb = torch.stack([padded[i, :, a:a + shape[1], b:b + shape[2]] for i, (a, b) in enumerate(corners)])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(twin(xb), ty[chosen]).backward()
            opt.step()
        if scheduler:
            scheduler.step()
    seconds = time.perf_counter() - start
    twin.eval()
    with torch.no_grad():
        predicted = twin(torch.from_numpy(xv.reshape(-1, *shape))).argmax(1).numpy()
    return float((predicted == yv).mean()), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="also train each recipe in PyTorch")
    parser.add_argument("--data", help="an MNIST folder instead of the sample nnaccel ships")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    data = sample(args.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {"machine": {"python": platform.python_version(), "numpy": numpy.__version__, "nnaccel": nn.__version__,
                          "threads": args.threads, "cpu": platform.processor() or platform.machine()},
              "train": len(data[0][1]), "held_out": len(data[1][1]), "results": []}
    runners = [("nnaccel", run_nnaccel)] + ([("torch", run_torch)] if args.torch else [])
    with threadpool_limits(args.threads):
        for recipe in args.recipes.split(","):
            for name, runner in runners:
                runs = [runner(recipe, seed, data, args.threads) for seed in seeds]
                accuracies = [a for a, _ in runs]
                row = {"recipe": recipe, "framework": name, "seeds": seeds, "accuracy": accuracies,
                       "mean": statistics.mean(accuracies), "seconds": [s for _, s in runs]}
                report["results"].append(row)
                print(f"{recipe:26} {name:8} held-out accuracy {100 * row['mean']:.2f}% "
                      f"({', '.join(f'{100 * a:.2f}' for a in accuracies)}), "
                      f"{statistics.mean(row['seconds']):.0f} s per run", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
