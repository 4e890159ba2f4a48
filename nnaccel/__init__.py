"""nnaccel: train digit-recognition networks on NumPy (CPU) or CuPy (CUDA) with one API.

    import nnaccel as nn
    model = nn.Sequential(nn.Dense(784, 256, activation="relu"), nn.Dense(256, 10), device="cpu")
    trainer = nn.Trainer(model, optimizer=nn.SGD(lr=0.1, momentum=0.9), batch_size=64)
    trainer.fit(x_train, y_train, epochs=20, validation_data=(x_val, y_val))
"""

from . import activations, datasets
from .activations import ELU, GELU, LeakyReLU, Linear, ReLU, SiLU, Sigmoid, Softmax, Softplus, Tanh
from .backend import cuda_status, get_backend, resolve_device
from .callbacks import Callback, CSVLogger, EarlyStopping, ModelCheckpoint, PlotCurves
from .checkpoint import load
from .errors import CheckpointError, ConfigError, DataError, DeviceError, NnaccelError, OutputError, ShapeError
from .layers import AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, Maxout, MaxPool2D, Parameter, RandomShift
from .losses import MSE, MeanSquaredError, SigmoidCrossEntropy, SoftmaxCrossEntropy
from .model import Sequential
from .optimizers import SGD, Adam, AdamW, CosineAnnealing, StepLR
from .trainer import OutOfMemory, Trainer, TrainingDiverged

__version__ = "0.1.0"

from . import onnx  # noqa: E402  (nnaccel.onnx.export; it needs __version__; the onnx package loads on first use)

__all__ = [  # the public API: what the imports above bring in
    "activations", "datasets", "onnx",
    "ELU", "GELU", "LeakyReLU", "Linear", "ReLU", "SiLU", "Sigmoid", "Softmax", "Softplus", "Tanh",
    "cuda_status", "get_backend", "resolve_device",
    "Callback", "CSVLogger", "EarlyStopping", "ModelCheckpoint", "PlotCurves",
    "load",
    "CheckpointError", "ConfigError", "DataError", "DeviceError", "NnaccelError", "OutputError", "ShapeError",
    "AvgPool2D", "BatchNorm", "Conv2D", "Dense", "Dropout", "Flatten", "Maxout", "MaxPool2D", "Parameter",
    "RandomShift",
    "MSE", "MeanSquaredError", "SigmoidCrossEntropy", "SoftmaxCrossEntropy",
    "Sequential",
    "SGD", "Adam", "AdamW", "CosineAnnealing", "StepLR",
    "OutOfMemory", "Trainer", "TrainingDiverged",
]
