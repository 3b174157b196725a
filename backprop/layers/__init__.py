"""The layers, one module per family."""

from backprop.layers.conv import Conv2d, ConvTranspose2d
from backprop.layers.linear import Linear
from backprop.layers.losses import L2Loss, SoftmaxCrossEntropy
from backprop.layers.pointwise import LeakyReLU, Pointwise, ReLU, Sigmoid, Softplus, Tanh
from backprop.layers.shape import Flatten, Reshape, Transpose
from backprop.layers.structure import Add, Branch, Merge, Multiply

__all__ = [
    "Add",
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
