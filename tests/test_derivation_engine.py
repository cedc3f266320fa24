"""The fused formulas come out of the derivation, in saved forward quantities."""
import sympy as sp
import pytest

from derive.kernel import build
from derive.layers import FUSED, batchnorm, batchnorm_biased, cross_entropy
from derive.symbolic import Red


def formula(kernel, name):
    return next(f for f in kernel.formulas if f.input == name)


def test_cross_entropy_is_softmax_minus_onehot_over_n():
    k = build(cross_entropy)
    f = formula(k, "logits")
    # Written in the saved probabilities only: the max-subtraction's contribution cancelled.
    assert {str(e.base) for e in f.element.atoms(sp.Indexed)} == {"probs", "y"}
    assert not f.element.atoms(Red)
    # the upstream gradient over n first, a number times a scalar, then one pass over (n, k)
    assert f.code == "(dloss/n)*(probs - (y.unsqueeze(-1) == torch.arange(k, device=y.device)).to(dloss.dtype))"
    assert k.saved == ["y", "probs"]


@pytest.mark.parametrize("spec", [batchnorm, batchnorm_biased])
def test_batchnorm_reads_xhat_inv_std_and_two_column_sums(spec):
    k = build(spec)
    dx = formula(k, "x")
    reads = {str(e.base) for e in dx.element.atoms(sp.Indexed)}
    assert reads == {"gamma", "bnvar_inv", "bnraw", "dout"}
    sums = {r.body for r in dx.element.atoms(Red)}
    assert len(sums) == 2  # dy.sum(0) and (dy*xhat).sum(0): no chain of intermediates
    assert set(k.saved) == {"gamma", "bnvar_inv", "bnraw"}


def test_bessel_and_biased_differ_exactly_by_the_correction():
    n = sp.Symbol("n", integer=True, positive=True)
    bessel, biased = formula(build(batchnorm), "x").element, formula(build(batchnorm_biased), "x").element
    assert sp.simplify(bessel - biased) != 0
    assert sp.simplify(bessel.xreplace({1 / (n - 1): 1 / n}) - biased) == 0


def test_dgamma_and_dbeta_are_column_sums():
    k = build(batchnorm)
    assert formula(k, "gamma").code == "sum_bnraw_dout.reshape(d,)"
    assert formula(k, "beta").code == "sum_dout.reshape(d,)"
    shared = {s.name: s.code for s in k.shared}
    assert shared == {"sum_bnraw_dout": "(bnraw*dout).sum(0, keepdim=True)", "sum_dout": "dout.sum(0, keepdim=True)"}


@pytest.mark.parametrize("spec", FUSED, ids=lambda s: s.name)
def test_generic_sizes_never_fixed(spec):
    k = build(spec)
    for f in k.formulas:
        sizes = {s for s in f.element.free_symbols if isinstance(s, sp.Symbol) and s.is_integer and s.is_positive}
        assert all(str(s) in spec.dims for s in sizes)


def test_a_layer_is_built_once_and_the_cache_of_kernels_is_bounded(monkeypatch):
    import derive.kernel as kernel
    from derive.layers import relu, sigmoid, tanh
    from derive.memo import ByObject

    built = []
    monkeypatch.setattr(kernel, "_BUILT", ByObject(maxsize=2))
    monkeypatch.setattr(kernel, "build", lambda layer: built.append(layer.name) or build(layer))
    first = kernel.build_cached(tanh)
    assert kernel.build_cached(tanh) is first and built == ["tanh"]
    kernel.build_cached(relu)
    kernel.build_cached(tanh)  # the most recently used stays
    kernel.build_cached(sigmoid)
    assert len(kernel._BUILT) == 2 and built == ["tanh", "relu", "sigmoid"]
    kernel.build_cached(relu)  # the least recently used went
    assert built == ["tanh", "relu", "sigmoid", "relu"]
