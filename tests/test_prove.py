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
