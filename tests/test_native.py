"""Every built-in fused kernel that has a native torch op matches it, value and gradients, float64.

One row per layer: how to call the native op on the spec's inputs (by the spec's own names). A
layer with no native peer (batchnorm with Bessel's correction) is listed as such, so a new
built-in cannot be forgotten here.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from derive.layers import FUSED
from derive.verify import random_inputs

NATIVE = {
    "cross_entropy": lambda logits, y: F.cross_entropy(logits, y),
    "batchnorm_biased": lambda x, gamma, beta, eps: F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps),
    "batchnorm3d": lambda x, gamma, beta, eps: F.batch_norm(x, None, None, gamma.view(-1), beta.view(-1),
                                                            training=True, eps=eps),
    "layernorm": lambda x, gamma, beta, eps: F.layer_norm(x, (x.shape[1],), gamma, beta, eps),
    "rmsnorm": lambda x, g, eps: F.rms_norm(x, (x.shape[1],), g, eps),
    "cross_entropy_smooth": lambda logits, y, smoothing: F.cross_entropy(logits, y, label_smoothing=smoothing),
    "cross_entropy_temperature": lambda logits, y, T: F.cross_entropy(logits / T, y),
    "cross_entropy_weighted": lambda logits, y, w: F.cross_entropy(logits, y, weight=w),
    "cross_entropy_ignore": lambda logits, y, ignore_index: F.cross_entropy(logits, y, ignore_index=ignore_index),
    "mse": lambda pred, target: F.mse_loss(pred, target),
    "linear": lambda x, W, b: F.linear(x, W.T, b),
    "bce_with_logits": lambda logits, target: F.binary_cross_entropy_with_logits(logits, target),
    "sigmoid": lambda x: torch.sigmoid(x),
    "relu": lambda x: torch.relu(x),
    "tanh": lambda x: torch.tanh(x),
    "softplus": lambda x: F.softplus(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
}
NO_NATIVE = {"batchnorm": "torch has no batch norm with Bessel's correction in training"}
SIZES = {"n": 7, "d": 5, "k": 6, "c": 3, "l": 4, "i": 5, "o": 3, "m": 6, "e": 4}


def test_every_fused_builtin_is_compared_or_says_why_not():
    assert {layer.name for layer in FUSED} == set(NATIVE) | set(NO_NATIVE)


@pytest.mark.parametrize("layer", [layer for layer in FUSED if layer.name in NATIVE], ids=lambda s: s.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_native_op(layer, seed):
    inputs = random_inputs(layer, {d: SIZES[d] for d in layer.dims}, torch.float64, seed=seed)
    wanted = layer.differentiable

    def run(fn):
        leaves = {k: (v.clone().requires_grad_(k in wanted) if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        out = fn(**leaves)
        upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
        return out, torch.autograd.grad(out, [leaves[k] for k in wanted], upstream)

    ours, our_grads = run(getattr(importlib.import_module(f"generated.{layer.name}"), layer.name))
    theirs, their_grads = run(NATIVE[layer.name])
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(wanted, our_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), (name, float((a - b).abs().max()))


@pytest.mark.parametrize("name", ["relu", "bce_with_logits"])
def test_the_gradient_at_zero_is_torchs(name):
    """relu'(0) = 0 and d|x|/dx = 0 at 0, as torch takes them: inputs with exact zeros."""
    x = torch.tensor([[0.0, -1.5, 2.0], [0.0, 0.0, -0.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]], dtype=torch.float64)
    args = (x,) if name == "relu" else (x, target)
    ours_fn = getattr(importlib.import_module(f"generated.{name}"), name)
    grads = []
    for fn in (ours_fn, NATIVE[name]):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, *args[1:])
        grads.append(torch.autograd.grad(out, leaf, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1]) if name == "relu" else torch.allclose(grads[0], grads[1], atol=1e-15)


def test_bce_with_logits_is_stable_for_large_logits():
    """No exp of a large number in forward or backward: logits of +-1000 give the native values."""
    x = torch.tensor([[1000.0, -1000.0, 30.0], [-30.0, 0.5, 0.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.25]], dtype=torch.float64)
    ours_fn = getattr(importlib.import_module("generated.bce_with_logits"), "bce_with_logits")
    results = []
    for fn in (ours_fn, NATIVE["bce_with_logits"]):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, target)
        results.append((out, torch.autograd.grad(out, leaf)[0]))
    (a, ga), (b, gb) = results
    assert torch.isfinite(a) and torch.isfinite(ga).all()
    assert torch.allclose(a, b) and torch.allclose(ga, gb, atol=1e-15)


def test_ignored_rows_get_no_gradient_and_do_not_count():
    fn = getattr(importlib.import_module("generated.cross_entropy_ignore"), "cross_entropy_ignore")
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    y = torch.tensor([2, 0, 1, 0, 3, 0])
    loss = fn(logits, y, ignore_index=0)
    (grad,) = torch.autograd.grad(loss, logits)
    kept = y != 0
    assert torch.all(grad[~kept] == 0)
    assert torch.allclose(loss, F.cross_entropy(logits[kept], y[kept]))
