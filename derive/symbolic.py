"""Index calculus on SymPy: tensor elements at generic indices, reductions as canonical atoms.

A tensor element is ``Indexed(base, *indices)``; an index is a SymPy ``Idx`` whose upper bound
carries the dimension (``Idx('i_n', n)`` runs over ``0..n-1``). A sum over one axis is the atom
``Red(body, j)``. Every ``Red`` is kept canonical the moment it is built (in ``Red.eval``):

* linearity: ``Red(a + b) = Red(a) + Red(b)`` and ``Red(c*a) = c*Red(a)`` for ``c`` free of ``j``;
* ``Red(c) = extent(j) * c`` for a body free of ``j``;
* Kronecker collapse: ``Red(delta(j, e) * f(j)) = f(e)``;
* the bound index is renamed to a canonical one (``_r<depth>_<dim>``), so identical bodies give
  identical atoms and ``S - n*(S/n)`` is zero to SymPy with no special rule.

``Max(body, j)`` is the (non-linear) maximum over an axis; its derivative is the reduction of the
body's derivative against ``IsArgmax(j, max)``, the one-hot of the position of the maximum.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import sympy as sp
from sympy.core.function import AppliedUndef

_EXPAND = dict(power_exp=False, power_base=False, log=False, mul=True, multinomial=True, deep=True)


@lru_cache(maxsize=16384)  # (pure; the refold expands the same candidates' parts again and again)
def expand(expr: sp.Expr) -> sp.Expr:
    """Expand products and positive integer powers of sums in numerators, never ``exp``/``log``/power
    bases, nor denominators.

    A fractional power of a sum stays whole (its base expanded): SymPy writes ``(v**2 + 1)**(-3/2)``
    as ``1/(sqrt(v**2 + 1)*v**2 + sqrt(v**2 + 1))``, a sum of terms that overflow where the power
    does not, with a size coefficient multiplied into each. So does a reciprocal of a sum: SymPy
    multiplies a product of denominators out, ``1/((v**2 + 1)*(h**2 + 1))`` as
    ``1/(h**2*v**2 + h**2 + v**2 + 1)``, where each factor is a tensor the forward saved or the
    backward computes once (the derivative of ``log(tanh(log(v**2 + 1))**2 + 1)``), and a named
    sum then matches only some of its terms (``t3 + h**2*v**2 + h**2`` with ``t3 = v**2 + 1``), so
    that terms which cancel are no longer seen to (a maximum's zero adjoint: its one-hot computed).
    Each factor is kept, its base expanded, and terms over one denominator stay alike."""
    whole = {p: sp.Dummy() for p in outside_sums(expr, sp.Pow)
             if p.base.is_Add and p.exp.is_Rational and (p.exp.is_negative or not p.exp.is_Integer and abs(p.exp) > 1)}
    if not whole:
        return sp.expand(expr, **_EXPAND)
    back = {d: sp.Pow(expand(p.base), p.exp) for p, d in whole.items()}
    return sp.expand(expr.xreplace(whole), **_EXPAND).xreplace(back)


def reciprocal_root_power(e: sp.Expr) -> int | None:
    """``k`` for ``e = q**(-k/2)`` with ``k`` odd and above 1 (a float exponent read as its fraction),
    else None. The printers write it ``rsqrt(q)**k``, as autograd's rsqrt backward does
    (``rsqrt(q)**3``): ``q**1.5`` overflows float32 from q = 5e25, where ``rsqrt(q)**3`` is a
    subnormal, not 0."""
    exponent = _exponent_of(e)
    if exponent is not None and exponent.is_Rational and exponent.q == 2 and exponent.p < -1:
        return int(-exponent.p)
    return None


def _exponent_of(e: sp.Expr) -> sp.Expr | None:
    """The exponent of the power ``e`` (a float one read as its fraction), or None for anything else."""
    if not e.is_Pow:
        return None
    return sp.Rational(float(e.exp)) if e.exp.is_Float else e.exp


def reciprocal_integer_power(e: sp.Expr) -> int | None:
    """``m`` for ``e = q**(-m)`` with ``m`` a whole number above 1, else None. The printers write it
    ``(1/q)**m``: ``1/q**m`` overflows float32 where ``q**m`` passes 3.4e38 (``1/(c**2 + 1)**2`` from
    c = 1e10, a gradient autograd gets as ``rsqrt(c**2 + 1)**4``), and comes out 0 where the value is
    a subnormal, as ``(1/q)**m`` is."""
    exponent = _exponent_of(e)
    if exponent is not None and exponent.is_Integer and exponent < -1:
        return int(-exponent)
    return None


def power_steps(m: int) -> list[int] | None:
    """The squarings and cubings, innermost first, that raise a value to the whole power ``m``
    (``[3, 2]`` for 6: ``(x**3)**2``), or None where ``m`` has another prime factor. torch computes a
    tensor squared or cubed as multiplications and any other whole power through the C library's
    ``pow``, element by element: ``x**8`` takes ten times ``x*x`` (512 x 512, float32)."""
    steps = []
    for p in (3, 2):
        while m % p == 0 and m > 1:
            steps.append(p)
            m //= p
    return steps if m == 1 else None


def multiplied_reciprocal(e: sp.Expr) -> bool:
    """Whether the power ``e`` is multiplied as a power of a reciprocal (``rsqrt(q)**3``,
    ``(1/q)**2``) rather than divided by (``reciprocal_root_power``, ``reciprocal_integer_power``)."""
    return bool(reciprocal_root_power(e) or reciprocal_integer_power(e))


def reciprocal_roots(product: sp.Expr, keep=lambda base: True) -> tuple[sp.Expr, list]:
    """``(rest, roots)`` of a product: its factors ``q**(-k/2)`` and ``q**(-m)``
    (``multiplied_reciprocal``) whose base ``keep`` takes, and the product of the others. Printed as
    the rest times ``rsqrt(q)**k`` or ``(1/q)**m``: SymPy's printers would divide by ``q**(k/2)``."""
    roots = [f for f in product.args if multiplied_reciprocal(f) and keep(f.base)]
    return sp.Mul(*[f for f in product.args if f not in roots]), roots


def outside_sums(expr: sp.Expr, kind) -> set:
    """The subexpressions of type ``kind`` that no reduction binds an index of (a sum's body is
    expanded when the sum is built, where its index is bound)."""
    if isinstance(expr, _Bound):
        return set()
    found = {expr} if isinstance(expr, kind) else set()
    for a in expr.args:
        found |= outside_sums(a, kind)
    return found


def extent(index: sp.Idx) -> sp.Expr:
    """The number of values ``index`` runs over."""
    return index.upper + 1


def free_indices(expr: sp.Expr) -> set:
    """The indices ``expr`` is a function of (those its sums bind are not free)."""
    return {s for s in expr.free_symbols if isinstance(s, sp.Idx)}


def index_for(name: str, size: sp.Expr) -> sp.Idx:
    """An index called ``name`` running over ``0..size-1``."""
    return sp.Idx(name, size)


def _depth(expr: sp.Expr) -> int:
    """Nesting depth of reductions inside ``expr`` (used to give bound indices canonical names)."""
    depths = [a.depth for a in expr.atoms(Red, Max)]
    return max(depths, default=0)


def _canonical_index(body: sp.Expr, j: sp.Idx) -> sp.Idx:
    return sp.Idx(f"_r{_depth(body) + 1}_{sp.sstr(extent(j))}", extent(j))


def _rename(body: sp.Expr, old: sp.Idx, new: sp.Idx) -> sp.Expr:
    return body.xreplace({old: new})


def _replace_free(expr: sp.Expr, old: sp.Idx, new: sp.Expr) -> sp.Expr:
    """``expr`` with the index ``old`` replaced by ``new`` where it is free: a reduction inside that
    binds an index of the same name (canonical names repeat at equal depths) keeps its own."""
    if isinstance(expr, _Bound) and expr.args[1] == old:
        return expr
    if expr == old:
        return new
    if not expr.args:
        return expr
    args = [_replace_free(a, old, new) for a in expr.args]
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr


class _Bound(sp.Function):
    """Shared behaviour of an atom that binds index ``args[1]`` inside body ``args[0]``."""

    @property
    def body(self) -> sp.Expr:
        return self.args[0]

    @property
    def index(self) -> sp.Idx:
        return self.args[1]

    @property
    def depth(self) -> int:
        return _depth(self.body) + 1

    @property
    def free_symbols(self):
        return self.body.free_symbols - {self.index} | extent(self.index).free_symbols

    def _eval_is_real(self):
        return self.body.is_real


class Red(_Bound):
    """``Red(body, j)``: the sum of ``body`` over ``j = 0..extent(j)-1``, canonical on construction."""

    nargs = 2

    @classmethod
    def eval(cls, body, j):
        if body == 0:
            return sp.S.Zero
        expanded = expand(body)
        if isinstance(expanded, sp.Add):
            return sp.Add(*[cls(term, j) for term in expanded.args])
        factors = sp.Mul.make_args(expanded)
        inside = [f for f in factors if j in f.free_symbols]
        outside = [f for f in factors if j not in f.free_symbols]
        if not inside:
            return extent(j) * expanded
        for f in inside:
            if isinstance(f, sp.KroneckerDelta):
                other = f.args[1] if f.args[0] == j else f.args[0] if f.args[1] == j else None
                if other is not None and j not in other.free_symbols:
                    rest = sp.Mul(*[g for g in factors if g is not f])
                    return _replace_free(rest, j, other)
        mark = inside[0] if len(inside) == 1 and isinstance(inside[0], IsArgmax) else None
        if mark is not None and mark.args[0] == j and isinstance(mark.args[1], Max) \
                and j not in mark.args[1].free_symbols and extent(mark.args[1].index) == extent(j):
            # the one-hot of the maximum's position summed along its own axis: one position holds
            # all of it (``max(dim)``), or the tied ones share it (``amax``)
            return sp.Mul(*outside)
        if outside:
            return sp.Mul(*outside) * cls(sp.Mul(*inside), j)
        if expanded != body:
            return cls(expanded, j)
        canonical = _canonical_index(body, j)
        if canonical != j:
            return cls(_rename(body, j, canonical), canonical)
        return None

    def _eval_derivative(self, s):
        return Red(sp.diff(self.body, s), self.index)

    def _eval_is_positive(self):
        return self.body.is_positive

    def _eval_is_nonnegative(self):
        return self.body.is_nonnegative

    def _latex(self, printer):
        return r"\sum_{%s} %s" % (printer._print(self.index), printer.parenthesize(self.body, 40))


class GroupedRed(Red):
    """A sum over ``j`` whose body is kept whole: ``sum_j (a_j - b_j)``, where ``Red`` would split
    it into ``sum_j a_j - sum_j b_j`` (the canonical form the derivation needs to see cancellations).

    The closed form groups sums that share everything else into one (``simplify.group_sums``): in
    floating point a sum of differences keeps the digits a difference of two large sums loses, and
    it is one pass over memory instead of two. Printed, proven and documented as any ``Red``."""

    @classmethod
    def eval(cls, body, j):
        if body == 0:
            return sp.S.Zero
        if j not in body.free_symbols:
            return extent(j) * body
        factors = sp.Mul.make_args(body)
        outside = [f for f in factors if j not in f.free_symbols]
        if outside:
            return sp.Mul(*outside) * cls(sp.Mul(*[f for f in factors if j in f.free_symbols]), j)
        canonical = _canonical_index(body, j)
        if canonical != j:
            return cls(_rename(body, j, canonical), canonical)
        return None


class Max(_Bound):
    """``Max(body, j)``: the maximum of ``body`` over ``j``."""

    nargs = 2

    @classmethod
    def eval(cls, body, j):
        if j not in body.free_symbols:
            return body
        canonical = _canonical_index(body, j)
        if canonical != j:
            return cls(_rename(body, j, canonical), canonical)
        return None

    def _eval_derivative(self, s):
        j = self.index
        return Red(IsArgmax(j, self) * sp.diff(self.body, s), j)

    def _latex(self, printer):
        return r"\max_{%s} %s" % (printer._print(self.index), printer.parenthesize(self.body, 40))


class IsArgmax(sp.Function):
    """``IsArgmax(j, m)``: 1 where ``j`` is the (first) position of the maximum ``m``, else 0."""

    nargs = 2

    def _eval_derivative(self, s):
        return sp.S.Zero

    def _eval_is_nonnegative(self):
        return True

    def _latex(self, printer):
        return r"\mathbb{1}[%s = \operatorname{argmax}]" % printer._print(self.args[0])


class TiedMax(Max):
    """``TiedMax(body, j)``: the maximum as ``amax`` takes it. Its gradient is shared evenly among
    the positions that tie for it, as autograd's ``amax`` shares it (``max(dim)`` gives all of it
    to the one index it returns): ties are common in float32 (saturated, quantized, large inputs)."""

    def _eval_derivative(self, s):
        j = self.index
        return Red(IsTiedMax(j, self) * sp.diff(self.body, s), j)

    def _latex(self, printer):
        return r"\operatorname{amax}_{%s} %s" % (printer._print(self.index), printer.parenthesize(self.body, 40))


class IsTiedMax(IsArgmax):
    """``IsTiedMax(j, m)``: ``1/c`` where ``j`` is one of the ``c`` positions equal to the maximum
    ``m``, else 0 (without ties, ``IsArgmax``)."""

    def _latex(self, printer):
        return r"\frac{\mathbb{1}[%s \in \operatorname{argmax}]}{|\operatorname{argmax}|}" % printer._print(self.args[0])


def maximum_of(ties: str | None) -> type[Max]:
    """The maximum a traced ``max`` node takes: ``amax``'s (``ties="shared"``) or ``max(dim)``'s."""
    return TiedMax if ties == "shared" else Max


def hide_argmax(expr: sp.Expr) -> tuple[sp.Expr, Callable[[sp.Expr], sp.Expr]]:
    """``expr`` with each ``IsArgmax(j, Max(body, r))`` replaced by an opaque function of its free
    indices, and the function that puts them back.

    The one-hot is printed from the maximum's definition (the argmax of what was maximised), so
    rewrites must leave it alone: recognising ``Max(x, r)`` as the saved ``v1``, or refold writing
    ``v1`` as ``atanh(t1)``, would leave nothing to take the argmax of. A rewrite may rename the
    indices (a sum binds ``i_k`` as ``_r1_k``): they are put back renamed the same way.
    """
    hidden, marks = {}, {}
    for k, mark in enumerate(sorted(expr.atoms(IsArgmax), key=sp.default_sort_key)):
        indices = sorted((i for i in mark.free_symbols if isinstance(i, sp.Idx)), key=sp.default_sort_key)
        function = sp.Function(f"_argmax{k}")
        hidden[mark] = function(*indices)
        marks[function.__name__] = (mark, indices)

    def restore(e: sp.Expr) -> sp.Expr:
        def hides(f):
            return isinstance(f, AppliedUndef) and f.func.__name__ in marks

        def back(f):
            mark, indices = marks[f.func.__name__]
            return mark.xreplace(dict(zip(indices, f.args)))

        return e.replace(hides, back) if marks else e

    return expr.xreplace(hidden), restore


class AxisSum(_Bound):
    """The sum over the axis of ``j``, kept as written (no linearity, no renaming).

    Forward passes are printed from these: the bound index is the dimension's own index, so the
    summed body is the same expression as the full-size value it is computed from.
    """

    nargs = 2

    @classmethod
    def eval(cls, body, j):
        if body.is_number:  # a value that cancelled (``(x - x).sum(0)``): no tensor to sum
            return extent(j) * body


class AxisMax(_Bound):
    """The maximum over the axis of ``j``, kept as written."""

    nargs = 2

    @classmethod
    def eval(cls, body, j):
        if body.is_number:
            return body


class AxisSoftmax(_Bound):
    """``softmax(body)`` along the axis of ``j``, read at ``j`` (a forward value as written: one
    ``torch.softmax``). ``j`` is the element's own index and the one the softmax runs over."""

    nargs = 2

    @property
    def free_symbols(self):
        return self.body.free_symbols | extent(self.index).free_symbols


class AxisLogSoftmax(AxisSoftmax):
    """``log_softmax(body)`` along the axis of ``j``, read at ``j``."""


class AxisLogSumExp(_Bound):
    """``logsumexp(body)`` over the axis of ``j`` (a reduction, as written: one ``torch.logsumexp``)."""

    nargs = 2


class AxisVar(_Bound):
    """``var(body)`` over the axis of ``j`` with ``correction`` (a reduction, as written: one
    ``torch.var``, which accumulates in double where the sums written out would round in the
    tensor's dtype)."""

    nargs = 3

    @property
    def correction(self) -> sp.Expr:
        return self.args[2]


def reindex(expr: sp.Expr, mapping: dict) -> sp.Expr:
    """``expr`` with its free indices replaced at once by ``mapping`` (``{i_n: j_n, j_n: i_n}`` swaps them).

    An index bound by a sum or maximum as written (``AxisSum``, ``AxisMax``, whose bound index may
    be a dimension's own) is left alone inside it, and renamed first where a replacement would
    otherwise be captured by it (``x[i_n, i_k] - AxisSum(x[i_n, i_k], i_n)`` read at
    ``i_k = y[i_n]``). ``Red`` and ``Max`` bind canonical indices no mapping names.
    """
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return expr
    if not expr.has(AxisSum, AxisMax, AxisLogSumExp, AxisVar, AxisSoftmax):
        return expr.xreplace(mapping)
    return _reindex(expr, mapping)


def _reindex(expr: sp.Expr, mapping: dict) -> sp.Expr:
    if isinstance(expr, AxisSoftmax):  # its index is the element's own: renamed with it
        j = mapping.get(expr.index, expr.index)
        if not isinstance(j, sp.Idx):
            raise ValueError(f"{expr} read at {j}")  # a pick of a softmax: kept as a tensor first (forward_plan)
        return expr.func(_reindex(expr.body, {**mapping, expr.index: j}), j)
    if isinstance(expr, (AxisSum, AxisMax, AxisLogSumExp, AxisVar)):
        j, body = expr.index, expr.body
        inner = {k: v for k, v in mapping.items() if k != j}
        if not inner:
            return expr
        reached = set().union(*[getattr(v, "free_symbols", set()) for v in inner.values()])
        if j in reached:  # a replacement would be captured: rename the bound index first
            taken = body.free_symbols | reached
            fresh = next(i for i in (sp.Idx(f"{j.name}{'_b' * k}", j.upper + 1) for k in range(1, 99)) if i not in taken)
            body, j = _reindex(body, {j: fresh}), fresh
        return expr.func(_reindex(body, inner), j, *expr.args[2:])
    if expr in mapping:
        return mapping[expr]
    if not expr.args or isinstance(expr, (sp.IndexedBase, sp.Idx)):
        return expr
    return expr.func(*[_reindex(a, mapping) for a in expr.args])


def pick(expr: sp.Expr, index: sp.Idx, value: sp.Expr) -> sp.Expr:
    """``expr`` with ``index`` set to ``value`` (a label), except inside a sum or max over ``index``."""
    return reindex(expr, {index: value})


def is_contraction(red: "Red") -> bool:
    """Whether ``red`` sums a product of tensors read at different indices (a matrix product,
    ``sum_r dout[i, r]*W[j, r]``) rather than an elementwise product or a single tensor."""
    tensors = [set(f.indices) - {0} for f in sp.Mul.make_args(red.body) if isinstance(f, sp.Indexed)]
    every = set().union(*tensors) if tensors else set()
    return len(tensors) >= 2 and not any(t == every for t in tensors)


def reductions(expr: sp.Expr) -> set:
    """All reduction atoms (``Red`` and ``Max``) in ``expr``, nested ones included."""
    return expr.atoms(Red, Max)


def bases(expr: sp.Expr) -> set[str]:
    """Names of every tensor read by ``expr`` (inside reductions too)."""
    return {str(e.base) for e in expr.atoms(sp.Indexed)}


def substitute_family(expr: sp.Expr, base: sp.IndexedBase, indices: tuple, value: sp.Expr) -> sp.Expr:
    """Replace every element ``base[e0, e1, ...]`` by ``value`` with ``indices`` set to ``e0, e1, ...``.

    Reductions are rebuilt on the way, so they stay canonical.
    """
    def is_element(e):
        return isinstance(e, sp.Indexed) and e.base == base

    def element_value(e):
        return value.xreplace(dict(zip(indices, e.indices)))

    if not (value.atoms(Red, Max) and expr.atoms(Red, Max)):
        return expr.replace(is_element, element_value)
    # canonical names repeat (``_r1_d`` in every innermost sum over d): an element read at an
    # enclosing sum's index, replaced by a value holding a sum of its own over the same size, would
    # have that sum capture it (``sum_d (sum_i x*A[i, d])*x[d]`` read as ``A[_r1_d, _r1_d]``). The
    # enclosing sums are renamed apart first, then every reduction is rebuilt canonical.
    # (only the reductions around an element of ``base`` are renamed and rebuilt: the others come
    # back as they were, canonical already, and rebuilding one expands its body again)
    apart = _bound_apart(expr, base).replace(is_element, element_value)
    return apart.replace(lambda e: isinstance(e, (Red, Max)) and isinstance(e.index.label, _Apart),
                         lambda e: type(e)(*e.args))


class _Apart(sp.Dummy):
    """The index of a reduction renamed apart (``_bound_apart``), to be made canonical again."""


def _bound_apart(expr: sp.Expr, base: sp.IndexedBase) -> sp.Expr:
    """``expr`` with the index of each sum and maximum around an element of ``base`` renamed to a
    fresh one (not canonical)."""
    if not expr.has(base):
        return expr
    if isinstance(expr, (Red, Max)):
        j = expr.index
        fresh = sp.Idx(_Apart(f"b_{j.name}", integer=True), extent(j))
        return type(expr)(_bound_apart(_rename(expr.body, j, fresh), base), fresh, evaluate=False)
    if not expr.args or isinstance(expr, sp.Indexed) and not expr.atoms(Red, Max):
        return expr
    args = [_bound_apart(a, base) for a in expr.args]
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr
