"""Every adjoint a fused derivation document prints is the gradient it names.

The documents differentiate the spec as written (``derive/document/written.py``). Here each
printed formula is evaluated on random inputs (``document/evaluate.py``, the formula exactly as
printed) and compared with autograd through the spec: every named line's adjoint against that
variable's ``.grad`` (``retain_grad``), every line of an input's route to the fused formula against
the input's gradient, every cancelling adjoint's route against zero, and every path said to carry
nothing against zero. For the built-in fused layers and layers the engine was not written for.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from derive.derivation import analysis, scalars
from derive.document.evaluate import complete, evaluate
from derive.document.notation import ADJOINT
from derive.document.numbers import Example, example_sizes, run
from derive.kernel import build_cached
from derive.layers import FUSED, from_file
from derive.verify import random_inputs

from test_unseen_layers import SPECS

UNSEEN = [layer for layer in from_file(str(SPECS)) if layer.name in ("l2_normalize", "logcosh")]
# natural layers whose documents once stopped with a traceback or printed a wrong adjoint: a view
# splitting an axis (group_norm), a clamp, torch.where, a comparison of floats, the exact GELU's erf,
# square weights (two axes of one size: scores (t, t), A (d, d)), sums nested over one size, an
# input's name bound to a new value (the document's worked example had no value for it: KeyError)
NATURAL = [layer for layer in from_file(str(SPECS.parent / "natural_layers.py"))
           if layer.name in ("group_norm", "l2_normalize", "masked_attention", "multiclass_hinge", "huber", "mlp_gelu",
                             "quadratic_form", "gru_cell", "self_attention", "input_name_bound_again")]
SEEDS = (3, 4)


def _close(ours, reference, what):
    ours, reference = np.asarray(ours, dtype=float), np.asarray(reference, dtype=float)
    scale = max(1.0, float(np.abs(reference).max(initial=0)))
    assert np.allclose(ours.reshape(reference.shape), reference, atol=1e-9 * scale, rtol=1e-8), what


@pytest.mark.parametrize("layer", FUSED + UNSEEN + NATURAL, ids=lambda layer: f"{layer.name}:{layer.fn.__module__}")
@pytest.mark.parametrize("seed", SEEDS)
def test_every_printed_adjoint_is_autograds_gradient(layer, seed):
    kernel = build_cached(layer)
    a = analysis(kernel)
    graph, w = a.graph, a.written
    sizes = example_sizes(graph)
    inputs = random_inputs(layer, sizes, torch.float64, seed)
    _, values, grads, upstream = run(layer, inputs, graph.output.name, seed=seed,
                                     renamed={n.var: n.name for n in graph.nodes if n.var})
    ex = Example(sizes, inputs, values, grads, upstream.detach().numpy())
    numbers = scalars(graph, ex)
    values = complete(a.el, values, numbers)  # the unnamed temporaries a formula may read
    arrays = {**values, f"d{graph.output.name}": ex.upstream}
    checked = 0
    # the adjoints, each from the document's own formula, the output first
    for node, adjoint in w.adjoints.items():
        ours = evaluate(adjoint.lecture, arrays, numbers, a.el.free(node))
        arrays[ADJOINT + node.name] = ours.reshape(np.shape(values[node.name]))
        if node.name in grads:
            _close(ours, grads[node.name], f"the adjoint of {node.name}")
            checked += 1
        elif adjoint.cancels:
            _close(ours, np.zeros_like(ours), f"the adjoint of {node.name} cancels")
    assert checked >= len(layer.differentiable)
    # every line of each input's route (adjoints still in it read autograd's own values)
    with_autograd = {**arrays, **{ADJOINT + k: v for k, v in grads.items()}}
    for node, route in [*a.routes.items(), *a.cancel_routes.items()]:
        reference = grads.get(node.name, np.zeros_like(values[node.name]))
        for step in [route.start, *(s.result for s in route.steps)]:
            _close(evaluate(step, with_autograd, numbers, a.el.free(node)), reference, f"a line of d{node.name}'s route")
    # the adjoints the kernel computes once and its formulas read (dprobs = dout @ v.T), in order
    nodes = {n.name: n for n in graph.nodes}
    for f in kernel.adjoints:
        node = nodes[f.input]
        name = str(a.el.grad_ref(node).base)
        with_autograd[name] = evaluate(f.element, with_autograd, numbers, a.el.free(node)).reshape(
            np.shape(values[node.name]))
    for f in kernel.formulas:
        node = graph.inputs[f.input]
        _close(evaluate(f.element, with_autograd, numbers, a.el.free(node)), grads[f.input], f"d{f.input}'s formula")
    # a path said to carry nothing carries nothing
    for node, adjoint in w.adjoints.items():
        for v in adjoint.vanished:
            _close(evaluate(v.shown, with_autograd, numbers, a.el.free(node)), 0 * values[node.name], "a vanished path")


def test_the_variance_path_into_the_mean_is_found_to_vanish():
    """Batchnorm written as the exercise writes it: the centred values sum to zero, so nothing
    comes back to ``bnmeani`` through the variance, and the document says why."""
    from derive.layers.batchnorm import batchnorm

    a = analysis(build_cached(batchnorm))
    vanished = [v for adj in a.written.adjoints.values() for v in adj.vanished]
    assert [(v.source.name, v.via.name) for v in vanished] == [("bndiff2", "bndiff")]
    (zero,) = vanished[0].sums
    assert str(zero.total.body.base) == "bndiff"


NESTED = '''import torch
from derive import Tensor, layer


@layer(c=Tensor("1", "d"), w=Tensor("d"))
def doubled_squash(c, w):
    v = w + c
    return torch.tanh(torch.tanh(v + v))
'''


def test_a_route_solves_no_saved_line_for_a_value_inside_a_function(tmp_path, monkeypatch):
    """A route replaces a value the forward does not save by solving a saved line for it
    (``bnraw = bndiff*bnvar_inv`` gives ``bndiff``). Solving ``out = tanh(tanh(2*v))`` for ``v``
    took sympy 14 s, twice (45 s to generate this three-line layer), for four complex branches
    the route could not use; ``tanh(v)**3`` ran for more than ten minutes. A value read inside a
    function is not solved for; the route goes through definitions, and every adjoint the document
    prints is still autograd's gradient (the test above, on this layer)."""
    import sympy as sp

    from derive.document import written

    path = tmp_path / "nested.py"
    path.write_text(NESTED)
    (layer,) = from_file(str(path))
    asked = []
    solve = written.sp.solve
    monkeypatch.setattr(written.sp, "solve", lambda equation, unknown, **kw: (asked.append((equation, unknown)),
                                                                             solve(equation, unknown, **kw))[1])
    analysis(build_cached(layer))
    inside = [equation for equation, unknown in asked
              if any(unknown in f.free_symbols for f in equation.atoms(sp.Function))]
    assert inside == []
    monkeypatch.undo()
    for seed in SEEDS:
        test_every_printed_adjoint_is_autograds_gradient(layer, seed)
