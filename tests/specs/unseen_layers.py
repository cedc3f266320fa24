"""Layers outside the built-in list, written as a user would; the tests derive each one."""
import torch
from derive import Constant, Tensor, layer


@layer(x=Tensor("n", "k"))
def softmax(x):
    m = x.max(1, keepdim=True).values
    e = (x - m).exp()
    probs = e / e.sum(1, keepdim=True)
    return probs


@layer(x=Tensor("n", "d"))
def l2_normalize(x):
    norm_inv = (x**2).sum(1, keepdim=True) ** -0.5
    out = x * norm_inv
    return out


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def logcosh(pred, target):
    diff = pred - target
    cosh = ((diff).exp() + (-diff).exp()) / 2
    loss = cosh.log().mean()
    return loss


@layer(x=Tensor("n", "d"), w=Tensor("d"), alpha=Constant(0.5))
def gated_tanh(x, w, alpha=0.5):
    gate = torch.tanh(w * x)
    out = x * (alpha + gate)
    return out
