"""The index-calculus core: reductions stay canonical, so identities fall out of linearity."""
import math

import sympy as sp

from derive.symbolic import Red, expand, index_for

n, d = sp.symbols("n d", integer=True, positive=True)
i, j, p = index_for("i_n", n), index_for("j_n", n), index_for("p_n", n)
c = index_for("i_d", d)
x = sp.IndexedBase("x", real=True)
m = sp.IndexedBase("m", real=True)
dy = sp.IndexedBase("dy", real=True)


def test_identical_bodies_give_identical_atoms():
    assert Red(x[i, c], i) == Red(x[j, c], j)
    assert Red(x[i, c], i) - n * (Red(x[j, c], j) / n) == 0


def test_linearity_splits_sums_and_pulls_out_invariants():
    assert Red(x[i, c] + 2 * m[0, c], i) == Red(x[j, c], j) + 2 * n * m[0, c]
    assert Red(m[0, c] * x[i, c], i) == m[0, c] * Red(x[j, c], j)


def test_constant_body_multiplies_by_the_extent():
    assert Red(m[0, c], i) == n * m[0, c]


def test_centred_values_sum_to_zero_once_the_mean_is_inlined():
    mean = Red(x[j, c], j) / n
    assert Red(x[i, c] - mean, i) == 0


def test_kronecker_delta_collapses():
    assert Red(sp.KroneckerDelta(i, p) * x[i, c] ** 2, i) == x[p, c] ** 2


def test_derivative_of_a_reduction_is_the_reduction_of_the_derivative():
    s = Red(x[i, c] ** 2, i)
    assert sp.diff(s, x[p, c]) == 2 * x[p, c]


def test_expand_keeps_exp_whole():
    a, b = sp.symbols("a b", real=True)
    assert expand(sp.exp(a + b) * (a + b)) == a * sp.exp(a + b) + b * sp.exp(a + b)


def test_nested_reductions_get_distinct_canonical_indices():
    inner = Red(x[j, c] * dy[j, c], j)
    outer = Red(x[i, c] * inner * x[i, c], i)
    assert outer == inner * Red(x[i, c] ** 2, i)


def test_hidden_one_hots_come_back_with_their_indices_renamed():
    """A rewrite may rename a hidden one-hot's indices (a sum binds ``i_n`` under another name):
    it must come back as the one-hot at the new indices, not stay an opaque function."""
    from sympy.core.function import AppliedUndef

    from derive.symbolic import IsArgmax, Max, hide_argmax

    k = index_for("k_d", d)
    mark = IsArgmax(c, Max(x[i, k], k))
    expr = mark * dy[i, c]
    hidden, restore = hide_argmax(expr)
    assert not hidden.atoms(IsArgmax) and hidden.atoms(AppliedUndef)
    assert restore(hidden) == expr
    renamed = restore(hidden.xreplace({i: j}))
    assert renamed == expr.xreplace({i: j}) and not renamed.atoms(AppliedUndef)


def test_the_one_hot_of_a_maximum_sums_to_one_along_its_axis():
    """``sum_c 1[c = argmax_k x[i, k]] = 1`` (one position holds all of it; tied ones share it),
    so a shift by a maximum cancels from a gradient; the one-hot of another axis of the same
    size, or summed at a position it does not vary with, is not one."""
    from derive.symbolic import IsArgmax, IsTiedMax, Max, TiedMax

    k = index_for("k_d", d)
    for mark, largest in ((IsArgmax, Max), (IsTiedMax, TiedMax)):
        assert Red(mark(c, largest(x[i, k], k)) * dy[i, 0], c) == dy[i, 0]
    assert Red(IsArgmax(c, Max(x[i, k], k)) * dy[i, c], c) != dy[i, 0]  # a weighted pick, not a sum of ones
    q = index_for("q_n", n)
    across = Red(IsArgmax(q, Max(x[i, k], k)), q)  # n positions against a maximum over d
    assert isinstance(across, Red)


def _captured(expr) -> list:
    """Elements read at one index twice (``w[_r1_h, _r1_h]``): a sum that took another's index."""
    return [e for e in expr.atoms(sp.Indexed) if len(set(e.indices)) < len(e.indices)]


def test_grouping_sums_keeps_an_inner_sum_apart():
    """``sum_h a[n, h]*w[h] - sum_h (sum_k u[k, h]*v[n, k])*w[h]``: grouped into one sum, the second
    member's own index (``_r2_h``, above its inner sum's ``_r1_h``) renamed to the first member's
    ``_r1_h`` would make the inner sum read ``u[_r1_h, _r1_h]`` (a GRU cell's document once did)."""
    from derive.simplify import group_sums

    h = sp.Symbol("h", integer=True, positive=True)
    a, u, v, w, z = (sp.IndexedBase(name, real=True) for name in "auvwz")
    k1, k2, k3, k4 = (index_for(f"k{q}_h", h) for q in (1, 2, 3, 4))
    first = Red(a[i, k1] * w[k1], k1)
    second = Red(Red(u[k2, k3] * v[i, k2], k2) * w[k3], k3)
    third = Red(Red(Red(u[k2, k3] * v[i, k2], k2) * z[k3, k4], k3) * w[k4], k4)
    assert len({first.index, second.index, third.index}) == 3  # canonical: depth 1, 2 and 3
    grouped = group_sums(first - second + third)  # whichever member names the group, another nests it
    assert not _captured(grouped) and len(grouped.atoms(Red)) == 3, grouped


def test_substituting_a_value_with_a_sum_into_a_sum_over_the_same_size():
    """``((x @ A) * x).sum(-1)`` written out: the element ``t[n, _r1_d]`` of the outer sum replaced by
    ``sum_d x[n, d]*A[d, e]`` keeps both sums: ``sum_e (sum_d x*A[d, e])*x[n, e]``, not ``A[_r1_d, _r1_d]``."""
    from derive.symbolic import substitute_family

    A, t = sp.IndexedBase("A", real=True), sp.IndexedBase("t", real=True)
    e1, e2 = index_for("e1_d", d), index_for("e2_d", d)
    value = Red(x[i, e2] * A[e2, c], e2)  # t[i, c] = sum over the second d of x[i, .]*A[., c]
    line = Red(t[i, e1] * x[i, e1], e1)
    written = substitute_family(line, t, (i, c), value)
    assert not _captured(written) and len(written.atoms(Red)) == 2, written


def test_a_function_of_torch_at_a_number_is_a_number_that_compares():
    """``Clamp(Softplus(13/5), -1, 1/2)`` (a clamped softplus at an example's number) raised
    "Softplus(13/5) is not comparable" in a random layer's run: the functions the engine defines
    evaluate at numbers, so a clamp, a maximum or a sign of them is decided."""
    from derive.functions import Clamp, Logit, Sigmoid, Softplus

    x = sp.Rational(13, 5)
    assert Clamp(Softplus(x), -1, sp.Rational(1, 2)) == sp.Rational(1, 2)
    assert Clamp(Softplus(-x), -1, sp.Rational(1, 2)) == Softplus(-x)
    assert abs(float(Softplus(x)) - math.log1p(math.exp(2.6))) < 1e-12
    assert abs(float(Sigmoid(x)) - 1 / (1 + math.exp(-2.6))) < 1e-12
    assert abs(float(Logit(sp.Rational(1, 3))) - math.log(0.5)) < 1e-12
    assert sp.Max(Sigmoid(x), sp.Rational(1, 2)) == Sigmoid(x)
