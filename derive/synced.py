"""The cross-rank variant of a fused kernel (``<name>_synced.py``): batch statistics over every rank.

A layer declares its batch axis, ``Tensor("n", "d", batch="n")``. In data-parallel training each
rank of a process group holds some rows of that axis, and the only values of the derivation that
mix rows of different ranks are the **sums over it**. They are read off the normal form (the
forward's ``AxisSum`` atoms, the fused gradients' ``Red`` atoms), never listed per layer:

* **forward**: each sum over the batch axis (``x.sum(0)``, the squared deviations' sum) is taken
  over the rank's rows, then over the ranks. Sums that do not depend on one another travel in one
  message; the first also carries the row count, so that ``n`` is the global batch size from then
  on. A sum that reads the first message's results through a polynomial (the squared deviations
  about the global mean) travels with them as its Taylor terms about the rank's own values, in one
  all-gather (``Schedule._gathered``; batchnorm: one message, as ``nn.SyncBatchNorm`` sends); any
  other waits for a second message (``all_reduce``).
* **backward**: the gradient of an input that has the batch axis (``dx``) reads the sums over every
  rank (``sum_dout``, ``sum_bnraw_dout``: one message). The gradient of an input without it (a
  parameter: ``dgamma``) is linear in the upstream gradient, so its sum that reads the upstream
  gradient is left as the rank's own share: the shares add up to the whole batch's gradient, and
  ``DistributedDataParallel`` reduces them as it reduces every other parameter's gradient.

A maximum over the batch axis, or a sum over it inside another in a gradient, is refused (one
line, ``DerivationError``): it would need another collective than a sum.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import sympy as sp

from .errors import DerivationError
from .forward_plan import Statement, _literal_values, forward_code
from .kernel import Formula, Kernel, _shapes, _shared_names, print_formulas
from .memo import ByObject
from .printer import ForwardPrinter, Frame, KernelPrinter
from .symbolic import AxisMax, AxisSum, Max, Red, expand, extent


@dataclass
class SyncedKernel:
    kernel: Kernel
    batch: str  # the batch axis's size name (``n``), the global batch size after the first message
    forward: list[tuple[str, str]]
    blocks: list[dict]  # the backward: ``{"guard": ..., "lines": [...]}``
    crossing: list[str] = field(default_factory=list)  # ``sum_x = x.sum(0)``: each sum that crosses ranks
    messages: int = 0  # collective calls per forward + backward (when every gradient is wanted)
    gathers: bool = False  # the forward's sums travel in one all-gather (``Schedule._gathered``)


def _chain(expr: sp.Expr, kinds) -> tuple[list, sp.Expr]:
    """The indices of directly nested sums (``x.sum(0).sum(2)``) and their innermost body."""
    indices = []
    while isinstance(expr, kinds):
        indices.append(expr.index)
        expr = expr.body
    return indices, expr


def has_batch_sums(kernel: Kernel) -> bool:
    """Whether ``kernel``'s layer declares a batch axis and its forward sums over it (else the
    layer needs no synced variant: its rows never meet; a gradient's sum over the batch axis is
    then a parameter's, which data-parallel training already reduces)."""
    if not kernel.layer.batch:
        return False
    index = kernel.elements.index[kernel.graph.sizes[kernel.layer.batch]]
    values, _ = _literal_values(kernel.elements)
    return any(index in _chain(a, AxisSum)[0] for v in values.values() for a in v.atoms(AxisSum))


def _refuse(kernel: Kernel, problem: str) -> DerivationError:
    return DerivationError(kernel.name, problem, "drop batch= from the declaration (the layer then has no "
                           "synced variant), or write the layer with sums over the batch axis only")


class Schedule:
    """Rewrites the forward's statements: every sum over the batch axis becomes a statement of its
    own, and after each group of sums that do not depend on one another, one message sums them
    over the ranks (``sum_x, n = _across_ranks(sum_x, count=n)``)."""

    def __init__(self, kernel: Kernel, index: sp.Idx, size: sp.Symbol):
        self.kernel, self.index, self.size = kernel, index, size
        self.crossing: list[tuple[str, sp.Expr]] = []  # (name, sum) in order
        self.message_of: dict[str, int] = {}  # sum name -> the message (1, 2, ...) that carries it
        self.messages = 0
        self.gathers = False  # the forward's sums travel in one all-gather (``_gathered``)

    def _reads_count(self, expr: sp.Expr) -> bool:
        """Whether ``expr`` reads the batch size as a number (not as the extent of a sum)."""
        if expr == self.size:
            return True
        if isinstance(expr, (sp.Indexed, sp.Idx)):
            return False
        if isinstance(expr, (AxisSum, AxisMax)):
            return self._reads_count(expr.body)
        return any(self._reads_count(a) for a in expr.args)

    def _hoist(self, expr: sp.Expr, taken: set, new: list) -> sp.Expr:
        if isinstance(expr, AxisMax) and expr.index == self.index:
            raise _refuse(self.kernel, "a maximum over the batch axis cannot be summed across ranks")
        if isinstance(expr, AxisSum):
            indices, body = _chain(expr, AxisSum)
            if self.index in indices:
                inner = self._hoist(body, taken, new)
                whole = expr.xreplace({body: inner}) if inner is not body else expr
                for name, value in new:
                    if value == whole:
                        return sp.Symbol(name)
                bases = sorted({str(b) for b in whole.atoms(sp.IndexedBase)} | {s.name for s in inner.free_symbols
                               if isinstance(s, sp.Symbol) and s.name in taken})
                base = "sum_" + "_".join(bases or ["values"])
                name, k = base, 1
                while name in taken:
                    k += 1
                    name = f"{base}{k}"
                taken.add(name)
                new.append((name, whole))
                return sp.Symbol(name)
        if not expr.args:
            return expr
        args = [self._hoist(a, taken, new) for a in expr.args]
        return expr if all(a is b for a, b in zip(args, expr.args)) else expr.func(*args)

    def _global_parts(self, expr: sp.Expr, known: set) -> list:
        """The largest pieces of ``expr`` read from ``known`` values alone (the first message's sums,
        the batch size, constants), with at least one of the first message's values in them."""
        if isinstance(expr, (sp.Indexed, sp.Idx, AxisSum, AxisMax)):
            return []
        if not expr.atoms(sp.Indexed, sp.Idx) and expr.free_symbols <= known and expr.free_symbols & self._first:
            return [expr]
        return [p for a in expr.args for p in self._global_parts(a, known)]

    def _gathered(self, hoisted: list[Statement], sums: set, block: dict) -> list[Statement] | None:
        """The forward in one message, or None where the sums do not allow it.

        A sum over the batch axis that waits for the first message (the squared deviations about
        the global mean) reads the first message's values ``u`` (``sum_x/n``) through a polynomial
        ``f(x_i, u)``. About each rank's own value ``u_r`` (its own sums and row count) it is exactly
        its Taylor series, ``sum_i f(x_i, u) = sum_k (u - u_r)**k/k! * sum_i f^(k)(x_i, u_r)``, so each
        rank computes its terms ``sum_i f^(k)(x_i, u_r)`` before any message, one all-gather brings
        every rank's terms and sums, and each rank adds them up (for batchnorm: Chan's parallel
        variance, the same one message ``nn.SyncBatchNorm`` sends). The identity is checked here.
        """
        first = [st for st in hoisted if st.name in sums and block[st.name] == 0]
        second = [st for st in hoisted if st.name in sums and block[st.name] == 1]
        if not first or not second or any(block[s] > 1 for s in sums):
            return None
        by_name = {st.name: st for st in hoisted}
        frame = self.kernel.frame
        later = {n for n, level in block.items() if level >= 1 and n not in sums}
        self._first = {sp.Symbol(st.name) for st in first} | {self.size}
        graph = self.kernel.graph
        known = self._first | set(graph.sizes.values()) | set(graph.constants.values())
        first_values = {sp.Symbol(st.name): st.value for st in first}
        terms: list[Statement] = []  # each rank's Taylor terms, before the message
        combined: list[tuple[str, sp.Expr]] = []  # each second sum from every rank's terms
        taken = set(by_name) | {n.name for n in graph.nodes}
        for st in second:
            indices, body = _chain(st.value, AxisSum)
            for _ in range(len(hoisted) + 1):  # inline the values computed after the first message
                reads = {e: by_name[str(e.base)].value for e in body.atoms(sp.Indexed) if str(e.base) in later}
                if any(i != 0 and i != f for e in reads for i, f in zip(e.indices, frame)):
                    return None  # read at other indices than its own (a gather): not inlined
                reads |= {s: by_name[s.name].value for s in body.free_symbols
                          if isinstance(s, sp.Symbol) and s.name in later}
                if not reads:
                    break
                body = body.xreplace(reads)
            if any(str(e.base) in later | sums for e in body.atoms(sp.Indexed)) or body.atoms(AxisSum, AxisMax) \
                    or body.free_symbols & {sp.Symbol(n) for n in later | sums} - self._first:
                return None
            parts = list(dict.fromkeys(self._global_parts(body, known)))
            u = [sp.Dummy(f"u{k}") for k in range(len(parts))]
            f = body.xreplace(dict(zip(parts, u)))
            if not parts or f.free_symbols & self._first or not f.is_polynomial(*u):
                return None
            try:
                degree = sp.Poly(f, *u).degree_list()
            except sp.PolynomialError:
                return None
            if sum(degree) > 4:
                return None
            u_rank = [sp.Dummy(f"v{k}") for k in range(len(parts))]
            series, check = sp.S.Zero, sp.S.Zero
            for orders in itertools.product(*(range(d + 1) for d in degree)):
                derivative = f.diff(*[(v, k) for v, k in zip(u, orders) if k]) if any(orders) else f
                if derivative == 0:
                    continue
                name = f"{st.name}_{len(terms)}"
                while name in taken:
                    name += "_"
                taken.add(name)
                local = derivative.xreplace(dict(zip(u, parts)))
                for index in reversed(indices):
                    local = AxisSum(local, index)
                factor = sp.Mul(*[(v - w) ** k / sp.factorial(k) for v, w, k in zip(u, u_rank, orders)])
                check += factor * derivative.xreplace(dict(zip(u, u_rank)))
                if _vanishes(local.xreplace(first_values)):
                    continue  # sum_i (x_i - x_mean_r) about the rank's own mean: zero, and not sent
                inner = _chain(local, AxisSum)[1]
                ratios = [(t.name, sp.cancel(inner / _chain(t.value, AxisSum)[1])) for t in terms
                          if _chain(t.value, AxisSum)[0] == indices]
                same = next(((t, r) for t, r in ratios if r.is_number), None)
                if same is not None:  # a multiple of a term already sent (sum 3*c**2 beside sum c**2)
                    series += factor * same[1] * sp.Symbol(same[0])
                    continue
                terms.append(Statement(name, local))
                series += factor * sp.Symbol(name)
            if sp.expand(check - f) != 0:  # the series about u_r is f at u, in exact arithmetic
                return None
            whole = body  # the sum as read from the first message's values (its shape, for the printer)
            for index in reversed(indices):
                whole = AxisSum(whole, index)
            combined.append((st.name, series, parts, u, u_rank, whole))
        # the message: each rank's first sums, Taylor terms and row count; then every rank's added up
        sent = [st.name for st in first] + [t.name for t in terms if t.value.atoms(sp.Indexed)]
        ranked = {name: sp.Symbol(f"{name}_ranks") for name in sent}
        ranked[str(self.size)] = sp.Symbol(f"{self.size}_ranks")
        per_rank = {sp.Symbol(n): r for n, r in ranked.items() if n != str(self.size)} | {self.size: ranked[str(self.size)]}
        size = str(self.size)
        out = [st for st in hoisted if block[st.name] == 0 and st.name not in sums or st in first]
        out += [t for t in terms if t.value.atoms(sp.Indexed)]  # a term of the row count alone is computed per rank below
        targets = [f"{n}_ranks" for n in sent] + [f"{size}_ranks"]
        reads = [sp.Symbol(n) for n in sent] + [self.size]
        out.append(Statement("_message0", sp.Tuple(*reads, *map(sp.Symbol, targets)),
                             code=f"{', '.join(targets)} = _from_ranks({', '.join(sent)}, _count={size})"))
        firsts = [st.name for st in first]
        out.append(Statement("_totals", sp.Tuple(*map(sp.Symbol, firsts + targets), self.size),
                             code=f"{', '.join(firsts + [size])} = "
                                  f"{', '.join(f'{n}_ranks.sum(0)' for n in firsts)}, int({size}_ranks.sum())"))
        def count_times(e):  # a sum of a row count alone (``sum_i 2`` over n and l): the count times it
            return e.replace(lambda a: isinstance(a, AxisSum) and not a.body.atoms(sp.Indexed, AxisSum),
                             lambda a: extent(a.index) * a.body)
        constant_terms = {t.name: count_times(t.value) for t in terms if not t.value.atoms(sp.Indexed)}
        for name, series, parts, u, u_rank, whole in combined:
            value = series.xreplace({sp.Symbol(n): v.xreplace(per_rank) for n, v in constant_terms.items()})
            value = value.xreplace({**dict(zip(u, parts)), **{w: p.xreplace(per_rank) for w, p in zip(u_rank, parts)}})
            value = value.xreplace({sp.Symbol(n): r for n, r in ranked.items() if n not in firsts and n != size})
            if any(not isinstance(a, (sp.Add, sp.Mul, sp.Pow, sp.Symbol, sp.Number)) for a in sp.preorder_traversal(value)):
                return None
            out.append(Statement(f"_sum_{name}", sp.Tuple(*value.free_symbols, sp.Symbol(name)),
                                 code=f"{name} = ({sp.sstr(value)}).sum(0)", layouts={name: whole}))
        out += [st for st in hoisted if block[st.name] >= 1 and st.name not in sums]
        self.messages = 1
        self.gathers = True
        self.message_of.update({name: 1 for name in firsts + [c[0] for c in combined]})
        return out

    def __call__(self, statements: list[Statement]) -> list[Statement]:
        taken = {st.name for st in statements} | {n.name for n in self.kernel.graph.nodes}
        hoisted: list[Statement] = []
        sums: set = set()
        for st in statements:
            new: list = []
            value = self._hoist(st.value, taken, new)
            for name, whole in new:
                hoisted.append(Statement(name, whole))
                sums.add(name)
                self.crossing.append((name, whole))
            hoisted.append(Statement(st.name, value, st.node, st.lines))
        # each statement waits for as many messages as the values it reads; a sum's own message
        # comes after the group it waits in; the batch size arrives with the first message
        wait, block = {}, {}
        for st in hoisted:
            reads = {s.name for s in st.value.free_symbols}
            level = max([wait[r] for r in reads if r in wait], default=0)
            if self._reads_count(st.value):
                level = max(level, 1)
            block[st.name] = level
            wait[st.name] = level + 1 if st.name in sums else level
        gathered = self._gathered(hoisted, sums, block)
        if gathered is not None:
            return gathered
        out = []
        last = max(block.values(), default=0)
        size = str(self.size)
        for level in range(last + 1):
            out += [st for st in hoisted if block[st.name] == level]
            group = [st.name for st in hoisted if st.name in sums and block[st.name] == level]
            count = level == 0
            if not group and not (count and last > 0):
                continue
            targets = group + ([size] if count else [])
            arguments = group + ([f"_count={size}"] if count else [])
            if not group:
                arguments.append(f"_like={next(iter(self.kernel.layer.tensors))}")
            code = f"{', '.join(targets)}{',' if len(targets) == 1 else ''} = _across_ranks({', '.join(arguments)})"
            out.append(Statement(f"_message{level}", sp.Tuple(*map(sp.Symbol, targets)), code=code))
            self.messages += 1
            self.message_of.update({name: self.messages for name in group})
        return out


def _vanishes(expr: sp.Expr) -> bool:
    """Whether ``expr``, its sums as written (``AxisSum``) read as canonical sums (``Red``), is zero:
    ``sum_i (2*x_i - 2*sum_j x_j/n)`` is, by linearity."""
    as_red = expr.replace(lambda e: isinstance(e, AxisSum), lambda e: Red(expand(e.body), e.index))
    return expand(as_red) == 0


def _reads_upstream(expr: sp.Expr, upstream: str) -> bool:
    return any(str(e.base) == upstream for e in expr.atoms(sp.Indexed))


_SYNCED = ByObject(maxsize=32)


def synced_cached(kernel: Kernel) -> SyncedKernel:
    """``build_synced(kernel)`` once per kernel object (its module and both documents read it)."""
    return _SYNCED.get(kernel, build_synced)


def build_synced(kernel: Kernel) -> SyncedKernel:
    """The synced variant of the fused ``kernel`` of a layer that declares a batch axis."""
    layer, graph, el = kernel.layer, kernel.graph, kernel.elements
    batch = layer.batch
    size = graph.sizes[batch]
    index = el.index[size]
    frame = kernel.frame  # the printing frame's indices, as the kernel's own formulas are printed
    names = {s: str(s) for s in graph.sizes.values()}

    schedule = Schedule(kernel, index, size)
    forward = forward_code(el, kernel.saved, frame, names, schedule=schedule)

    # the backward: every sum over the batch axis in a gradient, outermost chains
    upstream = f"d{graph.output.name}"
    chains: list = []

    def collect(expr):
        if isinstance(expr, Max) and extent(expr.index) == size:
            raise _refuse(kernel, "a maximum over the batch axis cannot be summed across ranks")
        if isinstance(expr, Red):
            indices, body = _chain(expr, Red)
            if any(extent(i) == size for i in indices):
                if any(any(extent(i) == size for i in _chain(r, Red)[0]) for r in body.atoms(Red)):
                    raise _refuse(kernel, "a gradient sums over the batch axis inside another such sum")
                if expr not in chains:
                    chains.append(expr)
                return
        for a in expr.args:
            collect(a)

    for f in kernel.formulas:
        collect(f.element)
    taken = {n.name for n in graph.nodes} | {f"d{n.name}" for n in graph.nodes} | set(names.values())
    global_names = _shared_names(chains, taken)
    local_names = [f"local_{g}" for g in global_names]
    taken |= set(local_names)
    shapes = _shapes(graph)
    for chain, g, loc in zip(chains, global_names, local_names):
        shapes[g] = shapes[loc] = tuple(extent(i) if i in chain.free_symbols else 1 for i in frame)
    batch_inputs = {k for k, decl in layer.tensors.items() if batch in decl.dims}
    formulas, reads_local, reads_global = [], {}, {}
    def element_of(name, chain):  # the sum as a tensor of its own, read like a saved (1, d) value
        return sp.IndexedBase(name)[tuple(i if i in chain.free_symbols else 0 for i in frame)]

    for f in kernel.formulas:
        mapping = {}
        for chain, g, loc in zip(chains, global_names, local_names):
            own_share = f.input not in batch_inputs and _reads_upstream(chain, upstream)
            mapping[chain] = element_of(loc if own_share else g, chain)
        element = f.element.xreplace(mapping)
        formulas.append(Formula(f.input, f.position, element))
        read = {str(e.base) for e in element.atoms(sp.Indexed)}
        for g, loc in zip(global_names, local_names):
            if loc in read:
                reads_local.setdefault(loc, []).append(f.position)
            if g in read:
                reads_global.setdefault(g, []).append(f.position)
    try:
        shared, codes = print_formulas(layer, el, formulas, frame, shapes, taken=taken)
    except DerivationError as e:
        raise DerivationError(layer.name, e.problem, e.fix, tensor=e.tensor) from None
    dtype_of = upstream
    printer = KernelPrinter(Frame(frame), shapes, names, dtype_of)

    def guard(positions) -> str:
        return " or ".join(f"needs[{p}]" for p in sorted(set(positions)))

    blocks = []
    shown = ForwardPrinter(Frame(frame), shapes, names, dtype_of=upstream)
    gathered = "each rank's own terms, all-gathered"
    crossing = [f"{name} = {shown.doprint(value)}"
                f"  # forward, message {schedule.message_of[name]}"
                + (f" ({gathered})" if schedule.gathers else
                   f" (with the row count {batch})" if schedule.message_of[name] == 1 else "")
                for name, value in schedule.crossing]
    messages = schedule.messages
    for chain, g, loc in zip(chains, global_names, local_names):
        users = reads_local.get(loc, []) + reads_global.get(g, [])
        if users:
            blocks.append(dict(guard=guard(users), lines=[f"{loc} = {printer.doprint(chain)}"]))
            if g in reads_global:
                crossing.append(f"{g} = {printer.doprint(chain)}  # backward, message {messages + 1}")
    sent = [g for g in global_names if g in reads_global]
    if sent:
        users = [p for g in sent for p in reads_global[g]]
        blocks.append(dict(guard=guard(users), lines=[
            f"{', '.join(sent)}{',' if len(sent) == 1 else ''} = _across_ranks({', '.join('local_' + g for g in sent)})"]))
        messages += 1
    for s in shared:
        blocks.append(dict(guard=guard(s.users), lines=[f"{s.name} = {s.code}"]))
    for f, (code, _, fast, _) in zip(formulas, codes):
        blocks.append(dict(guard=f"needs[{f.position}]", lines=fast or [f"d{f.input} = {code}"]))
    merged = []
    for b in blocks:
        if merged and merged[-1]["guard"] == b["guard"]:
            merged[-1]["lines"] += b["lines"]
        else:
            merged.append(dict(guard=b["guard"], lines=list(b["lines"])))
    return SyncedKernel(kernel, batch, forward, merged, crossing, messages, schedule.gathers)


__all__ = ["SyncedKernel", "build_synced", "synced_cached", "has_batch_sums", "Schedule"]
