"""The Python API's answers to mistakes, and the fixes behind them: a layer takes one place in one model,
EarlyStopping ends every run with its best weights, CSVLogger keeps its columns across fits, train_step
checks its batch, and bad arguments are ConfigErrors or ShapeErrors that name them."""

import csv
import json
import math
import pickle
import sys

import numpy
import pytest

import nnaccel as nn

X = numpy.random.default_rng(0).standard_normal((12, 4)).astype(numpy.float32)
Y = numpy.arange(12) % 3


def _trainer(**options):
    return nn.Trainer(nn.Sequential(nn.Dense(4, 3)), quiet=True, **options)


def _set_data(parameter, value):
    parameter.data = value


class TorchLikeSGD:
    """An optimizer of another library, shown over several lines as PyTorch's are."""

    def __repr__(self):
        return "SGD (\nParameter Group 0\n    lr: 0.1\n)"


# (case, call, error class, a phrase of the message)
API_ERRORS = [
    ("optimizer unknown option", lambda: _trainer(optimizer={"type": "sgd", "foo": 1}), nn.ConfigError,
     "optimizer 'sgd' takes no option 'foo'; its options: lr, momentum"),
    ("optimizer config without type", lambda: _trainer(optimizer={"lr": 1}), nn.ConfigError, "has no 'type'"),
    ("schedule missing option", lambda: nn.optimizers.schedule_from({"type": "StepLR"}), nn.ConfigError,
     "schedule StepLR needs the option 'step_size'"),
    ("schedule a name", lambda: _trainer(schedule="cosine"), nn.ConfigError,
     "schedule must be a schedule.*got 'cosine'"),
    ("schedule a class", lambda: _trainer(schedule=nn.StepLR), nn.ConfigError, "got the class StepLR"),
    ("optimizer a class", lambda: _trainer(optimizer=nn.Adam), nn.ConfigError,
     r"optimizer must be an nnaccel optimizer such as nn.SGD\(lr=0.1\), its name or its config dict, got the "
     r"class Adam \(call it to make one\)"),
    ("optimizer of another library", lambda: _trainer(optimizer=TorchLikeSGD()), nn.ConfigError,
     "optimizer must be an nnaccel optimizer .*got a TorchLikeSGD$"),
    ("loss a class", lambda: _trainer(loss=nn.MSE), nn.ConfigError,
     r"loss must be a loss object such as nn.SoftmaxCrossEntropy\(\) or its name, got the class MeanSquaredError "
     r"\(call it to make one\)"),
    ("fit a model without parameters", lambda: nn.Trainer(nn.Sequential(nn.Flatten(), input_shape=(4,)),
                                                          quiet=True).fit(X, Y), nn.ConfigError,
     r"the model has no parameters to train \(Flatten\(\)\): fit needs a layer with weights"),
    ("callback print", lambda: _trainer(callbacks=[print]), nn.ConfigError,
     r"Trainer callbacks\[0\] is a builtin_function_or_method, not an nnaccel Callback"),
    ("callback a class", lambda: _trainer(callbacks=[nn.EarlyStopping]), nn.ConfigError,
     r"callbacks\[0\] is the class EarlyStopping"),
    ("fit callbacks a class", lambda: _trainer().fit(X, Y, callbacks=nn.EarlyStopping), nn.ConfigError,
     "fit callbacks must be a list of callbacks, got the class EarlyStopping"),
    ("a callback twice", lambda: (lambda stop: _trainer(callbacks=[stop]).fit(X, Y, callbacks=[stop]))(
        nn.EarlyStopping(monitor="loss")), nn.ConfigError, r"the callback EarlyStopping is given twice \(to Trainer "
                                                           r"and to fit, or twice in a list\): its hooks would run "
                                                           r"twice each step and epoch"),
    ("Trainer of a string", lambda: nn.Trainer("model"), nn.ConfigError, "Sequential model, got a str"),
    ("fit y None", lambda: _trainer().fit(X, None), nn.ShapeError, "y must be an array.*got None"),
    ("fit epochs 0", lambda: _trainer().fit(X, Y, epochs=0), nn.ConfigError, "epochs must be a positive integer, got 0"),
    ("fit y 3", lambda: _trainer().fit(X, 3), nn.ShapeError, "y must be an array.*got 3"),
    ("evaluate y None", lambda: _trainer().evaluate(X, None), nn.ShapeError, "y must be an array.*got None"),
    ("validation_data (x,)", lambda: _trainer().fit(X, Y, validation_data=(X,)), nn.ConfigError,
     r"validation_data must be a pair \(x, y\), got a tuple of 1"),
    ("validation_data x", lambda: _trainer().fit(X, Y, validation_data=X), nn.ConfigError,
     r"validation_data must be a pair \(x, y\), got an array of shape \(12, 4\)"),
    ("ragged x", lambda: _trainer().fit([[1, 2, 3, 4], [1, 2]], [0, 1]), nn.ShapeError, "x is not an array of numbers"),
    ("predict ragged x", lambda: _trainer().model.predict([[1, 2, 3, 4], [1, 2]]), nn.ShapeError,
     "x is not an array of numbers"),
    ("train_val_split ragged x", lambda: nn.datasets.train_val_split([[1, 2], [3]], [0, 1]), nn.ShapeError,
     "x is not an array of numbers"),
    ("dtype foo", lambda: nn.Sequential(nn.Dense(4, 3), dtype="foo"), nn.ConfigError,
     "dtype must be float32 or float64, got 'foo'"),
    ("Parameter.data a list", lambda: _set_data(nn.Sequential(nn.Dense(2, 1)).parameters()[1], [0.5]),
     nn.ShapeError, r"parameter 0.bias takes an array of shape \(1,\), got a list"),
    ("LeakyReLU('x')", lambda: nn.LeakyReLU("x"), nn.ConfigError, "leaky_relu slope must be a finite number >= 0"),
    ("ELU(None)", lambda: nn.ELU(None), nn.ConfigError, "elu alpha must be a finite number > 0, got None"),
    ("activations.get slope 'x'", lambda: nn.activations.get("leaky_relu", slope="x"), nn.ConfigError,
     "leaky_relu slope"),
    ("EarlyStopping monitor None", lambda: nn.EarlyStopping(monitor=None), nn.ConfigError,
     "monitor must name a logged metric"),
    ("ModelCheckpoint monitor 3", lambda: nn.ModelCheckpoint("m.npz", monitor=3), nn.ConfigError, "monitor"),
    ("EarlyStopping of val_loss, no validation", lambda: _trainer().fit(X, Y, callbacks=[nn.EarlyStopping()]),
     nn.ConfigError, r"EarlyStopping monitors 'val_loss', but fit has no validation_data: give "
                     r"validation_data=\(x, y\), or monitor 'loss'"),
    ("best-only ModelCheckpoint of val_accuracy, no validation",
     lambda: _trainer(callbacks=[nn.ModelCheckpoint("m.npz", monitor="val_accuracy", save_best_only=True)]).fit(X, Y),
     nn.ConfigError, "ModelCheckpoint monitors 'val_accuracy', but fit has no validation_data"),
    *[(f"{cls.__name__}(model.parameters()){extra}", (lambda cls=cls, kw=kw: cls(_trainer().model.parameters(), **kw)),
       nn.ConfigError, rf"{cls.__name__} takes no parameters: the Trainer updates its model's; make it as "
                       rf"nn.{cls.__name__}\(lr=...\), not nn.{cls.__name__}\(model.parameters\(\), ...\)")
      for cls in (nn.SGD, nn.Adam, nn.AdamW) for extra, kw in (("", {}), (", lr=0.1", {"lr": 0.1}))],
    *[(f"Keras's {cls.__name__}(learning_rate=...)", (lambda cls=cls: cls(learning_rate=0.002)), nn.ConfigError,
       rf"{cls.__name__}'s learning rate is lr, as in PyTorch: nn.{cls.__name__}\(lr=0.002\), not Keras's "
       rf"learning_rate=") for cls in (nn.SGD, nn.Adam, nn.AdamW)],
    ("SGD(a generator of parameters)", lambda: nn.SGD(p for p in _trainer().model.parameters()), nn.ConfigError,
     "SGD takes no parameters"),
    ("loss Keras's sparse", lambda: _trainer(loss="sparse_categorical_crossentropy"), nn.ConfigError,
     r"use softmax_cross_entropy \(logits and class indices: Keras's sparse_categorical_crossentropy with "
     r"from_logits=True\)"),
    ("loss Keras's one-hot", lambda: _trainer(loss="categorical_crossentropy"), nn.ConfigError,
     "use softmax_cross_entropy .logits and class indices, not one-hot rows"),
    ("loss Keras's binary", lambda: _trainer(loss="binary_crossentropy"), nn.ConfigError,
     "the output layer is linear here: use sigmoid_cross_entropy"),
    ("PyTorch's nn.Linear(784, 10)", lambda: nn.Linear(784, 10), nn.ConfigError,
     r"nn.Linear is the identity activation and takes no arguments: PyTorch's nn.Linear\(784, 10\), a fully "
     r"connected layer, is nn.Dense\(784, 10\) here"),
    ("an activation as a layer", lambda: nn.Sequential(nn.Dense(784, 128), nn.ReLU(), nn.Dense(128, 10)),
     nn.ConfigError, r"layer 1 is the activation ReLU\(\), not a layer: it is the option of the layer before "
                     r"it, as nn.Dense\(784, 128, activation='relu'\) \(PyTorch's Linear then ReLU\)"),
    ("an activation first", lambda: nn.Sequential(nn.LeakyReLU(0.1), nn.Dense(4, 2)), nn.ConfigError,
     r"layer 0 is the activation LeakyReLU\(slope=0.1\), not a layer: it is the option of the layer before it, "
     r"as nn.Dense\(784, 128, activation=nn.LeakyReLU\(slope=0.1\)\)"),
    ("activation the class nn.ReLU", lambda: nn.Dense(4, 2, activation=nn.ReLU), nn.ConfigError,
     r"activation must be a name \(linear, relu, .*\) or an nnaccel activation such as nn.ReLU\(\), got the class "
     r"ReLU \(call it to make one\)"),
    ("activation 3", lambda: nn.Conv2D(1, 2, 3, activation=3), nn.ConfigError,
     r"activation must be a name \(linear, relu, .*\) or an nnaccel activation such as nn.ReLU\(\), got 3$"),
    ("model(a list)", lambda: nn.Sequential(nn.Dense(4, 3))(X.tolist()), nn.DeviceError,
     r"x is a list, not a numpy array: make it one with model.backend.asarray\(...\)"),
    ("loss a list", lambda: _trainer(loss=["mse"]), nn.ConfigError,
     r"unknown loss \['mse'\]; valid: softmax_cross_entropy, mse, sigmoid_cross_entropy, or PyTorch's"),
]


def test_pytorchs_activation_module_is_refused_as_pytorchs():
    """torch.nn.ReLU() given as an activation is named with its module: "unknown activation ReLU()" read as
    nnaccel's own ReLU()."""
    torch = pytest.importorskip("torch")
    for given, shown in ((torch.nn.ReLU(), "a torch.nn.modules.activation.ReLU object"),
                         (torch.nn.ReLU, "the class torch.nn.modules.activation.ReLU")):
        with pytest.raises(nn.ConfigError, match=rf"or an nnaccel activation such as nn.ReLU\(\), got {shown}$"):
            nn.Dense(4, 2, activation=given)


@pytest.mark.parametrize("name, loss", [("cross_entropy", nn.SoftmaxCrossEntropy), ("Mean_Squared_Error", nn.MSE),
                                        ("binary_cross_entropy_with_logits", nn.SigmoidCrossEntropy)])
def test_pytorchs_and_keras_names_for_a_loss_give_the_same_loss(name, loss):
    """F.cross_entropy and F.binary_cross_entropy_with_logits take logits, as Keras's mean_squared_error
    is mse: the same computations under their names (a checkpoint keeps nnaccel's)."""
    trainer = _trainer(loss=name)
    assert type(trainer.loss) is loss and trainer.loss.name == loss.name


@pytest.mark.parametrize("case, make, error, message", API_ERRORS, ids=[case for case, *_ in API_ERRORS])
def test_bad_api_arguments_raise_errors_naming_them(case, make, error, message):
    with pytest.raises(error, match=message) as raised:
        make()
    assert "\n" not in str(raised.value)


def test_a_schedule_of_ones_own_trains_and_a_checkpoint_of_it_is_refused_by_name(tmp_path):
    """Any object with lr_at is a schedule, but a checkpoint keeps StepLR and CosineAnnealing only: saving one
    failed with an AttributeError (after an epoch, under ModelCheckpoint), and a class with a config() of its
    own saved a file that load refused. Loading into a trainer with one puts the saved schedule in its place."""

    class Warmup:
        def lr_at(self, epoch, base_lr):
            return base_lr * min(1.0, (epoch + 1) / 3)

    trainer = _trainer(schedule=Warmup(), optimizer=nn.SGD(lr=0.3))
    assert trainer.fit(X, Y, epochs=3)["lr"] == pytest.approx([0.1, 0.2, 0.3])
    message = "a checkpoint holds the schedule nn.StepLR or nn.CosineAnnealing, not Warmup"
    with pytest.raises(nn.ConfigError, match=message):
        trainer.save_checkpoint(tmp_path / "ckpt.npz")
    with pytest.raises(nn.ConfigError, match=message):
        trainer.fit(X, Y, callbacks=[nn.ModelCheckpoint(tmp_path / "ckpt.npz")])
    assert trainer.epoch == 3 and not list(tmp_path.iterdir())

    class Named(Warmup):
        def config(self):
            return {"type": "Warmup"}

    with pytest.raises(nn.ConfigError, match="nn.CosineAnnealing, not Named"):
        _trainer(schedule=Named()).save_checkpoint(tmp_path / "ckpt.npz")
    _trainer(schedule=nn.StepLR(2)).save_checkpoint(tmp_path / "ckpt.npz")
    resumed = _trainer(schedule=Warmup()).load_checkpoint(tmp_path / "ckpt.npz")
    assert resumed.schedule.config() == nn.StepLR(2).config()


@pytest.mark.parametrize("kind", [numpy.float32, numpy.float64, numpy.int64])
def test_the_rates_of_a_schedule_of_ones_own_are_python_floats_in_the_history(kind):
    """A schedule that computes with NumPy gives NumPy scalars: the history held them (json.dumps failed on a
    float32 one, and a list of them printed as np.float32(0.1)); its rates are Python floats now."""

    class Decay:
        def lr_at(self, epoch, base_lr):
            return kind(base_lr * numpy.exp(-epoch) if kind is not numpy.int64 else epoch)

    history = _trainer(schedule=Decay(), optimizer=nn.SGD(lr=0.5)).fit(X, Y, epochs=2)
    assert [type(lr) for lr in history["lr"]] == [float, float]
    expected = [0.0, 1.0] if kind is numpy.int64 else [float(kind(0.5)), float(kind(0.5 * numpy.exp(-1)))]
    assert history["lr"] == expected
    json.dumps(history)


@pytest.mark.parametrize("rate", [math.nan, -0.1, "0.1", None])
def test_a_schedule_giving_no_learning_rate_is_refused_by_name(rate):
    """NaN, a negative rate or no number from lr_at was taken as the rate: NaN weights after the first step,
    or a TypeError deep in the update; refused now, naming the schedule and the epoch, before any step."""

    class Broken:
        def lr_at(self, epoch, base_lr):
            return rate

    trainer = _trainer(schedule=Broken())
    before = trainer.model.flat_params.copy()
    with pytest.raises(nn.ConfigError, match=r"^Broken\.lr_at\(0, 0\.01\), the learning rate of epoch 1, must be a "
                                             r"finite number >= 0, got "):
        trainer.fit(X, Y)
    numpy.testing.assert_array_equal(trainer.model.flat_params, before)


def test_a_loss_of_ones_own_trains_and_a_checkpoint_of_it_is_refused_by_name(tmp_path):
    """A subclass of a loss trains; its checkpoint was written with the subclass's name, which load refused
    (or, keeping its parent's name, resumed with the parent's loss)."""

    class HalfMSE(nn.MeanSquaredError):
        name = "half_mse"

        def _forward(self, ops, y, target):
            value = super()._forward(ops, y, target)
            self._grad *= 0.5
            return value * 0.5

    trainer = _trainer(loss=HalfMSE())
    trainer.fit(X, Y)
    for loss in (HalfMSE(), type("Smoothed", (nn.SoftmaxCrossEntropy,), {})()):
        trainer.loss = loss
        with pytest.raises(nn.ConfigError, match=f"a checkpoint holds the loss softmax_cross_entropy, mse, "
                                                 f"sigmoid_cross_entropy, not {type(loss).__name__}"):
            trainer.save_checkpoint(tmp_path / "ckpt.npz")
        with pytest.raises(nn.ConfigError, match=f"not {type(loss).__name__}"):
            trainer.fit(X, Y, callbacks=[nn.ModelCheckpoint(tmp_path / "ckpt.npz")])
    assert trainer.epoch == 1 and not list(tmp_path.iterdir())


def test_the_state_dict_of_an_optimizer_of_ones_own_holds_every_buffer_it_keeps():
    """As PyTorch's: a buffer that ``_update`` makes itself (no state_names) is in it (it was left out)."""

    class Summing(nn.optimizers.Optimizer):
        def _update(self, ops, params, grads, state):
            state.setdefault("grad_sum", ops.zeros(grads.shape, grads.dtype))
            state["grad_sum"] += grads
            params -= self.lr * grads

    optimizer = Summing(lr=0.1)
    _trainer(optimizer=optimizer).fit(X, Y)
    buffers = optimizer.state_dict()["buffers"]
    assert list(buffers) == ["grad_sum"]
    numpy.testing.assert_array_equal(buffers["grad_sum"], optimizer.state["grad_sum"])


def test_a_layer_or_activation_of_ones_own_trains_and_a_checkpoint_of_it_is_refused_by_name(tmp_path):
    """A subclass of Dense or ReLU trains; its checkpoint held the parent's name and loaded as the parent, which
    computes otherwise (here: half the output), and a layer of one's own without config() failed with
    NotImplementedError, after an epoch under ModelCheckpoint. Each is refused by name, no file written."""

    class HalfDense(nn.Dense):
        def forward(self, x, training=False):
            return super().forward(x, training) * 0.5

    class HalfReLU(nn.ReLU):
        def forward(self, ops, z, out):
            return super().forward(ops, z, out) * 0.5

    class Identity(nn.layers.Layer):
        def output_shape(self, shape):
            return shape

        def forward(self, x, training=False):
            return x

        def backward(self, dy, input_grad=True):
            return dy

    for layers, name, what in [((HalfDense(4, 3),), "HalfDense", "layer"),
                               ((nn.Dense(4, 3, activation=HalfReLU()),), "HalfReLU", "activation"),
                               ((nn.Dense(4, 3), Identity()), "Identity", "activation|layer")]:
        model = nn.Sequential(*layers)
        trainer = nn.Trainer(model, quiet=True)
        trainer.fit(X, Y)
        message = f"a checkpoint holds the ({what}) nn.*, not {name}: a run resumed from it could not rebuild that"
        for save in (model.save, trainer.save_checkpoint):
            with pytest.raises(nn.ConfigError, match=message):
                save(tmp_path / "ckpt.npz")
        with pytest.raises(nn.ConfigError, match=message):
            trainer.fit(X, Y, callbacks=[nn.ModelCheckpoint(tmp_path / "ckpt.npz", monitor="loss")])
        assert trainer.epoch == 1 and not list(tmp_path.iterdir())


def test_an_optimizer_of_ones_own_trains_and_a_checkpoint_of_it_is_refused_by_name(tmp_path):
    """A subclass of SGD or Adam, or of Optimizer, trains; a checkpoint of SGD's kept its parent's type and resumed
    as SGD, of Adam's was refused on load as an unknown optimizer, and of Optimizer's failed in config()."""

    class Halved(nn.SGD):
        def _update(self, ops, params, grads, state):
            super()._update(ops, params, grads * 0.5, state)

    class Plain(nn.optimizers.Optimizer):
        def _update(self, ops, params, grads, state):
            params -= self.lr * grads

    for optimizer in (Halved(lr=0.1), type("Warm", (nn.Adam,), {})(), Plain(lr=0.1)):
        trainer = _trainer(optimizer=optimizer)
        trainer.fit(X, Y)
        assert trainer.optimizer.config()["type"] == type(optimizer).__name__
        assert optimizer.state_dict()["config"]["type"] == type(optimizer).__name__  # as PyTorch's, for any
        message = f"a checkpoint holds the optimizer nn.SGD, nn.Adam or nn.AdamW, not {type(optimizer).__name__}"
        with pytest.raises(nn.ConfigError, match=message):
            trainer.save_checkpoint(tmp_path / "ckpt.npz")
        with pytest.raises(nn.ConfigError, match=message):
            trainer.fit(X, Y, callbacks=[nn.ModelCheckpoint(tmp_path / "ckpt.npz")])
        assert trainer.epoch == 1 and not list(tmp_path.iterdir())
    _trainer(optimizer=nn.SGD(lr=0.1)).save_checkpoint(tmp_path / "ckpt.npz")
    with pytest.raises(nn.CheckpointError, match="was trained with SGD, not Halved"):
        _trainer(optimizer=Halved(lr=0.1)).load_checkpoint(tmp_path / "ckpt.npz")


@pytest.mark.parametrize("make", [lambda: nn.Adam(lr=0.01), lambda: nn.SGD(lr=0.1, momentum=0.9)],
                         ids=["adam", "sgd"])
def test_an_optimizer_with_one_models_state_is_refused_for_another(make, tmp_path):
    """One optimizer given to a second model of the same size carried the first's momenta (and Adam's step
    count, so its bias correction) into it without a word; a PyTorch optimizer is tied to its parameters.
    The other model's fit refuses it before its first step, whether or not the first model still exists;
    the same model trains on; load_state_dict, and so load_checkpoint, carries a state over on purpose."""
    def model():
        return nn.Sequential(nn.Dense(4, 3), seed=1)

    first, optimizer = model(), make()
    waiting = nn.Trainer(model(), optimizer=optimizer, quiet=True)  # made before the first model steps
    nn.Trainer(first, optimizer=optimizer, batch_size=4, quiet=True).fit(X, Y)
    message = (f"this {type(optimizer).__name__} holds the state of another model's training \\(3 steps\\): use a "
               f"new optimizer per model")
    before = waiting.model.flat_params.copy()
    with pytest.raises(nn.ConfigError, match=message):
        waiting.fit(X, Y)
    numpy.testing.assert_array_equal(waiting.model.flat_params, before)
    assert waiting.epoch == 0 and optimizer.steps == 3
    with pytest.raises(nn.ConfigError, match=message):
        nn.Trainer(model(), optimizer=optimizer, quiet=True).train_step(X[:4], Y[:4])
    trainer = nn.Trainer(first, optimizer=optimizer, batch_size=4, quiet=True)  # its own model: on it goes
    trainer.fit(X, Y)
    trainer.save_checkpoint(tmp_path / "ck.npz")
    assert optimizer.steps == 6
    del first, trainer, waiting  # a model gone: its state is still not another's
    with pytest.raises(nn.ConfigError, match=message.replace("3", "6")):
        nn.Trainer(model(), optimizer=optimizer, quiet=True).fit(X, Y)
    carried = make()
    carried.load_state_dict(optimizer.state_dict())
    nn.Trainer(model(), optimizer=carried, batch_size=4, quiet=True).fit(X, Y)
    assert carried.steps == 9
    resumed = nn.Trainer(model(), optimizer=optimizer, batch_size=4, quiet=True)  # the checkpoint's state
    resumed.load_checkpoint(tmp_path / "ck.npz")
    resumed.fit(X, Y)
    assert optimizer.steps == 9
    pickle.loads(pickle.dumps(optimizer))  # as before it was tied to a model


def test_a_single_callback_counts_as_a_list_of_one():
    class Count(nn.Callback):
        epochs = 0

        def on_epoch_end(self, trainer, logs):
            self.epochs += 1

    given, passed = Count(), Count()
    trainer = _trainer(callbacks=given)
    trainer.fit(X, Y, epochs=2, callbacks=passed)
    assert trainer.callbacks == [given] and given.epochs == passed.epochs == 2


# ----- a layer takes one place in one model ------------------------------------------------------
def test_a_parameter_on_the_cpu_takes_any_array_of_host_memory():
    """Not only NumPy arrays: a memoryview (or h5py data, anything NumPy reads with a shape) is copied in."""
    bias = nn.Sequential(nn.Dense(2, 3)).parameters()[1]
    bias.data = memoryview(numpy.array([1.0, 2.0, 3.0], numpy.float32))
    numpy.testing.assert_array_equal(bias.data, [1.0, 2.0, 3.0])


def test_a_layer_in_a_living_model_is_refused_and_the_model_stays_as_it_was():
    base = nn.Dense(4, 8, activation="relu")
    first = nn.Sequential(base, nn.Dense(8, 3))
    before = first.predict(X)
    with pytest.raises(nn.ConfigError, match=r"layer 0 Dense\(4, 8, activation='relu'\) is already in another "
                                             r"model: .* make a new layer per place"):
        nn.Sequential(base, nn.Dense(8, 2))
    numpy.testing.assert_array_equal(first.predict(X), before)
    weight = base.params["weight"].data.copy()
    nn.Trainer(first, optimizer=nn.SGD(lr=0.5), quiet=True).fit(X, Y, epochs=1)
    assert not numpy.array_equal(base.params["weight"].data, weight)  # its layer 0 still trains


def test_a_layer_twice_in_one_model_is_refused():
    dense = nn.Dense(4, 4)
    with pytest.raises(nn.ConfigError, match=r"layer 1 Dense\(4, 4\) is already in this model"):
        nn.Sequential(dense, dense, nn.Dense(4, 2))


def test_a_layer_of_a_model_gone_joins_a_new_one():
    layers = [nn.Dense(4, 6, activation="tanh"), nn.Dense(6, 5)]
    width = nn.Sequential(*layers).out_features  # the model is gone once this line ends
    model = nn.Sequential(*layers, nn.Dense(width, 3))
    assert all(layer._model() is model for layer in model.layers)


def test_a_layer_of_a_model_only_a_trainer_cycle_kept_joins_a_new_one():
    """A Trainer and its step unit refer to each other: their model is gone once nothing else holds it."""
    layers = [nn.Dense(4, 3)]
    trainer = nn.Trainer(nn.Sequential(*layers), quiet=True)
    trainer.train_step(*trainer.prepare(X, Y))
    del trainer
    assert nn.Sequential(*layers).layers == layers


def test_moving_a_model_rebinds_its_own_layers(device):
    model = nn.Sequential(nn.Dense(4, 6, activation="relu"), nn.Dense(6, 3), seed=2)
    expected = model.predict(X)
    model.to(device)
    numpy.testing.assert_allclose(model.predict(X), expected, rtol=1e-6, atol=1e-6)
    nn.Trainer(model, quiet=True).fit(X, Y, epochs=1)
    model.to("cpu")
    assert model.layers[0].params["weight"].data.base is model.flat_params  # views of the model's own buffer


# ----- EarlyStopping keeps the best epoch's weights ----------------------------------------------
class _Weights(nn.Callback):
    """Each epoch's weights, after its update."""

    def __init__(self):
        self.epochs = {}

    def on_epoch_end(self, trainer, logs):
        self.epochs[logs["epoch"]] = trainer.model.flat_params.copy()


def test_early_stopping_restores_the_best_epoch_of_a_run_that_does_not_stop():
    """mode="max" on the training loss makes an early epoch the best; patience 10 never stops 4 epochs."""
    model = nn.Sequential(nn.Dense(4, 3))
    weights, stop = _Weights(), nn.EarlyStopping(monitor="loss", mode="max", patience=10)
    history = nn.Trainer(model, optimizer=nn.SGD(lr=0.2), quiet=True).fit(X, Y, epochs=4, callbacks=[weights, stop])
    best = int(numpy.argmax(history["loss"])) + 1
    assert best < 4 and stop.best_epoch == best and len(history["loss"]) == 4
    numpy.testing.assert_array_equal(model.flat_params, weights.epochs[best])


def test_early_stopping_says_when_it_stops_and_whose_weights_the_model_ends_with(capsys):
    """As Keras's verbose EarlyStopping does: the epoch it stopped after and why, then the best epoch whose
    weights it put back (quiet: nothing)."""
    for quiet in (False, True):
        model, weights = nn.Sequential(nn.Dense(4, 3)), _Weights()
        stop = nn.EarlyStopping(monitor="loss", mode="max", patience=1)
        history = nn.Trainer(model, optimizer=nn.SGD(lr=0.2), quiet=quiet).fit(X, Y, epochs=5,
                                                                               callbacks=[weights, stop])
        assert history["loss"][1] < history["loss"][0] and len(history["loss"]) == 2
        numpy.testing.assert_array_equal(model.flat_params, weights.epochs[1])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("early stopping")]
        assert lines == [] if quiet else lines == [
            "early stopping after epoch 2: loss has not improved for 1 epoch since epoch 1 (patience 1)",
            "early stopping: the model has the weights of epoch 1, the best loss"]


def test_early_stopping_keeps_the_last_weights_when_they_are_the_best_or_restoring_is_off():
    for stop in (nn.EarlyStopping(monitor="loss", mode="min", patience=10),
                 nn.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=False)):
        model, weights = nn.Sequential(nn.Dense(4, 3)), _Weights()
        nn.Trainer(model, optimizer=nn.SGD(lr=0.2), quiet=True).fit(X, Y, epochs=3, callbacks=[weights, stop])
        numpy.testing.assert_array_equal(model.flat_params, weights.epochs[3])


def test_early_stopping_does_not_restore_after_an_error():
    class Fail(nn.Callback):
        def on_epoch_end(self, trainer, logs):
            if logs["epoch"] == 3:
                raise RuntimeError("a callback failed")

    model, weights = nn.Sequential(nn.Dense(4, 3)), _Weights()
    stop = nn.EarlyStopping(monitor="loss", mode="max", patience=10)
    with pytest.raises(RuntimeError):
        nn.Trainer(model, optimizer=nn.SGD(lr=0.2), quiet=True).fit(X, Y, epochs=4, callbacks=[weights, stop, Fail()])
    assert stop.best_epoch < 3
    numpy.testing.assert_array_equal(model.flat_params, weights.epochs[3])


@pytest.mark.parametrize("make, validating", [
    (lambda path: nn.EarlyStopping(monitor="val_los"), True),
    (lambda path: nn.EarlyStopping(monitor="acc"), False),
    (lambda path: nn.ModelCheckpoint(path, monitor="val_acc", save_best_only=True), True)],
    ids=["EarlyStopping val_los", "EarlyStopping acc", "ModelCheckpoint val_acc"])
def test_a_misspelt_monitor_is_refused_before_training_and_the_run_loses_nothing(tmp_path, make, validating):
    """A monitor the epochs do not log was refused only when the first epoch ended, after it had trained; now
    fit refuses it before any step, naming the callback, the monitor and every metric the fit's epochs log
    (those of its history), and leaves the run as it was: weights, optimizer state, epoch, history, no file."""
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3)), optimizer=nn.SGD(lr=0.2, momentum=0.9), quiet=True)
    validation = (X, Y) if validating else None
    trainer.fit(X, Y, validation_data=validation)
    logged = list(trainer.history)
    params, state = trainer.model.flat_params.copy(), trainer.optimizer.state_dict()
    callback = make(tmp_path / "best.npz")
    message = (rf"{type(callback).__name__} monitors {callback.monitor!r}, which this fit does not log: its epochs "
               rf"log {', '.join(logged)}" + ("$" if validating else r" \(and val_loss, val_accuracy with "
                                                                   r"validation_data\)$"))
    with pytest.raises(nn.ConfigError, match=message):
        trainer.fit(X, Y, validation_data=validation, callbacks=[nn.CSVLogger(tmp_path / "log.csv"), callback])
    assert trainer.epoch == 1 and list(trainer.history) == logged and len(trainer.history["loss"]) == 1
    numpy.testing.assert_array_equal(trainer.model.flat_params, params)
    after = trainer.optimizer.state_dict()
    assert after["steps"] == state["steps"] and list(after["buffers"]) == ["velocity"]
    numpy.testing.assert_array_equal(after["buffers"]["velocity"], state["buffers"]["velocity"])
    assert not list(tmp_path.iterdir())


def test_a_callback_of_ones_own_may_add_the_metric_a_later_one_monitors():
    """As in Keras, a callback's on_epoch_end may add a metric to the logs, which the callbacks after it see:
    a monitor of it is not refused there before training, only before that callback."""
    class Doubled(nn.Callback):
        def on_epoch_end(self, trainer, logs):
            logs["doubled_loss"] = 2 * logs["loss"]

    stop = nn.EarlyStopping(monitor="doubled_loss", patience=10)
    _trainer().fit(X, Y, epochs=2, callbacks=[Doubled(), stop])
    assert stop.best_epoch is not None
    trainer = _trainer()
    with pytest.raises(nn.ConfigError, match="EarlyStopping monitors 'doubled_loss', which this fit does not log"):
        trainer.fit(X, Y, callbacks=[nn.EarlyStopping(monitor="doubled_loss"), Doubled()])
    assert trainer.epoch == 0


# ----- CSVLogger keeps its columns across fits -----------------------------------------------------
def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_csv_log_appended_by_fits_with_other_metrics_stays_aligned(tmp_path):
    path = tmp_path / "log.csv"
    trainer = _trainer()
    log = nn.CSVLogger(path, append=True)
    trainer.fit(X, Y, callbacks=[log])
    plain = _rows(path)[0]
    trainer.fit(X, Y, validation_data=(X, Y), callbacks=[log])  # widens the header
    trainer.fit(X, Y, callbacks=[log])  # keeps it
    header, *rows = _rows(path)
    assert header[:len(plain)] == plain and {"val_loss", "val_accuracy"} <= set(header)
    assert [len(row) for row in rows] == [len(header)] * 3
    table = [dict(zip(header, row)) for row in rows]
    assert [row["epoch"] for row in table] == ["1", "2", "3"]
    assert [row["val_loss"] != "" for row in table] == [False, True, False]
    assert float(table[1]["val_loss"]) == pytest.approx(trainer.history["val_loss"][1])  # epoch 2's, as the row
    assert not list(tmp_path.glob(".log.csv.*"))  # the rewrite left no temporary file


def test_csv_log_started_with_validation_leaves_the_missing_cells_empty(tmp_path):
    path = tmp_path / "log.csv"
    trainer = _trainer()
    trainer.fit(X, Y, validation_data=(X, Y), callbacks=[nn.CSVLogger(path)])
    trainer.fit(X, Y, callbacks=[nn.CSVLogger(path, append=True)])
    header, first, second = _rows(path)
    assert len(first) == len(second) == len(header)
    assert second[header.index("val_loss")] == "" and second[header.index("epoch")] == "2"


def test_a_fresh_csv_log_replaces_the_old_one_only_when_its_first_epoch_ends(tmp_path):
    """Without append the file there is replaced, as Keras's is, but only by a fit that logs an epoch: one
    stopped before its first step (or failing before its first epoch ends) keeps the old log."""
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n1,0.5\n")
    trainer = _trainer()
    trainer.request_stop()
    trainer.fit(X, Y, callbacks=[nn.CSVLogger(path)])
    assert trainer.epoch == 0 and path.read_text() == "epoch,loss\n1,0.5\n"
    trainer.fit(X, Y, epochs=2, callbacks=[nn.CSVLogger(path)])
    header, *rows = _rows(path)
    assert header[:2] == ["epoch", "loss"] and [row[0] for row in rows] == ["1", "2"]


def test_a_csv_log_whose_last_line_has_no_end_gets_its_own_row(tmp_path):
    """A log saved by an editor without its final newline: the appended row starts a line of its own."""
    path = tmp_path / "log.csv"
    trainer = _trainer()
    trainer.fit(X, Y, callbacks=[nn.CSVLogger(path)])
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))
    trainer.fit(X, Y, callbacks=[nn.CSVLogger(path, append=True)])
    header, *rows = _rows(path)
    assert [row[0] for row in rows] == ["1", "2"] and [len(row) for row in rows] == [len(header)] * 2


@pytest.mark.parametrize("start", [b"\xef\xbb\xbf", b"\r\n\r\n"], ids=["byte-order mark", "blank lines"])
def test_a_csv_log_saved_by_a_spreadsheet_keeps_its_columns(tmp_path, start):
    """A log saved as "UTF-8 with BOM" (Excel's CSV UTF-8): its first column was named '\\ufeffepoch', so a
    second 'epoch' column was added and the rows misaligned; blank lines before the header got the header
    written again below them."""
    path = tmp_path / "log.csv"
    trainer = _trainer()
    trainer.fit(X, Y, callbacks=[nn.CSVLogger(path)])
    path.write_bytes(start + path.read_bytes())
    trainer.fit(X, Y, callbacks=[nn.CSVLogger(path, append=True)])
    header, *rows = [row for row in _rows(path) if row]  # the blank lines stay where they were
    assert header[0].lstrip("\ufeff") == "epoch" and "epoch" not in header[1:]
    assert [row[0] for row in rows] == ["1", "2"] and [len(row) for row in rows] == [len(header)] * 2


@pytest.mark.parametrize("content, error", [("epoch,loss\n1,0.5\n".encode("utf-16"), "UnicodeDecodeError"),
                                            (b"epoch,loss\n1," + b"9" * 200_000 + b"\n", "field larger than")],
                         ids=["utf-16", "a huge field"])
def test_a_csv_log_it_cannot_append_to_is_refused_before_the_first_epoch_and_kept(tmp_path, content, error):
    path = tmp_path / "log.csv"
    path.write_bytes(content)
    trainer = _trainer()
    with pytest.raises(nn.OutputError, match=rf"the CSV log {path} is not a UTF-8 CSV file to append to "
                                             rf"\(.*{error}.*\); give another file or remove it"):
        trainer.fit(X, Y, callbacks=[nn.CSVLogger(path, append=True)])
    assert trainer.epoch == 0 and path.read_bytes() == content


# ----- train_step checks its batch ---------------------------------------------------------------------
TRAIN_STEP_ERRORS = [
    ("label 3 of 3 outputs", lambda: (X, numpy.full(12, 3)), r"y ranges from 3 to 3 .* labels must be in \[0, 2\]"),
    ("label -1", lambda: (X, Y - 1), r"y ranges from -1 to 1"),
    ("uint64 label 2**63", lambda: (X, numpy.full(12, 2 ** 63, numpy.uint64)),
     r"y ranges from 9223372036854775808 to 9223372036854775808 "),
    ("5 features", lambda: (numpy.ones((12, 5), numpy.float32), Y), r"x has shape \(12, 5\) but the first layer "
                                                                      r"expects \(batch, 4\)"),
    ("float labels", lambda: (X, Y.astype(numpy.float32)),
     r"^y has dtype float32; expected integer class indices \(whole numbers\? pass y.astype\(int\)\)$"),
    ("fractional labels", lambda: (X, Y + 0.5), r"^y has dtype float64; expected integer class indices$"),
    ("one-hot labels", lambda: (X, numpy.eye(3, dtype=numpy.float32)[Y]),
     r"^y has shape \(12, 3\); expected a 1-D array of class indices \(one-hot rows\? pass y.argmax\(axis=1\)\)$"),
    ("a column of labels", lambda: (X, Y[:, None]), r"^y has shape \(12, 1\); expected a 1-D array of class indices$"),
    ("lists", lambda: (X.tolist(), Y.tolist()), "train_step takes a batch of device arrays.*got x as a list"),
    ("float64 x", lambda: (X.astype(numpy.float64), Y), "x has dtype float64 but the model computes in float32"),
    ("11 labels", lambda: (X, Y[:11]), r"y has shape \(11,\) but x has 12 samples"),
    ("empty batch", lambda: (X[:0], Y[:0]), r"^train_step got an empty batch: x has shape \(0, 4\); a step needs at "
                                           r"least one sample$"),
]


@pytest.mark.parametrize("case, batch, message", TRAIN_STEP_ERRORS, ids=[case for case, *_ in TRAIN_STEP_ERRORS])
def test_train_step_refuses_a_bad_batch_before_any_update(case, batch, message):
    trainer = _trainer()
    trainer.train_step(*trainer.prepare(X, Y))  # a good batch first: the next one is checked all the same
    before = trainer.model.flat_params.copy()
    with pytest.raises(nn.ShapeError, match=message):
        trainer.train_step(*batch())
    numpy.testing.assert_array_equal(trainer.model.flat_params, before)


def test_train_step_on_a_checked_batch_trains_as_fit_does():
    """Steps on one prepared batch (checked once, then trusted) follow fit's trajectory on it."""
    stepped, fitted = _trainer(batch_size=12), _trainer(batch_size=12)
    x, y = stepped.prepare(X, Y)
    for _ in range(3):
        stepped.train_step(x, y)
    fitted.fit(X, Y, epochs=3, shuffle=False)
    numpy.testing.assert_allclose(stepped.model.flat_params, fitted.model.flat_params, rtol=1e-6, atol=1e-7)


def test_train_step_trains_in_training_mode_and_gives_the_mode_back():
    """A step drops and learns BatchNorm statistics as fit does, though the model is in eval mode (as a
    new model is, and fit leaves it): the same trajectory and running statistics; the mode stays eval."""
    def trainer():
        model = nn.Sequential(nn.Dense(4, 6), nn.BatchNorm(6, activation="relu"), nn.Dropout(0.5), nn.Dense(6, 3),
                              seed=2)
        return nn.Trainer(model, optimizer=nn.SGD(lr=0.1), batch_size=12, quiet=True)

    stepped, fitted = trainer(), trainer()
    x, y = stepped.prepare(X * 3 + 2, Y)
    assert not stepped.model.training
    for _ in range(3):
        stepped.train_step(x, y)
    assert not stepped.model.training
    fitted.fit(X * 3 + 2, Y, epochs=3, shuffle=False)
    numpy.testing.assert_allclose(stepped.model.flat_params, fitted.model.flat_params, rtol=1e-6, atol=1e-7)
    numpy.testing.assert_allclose(stepped.model.flat_buffers, fitted.model.flat_buffers, rtol=1e-6, atol=1e-7)
    assert numpy.abs(stepped.model.flat_buffers).max() > 0.1  # the running statistics moved


@pytest.mark.parametrize("loss, dtype", [(None, numpy.int32), ("mse", numpy.int64)], ids=["int32-labels", "mse"])
def test_train_step_on_a_batch_refilled_in_place_reads_its_new_labels(loss, dtype):
    """Labels that the loss converts (int32 to int64, integers to one-hot) are converted every call: a batch
    buffer refilled in place trains on its new contents, as fresh arrays do; a bad refill is still refused."""
    rng = numpy.random.default_rng(3)
    batches = [(rng.random((12, 4), dtype=numpy.float32), rng.integers(0, 3, 12).astype(dtype)) for _ in range(4)]
    refilled, fresh = (nn.Trainer(nn.Sequential(nn.Dense(4, 3)), loss=loss, quiet=True) for _ in range(2))
    xb, yb = numpy.empty((12, 4), numpy.float32), numpy.empty(12, dtype)
    for x, y in batches:
        xb[...], yb[...] = x, y
        refilled.train_step(xb, yb)
        fresh.train_step(x.copy(), y.copy())
    numpy.testing.assert_array_equal(refilled.model.flat_params, fresh.model.flat_params)
    yb[0] = 3
    with pytest.raises(nn.ShapeError, match=r"y ranges from 0 to 3|labels range from"):
        refilled.train_step(xb, yb)


def test_train_step_takes_integer_labels_for_mse_as_one_hot():
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3)), loss="mse", quiet=True)
    loss, _ = trainer.train_step(X, Y)
    expected = numpy.mean((nn.Sequential(nn.Dense(4, 3)).predict(X) - numpy.eye(3)[Y]) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_binary_cross_entropy_takes_integer_labels_as_one_hot_rows():
    """One-vs-rest: labels train, and evaluate, as their one-hot rows do, bit for bit."""
    histories, scores = [], []
    for targets in (Y, numpy.eye(3, dtype=numpy.float32)[Y]):
        trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3)), loss="sigmoid_cross_entropy", batch_size=4, quiet=True)
        histories.append(trainer.fit(X, targets, epochs=2))
        scores.append(trainer.evaluate(X, targets))
    for key in ("loss", "accuracy"):
        assert histories[0][key] == histories[1][key]
    assert scores[0] == scores[1]


def test_calling_a_model_is_its_forward_in_its_mode(device):
    """model(x), as PyTorch and Keras users call a model: forward's output and checks, Dropout on in
    training mode only."""
    model = nn.Sequential(nn.Dense(4, 8, activation="relu"), nn.Dropout(0.5), nn.Dense(8, 3), device=device)
    x = model.backend.asarray(X)
    assert numpy.array_equal(model.backend.to_host(model.eval()(x)), model.predict(X))
    trained = model.backend.to_host(model.train()(x))
    assert trained.shape == (12, 3) and not numpy.allclose(trained, model.predict(X))
    with pytest.raises(nn.ShapeError, match=r"x has shape \(12, 3\) but the first layer expects \(batch, 4\)"):
        model(x[:, :3])


def test_a_model_is_its_layers_in_order_as_pytorchs_sequential():
    """len(model), model[i] (from the end too) and iteration, as on torch.nn.Sequential; a slice is a list
    of this model's layers, not a new model (a layer takes one place in one model)."""
    first, dropout, last = nn.Dense(4, 8, activation="relu"), nn.Dropout(0.5), nn.Dense(8, 3)
    model = nn.Sequential(first, dropout, last)
    assert len(model) == 3 and model[0] is first and model[-1] is last and list(model) == [first, dropout, last]
    assert model[1:] == [dropout, last]
    assert model[0].params["weight"].shape == (4, 8)
    with pytest.raises(IndexError):
        model[3]


def test_a_layer_shows_the_call_that_builds_it_with_its_activations_options():
    """An activation with options other than its defaults shows as the object (the name alone would rebuild
    the defaults); one with its defaults, by its name."""
    shown = [nn.Dense(4, 2, activation=nn.LeakyReLU(0.2)), nn.Conv2D(1, 2, 3, activation=nn.ELU(alpha=0.5)),
             nn.BatchNorm(3, activation=nn.LeakyReLU()), nn.Dense(4, 2, activation="relu"), nn.Dense(4, 2)]
    assert list(map(repr, shown)) == ["Dense(4, 2, activation=LeakyReLU(slope=0.2))",
                                      "Conv2D(1, 2, 3, activation=ELU(alpha=0.5))",
                                      "BatchNorm(3, activation='leaky_relu')", "Dense(4, 2, activation='relu')",
                                      "Dense(4, 2)"]
    rebuilt = eval(repr(shown[0]), vars(nn))
    assert rebuilt.activation == shown[0].activation


def test_an_empty_batch_gives_an_empty_output_and_no_loss(device):
    """forward of no samples is (0, outputs), as predict's, whatever the layers (convolution, pooling,
    BatchNorm, Flatten, Maxout), in both modes; the loss of no samples is an error naming the empty batch."""
    model = nn.Sequential(nn.RandomShift(1), nn.Conv2D(1, 4, 3, padding=1, activation="gelu"), nn.BatchNorm(4),
                          nn.MaxPool2D(2), nn.Flatten(), nn.Dense(4 * 4 * 4, 16), nn.Dropout(0.5),
                          nn.Maxout(16, 8, pieces=2), nn.Dense(8, 10), input_shape=(1, 8, 8), device=device)
    ops = model.backend
    for training in (False, True):
        y = model.train(training).forward(ops.asarray(numpy.zeros((0, 1, 8, 8), numpy.float32)))
        assert y.shape == (0, 10) and y.dtype == numpy.float32
    assert model.predict(numpy.zeros((0, 64), numpy.float32)).shape == (0, 10)
    with pytest.raises(nn.ShapeError, match="y has no rows: an empty batch has no mean loss"):
        nn.SoftmaxCrossEntropy().forward(y, ops.asarray(numpy.zeros(0, numpy.int64)))


def test_validation_labels_are_named_validation_y_in_errors():
    """A validation set whose labels disagree with its inputs names them as the user passed them."""
    x, y = numpy.zeros((20, 8), numpy.float32), numpy.zeros(20, numpy.int64)
    trainer = nn.Trainer(nn.Sequential(nn.Dense(8, 2)), quiet=True)
    with pytest.raises(nn.NnaccelError, match=r"validation y has 5 .*validation x has 20") as error:
        trainer.fit(x, y, validation_data=(x, y[:5]))
    assert "x labels" not in str(error.value)
    with pytest.raises(nn.NnaccelError, match=r"validation y") as error:
        trainer.fit(x, y, validation_data=(x, numpy.full(20, 7)))
    assert "x labels" not in str(error.value)


@pytest.mark.parametrize("loss", [None, "mse"], ids=["cross-entropy", "mse"])
@pytest.mark.parametrize("dtype", [numpy.int8, numpy.int16, numpy.int32, numpy.int64, numpy.uint8, numpy.uint16,
                                   numpy.uint32, numpy.uint64], ids=lambda dtype: numpy.dtype(dtype).name)
def test_labels_out_of_range_are_reported_with_their_own_values(device, dtype, loss):
    """The label-range error of prepare, fit and evaluate names the labels as given, each integer dtype's
    extremes included: uint64 labels of 2**63 and more were named wrapped to negative by the conversion to
    the int64 that the loss indexes with."""
    info = numpy.iinfo(dtype)
    y = numpy.zeros(12, dtype)
    y[[3, 7]] = info.min, info.max
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 3), device=device), loss=loss, quiet=True)
    for call in (trainer.prepare, trainer.fit, trainer.evaluate):
        with pytest.raises(nn.ShapeError, match=rf"^y ranges from {info.min} to {info.max} but the output layer has "
                                                rf"3 units: labels must be in \[0, 2\]$"):
            call(X, y)


def test_binary_labels_for_one_softmax_output_are_told_of_the_sigmoid():
    """Softmax cross-entropy over one output is 0 whatever the logit: 0/1 labels are refused saying what
    trains a binary classifier (sigmoid_cross_entropy or 2 units). Before, "the output layer has 1 units"."""
    trainer = nn.Trainer(nn.Sequential(nn.Dense(4, 1)), quiet=True)
    with pytest.raises(nn.ShapeError, match=r"^y ranges from 0 to 1 but the output layer has 1 unit: labels must be "
                                            r"in \[0, 0\] \(one output is a binary classifier: train it with "
                                            r"loss='sigmoid_cross_entropy', or give the output layer 2 units\)$"):
        trainer.fit(X, Y % 2)
    with pytest.raises(nn.ShapeError, match=r"^y ranges from 0 to 2 but the output layer has 1 unit: labels must be "
                                            r"in \[0, 0\]$"):
        trainer.fit(X, Y)
    nn.Trainer(nn.Sequential(nn.Dense(4, 1)), loss="sigmoid_cross_entropy", quiet=True).fit(X, Y % 2)


def test_fit_runs_with_stderr_closed(monkeypatch):
    """sys.stderr is None in a process started with it closed (2>&-, pythonw): fit's progress bar asked it
    isatty() and failed with AttributeError; now it shows no bar."""
    monkeypatch.setattr(sys, "stderr", None)
    history = nn.Trainer(nn.Sequential(nn.Dense(4, 3)), quiet=False).fit(X, Y, epochs=2)
    assert history["epoch"] == [1, 2]
