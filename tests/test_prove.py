"""Proof on small symbolic matrices, and that the proof can fail."""
import math

import pytest

from derive.kernel import build
from derive.layers import FUSED, batchnorm
from derive.prove import ProofFailure, default_sizes, prove
from derive.spec import concrete_shape


@pytest.mark.parametrize("spec", FUSED, ids=lambda s: s.name)
def test_fused_formula_equals_elementwise_derivative(spec):
    kernel = build(spec)
    sizes = default_sizes(kernel)
    firsts = [s[spec.dims[0]] for s in sizes]
    assert firsts[:2] == [2, 3] and firsts == sorted(set(firsts))  # two sizes at least, each once
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
    assert len(report.proofs) == 1  # the larger sizes are not tried
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
