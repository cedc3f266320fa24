"""Proof on small symbolic matrices, and that the proof can fail."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derive.kernel import build
from derive.layers import FUSED, batchnorm
from derive.prove import ProofFailure, default_sizes, prove
from derive.spec import concrete_shape


@pytest.mark.parametrize("spec", FUSED, ids=lambda s: s.name)
def test_fused_formula_equals_elementwise_derivative(spec):
    kernel = build(spec)
    sizes = default_sizes(spec)
    assert len(sizes) >= (4 if len(spec.dims) >= 3 else 2) and len({tuple(s.items()) for s in sizes}) == len(sizes)
    assert all(len({s[d] for s in sizes}) >= 2 for d in spec.dims)  # every dimension at two values
    for s in sizes:
        proof = prove(kernel, s)
        assert proof.elements_checked == sum(
            math.prod(concrete_shape(spec.tensors[f.input].dims, s)) for f in kernel.formulas)


def test_cross_entropy_proof_with_other_labels():
    from derive.layers import cross_entropy
    kernel = build(cross_entropy)
    for variant in (1, 2):
        prove(kernel, {"n": 3, "k": 3}, label_variant=variant)


def test_a_wrong_formula_is_caught():
    kernel = build(batchnorm)
    n = kernel.graph.sizes["n"]
    dx = next(f for f in kernel.formulas if f.input == "x")
    dx.element = dx.element.xreplace({1 / (n - 1): 1 / n})  # drop Bessel's correction: must not pass
    with pytest.raises(ProofFailure, match="dx"):
        prove(kernel, {"n": 3, "d": 2})


def test_a_derivative_too_large_to_cancel_is_reported_not_proven(monkeypatch, tmp_path):
    """Past ``PROOF_MAX_OPS`` the proof stops, says which element and how large, and the report
    says "not proven" (the generated code is still held against autograd before it is written)."""
    import derive.generate as gen
    import derive.prove as proving

    kernel = build(batchnorm)
    full = prove(kernel, {"n": 2, "d": 3})
    assert full.skipped == "" and full.elements_checked == 2 * 3 + 3 + 3
    monkeypatch.setattr(proving, "PROOF_MAX_OPS", 10)
    stopped = prove(kernel, {"n": 2, "d": 3})
    assert stopped.elements_checked < full.elements_checked
    assert stopped.skipped.startswith("dx[0, 0] has ") and stopped.skipped.endswith("operations (more than 10)")

    (report,) = gen.generate([batchnorm], tmp_path, echo=lambda line: None, index=False)
    assert len(report.proofs) == 1  # larger sizes are left out (a job that derives the layer does not even run them)
    assert "not proven (too large)" in report.line()
    assert report.note().startswith("batchnorm: not proven at 2x3: the element-wise derivative dx[0, 0] has ")
    assert "the generated code matches autograd" in report.note()


def test_the_equality_check_keeps_relations_that_hold_and_no_other():
    """The exact check stands roots and exponentials in by fresh symbols. It keeps two relations
    (a root's base is the root to the power ``q``; ``exp(-z)`` is ``1/exp(z)``) so that the fast
    rational check succeeds where the two sides write one value both ways; substituting back gives
    the original, so a zero found there is a zero."""
    import sympy as sp

    from derive.prove import _equal, _generators

    x, y, e = sp.symbols("x y e", positive=True)
    base = x**2 / 3 + y**2 / 3 + e
    expr = 3 * x * base ** sp.Rational(-3, 2) + sp.exp(y - x) * sp.exp(sp.Max(x, y) - y) + 1 / sp.sqrt(base)
    generators = _generators(expr)
    replaced = expr.xreplace(generators)
    assert not replaced.atoms(sp.exp) and all(p.exp.is_Integer for p in replaced.atoms(sp.Pow))
    back = {}  # each stand-in symbol s, from an atom written s**k
    for atom, stand_in in generators.items():
        symbol, power = stand_in.as_base_exp()
        back[symbol] = atom ** (1 / power)
    assert sp.simplify(replaced.xreplace(back) - expr) == 0

    def rational_zero(difference):  # the fast check: zero as a rational function of the stand-ins
        return sp.cancel(sp.together(difference.xreplace(_generators(difference)))) == 0

    root = sp.sqrt(base)
    written_two_ways = [(1 / base + 1 / root, (1 + root) / base),
                        (1 / (1 + sp.exp(-x)), sp.exp(x) / (sp.exp(x) + 1))]
    for a, b in written_two_ways:
        assert rational_zero(a - b) and _equal(a, b)
        assert not rational_zero(a - b - x / 7) and not _equal(a, b + x / 7)


def _norm_terms():
    """Terms of the kind normalizations and softmaxes leave in a derivative, each with a second way
    of writing it: a root's odd power through its base, a logistic through ``exp(z)`` or ``exp(-z)``."""
    import sympy as sp

    x, y, e = sp.symbols("x y e", positive=True)
    base = x**2 / 3 + y**2 / 3 + e
    root = sp.sqrt(base)
    z = x - y
    return [
        (x / root**3, x / (root * base)),
        (y * x / root, y * x * root / base),
        (1 / (1 + sp.exp(-z)), sp.exp(z) / (sp.exp(z) + 1)),
        (sp.exp(-z) / (1 + sp.exp(-z)), 1 / (sp.exp(z) + 1)),
        (x * y, sp.expand((x + 1) * y) - y),
        (e / base, 1 - (x**2 + y**2) / (3 * base)),
        (sp.exp(z) - sp.exp(-z), (sp.exp(2 * z) - 1) * sp.exp(-z)),  # zero if exp(-z) were taken for exp(z)
    ]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3).filter(bool), st.integers(0, 6)), min_size=1, max_size=4),
       st.integers(1, 3))
def test_equal_holds_for_any_sum_written_two_ways_and_fails_when_one_term_moves(pairs, by):
    """``_equal`` on random sums of such terms: true when each term is written its other way, false
    once any one term's coefficient changes (the fast rational checks must not say zero wrongly)."""
    import sympy as sp

    from derive.prove import _equal

    terms = _norm_terms()
    one_way = sp.Add(*[c * terms[k][0] for c, k in pairs])
    other_way = sp.Add(*[c * terms[k][1] for c, k in pairs])
    assert _equal(one_way, other_way)
    for moved, _ in terms:
        assert not _equal(one_way, other_way + by * moved)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3).filter(bool), st.integers(0, 6)), min_size=1, max_size=4),
       st.integers(0, 7))
def test_the_field_check_says_zero_exactly_where_cancel_does(pairs, moved):
    """The rational check built in SymPy's field of fractions agrees with ``cancel(together(...))``
    on the stand-in form of random differences, zero (each term written its other way; not all are
    zero in that form, ``exp(2z)`` being a stand-in of its own) or not (one term's coefficient moved)."""
    import sympy as sp

    from derive.prove import _generators, _rational_zero

    terms = _norm_terms()
    difference = sp.Add(*[c * (terms[k][0] - terms[k][1]) for c, k in pairs])
    if moved < len(terms):
        difference += terms[moved][0]
    rational = difference.xreplace(_generators(difference))
    assert _rational_zero(rational) == (sp.cancel(sp.together(rational)) == 0)
    if moved < len(terms):
        assert not _rational_zero(rational)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3).filter(bool), st.integers(0, 6), st.integers(0, 6)), min_size=1,
                max_size=6))
def test_the_size_limit_counts_operations_only_past_the_limit(products):
    """A proof stops at ``PROOF_MAX_OPS`` operations (``sp.count_ops``). The node count it takes first
    is always above the operation count, so it never lets a larger expression through."""
    import sympy as sp

    import derive.prove as proving

    terms = [t for pair in _norm_terms() for t in pair]
    expr = sp.Add(*[c * terms[a] * terms[b] for c, a, b in products])
    operations = sp.count_ops(expr)
    assert operations < sum(1 for _ in sp.preorder_traversal(expr))
    limit = proving.PROOF_MAX_OPS
    try:
        proving.PROOF_MAX_OPS = operations - 1
        assert proving._operations_past_limit(expr) == operations
        proving.PROOF_MAX_OPS = operations
        assert proving._operations_past_limit(expr) == 0
    finally:
        proving.PROOF_MAX_OPS = limit


def test_a_sum_of_rows_is_zero_when_each_row_is():
    """``_groups_zero`` splits a difference into groups of terms that share no symbol but the ones
    every term reads, and holds each to zero: sufficient, never a proof of a nonzero sum."""
    import sympy as sp

    from derive.prove import _groups_zero

    g = sp.Symbol("g")
    (a0, b0), (a1, b1), (a2, b2) = (sp.symbols(f"a{k} b{k}", positive=True) for k in range(3))
    assert _groups_zero(sum(g * (a * b / (a + b) + b ** 2 / (a + b) - b) for a, b in ((a0, b0), (a1, b1), (a2, b2))))
    assert not _groups_zero(g * a0 / (a0 + b0) - g * a1 / (a1 + b1))  # not zero
    # zero as a whole, though neither row is (each is g): the test is only sufficient
    whole = g * (a0 / (a0 + b0) + b0 / (a0 + b0)) - g * (a1 / (a1 + b1) + b1 / (a1 + b1))
    assert sp.cancel(sp.together(whole)) == 0 and not _groups_zero(whole)
