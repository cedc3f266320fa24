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

from derive.layers import BUILTIN
from derive.verify import random_inputs

# in-place updates inside the fused backward (addcmul_) run through vmap's slower generic rule
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")
# tiny sizes keep the Jacobians small (hessian of batchnorm over 3x2: 36 entries); two labels' classes
SIZES = {"n": 3, "d": 2, "k": 3, "c": 2, "l": 2, "i": 2, "o": 2, "v": 4, "t": 2, "e": 2, "hidden": 3, "m": 4}
# every layer's kernel (``<name>.py``: fused, or the step-by-step backward where no fused form is
# used) and every step-by-step Function (``<name>_steps.py``)
CASES = ([pytest.param(layer, "", id=layer.name) for layer in BUILTIN]
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


@pytest.mark.parametrize("layer, kind", CASES)
def test_gradcheck_in_forward_and_reverse_mode(layer, kind):
    """torch.autograd's own check, in both modes (``torch.autograd.forward_ad`` reaches the eager
    Function's jvp), and an undefined upstream gradient. (Batched gradients are torch.func's
    jacrev and jacfwd above.)"""
    ours, _, leaves, _ = functions(layer, kind, seed=7)
    assert torch.autograd.gradcheck(ours, tuple(x.clone().requires_grad_() for x in leaves), check_forward_ad=True)


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


def _gradients(fn, layer, inputs):
    leaves = {k: (v.clone().requires_grad_(k in layer.differentiable) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    return (out, *torch.autograd.grad(out, [leaves[k] for k in layer.differentiable], torch.ones_like(out)))


@pytest.mark.parametrize("layer, kind", CASES)
def test_compiles_with_fullgraph_and_exports(layer, kind):
    """torch.compile(fullgraph=True) traces the call, checks included, without a graph break (the
    aot_eager backend: the same forward and backward graphs, no C++ build), forward and backward
    equal to eager; torch.export gives the same output."""
    inputs = random_inputs(layer, {d: SIZES[d] for d in layer.dims}, torch.float64, seed=6)
    fn = generated(layer, kind)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for ours, eager in zip(_gradients(compiled, layer, inputs), _gradients(fn, layer, inputs)):
        assert_same(ours, eager)

    class Module(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    args = tuple(inputs.values())
    exported = torch.export.export(Module(), args)
    assert_same(exported.module()(*args), fn(*args))


def test_inductor_compiles_cross_entropy_with_its_label_check_and_no_graph_break():
    """With the default backend (inductor), fullgraph: the label range is an asynchronous assert in
    the graph (no device sync, no Python branch on data), and a label out of range still fails."""
    from derive.layers import cross_entropy

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    fn = generated(cross_entropy, "")
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=record)
    logits, y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.tensor([0, 2, 1, 2])
    (ours,) = torch.autograd.grad(compiled(logits, y), logits)
    (eager,) = torch.autograd.grad(fn(logits, y), logits)
    assert_same(ours, eager)
    asserts = [node for gm in graphs for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
               for node in sub.graph.nodes if node.target is torch._assert_async]
    assert asserts  # in the forward's subgraph (autograd_function_apply)
    with pytest.raises(RuntimeError):  # the assertion, or the bound check of the compiled gather before it
        compiled(logits.detach(), torch.tensor([0, 3, 1, 2]))


def test_labels_are_checked_under_vmap():
    from derive.layers import cross_entropy
    fn = generated(cross_entropy, "")
    logits, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([[0, 1, 2, 0], [0, 5, 1, 1]])
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, k\) = \[0, 3\), got values in \[0, 5\]"):
        vmap(fn)(logits, y)


def test_a_second_derivative_after_an_input_changed_in_place_is_refused():
    """The first derivative never reads the logits (F.cross_entropy's does not either); a second one
    recomputes from them, and refuses to once they changed, rather than differentiate other values."""
    from derive.layers import cross_entropy
    fn = generated(cross_entropy, "")
    leaf = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logits = leaf * 1
    loss = fn(logits, torch.tensor([0, 2, 1, 2]))
    logits.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_a_derivative_of_an_input_declared_without_one_is_refused():
    """``target`` of ``mse`` is declared differentiable=False: asking its derivative is an error
    (as torch raises for an argument it has no derivative for), in reverse and in forward mode."""
    from derive.layers import mse
    fn = generated(mse, "")
    pred, target = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="target is declared differentiable=False"):
        torch.autograd.grad(fn(pred, target.requires_grad_()), target)
    with pytest.raises(RuntimeError, match="target is declared differentiable=False"):
        jvp(fn, (pred, target.detach()), (torch.zeros_like(pred), torch.ones_like(target)))


def test_forward_mode_inside_forward_mode_is_refused_not_wrong():
    from derive.layers import tanh
    with pytest.raises(NotImplementedError, match="197867"):
        jacfwd(jacfwd(generated(tanh, "")))(torch.randn(3, 2, dtype=torch.float64))


def test_input_checks_can_be_switched_off_and_refuse_with_one_error_class():
    """A refused input raises InputError, both a ValueError and a RuntimeError (torch's own ops
    raise either); ``check_inputs(False)`` skips every check until switched on again."""
    module = importlib.import_module("generated.cross_entropy_smooth")
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    with pytest.raises(module.InputError, match=r"smoothing is declared >= 0.0 and <= 1.0, got 1.5") as refused:
        module.cross_entropy_smooth(logits, y, 1.5)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, RuntimeError)
    module.check_inputs(False)
    try:
        assert torch.isfinite(module.cross_entropy_smooth(logits, y, 1.5))  # computed, unchecked
    finally:
        module.check_inputs(True)
    with pytest.raises(module.InputError):
        module.cross_entropy_smooth(logits, y, 1.5)


@pytest.mark.parametrize("layer, kind", CASES)
def test_runs_under_no_grad_and_inference_mode(layer, kind):
    """No graph is wanted: the output alone, equal to the spec's (an inference tensor has no version
    number to keep)."""
    inputs = random_inputs(layer, {d: SIZES[d] for d in layer.dims}, torch.float64, seed=8)
    expected = layer.fn(**inputs)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert_same(generated(layer, kind)(**inputs), expected)


def test_a_constant_whose_default_it_does_not_allow_is_refused_at_the_declaration():
    from derive.errors import SpecError
    from derive.spec import Constant, Tensor, layer

    with pytest.raises(SpecError, match=r"constant 'c' has the default 1.5, outside the values it declares "
                                         r"\(>= 0.0 and <= 1.0\)"):
        @layer(x=Tensor("n", "d"), c=Constant(1.5, low=0.0, high=1.0))
        def scaled(x, c=1.5):
            out = x * c
            return out
