"""Layers written the way textbooks and first drafts write them: activations from their formulas,
softmax losses with and without the max shift, entropies, normalizations with eps in different
places. Each is exact in exact arithmetic; several are traps in float32 for a fused formula that
rebuilds an input through ``log(exp(x))``, squares a sum the spec only divided by, divides by
``1 - p``, or subtracts two large sums."""
import math

import torch
import torch.nn.functional as F

from derive import Constant, Labels, Tensor, layer


@layer(x=Tensor("n", "d"))
def sigmoid_formula(x):
    out = 1 / (1 + torch.exp(-x))
    return out


@layer(x=Tensor("n", "d"))
def softplus_formula(x):
    out = torch.log(1 + torch.exp(x))
    return out


@layer(x=Tensor("n", "d"))
def swish_formula(x):
    out = x / (1 + torch.exp(-x))
    return out


@layer(x=Tensor("n", "d"))
def tanh_formula(x):
    e = torch.exp(x)
    f = torch.exp(-x)
    out = (e - f) / (e + f)
    return out


@layer(x=Tensor("n", "d"))
def mish(x):
    out = x * torch.tanh(F.softplus(x))
    return out


@layer(x=Tensor("n", "d"))
def tanh_of_tanh(x):
    out = torch.tanh(torch.tanh(x))
    return out


@layer(x=Tensor("n", "d"), a=Tensor("d"), s=Tensor("d"))
def scaled_tanh(x, a, s):
    out = a * torch.tanh(x * s)
    return out


@layer(x=Tensor("n", "d"), g=Tensor("n", "d"))
def gated_sigmoid(x, g):
    out = x * torch.sigmoid(g)
    return out


@layer(x=Tensor("n", "d"), beta=Tensor("d"))
def swish_learned(x, beta):
    out = x * torch.sigmoid(beta * x)
    return out


@layer(x=Tensor("n", "d"))
def gelu_tanh_formula(x):
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    out = 0.5 * x * (1 + torch.tanh(inner))
    return out


@layer(x=Tensor("n", "k"))
def softmax_no_shift(x):
    e = torch.exp(x)
    s = e.sum(1, keepdim=True)
    out = e / s
    return out


@layer(x=Tensor("n", "k"))
def softmax_shifted(x):
    m = x.max(1, keepdim=True).values
    e = torch.exp(x - m)
    out = e / e.sum(1, keepdim=True)
    return out


@layer(x=Tensor("n", "k"))
def log_softmax_formula(x):
    m = x.max(1, keepdim=True).values
    z = x - m
    out = z - torch.log(torch.exp(z).sum(1, keepdim=True))
    return out


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def cross_entropy_no_shift(logits, y):
    n = logits.shape[0]
    counts = logits.exp()
    probs = counts / counts.sum(1, keepdim=True)
    loss = -probs[range(n), y].log().mean()
    return loss


@layer(logits=Tensor("n", "k"))
def entropy(logits):
    m = logits.max(1, keepdim=True).values
    z = logits - m
    logp = z - z.exp().sum(1, keepdim=True).log()
    p = logp.exp()
    out = -(p * logp).sum(1)
    return out


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def focal_loss(logits, y):
    n = logits.shape[0]
    m = logits.max(1, keepdim=True).values
    e = (logits - m).exp()
    p = e / e.sum(1, keepdim=True)
    pt = p[range(n), y]
    loss = (-(1 - pt) ** 2 * pt.log()).mean()
    return loss


@layer(x=Tensor("n", "d"), t=Tensor("n", "d", differentiable=False))
def bce_from_probabilities(x, t):
    p = torch.sigmoid(x)
    loss = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    return loss


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def log_cosh(pred, target):
    diff = pred - target
    cosh = (diff.exp() + (-diff).exp()) / 2
    loss = cosh.log().mean()
    return loss


@layer(x=Tensor("n", "d"), gamma=Tensor("d"), eps=Constant(1e-5, positive=True))
def layernorm_eps_outside(x, gamma, eps=1e-5):
    d = x.shape[1]
    mean = x.sum(1, keepdim=True) / d
    xc = x - mean
    std = ((xc**2).sum(1, keepdim=True) / d) ** 0.5
    out = gamma * xc / (std + eps)
    return out


@layer(x=Tensor("n", "d"), g=Tensor("d"), eps=Constant(1e-6, positive=True))
def rmsnorm_eps_inside(x, g, eps=1e-6):
    ms = (x * x).mean(1, keepdim=True)
    out = g * x / (ms + eps) ** 0.5
    return out


@layer(x=Tensor("n", "d"), eps=Constant(1e-5, positive=True))
def standardize_columns(x, eps=1e-5):
    n = x.shape[0]
    mu = x.mean(0, keepdim=True)
    var = ((x - mu) ** 2).sum(0, keepdim=True) / (n - 1)
    out = (x - mu) / (var + eps) ** 0.5
    return out


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def weighted_sum_of_squares(x, w):
    out = (w * x * x).sum(1) / (x * x).sum(1)
    return out


@layer(x=Tensor("n", "d"), a=Tensor("d"), b=Tensor("d"))
def tanh_gate_with_row_sum(x, a, b):
    """A per-feature tanh whose output is used twice: scaled per feature, and summed over the row."""
    h = torch.tanh(x * a)
    return h * b + h.sum(1, keepdim=True)


@layer(x=Tensor("n", "d"), w=Tensor("d"), eps=Constant(1e-5, positive=True))
def weighted_standardize(x, w, eps=1e-5):
    """Deviations from the column mean over a weighted spread: ``dw`` rewritten in the centred
    values (``x`` as ``xc + mu``) must not keep ``mu*sum(xc)``, zero only in exact arithmetic."""
    mu = x.mean(0, keepdim=True)
    xc = x - mu
    var = (w * xc**2).mean(0, keepdim=True)
    out = xc / torch.sqrt(var + eps)
    return out


@layer(x=Tensor("n", "k"))
def tanh_of_total_logsumexp(x):
    """A squashed total of the rows' logsumexp: its gradient is a tanh's derivative times each
    row's softmax, ``exp(x - lse)``."""
    return torch.tanh(torch.logsumexp(x, dim=1).sum())
