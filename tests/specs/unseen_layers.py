"""Layers the engine was not built around, written as a user would; the tests derive each one."""
import math
import torch
from derive import Constant, Labels, Tensor, layer


@layer(x=Tensor("n", "d"), gamma=Tensor("d"), beta=Tensor("d"), eps=Constant(1e-5))
def layernorm(x, gamma, beta, eps=1e-5):
    d = x.shape[1]
    mu = x.sum(1, keepdim=True) / d
    xc = x - mu
    var = (xc**2).sum(1, keepdim=True) / d
    inv = (var + eps) ** -0.5
    xhat = xc * inv
    out = gamma * xhat + beta
    return out


@layer(x=Tensor("n", "d"), g=Tensor("d"), eps=Constant(1e-6))
def rmsnorm(x, g, eps=1e-6):
    ms = (x**2).mean(1, keepdim=True)
    inv = (ms + eps) ** -0.5
    out = g * x * inv
    return out


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def mse(pred, target):
    diff = pred - target
    loss = (diff**2).mean()
    return loss


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"), smoothing=Constant(0.1))
def ce_smooth(logits, y, smoothing=0.1):
    n, k = logits.shape
    m = logits.max(1, keepdim=True).values
    z = logits - m
    lse = z.exp().sum(1, keepdim=True).log()
    logprobs = z - lse
    nll = -logprobs[range(n), y].mean()
    uniform = -logprobs.mean()
    loss = (1 - smoothing) * nll + smoothing * uniform
    return loss


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"), T=Constant(2.0))
def ce_temperature(logits, y, T=2.0):
    n = logits.shape[0]
    s = logits / T
    m = s.max(1, keepdim=True).values
    z = s - m
    logprobs = z - z.exp().sum(1, keepdim=True).log()
    loss = -logprobs[range(n), y].mean()
    return loss


@layer(x=Tensor("n", "d"))
def softplus(x):
    out = (1 + x.exp()).log()
    return out


@layer(x=Tensor("n", "d"))
def gelu_tanh(x):
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    out = 0.5 * x * (1 + torch.tanh(inner))
    return out


@layer(x=Tensor("n", "c", "l"), gamma=Tensor("c", "1"), beta=Tensor("c", "1"), eps=Constant(1e-5))
def batchnorm3d(x, gamma, beta, eps=1e-5):
    n, c, l = x.shape
    mean = x.sum(0, keepdim=True).sum(2, keepdim=True) / (n * l)
    xc = x - mean
    var = (xc**2).sum(0, keepdim=True).sum(2, keepdim=True) / (n * l)
    xhat = xc * (var + eps) ** -0.5
    out = gamma * xhat + beta
    return out
