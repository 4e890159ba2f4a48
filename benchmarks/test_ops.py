"""Each op of a training step as nnaccel's backend runs it, per device, network and batch size.

The layer ops cover every layer of the network, so each benchmark is that
op's share of one training step (test_train_step.py).
"""

import numpy

from nnaccel import bench

CLASSES = 10  # every benchmark network ends in 10 classes


def test_weighted_sum_forward(measure, backend, layers):
    """``x @ W`` for every layer."""
    def forward():
        for layer in layers:
            backend.matmul(layer.x, layer.weight, out=layer.z)
    measure(forward)


def test_weighted_sum_backward(measure, backend, layers):
    """``x.T @ dz`` (weight gradient) for every layer, ``dz @ W.T`` (input gradient) for all but the first."""
    def backward():
        for index, layer in enumerate(layers):
            backend.matmul(layer.x, layer.dz, out=layer.weight_grad, trans_a=True)
            if index:
                backend.matmul(layer.dz, layer.weight, out=layer.dx, trans_b=True)
    measure(backward)


def test_bias_activation_forward(measure, backend, layers):
    """``z += b`` and the activation, in place: ReLU on hidden layers, identity on the output."""
    def forward():
        for layer in layers:
            backend.bias_act(layer.z, layer.bias, layer.activation, out=layer.z)
    measure(forward)


def test_activation_backward(measure, backend, layers):
    """``dz = dy * activation'`` and the bias gradient (batch sum) for every layer."""
    def backward():
        for layer in layers:
            backend.act_backward(layer.dy, layer.z, layer.z, layer.activation, out=layer.dz,
                                 bias_grad=layer.bias_grad)
    measure(backward)


def test_softmax_cross_entropy(measure, backend, batch):
    """Loss and gradient of the softmax cross-entropy over the batch's logits."""
    logits = backend.uniform((batch, CLASSES), seed=0, counter=0)
    labels = backend.asarray(numpy.arange(batch) % CLASSES)
    grad = backend.empty((batch, CLASSES))
    measure(lambda: backend.softmax_cross_entropy(logits, labels, grad))


def test_sgd_update(measure, backend, model):
    """The momentum SGD step over the model's flat parameter buffer."""
    velocity = backend.zeros(model.flat_params.shape)
    measure(lambda: backend.sgd_update(model.flat_params, model.flat_grads, velocity, bench.LR, bench.MOMENTUM,
                                       weight_decay=0.0, nesterov=False))
