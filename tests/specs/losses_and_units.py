"""Losses, normalizations and units as people write them out: Huber and smooth L1, KL divergence
of logits, label smoothing, a focal loss, BCE through a sigmoid, a triplet margin, log-cosh, a
GLU, swish with a learned beta, mish, softsign, ELU, a layer norm with the unbiased std, an L2
normalization, variances, attention with its softmax written out. The tests derive each one and
hold it against autograd through the same function."""
import math

import torch
import torch.nn.functional as F

from derive import Constant, Labels, Tensor, layer


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def huber(pred, target):
    r = (pred - target).abs()
    return torch.where(r < 1.0, 0.5 * r ** 2, r - 0.5).mean()


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def smooth_l1_clamped(pred, target):
    r = (pred - target).abs()
    q = r.clamp(max=1.0)
    return (0.5 * q ** 2 + (r - q)).mean()


@layer(p=Tensor("n", "d"), q=Tensor("n", "d"))
def kl_of_logits(p, q):
    lp = F.log_softmax(p, dim=1)
    lq = F.log_softmax(q, dim=1)
    return (lp.exp() * (lp - lq)).sum(1).mean()


@layer(x=Tensor("n", "d"))
def logsigmoid_manual(x):
    return -F.softplus(-x).sum()


@layer(x=Tensor("n", "d"), W=Tensor("d", "d"), V=Tensor("d", "d"))
def glu_unit(x, W, V):
    return (x @ W) * torch.sigmoid(x @ V)


@layer(x=Tensor("n", "d"), beta=Tensor("d"))
def swish_beta(x, beta):
    return x * torch.sigmoid(beta * x)


@layer(x=Tensor("n", "d"))
def hardtanh_clamp(x):
    return x.clamp(-1.0, 1.0) * x


@layer(x=Tensor("n", "d"))
def mish_manual(x):
    return x * torch.tanh(torch.log(1 + torch.exp(x)))


@layer(x=Tensor("n", "d"), g=Tensor("d"), b=Tensor("d"))
def layernorm_unbiased_std(x, g, b):
    mu = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True)
    return g * (x - mu) / (sd + 1e-5) + b


@layer(x=Tensor("n", "d"))
def l2_normalize(x):
    return x / x.pow(2).sum(1, keepdim=True).sqrt().clamp(min=1e-12)


@layer(x=Tensor("n", "d"))
def variance_penalty(x):
    return x.var(0).mean() + x.var(1, unbiased=False).sum()


@layer(q=Tensor("n", "d"), k=Tensor("n", "d"), v=Tensor("n", "d"))
def attention_manual(q, k, v):
    s = q @ k.T / math.sqrt(q.shape[1])
    s = s - s.max(1, keepdim=True).values
    a = s.exp() / s.exp().sum(1, keepdim=True)
    return a @ v


@layer(x=Tensor("n", "d"), y=Labels("n", classes="d"))
def label_smoothing_manual(x, y):
    logp = F.log_softmax(x, dim=1)
    nll = -logp[torch.arange(x.shape[0]), y]
    smooth = -logp.mean(1)
    return (0.9 * nll + 0.1 * smooth).mean()


@layer(x=Tensor("n", "d"), t=Tensor("n", "d", differentiable=False, domain="probability"))
def bce_manual(x, t):
    p = torch.sigmoid(x)
    return -(t * torch.log(p + 1e-7) + (1 - t) * torch.log(1 - p + 1e-7)).mean()


@layer(a=Tensor("n", "d"), p=Tensor("n", "d"), m=Tensor("n", "d"))
def triplet_margin(a, p, m):
    pos = (a - p).pow(2).sum(1)
    neg = (a - m).pow(2).sum(1)
    return torch.relu(pos - neg + 1.0).mean()


@layer(x=Tensor("n", "d"))
def log_cosh_manual(x):
    return torch.log((torch.exp(x) + torch.exp(-x)) / 2).mean()


@layer(x=Tensor("n", "d"))
def softsign(x):
    return x / (1 + x.abs())


@layer(x=Tensor("n", "d"), y=Labels("n", classes="d"))
def focal_manual(x, y):
    logp = F.log_softmax(x, dim=1)
    lp = logp[torch.arange(x.shape[0]), y]
    return -((1 - lp.exp()) ** 2 * lp).mean()


@layer(x=Tensor("n", "d"))
def elu_manual(x):
    return torch.where(x > 0, x, torch.exp(x) - 1).sum()


@layer(x=Tensor("n", "d"), c=Constant(-2.0))
def scaled_abs_power(x, c=-2.0):
    return (c * x).abs().pow(1.5).mean()


@layer(x=Tensor("n", "d"))
def entropy_of_softmax(x):
    p = x.softmax(1)
    return -(p * p.log()).sum(1).mean()


@layer(x=Tensor("n", "d"))
def cauchy_of_log_probabilities(x):
    """A robust (Cauchy) penalty on log-probabilities written out with the row maximum's shift:
    the derivative divides by ``logp**2 + 1``, which must stay a square of the saved difference."""
    z = x - x.max(1, keepdim=True).values
    total = z.exp().sum(1, keepdim=True)
    logp = z - total.log()
    return (logp * logp + 1).log().mean()
