"""The index-calculus core: reductions stay canonical, so identities fall out of linearity."""
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
