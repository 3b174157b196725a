"""The layers, one module per family."""

from backprop.layers.attention import MultiHeadAttention
from backprop.layers.conv import Conv2d, ConvTranspose2d
from backprop.layers.dropout import Dropout
from backprop.layers.linear import Linear
from backprop.layers.losses import L2Loss, SoftmaxCrossEntropy
from backprop.layers.lstm import LSTMCell
from backprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from backprop.layers.pointwise import LeakyReLU, Pointwise, ReLU, Sigmoid, Softplus, Tanh
from backprop.layers.pooling import AvgPool2d, GlobalAvgPool, GlobalMaxPool, MaxPool2d, Upsample
from backprop.layers.recurrent import RNNCell
from backprop.layers.sequence import Embedding, PositionalEncoding
from backprop.layers.shape import Flatten, Reshape, Transpose
from backprop.layers.softmax import LogSoftmax, Softmax
from backprop.layers.structure import Add, Branch, MatMul, Merge, Multiply
from backprop.layers.timesteps import Unstack, ZeroState
from backprop.layers.transformer import transformer_block

__all__ = [
    "Add",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Branch",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "Embedding",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "L2Loss",
    "LSTMCell",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MatMul",
    "MaxPool2d",
    "Merge",
    "MultiHeadAttention",
    "Multiply",
    "Pointwise",
    "PositionalEncoding",
    "RNNCell",
    "ReLU",
    "Reshape",
    "Sigmoid",
    "Softmax",
    "SoftmaxCrossEntropy",
    "Softplus",
    "Tanh",
    "Transpose",
    "Unstack",
    "Upsample",
    "ZeroState",
    "transformer_block",
]
