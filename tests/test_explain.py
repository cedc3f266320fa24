"""The derivation replayed with its rewrites named (explain.py, the logs of simplify.refold and
Elements.recognize): what a document shows is what the engine computes, step for step."""
from __future__ import annotations

import pytest
import sympy as sp

from derive import explain
from derive.derivation import render_markdown
from derive.kernel import build_cached
from derive.layers import FUSED, from_file
from derive.simplify import closed_form, refold, scalars, tidy
from derive.elements import NORMALIZERS
from derive.symbolic import Red, expand, reindex

from test_unseen_layers import SPECS

UNSEEN = {layer.name: layer for layer in from_file(str(SPECS))}
LAYERS = FUSED + [UNSEEN["l2_normalize"]]  # and one layer the engine was not written for


@pytest.fixture(scope="module", params=LAYERS, ids=lambda layer: layer.name)
def kernel(request):
    return build_cached(request.param)


def _sums_in_any_order(expr):
    """Nested sums as one sum over a set of axes, bound indices named by their size: the order in
    which two sums are nested (``sum_n sum_l`` or ``sum_l sum_n``) does not change their value."""
    if isinstance(expr, Red):
        bound = []
        while isinstance(expr, Red):
            bound.append(expr.index)
            expr = expr.body
        names = {j: sp.Symbol(f"_over_{j.upper + 1}") for j in bound}
        return sp.Function("SumOver")(_sums_in_any_order(expr).xreplace(names), *sorted(names.values(), key=str))
    if not expr.args or isinstance(expr, sp.Indexed):
        return expr
    return expr.func(*[_sums_in_any_order(a) for a in expr.args])


def test_the_written_out_chain_rule_is_the_engines_step(kernel):
    el = kernel.elements
    for step in kernel.gradients.steps:
        c = explain.contribution(kernel, step)
        assert c.chain.atoms(explain.Sigma) or not any(i != 0 for i in el.free(step.node))
        engine = step.contribution
        if step.node.op in NORMALIZERS:  # the engine goes through the softmax's own value (s*(a - sum(a*s))),
            # the written-out rule through its definition: the same once the value is its definition
            base, own = el.ref(step.node).base, el.free(step.node)
            engine = engine.replace(lambda e: isinstance(e, sp.Indexed) and e.base == base,
                                    lambda e: reindex(el.definition[step.node], dict(zip(own, e.indices))))
        difference = expand(_sums_in_any_order(el.recognize(c.collapsed)) - _sums_in_any_order(engine))
        assert difference == 0, (step.node.name, step.target.name)
        for collapse in c.collapses:
            if collapse.kind == "delta":
                assert sp.KroneckerDelta(collapse.index, collapse.value) in c.chain.atoms(sp.KroneckerDelta)


def test_refold_log_leads_from_the_sum_of_contributions_to_the_formula(kernel):
    el = kernel.elements
    for r in explain.refolded(kernel):
        before = tidy(el, r.total)
        for w in r.rewrites:
            assert w.before == before and w.cost[1] < w.cost[0]
            before = w.after
        assert before == r.refolded == refold(el, r.total)  # logging does not change the result
        assert closed_form(r.refolded, scalars(el)) == r.closed


def test_recognised_sums_are_named_nodes(kernel):
    el = kernel.elements
    opaque = {n.name for n in el.opaque}
    logs = [pair for d in explain.definitions(kernel) for pair in d.recognized]
    logs += [pair for r in explain.refolded(kernel) for w in r.rewrites for pair in w.recognized]
    logs += [pair for s in kernel.gradients.steps for pair in explain.contribution(kernel, s).recognized]
    for atom, value in logs:
        assert isinstance(atom, Red)
        assert {str(b) for b in value.atoms(sp.IndexedBase)} & opaque or {s.name for s in value.free_symbols} & opaque


def test_a_definition_is_recognised_only_with_earlier_nodes(kernel):
    """bnvar's own sum must not be 'recognised' as bnvar while bnvar is being defined."""
    for d in explain.definitions(kernel):
        assert all(d.node.name not in {str(b) for b in v.atoms(sp.IndexedBase)} for _, v in d.recognized)
        assert expand(d.value - kernel.elements.definition[d.node]) == 0


def test_batchnorm_document_names_every_rule_it_uses():
    md = render_markdown(build_cached(FUSED[[layer.name for layer in FUSED].index("batchnorm")]))
    assert "collapses the sum over" in md  # Kronecker deltas
    assert "recognised as the named node `bnmeani`" in md  # sum_r x_rj = n*bnmeani_j
    assert "solved for `x`" in md and "splits by linearity" in md  # the refold
    assert "`x` receives contributions through `out`, `bnvar`, `bnmeani`" in md  # the fan-out, summed
    assert "`bnmeani` is repeated over $n$" in md  # the broadcast, a fan-out too
    assert "```mermaid" in md
    assert "[`batchnorm_steps.md`](batchnorm_steps.md)" in md  # the small-matrix illustrations


def test_cross_entropy_document_shows_softmax_rows_summing_to_one():
    k = build_cached(FUSED[[layer.name for layer in FUSED].index("cross_entropy")])
    md = render_markdown(k)
    assert "recognised as the named node `counts_sum`" in md
    assert "The contributions to `logit_maxes` add up to zero" in md


def test_every_gradient_names_the_spec_lines_it_reads(kernel):
    md = render_markdown(kernel)
    nodes = {n.name: n for n in kernel.graph.nodes}
    for name in kernel.saved:
        node = nodes[name]
        if node.op not in ("input", "labels"):
            assert f"`{name}` (line {node.line}: `{node.source.strip()}`)" in md
