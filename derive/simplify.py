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

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.solvers.solvers import _invert

from .elements import Elements
from .errors import DerivationError
from .functions import ACTIVATIONS, NOT_INVERTIBLE, Guarded, Logit, Root, Wins
from .memo import kept_on
from .risk import Path, risky_atoms
from .symbolic import (GroupedRed, IsArgmax, Red, _Bound, _replace_free, bases, expand, extent, free_indices,
                       hide_argmax, outside_sums, reductions, substitute_family)
from .trace import Node


def tidy(el: Elements, expr: sp.Expr, log: list | None = None) -> sp.Expr:
    """Canonical sum of terms: combine exponentials, expand, recognize known reductions (into ``log``),
    replace sums that are constants by definition (``_constant_sums``: 0, or a softmax row's 1)."""
    expr = sp.powsimp(_complementary_masks(expand(expr)), combine="exp")
    return _constant_sums(el, el.recognize(expand(expr), log))


def _complementary_masks(expr: sp.Expr) -> sp.Expr:
    """``expr`` (expanded) with each pair of terms ``R*Wins(u) + R*Wins(-u)`` added up to ``R``: the
    two shares of a maximum's operands are exactly 1 together (0 + 1, 1/2 + 1/2, 1 + 0).
    ``tanh(maximum(log_softmax(x), x))``'s gradient in ``x`` reads both (the diagonal of both
    operands' paths), computed as two masks and their sum: three more full-size passes. Terms with
    different cofactors stay as they are: ``A*Wins(u) + B*Wins(-u)`` written ``B + (A - B)*Wins(u)``
    would subtract ``B`` from ``A`` where only ``A`` is the value."""
    if len(expr.atoms(Wins)) < 2:
        return expr
    return expr.replace(lambda a: a.is_Add and a.has(Wins), _shares_added)


def _shares_added(total: sp.Add) -> sp.Expr:
    """``total`` with each pair of its terms ``R*Wins(u)`` and ``R*Wins(-u)`` replaced by ``R``."""
    terms = list(total.args)
    place = {t: k for k, t in enumerate(terms)}
    out, used = [], set()
    for k, term in enumerate(terms):
        if k in used:
            continue
        for share in (f for f in sp.Mul.make_args(term) if isinstance(f, Wins)):
            rest = term / share
            m = place.get(rest * Wins(-share.args[0]))
            if m is not None and m not in used and m != k:
                used.update((k, m))
                out.append(rest)
                break
        else:
            out.append(term)
    return sp.Add(*out) if used else total


def _constant_sums(el: Elements, expr: sp.Expr) -> sp.Expr:
    """``expr`` with every sum of a forward value that its definition makes a constant replaced by
    that constant: ``sum_n xc`` is 0 with ``xc = x - x.mean(0)``, a softmax row sums to 1. A refold
    into such values (``x`` as ``xc + mu``) keeps ``2*mu*sum_n(xc)`` otherwise: 0 in exact
    arithmetic, rounding noise times the mean in floating point (at an offset of 1000, most of
    float32's digits); ``1 - sum_j(p)`` is noise where the gradient is 0. Only sums whose body is
    the value itself are looked at, each once per ``Elements``."""
    known = el.__dict__.setdefault("_constant_sums", {})
    nodes = {n.name: n for n in el.graph.nodes}
    plain = scalars(el)
    constant = _constant_nodes(el, expr, plain)
    for atom in reductions(expr):
        if not isinstance(atom, Red) or not isinstance(atom.body, sp.Indexed):
            continue
        if atom not in known:
            node = nodes.get(str(atom.body.base))
            known[atom] = None
            if node is not None and node.op not in ("input", "labels") and node in el.nf:
                ref = el.ref(node)
                if isinstance(ref, sp.Indexed) and len(ref.indices) == len(atom.body.indices):
                    value = el.definition.get(node, el.nf[node])
                    for own, read in zip(ref.indices, atom.body.indices):
                        if own != read and isinstance(own, sp.Idx):
                            value = _replace_free(value, own, read)
                    total = el.recognize(expand(Red(value, atom.index)))
                    if not total.atoms(sp.Indexed) and not reductions(total) and total.free_symbols <= plain:
                        known[atom] = total
        if known[atom] is not None:
            constant[atom] = known[atom]
    return expand(expr.xreplace(constant)) if constant else expr


def _constant_nodes(el: Elements, expr: sp.Expr, plain: set) -> dict:
    """The saved reductions in ``expr`` whose definition is a constant sum, each with that constant:
    ``v4 = softmax(v2, 1).sum(1)`` is 1, and the gradient through ``tanh(v4)`` reads ``1 - v4``, noise
    where it is 0, unless the node itself is known to be the constant (not only a sum written out)."""
    known = el.__dict__.setdefault("_constant_nodes", {})
    entries, symbols = {}, expr.free_symbols
    for e in expr.atoms(sp.Indexed):
        entries.setdefault(e.base, []).append(e)
    constant = {}
    for node in el.opaque:
        base = el.base(node)
        atoms = entries.get(base, []) if isinstance(base, sp.IndexedBase) else [base] if base in symbols else []
        if not atoms:
            continue
        if node not in known:
            known[node] = None
            value = el.definition[node]
            if reductions(value):
                total = _constant_sums(el, value)
                if not total.atoms(sp.Indexed) and not reductions(total) and total.free_symbols <= plain:
                    known[node] = total
        if known[node] is not None:
            constant.update({atom: known[node] for atom in atoms})
    return constant


def scalars(el: Elements) -> set:
    """Symbols that are plain numbers at run time: sizes and declared constants."""
    return set(el.graph.sizes.values()) | set(el.graph.constants.values())


COST_EXACT_MAX_OPS = 2000  # the built-in layers' largest candidate has about 420 (GELU's dx)
# a candidate this small is weighed on the closed form written, its product factored out whole
# (``(p + x)**2`` read as the saved ``v1**2`` is cheaper only so); a larger one without (factoring
# the whole sum changes few counts there and is most of the time). Nested functions expand to
# hundreds of operations that factor back into a few: ``tanh(tanh(tanh(tanh(tanh(x)))))``'s
# gradient is 511 expanded, ten binomials factored (9 ms); unfactored, each saved value read
# looked dearer than computing tanh again, and the backward recomputed four (2x autograd's time)
COST_WHOLE_MAX_OPS = 600

# What an operation costs the machine, in passes over a full-size tensor: a transcendental function
# is many multiplies (and each is a pass in eager torch), a reduction is a pass of its own, a
# division costs a little more than a product. Operations sp.count_ops names otherwise cost 1.
WEIGHTS = {"EXP": 6, "LOG": 6, "TANH": 6, "SIGMOID": 6, "SOFTPLUS": 6, "ATANH": 8, "LOGIT": 8, "SQRT": 6,
           "DIV": 2, "RED": 2,
           # torch's activations (``F.gelu``) and their derivatives: a transcendental function each
           **{f.__name__.upper(): 6 for a in ACTIVATIONS.values() for f in (a, a.derivative)}}


def weighted_ops(expr: sp.Expr) -> int:
    """``sp.count_ops`` with each operation weighted by what it costs (``WEIGHTS``)."""
    visual = sp.count_ops(expr, visual=True)
    if visual == 0:
        return 0
    counts = {str(s): visual.coeff(s) if visual != s else 1 for s in visual.free_symbols}
    return int(sum(WEIGHTS.get(name, 1) * int(c) for name, c in counts.items()))


def cost(el: Elements, expr: sp.Expr) -> int:
    """What the generated code pays: weighted operations, plus each tensor it has to read (an input
    less than a value the forward must save).

    Counted on the closed form the printer would write; a candidate too large for that to be cheap
    (thousands of operations, from nested softmaxes: seconds each) is counted as it stands. Once
    per candidate and derivation: ``select`` refolds again with a rewrite forbidden, and the steps
    before it weigh the same candidates."""
    return kept_on(el, "_costs", expr, lambda: _cost(el, expr))


def _cost(el: Elements, expr: sp.Expr) -> int:
    # a guard (``Root``'s derivative, 0 where its argument is 0) is weighed as the value it guards:
    # its mask reads the argument again, which would make every rewrite inside the argument look twice as dear
    expr = expr.replace(lambda e: isinstance(e, Guarded), lambda e: e.args[1])
    size = sp.count_ops(expr)
    printed = expr if size > COST_EXACT_MAX_OPS else closed_form(expr, scalars(el), factor_whole=size <= COST_WHOLE_MAX_OPS)
    # an input is saved for the backward anyway (a second derivative recomputes from it), and a
    # value autograd keeps costs no memory autograd does not spend; any other tensor read must be
    # computed by the forward and kept alive until the backward
    cheap = set(el.graph.inputs) | kept_by_autograd(el)
    return weighted_ops(printed) + sum(1 if b in cheap else 3 for b in bases(expr))


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
        if variable is node or variable.op in ("labels", "max") + SATURATING:
            # a maximum is never rebuilt: ``x - max`` is exact in the spec (the shift that keeps an
            # ``exp`` at most 1), while ``max`` rebuilt as ``v4*v7`` from ``v7 = max/v4`` is rounded,
            # and the shift cancels to that rounding times the maximum (inputs of 5e3: 1e-3); nor is
            # the value of a function that saturates: ``1 - tanh(v)**2`` is exactly 0 at a saturated
            # ``tanh`` on the value itself (autograd's), not on ``t2 + t3`` from ``t3 = tanh(v) - t2``
            # (a deviation from a mean: 1e-6 where the gradient is 1e-44)
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
        if _rebuilds_a_saturated_value(solution):
            continue
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


SATURATING = ("tanh", "sigmoid")  # traced operations whose derivative is read off their value


def _rebuilds_a_saturated_value(solution: sp.Expr) -> bool:
    """Whether ``solution`` inverts a function that saturates (``atanh``, ``logit``) at a value other
    than one saved tensor entry: ``v = atanh(t3 + t2)`` from ``t3 = tanh(v) - t2`` (a deviation from
    a mean) makes the gradient evaluate ``tanh(v)`` as ``t3 + t2``, rounded, where the derivative's
    ``1 - tanh(v)**2`` needs the value itself: autograd's is exactly 0 at a saturated ``tanh``, the
    rebuilt one is not (a random layer: 1e-6 where the gradient is 1e-44). ``atanh(out)`` of a saved
    output is the output read back, as autograd reads it."""
    return any(isinstance(f, (sp.atanh, Logit, sp.erfinv)) and not isinstance(f.args[0], (sp.Indexed, sp.Symbol))
               for f in solution.atoms(sp.Function))


def _divides_by_maybe_zero(el: Elements, expr: sp.Expr) -> bool:
    """True when ``expr`` divides by a tensor quantity not known to be non-zero."""
    for p in expr.atoms(sp.Pow):
        base, e = p.as_base_exp()
        if e.is_negative and not base.free_symbols <= el.nonzero_scalars() and base.is_zero is not False:
            return True
    return False


def _rewrite(el: Elements, expr: sp.Expr, variable: Node, target, solution: sp.Expr,
             log: list | None = None) -> sp.Expr:
    if log is not None:  # (replayed to learn which reductions were recognised: not from memory)
        return _substituted(el, expr, target, solution, log)
    return kept_on(el, "_rewrites", (expr, target, solution), lambda: _substituted(el, expr, target, solution))


def _substituted(el: Elements, expr: sp.Expr, target, solution: sp.Expr, log: list | None = None) -> sp.Expr:
    if isinstance(target, sp.Symbol):
        return tidy(el, expr.xreplace({target: solution}), log)
    indices = tuple(i for i in target.indices)
    return tidy(el, substitute_family(expr, target.base, indices, solution), log)


@dataclass
class Rewrite:
    """One refold step, kept for the derivation document: ``node``'s definition solved for
    ``variable`` (``target = solution``) and substituted everywhere; or (``kind == "read"``) the
    value of ``node`` read wherever the formula computes it again (``target``, the function the
    forward evaluated, becomes ``solution``, the node's element)."""

    node: Node
    variable: Node
    target: sp.Expr  # the variable's element (or symbol) that was replaced
    solution: sp.Expr
    before: sp.Expr  # the formula before the substitution
    after: sp.Expr  # and after it, tidied
    recognized: list  # [(reduction, value)] recognised while tidying
    cost: tuple[int, int]  # (before, after)
    kind: str = "solve"


def _saved_reads(el: Elements, node: Node, expr: sp.Expr, inline=None) -> sp.Expr | None:
    """``expr`` reading ``node`` wherever it evaluates ``node``'s function again (``tanh(s*x)``
    at any indices becomes ``t[...]``), or None. Only for a transcendental function or a root: the
    forward computes it anyway, and saving it is cheaper than computing it again (autograd saves
    it too); the refold weighs the read against the recomputation. The function is looked for as
    the spec writes it (``tanh(t1)``) and inlined (``tanh(tanh(x))``); with ``inline`` (forward
    nodes to their definitions, ``risk.Path.value``), also where the gradient reads it through
    other saved values (``tanh(v3 - 1)`` is ``tanh(tanh(tanh(x)) - 1)``, once ``v3`` is read).
    A 0-d value too (``tanh(x.sum())``): computed again, each of its operations is a call of its
    own in the backward (a few microseconds each, which is all such a layer costs)."""
    scalars = frozenset() if node.shape else frozenset(el.base(m) for m in el.nf if not m.shape)
    own = [i for i in el.free(node) if i != 0]
    wild = {i: sp.Wild(f"w_{i}") for i in own}
    target = el.ref(node).xreplace(wild)
    found = {}
    # (and expanded, as the gradient has it: ``tanh((p + x)**3)`` is ``tanh(p**3 + 3*p**2*x + ...)`` there)
    defined = el.definition.get(node, el.nf[node])
    for value in dict.fromkeys([defined, expand(defined), el.direct(node)]):
        # an odd function of a negated argument is the negated function (SymPy writes ``tanh(1 - v)``
        # as ``-tanh(v - 1)``): the node is the negative of what the gradient evaluates
        sign, value = (-1, -value) if value.could_extract_minus_sign() and value.is_Mul else (1, value)
        if not risky_atoms(value, scalars=scalars) or risky_atoms(value, scalars=scalars)[0] != value:
            continue
        pattern = value.xreplace(wild)
        for atom in risky_atoms(expr, scalars=scalars):
            if atom.func is not value.func or atom in found:
                continue
            # a whole power of a saved root (``(x**2 + 1)**(-3/2)`` is ``v**3`` for ``v = rsqrt(x**2 + 1)``)
            power = atom.exp / value.exp if value.is_Pow and atom.exp.is_Rational and value.exp.is_Rational \
                and atom.exp != value.exp else sp.S.One
            # (and divided by a saved root, as autograd's backward of ``sqrt`` divides by its result:
            # ``q**(-1/2)`` is ``1/v`` for ``v = sqrt(q)``; never by a saved reciprocal root, which
            # is 0 where the root is not)
            if not (power.is_Integer and (power > 0 or value.exp.is_positive)):
                continue
            wanted = pattern if power == 1 else pattern.base ** atom.exp
            for seen in dict.fromkeys([atom] + ([inline(atom), expand(inline(atom))] if inline is not None else [])):
                # inlined, an odd function's argument may turn negative, and SymPy takes the sign out
                # (``tanh(2*v3)`` of ``v3 = -tanh(u)`` is ``-tanh(2*tanh(u))``): the node negated
                flip, seen = (-1, -seen) if power == 1 and seen.is_Mul and seen.could_extract_minus_sign() else (1, seen)
                match = _matched(el, seen, wanted)
                if match is not None and all(isinstance(match.get(w), (sp.Idx, sp.Integer)) for w in wild.values()):
                    found[atom] = flip * sign * target.xreplace(match) ** power
                    break
    return expr.xreplace(found) if found else None


def _matched(el: Elements, expr: sp.Expr, pattern: sp.Expr) -> dict | None:
    """``expr.match(pattern)``, once per pair on a derivation: the refold asks again at every step
    and for every form ``select`` tries, of the same atoms (those its last rewrite left alone), and
    SymPy's matcher is slow on the large expanded ones (a log of a square of a log-softmax, inlined:
    nine tenths of a derivation's matching time was the same pairs again)."""
    return kept_on(el, "_matches", (expr, pattern), lambda: expr.match(pattern))


def _saved_read(el: Elements, node: Node, expr: sp.Expr, inline) -> sp.Expr | None:
    """``_saved_reads`` tidied, once per node and candidate of a derivation (``inline`` is its
    ``risk.Path.value``, the same for every gradient of it)."""
    def compute():
        read = _saved_reads(el, node, expr, inline)
        return None if read is None else tidy(el, read)

    return kept_on(el, "_saved_read", (node, expr), compute)


def kept_by_autograd(el: Elements) -> frozenset:
    """Names of the forward values autograd through the spec keeps for its backward: those the
    step-by-step backward (which replays autograd's own operations) reads. Reading one of them
    costs the fused backward no memory that autograd does not spend too."""
    kept = getattr(el, "_kept_by_autograd", None)
    if kept is None:
        from .stepwise import emit

        try:
            text = " ".join(line.code for line in emit(el.graph)[0])
        except DerivationError:
            text = ""
        kept = frozenset(n.name for n in el.graph.nodes if re.search(rf"\b{re.escape(n.name)}\b", text))
        el._kept_by_autograd = kept
    return kept


def _kept_read(el: Elements, node: Node, expr: sp.Expr) -> sp.Expr | None:
    """``_kept_reads`` of a kept sum tidied, once per node and candidate of a derivation (each
    refold step weighs it; a product is read once the steps are done, ``_read_kept``)."""
    def compute():
        read = _kept_reads(el, node, expr, sums_only=True)
        return None if read is None else tidy(el, read)

    return kept_on(el, "_kept_read", (node, expr), compute)


def _kept_reads(el: Elements, node: Node, expr: sp.Expr, sums_only: bool = False) -> sp.Expr | None:
    """``expr`` reading ``node`` wherever it computes ``node``'s value again as one sum or product
    of tensors (``t1 + 1`` becomes ``t2`` when the forward computed ``t2 = 1 + t1``), or None.

    Only for a value autograd keeps too (``kept_by_autograd``): the forward pass computes it
    anyway, and reading it saves the backward a full-size pass over memory at no cost in memory
    beyond autograd's. (A transcendental value is read by ``_saved_reads``, weighed by the cost.)"""
    if not node.shape or node.name not in kept_by_autograd(el) or node.op in ("input", "labels"):
        return None
    bases_read = {e.base for e in expr.atoms(sp.Indexed)}
    own = [i for i in el.free(node) if i != 0]
    wild = {i: sp.Wild(f"w_{i}") for i in own}
    target = el.ref(node).xreplace(wild)
    found = {}
    # as the spec writes it, in normal form, and expanded as the gradient has it (``(v4 - b*x)**2 + 1``
    # is ``b**2*x**2 - 2*b*v4*x + v4**2 + 1`` there: a square of a difference that cancels)
    for value in dict.fromkeys([el.direct(node), el.nf[node], expand(el.nf[node])]):
        if not isinstance(value, (sp.Add, sp.Mul)) or not value.atoms(sp.Indexed) or reductions(value):
            continue
        if sums_only and not value.is_Add or not {e.base for e in value.atoms(sp.Indexed)} <= bases_read:
            continue  # (the formula computes the value only where it reads every tensor of it)
        pattern = value.xreplace(wild)
        first = next(iter(sorted(value.atoms(sp.Indexed), key=sp.default_sort_key))).base
        for a in sp.preorder_traversal(expr):
            if a.func is not value.func or a in found or not a.has(first):
                continue
            # a product with a number of its own is that number times the value (``c - b*c`` holds
            # ``-b*c``, which is ``-v2`` for ``v2 = b*c``)
            number, rest = a.as_coeff_Mul() if a.is_Mul and value.as_coeff_Mul()[0] == 1 else (1, a)
            if rest.func is not value.func:
                continue
            if len(rest.args) == len(value.args):
                match = _matched(el, rest, pattern)
                if match is not None and all(isinstance(match.get(w), (sp.Idx, sp.Integer)) for w in wild.values()):
                    found[a] = number * target.xreplace(match)
            elif value.is_Add and len(value.args) < len(rest.args) <= _MAX_SUM_TERMS:
                read = _read_in_a_sum(rest, pattern, target, wild)
                if read is not None:
                    found[a] = read
    return expr.xreplace(found) if found else None


_MAX_SUM_TERMS = 8  # a longer sum is not searched for the kept one in part of it (matching is combinatorial)


def _read_in_a_sum(total: sp.Add, pattern: sp.Expr, target: sp.Expr, wild: dict) -> sp.Expr | None:
    """``total`` with the kept sum ``pattern`` among its terms, or their negatives, read as ``target``
    (``v1 + v8 + 1`` is ``v9 + 1``, ``1/2 - v1 - v8`` is ``1/2 - v9``, for ``v9 = v1 + v8``: a clamp's
    mask of the sum it saved), or None. The indices are read off an entry of the pattern's first
    tensor in the sum, then every term of the pattern looked up: SymPy's matcher of a sum with a
    wild rest took a tenth of a second per sum, seconds per refold."""
    terms = sp.Add.make_args(pattern)
    entries = sorted(pattern.atoms(sp.Indexed), key=sp.default_sort_key)
    if not entries:
        return None
    first = entries[0]  # its indices, wild where the node's are
    present = set(total.args)
    tried = set()
    for entry in total.atoms(sp.Indexed):
        if entry.base != first.base or len(entry.indices) != len(first.indices):
            continue
        binding = {}
        for mine, theirs in zip(first.indices, entry.indices):
            if mine in wild.values():
                if binding.setdefault(mine, theirs) != theirs:
                    break
            elif mine != theirs:
                break
        else:
            key = tuple(sorted(binding.items(), key=sp.default_sort_key))
            if key in tried or not all(isinstance(binding.get(w), (sp.Idx, sp.Integer)) for w in wild.values()):
                continue
            tried.add(key)
            for sign in (1, -1):
                concrete = [sign * t.xreplace(binding) for t in terms]
                if len(set(concrete)) == len(concrete) and all(c in present for c in concrete):
                    return sign * target.xreplace(binding) + sp.Add(*[t for t in total.args if t not in concrete])
    return None


# A rewrite must make the formula this much cheaper to be taken: a marginal gain (reading ``t4``
# for ``x`` where ``t4 = x/2``, ``t6 - 1`` for ``t5`` where ``t6 = t5 + 1``) trades an input the
# backward has anyway for a saved value, or a product for a subtraction that rounds.
MIN_GAIN = 0.1
EVERY_REWRITE = ("*", "*")  # in ``forbidden``: no rewrite at all (the gradient as differentiated, tidied)


def refold(el: Elements, expr: sp.Expr, log: list | None = None, forbidden: frozenset = frozenset()) -> sp.Expr:
    """Greedily rewrite ``expr`` in the forward nodes that make it cheapest (each step into ``log``).

    A rewrite that makes the gradient evaluate a function the spec's path does not (``risk.Path``:
    ``log(p)`` of a probability, ``atanh`` of an output, a new power in a denominator) is never
    taken, nor one in ``forbidden`` (``(node, variable)`` names: a rewrite whose result failed the
    numerical battery, see ``select``)."""
    expr, restore = hide_argmax(tidy(el, expr))  # the one-hots keep their maximum's definition
    if expr == 0 or EVERY_REWRITE in forbidden:  # no input dependence, or terms that cancel (softmax(x).sum())
        return restore(expr)
    path = Path(el, expr)
    best = cost(el, expr)
    # an elementwise output is a saved quantity too (``tanh``: ``dout*(1 - out**2)``)
    output = el.graph.output
    # (also a function of a reduction, ``tanh(x.sum(1))``: it is read where the gradient evaluates
    # that function again, as it would be had the spec named the sum)
    elementwise_output = output in el.opaque and (not reductions(el.definition[output])
                                                  or risky_atoms(el.definition[output])[:1] == [el.definition[output]])
    candidates = [n for n in el.graph.nodes if n.op not in ("input", "labels")
                  and (n not in el.opaque or (n is output and elementwise_output))]
    while True:
        options, reads = [], _reads(expr)
        for node in candidates:
            for variable, target, solution in _solve(el, node, reads):
                if (node.name, variable.name) in forbidden:
                    continue
                rewritten = _rewrite(el, expr, variable, target, solution)
                if path.new(rewritten):
                    continue
                options.append((cost(el, rewritten), not node.named, rewritten, node, variable, target, solution))
            if (node.name, node.name) in forbidden:
                continue
            rewritten = _saved_read(el, node, expr, path.value)
            if rewritten is not None:
                options.append((cost(el, rewritten), not node.named, rewritten, node, node,
                                el.definition.get(node, el.nf[node]), el.ref(node)))
            # a kept sum read where the gradient has it among other terms competes with solving for
            # one of its terms: ``v1 = v9 - v8`` from ``v9 = v1 + v8`` also makes a clamp's mask read
            # ``v9``, but leaves a difference where the softmax ``v1`` itself was read
            rewritten = _kept_read(el, node, expr)
            if rewritten is not None:
                options.append((cost(el, rewritten), not node.named, rewritten, node, node, el.direct(node), None))
        if not options:
            break
        score, _, rewritten, node, variable, target, solution = min(options, key=lambda o: (o[0], o[1]))
        if score > best * (1 - MIN_GAIN):
            break
        if log is not None:  # replayed to learn which reductions the substitution recognised
            recognized = []
            if variable is node and solution is None:  # a kept value read (``_kept_read``)
                target, solution = el.direct(node), el.ref(node)
            elif variable is node:
                tidy(el, _saved_reads(el, node, expr, path.value), recognized)
            else:
                _rewrite(el, expr, variable, target, solution, recognized)
            log.append(Rewrite(node, variable, target, solution, restore(expr), restore(rewritten),
                               recognized, (best, score), "read" if variable is node else "solve"))
        expr, best = rewritten, score
    return _argmax_reads(el, restore(_read_kept(el, expr, candidates, log, forbidden, restore)), forbidden)


def _argmax_reads(el: Elements, expr: sp.Expr, forbidden: frozenset) -> sp.Expr:
    """``expr`` with each one-hot's maximised value read from a forward value the formula reads
    anyway: ``argmax(exp(A - v1))`` is ``argmax(v3)`` where the forward saved ``v3 = exp(A - v1)``.
    The spec took its maximum of exactly that tensor; computing the function again costs the
    backward a full-size transcendental pass (and could round to a different position)."""
    marks = expr.atoms(IsArgmax)
    if not marks:
        return expr
    read = {str(e.base) for e in expr.atoms(sp.Indexed)}
    nodes = [n for n in el.graph.nodes if n.name in read and n.op not in ("input", "labels")
             and (n.name, n.name) not in forbidden]
    found = {}
    for mark in marks:
        j, maximum = mark.args
        for node in nodes:
            body = _saved_reads(el, node, maximum.body)
            if body is not None and isinstance(body, sp.Indexed):
                found[mark] = mark.func(j, maximum.func(body, maximum.index))
                break
    return expr.xreplace(found) if found else expr


def _read_kept(el: Elements, expr: sp.Expr, candidates: list, log: list | None, forbidden: frozenset,
               restore) -> sp.Expr:
    """The refolded ``expr`` reading the values autograd keeps wherever it computes them again
    (``_kept_reads``): each such read removes a full-size operation from the backward."""
    for node in candidates:
        if (node.name, node.name) in forbidden:
            continue
        read = _kept_reads(el, node, expr)
        if read is None:
            continue
        rewritten = tidy(el, read)
        if cost(el, rewritten) > cost(el, expr):
            continue
        if log is not None:
            log.append(Rewrite(node, node, el.direct(node), el.ref(node), restore(expr), restore(rewritten), [],
                               (cost(el, expr), cost(el, rewritten)), "read"))
        expr = rewritten
    return expr


# The refold weighs every candidate by its closed form, and the candidates share most of their terms
# and size coefficients: each is cancelled or factored once per process (SymPy caches neither).
_cancel = lru_cache(maxsize=8192)(sp.cancel)


@lru_cache(maxsize=8192)
def _factor(expr: sp.Expr) -> sp.Expr:
    """``factor(expr)`` with each exponential kept whole: SymPy factors ``exp(x - v1)`` into
    ``exp(x)*exp(-v1)``, two exponentials the spec never took, whose product is ``inf*0`` where
    ``x`` and ``v1`` are both very negative (a softmax written as ``exp(x - lse)``)."""
    # each exponential and each sum an atom (``factor`` would take a sum's body apart too)
    hidden = {e: sp.Dummy() for e in outside_sums(expr, sp.exp)}
    covered = expr.xreplace(hidden)
    hidden.update({r: sp.Dummy() for r in _outermost(covered, _Bound)})
    if not hidden:
        return sp.factor(expr)
    back = {d: e for e, d in hidden.items()}
    return sp.factor(covered.xreplace(hidden)).xreplace(back)


def _outermost(expr: sp.Expr, kind) -> set:
    """The subexpressions of type ``kind`` that no other of that type contains."""
    if isinstance(expr, kind):
        return {expr}
    return set().union(*[_outermost(a, kind) for a in expr.args]) if expr.args else set()


@lru_cache(maxsize=8192)
def _cancelled(term: sp.Expr) -> sp.Expr:
    """``cancel(term)``, unless that evaluates a function the term does not: cancelling
    ``(exp(a) - exp(-a))/(exp(a) + exp(-a))`` multiplies through by ``exp(a)`` and reads
    ``exp(2*a)``, which overflows where the term did not."""
    cancelled = _cancel(term)
    functions = set(risky_atoms(term))
    # (a power, and a ``Root``, which is one, may come out with its base cancelled: the same value)
    if any(a not in functions for a in risky_atoms(cancelled) if not isinstance(a, (sp.Pow, Root))):
        return term
    # ``cancel`` expands what it divides by: ``v/(s*(v**2 + 1))`` with ``s = sqrt(v**2 + 1)`` comes back
    # as ``v/(s*v**2 + s)``, whose terms overflow where the product of its factors (``(v**2 + 1)**(3/2)``,
    # as the spec computes it) does not, and where a size in the coefficient is multiplied into every
    # term. Each denominator, the term's and those inside its sums, is factored again.
    # So is a product of sums multiplied out: ``(v2**2 + 1)*(v3**2 + 1)`` as ``v2**2*v3**2 + v2**2 +
    # v3**2 + 1`` is infinite where ``v2**2*v3**2`` passes float32's range, though each factor does
    # not (autograd divides by each in turn: a gradient of 1e-20 came out 0).
    return cancelled.replace(_expanded_denominator, lambda p: _factor(p.base) ** p.exp)


def _expanded_denominator(e: sp.Expr) -> bool:
    """A sum divided by, with a root among its terms' factors (what ``cancel`` made of a power), or
    a product or a power of tensor sums multiplied out: other denominators stay as ``cancel`` writes them,
    which the refold's costs were tuned on."""
    if not (e.is_Pow and e.exp.is_negative and e.base.is_Add and sp.count_ops(e.base) <= FACTOR_MAX_OPS):
        return False
    if any(not p.exp.is_Integer for p in e.base.atoms(sp.Pow)):
        return True
    sums = [f for f in sp.Mul.make_args(_factor(e.base)) if (f.is_Add or (f.is_Pow and f.base.is_Add)) and f.free_symbols]
    # (a power of one elementwise sum multiplied out too: ``k*c**4 + 2*k*c**2 + k`` is infinite from
    # c = 1e10, its factored ``k*(c**2 + 1)**2`` is printed as a power of the reciprocal,
    # ``(1/(c**2 + 1))**2/k``. Not a sum with a reduction in it: factored, ``d + 1e5*sum(t**2)``
    # became one sum of ``1e5*t**2 + 1``, rounded apart from the same value the formula's other
    # term reads, and their difference lost the digits the two shared before)
    return len(sums) >= 2 or any(f.is_Pow and f.exp.is_Integer and f.exp > 1 and not reductions(f.base) for f in sums)


FACTOR_MAX_OPS = 200  # a denominator larger than this is left expanded (factoring it takes seconds)


def _split(term: sp.Expr, scalars: set) -> tuple[sp.Expr, sp.Expr]:
    """(size-only coefficient, tensor part) of one product; ``scalars`` are sizes and constants."""
    coefficient, tensor = [], []
    for f in sp.Mul.make_args(term):
        only_scalars = f.free_symbols <= scalars and not f.atoms(sp.Indexed) and not reductions(f)
        (coefficient if only_scalars else tensor).append(f)
    return sp.Mul(*coefficient), sp.Mul(*tensor)


def closed_form(expr: sp.Expr, scalars: set, factor_whole: bool = True) -> sp.Expr:
    """``common_size * common_tensor * (sum of coefficient*tensor)``, each coefficient factored."""
    expr = expand(expr)
    if expr == 0:
        return expr
    collected: dict[sp.Expr, sp.Expr] = {}
    for term in sp.Add.make_args(expr):
        coefficient, tensor = _split(_cancelled(term), scalars)
        collected[tensor] = collected.get(tensor, 0) + coefficient
    terms = [(_factor(c), t) for t, c in collected.items() if _cancel(c) != 0]
    if not terms:
        return sp.S.Zero
    common = _common_factor([t for _, t in terms])
    # guarded as the terms were: ``cancel`` would split ``exp(v1 - v2)`` left over by the common
    # factor into ``exp(v1)*exp(-v2)`` (three roundings for one, an exponential the spec never took)
    terms = [(c, _cancelled(t / common)) for c, t in terms]

    def spread(scale):
        return sp.count_ops(sp.Add(*[_factor(c / scale) for c, _ in terms])), sp.default_sort_key(scale)

    # each coefficient without its sign (not ``abs``: a constant of either sign has no absolute value
    # worth printing, ``1/(n*T)`` is the scale of ``-1/(n*T)``)
    scale = min({_factor(-c if c.could_extract_minus_sign() else c) for c, _ in terms}, key=spread)
    inner = _grouped_sums(sp.Add(*[_factor(c / scale) * t for c, t in terms]), factor_whole, scalars)
    if factor_whole:  # the closed form written (not a candidate the refold weighs: its costs stay)
        inner = inner.replace(_number_beside_a_sum, _summed_with_its_number)
    if inner.is_Add:
        return sp.Mul(scale, common, inner, evaluate=False) if scale != 1 or common != 1 else inner
    return scale * common * inner


def _sum_and_numbers(e: sp.Expr):
    """``(coefficient, sum, ratios)`` of ``e = coefficient*sum + numbers``, where each number is a
    ratio times the sum's extent (``k - sum_j(t**2)``: 1 and -1, ``sum_j``), or None."""
    if not e.is_Add:
        return None
    sums, numbers = [], []
    for term in e.args:
        coefficient, rest = term.as_coeff_Mul()
        if isinstance(rest, Red):
            sums.append((coefficient, rest))
        else:
            numbers.append(term)
    if len(sums) != 1 or not numbers:
        return None
    coefficient, red = sums[0]
    ratios = [sp.cancel(t / extent(red.index)) for t in numbers]
    if not all(r.is_number and r != 0 for r in ratios):
        return None
    return coefficient, red, ratios


def _number_beside_a_sum(e: sp.Expr) -> bool:
    return _sum_and_numbers(e) is not None


def _summed_with_its_number(e: sp.Expr) -> sp.Expr:
    """``k - sum_j(t**2)`` as ``sum_j(1 - t**2)``. The normal form sums a constant to its count (the
    ``1`` of ``1 - t**2`` over ``k`` entries is ``k``); written as that difference the total cancels
    where every ``t**2`` is near 1 (a saturated ``tanh``: 20x autograd's error at inputs of 100),
    while autograd sums the differences, each exact there."""
    coefficient, red, ratios = _sum_and_numbers(e)
    return GroupedRed(coefficient * red.body + sp.Add(*ratios), red.index)


GROUP_MAX_OPS = 1000  # the largest built-in sum has about 360 (GELU's dx)


def _grouped_sums(inner: sp.Expr, factor_whole: bool, scalars: set) -> sp.Expr:
    """``inner``'s sums grouped (``group_sums``) and its terms grouped (``_grouped``). Written whole
    (``factor_whole``), a product the chain rule made is factored out first, its sums as symbols:
    ``(1 - t**2)*(g - sum_j(g*p))`` of ``t = tanh(sum(...))`` expands to terms of which some read
    ``t**2`` beside a sum; grouped first, ``t**2`` moves into the sum's body and the product is
    lost, and the kernel subtracts ``t**2*g`` from ``g`` where ``t`` rounds to 1 (thousands of
    times autograd's error near saturation)."""
    whole = _whole_factors(inner, scalars) if factor_whole else None
    if whole is not None:
        return sp.Mul(*[_grouped_sums(f, factor_whole, scalars) if f.is_Add else f for f in sp.Mul.make_args(whole)])
    grouped = group_sums(inner, into=factor_whole)
    # (a product is looked for again only where grouping changed the sum: factoring it is the time)
    return _grouped(grouped, factor_whole and grouped != inner, scalars)


def _outside_exponents(expr: sp.Expr, mapping: dict) -> sp.Expr:
    """``expr.xreplace(mapping)`` except in exponents: ``sqrt(n - 1)`` stays a root. A power to a
    symbol (``(n - 1)**c0``) is no polynomial generator to ``factor``, which then took minutes
    over a standardization's ``x.std(0)``."""
    if expr in mapping:
        return mapping[expr]
    if expr.is_Atom:
        return expr
    if expr.is_Pow:
        return sp.Pow(_outside_exponents(expr.base, mapping), expr.exp)
    return expr.func(*[_outside_exponents(a, mapping) for a in expr.args])


def _whole_factors(inner: sp.Expr, scalars: set | None) -> sp.Expr | None:
    """``inner`` factored whole, if that is a product of sums of different quantities; else None.

    A product the chain rule made and the normal form expanded (``(1 - a**2)*(1 - b**2)`` of two
    nested tanh, ``(1 - t**2)*(sum(dout) + b*dout)``): factored whole, it is that product again,
    each factor accurate on its own. Constants are factored as symbols: the spec's 0.044715 stays
    itself, not an integer spread over every coefficient; a sum is a symbol too (an atom of the
    product, never taken apart).
    With ``scalars`` (sizes and constants), a scalar forward value (``tanh(v1)`` of a total ``v1``)
    is a tensor quantity too; without, only entries are."""
    if not inner.is_Add or sp.count_ops(inner) > GROUP_MAX_OPS:
        return None
    constants = sorted({abs(r) for r in inner.atoms(sp.Rational, sp.Float) if not r.is_integer},
                       key=sp.default_sort_key)
    names = {r: sp.Dummy(f"c{k}") for k, r in enumerate(constants)}
    signed = {**names, **{-r: -d for r, d in names.items()}}  # a term's coefficient carries its sign
    sums = {r: sp.Dummy(f"s{k}") for k, r in enumerate(sorted(inner.atoms(Red), key=sp.default_sort_key))}
    back = {**{v: k for k, v in names.items()}, **{v: k for k, v in sums.items()}}
    whole = _factor(_outside_exponents(inner.xreplace(sums), signed)).xreplace(back)

    def values(f):
        scalar = set() if scalars is None else f.free_symbols - set(scalars) - f.atoms(sp.Idx, sp.Indexed)
        # and the functions of them: ``tanh(v1) - 1`` and ``tanh(tanh(v1) - 1) - 1`` are two
        return frozenset(f.atoms(sp.Indexed) | {s for s in scalar if not s.is_Dummy}), \
            frozenset(a for a in f.atoms(sp.Function) if a.free_symbols)

    # (a power of one too, ``(p + x)**2``; not a divisor: ``(v**2 + 1)**(-3/2)`` made common to the
    # terms is a denominator that overflows where each term's ``rsqrt(v**2 + 1)**3`` did not)
    kinds = {values(f) for f in sp.Mul.make_args(whole)
             if f.is_Add or (f.is_Pow and f.base.is_Add and f.exp.is_Integer and f.exp > 0)}
    valued = {kind for kind in kinds if kind[0]}
    # (or, with ``scalars``, factors of scalar forward values alone: ``e - e*t**2`` of ``t = tanh(e)``
    # is ``-e*(t - 1)*(t + 1)``, where the difference cancels near ``t = 1``)
    scalar = scalars is not None and bool(valued) and whole != inner and not any(
        isinstance(v, sp.Indexed) for kind in valued for v in kind[0])
    return whole if len(valued) >= 2 or scalar else None


def _grouped(inner: sp.Expr, factor_whole: bool = True, scalars: set | None = None) -> sp.Expr:
    """Terms that share a tensor factor (an entry, or a function of entries: ``exp(x - lse)``, a
    maximum's one-hot) are grouped and their cofactor factored: GELU's ``a - a*t**2 + b - b*t**2`` becomes
    ``-a*(t - 1)*(t + 1) - b*(t - 1)*(t + 1)``, which float32 rounds like autograd's chain
    (``1 - t**2`` next to 1 loses nothing as ``(1 - t)*(1 + t)``).
    A sum too large for that to pay (thousands of operations, from nested softmaxes) is left as it
    is: factoring its cofactors takes tens of seconds per candidate refold weighs.
    With ``factor_whole``, a product is factored out first (``_whole_factors``)."""
    if not inner.is_Add or sp.count_ops(inner) > GROUP_MAX_OPS:
        return inner
    whole = _whole_factors(inner, scalars) if factor_whole else None
    if whole is not None:
        return sp.Mul(*[_grouped(f, factor_whole, scalars) if f.is_Add else f for f in sp.Mul.make_args(whole)])
    count = Counter(f for term in inner.args for f in sp.Mul.make_args(term)
                    if isinstance(f.as_base_exp()[0], sp.Indexed)
                    or (isinstance(f, sp.Function) and not isinstance(f, _Bound) and f.atoms(sp.Indexed)))
    shared = [f for f, c in sorted(count.items(), key=lambda fc: (-fc[1], sp.default_sort_key(fc[0]))) if c >= 2]
    return sp.collect(inner, shared, func=_factor) if shared else inner


def group_sums(inner: sp.Expr, into: bool = False) -> sp.Expr:
    """Terms that differ only in which sum over one index they read become one sum of their
    bodies: ``a*(Red(dout*x) - Red(t**2*dout*x))`` is ``a*GroupedRed(dout*x*(1 - t**2))``.

    The normal form splits every sum by linearity (that is how cancellations are found); summed
    that way in floating point, a difference of two large sums loses the digits that the sum of
    the differences keeps (the spec's own path sums the difference), and costs a second pass.

    With ``into`` (the closed form written, not a candidate weighed by the refold: moving factors
    would change the costs its choices were tuned on), a factor that varies along no index the sum
    does not is moved into the body first, so that sums differing in such a factor group too."""
    if not inner.is_Add:
        return inner
    groups: dict = {}
    for term in inner.args:
        red = _the_sum(term, inner, into)
        if red is None:
            groups.setdefault(("alone", term), []).append(term)
            continue
        rest = [f for f in sp.Mul.make_args(term) if f is not red]
        # a factor that varies along no index the sum does not (``v4[0]``, ``b[i_n, 0]`` of a sum
        # ``sum_k (...)[i_n, k]``) may go into its body at no cost: ``v4*sum(a) - sum(b)`` is then
        # ``sum(v4*a - b)``, as autograd sums it (its ``dv5`` is the difference, summed once)
        free = free_indices(red)
        moved = [f for f in rest if into and not f.is_number and _movable(f, free)]
        movable = sp.Mul(*moved)
        coefficient = sp.Mul(*[f for f in rest if f.is_number])
        cofactor = sp.Mul(*[f for f in rest if not f.is_number and f not in moved])
        groups.setdefault((cofactor, extent(red.index)), []).append((coefficient * movable, red))
    out = []
    for key, members in groups.items():
        if key[0] == "alone" or len({r for _, r in members}) < 2:  # one sum: its factors are factored
            out += members if key[0] == "alone" else [c * r * key[0] for c, r in members]
            continue
        cofactor, size = key
        free = [frozenset(free_indices(r)) for _, r in members]
        if frozenset().union(*free) not in free:
            # one body would vary along more indices than any member's does: ``sum_m(A[j, m]) +
            # sum_m(A[m, i])`` grouped is a k x k x k broadcast where each sum is k x k (slower by
            # hundreds of times at k = 512); sums of different shapes are added as they are
            out += [c * r * cofactor for c, r in members]
            continue
        # one fresh index for every member's own: a canonical one (``_r1_h``) may be bound by a sum
        # inside another member's body, which would capture it; the sum below names it canonically
        j = sp.Idx(sp.Dummy("grouped", integer=True), size)
        body = sp.Add(*[c * r.body.xreplace({r.index: j}) for c, r in members])
        # the body may be such a difference of sums itself (a sum over b of sums over c)
        # (``factor_terms`` takes the common factor out, ``dout*(a - a*t**2 + b - b*t**2)``: the sum
        # beside it is what is grouped)
        body = sp.factor_terms(group_sums(body, into))
        body = sp.Mul(*[_grouped(f) if f.is_Add else f for f in sp.Mul.make_args(body)])
        out.append(cofactor * GroupedRed(body, j))
    return sp.Add(*out)


def _the_sum(term: sp.Expr, inner: sp.Expr, into: bool):
    """The sum of ``term`` that ``group_sums`` may group with other terms' sums, or None.

    A term with one sum has that one. A product of sums (``S1*sum(v5*v6)``, where ``S1`` is itself
    a sum over the same index) has, with ``into``, the one the others can move into: autograd's
    ``sum((dv6 - S1)*v6*v5)`` is expanded as ``-sum(dv6*v6*v5) + S1*sum(v6*v5)``, whose difference
    of sums loses every digit where the two agree. Of several, the one the fewest terms read: a sum
    read elsewhere is computed anyway, so merging the other saves a pass. Not where a sum picks
    entries (a one-hot of an argmax, a label's delta): that is a read of one entry per row, which
    the printer gathers, never a pass to merge another into."""
    sums = [f for f in sp.Mul.make_args(term) if isinstance(f, Red)]
    if len(sums) == 1:
        return sums[0]
    if not into or not sums or any(_picks(red.body) for red in sums):
        return None
    fits = [red for red in sums if all(_movable(other, free_indices(red)) for other in sums if other is not red)]
    if not fits:
        return None
    return min(fits, key=lambda red: (sum(t.has(red) for t in inner.args), sp.default_sort_key(red)))


def _picks(body: sp.Expr) -> bool:
    """Whether a sum's ``body`` selects entries: a one-hot of an argmax (or the opaque function
    ``hide_argmax`` stands in for it) or a Kronecker delta of labels."""
    return bool(body.atoms(IsArgmax, sp.KroneckerDelta)) or any(isinstance(f, AppliedUndef) for f in body.atoms(sp.Function))


def _movable(factor: sp.Expr, free: set) -> bool:
    """Whether ``factor`` can be multiplied into the body of a sum whose result varies along ``free``
    without making the sum cost more: an entry (or a power of one), or a sum, that varies along none
    of the other indices. Not a size or a constant: multiplying by one rounds nothing a difference
    needs."""
    if not isinstance(factor, Red) and not isinstance(factor.as_base_exp()[0], sp.Indexed):
        return False
    return free_indices(factor) <= free


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


