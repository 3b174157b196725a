"""The layers, one module per family."""

from backprop.layers.conv import Conv2d, ConvTranspose2d
from backprop.layers.dropout import Dropout
from backprop.layers.linear import Linear
from backprop.layers.losses import L2Loss, SoftmaxCrossEntropy
from backprop.layers.lstm import LSTMCell
from backprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from backprop.layers.pointwise import LeakyReLU, Pointwise, ReLU, Sigmoid, Softplus, Tanh
from backprop.layers.pooling import AvgPool2d, GlobalAvgPool, GlobalMaxPool, MaxPool2d, Upsample
from backprop.layers.recurrent import RNNCell
from backprop.layers.sequence import Unstack, ZeroState
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
    "AvgPool2d",
    "Branch",
    "Conv2d",
    "ConvTranspose2d",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "L2Loss",
    "LSTMCell",
    "LeakyReLU",
    "Linear",
    "MaxPool2d",
    "Merge",
    "Multiply",
    "Pointwise",
    "RNNCell",
    "ReLU",
    "Reshape",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Softplus",
    "Tanh",
    "Transpose",
    "Unstack",
    "Upsample",
    "ZeroState",
]
