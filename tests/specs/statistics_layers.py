"""Variances and standard deviations as people write them: ``x.var``, ``x.std``, ``torch.var``,
biased and unbiased, over one axis or all of them, of an input, of an expression, inside
normalizations and regularizers (a VICReg variance term, a coefficient of variation). The tests
derive each one and hold it against autograd through the same function, at inputs offset far
from zero, where ``torch.var`` (accumulated in double) and the same sums written out in float32
differ."""
import torch
import torch.nn.functional as F

from derive import Tensor, layer


@layer(x=Tensor("n", "d"), g=Tensor("d"), b=Tensor("d"))
def batchnorm_torch_var(x, g, b):
    bnmeani = x.mean(0, keepdim=True)
    bnvar = x.var(0, keepdim=True)
    return g * (x - bnmeani) * torch.rsqrt(bnvar + 1e-5) + b


@layer(x=Tensor("n", "d"))
def standardize_std(x):
    return (x - x.mean(0)) / (x.std(0) + 1e-5)


@layer(x=Tensor("n", "d"))
def torch_var_and_std(x):
    return (torch.var(x, 1) + torch.std(x, 1, unbiased=False)).sum()


@layer(x=Tensor("n", "d"))
def variance_of_tanh(x):
    return torch.tanh(x).var(1, keepdim=True) * x


@layer(x=Tensor("n", "d"))
def variance_of_everything(x):
    return x.var()


@layer(x=Tensor("n", "d"))
def coefficient_of_variation(x):
    return (x.std(1) / (x.abs().mean(1) + 1e-3)).mean()


@layer(x=Tensor("n", "d"))
def whitened_energy(x):
    return ((x - x.mean(1, keepdim=True)) ** 2 / (x.var(1, keepdim=True, correction=0) + 1e-5)).mean()


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def variance_of_a_product(x, w):
    return (x * w).var(1).sum()


@layer(z=Tensor("n", "d"))
def vicreg_variance(z):
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    return F.relu(1 - std).mean()


@layer(x=Tensor("n", "d"))
def log_variance(x):
    return torch.log(x.var(0) + 1e-6).sum()


@layer(x=Tensor("n", "c", "l"))
def std_over_the_last_axis(x):
    return x / (x.std(-1, keepdim=True) + 1e-5)
