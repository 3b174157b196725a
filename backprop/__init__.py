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
    AvgPool2d,
    Branch,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    L2Loss,
    LeakyReLU,
    Linear,
    MaxPool2d,
    Merge,
    Multiply,
    Pointwise,
    ReLU,
    Reshape,
    Sigmoid,
    SoftmaxCrossEntropy,
    Softplus,
    Tanh,
    Transpose,
    Upsample,
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
    "AvgPool2d",
    "Branch",
    "Flatten",
    "GradcheckError",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GradcheckReport",
    "L2Loss",
    "Layer",
    "LeakyReLU",
    "Linear",
    "Loss",
    "MaxPool2d",
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
    "Upsample",
    "gradcheck",
    "jacobian",
    "numerical_jacobian",
]
