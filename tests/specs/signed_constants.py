"""Layers whose constants may take either sign: a formula that assumed the sign of the default
would be right for one sign and wrong for the other."""
import torch

from derive import Constant, Tensor, layer


@layer(x=Tensor("n", "d"), c=Constant(1.0))
def abs_scaled(x, c=1.0):
    h = (x * c).abs()
    out = h.sum(1)
    return out


@layer(x=Tensor("n", "d"), c=Constant(2.0))
def root_of_square(x, c=2.0):
    out = ((c * x) ** 2 + 1) ** 0.5
    return out


@layer(x=Tensor("n", "d"), c=Constant(3.0))
def square_over_constant(x, c=3.0):
    out = (c * x) ** 2 / c
    return out


@layer(x=Tensor("n", "d"), c=Constant(0.5))
def tanh_over_constant(x, c=0.5):
    out = torch.tanh(x / c) * c
    return out


@layer(x=Tensor("n", "d"), c=Constant(2.0))
def relu_scaled(x, c=2.0):
    out = torch.relu(c * x) + c
    return out


@layer(x=Tensor("n", "d"), c=Constant(1.5))
def power_of_constant_times_input(x, c=1.5):
    h = (x * x + c * c) ** 0.5 * c
    out = h.mean(1)
    return out


@layer(x=Tensor("n", "d"), c=Constant(4.0))
def sum_scaled_then_divided(x, c=4.0):
    s = (c * x).sum(0, keepdim=True)
    out = x / (s * s + 1)
    return out
