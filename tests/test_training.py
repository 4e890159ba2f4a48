"""End to end: training reaches real accuracy, is deterministic, and resumes exactly."""

import ast
from pathlib import Path
import warnings

import numpy
import pytest

import nnaccel as nn
from nnaccel import datasets


def _digits_net(device, activation="relu", seed=0):
    return nn.Sequential(nn.Dense(64, 256, activation=activation), nn.Dense(256, 10), device=device, seed=seed)


def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's "Use it from Python" block, run as it stands: it trains, scores the held-out fifth
    and saves a model that loads to the same outputs (the docs cannot drift from the API)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("## Use it from Python")) + len("```python\n")
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(readme[start:readme.index("```", start)], "README.md", "exec"), names)
    assert names["history"]["epoch"] == list(range(1, 11)) and names["history"]["val_accuracy"][-1] >= 0.95
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # print(trainer.evaluate(...))
    assert set(printed) == {"loss", "accuracy"} and printed["accuracy"] >= 0.95
    x_val = names["x_val"]
    assert numpy.array_equal(names["model"].predict(x_val), names["trainer"].model.predict(x_val))
    assert (tmp_path / "digits.npz").is_file()


def test_digits_reach_96_percent(device):
    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_digits("train"))
    model = _digits_net(device)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=64, seed=0, quiet=True)
    history = trainer.fit(x, y, epochs=20, validation_data=(xv, yv))
    assert history["val_accuracy"][-1] >= 0.96
    assert trainer.evaluate(*datasets.load_digits("test"))["accuracy"] >= 0.96
    assert set(history) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "lr"}
    assert len(history["loss"]) == 20 and history["loss"][-1] < history["loss"][0]


def test_mnist_subset_reaches_94_percent(device, mnist_path):
    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_mnist(mnist_path), fraction=0.2, seed=0)
    model = nn.Sequential(nn.Dense(784, 256, activation="relu"), nn.Dense(256, 10), device=device, seed=0)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=128, seed=0, quiet=True)
    trainer.fit(x, y, epochs=10, validation_data=(xv, yv))  # 500 steps: 96.6% on the CPU
    assert trainer.evaluate(xv, yv)["accuracy"] >= 0.94


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_same_seed_same_weights(device, optimizer):
    """On the CPU and on CUDA (where the emulated device runs each launch's threads in another order)."""
    x, y = datasets.synthetic(n=300, features=20, classes=4, seed=1)

    def run():
        model = nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.Dropout(0.3), nn.Dense(32, 4), seed=5,
                              device=device)
        nn.Trainer(model, optimizer=nn.optimizers.get(optimizer, lr=0.01), batch_size=32, seed=3,
                   quiet=True).fit(x, y, epochs=3)
        return model.backend.to_host(model.flat_params)

    numpy.testing.assert_array_equal(run(), run())


def test_resume_equals_uninterrupted_bit_for_bit(device, tmp_path):
    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)

    def setup():
        model = nn.Sequential(nn.Dense(20, 32, activation="relu"), nn.Dropout(0.2),
                              nn.Maxout(32, 16, pieces=3), nn.Dense(16, 4), seed=5, device=device)
        trainer = nn.Trainer(model, optimizer=nn.Adam(lr=0.01, weight_decay=1e-3), batch_size=32, seed=3,
                             schedule=nn.StepLR(1, gamma=0.5), quiet=True)
        return model, trainer

    model, trainer = setup()
    trainer.fit(x, y, epochs=4)
    straight = model.backend.to_host(model.flat_params).copy()

    model, trainer = setup()
    trainer.fit(x, y, epochs=2)
    trainer.save_checkpoint(tmp_path / "ckpt.npz")
    model, trainer = setup()
    trainer.load_checkpoint(tmp_path / "ckpt.npz")
    assert trainer.epoch == 2
    trainer.fit(x, y, epochs=2)
    numpy.testing.assert_array_equal(model.backend.to_host(model.flat_params), straight)
    assert trainer.history["epoch"] == [1, 2, 3, 4]
    assert trainer.history["lr"] == [0.01, 0.005, 0.0025, 0.00125]


def test_a_checkpoint_resumes_as_saved_whatever_the_loading_trainer_was_built_with(tmp_path, capsys):
    """The model's seed (Dropout's draws), the optimizer's settings, the schedule and the loss come from
    the checkpoint, as PyTorch's load_state_dict replaces an optimizer's settings; a warning names what
    the loading trainer had otherwise."""
    x, y = datasets.synthetic(n=200, features=10, classes=3, seed=1)

    def setup(seed=5, **options):
        model = nn.Sequential(nn.Dense(10, 16, activation="relu"), nn.Dropout(0.5), nn.Dense(16, 3), seed=seed)
        return model, nn.Trainer(model, **{"optimizer": nn.SGD(lr=0.1), "schedule": nn.StepLR(1, gamma=0.5),
                                           **options})

    model, trainer = setup(quiet=True)
    trainer.fit(x, y, epochs=3)
    straight = model.flat_params.copy()
    model, trainer = setup(quiet=True)
    trainer.fit(x, y, epochs=1)
    trainer.save_checkpoint(tmp_path / "ckpt.npz")
    capsys.readouterr()
    model, trainer = setup(seed=0, optimizer=nn.SGD(lr=0.5, momentum=0.9), schedule=None, loss="mse")
    trainer.load_checkpoint(tmp_path / "ckpt.npz")
    warning = capsys.readouterr().err
    assert "goes on as saved, in place of this trainer's optimizer" in warning
    assert "'momentum': 0.9" in warning and "schedule None" in warning and "loss mse" in warning
    assert "model seed 0 (now 5)" in warning  # Dropout draws from the checkpoint's seed, not the model's 0
    trainer.quiet = True
    trainer.fit(x, y, epochs=2)
    numpy.testing.assert_array_equal(model.flat_params, straight)
    assert trainer.history["lr"] == [0.1, 0.05, 0.025] and model.config()["seed"] == 5
    assert trainer.optimizer.config() == nn.SGD(lr=0.1).config() and trainer.loss.name == "softmax_cross_entropy"


def test_a_run_that_ended_on_its_best_weights_goes_on_from_its_last_epoch(tmp_path):
    """EarlyStopping puts epoch 2's weights back at the end of 3 epochs; three more epochs, in memory or
    from the checkpoint, go on from epoch 3's weights (those its optimizer state belongs to), as a
    6-epoch run does. The checkpoint's model is still the best one."""
    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_digits("train"))

    def setup():
        model = nn.Sequential(nn.Dense(64, 16, activation="relu"), nn.BatchNorm(16), nn.Dense(16, 10), seed=0)
        return model, nn.Trainer(model, optimizer=nn.SGD(lr=0.5, momentum=0.9), batch_size=32, quiet=True)

    def fit(trainer, epochs):
        stopping = nn.EarlyStopping(patience=10)
        trainer.fit(x, y, epochs=epochs, validation_data=(xv, yv), callbacks=[stopping])
        return stopping.best_epoch

    model, trainer = setup()
    assert fit(trainer, 6) == 6
    straight = model.flat_params.copy()
    model, trainer = setup()
    assert fit(trainer, 3) == 2  # so the weights were put back
    trainer.save_checkpoint(tmp_path / "ckpt.npz")
    best_loss = trainer.evaluate(xv, yv)["loss"]
    assert best_loss == pytest.approx(min(trainer.history["val_loss"]), rel=1e-6)
    assert nn.Trainer(nn.load(tmp_path / "ckpt.npz"), quiet=True).evaluate(xv, yv)["loss"] == best_loss
    fit(trainer, 3)
    numpy.testing.assert_array_equal(model.flat_params, straight)
    model, trainer = setup()
    trainer.load_checkpoint(tmp_path / "ckpt.npz")
    stepped = model.flat_params.copy()  # a train_step goes on from the last epoch too, and fit from that step
    trainer.train_step(*trainer.prepare(x[:32], y[:32]))
    assert not numpy.array_equal(model.flat_params, stepped) and trainer._last_weights is None
    model, trainer = setup()
    trainer.load_checkpoint(tmp_path / "ckpt.npz")
    assert trainer.evaluate(xv, yv)["loss"] == best_loss
    fit(trainer, 3)
    numpy.testing.assert_array_equal(model.flat_params, straight)


def _small_run():
    """Data and a trainer whose validation loss is best after epoch 1 and worse after epochs 2 to 4."""
    rng = numpy.random.default_rng(0)
    x, xv = rng.standard_normal((96, 8)).astype(numpy.float32), rng.standard_normal((40, 8)).astype(numpy.float32)
    y, yv = rng.integers(0, 3, 96), rng.integers(0, 3, 40)
    model = nn.Sequential(nn.Dense(8, 16, activation="relu"), nn.Dense(16, 3), seed=1)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.3, momentum=0.9), batch_size=16, seed=3, quiet=True)
    return trainer, (x, y), (xv, yv)


class _StopAfter(nn.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if logs["epoch"] == self.epoch:
            trainer.request_stop()


def test_a_fit_after_a_stopped_one_goes_on_with_its_early_stopping_and_any_other_starts_afresh(tmp_path):
    """Stopped by request_stop, a run goes on in the next fit, in memory as from its checkpoint, with a new
    EarlyStopping counting on from the stopped one's: the epochs and weights of an unstopped run. A next fit
    after one that ended starts its EarlyStopping afresh, as Keras does (a second phase of training)."""
    straight, data, validation = _small_run()
    straight.fit(*data, epochs=6, validation_data=validation, callbacks=[nn.EarlyStopping(patience=3)])
    losses = straight.history["val_loss"]
    assert straight.epoch == 4 and min(losses) == losses[0]  # patience 3 ends it after epoch 4, with epoch 1's
    stopped, _, _ = _small_run()
    stopped.fit(*data, epochs=6, validation_data=validation, callbacks=[nn.EarlyStopping(patience=3), _StopAfter(2)])
    assert stopped.epoch == 2 and stopped.interrupted
    stopped.save_checkpoint(tmp_path / "run.npz")
    resumed = _small_run()[0].load_checkpoint(tmp_path / "run.npz")
    for run in (stopped, resumed):
        run.fit(*data, epochs=4, validation_data=validation, callbacks=[nn.EarlyStopping(patience=3)])
        assert run.epoch == 4 and run.history["val_loss"] == losses
        numpy.testing.assert_array_equal(run.model.flat_params, straight.model.flat_params)
    straight.fit(*data, epochs=3, validation_data=validation, callbacks=[nn.EarlyStopping(patience=3)])
    assert straight.epoch == 7  # its best is its own: none of the first fit's patience is left over


def test_a_run_stopped_mid_epoch_resumes_in_memory_only_with_its_batch_size():
    """A fit goes on from a step of the stopped one's epoch only with as many samples per step, as a checkpoint
    does (with another batch size it went on silently at the same step, skipping the samples in between),
    and the refused fit leaves the run to go on as an unstopped one."""
    class StopAtStep(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if step == 2:
                trainer.request_stop()

    straight, data, _ = _small_run()
    straight.fit(*data)
    stopped = _small_run()[0]
    stopped.fit(*data, callbacks=[StopAtStep()])
    stopped.batch_size = 32
    with pytest.raises(nn.ConfigError, match=r"stopped in the middle of epoch 1 \(after step 3\) of a run with 16 "
                                             r"samples per step, but this fit takes 32 \(32 x 1 process\(es\)\): "
                                             r"resume it with 16 samples per step"):
        stopped.fit(*data)
    stopped.batch_size = 16
    stopped.fit(*data)
    assert stopped.history["loss"] == straight.history["loss"]
    numpy.testing.assert_array_equal(stopped.model.flat_params, straight.model.flat_params)


def test_a_checkpoint_is_refused_in_the_middle_of_an_epoch(tmp_path):
    """save_checkpoint from on_batch_end is refused with what to do (it wrote a checkpoint of the epoch's
    start with the weights of its middle: resumed, the run trained the epoch's first steps twice); a
    stop requested there and the save after fit resumes as the unstopped run."""
    class SaveAtStep(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if step == 2:
                trainer.save_checkpoint(tmp_path / "mid.npz")

    class StopAtStep(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if step == 2:
                trainer.request_stop()

    straight, data, _ = _small_run()
    straight.fit(*data, epochs=2)
    trainer = _small_run()[0]
    with pytest.raises(nn.ConfigError, match=r"save_checkpoint cannot write a checkpoint from on_batch_end, in the "
                                             r"middle of an epoch: .* call trainer.request_stop\(\) there"):
        trainer.fit(*data, callbacks=[SaveAtStep()])
    assert not (tmp_path / "mid.npz").exists()
    stopped = _small_run()[0]
    stopped.fit(*data, callbacks=[StopAtStep()])
    stopped.save_checkpoint(tmp_path / "mid.npz")
    resumed = _small_run()[0].load_checkpoint(tmp_path / "mid.npz")
    resumed.fit(*data, epochs=2)
    assert resumed.history["loss"] == straight.history["loss"]
    numpy.testing.assert_array_equal(resumed.model.flat_params, straight.model.flat_params)


def test_early_stopping_patience_0_stops_at_the_first_epoch_without_improvement_as_in_keras():
    with pytest.raises(nn.ConfigError, match="patience must be a non-negative integer, got -1"):
        nn.EarlyStopping(patience=-1)
    for patience in (0, 1):
        trainer, data, validation = _small_run()
        trainer.fit(*data, epochs=5, validation_data=validation, callbacks=[nn.EarlyStopping(patience=patience)])
        assert trainer.epoch == 2, patience  # epoch 2 is worse than epoch 1
    trainer, data, validation = _small_run()  # stopped after its best epoch: patience 0 has not run out
    trainer.fit(*data, epochs=5, validation_data=validation, callbacks=[nn.EarlyStopping(patience=0), _StopAfter(1)])
    trainer.fit(*data, epochs=4, validation_data=validation, callbacks=[nn.EarlyStopping(patience=0)])
    assert trainer.epoch == 2


def test_early_stopping_without_a_finite_value_says_so(capsys):
    """Validation inputs so large that val_loss is inf: early stopping says no epoch had a finite one (it
    said 'since epoch None')."""
    x, y = datasets.synthetic(n=320, features=20, classes=4, seed=1)
    trainer = nn.Trainer(nn.Sequential(nn.Dense(20, 4), seed=5), batch_size=32)
    with numpy.errstate(all="ignore"):
        trainer.fit(x, y, epochs=3, validation_data=(x * 1e37, y), callbacks=[nn.EarlyStopping(patience=1)])
    assert trainer.epoch == 1 and trainer.history["val_loss"] == [numpy.inf]
    assert ("early stopping after epoch 1: val_loss has not improved for 1 epoch: no epoch had a finite val_loss "
            "(patience 1)") in capsys.readouterr().err


def test_a_refused_checkpoint_leaves_the_trainer_as_it_was(tmp_path):
    """Refused for a mid-epoch batch of another size, another optimizer or a missing buffer: nothing of
    the checkpoint (weights, optimizer steps, resume point) is taken first."""
    x, y = datasets.synthetic(n=64, features=4, classes=2, seed=0)

    class StopAfterOneStep(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            trainer.request_stop()

    def trainer(batch_size=32, optimizer=None):
        model = nn.Sequential(nn.Dense(4, 3), nn.BatchNorm(3), nn.Dense(3, 2), seed=1)
        return nn.Trainer(model, optimizer=optimizer or nn.SGD(momentum=0.9), batch_size=batch_size, quiet=True)

    saved = trainer()
    saved.fit(x, y, epochs=2, callbacks=[StopAfterOneStep()])
    saved.save_checkpoint(tmp_path / "mid.npz")
    meta, arrays = nn.checkpoint.read(tmp_path / "mid.npz")
    del arrays["buffer/1.running_var"]
    for other, refusal, load in [
            (trainer(batch_size=16), "32 samples per step, but this run takes 16",
             lambda t: t.load_checkpoint(tmp_path / "mid.npz")),
            (trainer(optimizer=nn.Adam()), "trained with SGD, not Adam", lambda t: t.load_checkpoint(tmp_path / "mid.npz")),
            (trainer(), "has no buffer 1.running_var", lambda t: t.restore(meta, arrays, "mid.npz"))]:
        before = (other.model.flat_params.copy(), other.model.flat_buffers.copy(), other.optimizer.config())
        with pytest.raises(nn.CheckpointError, match=refusal):
            load(other)
        numpy.testing.assert_array_equal(other.model.flat_params, before[0])
        numpy.testing.assert_array_equal(other.model.flat_buffers, before[1])
        assert other.optimizer.config() == before[2] and other.optimizer.steps == 0
        assert other.epoch == 0 and other._resume_point is None and other.history == {}


def test_a_run_stopped_after_its_short_last_step_resumes_with_no_step_and_no_negative_rate(tmp_path):
    """333 samples in steps of 32: the 11th step is short; stopped right after it, the resumed epoch has
    nothing left to train and reports 0 samples/s, not the rows of a full 11th step taken off."""
    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)

    class StopAfterTheLastStep(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if step == 10:
                trainer.request_stop()

    trainer = nn.Trainer(nn.Sequential(nn.Dense(20, 4), seed=5), batch_size=32, quiet=True)
    trainer.fit(x, y, epochs=1, callbacks=[StopAfterTheLastStep()])
    assert trainer._resume_point["step"] == 11
    trainer.save_checkpoint(tmp_path / "ckpt.npz")
    resumed = nn.Trainer(nn.Sequential(nn.Dense(20, 4), seed=5), batch_size=32, quiet=True)
    resumed.load_checkpoint(tmp_path / "ckpt.npz")
    resumed.fit(x, y, epochs=1)
    assert resumed.history["epoch"] == [1] and resumed.history["samples_per_s"] == [0.0]


@pytest.mark.parametrize("momenta", [(0.0, 0.9, 0.9), (0.9, 0.0, 0.0), (0.9, 0.0, 0.9)],
                         ids=["turned-on", "turned-off", "off-then-on"])
def test_a_checkpoint_after_sgds_momentum_changed_resumes_as_the_uninterrupted_run(tmp_path, momenta):
    """A callback may change SGD's momentum between epochs (``momenta``: those of epochs 1 to 3): turned on, the
    velocity starts then (a step failed on its absence); turned off, a checkpoint holds the velocity, unused
    (its file was refused as holding an optimizer member the momentum has no place for, then written without
    it, so a momentum turned on again after a resume started from a zero velocity), as PyTorch's SGD keeps its
    momentum_buffer; turned on again, the resumed run goes on with it as the uninterrupted one does."""
    x, y = datasets.synthetic(n=60, features=8, classes=3, seed=2)

    class Momentum(nn.Callback):
        def on_epoch_end(self, trainer, logs):
            if logs["epoch"] < len(momenta):
                trainer.optimizer.momentum = momenta[logs["epoch"]]

    def trainer():
        return nn.Trainer(nn.Sequential(nn.Dense(8, 3), seed=1), optimizer=nn.SGD(lr=0.1, momentum=momenta[0]),
                          batch_size=16, quiet=True)

    uninterrupted = trainer()  # epoch 2's checkpoint is written at its momentum, before the callback changes it
    uninterrupted.fit(x, y, epochs=3, callbacks=[nn.ModelCheckpoint(tmp_path / "ckpt-{epoch}.npz"), Momentum()])
    resumed = trainer().load_checkpoint(tmp_path / "ckpt-2.npz")
    assert resumed.optimizer.momentum == momenta[1] and list(resumed.optimizer.state) == ["velocity"]
    resumed.optimizer.momentum = momenta[2]
    resumed.fit(x, y, epochs=1)
    numpy.testing.assert_array_equal(resumed.model.flat_params, uninterrupted.model.flat_params)


def test_the_largest_seeds_save_and_load(tmp_path):
    """Seeds up to 2**63 - 1, all a checkpoint holds (the constructors refuse larger ones)."""
    x, y = datasets.synthetic(n=20, features=6, classes=3, seed=2)
    seed = 2**63 - 1
    trainer = nn.Trainer(nn.Sequential(nn.Dense(6, 4), nn.Dropout(0.5), nn.Dense(4, 3), seed=seed), batch_size=8,
                         seed=seed, quiet=True)
    trainer.fit(x, y)
    trainer.save_checkpoint(tmp_path / "ckpt.npz")
    resumed = nn.Trainer(nn.Sequential(nn.Dense(6, 4), nn.Dropout(0.5), nn.Dense(4, 3)), quiet=True)
    resumed.load_checkpoint(tmp_path / "ckpt.npz")
    assert resumed.seed == resumed.model.seed == nn.load(tmp_path / "ckpt.npz").seed == seed


def test_save_load_gives_same_predictions(device, tmp_path):
    x, y = datasets.load_digits("train")
    model = _digits_net(device, activation=nn.LeakyReLU(0.1))
    nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=64, quiet=True).fit(x, y, epochs=1)
    model.save(tmp_path / "m.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary file left behind
    for target in ("cpu", device):
        loaded = nn.load(tmp_path / "m.npz", device=target)
        assert loaded.device == nn.resolve_device(target)
        assert loaded.layers[0].activation == nn.LeakyReLU(0.1)
        numpy.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_model_to_moves_and_keeps_weights(device):
    model = _digits_net("cpu")
    before = model.predict(numpy.eye(64, dtype=numpy.float32))
    model.to(device)
    assert model.device == nn.resolve_device(device)
    numpy.testing.assert_allclose(model.predict(numpy.eye(64, dtype=numpy.float32)), before, rtol=1e-6)
    assert all(nn.backend.array_device(p.data) == model.device for p in model.parameters())


def test_bad_checkpoints_are_refused(tmp_path):
    model = _digits_net("cpu")
    model.save(tmp_path / "m.npz")
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(nn.CheckpointError, match="cut.npz"):
        nn.load(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(nn.CheckpointError, match="text.npz"):
        nn.load(tmp_path / "text.npz")
    numpy.savez(tmp_path / "other.npz", a=numpy.zeros(3))
    with pytest.raises(nn.CheckpointError, match="not an nnaccel checkpoint"):
        nn.load(tmp_path / "other.npz")
    with pytest.raises(nn.CheckpointError, match="does not exist"):
        nn.load(tmp_path / "missing.npz")
    other = nn.Trainer(nn.Sequential(nn.Dense(64, 32), nn.Dense(32, 10)), quiet=True)
    with pytest.raises(nn.CheckpointError, match="64-256-10 network but the model is 64-32-10"):
        other.load_checkpoint(tmp_path / "m.npz")
    images = nn.Trainer(nn.Sequential(nn.Flatten(), nn.Dense(64, 10), input_shape=(1, 8, 8)), quiet=True)
    images.save_checkpoint(tmp_path / "i.npz")
    cubes = nn.Trainer(nn.Sequential(nn.Flatten(), nn.Dense(64, 10), input_shape=(4, 4, 4)), quiet=True)
    with pytest.raises(nn.CheckpointError, match=r"i.npz holds a network for inputs of shape \(1, 8, 8\) but the "
                                                 r"model takes \(4, 4, 4\)"):
        cubes.load_checkpoint(tmp_path / "i.npz")


@pytest.mark.parametrize("loss, targets, message", [
    ("mse", numpy.full(8, 3), "y ranges from 3 to 3 but the output layer has 3 units: labels must be in \\[0, 2\\]"),
    ("mse", numpy.full(8, -1), "labels must be in \\[0, 2\\]"),
    ("sigmoid_cross_entropy", numpy.full((8, 3), 2.0), "y ranges from 2 to 2; binary cross-entropy takes targets"),
    ("sigmoid_cross_entropy", numpy.full((8, 3), -0.5), "y ranges from -0.5 to -0.5"),
    ("sigmoid_cross_entropy", numpy.full(8, 3), "y ranges from 3 to 3 but the output layer has 3 units"),
])
def test_every_loss_refuses_targets_out_of_its_range(device, loss, targets, message):
    """Not only the default loss: MSE's and binary cross-entropy's integer labels (an out-of-range one would
    be an all-zero one-hot row) and binary cross-entropy's targets (in [0, 1])."""
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3), device=device), loss=loss, quiet=True)
    with pytest.raises(nn.ShapeError, match=message):
        trainer.fit(numpy.ones((8, 4), numpy.float32), targets, epochs=1)


def test_mse_of_one_output_counts_rows_on_the_targets_side_of_a_half(device):
    """Keras's binary accuracy: argmax of a single column is always 0, so every row counted as right."""
    rng = numpy.random.default_rng(0)
    x, target = rng.random((64, 5), numpy.float32), (rng.random(64) > 0.5).astype(numpy.float32)
    trainer = nn.Trainer(nn.Sequential(nn.Dense(5, 1), device=device, seed=1), loss=nn.MSE(), quiet=True)
    for epoch in range(3):
        predicted = trainer.model.predict(x)[:, 0]
        expected = numpy.mean((predicted > 0.5) == (target > 0.5))
        assert trainer.evaluate(x, target)["accuracy"] == pytest.approx(expected) and 0 < expected < 1
        trainer.fit(x, target, epochs=1)


def test_data_is_checked_once_with_clear_errors():
    model = _digits_net("cpu")
    trainer = nn.Trainer(model, quiet=True)
    x, y = datasets.load_digits("train")
    cases = [
        ((x[:, :10], y), "x has shape \\(1437, 10\\) but the first layer expects \\(samples, 64\\)"),
        ((x, y[:-1]), "y has 1436 entries but x has 1437 samples"),
        ((x, y + 5), "labels must be in \\[0, 9\\]"),
        ((x, y.astype(numpy.float32)), "expected integer class indices"),
        ((x[:0], y[:0]), "x is empty"),
        ((numpy.where(x > 0.5, numpy.nan, x), y), "x contains NaN or inf"),
    ]
    for (xb, yb), message in cases:
        with pytest.raises(nn.NnaccelError, match=message):
            trainer.fit(xb, yb, epochs=1)
    with pytest.raises(nn.ConfigError, match="batch_size"):
        nn.Trainer(model, batch_size=0)
    with pytest.raises(nn.ConfigError, match="learning rate"):
        nn.SGD(lr=-1)
    with pytest.raises(nn.ConfigError, match="do not chain"):
        nn.Sequential(nn.Dense(64, 32), nn.Dense(16, 10))


def test_integer_and_float16_inputs_are_converted_exactly():
    x, y = datasets.load_digits("train")
    pixels = numpy.rint(x * 16).astype(numpy.uint8)
    model = _digits_net("cpu")
    trainer = nn.Trainer(model, quiet=True)
    xs, _ = trainer.prepare(pixels, y)
    assert xs.dtype == numpy.float32
    numpy.testing.assert_array_equal(xs, pixels.astype(numpy.float32))
    x16, _ = trainer.prepare(x.astype(numpy.float16), y)
    assert x16.dtype == numpy.float32


def test_callbacks(tmp_path):
    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_digits("train"))
    model = _digits_net("cpu")
    stop = nn.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    best = nn.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)
    log = nn.CSVLogger(tmp_path / "log.csv")
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.5, momentum=0.9), batch_size=16, quiet=True)
    history = trainer.fit(x, y, epochs=30, validation_data=(xv, yv),
                          callbacks=[stop, best, log, nn.PlotCurves(tmp_path / "curves.png")])
    epochs = len(history["loss"])
    assert epochs < 30 and stop.best_epoch == epochs - 1  # stopped after `patience` epochs without a gain
    assert trainer.evaluate(xv, yv)["loss"] == pytest.approx(min(history["val_loss"]), rel=1e-5)
    assert len((tmp_path / "log.csv").read_text().splitlines()) == epochs + 1
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    restored = nn.load(tmp_path / "best.npz")
    assert nn.Trainer(restored, quiet=True).evaluate(xv, yv)["loss"] == pytest.approx(min(history["val_loss"]), rel=1e-5)


def test_the_history_holds_one_value_per_epoch_with_nan_where_a_fit_had_no_validation(tmp_path):
    """Fits with and without validation data: every list is as long as the epochs, NaN marking the epochs
    without validation; the curves are drawn with gaps there, and a checkpoint keeps them so."""
    trainer, data, validation = _small_run()
    trainer.fit(*data, epochs=1)
    trainer.fit(*data, epochs=2, validation_data=validation)
    history = trainer.fit(*data, epochs=1, callbacks=nn.PlotCurves(tmp_path / "curves.png"))
    assert history["epoch"] == [1, 2, 3, 4] and all(len(values) == 4 for values in history.values())
    assert numpy.isnan(history["val_loss"][0]) and numpy.isnan(history["val_loss"][3])
    assert not numpy.isnan(history["val_loss"][1:3]).any() and not numpy.isnan(history["loss"]).any()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trainer.save_checkpoint(tmp_path / "run.npz")
    resumed, _, _ = _small_run()
    resumed.load_checkpoint(tmp_path / "run.npz")
    assert all(numpy.array_equal(resumed.history[k], v, equal_nan=True) for k, v in history.items())


def test_curves_of_a_fit_without_an_epoch_are_empty_axes_and_its_error_is_its_own(tmp_path):
    """A fit stopped before its first step, or diverged in its first epoch, has no epoch to draw: PlotCurves
    draws empty axes, and the divergence is what the fit raises (plot_history raised KeyError 'loss')."""
    trainer, data, _ = _small_run()
    trainer.request_stop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'No artists with labels found to put in legend'
        assert trainer.fit(*data, callbacks=nn.PlotCurves(tmp_path / "stopped.png")) == {}
    assert (tmp_path / "stopped.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trainer, (x, y), _ = _small_run()
    trainer.optimizer.lr = 1e38
    with numpy.errstate(all="ignore"), pytest.raises(nn.TrainingDiverged, match="at epoch 1, step"):
        trainer.fit(x * 1e18, y, callbacks=nn.PlotCurves(tmp_path / "diverged.png"))


def test_weights_that_overflowed_are_not_saved_over_a_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A step can overflow the weights to inf with the loss it computed still finite: the next step's loss
    is NaN, and the weights kept from before it are inf. A checkpoint of them was written (over the run's
    good one) that no command could load; now model.save, ModelCheckpoint and train --save refuse it."""
    from nnaccel import checkpoint, cli

    model = nn.Sequential(nn.Dense(4, 3), seed=0)
    model.save(tmp_path / "good.npz")
    good = (tmp_path / "good.npz").read_bytes()
    model.parameters()[0].data[0, 0] = numpy.inf
    message = r"good.npz was not written: its member 'param/0.weight' would hold NaN or inf \(the weights overflowed\)"
    with pytest.raises(nn.OutputError, match=message):
        model.save(tmp_path / "good.npz")
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3), seed=0), optimizer=nn.SGD(lr=1e38), quiet=True)
    with numpy.errstate(all="ignore"), pytest.raises(nn.OutputError, match=message):  # the one step's loss finite
        trainer.fit(numpy.full((4, 4), 100, numpy.float32), numpy.arange(4) % 3,
                    callbacks=[nn.ModelCheckpoint(tmp_path / "good.npz")])
    assert (tmp_path / "good.npz").read_bytes() == good and sorted(tmp_path.iterdir()) == [tmp_path / "good.npz"]
    monkeypatch.chdir(tmp_path)
    train = ["train", "--data", "synthetic", "--layers", "784,10", "--epochs", "1", "--device", "cpu", "--quiet",
             "--save", "run.npz"]
    assert cli.main(train) == 0
    saved = (tmp_path / "run.npz").read_bytes()
    capsys.readouterr()
    with numpy.errstate(all="ignore"):
        assert cli.main([*train, "--lr", "1e308"]) == 2
    assert capsys.readouterr().err == (
        "nnaccel train: error: loss became nan at epoch 1, step 2; training stopped and kept the weights from before "
        "that step (try a lower learning rate); run.npz was not written: its member 'param/0.weight' would hold NaN "
        "or inf (the weights overflowed), which no command could load\n")
    assert (tmp_path / "run.npz").read_bytes() == saved and checkpoint.read(tmp_path / "run.npz")


def test_a_refused_fit_leaves_early_stoppings_best_weights_in_the_model(tmp_path):
    """A fit refused before training (validation data of another width) leaves the model with the best
    epoch's weights that early stopping put back, not the last epoch's it would have trained on from; and
    the next fit and its checkpoint still go on from the last epoch's, as the uninterrupted run does."""
    x, y = datasets.synthetic(n=200, features=20, classes=4, seed=1)
    xv, yv = datasets.synthetic(n=60, features=20, classes=4, seed=2)

    def trained():
        trainer = nn.Trainer(nn.Sequential(nn.Dense(20, 4), seed=5), optimizer=nn.SGD(lr=2.0), batch_size=32,
                             quiet=True)
        trainer.fit(x, y, epochs=8, validation_data=(xv, yv), callbacks=[nn.EarlyStopping(patience=8)])
        assert numpy.argmin(trainer.history["val_loss"]) < 7  # the best epoch's weights were put back
        return trainer

    trainer = trained()
    best = trainer.model.flat_params.copy()
    with pytest.raises(nn.ShapeError, match="validation x"):
        trainer.fit(x, y, epochs=1, validation_data=(xv[:, :5], yv))
    numpy.testing.assert_array_equal(trainer.model.flat_params, best)
    trainer.save_checkpoint(tmp_path / "run.npz")
    resumed = nn.Trainer(nn.Sequential(nn.Dense(20, 4)), optimizer=nn.SGD(lr=2.0), batch_size=32, quiet=True)
    resumed.load_checkpoint(tmp_path / "run.npz")
    whole = trained()
    for run in (trainer, resumed, whole):
        run.fit(x, y, epochs=1)
    numpy.testing.assert_array_equal(trainer.model.flat_params, whole.model.flat_params)
    numpy.testing.assert_array_equal(resumed.model.flat_params, whole.model.flat_params)


def test_a_resumed_best_only_checkpoint_keeps_the_runs_best_epoch(tmp_path):
    """save_best_only after a resume compares with the epochs the checkpoint's history holds: a worse
    epoch (a rate of 50 blows the loss up) is not written over the run's best."""
    x, y = datasets.synthetic(n=200, features=10, classes=3, seed=1)
    xv, yv = datasets.synthetic(n=100, features=10, classes=3, seed=2)

    def fit(lr, epochs, resume=None):
        trainer = nn.Trainer(nn.Sequential(nn.Dense(10, 3)), optimizer=nn.SGD(lr), quiet=True)
        if resume:
            trainer.load_checkpoint(resume)
            trainer.optimizer.lr = trainer.optimizer.base_lr = lr
        trainer.fit(x, y, epochs=epochs, validation_data=(xv, yv),
                    callbacks=[nn.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)])
        return trainer

    trainer = fit(0.5, 3)
    trainer.save_checkpoint(tmp_path / "last.npz")
    best_epoch = 1 + int(numpy.argmin(trainer.history["val_loss"]))
    resumed = fit(50.0, 1, resume=tmp_path / "last.npz")
    assert resumed.history["val_loss"][-1] > min(trainer.history["val_loss"])
    assert nn.checkpoint.read(tmp_path / "best.npz")[0]["trainer"]["epoch"] == best_epoch


@pytest.mark.parametrize("check_every", [1, 5])
def test_divergence_stops_with_the_last_good_weights(device, check_every):
    """A non-finite loss stops training before its update, naming the epoch and step.

    ``check_every=5`` is the GPU strategy (periodic check, snapshot restore), run on every device.
    """
    x, y = datasets.load_digits("train")
    model = _digits_net(device)

    class Explode(nn.Callback):
        """Makes the next update blow the weights up to inf, as a diverging run would."""

        def on_batch_end(self, trainer, step, loss):
            if trainer.epoch == 1 and step == 2:
                trainer.optimizer.lr = 1e38

    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=64, quiet=True)
    trainer.nan_check_every = check_every
    with numpy.errstate(all="ignore"), pytest.raises(nn.TrainingDiverged, match="at epoch 2, step") as error:
        trainer.fit(x, y, epochs=5, callbacks=[Explode()])
    assert error.value.epoch == 2 and error.value.step == (5 if check_every == 1 else 6)
    assert numpy.isfinite(model.backend.to_host(model.flat_params)).all()  # the failing step's update never landed
    if check_every > 1:  # restored to the last check that passed
        assert numpy.isfinite(trainer.evaluate(x, y)["loss"])


def test_a_diverged_step_leaves_the_batchnorm_statistics_of_the_steps_before(device):
    """A huge input makes step 4's BatchNorm statistics inf: checked every step, training stops with the
    running statistics (and weights) of the three steps before it, not the failed step's NaN."""
    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal((256, 8)).astype(numpy.float32), rng.integers(0, 3, 256)
    bad = x.copy()
    bad[100] = 3e38  # finite, so the data checks take it; its squares are not

    def trainer():
        model = nn.Sequential(nn.Dense(8, 16, activation="relu"), nn.BatchNorm(16), nn.Dense(16, 3), device=device)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=32, quiet=True)
        trainer.nan_check_every = 1
        trainer.fit(x, y, shuffle=False)
        return trainer

    diverged, reference = trainer(), trainer()
    with numpy.errstate(all="ignore"), pytest.raises(nn.TrainingDiverged, match="at epoch 2, step 4"):
        diverged.fit(bad, y, shuffle=False)
    reference.fit(x[:96], y[:96], shuffle=False)
    for name in ("flat_buffers", "flat_params"):
        numpy.testing.assert_array_equal(*(t.model.backend.to_host(getattr(t.model, name)) for t in (diverged, reference)),
                                         err_msg=name)
    assert numpy.isfinite(diverged.evaluate(x, y)["loss"])


def test_out_of_memory_is_reported_with_the_batch_size(device, monkeypatch):
    """A failed allocation mid-training becomes one clear error (no hang, no raw MemoryError). On CUDA
    the memory pool is capped so that a real allocation of the step fails."""
    x, y = datasets.load_digits("train")
    trainer = nn.Trainer(_digits_net(device, activation="gelu"), batch_size=128, quiet=True)
    if device == "cpu":
        def exhausted(model):
            raise MemoryError("Unable to allocate 1.2 GiB for an array")

        monkeypatch.setattr(trainer.optimizer, "step", exhausted)
        expected = "out of memory on cpu .*batch size 128.*smaller --batch-size"
    else:
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.set_limit(size=pool.used_bytes() + x.nbytes)  # room for the inputs, and nothing more
        expected = (r"out of GPU memory on cuda:0 with batch size 128: Out of memory allocating .* the memory pool "
                    r"holds .* MiB free on the device; try a smaller --batch-size")
    try:
        with pytest.raises(nn.OutOfMemory, match=expected):
            trainer.fit(x, y, epochs=1)
    finally:
        if device != "cpu":
            pool.set_limit(size=0)


def test_an_epoch_gathers_its_shuffled_batches_without_copying_the_data_set():
    """Each step gathers its rows into a buffer of one batch: a shuffled copy of the whole set per
    epoch cost the 784-16-16-10 fit of the benchmark a tenth of its time (fresh pages to fault in)."""
    import tracemalloc

    x, y = datasets.synthetic(n=4000, features=784, classes=10, seed=1)  # 12.5 MB of float32
    trainer = nn.Trainer(nn.Sequential(nn.Dense(784, 16, activation="relu"), nn.Dense(16, 10), seed=0),
                         batch_size=32, seed=0, quiet=True)
    x, y = trainer.prepare(x, y)
    trainer.fit(x, y, epochs=1)  # the first steps allocate the work arrays
    tracemalloc.start()
    try:
        trainer.fit(x, y, epochs=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 2, f"an epoch allocated {peak:,} bytes at its peak"


@pytest.mark.parametrize("loss, target, message", [
    (nn.SigmoidCrossEntropy(), lambda y: y[:, None].astype(numpy.float32), r"shape \(1437, 1\) but the model has 10"),
    (nn.MeanSquaredError(), lambda y: y.astype(numpy.float32), r"shape \(1437,\) but the model has 10"),
    (nn.MeanSquaredError(), lambda y: numpy.ones((1437, 3), numpy.float32), r"shape \(1437, 3\)"),
])
def test_target_shapes_are_checked_when_data_is_handed_over(loss, target, message):
    x, y = datasets.load_digits("train")
    trainer = nn.Trainer(_digits_net("cpu"), loss=loss, quiet=True)
    with pytest.raises(nn.ShapeError, match=message):
        trainer.fit(x, target(y), epochs=1)


def test_early_stopping_goes_on_from_a_checkpoint_as_the_uninterrupted_run(tmp_path):
    """A checkpoint keeps early stopping's state: resumed from an epoch's checkpoint written before or
    after the callback saw that epoch, or from the middle of an epoch after the best one, the run stops
    at the same epoch and ends with the same best weights, bit for bit."""
    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_digits("train"))

    class CtrlC(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if trainer.epoch == 3 and step == 5:
                trainer.request_stop()

    def run(*callbacks, resume=None):
        trainer = nn.Trainer(_digits_net("cpu"), optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=16, quiet=True)
        if resume is not None:
            trainer.load_checkpoint(resume)
        stop = nn.EarlyStopping(patience=2)
        trainer.fit(x, y, epochs=30 - trainer.epoch, validation_data=(xv, yv), callbacks=[*callbacks, stop])
        return trainer, stop

    whole, stop = run()
    assert (stop.best_epoch, whole.epoch) == (3, 5)  # two epochs without a gain after the third
    before, _ = run(nn.ModelCheckpoint(tmp_path / "before-{epoch}.npz"))  # saved before the callback's turn
    interrupted, _ = run(CtrlC())
    assert interrupted._resume_point is not None
    interrupted.save_checkpoint(tmp_path / "mid-4.npz")
    after = nn.Trainer(_digits_net("cpu"), optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=16, quiet=True)
    after_stop = nn.EarlyStopping(patience=2)
    after.fit(x, y, epochs=4, validation_data=(xv, yv), callbacks=[after_stop, nn.ModelCheckpoint(tmp_path / "after.npz")])
    for name in ("before-2.npz", "before-3.npz", "before-4.npz", "mid-4.npz", "after.npz", "before-5.npz"):
        resumed, resumed_stop = run(resume=tmp_path / name)
        assert (resumed_stop.best_epoch, resumed.epoch) == (3, 5), name
        numpy.testing.assert_array_equal(resumed.model.flat_params, whole.model.flat_params, err_msg=name)
    assert resumed.history["epoch"] == [1, 2, 3, 4, 5]  # from before-5: its patience spent, no epoch more

    later = nn.Trainer(_digits_net("cpu"), optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=16, quiet=True)
    later.load_checkpoint(tmp_path / "before-4.npz")
    later.fit(x, y, epochs=1, validation_data=(xv, yv))  # the state goes to the first fit after the restore
    stop = nn.EarlyStopping(patience=2)
    later.fit(x, y, epochs=1, validation_data=(xv, yv), callbacks=[stop])
    assert stop.since == 5 and stop.best_epoch == 6


def test_early_stopping_leaves_an_interrupted_run_as_it_is():
    """Restoring the best weights on Ctrl-C would mismatch the optimizer state the checkpoint saves."""
    (x, y), (xv, yv) = datasets.train_val_split(*datasets.load_digits("train"))

    class CtrlC(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if trainer.epoch == 2 and step == 3:
                trainer.request_stop()

    def interrupted_run(*callbacks):
        model = _digits_net("cpu")
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.5, momentum=0.9), batch_size=16, quiet=True)
        trainer.fit(x, y, epochs=10, validation_data=(xv, yv), callbacks=[*callbacks, CtrlC()])
        assert trainer.interrupted and trainer._resume_point["step"] == 4
        return model.flat_params

    stop = nn.EarlyStopping(monitor="val_accuracy", patience=5)
    numpy.testing.assert_array_equal(interrupted_run(stop), interrupted_run())
    assert stop.best_weights is not None  # it had weights to restore, and did not
