"""The fused forward pass: compute the output and exactly the tensors the backward reads.

Replaying the spec line by line keeps every intermediate alive and passes over memory once per
line. Instead, every value the kernel must produce (the output, the saved tensors, and the named
reductions they read: ``logit_maxes``, ``counts_sum``, ``bnvar``) is written as one expression
over the inputs and those reductions (``Elements.literal``: as the spec writes it, nothing
expanded), and then:

* **stabilised**: a logarithm of a product is split where that removes an ``exp`` (``log(probs)``
  becomes ``norm_logits - log(counts_sum)``, finite where ``probs`` underflows to 0);
* **shared**: a value already computed (a saved tensor) is reused by later ones, and repeated
  subexpressions become temporaries (``cse``);
* **scheduled** on demand, and printed with in-place updates of temporaries that die at that line
  (``t.exp_()``, ``t.div_(counts_sum)``), so a full-size buffer is reused instead of allocated.

The result is a list of ``(code, comment)`` lines; the comment names the spec lines each covers.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import sympy as sp

from .elements import CONTRACTIONS, REDUCING_OPS, Elements
from .errors import DerivationError
from .symbolic import AxisLogSumExp, AxisMax, AxisSoftmax, AxisSum, AxisVar, extent
from .printer import LAYOUT_CALLS, ForwardPrinter, Frame, _wrap, fit_shape, stored_layouts, temporaries
from .spec import Tensor
from .trace import Node


@dataclass
class Statement:
    name: str
    value: sp.Expr
    node: Node | None = None  # None for a shared temporary
    lines: set = field(default_factory=set)  # spec lines it computes
    code: str = ""  # a statement printed as it is (a message across ranks, ``synced``); value: what it reads
    layouts: dict = field(default_factory=dict)  # of a printed statement: name -> a value of the shape it binds


def _transcendentals(expr: sp.Expr) -> int:
    return len(expr.atoms(sp.exp)) + len(expr.atoms(sp.log))


def stabilise(expr: sp.Expr) -> sp.Expr:
    """Split logarithms of products (of positive factors) where that cancels an ``exp``."""
    split = sp.expand_log(expr)
    return split if _transcendentals(split) < _transcendentals(expr) else expr


def _kept(el: Elements) -> set:
    """Nodes computed as their own tensors: named reductions, and a tensor picked from (``z[range(n), y]``)
    whose value sums or maximises over another axis than the one picked (``z = x - x.sum(0)``): the
    pick is then a ``gather`` of it; a matrix product of a vector (``c @ A``, ``v @ w``), which
    inlined would be the elementwise product summed (a rounding per product, where the spec's ``@``
    fuses them), while as a statement of its own it prints as ``@``; and every operand of a matrix
    product that is not an input (``v8`` of ``v8.T @ v8``, ``v8 = v5 - log(v7)``): inlined, the
    product of two computed operands printed as a broadcast product summed (n x k x k elements, 40
    to 400 times the spec's time at 1024 x 512). Every other value is inlined."""
    graph = el.graph
    kept = {n for n in graph.nodes if n.named and n.op in REDUCING_OPS and n is not graph.output}
    kept |= {n for n in graph.nodes if n.op in CONTRACTIONS and n is not graph.output
             and any(sum(1 for s in a.shape if s != 1) <= 1 for a in n.args)}
    kept |= {_through_views(a) for n in graph.nodes if n.op in CONTRACTIONS for a in n.args} - set(graph.inputs.values())
    picks = [(n.args[0], 1 if n.op == "pick" else 0) for n in graph.nodes if n.op in ("pick", "embed")]
    while picks:
        try:
            values, _ = _literal_values(el, kept)
        except _ReadAtLabels as e:  # a softmax picked at the labels: computed whole, then gathered
            kept.add(e.table)
            continue
        for table, axis in picks:
            if table in values:
                picked = el.free_axes(table)[axis][0]
                if any(b.index != picked for b in values[table].atoms(AxisSum, AxisMax, AxisLogSumExp, AxisVar)) \
                        or values[table].atoms(AxisSoftmax):
                    kept.add(table)
        break
    return kept


def _through_views(node: Node) -> Node:
    """The value ``node`` reads through transposes and views (``v8`` of ``v8.T``)."""
    while node.op in ("permute", "view") and node.args:
        node = node.args[0]
    return node


class _ReadAtLabels(Exception):
    """A value written as one operation along an axis (``AxisSoftmax``) read at labels along it."""

    def __init__(self, table: Node):
        self.table = table


def plan(el: Elements, saved: list[str], frame: list) -> list[Statement]:
    """The statements that compute the output and ``saved``, temporaries included, in order."""
    graph = el.graph
    kept = _kept(el)
    values, lines = _literal_values(el, kept)
    wanted = [n for n in graph.nodes if n.name in saved and n in values] + [graph.output]
    needed, stack = set(wanted), list(wanted)
    while stack:
        for m in _reads(values[stack.pop()], kept):
            if m not in needed:
                needed.add(m)
                stack.append(m)
    emitted = [n for n in graph.nodes if n in needed]

    exprs, reuse = [], []
    for node in emitted:
        expr = stabilise(values[node])
        for earlier, value in reuse:
            expr = _reuse(expr, value, el, earlier)
        exprs.append(expr)
        # (not a value without a tensor in it, ``v1 - v1`` = 0: every 0 of the later values, their
        # indices included, would read the node: ``v5[0, k]`` became ``v5[v2[0, k], k]``)
        if node not in kept and values[node].atoms(sp.Indexed):
            reuse.append((node, values[node]))

    replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("_t"), order="none")
    replacements, reduced = _stored_as_read(replacements, reduced)
    replacements, reduced = _inline_mixed_sums(replacements, reduced)
    replacements, reduced = _spec_names(replacements, reduced, values, {n.name for n in emitted})
    replacements, reduced = _inline_scalars(replacements, reduced, {n.name for n in graph.nodes})
    by_name = {n.name: lines[n] for n in values}
    statements = _schedule(emitted, reduced, replacements, lines, by_name)
    temps = temps_of(statements)
    layouts = {st.name: layout(st.value, temps, frame) for st in statements if st.node is None}
    axes = {st.name: [i for i in frame if i in st.value.xreplace(temps).free_symbols]
            for st in statements if st.node is None}
    return _name_results(statements, el, layouts, axes)


def _reuse(expr: sp.Expr, value: sp.Expr, el: Elements, earlier: Node) -> sp.Expr:
    """``expr`` reading the computed tensor ``earlier`` wherever it has its ``value``: at the value's
    own indices, and at other indices of the same sizes, such as a sum's (``v2 = (x - c) @ A`` reads
    ``v1 = x - c`` as ``v1[i, j]`` inside the sum over ``j``: a matrix product of ``v1``, instead of
    ``x - c`` computed again and multiplied entry by entry)."""
    own = el.free(earlier)
    indices = [i for i in own if isinstance(i, sp.Idx)]
    present = expr.atoms(sp.Idx)
    options = [[i] + sorted((j for j in present if j != i and extent(j) == extent(i)), key=str) for i in indices]
    for chosen in itertools.product(*options):
        if len(set(chosen)) < len(chosen):
            continue  # two axes read at one index: a diagonal, not this value
        at = dict(zip(indices, chosen))
        expr = expr.subs(value.xreplace(at), el.ref(earlier, tuple(at.get(i, i) for i in own)))
    return expr


def _stored_as_read(replacements: list, reduced: list) -> tuple[list, list]:
    """Each temporary difference that every read negates, stored negated. SymPy's ``cse`` takes the
    sign out of a difference (``x - max`` of a log-softmax written out becomes ``_t0 = max - x``,
    read as ``-_t0``), and each negated read was a full-size pass of its own; the difference the
    other way round is one subtraction all the same. (Any other value, ``log(s) + m``, stays as
    it is: negated, its terms would cost negations of their own.)"""
    def negatives(e) -> int:
        return sum(t.could_extract_minus_sign() for t in sp.Add.make_args(e))

    replacements, reduced = list(replacements), list(reduced)
    for k, (symbol, value) in enumerate(replacements):
        readers = [v for _, v in replacements[k + 1:]] + reduced
        if not isinstance(value, sp.Add) or negatives(-value) > negatives(value) \
                or not any(r.has(symbol) for r in readers) or any(r.count(-symbol) != r.count(symbol) for r in readers):
            continue
        flipped = {symbol: -symbol}
        replacements[k] = (symbol, -value)
        replacements[k + 1:] = [(s, v.xreplace(flipped)) for s, v in replacements[k + 1:]]
        reduced = [r.xreplace(flipped) for r in reduced]
    return replacements, reduced


def temps_of(statements: list["Statement"]) -> dict:
    """Temporary symbol -> its value with every temporary it reads substituted."""
    full = {}
    for st in statements:
        if st.node is None and not st.code:
            full[sp.Symbol(st.name)] = st.value.xreplace(full)
        for name, value in st.layouts.items():
            full[sp.Symbol(name)] = value.xreplace(full)
    return full


def layout(expr: sp.Expr, temps: dict, frame: list) -> tuple:
    """The shape ``expr`` has when printed in the frame (size 1 on the axes it does not vary on)."""
    free = expr.xreplace(temps).free_symbols
    return tuple(extent(i) if i in free else 1 for i in frame)


def _spec_names(replacements: list, reduced: list, values: dict, taken: set):
    """A temporary equal to a named spec value (``counts``, ``bndiff``) takes that name."""
    by_value = {}
    for node, value in values.items():
        if node.named and node.name not in taken:
            by_value.setdefault(value, node.name)
    rename, expanded = {}, {}
    for symbol, value in replacements:
        expanded[symbol] = value.xreplace(expanded)
        name = by_value.get(expanded[symbol])
        if name is not None and name not in taken:
            rename[symbol] = sp.Symbol(name)
            taken.add(name)
    return ([(rename.get(s, s), v.xreplace(rename)) for s, v in replacements], [r.xreplace(rename) for r in reduced])


def _is_tensor(expr: sp.Expr, tensors: set) -> bool:
    return any(isinstance(s, sp.Idx) or s.name in tensors for s in expr.free_symbols)


def _inline_scalars(replacements: list, reduced: list, tensors: set):
    """Put temporaries that are plain numbers (``1/n``) back into the expressions that use them."""
    scalar, kept = {}, []
    for symbol, value in replacements:
        value = value.xreplace(scalar)
        if _is_tensor(value, tensors | {s.name for s, _ in kept}):
            kept.append((symbol, value))
        else:
            scalar[symbol] = value
    return kept, [r.xreplace(scalar) for r in reduced]


def _computed(term: sp.Expr) -> bool:
    """Whether ``term`` evaluates a function (``log(s)``), rather than reading values as they are."""
    return any(isinstance(f, sp.Function) and not isinstance(f, (AxisSum, AxisMax)) for f in sp.preorder_traversal(term))


def _inline_mixed_sums(replacements: list, reduced: list):
    """A temporary that adds a value read as it is to a function of values (``_t1 = m + log(s)``,
    shared by ``cse``) is split: the function keeps a temporary of its own, and the sum goes back
    where it is used. Each sum is then added in the printer's order, values first, functions last:
    ``logits[y] - (m + log(s))`` would round ``log(s)`` away at logits of 1e6, where
    ``logits[y] - m - log(s)`` cancels ``m`` first."""
    mixed, kept = {}, []
    for symbol, value in replacements:
        value = value.xreplace(mixed)
        parts = sp.Add.make_args(value)
        computed = [t for t in parts if _computed(t)]
        if value.is_Add and computed and len(computed) < len(parts):
            function = sp.Symbol(f"{symbol.name}f")
            kept.append((function, sp.Add(*computed)))
            mixed[symbol] = sp.Add(*[t for t in parts if not _computed(t)]) + function
        else:
            kept.append((symbol, value))
    return kept, [r.xreplace(mixed) for r in reduced]


def _name_results(statements: list["Statement"], el: Elements, layouts: dict, axes: dict) -> list["Statement"]:
    """``bnraw = _t2`` with ``_t2`` a temporary of bnraw's shape: call the temporary ``bnraw``.

    Also where the two differ in axes of 1 alone (``_t0 = torch.exp(t2.view(n, 1, 1))`` then
    ``v = _t0.reshape(n, 1)``, in a frame of three axes; ``axes``: the frame indices each
    temporary varies along): the node's line is then printed in its own layout (``forward_code``),
    one line and no views. Never where the order of its axes differs (a transpose each way)."""
    aliases = {}
    for st in statements:
        if st.node is not None and isinstance(st.value, sp.Symbol) and st.value.name in layouts \
                and el.shape(st.node) == tuple(st.node.shape) \
                and (layouts[st.value.name] == el.shape(st.node)
                     or axes[st.value.name] == [i for i in el.free(st.node) if i != 0]):
            # two spec values equal to one temporary (``c.max(1)`` written twice): the first takes
            # its name, the other reads the first
            aliases.setdefault(st.value.name, st)
    rename = {sp.Symbol(t): el.ref(st.node) for t, st in aliases.items()}
    out = []
    for st in statements:
        if st.node is not None and isinstance(st.value, sp.Symbol) and aliases.get(st.value.name) is st:
            continue
        target = aliases.get(st.name) if st.node is None else None
        if target is not None:
            out.append(Statement(target.name, st.value.xreplace(rename), target.node, target.lines))
        else:
            out.append(Statement(st.name, st.value.xreplace(rename), st.node, st.lines))
        if st.node is not None and isinstance(st.value, sp.Symbol) and st.value.name in layouts \
                and st.value.name not in aliases:
            # ``probs = _t2.reshape(n, m)``: later lines read ``probs`` (a tensor a matrix product can take)
            rename[st.value] = el.ref(st.node)
    return out


def _literal_values(el: Elements, kept: set | None = None) -> tuple[dict, dict]:
    """Each computed node as one literal expression over the inputs and the ``kept`` nodes, and
    the spec lines that expression covers."""
    kept = _kept(el) if kept is None else kept
    values, lines = {}, {}
    for node in el.graph.nodes:
        if node.op in ("input", "labels"):
            continue

        def operand(m: Node) -> sp.Expr:
            return el.ref(m) if m.op in ("input", "labels") or m in kept else values[m]

        try:
            values[node] = el.literal(node, operand)
        except ValueError:
            raise _ReadAtLabels(node.args[0]) from None
        lines[node] = {node.line} | set().union(*[lines[m] for m in node.inputs if m in lines and m not in kept])
    return values, lines


def spec_sums(values: dict) -> tuple:
    """The spec's sums (its ``+`` and ``-`` lines), each as the set of its terms as the forward
    prints them (stabilised), for ``ForwardPrinter`` to keep together inside larger sums."""
    sums = (stabilise(v) for n, v in values.items() if n.op in ("add", "sub"))
    return tuple(dict.fromkeys(frozenset(v.args) for v in sums if isinstance(v, sp.Add)))


def _reads(expr: sp.Expr, kept: set) -> list[Node]:
    names = {str(b) for b in expr.atoms(sp.IndexedBase)} | {s.name for s in expr.free_symbols if isinstance(s, sp.Symbol)}
    return [n for n in kept if n.name in names]


def _schedule(emitted: list[Node], reduced: list, replacements: list, lines: dict, by_name: dict) -> list[Statement]:
    """Each node after the temporaries it needs, each temporary just before its first use."""
    temps = dict(replacements)
    order = {symbol: k for k, (symbol, _) in enumerate(replacements)}
    out, done = [], set()

    def need(expr: sp.Expr) -> None:
        for symbol in sorted(expr.free_symbols & set(temps) - done, key=order.__getitem__):
            done.add(symbol)
            need(temps[symbol])
            out.append(Statement(symbol.name, temps[symbol], lines=by_name.get(symbol.name, set())))

    for node, expr in zip(emitted, reduced):
        need(expr)
        out.append(Statement(node.name, expr, node, lines[node]))
    return out


def _line_ranges(lines: set) -> str:
    ordered, parts = sorted(lines), []
    for k in ordered:
        if parts and parts[-1][1] == k - 1:
            parts[-1][1] = k
        else:
            parts.append([k, k])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)
    return ("lines " if len(ordered) > 1 else "line ") + text


def _hoist_sums(statements: list[Statement], frame: list, values: dict, lines: dict) -> list[Statement]:
    """Give the full-size body of a sum its own statement (``bndiff2 = bndiff**2`` before
    ``bnvar_inv = ...bndiff2.sum(0)...``), so its buffer can be reused once the sum is taken."""
    full = tuple(extent(i) for i in frame)
    taken = {st.name for st in statements}
    out = []
    for st in statements:
        temps = temps_of(out)
        if st.node is not None and st.node.op in CONTRACTIONS:
            out.append(st)  # the spec's ``@``, printed as one (a dot product too): no body to hoist
            continue
        hoisted: dict = {}  # bodies already named, read by the sums around them
        # an inner sum first: the body of one around it then reads its name, as the statement does
        # (named the other way, that body no longer matched, and its statement was never read)
        for atom in sorted(st.value.atoms(AxisSum, AxisMax), key=lambda a: (sp.count_ops(a), sp.default_sort_key(a))):
            body = atom.body.xreplace(hoisted)
            if isinstance(body, (sp.Symbol, sp.Indexed)) or layout(body, temps, frame) != full:
                continue
            factors = [layout(f, temps, frame) for f in sp.Mul.make_args(body) if not f.is_number]
            if len(set(factors)) > 1 and isinstance(body, sp.Mul):
                continue  # a contraction (x @ W): printed as einsum, there is no full-size body
            name = values.get(body.xreplace(temps))
            if name is None or name in taken:
                name = next(f"_t{k}" for k in range(len(taken) + 1) if f"_t{k}" not in taken)
            taken.add(name)
            out.append(Statement(name, body, lines=lines.get(name, set())))
            st = Statement(st.name, st.value.xreplace({body: sp.Symbol(name)}), st.node, st.lines)
            hoisted[atom.body] = sp.Symbol(name)
            temps = temps_of(out)
        out.append(st)
    return out


def forward_code(el: Elements, saved: list[str], frame: list, names: dict,
                 inplace: bool = True, schedule=None) -> list[tuple[str, str]]:
    """``[(code, comment)]`` for the fused forward.

    With ``inplace`` (the default) memory is reused: a temporary that dies at a line and has the
    result's shape is updated in place, and a full-size result that cannot be is written into
    the buffer of a temporary that died before (``out=``). ``inplace=False`` allocates every
    result, so that autograd can differentiate the code. ``schedule`` rewrites the planned
    statements first (``synced.Schedule``: sums across ranks, and the messages that carry them).
    """
    statements = plan(el, saved, frame)
    if schedule is not None:
        statements = schedule(statements)
    values, lines = _literal_values(el)
    sums = spec_sums(values)
    if inplace:
        literal = {stabilise(v): n.name for n, v in values.items() if n.named}
        statements = _hoist_sums(statements, frame, literal, {n.name: lines[n] for n in values})
    shapes = {n.name: el.shape(n) for n in el.graph.nodes}  # read at their atoms (atoms.py)
    views = {n.name: el.shape(n) for n in el.graph.nodes if el.shape(n) != tuple(n.shape)}
    temps = temps_of(statements)
    by_name = {n.name: n for n in el.graph.nodes}
    last_use = {}
    for position, st in enumerate(statements):
        for symbol in st.value.free_symbols:
            last_use[symbol.name] = position
    full = tuple(extent(i) for i in frame)
    # masks (``y != ignore_index``) are cast to the dtype of the first floating-point input
    dtype_of = next((k for k, v in el.graph.layer.tensors.items() if isinstance(v, Tensor)), "")
    plain_numbers = set(el.graph.sizes.values()) | set(el.graph.constants.values())

    def reduces_a_number(e) -> bool:
        """A sum or max of a size or declared constant (``scale*s/s``): there is no tensor to reduce."""
        return isinstance(e, (AxisSum, AxisMax)) and e.body.free_symbols <= plain_numbers

    def aliases_live(name: str, position: int) -> bool:
        """Another name shares ``name``'s memory and is read after ``position`` (or kept)."""
        buffer = buffer_of.get(name, name)
        return any(b == buffer and n != name and (n in saved or n == el.graph.output.name
                                                  or last_use.get(n, -1) > position)
                   for n, b in buffer_of.items())

    computed = {st.name for st in statements if st.node is None and _computed(st.value)}
    # names printed as 0-d tensors: a 0-d value, and a temporary of numbers and those alone (a
    # statement of them is 0-d as printed, not of the frame's rank: no reshape to ``()``)
    zero_d: set[str] = set()
    buffer_of: dict[str, str] = {}  # name -> the temporary whose memory it lives in
    free: list[str] = []  # buffers of full-size temporaries no longer read
    out = []
    for position, st in enumerate(statements):
        if st.code:
            out.append((st.code, ""))
            for name, value in st.layouts.items():
                shapes[name] = layout(value, temps, frame)
            for symbol in st.value.free_symbols:  # the names it rebinds hold new tensors from here on
                buffer_of.pop(symbol.name, None)
            continue
        st.value = st.value.replace(reduces_a_number, lambda e: extent(e.index) * e.body if isinstance(e, AxisSum) else e.body)
        if st.node is not None and not st.value.atoms(sp.Indexed) and st.value.free_symbols <= plain_numbers:
            # a value that cancels to a constant (c - c, scale*s/s) is a tensor of the node's shape
            printer = ForwardPrinter(Frame(frame), shapes, names, dtype_of=dtype_of, views=views)
            out.append((f"{st.name} = {dtype_of}.new_full(({_sizes(st.node.shape, names)}), "
                        f"{printer.doprint(st.value)})", ""))
            continue
        of_zero_d = not st.value.atoms(sp.Indexed) and all(
            s in plain_numbers or s.name in zero_d for s in st.value.free_symbols)

        rendered: dict = {}  # frame -> what ``render`` printed in it (the frame chosen is printed once)

        def render(own):
            """``(code, shape, printer, direct)``: the statement printed in the frame ``own``, before
            it is given its node's shape (``shaped``)."""
            if tuple(own) not in rendered:
                rendered[tuple(own)] = _render(own)
            return rendered[tuple(own)]

        def _render(own):
            shape = layout(st.value, temps, own)
            # a temporary that dies here and already has the result's shape can hold the result
            # (and no other live name is a view of it: ``v1 = _t0.reshape(())``)
            reusable = {t.name for t in statements[:position]
                        if t.node is None and last_use.get(t.name) == position and shapes[t.name] == shape
                        and not aliases_live(t.name, position)} if inplace and own == frame else set()
            printer = ForwardPrinter(Frame(own), shapes, names, reusable=reusable, inplace=inplace,
                                     dtype_of=dtype_of, views=views, computed=computed, sums=sums)
            # a full-rank value computed from lower-rank tensors alone (``out = w`` for a (1, k) output),
            # and a temporary of them, which later lines read in the frame (``shapes``): ``exp(A)`` of a
            # (k, k) input in a frame (n, k, k) was a (k, k) tensor, and its row sum ``v3.sum(2)``
            # named an axis it does not have
            printer.full_rank = (st.node is None or len(el.shape(st.node)) == len(own)) and printer._lower_rank(st.value)
            printer.products = st.node is not None and st.node.op in CONTRACTIONS
            direct = printer.print_in_order(st.value, [i for i in el.free(st.node) if i != 0]) \
                if st.node is not None and st.node.shape else None
            if direct is None and st.node is not None and isinstance(st.value, AxisSoftmax) \
                    and not temporaries(st.value, shapes) and 0 not in el.free(st.node):
                # a softmax of tensors read as stored: printed on the node's own axes (q @ k.T).softmax(1)
                on_own_axes = ForwardPrinter(Frame(list(el.free(st.node))), shapes, names, dtype_of=dtype_of,
                                             views=views, computed=computed, sums=sums)
                try:
                    direct = on_own_axes.doprint(st.value)
                except DerivationError:  # a sum inside needs an axis of its own: printed in the whole frame
                    direct = None
            printer.updated = None
            return direct or printer.statement(st.value), shape, printer, direct

        def shaped(code, shape, own, direct):
            """The printed ``code`` given its node's own shape: its atoms, then as stored."""
            if st.node is not None and direct:
                if [s for s in st.node.shape if s != 1] != list(st.node.shape) or st.node.name in views:
                    code = f"({code}).reshape({_sizes(st.node.shape, names)})"
            elif st.node is not None and not el.shape(st.node) and of_zero_d:
                pass  # a 0-d value of 0-d values: as printed
            elif st.node is not None:
                varying = [k for k, i in enumerate(own) if shape[k] != 1]
                code = fit_shape(code, varying, own, list(el.free(st.node)), _size_texts(el.shape(st.node), names))
                if st.node.name in views:
                    atoms = f".reshape({_sizes(el.shape(st.node), names)})"
                    code = f"{_wrap(code[:-len(atoms)] if code.endswith(atoms) else code)}.reshape({_sizes(st.node.shape, names)})"
            return code

        own = frame
        if st.node is not None and _own_tensors_alone(st.value, temps, views, st.node.name):
            # a value of the layer's own tensors alone (no temporary, which is laid out in the whole
            # frame) is printed in the frame that needs the fewest views and reshapes: ``2*x`` of an
            # (n, k) input beside a (k, k) matrix was ``(2*x.view(n, k, 1)).reshape(n, k)``, and
            # ``log(b**2 + 1)`` of an (n, 1) input ``(log(b.view(n, 1, 1)**2 + 1)).reshape(n, 1)``:
            # each view is a call, and under autograd a backward node, a call's time at small sizes
            candidates = _frames_of_a_line(st.value, frame, st.node.name, el.free(st.node), shapes)
            own = min(candidates, key=lambda c: _reshapes(render, shaped, c))
        code, shape, printer, direct = render(own)
        narrowed = own != frame
        if st.node is None:
            shapes[st.name] = shape
        if direct:  # a matrix product, already in the node's layout: a buffer of its own
            buffer_of[st.name] = st.name
        elif isinstance(st.value, sp.Symbol) and st.value.name in shapes:  # a view of another value
            buffer_of[st.name] = buffer_of.get(st.value.name, st.value.name)
        elif printer.updated:
            buffer_of[st.name] = buffer_of.get(printer.updated, printer.updated)
        elif inplace and not narrowed and shape == full and not isinstance(st.value, (sp.Symbol, sp.Indexed)):
            into = printer.into(st.value, free[0]) if free else None
            if into is not None:
                code, buffer_of[st.name] = into, free.pop(0)
            else:
                buffer_of[st.name] = st.name
        code = shaped(code, shape, own, direct)
        if (st.node is not None and not el.shape(st.node)) or (st.node is None and of_zero_d):
            zero_d.add(st.name)
        comment = ""
        if st.lines:
            node = st.node or by_name[st.name]
            source = node.source.split("#")[0].strip()
            comment = f"{node.within or 'spec'} {_line_ranges(st.lines)}"
            if len(st.lines) == 1 and source:
                comment += f": {source}"
        out.append((f"{st.name} = {code}", comment))
        # a buffer none of whose names is read again (or saved, or returned) can be written again
        live = {buffer_of[n] for n in buffer_of
                if n in saved or n == el.graph.output.name or last_use.get(n, -1) > position}
        # (a full-size one: ``m = sum_x.div_(n)`` lives in a (1, d) buffer no full-size result fits in)
        free += [b for b in dict.fromkeys(buffer_of.values())
                 if b not in live and b not in free and shapes.get(b, full) == full]
    return out


def _own_tensors_alone(value: sp.Expr, temps: dict, views: dict, node: str) -> bool:
    """``value`` reads the layer's own tensors as stored and nothing else: no temporary (laid out
    in the whole frame), no read at labels and no one-hot (which need the labelled axis in the
    frame too), no tensor read through a view of its atoms."""
    reads = {str(e.base) for e in value.atoms(sp.Indexed)} | {s.name for s in value.free_symbols}
    return (not any(s in temps for s in value.free_symbols) and not value.atoms(sp.KroneckerDelta)
            and not any(isinstance(i, sp.Indexed) for e in value.atoms(sp.Indexed) for i in e.indices)
            and not any(r in views for r in reads | {node}))


def _frames_of_a_line(value: sp.Expr, frame: list, node: str, free: tuple, shapes: dict) -> list[list]:
    """The frames a line of the layer's own tensors can be printed in, the usual one first: the
    axes it reads (the whole frame where a tensor it reads is stored with an axis of 1: ``ms`` of
    (n, 1) lines up with it as it is), then its node's own axes as stored, its sums' indices on its
    axes of 1 or after them (``stored_layouts``)."""
    used = value.atoms(sp.Idx)
    reads = {str(e.base) for e in value.atoms(sp.Indexed)}
    first = frame if any(1 in shapes.get(r, ()) for r in reads | {node}) else [i for i in frame if i in used] or frame
    bound = sorted(used - set(free), key=lambda i: i.name)
    return [first] + [axes for axes in stored_layouts(free, bound) if axes != first]


def _reshapes(render, shaped, own: list) -> float:
    """How many layout calls a line printed in the frame ``own`` makes (infinitely many where it
    cannot be printed there: a sum with no axis of its size left)."""
    try:
        code, shape, _, direct = render(own)
    except DerivationError:
        return math.inf
    return len(LAYOUT_CALLS.findall(shaped(code, shape, own, direct)))


def _size_texts(dims: tuple, names: dict) -> list[str]:
    """Each size of a shape as code (a renamed size by its variable)."""
    symbols = {k: sp.Symbol(v) for k, v in names.items()}
    return [sp.pycode(sp.sympify(s).xreplace(symbols)) for s in dims]


def _sizes(dims: tuple, names: dict) -> str:
    """A shape as the arguments of ``expand``/``reshape``: ``n, 1`` (``k,`` for one axis)."""
    return ", ".join(_size_texts(dims, names)) + ("," if len(dims) == 1 else "")


__all__ = ["plan", "forward_code", "stabilise", "Statement"]
