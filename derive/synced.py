"""The cross-rank variant of a fused kernel (``<name>_synced.py``): batch statistics over every rank.

A layer declares its batch axis, ``Tensor("n", "d", batch="n")``. In data-parallel training each
rank of a process group holds some rows of that axis, and the only values of the derivation that
mix rows of different ranks are the **sums over it**. They are read off the normal form (the
forward's ``AxisSum`` atoms, the fused gradients' ``Red`` atoms), never listed per layer:

* **forward**: each sum over the batch axis (``x.sum(0)``, the squared deviations' sum) is taken
  over the rank's rows, then over the ranks (``all_reduce``). Sums that do not depend on one
  another travel in one message; the first also carries the row count, so that ``n`` is the global
  batch size from then on (batchnorm: ``sum_x`` and ``n``, then ``sum_bndiff2``: two messages, the
  second needs the mean the first gives).
* **backward**: the gradient of an input that has the batch axis (``dx``) reads the sums over every
  rank (``sum_dout``, ``sum_bnraw_dout``: one message). The gradient of an input without it (a
  parameter: ``dgamma``) is linear in the upstream gradient, so its sum that reads the upstream
  gradient is left as the rank's own share: the shares add up to the whole batch's gradient, and
  ``DistributedDataParallel`` reduces them as it reduces every other parameter's gradient.

A maximum over the batch axis, or a sum over it inside another in a gradient, is refused (one
line, ``DerivationError``): it would need another collective than a sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .errors import DerivationError
from .forward_plan import Statement, _literal_values, forward_code
from .kernel import Formula, Kernel, _shapes, _shared_names, print_formulas
from .memo import ByObject
from .printer import ForwardPrinter, Frame, KernelPrinter
from .symbolic import AxisMax, AxisSum, Max, Red, extent


@dataclass
class SyncedKernel:
    kernel: Kernel
    batch: str  # the batch axis's size name (``n``), the global batch size after the first message
    forward: list[tuple[str, str]]
    blocks: list[dict]  # the backward: ``{"guard": ..., "lines": [...]}``
    crossing: list[str] = field(default_factory=list)  # ``sum_x = x.sum(0)``: each sum that crosses ranks
    messages: int = 0  # all-reduce calls per forward + backward (when every gradient is wanted)


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
    crossing = [f"{name} = {shown.doprint(value)}"
                f"  # forward, message {schedule.message_of[name]}"
                + (f" (with the row count {batch})" if schedule.message_of[name] == 1 else "")
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
    return SyncedKernel(kernel, batch, forward, merged, crossing, messages)


__all__ = ["SyncedKernel", "build_synced", "synced_cached", "has_batch_sums", "Schedule"]
