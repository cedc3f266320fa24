"""From a gradient in normal form to the fused closed form, written in saved forward quantities.

1. *Refold.* A normal-form gradient reads inputs and opaque nodes (``x``, ``bnmeani``, ``bnvar``).
   Any elementwise forward node ``N = D(..., V, ...)`` that can be solved for one variable ``V``
   (``bnraw = (x - bnmeani)*(bnvar + eps)**-1/2`` gives ``x = bnraw*sqrt(bnvar + eps) + bnmeani``)
   may replace ``V`` everywhere, reductions included. We apply, greedily, the replacement that
   makes the formula cheapest, until none helps. Cheap means few operations and few tensors read;
   that is how ``bnraw``, ``bnvar_inv`` and ``probs`` are chosen, not by name.
2. *Closed form.* Collect the terms by their tensor part, factor their size-only coefficients, and
   pull out the common tensor factor and the common size factor: ``gamma*bnvar_inv/n*(n*dout - ...)``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp
from sympy.solvers.solvers import _invert

from .elements import Elements
from .errors import DerivationError
from .functions import NOT_INVERTIBLE
from .symbolic import bases, expand, hide_argmax, reductions, substitute_family
from .trace import Node


def tidy(el: Elements, expr: sp.Expr, log: list | None = None) -> sp.Expr:
    """Canonical sum of terms: combine exponentials, expand, recognize known reductions (into ``log``)."""
    expr = sp.powsimp(expand(expr), combine="exp")
    return el.recognize(expand(expr), log)


def scalars(el: Elements) -> set:
    """Symbols that are plain numbers at run time: sizes and declared constants."""
    return set(el.graph.sizes.values()) | set(el.graph.constants.values())


COST_EXACT_MAX_OPS = 2000  # the built-in layers' largest candidate has about 420 (GELU's dx)


def cost(el: Elements, expr: sp.Expr) -> int:
    """What the generated code pays: operations, plus each tensor it has to read.

    Counted on the closed form the printer would write; a candidate too large for that to be cheap
    (thousands of operations, from nested softmaxes: seconds each) is counted as it stands."""
    size = sp.count_ops(expr)
    printed = size if size > COST_EXACT_MAX_OPS else sp.count_ops(closed_form(expr, scalars(el)))
    return printed + 2 * len(bases(expr))


def _solve(el: Elements, node: Node, reads: tuple[set, set]):
    """Ways to rewrite an expression with ``node``: [(variable node, its element, solution)].

    ``reads`` is what the expression reads (``_reads``): the tensors' bases and the free symbols.
    Both the inlined and the one-level definition are tried, so a formula already written in
    ``bndiff`` can still move on to ``bnraw = bndiff*bnvar_inv``.
    """
    result = []
    for definition in dict.fromkeys([el.nf[node], el.direct(node)]):
        if not reductions(definition):
            result += _solve_definition(el, node, definition, reads)
    return result


def _reads(expr: sp.Expr) -> tuple[set, set]:
    """The bases of the tensors ``expr`` reads, and its free symbols: taken once per refold step,
    since every candidate node's solutions are filtered by them (``expr`` may be large)."""
    return {e.base for e in expr.atoms(sp.Indexed)}, expr.free_symbols


def _solve_definition(el: Elements, node: Node, definition: sp.Expr, reads: tuple[set, set]):
    own = {i for i in el.free(node) if i != 0}
    elements = sorted(definition.atoms(sp.Indexed), key=sp.default_sort_key)
    plain = {e: sp.Dummy(str(e.base), **e.base.assumptions0) for e in elements}
    scalars = [s for s in definition.free_symbols if isinstance(s, sp.Symbol) and not isinstance(s, sp.Idx)]
    read_bases, read_symbols = reads
    result = []
    for variable in el.graph.nodes:
        if variable is node or variable.op == "labels":
            continue
        base = el.base(variable)
        mine = [e for e in elements if e.base == base]
        if isinstance(base, sp.Symbol):
            if base not in scalars or own:
                continue
            target, symbol = base, base
        else:
            if len(mine) != 1 or not own <= set(mine[0].indices):
                continue
            if any(isinstance(i, sp.Indexed) for i in mine[0].indices):
                continue  # x[i_n, y[i_n]] is one entry per row: solving for it says nothing of x[i_n, i_k]
            target, symbol = mine[0], plain[mine[0]]
        if base not in read_bases and target not in read_symbols:
            continue
        # Invert only definitions that read the variable once: a unique chain of inverses, fast to
        # solve (``x`` in ``bnraw = (x - bnmeani)*bnvar_inv``); not ``x + x**3`` or ``tanh(x) * x``.
        if definition.xreplace(plain).count(symbol) != 1:
            continue
        if any(f.has(target) for f in definition.atoms(*NOT_INVERTIBLE)):
            continue
        value = sp.Dummy(node.name, **el.base(node).assumptions0) if node.shape else el.ref(node)
        solution = _unique_inverse(definition.xreplace(plain), symbol, value)
        if solution is None:
            continue
        back = {d: e for e, d in plain.items()}
        if node.shape:
            back[value] = el.ref(node)
        solution = solution.xreplace(back)
        if _divides_by_maybe_zero(el, solution):
            continue  # x = v2/v1 from v2 = x*v1 is wrong (0/0) wherever v1 is 0, e.g. a zero-initialized bias
        result.append((variable, target, solution))
    return result


def _unique_inverse(definition: sp.Expr, symbol: sp.Symbol, value: sp.Expr) -> sp.Expr | None:
    """``symbol`` from ``value = definition``, when exactly one real solution exists; else None.

    The symbol occurs once, so undoing the outer operations one by one is the solution (``tanh``'s
    inverse is ``atanh``). SymPy's ``_invert`` stops at a power; a power ``b**(±1/q)`` has the one
    inverse ``b = value**(±q)`` (``bnvar_inv = (bnvar + eps)**-1/2`` gives ``bnvar = bnvar_inv**-2 - eps``),
    while ``b**2`` has two (±) and ``b**3`` a real cube root torch cannot take of a negative value.
    Not ``sp.solve``: it finds the same, but checks candidate roots by simplification, which takes
    minutes on nested definitions such as ``log(tanh(v)**2 + 1)``.
    """
    rhs, lhs = _invert(definition - value, symbol)
    while lhs != symbol:
        if not (lhs.is_Pow and lhs.exp.is_Rational and abs(lhs.exp.p) == 1 and lhs.exp != 0):
            return None
        rhs, lhs = _invert(lhs.base - rhs ** (1 / lhs.exp), symbol)
    return rhs


def _divides_by_maybe_zero(el: Elements, expr: sp.Expr) -> bool:
    """True when ``expr`` divides by a tensor quantity not known to be non-zero."""
    for p in expr.atoms(sp.Pow):
        base, e = p.as_base_exp()
        if e.is_negative and not base.free_symbols <= el.nonzero_scalars() and base.is_zero is not False:
            return True
    return False


def _rewrite(el: Elements, expr: sp.Expr, variable: Node, target, solution: sp.Expr,
             log: list | None = None) -> sp.Expr:
    if isinstance(target, sp.Symbol):
        return tidy(el, expr.xreplace({target: solution}), log)
    indices = tuple(i for i in target.indices)
    return tidy(el, substitute_family(expr, target.base, indices, solution), log)


@dataclass
class Rewrite:
    """One refold step, kept for the derivation document: ``node``'s definition solved for
    ``variable`` (``target = solution``) and substituted everywhere."""

    node: Node
    variable: Node
    target: sp.Expr  # the variable's element (or symbol) that was replaced
    solution: sp.Expr
    before: sp.Expr  # the formula before the substitution
    after: sp.Expr  # and after it, tidied
    recognized: list  # [(reduction, value)] recognised while tidying
    cost: tuple[int, int]  # (before, after)


def refold(el: Elements, expr: sp.Expr, log: list | None = None) -> sp.Expr:
    """Greedily rewrite ``expr`` in the forward nodes that make it cheapest (each step into ``log``)."""
    expr, restore = hide_argmax(tidy(el, expr))  # the one-hots keep their maximum's definition
    if expr == 0:  # the output does not depend on this input, or its terms cancel (softmax(x).sum())
        return expr
    best = cost(el, expr)
    # an elementwise output is a saved quantity too (``tanh``: ``dout*(1 - out**2)``)
    output = el.graph.output
    elementwise_output = output in el.opaque and not reductions(el.definition[output])
    candidates = [n for n in el.graph.nodes if n.op not in ("input", "labels")
                  and (n not in el.opaque or (n is output and elementwise_output))]
    while True:
        options, reads = [], _reads(expr)
        for node in candidates:
            for variable, target, solution in _solve(el, node, reads):
                rewritten = _rewrite(el, expr, variable, target, solution)
                options.append((cost(el, rewritten), not node.named, rewritten, node, variable, target, solution))
        if not options:
            return restore(expr)
        score, _, rewritten, node, variable, target, solution = min(options, key=lambda o: (o[0], o[1]))
        if score >= best:
            return restore(expr)
        if log is not None:  # replayed to learn which reductions the substitution recognised
            recognized = []
            _rewrite(el, expr, variable, target, solution, recognized)
            log.append(Rewrite(node, variable, target, solution, restore(expr), restore(rewritten),
                               recognized, (best, score)))
        expr, best = rewritten, score


# The refold weighs every candidate by its closed form, and the candidates share most of their terms
# and size coefficients: each is cancelled or factored once per process (SymPy caches neither).
_cancel = lru_cache(maxsize=8192)(sp.cancel)
_factor = lru_cache(maxsize=8192)(sp.factor)


def _split(term: sp.Expr, scalars: set) -> tuple[sp.Expr, sp.Expr]:
    """(size-only coefficient, tensor part) of one product; ``scalars`` are sizes and constants."""
    coefficient, tensor = [], []
    for f in sp.Mul.make_args(term):
        only_scalars = f.free_symbols <= scalars and not f.atoms(sp.Indexed) and not reductions(f)
        (coefficient if only_scalars else tensor).append(f)
    return sp.Mul(*coefficient), sp.Mul(*tensor)


def closed_form(expr: sp.Expr, scalars: set) -> sp.Expr:
    """``common_size * common_tensor * (sum of coefficient*tensor)``, each coefficient factored."""
    expr = expand(expr)
    if expr == 0:
        return expr
    collected: dict[sp.Expr, sp.Expr] = {}
    for term in sp.Add.make_args(expr):
        coefficient, tensor = _split(_cancel(term), scalars)
        collected[tensor] = collected.get(tensor, 0) + coefficient
    terms = [(_factor(c), t) for t, c in collected.items() if _cancel(c) != 0]
    if not terms:
        return sp.S.Zero
    common = _common_factor([t for _, t in terms])
    terms = [(c, _cancel(t / common)) for c, t in terms]

    def spread(scale):
        return sp.count_ops(sp.Add(*[_factor(c / scale) for c, _ in terms])), sp.default_sort_key(scale)

    # each coefficient without its sign (not ``abs``: a constant of either sign has no absolute value
    # worth printing, ``1/(n*T)`` is the scale of ``-1/(n*T)``)
    scale = min({_factor(-c if c.could_extract_minus_sign() else c) for c, _ in terms}, key=spread)
    inner = _grouped(sp.Add(*[_factor(c / scale) * t for c, t in terms]))
    if inner.is_Add:
        return sp.Mul(scale, common, inner, evaluate=False) if scale != 1 or common != 1 else inner
    return scale * common * inner


GROUP_MAX_OPS = 1000  # the largest built-in sum has about 360 (GELU's dx)


def _grouped(inner: sp.Expr) -> sp.Expr:
    """Terms that share a tensor factor are grouped and their cofactor factored: GELU's
    ``a - a*t**2 + b - b*t**2`` becomes ``-a*(t - 1)*(t + 1) - b*(t - 1)*(t + 1)``, which float32
    rounds like autograd's chain (``1 - t**2`` next to 1 loses nothing as ``(1 - t)*(1 + t)``).
    A sum too large for that to pay (thousands of operations, from nested softmaxes) is left as it
    is: factoring its cofactors takes tens of seconds per candidate refold weighs."""
    if not inner.is_Add or sp.count_ops(inner) > GROUP_MAX_OPS:
        return inner
    count = Counter(f for term in inner.args for f in sp.Mul.make_args(term)
                    if isinstance(f.as_base_exp()[0], sp.Indexed))
    shared = [f for f, c in sorted(count.items(), key=lambda fc: (-fc[1], sp.default_sort_key(fc[0]))) if c >= 2]
    return sp.collect(inner, shared, func=_factor) if shared else inner


def _common_factor(tensors: list[sp.Expr]) -> sp.Expr:
    """The factors (with the smallest power) that every tensor part shares."""
    def powers(t):
        out = {}
        for f in sp.Mul.make_args(t):
            b, e = f.as_base_exp()
            out[b] = out.get(b, 0) + e
        return out

    maps = [powers(t) for t in tensors]
    shared = set(maps[0]).intersection(*maps[1:])
    result = sp.S.One
    for b in sorted(shared, key=sp.default_sort_key):
        exps = [m[b] for m in maps]
        if all(e.is_number for e in exps):
            positive = [e for e in exps if e > 0]
            negative = [e for e in exps if e < 0]
            if len(positive) == len(exps):
                result *= b ** min(exps)
            elif len(negative) == len(exps):
                result *= b ** max(exps)
    return result


