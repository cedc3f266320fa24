"""Losses beyond the exercise's cross-entropy: label smoothing, a softmax temperature, squared error,
binary cross-entropy with logits."""
import torch
import torch.nn.functional as F

from derive.spec import Constant, Labels, Tensor, layer


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"), smoothing=Constant(0.1, low=0.0, high=1.0))
def cross_entropy_smooth(logits, y, smoothing=0.1):
    """Cross-entropy with label smoothing, as ``F.cross_entropy(logits, y, label_smoothing=smoothing)``."""
    n, k = logits.shape
    m = logits.max(1, keepdim=True).values
    z = logits - m  # subtract the row max for numerical stability
    lse = z.exp().sum(1, keepdim=True).log()
    logprobs = z - lse
    nll = -logprobs[range(n), y].mean()
    uniform = -logprobs.mean()
    loss = (1 - smoothing) * nll + smoothing * uniform
    return loss


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"), T=Constant(2.0))
def cross_entropy_temperature(logits, y, T=2.0):
    """Cross-entropy of ``softmax(logits / T)``, as ``F.cross_entropy(logits / T, y)``."""
    n = logits.shape[0]
    s = logits / T
    m = s.max(1, keepdim=True).values
    z = s - m  # subtract the row max for numerical stability
    logprobs = z - z.exp().sum(1, keepdim=True).log()
    loss = -logprobs[range(n), y].mean()
    return loss


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def mse(pred, target):
    """Mean squared error, as ``F.mse_loss(pred, target)``; the target gets no gradient."""
    diff = pred - target
    loss = (diff**2).mean()
    return loss


@layer(logits=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def bce_with_logits(logits, target):
    """Binary cross-entropy of ``sigmoid(logits)`` against targets in [0, 1], averaged, as
    ``F.binary_cross_entropy_with_logits``: ``-t*log(sigmoid(x)) - (1 - t)*log(1 - sigmoid(x))``
    is ``(1 - t)*x + softplus(-x)``, which torch computes without overflow."""
    per_element = (1 - target) * logits + F.softplus(-logits)
    loss = per_element.mean()
    return loss


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"), w=Tensor("k", differentiable=False))
def cross_entropy_weighted(logits, y, w):
    """Cross-entropy with a weight per class, normalized by the sum of the picked weights, as
    ``F.cross_entropy(logits, y, weight=w)``."""
    n = logits.shape[0]
    m = logits.max(1, keepdim=True).values
    z = logits - m  # subtract the row max for numerical stability
    logprobs = z - z.exp().sum(1, keepdim=True).log()
    picked_w = w[y]  # each row's weight: the weight of its label
    loss = -(picked_w * logprobs[range(n), y]).sum() / picked_w.sum()
    return loss


def positive_weights(sizes, dtype=torch.float64, seed=0):
    """Logits ~ N(0, 1), uniform labels, class weights in [0.5, 1.5) (torch's weights are >= 0;
    the normalization divides by their sum)."""
    g = torch.Generator().manual_seed(seed)
    n, k = sizes["n"], sizes["k"]
    return dict(logits=torch.randn((n, k), generator=g, dtype=dtype), y=torch.randint(0, k, (n,), generator=g),
                w=torch.rand(k, generator=g, dtype=dtype) + 0.5)


cross_entropy_weighted.example = positive_weights


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"), ignore_index=Constant(0))
def cross_entropy_ignore(logits, y, ignore_index=0):
    """Cross-entropy averaged over the rows whose label is not ``ignore_index`` (a padding class),
    as ``F.cross_entropy(logits, y, ignore_index=ignore_index)``. The ignored class is a class of
    ``range(k)`` here: torch's default -100 lies outside the declared labels."""
    n = logits.shape[0]
    m = logits.max(1, keepdim=True).values
    z = logits - m  # subtract the row max for numerical stability
    logprobs = z - z.exp().sum(1, keepdim=True).log()
    keep = y != ignore_index  # 1 for a row that counts, 0 for an ignored one
    loss = -(keep * logprobs[range(n), y]).sum() / keep.sum()
    return loss


def some_rows_kept(sizes, dtype=torch.float64, seed=0):
    """Logits ~ N(0, 1) and uniform labels, the first row never ignored (a batch with every row
    ignored is 0/0, NaN in torch too); with one class, nothing is ignored."""
    g = torch.Generator().manual_seed(seed)
    n, k = sizes["n"], sizes["k"]
    y = torch.randint(0, k, (n,), generator=g)
    ignore = 0 if k > 1 else 1
    if k > 1:
        y[0] = 1
    return dict(logits=torch.randn((n, k), generator=g, dtype=dtype), y=y, ignore_index=ignore)


cross_entropy_ignore.example = some_rows_kept
