"""Normalization layers beyond the exercise's batchnorm: over the features of each row
(layer norm, RMS norm) and over the batch and length of a 3-d input (batchnorm over (n, l))."""
from derive.spec import Constant, Tensor, layer


@layer(x=Tensor("n", "d"), gamma=Tensor("d"), beta=Tensor("d"), eps=Constant(1e-5, positive=True))
def layernorm(x, gamma, beta, eps=1e-5):
    """Layer normalization over the last dimension (biased variance), as ``F.layer_norm``."""
    d = x.shape[1]
    mu = x.sum(1, keepdim=True) / d
    xc = x - mu
    var = (xc**2).sum(1, keepdim=True) / d
    inv = (var + eps) ** -0.5
    xhat = xc * inv
    out = gamma * xhat + beta
    return out


@layer(x=Tensor("n", "d"), g=Tensor("d"), eps=Constant(1e-6, positive=True))
def rmsnorm(x, g, eps=1e-6):
    """RMS normalization over the last dimension: ``g * x / sqrt(mean(x**2) + eps)``."""
    ms = (x**2).mean(1, keepdim=True)
    inv = (ms + eps) ** -0.5
    out = g * x * inv
    return out


@layer(x=Tensor("n", "c", "l", batch="n"), gamma=Tensor("c", "1"), beta=Tensor("c", "1"), eps=Constant(1e-5, positive=True))
def batchnorm3d(x, gamma, beta, eps=1e-5):
    """Batch normalization of an (n, c, l) input over n and l (biased variance), as BatchNorm1d in
    training on a sequence; ``gamma`` and ``beta`` are (c, 1) so they broadcast over l."""
    n, c, l = x.shape
    mean = x.sum(0, keepdim=True).sum(2, keepdim=True) / (n * l)
    xc = x - mean
    var = (xc**2).sum(0, keepdim=True).sum(2, keepdim=True) / (n * l)
    xhat = xc * (var + eps) ** -0.5
    out = gamma * xhat + beta
    return out
