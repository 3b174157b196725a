"""The layers, one module per family."""

from backprop.layers.attention import MultiHeadAttention
from backprop.layers.conv import Conv2d, ConvTranspose2d
from backprop.layers.dropout import Dropout
from backprop.layers.linear import Linear
from backprop.layers.losses import L2Loss, SoftmaxCrossEntropy
from backprop.layers.normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from backprop.layers.pointwise import LeakyReLU, Pointwise, ReLU, Sigmoid, Softplus, Tanh
from backprop.layers.pooling import AvgPool2d, GlobalAvgPool, GlobalMaxPool, MaxPool2d, Upsample
from backprop.layers.sequence import Embedding, PositionalEncoding
from backprop.layers.shape import Flatten, Reshape, Transpose
from backprop.layers.softmax import LogSoftmax, Softmax
from backprop.layers.structure import Add, Branch, MatMul, Merge, Multiply
from backprop.layers.transformer import transformer_block

__all__ = [
    "Add",
    "BatchNorm1d",
    "BatchNorm2d",
    "Dropout",
    "Embedding",
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
    "LeakyReLU",
    "Linear",
    "MatMul",
    "MaxPool2d",
    "Merge",
    "Multiply",
    "MultiHeadAttention",
    "Pointwise",
    "PositionalEncoding",
    "ReLU",
    "Reshape",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Softplus",
    "Tanh",
    "Transpose",
    "Upsample",
    "transformer_block",
]
