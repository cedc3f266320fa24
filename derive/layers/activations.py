"""Elementwise activations."""
import math

import torch

from derive.spec import Tensor, layer


@layer(x=Tensor("n", "d"))
def sigmoid(x):
    """The logistic function, as ``torch.sigmoid``."""
    out = torch.sigmoid(x)
    return out


@layer(x=Tensor("n", "d"))
def relu(x):
    """``max(x, 0)``, as ``torch.relu``; its gradient at 0 is 0, as torch's."""
    out = torch.relu(x)
    return out


@layer(x=Tensor("n", "d"))
def tanh(x):
    """Elementwise hyperbolic tangent."""
    out = torch.tanh(x)
    return out


@layer(x=Tensor("n", "d"))
def softplus(x):
    """``log(1 + exp(x))``, as ``F.softplus`` (whose threshold only changes the result above x = 20)."""
    out = (1 + x.exp()).log()
    return out


@layer(x=Tensor("n", "d"))
def gelu_tanh(x):
    """GELU with the tanh approximation, as ``F.gelu(x, approximate="tanh")``."""
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    out = 0.5 * x * (1 + torch.tanh(inner))
    return out
