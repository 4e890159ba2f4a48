"""CUDA graphs: the training step captured once per batch shape and settings and replayed
ends with the weights of eager steps, bit for bit, on the emulated device, whose stand-in refuses
what CUDA refuses while capturing (synchronisation, host transfers, memory-pool allocation)."""

import numpy
import pytest

import nnaccel as nn
from nnaccel import datasets
from nnaccel.backend import cuda_kernels, cupy_backend


@pytest.fixture
def replays(monkeypatch):
    """The number of graph replays so far (a list of one count)."""
    count = [0]
    replay = cupy_backend._Graph.replay

    def counted(self):
        count[0] += 1
        return replay(self)

    monkeypatch.setattr(cupy_backend._Graph, "replay", counted)
    return count


def _mlp(device):
    return nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.BatchNorm(32), nn.Dense(32, 16, activation="relu"),
                         nn.Dense(16, 4), seed=5, device=device)


def _conv(device):
    """16x16 images: the first Conv2D's and BatchNorm's per-channel sums split into chunks of images at batch
    32 on the emulated device (cuda_kernels.channel_chunks), so the graph holds their merges too."""
    return nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.BatchNorm(4, activation="relu"), nn.MaxPool2D(2),
                         nn.Conv2D(4, 6, 3), nn.AvgPool2D(2), nn.Flatten(), nn.Dense(54, 5), input_shape=(1, 16, 16),
                         seed=5, device=device)


def _sgd():
    return nn.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _trainer(model, cuda_graphs=True, t_max=3, quiet=True, optimizer=_sgd, precision="fp32"):
    return nn.Trainer(model, optimizer=optimizer(), batch_size=32, seed=3, quiet=quiet, cuda_graphs=cuda_graphs,
                      schedule=nn.CosineAnnealing(t_max), precision=precision)


def _train(build, device, x, y, cuda_graphs, epochs=3, t_max=None, optimizer=_sgd, precision="fp32"):
    model = build(device)
    trainer = _trainer(model, cuda_graphs, t_max or epochs, optimizer=optimizer, precision=precision)
    history = trainer.fit(x, y, epochs=epochs)
    host = model.backend.to_host
    return trainer, history, {"params": host(model.flat_params), "buffers": host(model.flat_buffers),
                              **{name: host(buf) for name, buf in trainer.optimizer.state.items()}}


def _adamw():
    return nn.AdamW(lr=0.01, weight_decay=0.05)


@pytest.mark.parametrize("build, features, classes, optimizer, precision",
                         [(_mlp, 20, 4, _sgd, "fp32"), (_conv, 256, 5, _sgd, "fp32"), (_mlp, 20, 4, _adamw, "fp32"),
                          (_mlp, 20, 4, _sgd, "bf16"), (_conv, 256, 5, _sgd, "bf16")],
                         ids=["mlp-bn", "conv-bn-pool", "mlp-bn-adamw", "mlp-bn-bf16", "conv-bn-pool-bf16"])
def test_replayed_steps_end_with_the_eager_weights_bit_for_bit(emulated, replays, build, features, classes,
                                                               optimizer, precision):
    """333 samples in batches of 32 (a short last batch: a graph of its own) over 3 epochs of a
    cosine schedule (a new learning rate each epoch: graphs captured again). With AdamW the graph
    stops before the update, whose bias correction changes every step (so its graphs of the first
    epoch serve all three). Under bf16 the graph holds the storage conversions and cuBLAS's bfloat16
    GEMMs."""
    if build is _conv:  # the per-channel sums of the full batches run in chunks, merged in the graph
        assert cuda_kernels.channel_chunks(32, 4, features, cuda_kernels._sm_count(0))[0] > 1
    x, y = datasets.synthetic(n=333, features=features, classes=classes, seed=1)
    kwargs = {"optimizer": optimizer, "precision": precision}
    trainer, history, eager = _train(build, emulated, x, y, cuda_graphs=False, **kwargs)
    assert replays[0] == 0
    graphed_trainer, graphed_history, graphed = _train(build, emulated, x, y, cuda_graphs=True, **kwargs)
    steps = 3 * 11
    captures = 1 if optimizer is _adamw else 3  # SGD's: each epoch, one eager step per batch shape
    assert replays[0] == steps - captures * 2
    for name in eager:
        numpy.testing.assert_array_equal(graphed[name], eager[name], err_msg=name)
    assert graphed_trainer.optimizer.steps == trainer.optimizer.steps == steps
    assert graphed_history["loss"] == history["loss"] and graphed_history["accuracy"] == history["accuracy"]


class _ChangeSettings(nn.Callback):
    """Each epoch's end: another SGD momentum and weight decay, Dropout rate and BatchNorm momentum; at
    step 4 of each epoch another momentum again (a one-cycle schedule changes it every step)."""

    def on_epoch_end(self, trainer, logs):
        optimizer, (_, dropout, _, batchnorm, _) = trainer.optimizer, trainer.model.layers
        optimizer.momentum, optimizer.weight_decay = 0.5 / logs["epoch"], 0.02 * logs["epoch"]
        dropout.rate, batchnorm.momentum = 0.1 * logs["epoch"], 0.3

    def on_batch_end(self, trainer, step, loss):
        if step == 4:
            trainer.optimizer.momentum *= 0.5


def test_settings_a_callback_changes_take_effect_in_replayed_steps(emulated, replays):
    """A graph holds the optimizer's and the layers' options as numbers: changed between steps, they get
    a graph of their own, and the run ends with the eager run's weights, bit for bit."""
    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)

    def run(cuda_graphs):
        model = nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.Dropout(0.3), nn.Dense(32, 16),
                              nn.BatchNorm(16), nn.Dense(16, 4), seed=5, device=emulated)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.05, momentum=0.9), batch_size=32, seed=3, quiet=True,
                             cuda_graphs=cuda_graphs)
        trainer.fit(x, y, epochs=3, callbacks=[_ChangeSettings()])
        return model.backend.to_host(model.flat_params), model.backend.to_host(model.flat_buffers)

    eager = run(False)
    graphed = run(True)
    assert replays[0] == 3 * (11 - 3)  # each epoch: eager first steps of its 2 settings and of the short batch
    for got, expected in zip(graphed, eager):
        numpy.testing.assert_array_equal(got, expected)


class _Plain(nn.optimizers.Optimizer):
    """An optimizer of one's own: plain gradient descent."""

    def _update(self, ops, params, grads, state):
        ops.sgd_update(params, grads, None, self.lr, 0.0, self.weight_decay, False)


def test_an_optimizer_of_ones_own_trains_in_replayed_steps(emulated, replays):
    """The graph's settings hold the optimizer's config, which a direct subclass of Optimizer had none of
    (NotImplementedError at the first step); it names the class and the base options."""
    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    _, _, eager = _train(_mlp, emulated, x, y, cuda_graphs=False, optimizer=lambda: _Plain(lr=0.05))
    trainer, _, graphed = _train(_mlp, emulated, x, y, cuda_graphs=True, optimizer=lambda: _Plain(lr=0.05))
    assert replays[0] and trainer.optimizer.config() == {"type": "_Plain", "lr": 0.05, "weight_decay": 0.0}
    for name, expected in eager.items():
        numpy.testing.assert_array_equal(graphed[name], expected, err_msg=name)


def test_a_replayed_step_has_its_batch_gathered_where_the_graph_reads_it(emulated, replays, monkeypatch):
    """The epoch loop gathers each shuffled batch into the graph's own input buffers
    (``GraphedStep.inputs``), so a replay copies no batch."""
    from nnaccel import graphs

    gathered_in_place = []
    call = graphs.GraphedStep.__call__

    def watched(self, x, y, rows, first, guard, index):
        key = self._key(x.shape[0], rows, first)
        if key in self.graphs:
            gathered_in_place.append(x is self.graphs[key][1] and y is self.graphs[key][2])
        return call(self, x, y, rows, first, guard, index)

    monkeypatch.setattr(graphs.GraphedStep, "__call__", watched)
    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    _train(_mlp, emulated, x, y, cuda_graphs=True)
    assert len(gathered_in_place) == replays[0] == 3 * 11 - 3 * 2 and all(gathered_in_place)


def test_a_graphed_run_resumes_bit_for_bit(emulated, replays, tmp_path):
    x, y = datasets.synthetic(n=200, features=20, classes=4, seed=2)
    _, _, expected = _train(_mlp, emulated, x, y, cuda_graphs=True, epochs=4)
    first, _, _ = _train(_mlp, emulated, x, y, cuda_graphs=True, epochs=2, t_max=4)
    first.save_checkpoint(tmp_path / "ck.npz")
    model = _mlp(emulated)
    resumed = _trainer(model, t_max=4)
    resumed.load_checkpoint(tmp_path / "ck.npz")
    resumed.fit(x, y, epochs=2)
    numpy.testing.assert_array_equal(model.backend.to_host(model.flat_params), expected["params"])
    assert replays[0] > 0


@pytest.mark.parametrize("seed", [2, 10 ** 7], ids=["seed-2", "seed-1e7"])  # 1e7: layer seeds past 2**32
def test_dropout_and_shifts_draw_in_replayed_steps_what_eager_steps_draw(emulated, replays, seed):
    """Dropout and RandomShift draw with a device copy of their counter under a graph: the same
    masks and shifts as eager steps (and the CPU's), so the same weights, and their counters end
    where eager ones do."""
    x, y = datasets.synthetic(n=150, features=64, classes=4, seed=1)

    def build(device):
        return nn.Sequential(nn.RandomShift(1), nn.Conv2D(1, 2, 3), nn.Flatten(), nn.Dropout(0.3),
                             nn.Dense(72, 4), input_shape=(1, 8, 8), seed=seed, device=device)

    _, _, eager = _train(build, emulated, x, y, cuda_graphs=False)
    _, _, on_cpu = _train(build, "cpu", x, y, cuda_graphs=False)
    numpy.testing.assert_allclose(eager["params"], on_cpu["params"], rtol=1e-4, atol=1e-5)
    trainer, _, graphed = _train(build, emulated, x, y, cuda_graphs=True)
    assert replays[0] == 3 * 5 - 3 * 2
    for name in eager:
        numpy.testing.assert_array_equal(graphed[name], eager[name], err_msg=name)
    shift, dropout = trainer.model.layers[0], trainer.model.layers[3]
    assert shift.counter == dropout.counter == 15 and shift.device_counter is None


def test_a_graph_sets_aside_memory_for_the_step_s_temporaries_only(emulated, replays, monkeypatch):
    """The first (eager) step of a shape makes lasting arrays: the layers' work arrays, the momentum, the
    divergence guard's snapshot (3 copies of the parameters). The capture allocates none of them again, so
    the arena set aside for it holds less than one copy of the parameters; the replays train as before."""
    reserved = []
    capture = cupy_backend.CupyBackend.capture

    def recorded(self, run, sizes):
        reserved.append(sum(sizes))
        return capture(self, run, sizes)

    monkeypatch.setattr(cupy_backend.CupyBackend, "capture", recorded)
    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    trainer, _, graphed = _train(_mlp, emulated, x, y, cuda_graphs=True, epochs=1)
    _, _, eager = _train(_mlp, emulated, x, y, cuda_graphs=False, epochs=1)
    assert replays[0] > 0 and len(reserved) == 2  # the full batches' graph and the short last one's
    assert max(reserved) < trainer.model.flat_params.nbytes
    for name in eager:
        numpy.testing.assert_array_equal(graphed[name], eager[name], err_msg=name)


def test_divergence_at_an_epoch_s_first_replay_returns_to_the_epoch_s_start(emulated, replays):
    """Epoch 2's first step is a replay, whose update lands before its check: the weights and BatchNorm
    buffers go back to the start of epoch 2 (a snapshot taken there), finite, as the message says."""
    class BlowUp(nn.Callback):
        def on_epoch_end(self, trainer, logs):
            if logs["epoch"] == 1:
                self.start = trainer.model.flat_params * 1e30
                trainer.model.flat_params[...] = self.start  # finite, but its first step overflows

    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal((96, 8)).astype(numpy.float32), rng.integers(0, 3, 96)
    model = nn.Sequential(nn.Dense(8, 16, activation="relu"), nn.BatchNorm(16), nn.Dense(16, 3), device=emulated)
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=32, quiet=True)
    blow_up = BlowUp()
    with numpy.errstate(all="ignore"), pytest.raises(nn.TrainingDiverged, match="at epoch 2, step 1; .* kept the "
                                                                               "weights from before that step"):
        trainer.fit(x, y, epochs=2, shuffle=False, callbacks=[blow_up])
    assert replays[0] > 0
    host = model.backend.to_host
    numpy.testing.assert_array_equal(host(model.flat_params), host(blow_up.start))
    assert numpy.isfinite(host(model.flat_buffers)).all()


def test_a_step_that_breaks_capture_warns_and_runs_eagerly(emulated, replays, capsys, monkeypatch):
    """A host read inside the step (here planted in the loss) is what CUDA refuses while capturing:
    the stand-in refuses it as CUDA would, and the run goes on eagerly with the same weights."""
    x, y = datasets.synthetic(n=100, features=20, classes=4, seed=1)
    _, _, eager = _train(_mlp, emulated, x, y, cuda_graphs=False, epochs=1)
    forward = nn.SoftmaxCrossEntropy._forward

    def reads_the_loss(self, ops, out, targets):
        value = forward(self, ops, out, targets)
        float(value)  # a device-to-host read: a synchronisation
        return value

    monkeypatch.setattr(nn.SoftmaxCrossEntropy, "_forward", reads_the_loss)
    model = _mlp(emulated)
    _trainer(model, t_max=1, quiet=False).fit(x, y, epochs=1)
    err = capsys.readouterr().err
    assert "warning: CUDA graphs off: capturing the step failed (CUDARuntimeError: " \
           "cudaErrorStreamCaptureUnsupported" in err and err.count("CUDA graphs off") == 1
    assert replays[0] == 0
    numpy.testing.assert_array_equal(model.backend.to_host(model.flat_params), eager["params"])


def test_divergence_in_replayed_steps_returns_to_the_last_check_as_eager_steps_do(emulated, replays):
    """The update of step 4 of epoch 2 blows the weights up; the replayed steps' running loss is
    checked every 3 steps on the device, and the run stops where an eager one does, with its weights."""

    class Explode(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if trainer.epoch == 1 and step == 2:
                trainer.optimizer.lr = 1e38

    x, y = datasets.synthetic(n=320, features=20, classes=4, seed=1)
    outcomes = []
    for cuda_graphs in (False, True):
        model = nn.Sequential(nn.Dense(20, 32, activation="relu"), nn.Dense(32, 4), device=emulated, seed=1)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=32, quiet=True, cuda_graphs=cuda_graphs)
        trainer.nan_check_every = 3
        with pytest.raises(nn.TrainingDiverged, match="kept the weights from before step 4, the last check") as error:
            trainer.fit(x, y, epochs=5, callbacks=[Explode()])
        outcomes.append((error.value.epoch, error.value.step, model.backend.to_host(model.flat_params)))
    assert replays[0] > 0
    (eager_epoch, eager_step, eager), (epoch, step, graphed) = outcomes
    assert (epoch, step) == (eager_epoch, eager_step) == (2, 7)
    assert numpy.isfinite(graphed).all()
    numpy.testing.assert_array_equal(graphed, eager)


def test_divergence_checked_every_step_at_a_fit_s_first_replay_keeps_the_weights_before_it(emulated, replays):
    """Checked every step (``nan_check_every = 1``), the first replay of a fit, whose update lands before
    its check, fails back to the weights from before it, as an eager step does (they were NaN: no snapshot
    was taken before a fit's first replay)."""
    class BlowUp(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if step == 0:
                self.start = trainer.model.flat_params * 1e30
                trainer.model.flat_params[...] = self.start  # finite, but the next step overflows

    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal((96, 8)).astype(numpy.float32), rng.integers(0, 3, 96)
    for cuda_graphs in (False, True):
        model = nn.Sequential(nn.Dense(8, 16, activation="relu"), nn.Dense(16, 3), device=emulated)
        trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=32, quiet=True, cuda_graphs=cuda_graphs)
        trainer.nan_check_every = 1
        blow_up = BlowUp()
        with numpy.errstate(all="ignore"), pytest.raises(nn.TrainingDiverged, match="at epoch 1, step 2; .* kept "
                                                                                   "the weights from before that step"):
            trainer.fit(x, y, shuffle=False, callbacks=[blow_up])
        numpy.testing.assert_array_equal(model.backend.to_host(model.flat_params), model.backend.to_host(blow_up.start))
    assert replays[0] == 1


def test_a_callback_keeps_each_replayed_step_s_own_loss(emulated, replays):
    """The loss ``on_batch_end`` gets is that step's, also after the next replay (it was the graph's own
    array, which every replay overwrote: a list of them read the last replay's loss many times)."""
    class KeepLosses(nn.Callback):
        def __init__(self):
            self.losses = []

        def on_batch_end(self, trainer, step, loss):
            self.losses.append(loss)

    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    kept = []
    for cuda_graphs in (False, True):
        keep = KeepLosses()
        _trainer(_mlp(emulated), cuda_graphs, t_max=1).fit(x, y, callbacks=[keep])
        kept.append([float(loss) for loss in keep.losses])
    assert replays[0] == 11 - 2
    assert kept[1] == kept[0] and len(set(kept[0])) == 11


def test_a_fit_a_callback_fails_before_training_leaves_dropout_drawing_as_before(emulated):
    """A callback's on_train_begin that raises (a CSV log it cannot append to) ends the fit before its
    first step: the model's Dropout then trains eagerly as a fresh one does (it kept drawing with the
    graphs' device counter, never advanced again: the same mask every step)."""
    class Refuse(nn.Callback):
        def on_train_begin(self, trainer):
            raise nn.OutputError("cannot append")

    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    weights = []
    for refused in (False, True):
        model = nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.Dropout(0.3), nn.Dense(32, 4), seed=5,
                              device=emulated)
        if refused:
            with pytest.raises(nn.OutputError, match="cannot append"):
                nn.Trainer(model, quiet=True).fit(x, y, callbacks=[Refuse()])
        nn.Trainer(model, batch_size=32, seed=3, quiet=True, cuda_graphs=False).fit(x, y, epochs=2)
        weights.append(model.backend.to_host(model.flat_params))
    numpy.testing.assert_array_equal(*weights)


def test_a_learning_rate_changed_every_step_replays_adam_s_graphs(emulated, replays):
    """Adam's update runs after the replay, so its graph holds none of the optimizer's settings: a warm-up
    that sets the learning rate at every step replays the graph of each batch shape (it captured a graph
    per step, replaying none), and ends with the eager run's weights, bit for bit."""
    class WarmUp(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            trainer.optimizer.lr = 0.01 * min(1.0, (trainer.optimizer.steps + 1) / 20)

    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    weights = []
    for cuda_graphs in (False, True):
        model = _mlp(emulated)
        nn.Trainer(model, optimizer=_adamw(), batch_size=32, seed=3, quiet=True,
                   cuda_graphs=cuda_graphs).fit(x, y, epochs=3, callbacks=[WarmUp()])
        weights.append(model.backend.to_host(model.flat_params))
    assert replays[0] == 3 * 11 - 2  # the first steps of the full and the short batch run eagerly
    numpy.testing.assert_array_equal(*weights)


def test_a_hook_that_leaves_the_model_in_eval_mode_changes_no_step(emulated, replays):
    """A callback that puts the model in eval mode after a step (to predict) leaves the next steps training,
    as replayed ones do (eager steps went on in eval mode: no Dropout, BatchNorm's running statistics; the
    weights of eager and graphed runs differed)."""
    class Eval(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if step == 3:
                trainer.model.eval()

    x, y = datasets.synthetic(n=333, features=20, classes=4, seed=1)
    weights = []
    for cuda_graphs, callbacks in ((False, []), (False, [Eval()]), (True, [Eval()])):
        model = nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.Dropout(0.3), nn.BatchNorm(32), nn.Dense(32, 4),
                              seed=5, device=emulated)
        nn.Trainer(model, optimizer=_sgd(), batch_size=32, seed=3, quiet=True, cuda_graphs=cuda_graphs).fit(
            x, y, callbacks=callbacks)
        weights.append(model.backend.to_host(model.flat_params))
    assert replays[0] == 11 - 2
    for got in weights[1:]:
        numpy.testing.assert_array_equal(got, weights[0])


class _Scaled:
    """A loss of one's own (mixed into an nnaccel loss) with an option: the loss and its gradient ``scale`` times
    as large."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def _forward(self, ops, y, target):
        value = super()._forward(ops, y, target)
        self._grad *= self.scale
        return value * self.scale


class _ScaledMSE(_Scaled, nn.MSE):
    """With its option named in its config, as the base class's docstring asks."""

    def config(self):
        return {**super().config(), "scale": self.scale}


class _ScaledSigmoid(_Scaled, nn.SigmoidCrossEntropy):
    """With an option its config does not name."""


class _DampedSGD(nn.SGD):
    """An optimizer of one's own with an option its config does not name: SGD whose steps are ``damping`` times
    as long."""

    def __init__(self, damping=1.0, **options):
        super().__init__(**options)
        self.damping = damping

    def _update(self, ops, params, grads, state):
        ops.sgd_update(params, grads, state.get("velocity"), self.lr * self.damping, self.momentum,
                       self.weight_decay, self.nesterov)


def _reset_momentum(trainer):
    trainer.optimizer.state = {}  # a warm restart: the velocity starts again from zero


def _reload_optimizer(trainer):
    trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())  # host copies: new device buffers


# What a callback may change between steps that a graph holds: (what, optimizer, loss, change(trainer)).
_CHANGES = [
    ("a fresh SGD", _sgd, "mse", lambda trainer: setattr(trainer, "optimizer", _sgd())),
    ("SGD to AdamW", _sgd, "mse", lambda trainer: setattr(trainer, "optimizer", _adamw())),
    ("AdamW to SGD", _adamw, "mse", lambda trainer: setattr(trainer, "optimizer", _sgd())),
    ("the momentum reset", _sgd, "mse", _reset_momentum),
    ("the optimizer reloaded", _sgd, "mse", _reload_optimizer),
    ("the learning rate", _sgd, "mse", lambda trainer: setattr(trainer.optimizer, "lr", trainer.optimizer.lr / 3)),
    ("an optimizer's option not in its config", lambda: _DampedSGD(lr=0.05, momentum=0.9), "mse",
     lambda trainer: setattr(trainer.optimizer, "damping", 0.5)),
    ("Adam's betas", _adamw, "mse", lambda trainer: setattr(trainer.optimizer, "betas", (0.5, 0.9))),
    ("MSE to sigmoid cross-entropy", _sgd, "mse", lambda trainer: setattr(trainer, "loss", nn.SigmoidCrossEntropy())),
    ("a fresh loss", _sgd, _ScaledMSE, lambda trainer: setattr(trainer, "loss", _ScaledMSE(2.0))),
    ("a loss's option", _sgd, _ScaledMSE, lambda trainer: setattr(trainer.loss, "scale", trainer.loss.scale * 2)),
    ("a loss's option not in its config", _sgd, _ScaledSigmoid,
     lambda trainer: setattr(trainer.loss, "scale", trainer.loss.scale * 2)),
    ("Dropout's seed", _sgd, "mse", lambda trainer: trainer.model.set_rng_state(trainer.model.seed + 1,
                                                                                 trainer.model.rng_state())),
]


@pytest.mark.parametrize("hook", ["on_epoch_end", "on_batch_end"])
@pytest.mark.parametrize("what, optimizer, loss, change", _CHANGES, ids=[change[0] for change in _CHANGES])
def test_what_a_callback_changes_between_steps_takes_effect_in_replayed_steps(emulated, replays, hook, what, optimizer,
                                                                              loss, change):
    """A callback that replaces the trainer's optimizer or loss, their state or an option a graph holds
    as a number, after an epoch or a step: the graphs notice (a new one is captured), and the run ends
    with the eager run's weights, bit for bit (graphs of the old optimizer or loss went on replaying)."""
    class Change(nn.Callback):
        def on_epoch_end(self, trainer, logs):
            if hook == "on_epoch_end" and logs["epoch"] == 1:
                change(trainer)

        def on_batch_end(self, trainer, step, loss):
            if hook == "on_batch_end" and trainer.epoch == 0 and step == 4:
                change(trainer)

    x, y = datasets.synthetic(n=200, features=20, classes=4, seed=1)
    results = []
    for cuda_graphs in (False, True):
        model = nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.Dropout(0.2), nn.Dense(32, 4), seed=5,
                              device=emulated)
        trainer = nn.Trainer(model, optimizer=optimizer(), loss=loss if isinstance(loss, str) else loss(),
                             batch_size=32, seed=3, quiet=True, cuda_graphs=cuda_graphs)
        trainer.fit(x, y, epochs=2, callbacks=[Change()])
        results.append((model.backend.to_host(model.flat_params), trainer.optimizer.steps))
    assert replays[0] > 0
    (eager, eager_steps), (graphed, steps) = results
    assert steps == eager_steps  # a replacement counts its own
    numpy.testing.assert_array_equal(graphed, eager)


@pytest.mark.parametrize("whose", ["its own", "another trainer's"])
def test_a_train_step_a_callback_takes_in_a_graphed_fit_draws_its_own_dropout_mask(emulated, replays, whose):
    """A callback that takes an extra step (``train_step``, of this trainer or another one on the same model) in
    the middle of a graphed fit: its Dropout draws a mask of its own, as in an eager fit, and the runs end with
    the same weights (it drew with the graphs' device copy of the counter, set for the step before: that step's
    mask again)."""
    x, y = datasets.synthetic(n=200, features=20, classes=4, seed=1)
    weights = []
    for cuda_graphs in (False, True):
        model = nn.Sequential(nn.Dense(20, 32, activation="tanh"), nn.Dropout(0.3), nn.Dense(32, 4), seed=5,
                              device=emulated)
        trainer = nn.Trainer(model, optimizer=_sgd(), batch_size=32, seed=3, quiet=True, cuda_graphs=cuda_graphs)
        stepper = trainer if whose == "its own" else nn.Trainer(model, optimizer=nn.SGD(lr=0.01), quiet=True)
        extra = trainer.prepare(x[:16], y[:16])

        class ExtraStep(nn.Callback):
            def on_batch_end(self, trainer, step, loss):
                if step == 3:
                    stepper.train_step(*extra)

        trainer.fit(x, y, epochs=2, callbacks=[ExtraStep()])
        weights.append(model.backend.to_host(model.flat_params))
    assert replays[0] > 0
    numpy.testing.assert_array_equal(*weights)


class _Scale(nn.layers.Layer):
    """A layer of one's own, without a config: ``y = scale * x``."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, training=False):
        return x * self.scale

    def backward(self, dy, input_grad=True):
        return dy * self.scale if input_grad else None


def test_a_layer_of_one_s_own_without_a_config_trains_in_replayed_steps(emulated, replays):
    """The graphs' settings held every layer's config, which a layer of one's own need not have: a fit on CUDA
    failed at its first step with a bare NotImplementedError (it trains on the CPU). Its plain attributes stand
    for its options: one a callback changes gets a graph of its own, and the weights are the eager run's."""
    class Halve(nn.Callback):
        def on_batch_end(self, trainer, step, loss):
            if trainer.epoch == 0 and step == 3:
                trainer.model.layers[1].scale /= 2

    x, y = datasets.synthetic(n=200, features=20, classes=4, seed=1)
    weights = []
    for cuda_graphs in (False, True):
        model = nn.Sequential(nn.Dense(20, 16, activation="tanh"), _Scale(0.5), nn.Dense(16, 4), seed=5,
                              device=emulated)
        nn.Trainer(model, optimizer=_sgd(), batch_size=32, seed=3, quiet=True, cuda_graphs=cuda_graphs).fit(
            x, y, epochs=2, callbacks=[Halve()])
        weights.append(model.backend.to_host(model.flat_params))
    assert replays[0] == 2 * 7 - 3  # eager: the first full step, the first after the change, the first short one
    numpy.testing.assert_array_equal(*weights)


def test_a_convolution_with_a_softmax_trains_in_replayed_steps(emulated, replays, capsys):
    """A Conv2D's softmax (over its channels) takes the base backend's bias_act_to_nchw, which asked whether its
    rows are the output's memory with ``shares_memory``: CuPy computes that on the device and reads it on the
    host, which broke every capture (and synchronised every eager step). The bounds suffice, read on the host."""
    images = numpy.random.default_rng(0).random((96, 1, 6, 6)).astype(numpy.float32)
    y = numpy.arange(96) % 3
    weights = []
    for cuda_graphs in (False, True):
        model = nn.Sequential(nn.Conv2D(1, 3, 3, activation="softmax"), nn.Flatten(), nn.Dense(48, 3),
                              input_shape=(1, 6, 6), seed=5, device=emulated)
        _trainer(model, cuda_graphs, t_max=2, quiet=False).fit(images, y, epochs=2)
        weights.append(model.backend.to_host(model.flat_params))
    assert "CUDA graphs off" not in capsys.readouterr().err
    assert replays[0] == 2 * (3 - 1)  # each epoch (a new learning rate): its first step eager
    numpy.testing.assert_array_equal(*weights)
