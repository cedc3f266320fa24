"""At the edges, every generated kernel with a native counterpart behaves as the native op: one table,
each case run on the generated module and on the native op (``test_native.NATIVE``), and the
outcome must be the same: equal values and gradients (NaN where native gives NaN), or an error of
the class native raises.

In-place updates of an input after the forward are the one asymmetric case: a generated kernel
saves the values its backward reads, which are often computed ones (``probs``, ``bnraw``) where
the native op saves the input itself. Where the native op refuses the backward (its version
counter), the generated one may also give the gradient of the forward as it ran; where the native
op succeeds, so must it, with that gradient.
"""
import importlib

import pytest
import torch

from derive.layers import FUSED
from derive.spec import Labels
from test_native import NATIVE

LAYERS = {layer.name: layer for layer in FUSED if layer.name in NATIVE}
SIZES = {"n": 4, "d": 3, "k": 3, "c": 2, "l": 2, "i": 3, "o": 2, "m": 5, "e": 2}


def inputs(layer, n=4, seed=0, **changes):
    """Floats ~ N(0, 1), labels uniform, constants at their defaults; then ``changes``."""
    g = torch.Generator().manual_seed(seed)
    sizes = dict(SIZES, n=n)
    values = {}
    for name, decl in layer.inputs.items():
        if isinstance(decl, Labels):
            values[name] = torch.randint(0, sizes[decl.classes], tuple(sizes[d] for d in decl.dims), generator=g)
        elif hasattr(decl, "dims"):
            values[name] = torch.randn(tuple(sizes[d] if d != "1" else 1 for d in decl.dims), generator=g,
                                       dtype=torch.float64)
        else:
            values[name] = decl.default
    values.update(changes)
    return values


def all_labels(layer, value, n=4):
    return inputs(layer, n=n, y=torch.full((n,), value))


CASES = (
    [pytest.param(name, "empty batch", lambda layer: inputs(layer, n=0), id=f"{name}-empty-batch") for name in LAYERS]
    + [
        pytest.param("cross_entropy_ignore", "every row ignored", lambda layer: all_labels(layer, 0),
                     id="cross_entropy_ignore-every-row-ignored"),
        pytest.param("cross_entropy_ignore", "ignore_index outside the classes",
                     lambda layer: inputs(layer, ignore_index=-100), id="cross_entropy_ignore-index-outside"),
        pytest.param("cross_entropy_weighted", "every weight zero",
                     lambda layer: inputs(layer, w=torch.zeros(SIZES["k"], dtype=torch.float64)),
                     id="cross_entropy_weighted-zero-weights"),
        pytest.param("cross_entropy_smooth", "smoothing above 1", lambda layer: inputs(layer, smoothing=1.5),
                     id="cross_entropy_smooth-smoothing-1.5"),
        pytest.param("cross_entropy_smooth", "smoothing 1", lambda layer: inputs(layer, smoothing=1.0),
                     id="cross_entropy_smooth-smoothing-1"),
        pytest.param("cross_entropy_temperature", "temperature 0", lambda layer: inputs(layer, T=0.0),
                     id="cross_entropy_temperature-T-0"),
    ]
    + [pytest.param(name, f"eps {eps}", lambda layer, eps=eps: inputs(layer, eps=eps), id=f"{name}-eps-{eps}")
       for name in ("batchnorm_biased", "batchnorm3d") for eps in (0.0, -1.0)]
)


def run(fn, layer, values, mutate=None):
    """``("value", output, gradients)`` or ``("error", class)``. The differentiable inputs enter
    as copies of leaves, so that ``mutate`` (an input's name) can change one in place after the
    forward; a float input is shifted by 1, labels are rewritten with their own values."""
    leaves = {k: values[k].clone().requires_grad_() for k in layer.differentiable}
    args = {k: (leaves[k] * 1 if k in leaves else (v.clone() if isinstance(v, torch.Tensor) else v))
            for k, v in values.items()}
    try:
        out = fn(**args)
        if mutate is not None:
            target = args[mutate]
            target.add_(1) if target.is_floating_point() else target.copy_(target.clone())
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    except Exception as error:  # the outcome under comparison
        return ("error", type(error))
    return ("value", out.detach(), grads)


def same(ours, theirs):
    if ours[0] != theirs[0]:
        return False
    if ours[0] == "error":
        return issubclass(ours[1], theirs[1])
    return all(torch.allclose(a, b, rtol=1e-9, atol=1e-11, equal_nan=True) and a.shape == b.shape
               for a, b in zip((ours[1], *ours[2]), (theirs[1], *theirs[2])))


def generated(name):
    return getattr(importlib.import_module(f"generated.{name}"), name)


@pytest.mark.parametrize("name, case, make", CASES)
def test_edge_case_has_the_native_outcome(name, case, make):
    layer = LAYERS[name]
    values = make(layer)
    ours, theirs = run(generated(name), layer, values), run(NATIVE[name], layer, values)
    assert same(ours, theirs), (case, ours, theirs)


INPLACE = [pytest.param(name, k, id=f"{name}-{k}") for name, layer in LAYERS.items() for k in layer.tensors]
# Where the derived backward reads an input that the native op does not save, the generated kernel
# saves that input, and autograd refuses the backward after an in-place update (a RuntimeError
# naming the modified tensor) where the native op, which saved its output, goes on.
# (relu's derived backward reads x, but relu runs under autograd in eager mode, its backward being
# autograd's own kernel: it behaves as torch.relu, which saved its output.)
READS_ITS_INPUT = {("attention", "q"): "dk = (dt2.T @ q)/math.sqrt(d) reads q; the native op keeps its own copy",
                   ("attention", "k"): "dq = (dt2 @ k)/math.sqrt(d) reads k; the native op keeps its own copy"}


@pytest.mark.parametrize("name, mutated", INPLACE)
def test_in_place_update_after_the_forward(name, mutated):
    layer = LAYERS[name]
    values = inputs(layer)
    ours = run(generated(name), layer, values, mutate=mutated)
    theirs = run(NATIVE[name], layer, values, mutate=mutated)
    as_it_ran = run(NATIVE[name], layer, values)
    assert as_it_ran[0] == "value"
    if (name, mutated) in READS_ITS_INPUT:
        assert theirs[0] == "value" and ours == ("error", RuntimeError)
    elif theirs[0] == "value":
        assert same(ours, theirs) and same(ours, as_it_ran), (ours, theirs)
    else:
        assert same(ours, theirs) or same(ours, as_it_ran), (ours, theirs)


def test_the_edge_table_covers_every_layer_with_a_native_op():
    assert {name for name, *_ in (p.values for p in CASES)} >= set(LAYERS)
    assert set(LAYERS) == set(NATIVE)


@pytest.mark.parametrize("name, make, ours_kind, theirs_kind", [
    # a negative smoothing lies outside the declared [0, 1]; F.cross_entropy only checks <= 1
    ("cross_entropy_smooth", lambda layer: inputs(layer, smoothing=-0.1), "error", "value"),
    # one row: the biased formula is defined there (the output is beta); F.batch_norm refuses it
    ("batchnorm_biased", lambda layer: inputs(layer, n=1), "value", "error"),
    # eps is declared positive (the derivation relies on it); F.layer_norm computes NaN
    ("layernorm", lambda layer: inputs(layer, eps=-1.0), "error", "value"),
    ("rmsnorm", lambda layer: inputs(layer, eps=-1.0), "error", "value"),
], ids=["negative-smoothing", "batchnorm-one-row", "layernorm-negative-eps", "rmsnorm-negative-eps"])
def test_the_known_differences_are_as_documented(name, make, ours_kind, theirs_kind):
    layer = LAYERS[name]
    values = make(layer)
    assert run(generated(name), layer, values)[0] == ours_kind
    assert run(NATIVE[name], layer, values)[0] == theirs_kind
