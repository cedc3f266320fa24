"""Maxima and minima as people write them: shifts by a row's maximum named or inline, ``max(dim)``,
``amax`` and ``amin`` (whose gradient is shared among ties), pooling, margins, a maximum of a
computed value, of a maximum, in a denominator. The tests derive each one and hold it against
autograd through the same function, at inputs that tie too."""
import torch
import torch.nn.functional as F

from derive import Labels, Tensor, layer


@layer(x=Tensor("n", "d"))
def softmax_inline_shift(x):
    e = (x - x.max(1, keepdim=True).values).exp()
    return e / e.sum(1, keepdim=True)


@layer(x=Tensor("n", "d"), y=Labels("n", classes="d"))
def cross_entropy_inline_shift(x, y):
    z = x - x.max(1, keepdim=True).values
    logp = z - z.exp().sum(1, keepdim=True).log()
    return -logp[torch.arange(x.shape[0]), y].mean()


@layer(x=Tensor("n", "d"))
def row_max_pool(x):
    return x.max(1).values.sum()


@layer(x=Tensor("n", "d"))
def peak_over_mean(x):
    return (x.max(1, keepdim=True).values - x.mean(1, keepdim=True)).pow(2).mean()


@layer(x=Tensor("n", "d"))
def scaled_by_largest_magnitude(x):
    return x / (x.abs().max(1, keepdim=True).values + 1)


@layer(x=Tensor("n", "d"))
def logsumexp_written_out(x):
    m = x.max(1, keepdim=True).values
    return (m + (x - m).exp().sum(1, keepdim=True).log()).sum()


@layer(x=Tensor("n", "d"))
def largest_tanh_gates(x):
    return torch.tanh(x).max(1, keepdim=True).values * x


@layer(x=Tensor("n", "d"))
def above_row_minimum(x):
    return (x - x.min(1, keepdim=True).values).sum()


@layer(x=Tensor("n", "d"))
def exp_shifted_by_amax(x):
    return torch.exp(x - x.amax(1, keepdim=True)).sum()


@layer(x=Tensor("n", "d"))
def spread_by_amin(x):
    return (x - torch.amin(x, dim=1, keepdim=True)).pow(2).mean()


@layer(x=Tensor("n", "d"), W=Tensor("d", "d"))
def shifted_projection(x, W):
    h = x @ W
    return (h - h.max(1, keepdim=True).values).exp().sum()


@layer(x=Tensor("n", "d"))
def max_of_row_maxima(x):
    return x.max(1, keepdim=True).values.max(0).values.sum()


@layer(x=Tensor("n", "d"))
def exp_over_its_maximum(x):
    return (x.exp() / x.exp().max(1, keepdim=True).values).mean()


@layer(x=Tensor("n", "d"))
def relu_column_pool(x):
    return torch.relu(x).max(0, keepdim=True).values.sum()


@layer(A=Tensor("k", "k"))
def peak_of_exp(A):
    e = (A - A.max(1, keepdim=True).values).exp()
    return ((e - e.max(1, keepdim=True).values) ** 2).sum()


@layer(x=Tensor("n", "d"))
def amax_pool_and_mean(x):
    return F.softplus(x.amax(1)) + x.mean(1)
