"""backprop: an explicit, layer-based backpropagation engine (Algorithm 14.1)."""

from backprop import jacobian, plot
from backprop.backward_net import backward_graph
from backprop.check import GradcheckError, GradcheckReport, gradcheck, numerical_jacobian
from backprop.checkpoint import load, save
from backprop.data_grad import input_gradient, optimize_input
from backprop.graph import Gradients, Graph, Handle, NodeInfo, Sequential
from backprop.layer import Layer, Loss, Parameter
from backprop.layers import (
    Add,
    BatchNorm1d,
    BatchNorm2d,
    Branch,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    L2Loss,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    Merge,
    Multiply,
    Pointwise,
    ReLU,
    Reshape,
    Sigmoid,
    Softmax,
    SoftmaxCrossEntropy,
    Softplus,
    Tanh,
    Transpose,
)
from backprop.optim import SGD, Adam, Optimizer
from backprop.train import History, accuracy, fit, predict

__version__ = "0.1.0"

__all__ = [
    "backward_graph",
    "input_gradient",
    "optimize_input",
    "Adam",
    "History",
    "Optimizer",
    "accuracy",
    "fit",
    "load",
    "plot",
    "predict",
    "save",
    "Gradients",
    "Graph",
    "Handle",
    "NodeInfo",
    "SGD",
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
    "GradcheckError",
    "GradcheckReport",
    "L2Loss",
    "Layer",
    "LeakyReLU",
    "Linear",
    "Loss",
    "Merge",
    "Multiply",
    "Parameter",
    "Pointwise",
    "ReLU",
    "Reshape",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Softplus",
    "Tanh",
    "Transpose",
    "gradcheck",
    "jacobian",
    "numerical_jacobian",
]
