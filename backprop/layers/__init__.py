"""The layers, one module per family."""

from backprop.layers.conv import Conv2d, ConvTranspose2d
from backprop.layers.dropout import Dropout
from backprop.layers.linear import Linear
from backprop.layers.losses import L2Loss, SoftmaxCrossEntropy
from backprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from backprop.layers.pointwise import LeakyReLU, Pointwise, ReLU, Sigmoid, Softplus, Tanh
from backprop.layers.shape import Flatten, Reshape, Transpose
from backprop.layers.softmax import LogSoftmax, Softmax
from backprop.layers.structure import Add, Branch, Merge, Multiply

__all__ = [
    "Add",
    "BatchNorm1d",
    "BatchNorm2d",
    "Dropout",
    "LayerNorm",
    "LogSoftmax",
    "Softmax",
    "Branch",
    "Conv2d",
    "ConvTranspose2d",
    "Flatten",
    "L2Loss",
    "LeakyReLU",
    "Linear",
    "Merge",
    "Multiply",
    "Pointwise",
    "ReLU",
    "Reshape",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Softplus",
    "Tanh",
    "Transpose",
]
