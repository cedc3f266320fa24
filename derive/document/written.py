"""The backward pass of the spec as written, one named line at a time, for the documents.

The engine (``differentiate.py``) differentiates a normal form in which the elementwise lines are
inlined and a reduction's definition is expanded (the variance becomes ``(sum x^2 - n mean^2)/(n-1)``):
right for the inputs' gradients, but its intermediate adjoints are not the gradients of the spec's
own variables. A document promises ``\\overline{v}`` = the gradient of the loss with respect to ``v``,
so it differentiates every named line exactly as the spec writes it:

* each named line ``C = D_C(...)`` is a definition in the spec's named values (unnamed temporaries of
  the line inlined); every variable ``V`` it reads receives, by the chain rule,
  ``sum_i \\bar C_i dD_C[i]/dV[p]``, written out with its Kronecker deltas before the sums collapse;
* a local derivative that contains the line's own value is written in it (``-(bnvar + eps)^{-3/2}/2``
  is ``-bnvar_inv^3/2``), as one writes ``1 - tanh^2`` by hand;
* ``\\bar V`` is the sum of what its uses send (the lecture's ``dbndiff = bnvar_inv*dbnraw + 2*bndiff*dbndiff2``);
* a path that carries nothing is found, not assumed: the value of the path (its adjoints substituted,
  in the engine's normal form) is zero, and the sum that makes it zero is named (the centred values
  ``bndiff`` sum to zero because ``bnmeani`` is their mean);
* each input's gradient is then reduced to the fused formula the way one does it on paper
  (``route``): the adjoints substituted one line at a time, sums that vanish dropped, then the values
  the forward pass saves brought in by solving their definitions, then the closed form.

Everything is read off the traced graph and the kernel; nothing is written per layer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from ..elements import Elements
from ..kernel import Kernel
from ..memo import kept_on
from ..simplify import closed_form, scalars
from ..symbolic import IsArgmax, Red, _Bound, expand, extent, hide_argmax, index_for, reductions, substitute_family
from ..trace import Node
from .notation import ADJOINT, Sigma

LEAVES = ("input", "labels")
ROUTE_MAX_STEPS = 40  # substitutions and rewrites of one route (the built-in layers need at most 12)


@dataclass
class Collapse:
    """A rule applied while a sum is evaluated: ``delta`` (``sum_j delta(j, e) f(j) = f(e)``) or
    ``constant`` (``sum_j c = extent(j)*c``)."""

    kind: str
    index: sp.Idx
    value: sp.Expr  # what the index becomes (delta) or the summed term (constant)


def unevaluated(expr: sp.Expr) -> sp.Expr:
    """``expr`` with its sums unevaluated, so differentiating it shows the Kronecker deltas. Outer
    sums first: rebuilt around an inner ``Sigma``, an outer ``Red`` would take the canonical name of
    an innermost sum (``_r1_d``, its body holding no ``Red`` any more) and capture the inner one's index."""
    if isinstance(expr, Red):
        return Sigma(unevaluated(expr.body), expr.index)
    if not expr.args or not expr.atoms(Red):
        return expr
    args = [unevaluated(a) for a in expr.args]
    return expr.func(*args)


def collapses(expr: sp.Expr) -> list[Collapse]:
    """The rules that evaluate the unevaluated sums of ``expr``, in a fixed order."""
    out = []
    for s in sorted(expr.atoms(Sigma), key=sp.default_sort_key):
        body, j = s.args
        for f in sorted(body.atoms(sp.KroneckerDelta), key=sp.default_sort_key):
            other = f.args[1] if f.args[0] == j else f.args[0] if f.args[1] == j else None
            if other is not None and j not in other.free_symbols:
                out.append(Collapse("delta", j, other))
        if not any(c.index == j for c in out):
            out += [Collapse("constant", j, t) for t in sp.Add.make_args(expand(body)) if j not in t.free_symbols]
    unique = {}
    for c in out:
        unique.setdefault((c.kind, c.index, c.value), c)
    return list(unique.values())


def collapsed(expr: sp.Expr) -> sp.Expr:
    """The unevaluated sums of ``expr`` evaluated as ``Red`` does (deltas collapse, constants are
    counted), but with products only multiplied out: a power such as ``(var + eps)^{-3/2}`` stays
    whole, as a reader writes it, where ``Red`` would expand it."""
    def evaluate(s):
        body, j = s.args
        out = []
        for term in sp.Add.make_args(sp.expand_mul(body)):
            factors = sp.Mul.make_args(term)
            delta = next((f for f in factors if isinstance(f, sp.KroneckerDelta) and j in f.args
                          and j not in (f.args[1] if f.args[0] == j else f.args[0]).free_symbols), None)
            if delta is not None:
                other = delta.args[1] if delta.args[0] == j else delta.args[0]
                out.append(sp.Mul(*[f for f in factors if f is not delta]).xreplace({j: other}))
            elif j not in term.free_symbols:
                out.append((j.upper + 1) * term)
            else:
                out.append(Red(term, j))
        return sp.Add(*out)

    while expr.atoms(Sigma):
        innermost = [s for s in expr.atoms(Sigma) if not s.args[0].atoms(Sigma)]
        expr = expr.xreplace({s: evaluate(s) for s in innermost})
    return expr


@dataclass
class Use:
    """What one named line ``consumer`` sends to a variable it reads."""

    consumer: Node
    target: Node
    definition: sp.Expr  # the consumer's line, element-wise, in the spec's named values
    chain: sp.Expr  # sum_i \bar C_i dD_C[i]/dV[p], unevaluated, at the target's free indices
    collapses: list[Collapse]
    local: sp.Expr  # the sums evaluated: \bar C times the local derivative
    in_values: sp.Expr  # the same with the consumer's own value brought in where it appears
    onehots: list[sp.Expr]  # Kronecker deltas on a label: only the labelled entry receives anything


@dataclass
class VanishingSum:
    """A sum that is zero by the definitions: ``total`` inlined is ``inlined``, which the named
    sums (``recognized``: (sum, value)) make zero."""

    total: sp.Expr
    inlined: sp.Expr
    recognized: list[tuple[sp.Expr, sp.Expr]]


@dataclass
class Dropped:
    """A sum dropped on an input's route: zero once its adjoints are substituted. ``pulled`` is the
    sum with the adjoints that are the same along it taken out; ``sums`` the sums in it that the
    definitions make zero (none when the adjoint it holds is itself zero)."""

    total: sp.Expr
    pulled: sp.Expr
    sums: list[VanishingSum]


@dataclass
class Vanished:
    """A path ``source -> via -> target`` whose contribution is zero, and why."""

    source: Node
    via: Node
    shown: sp.Expr  # the path's contribution, broadcast adjoints pulled out of the sums
    sums: list[VanishingSum]


@dataclass
class Adjoint:
    node: Node
    uses: list[Use]
    lecture: sp.Expr  # sum of the uses' contributions, in the uses' adjoints (placeholders)
    value: sp.Expr  # in the engine's normal form: inputs, reductions and the incoming gradient
    vanished: list[Vanished] = field(default_factory=list)

    @property
    def cancels(self) -> bool:
        """Its uses send something, and it adds up to zero."""
        return is_zero(self.value) and self.lecture != 0


@dataclass
class RouteStep:
    """One line of an input's route to the fused formula."""

    kind: str  # "adjoint" (an adjoint substituted), "recognize" (a named sum), "saved" (a definition
    # solved), "inline" (a line written out), "closed" (common factors out)
    node: Node | None  # whose adjoint or definition is used
    identity: tuple[sp.Expr, sp.Expr] | None  # the identity used (left, right)
    result: sp.Expr
    vanished: list[Dropped] = field(default_factory=list)


@dataclass
class Route:
    input: Node
    start: sp.Expr
    steps: list[RouteStep]
    matches: bool  # the route ends on the kernel's own formula
    zero_sums: list[sp.Idx] = field(default_factory=list)  # free indices the gradient sums to zero over


@lru_cache(maxsize=1024)
def is_zero(expr: sp.Expr) -> bool:
    """Zero as a rational function of its atoms (sums, elements): terms over different expansions
    of one denominator (``2 d (eps + var)`` and ``2 (eps + var)``, times ``d``) cancel too."""
    return expr == 0 or (not _nonzero_somewhere(expr) and sp.cancel(sp.together(expr)) == 0)


def _nonzero_somewhere(expr: sp.Expr) -> bool:
    """Whether ``expr`` is nonzero with its atoms (sums, maxima, elements, sizes, constants) set to
    numbers: then it is no zero function of them, and ``cancel`` need not prove it. (A
    standardization's gradient, 450 operations under square roots, took ``cancel`` 9 s to find
    nonzero.) Positive numbers, so roots and logarithms stay real; False where undecided."""
    draw = random.Random(0)
    values = {}
    for atom in sorted(expr.atoms(_Bound, sp.Indexed), key=sp.default_sort_key):
        values[atom] = sp.Rational(draw.randint(11, 29), 10)
    value = expr.xreplace(values)
    for symbol in sorted(value.free_symbols, key=sp.default_sort_key):
        values[symbol] = sp.Integer(draw.randint(3, 9)) if symbol.is_integer else sp.Rational(draw.randint(11, 29), 10)
    value = value.xreplace(values)
    if value.free_symbols:
        return False
    try:  # (a function left unevaluated, ``IsArgmax(3, 1.7)``, is no number: undecided)
        number = complex(value.evalf(60))
    except TypeError:
        return False
    return math.isfinite(abs(number)) and abs(number) > 1e-30


def _split_sums(expr: sp.Expr) -> sp.Expr:
    """Sums kept whole for floating point (``GroupedRed``) split as ``Red`` splits them: for comparing forms."""
    return expand(expr.replace(lambda e: isinstance(e, Red) and type(e) is not Red, lambda e: Red(*e.args)))


def placeholder(el: Elements, node: Node, indices: tuple | None = None) -> sp.Expr:
    """``\\bar{node}`` as a symbol of its own, at ``indices`` (its free indices by default)."""
    name = ADJOINT + node.name
    if not node.shape:
        return sp.Symbol(name, real=True)
    return sp.IndexedBase(name, real=True)[el.free(node) if indices is None else indices]


def _placeholder_nodes(expr: sp.Expr, nodes: dict[str, Node]) -> list[Node]:
    names = {str(e.base) for e in expr.atoms(sp.Indexed)} | {s.name for s in expr.free_symbols}
    return [nodes[n[len(ADJOINT):]] for n in names if n.startswith(ADJOINT) and n[len(ADJOINT):] in nodes]


class Written:
    """The spec's named lines differentiated as written (see the module docstring)."""

    def __init__(self, kernel: Kernel):
        self.kernel, self.el, self.graph = kernel, kernel.elements, kernel.graph
        graph, el = self.graph, self.el
        self.lines = [n for n in graph.nodes if n.op not in LEAVES and (n.named or n is graph.output)]
        self.inputs = [graph.inputs[name] for name in graph.layer.differentiable]
        self.nodes = {n.name: n for n in graph.nodes}
        self.definition = {n: self._definition(n) for n in self.lines}
        self.adjoints: dict[Node, Adjoint] = {}
        out = graph.output
        self.adjoints[out] = Adjoint(out, [], el.grad_ref(out), el.grad_ref(out))
        for node in reversed(self.lines[:-1] if self.lines[-1] is out else self.lines):
            self._adjoint(node)
        for node in self.inputs:
            self._adjoint(node)
        for adjoint in self.adjoints.values():  # an adjoint that cancels as a whole is explained as such
            adjoint.vanished = [] if adjoint.cancels else self._vanished(adjoint)

    # -- the spec's lines --------------------------------------------------------------------------
    def _definition(self, node: Node) -> sp.Expr:
        """The line's value in the spec's named values: its unnamed temporaries inlined."""
        el = self.el
        expr = el.direct(node)
        lines = set(self.lines)
        unnamed = [m for m in reversed(self.graph.nodes) if m not in lines and m.op not in LEAVES]
        changed = True
        while changed:
            changed = False
            for m in unnamed:
                base = el.base(m)
                new = expr.xreplace({base: el.direct(m)}) if isinstance(base, sp.Symbol) \
                    else substitute_family(expr, base, el.free(m), el.direct(m))
                if new != expr:
                    expr, changed = new, True
        return expr

    def reads(self, expr: sp.Expr, node: Node) -> bool:
        base = self.el.base(node)
        if isinstance(base, sp.Symbol):
            return base in expr.free_symbols
        return any(e.base == base for e in expr.atoms(sp.Indexed))

    def consumers(self, node: Node) -> list[Node]:
        return [c for c in self.lines if c is not node and self.reads(self.definition[c], node)]

    # -- reverse mode ------------------------------------------------------------------------------
    def _use(self, consumer: Node, target: Node) -> Use:
        el = self.el
        definition = self.definition[consumer]
        sizes, element = target.shape, el.free(target)
        base = el.base(target)
        read = next((e for e in definition.atoms(sp.Indexed) if e.base == base), None)
        if read is not None and len(read.indices) != len(sizes):
            # the lines are written in a frame where a view splits an axis (``x.view(n, g, c // g)``):
            # the target is read there through as many indices as the split has axes
            sizes, element = tuple(1 if i == 0 else extent(i) for i in read.indices), tuple(read.indices)
        # one placeholder per axis, two axes of one size apart (``scores (t, t)``: p_t, p_t_1)
        p = tuple(0 if s == 1 else index_for(f"p_{s}" + (f"_{k}" if s in sizes[:k] else ""), s)
                  for k, s in enumerate(sizes))
        local = sp.diff(unevaluated(definition), base[p] if sizes else el.ref(target))
        bar = placeholder(el, consumer)
        chain = bar * local
        own = [i for i in el.free(consumer) if i != 0]
        for i in reversed(own):
            chain = Sigma(chain, i)
        back = {pi: i for pi, i in zip(p, element) if pi != 0}
        summed = {i: index_for(f"_o_{i.name}", i.upper + 1) for i in own}
        shown = chain.xreplace({**summed, **back})
        # the sums evaluated before anything is expanded: a power such as (var + eps)^{-3/2} must stay
        # whole for the line's own value to be recognised in it
        short = collapsed(chain).xreplace(back)
        in_values = collapsed(self._in_values(chain, consumer)).xreplace(back)
        labels = {el.base(n) for n in self.graph.nodes if n.op == "labels"}
        onehots = sorted({d for d in short.atoms(sp.KroneckerDelta)
                          if any(isinstance(a, sp.Indexed) and a.base in labels for x in d.args for a in x.atoms(sp.Indexed))
                          or any(a.base in labels for a in d.atoms(sp.Indexed))}, key=sp.default_sort_key)
        return Use(consumer, target, definition, shown, collapses(shown), short, in_values,
                   onehots)

    def _in_values(self, expr: sp.Expr, node: Node) -> sp.Expr:
        """``expr`` with the line's own value ``node`` brought in where its definition appears
        (``exp(a)`` -> ``counts``; a power of the definition's base -> a power of ``node``)."""
        definition, ref = self.definition[node], self.el.ref(node)
        if reductions(definition):
            return expr
        hidden, restore = hide_argmax(expr)
        if definition.is_Pow and definition.exp.is_Rational and abs(definition.exp.p) == 1:
            # node = base**(±1/q): base = node**(±q), and node is the principal root, positive where defined
            base, power = definition.args
            positive = sp.Dummy("value", positive=True)
            new = hidden.xreplace({base: positive ** (1 / power)}).xreplace({positive: ref})
        else:
            new = hidden.xreplace({definition: ref})
        return restore(new)

    def _adjoint(self, node: Node) -> None:
        uses = [self._use(c, node) for c in self.consumers(node) if self.adjoints.get(c) is not None]
        lecture = sp.Add(*[u.in_values for u in uses])
        value = self.normal(self.with_values(lecture))
        self.adjoints[node] = Adjoint(node, uses, lecture, value)

    def with_values(self, expr: sp.Expr) -> sp.Expr:
        """Every adjoint placeholder in ``expr`` replaced by that adjoint's value."""
        for node in _placeholder_nodes(expr, self.nodes):
            value = self.adjoints[node].value
            bar = placeholder(self.el, node)
            expr = expr.xreplace({bar: value}) if isinstance(bar, sp.Symbol) \
                else substitute_family(expr, bar.base, self.el.free(node), value)
        return expr

    def normal(self, expr: sp.Expr, log: list | None = None) -> sp.Expr:
        """The engine's normal form: elementwise lines inlined, known sums recognised (into ``log``)."""
        el = self.el
        for node in reversed(self.lines):
            if node in el.opaque or node not in el.nf:
                continue
            base = el.base(node)
            expr = expr.xreplace({base: el.nf[node]}) if isinstance(base, sp.Symbol) \
                else substitute_family(expr, base, el.free(node), el.nf[node])
        return el.recognize(expand(sp.powsimp(expand(expr), combine="exp")), log)

    # -- paths that carry nothing ------------------------------------------------------------------
    def vanishing_sums(self, expr: sp.Expr) -> list[VanishingSum]:
        """The sums in ``expr`` that are zero once their adjoints are substituted and the lines inlined."""
        out = []
        for total in sorted(expr.atoms(Red), key=sp.default_sort_key):
            if any(total != q and total in q.atoms(Red) for q in expr.atoms(Red)):
                continue  # an inner sum: its outer one is tested
            log: list = []
            inlined = expand(self._inline(self.with_values(total)))
            if is_zero(self.el.recognize(inlined, log)):  # (0 as written too: the terms were alike)
                out.append(VanishingSum(total, inlined, log))
        return out

    def _inline(self, expr: sp.Expr) -> sp.Expr:
        el = self.el
        for node in reversed(self.lines):
            if node in el.opaque or node not in el.nf:
                continue
            base = el.base(node)
            expr = expr.xreplace({base: el.nf[node]}) if isinstance(base, sp.Symbol) \
                else substitute_family(expr, base, el.free(node), el.nf[node])
        return expr

    def _pulled(self, expr: sp.Expr) -> sp.Expr:
        """Adjoints that are the same along a summed axis (a broadcast: ``\\bar{bndiff2}_{rj} =
        \\bar{bnvar}_j/(n - 1)``) replaced by their uses, so they come out of the sums."""
        for _ in range(4):
            changed = False
            for node in _placeholder_nodes(expr, self.nodes):
                lecture = self.adjoints[node].lecture
                bar = placeholder(self.el, node)
                if isinstance(bar, sp.Symbol):
                    continue
                own = {i for i in bar.indices if i != 0}
                if not (lecture.free_symbols & own) < own:
                    continue
                new = substitute_family(expr, bar.base, self.el.free(node), lecture)
                if new != expr:
                    expr, changed = expand(new), True
            if not changed:
                break
        return expr

    def _carries_nothing(self, expr: sp.Expr) -> bool:
        """Whether ``expr``, its adjoints substituted and the lines inlined, is 0: once per
        expression (a use's value is asked again for every adjoint reached through its line, and
        the normal form of a long chain takes seconds)."""
        return kept_on(self, "_nothing", expr, lambda: is_zero(self.normal(self.with_values(expr))))

    def _vanished(self, adjoint: Adjoint) -> list[Vanished]:
        out = []
        for use in adjoint.uses:
            via = self.adjoints[use.consumer]
            for source in via.uses:
                bar = placeholder(self.el, use.consumer)
                path = use.in_values.xreplace({bar: source.in_values}) if isinstance(bar, sp.Symbol) \
                    else substitute_family(use.in_values, bar.base, self.el.free(use.consumer), source.in_values)
                path = expand(path)
                if path == 0 or self._carries_nothing(source.in_values):
                    continue
                if not self._carries_nothing(path):
                    continue
                shown = self._pulled(path)
                out.append(Vanished(source.consumer, use.consumer, shown, self.vanishing_sums(shown)))
        return out

    # -- an input's route to the fused formula -----------------------------------------------------
    def route(self, node: Node, drop: bool = True) -> Route:
        """``\\bar{node}`` from its uses to the kernel's formula (to zero for an adjoint that
        cancels), one identity per step."""
        formula = next((f.element for f in self.kernel.formulas if f.input == node.name), sp.S.Zero)
        expr = self.adjoints[node].lecture
        start, steps = expr, []
        order = {n: k for k, n in enumerate(self.graph.nodes)}
        for _ in range(ROUTE_MAX_STEPS):
            pending = sorted(_placeholder_nodes(expr, self.nodes), key=order.__getitem__)
            if not pending:
                break
            used = pending[0]
            bar = placeholder(self.el, used)
            lecture = self.adjoints[used].lecture
            new = expr.xreplace({bar: lecture}) if isinstance(bar, sp.Symbol) \
                else substitute_family(expr, bar.base, self.el.free(used), lecture)
            new, gone = self._drop_vanishing(expand(new)) if drop else (expand(new), [])
            steps.append(RouteStep("adjoint", used, (bar, lecture), new, gone))
            expr = new
        for line, total, value in self._named_sums(expr):
            expr = expand(expr.xreplace({total: value}))
            steps.append(RouteStep("recognize", line, (total, value), expr))
        expr, saved_steps = self._saved(expr)
        steps += saved_steps
        closed = closed_form(expr, scalars(self.el))
        if closed != expr:
            steps.append(RouteStep("closed", None, None, closed))
        matches = expand(_split_sums(closed) - _split_sums(formula)) == 0
        zero_sums = [i for i in self.el.free(node) if i != 0 and closed != 0
                     and is_zero(self.normal(Red(expand(closed), i)))]
        return Route(node, start, steps, matches, zero_sums)

    def _drop_vanishing(self, expr: sp.Expr) -> tuple[sp.Expr, list[Dropped]]:
        gone = self.vanishing_sums(expr)
        if gone:
            expr = expand(expr.xreplace({v.total: sp.S.Zero for v in gone}))  # (an int 0 where expr is the sum)
        dropped = []
        for v in gone:
            pulled = self._pulled(v.total)
            dropped.append(Dropped(v.total, pulled, [] if pulled.atoms(sp.Indexed) and _placeholder_nodes(
                sp.Add(*pulled.atoms(Red)), self.nodes) else self.vanishing_sums(pulled)))
        return expr, dropped

    def _named_sums(self, expr: sp.Expr) -> list[tuple[Node, sp.Expr, sp.Expr]]:
        """Sums in ``expr`` that a named line computes (``sum_t counts_it`` is ``counts_sum_i``):
        (line, sum, its value in the line's name)."""
        out = []
        for line in self.lines:
            definition = self.definition[line]
            for total in sorted(definition.atoms(Red) & expr.atoms(Red), key=sp.default_sort_key):
                x = sp.Dummy("x")
                linear = expand(definition.xreplace({total: x}))
                a = sp.diff(linear, x)
                b = expand(linear - a * x)
                if a != 0 and x not in a.free_symbols and x not in b.free_symbols and not b.atoms(Red):
                    out.append((line, total, (self.el.ref(line) - b) / a))
        return out

    def _saved(self, expr: sp.Expr) -> tuple[sp.Expr, list[RouteStep]]:
        """Bring in the values the forward pass saves: a line that is not saved is replaced by
        solving a saved line's definition for it (``bnraw = bndiff*bnvar_inv`` gives
        ``bndiff = bnraw/bnvar_inv``), or by its own definition; each step must read fewer unsaved lines."""
        saved = set(self.kernel.saved) | set(self.graph.layer.inputs) | {f"d{self.graph.output.name}"}
        steps = []
        for _ in range(ROUTE_MAX_STEPS):
            unsaved = self._unsaved(expr, saved)
            if not unsaved:
                break
            best = None
            for variable in sorted(unsaved, key=lambda n: -self.graph.nodes.index(n)):
                for line, target, solution in self._solutions(variable, saved):
                    new = self._substitute(expr, variable, target, solution)
                    score = (len(self._unsaved(new, saved)), sp.count_ops(new))
                    if best is None or score < best[0]:
                        best = (score, new, line, target, solution)
            if best is None or best[0][0] >= len(unsaved):
                break
            _, expr, line, target, solution = best
            steps.append(RouteStep("saved" if line.name in saved else "inline", line, (target, solution), expr))
        return expr, steps

    def _unsaved(self, expr: sp.Expr, saved: set) -> list[Node]:
        names = {str(e.base) for e in expr.atoms(sp.Indexed)} | {s.name for s in expr.free_symbols}
        return [self.nodes[n] for n in names if n in self.nodes and n not in saved and self.nodes[n] in self.definition]

    def _solutions(self, variable: Node, saved: set):
        """(line, variable's element, its value): from a saved line that reads it once, and its own definition."""
        el = self.el
        own = self.definition[variable]
        out = []
        if not reductions(own):
            out.append((variable, el.ref(variable), own))
        for line in self.lines:
            definition = self.definition[line]
            if line.name not in saved or line is variable or reductions(definition):
                continue
            target = el.ref(variable)
            if isinstance(target, sp.Indexed):
                mine = [e for e in definition.atoms(sp.Indexed) if e.base == target.base]
                if len(mine) != 1:
                    continue
                target = mine[0]
            symbol = sp.Dummy("v")
            replaced = definition.xreplace({target: symbol})
            if replaced.count(symbol) != 1 or any(isinstance(f, IsArgmax) or symbol in f.free_symbols
                                                  for f in replaced.atoms(sp.Function)):
                # (an argmax's, or an inverse of a function: sympy's solve took 14 s for
                # ``out = tanh(tanh(2*v))``, and ran for more than ten minutes for ``tanh(v)**3``)
                continue
            try:
                found = sp.solve(sp.Eq(el.ref(line), replaced), symbol, dict=False)
            except (NotImplementedError, ValueError, TypeError):
                continue
            if len(found) == 1:
                out.append((line, target, found[0]))
        return out

    def _substitute(self, expr: sp.Expr, variable: Node, target: sp.Expr, solution: sp.Expr) -> sp.Expr:
        if isinstance(target, sp.Symbol):
            new = expr.xreplace({target: solution})
        else:
            new = substitute_family(expr, target.base, tuple(target.indices), solution)
        return expand(sp.powsimp(expand(new), combine="exp"))


__all__ = ["Written", "Use", "Adjoint", "Vanished", "VanishingSum", "Route", "RouteStep", "placeholder", "LEAVES"]
