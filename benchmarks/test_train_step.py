"""The full training step (forward, loss, backward, SGD update), per device, network and batch size."""

from nnaccel import bench


def test_train_step(measure, benchmark, backend, sizes, batch):
    """``Trainer.train_step`` on one synthetic batch kept on the device; samples and FLOPs go in extra_info."""
    model, step = bench.training_step(sizes, batch, backend.name)
    benchmark.extra_info.update(samples=batch, flops=bench.step_flops(model, batch))
    measure(step.run)
