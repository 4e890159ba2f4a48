"""Optimizers (SGD, Adam, AdamW) over the model's flat buffers, and LR schedules.

Each step is one backend op over every parameter at once: the update rules
are PyTorch's, so the same hyper-parameters give the same trajectory.
"""

import inspect
import math

import numpy

from .backend import array_device
from .errors import ConfigError, check_flag, check_int, check_number, check_saveable, described, range_problem


class Optimizer:
    """Base class: state buffers shaped like ``model.flat_params``, on its device."""

    name = ""
    state_names = ()
    idle_state_names = ()  # buffers it keeps, unused, under its settings (a checkpoint may hold them)
    per_step_scalars = False  # a number of the update changes every step: a CUDA graph cannot bake it in

    def __new__(cls, *args, **kwargs):
        """Refuse PyTorch's ``SGD(model.parameters(), lr=...)`` by name: here the Trainer hands its model
        to the optimizer, as Keras's optimizers are made; and Keras's ``learning_rate=``, PyTorch's ``lr``."""
        if args and (isinstance(args[0], (list, tuple, dict)) or inspect.isgenerator(args[0])):
            raise ConfigError(f"{cls.__name__} takes no parameters: the Trainer updates its model's; make it "
                              f"as nn.{cls.__name__}(lr=...), not nn.{cls.__name__}(model.parameters(), ...)")
        if "learning_rate" in kwargs:
            raise ConfigError(f"{cls.__name__}'s learning rate is lr, as in PyTorch: nn.{cls.__name__}(lr="
                              f"{kwargs['learning_rate']!r}), not Keras's learning_rate=")
        return super().__new__(cls)

    def __init__(self, lr, weight_decay=0.0):
        self.lr = self.base_lr = check_number(lr, "learning rate")
        self.weight_decay = check_number(weight_decay, "weight_decay", allow_zero=True)
        self.steps = 0
        self.state = {}
        self._model_number = None  # the number of the model the state belongs to (Sequential._number)

    def _bind(self, model):
        """Tie the state to ``model``, as a PyTorch optimizer is tied to its parameters: state buffers that
        hold another model's momenta or moments are refused, not carried over to this one (whether or not
        that model still exists). ``load_state_dict`` gives a state no model yet."""
        owner = getattr(self, "_model_number", None)
        if owner is not None and owner != model._number and self.state:
            raise ConfigError(f"this {type(self).__name__} holds the state of another model's training "
                              f"({self.steps} step{'s' * (self.steps != 1)}): use a new optimizer per model (to "
                              f"carry a state over on purpose, give it to the new one with load_state_dict)")
        self._model_number = model._number

    def _state_for(self, model):
        """State buffers on the model's device (allocated or moved on first use)."""
        self._bind(model)
        ops = model.backend
        for name in self.state_names:
            buf = self.state.get(name)
            if buf is None:
                self.state[name] = ops.zeros(model.flat_params.shape, model.dtype)
            elif buf.shape != model.flat_params.shape:
                raise ConfigError(f"optimizer state {name} has {buf.size} values but the model has "
                                  f"{model.flat_params.size} parameters: use a new optimizer per model")
            elif array_device(buf) != ops.name or buf.dtype != model.dtype:
                self.state[name] = ops.asarray(_to_host(buf), dtype=model.dtype)
        return self.state

    def step(self, model):
        """Update every parameter of ``model`` from its gradients."""
        ops = model.backend
        with ops.activate(), ops.flushing_subnormals():
            state = self._state_for(model)  # (refused for another model's state before the count moves)
            self.steps += 1
            self._update(ops, model.flat_params, model.flat_grads, state)

    def _update(self, ops, params, grads, state):
        raise NotImplementedError

    def config(self):
        """The settings, named by the class (a subclass adds its own)."""
        return {"type": type(self).__name__, "lr": self.base_lr, "weight_decay": self.weight_decay}

    def state_dict(self):
        """Host copies of the state (every buffer, as PyTorch's), the step count and the settings, for
        checkpoints."""
        return {"config": self.config(), "steps": self.steps, "lr": self.lr,
                "buffers": {name: _to_host(buf) for name, buf in self.state.items()}}

    def load_state_dict(self, state):
        """Take the saved settings (as PyTorch's ``load_state_dict`` takes its param groups), step count,
        current rate and buffers."""
        self.__init__(**{name: value for name, value in state["config"].items() if name != "type"})
        self.steps = int(state["steps"])
        self.lr = float(state["lr"])
        self.state = {name: numpy.array(buf) for name, buf in state["buffers"].items()}


def _to_host(array):
    return array.get() if hasattr(array, "get") else numpy.array(array)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov and L2 weight decay."""

    name = "sgd"

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        self.momentum = check_number(momentum, "momentum", allow_zero=True)
        self.nesterov = check_flag(nesterov, "nesterov")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("Nesterov momentum needs momentum > 0")

    @property
    def state_names(self):
        """The velocity while there is momentum: one turned on after plain steps (a warm-up) starts it then,
        as PyTorch makes its buffer at the first step with momentum."""
        return ("velocity",) if self.momentum else ()

    @property
    def idle_state_names(self):
        """The velocity of steps with momentum, kept while the momentum is 0 for when it is on again, as
        PyTorch keeps its momentum_buffer (in its state_dict too)."""
        return () if self.momentum else ("velocity",)

    def _update(self, ops, params, grads, state):
        velocity = state["velocity"] if self.momentum else None  # an idle one may still be on the host (loaded)
        ops.sgd_update(params, grads, velocity, self.lr, self.momentum, self.weight_decay, self.nesterov)

    def config(self):
        return {"type": type(self).__name__, "lr": self.base_lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam (Kingma and Ba) with PyTorch's bias correction; weight decay is L2."""

    name = "adam"
    state_names = ("m", "v")
    decoupled = False
    per_step_scalars = True  # the bias correction of step t

    def __init__(self, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        try:
            self.betas = tuple(betas)
        except TypeError:  # None
            self.betas = ()
        if len(self.betas) != 2 or any(range_problem(b, 0.0, 1.0, high_open=True) for b in self.betas):
            raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {betas}")  # not ("0.9", True)
        self.betas = tuple(map(float, self.betas))
        self.eps = check_number(eps, "eps")

    def _update(self, ops, params, grads, state):
        ops.adam_update(params, grads, state["m"], state["v"], self.lr, self.betas[0], self.betas[1],
                        self.eps, self.weight_decay, self.decoupled, self.steps)

    def config(self):
        return {"type": type(self).__name__, "lr": self.base_lr, "betas": list(self.betas),
                "eps": self.eps, "weight_decay": self.weight_decay}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter)."""

    name = "adamw"
    decoupled = True

    def __init__(self, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(lr, betas, eps, weight_decay)


OPTIMIZERS = {cls.name: cls for cls in (SGD, Adam, AdamW)}


def saved_config(optimizer):
    """``optimizer``'s config as a checkpoint keeps it, or a ConfigError for an optimizer of one's own (a
    subclass trains), which a run resumed from it could not rebuild."""
    check_saveable(optimizer, OPTIMIZERS.values(), "optimizer", "nn.SGD, nn.Adam or nn.AdamW")
    return optimizer.config()


def get(optimizer=None, **params):
    """An optimizer from a name, a config dict, an instance, or None (SGD)."""
    if optimizer is None:
        return SGD(**params)
    if isinstance(optimizer, Optimizer):
        return optimizer
    if not isinstance(optimizer, (str, dict)):  # a class, PyTorch's optimizer (whose repr takes many lines)
        raise ConfigError(f"optimizer must be an nnaccel optimizer such as nn.SGD(lr=0.1), its name or its config "
                          f"dict, got {described(optimizer)}")
    if isinstance(optimizer, dict):
        if "type" not in optimizer:
            raise ConfigError(f"optimizer config {optimizer!r} has no 'type'; give one of {', '.join(OPTIMIZERS)}")
        params = {k: v for k, v in optimizer.items() if k != "type"}
        optimizer = optimizer["type"]
    key = str(optimizer).lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    return _build(OPTIMIZERS[key], params, f"optimizer {key!r}")


def _build(cls, options, what):
    """``cls(**options)``, or a ConfigError naming ``what`` and the options it does not take or lacks
    (rather than Python's TypeError)."""
    known = dict(list(inspect.signature(cls.__init__).parameters.items())[1:])  # not self; nor Optimizer.__new__'s
    unknown = [name for name in options if name not in known]
    if unknown:
        raise ConfigError(f"{what} takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(known)}")
    missing = [name for name, parameter in known.items()
               if parameter.default is parameter.empty and name not in options]
    if missing:
        raise ConfigError(f"{what} needs the option {', '.join(map(repr, missing))}")
    return cls(**options)


class StepLR:
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, step_size, gamma=0.1):
        self.step_size = check_int(step_size, "StepLR step_size")
        self.gamma = check_number(gamma, "StepLR gamma")

    def lr_at(self, epoch, base_lr):
        return base_lr * self.gamma ** (epoch // self.step_size)

    def config(self):
        return {"type": "StepLR", "step_size": self.step_size, "gamma": self.gamma}


class CosineAnnealing:
    """Cosine decay from the base rate to ``eta_min`` over ``t_max`` epochs, then ``eta_min``, as Keras's
    CosineDecay holds its floor (PyTorch's CosineAnnealingLR would rise again past ``t_max``)."""

    def __init__(self, t_max, eta_min=0.0):
        self.t_max = check_int(t_max, "CosineAnnealing t_max")
        self.eta_min = check_number(eta_min, "CosineAnnealing eta_min", allow_zero=True)

    def lr_at(self, epoch, base_lr):
        progress = min(epoch, self.t_max) / self.t_max
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2

    def config(self):
        return {"type": "CosineAnnealing", "t_max": self.t_max, "eta_min": self.eta_min}


SCHEDULES = {"StepLR": StepLR, "CosineAnnealing": CosineAnnealing}


def schedule_config(schedule, saving=False):
    """``schedule``'s config (None for none); one of one's own (any object with ``lr_at`` trains) is named by
    its class, or with ``saving`` refused: a run resumed from a checkpoint could not rebuild it."""
    if schedule is None or type(schedule) in SCHEDULES.values():
        return None if schedule is None else schedule.config()
    if saving:
        check_saveable(schedule, SCHEDULES.values(), "schedule", "nn.StepLR or nn.CosineAnnealing")
    return {"type": type(schedule).__name__}


def schedule_from(config):
    """A schedule from its ``config()`` (as checkpoints keep it), or None."""
    if config is None:
        return None
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    return _build(SCHEDULES[kind], config, f"schedule {kind}")
