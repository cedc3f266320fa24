"""Batch normalization over the batch axis, written line by line as in the backprop exercise."""
from derive.spec import Constant, Tensor, layer


@layer(x=Tensor("n", "d", batch="n"), gamma=Tensor("d"), beta=Tensor("d"), eps=Constant(1e-5, positive=True))
def batchnorm(x, gamma, beta, eps=1e-5):
    """Batch normalization with Bessel's correction (the variance divides by n - 1)."""
    n = x.shape[0]
    bnmeani = 1 / n * x.sum(0, keepdim=True)
    bndiff = x - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)
    bnvar_inv = (bnvar + eps) ** -0.5
    bnraw = bndiff * bnvar_inv
    out = gamma * bnraw + beta
    return out


@layer(x=Tensor("n", "d", batch="n"), gamma=Tensor("d"), beta=Tensor("d"), eps=Constant(1e-5, positive=True))
def batchnorm_biased(x, gamma, beta, eps=1e-5):
    """Batch normalization with the biased variance (divides by n), as BatchNorm1d in training."""
    n = x.shape[0]
    bnmeani = 1 / n * x.sum(0, keepdim=True)
    bndiff = x - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / n * bndiff2.sum(0, keepdim=True)
    bnvar_inv = (bnvar + eps) ** -0.5
    bnraw = bndiff * bnvar_inv
    out = gamma * bnraw + beta
    return out
