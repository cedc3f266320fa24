"""The committed generated kernels against autograd of the very same spec."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from derive.layers import FUSED
from derive.verify import accuracy, against_autograd, random_inputs, table

EXERCISE = {"n": 32, "k": 27, "d": 64, "c": 8, "l": 4, "i": 30, "o": 64}


def generated(layer):
    return getattr(importlib.import_module(f"generated.{layer.name}"), layer.name)


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_gradcheck_float64(layer):
    sizes = {d: 4 + k for k, d in enumerate(layer.dims)}
    inputs = random_inputs(layer, sizes, torch.float64, seed=3)
    wanted = set(layer.differentiable)
    names = list(inputs)
    tensors = [inputs[k].requires_grad_() if k in wanted else inputs[k] for k in names]
    fn = generated(layer)
    assert torch.autograd.gradcheck(lambda *a: fn(*a), tuple(tensors))


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_exercise_table_float32(layer, capsys):
    sizes = {d: EXERCISE.get(d, 16) for d in layer.dims}
    rows = against_autograd(layer, generated(layer), sizes, dtype=torch.float32)
    print(f"\n{layer.name} (float32, {sizes})\n{table(rows)}")
    assert [r.name for r in rows] == ["output"] + [f"d{k}" for k in layer.differentiable]
    assert all(r.approximate for r in rows), table(rows)


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_float32_fused_is_as_accurate_as_autograd(layer):
    """Against a float64 reference, the fused float32 gradient errs no more than autograd's chain (2x slack)."""
    sizes = {d: EXERCISE.get(d, 16) for d in layer.dims}
    for seed in range(3):
        for name, (fused_error, autograd_error) in accuracy(layer, generated(layer), sizes, seed=seed).items():
            assert fused_error <= 2 * autograd_error + 1e-12, (name, fused_error, autograd_error)


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 17), other=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_random_shapes_float64(layer, n, other, seed):
    sizes = {d: (n if k == 0 else other) for k, d in enumerate(layer.dims)}
    rows = against_autograd(layer, generated(layer), sizes, dtype=torch.float64, seed=seed)
    assert max(r.maxdiff for r in rows) < 1e-10, table(rows)


def test_needs_input_grad_is_honoured():
    from derive.layers import batchnorm
    fn = generated(batchnorm)
    x, g, b = (torch.randn(6, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64, requires_grad=True))
    fn(x, g, b).sum().backward()
    assert x.grad is not None and b.grad is not None and g.grad is None


def test_bessel_batchnorm_refuses_one_row():
    from derive.layers import batchnorm
    with pytest.raises(ValueError, match=r"batchnorm: .*n - 1.*n=1"):
        generated(batchnorm)(torch.randn(1, 3), torch.ones(3), torch.zeros(3))


def test_biased_batchnorm_accepts_one_row_like_its_formula_allows():
    from derive.layers import batchnorm_biased
    out = generated(batchnorm_biased)(torch.randn(1, 3), torch.ones(3), torch.zeros(3))
    assert torch.isfinite(out).all()


def test_labels_out_of_range_are_refused():
    from derive.layers import cross_entropy
    with pytest.raises(ValueError, match=r"cross_entropy: labels y must lie in \[0, k\) = \[0, 4\)"):
        generated(cross_entropy)(torch.randn(3, 4), torch.tensor([0, 4, 1]))


def test_shape_mismatch_is_refused():
    from derive.layers import batchnorm
    with pytest.raises(ValueError, match=r"batchnorm: gamma must have shape \(d,\)"):
        generated(batchnorm)(torch.randn(4, 3), torch.ones(5), torch.zeros(3))


def test_dtype_mismatch_is_refused():
    from derive.layers import batchnorm
    with pytest.raises(ValueError, match="batchnorm: gamma is torch.float64"):
        generated(batchnorm)(torch.randn(4, 3), torch.ones(3, dtype=torch.float64), torch.zeros(3))


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_bfloat16_runs_and_is_close(layer):
    sizes = {d: 8 + k for k, d in enumerate(layer.dims)}
    rows = against_autograd(layer, generated(layer), sizes, dtype=torch.bfloat16)
    assert all(r.maxdiff < 0.1 for r in rows), table(rows)


def test_matches_native_cross_entropy():
    from derive.layers import cross_entropy
    logits = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (9,))
    ours = generated(cross_entropy)(logits, y)
    (g1,) = torch.autograd.grad(ours, logits)
    native = torch.nn.functional.cross_entropy(logits, y)
    (g2,) = torch.autograd.grad(native, logits)
    assert torch.allclose(ours, native) and torch.allclose(g1, g2)


def test_matches_native_batch_norm_training():
    from derive.layers import batchnorm_biased
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    g, b = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    ours = generated(batchnorm_biased)(x, g, b)
    native = torch.nn.functional.batch_norm(x, None, None, g, b, training=True, eps=1e-5)
    up = torch.randn_like(ours)
    assert torch.allclose(ours, native)
    assert all(torch.allclose(a, c) for a, c in zip(torch.autograd.grad(ours, (x, g, b), up),
                                                    torch.autograd.grad(native, (x, g, b), up)))


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_second_derivative_passes_gradgradcheck(layer):
    """With create_graph=True the backward recomputes what it reads with a graph, so the fused
    backward is itself differentiable: torch's gradgradcheck agrees with finite differences."""
    sizes = {d: 3 + k for k, d in enumerate(layer.dims)}
    inputs = random_inputs(layer, sizes, torch.float64, seed=1)
    names = list(inputs)
    wanted = [k for k in names if k in layer.differentiable]

    def fn(*leaves):
        values = dict(inputs)
        values.update(zip(wanted, leaves))
        return generated(layer)(**values)

    leaves = [inputs[k].clone().requires_grad_() for k in wanted]
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_second_derivative_matches_autograd_of_the_spec(layer):
    """A gradient penalty through the fused kernel equals the one through the spec's autograd."""
    sizes = {d: 4 + k for k, d in enumerate(layer.dims)}
    inputs = random_inputs(layer, sizes, torch.float64, seed=2)
    results = []
    for forward in (generated(layer), layer.fn):
        leaves = {k: (v.clone().requires_grad_() if k in layer.differentiable else v) for k, v in inputs.items()}
        out = forward(**leaves)
        wanted = [leaves[k] for k in layer.differentiable]
        first = torch.autograd.grad(out, wanted, torch.ones_like(out), create_graph=True)
        penalty = sum((g**2).sum() for g in first)
        if not penalty.requires_grad:  # a piecewise-linear layer (relu): the second derivative is 0
            results.append(tuple(torch.zeros_like(w) for w in wanted))
            continue
        results.append(torch.autograd.grad(penalty, wanted, materialize_grads=True))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)
