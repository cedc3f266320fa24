"""Derivation documents of the step-by-step backward, generated from the traced graph and the rule table.

The step-by-step backward (``<layer>_steps.py``) is the rule table of ``rules.py`` walked over the
traced spec in reverse. Its document has two parts, every line read off the graph, the rules and
the emitted code (nothing is written per layer):

1. the forward pass, spec line by spec line, one element-wise equation per traced node;
2. every generated backward line, in the order the walk emits it: the node it differentiates,
   the rule's result as an element-wise equation (``\\overline{x}_{ij} += ...``), the local
   derivative read off that result, the code line verbatim and, where the rule broadcasts or
   reduces, the same rule evaluated on small symbolic matrices.

The same ``stepwise.walk`` runs three times, with three interpreters of the rules: ``CodeOps``
(through ``stepwise.emit``: the code lines), ``IndexOps`` below (the rule's result at generic
indices, as SymPy ``Indexed`` expressions with ``Red`` sums) and ``ArrayOps`` (the illustrations:
NumPy arrays of SymPy symbols at sizes of 1 to 3). Each walk visits the same (node, input) pairs
in the same order, so the three are paired line by line. A call of a layer that has a fused kernel
(``hpreact = batchnorm(hprebn, ...)``) is shown as that kernel's closed form in the caller's names,
with its code lines (shared sums included) verbatim.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from itertools import groupby

import numpy as np
import sympy as sp

from .backends import ArrayOps
from .codegen import environment, header
from .derivation import graph_context
from .document.display import LINE_WIDTH, Display, equation, pieces_of, width
from .document.formats import MARKDOWN, TEX, Format as _Format
from .document.notation import BOUND_LETTERS, FREE_LETTERS, RESERVED_LETTERS, Printer as _Printer, tex_name
from .document.notation import assign as _assign
from .forward import size_scalars
from .prove import _labels
from .rules import BROADCASTING
from .stepwise import emit, has_fused_kernel, region_renaming, walk
from .symbolic import Max, Red, extent
from .index_ops import Elt, IndexOps, _forward, _is_merge, _view_index
from .memo import ByObject
from .trace import Graph, Node

ADJOINT = "bar:"  # prefix of the SymPy name of an adjoint (printed \overline{...})
ILLUSTRATED = ("sum", "mean", "max", "matmul", "pick", "embed")  # reducing rules, always illustrated
LEAVES = ("input", "labels")


# -- notation --------------------------------------------------------------------------------------
class _Notation:
    """Index letters and tensor references of one graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        sizes = [s for n in graph.nodes for s in n.shape if s != 1]
        first = Counter(n.shape[0] for n in graph.nodes if n.shape and n.shape[0] != 1)
        dims = [graph.sizes[d] for d in graph.layer.dims]
        order = list(dict.fromkeys(dims + sizes))
        # the size most tensors are indexed by first (the batch) gets i, then the declared order
        self.sizes = sorted(order, key=lambda s: (-first[s], order.index(s)))
        self.rank = {s: k for k, s in enumerate(self.sizes)}
        self.bases: dict[str, sp.Expr] = {}

    def free(self, shape: tuple) -> tuple:
        seen: Counter = Counter()
        out = []
        for s in shape:
            if s == 1:
                out.append(0)
                continue
            k = seen[s]
            seen[s] += 1
            out.append(sp.Idx(f"i_{sp.sstr(s)}" + (f"_{k}" if k else ""), s))
        return tuple(out)

    def leaf(self, name: str, shape: tuple) -> Elt:
        if not shape:
            sym = sp.Symbol(name)
            return Elt((), lambda idx: sym)
        base = sp.IndexedBase(name)
        return Elt(shape, lambda idx: base[tuple(idx)])

    def value(self, node: Node) -> Elt:
        return self.leaf(node.name, node.shape)

    def adjoint(self, node: Node) -> Elt:
        return self.leaf(ADJOINT + node.name, node.shape)

    def ref(self, name: str, shape: tuple, indices: tuple | None = None) -> sp.Expr:
        return self.leaf(name, shape).fn(self.free(shape) if indices is None else indices)

    def letters(self, exprs: list[sp.Expr]) -> dict[str, str]:
        graph = self.graph
        seen = {i.name: i for e in exprs for i in e.atoms(sp.Idx)}
        taken = (RESERVED_LETTERS | set(graph.layer.dims) | set(graph.layer.inputs) | {n.name for n in graph.nodes})

        def key(name):
            return (self.rank.get(extent(seen[name]), len(self.rank)), name)
        free = sorted((n for n in seen if not n.startswith("_")), key=key)
        bound = sorted((n for n in seen if n.startswith("_")), key=key)
        return {**_assign(free, FREE_LETTERS, taken), **_assign(bound, BOUND_LETTERS, taken)}


class _Printer2(_Printer):
    """The fused document's printer, plus adjoints, concrete elements and readable decimals."""

    def name(self, name: str) -> str:
        bar = name.startswith(ADJOINT)
        name = name[len(ADJOINT):] if bar else name
        base, _, at = name.partition("[")
        text = tex_name(base)
        text = r"\overline{%s}" % text if bar else text
        if at:
            idx = at.rstrip("]").split(",")
            text += "_{%s}" % ("".join(idx) if all(len(i) == 1 for i in idx) else ", ".join(idx))
        return text

    def _print_Symbol(self, expr, style="plain"):
        return self.name(expr.name)

    def _print_Indexed(self, expr):
        return self.element(self.name(str(expr.base)), expr.indices)

    def _print_Rational(self, expr):
        # 1e-5 as 10^{-5}, not \frac{1}{100000}
        q = expr.q
        k = round(math.log10(q)) if q > 1 else 0
        if k >= 3 and 10**k == q:
            sign, p = ("-" if expr.p < 0 else ""), abs(expr.p)
            factor = "" if p == 1 else r"%d \cdot " % p
            return f"{sign}{factor}10^{{-{k}}}"
        return super()._print_Rational(expr)


class _IsMax(sp.Function):
    """The subgradient of a maximum at one entry: 1 where ``entry`` is the maximum ``m``, else 0."""

    nargs = 2

    def _derivation_latex(self, printer):
        return r"\mathbf{1}\left[%s = %s\right]" % (printer._print(self.args[0]), printer._print(self.args[1]))


# -- illustrations on small symbolic matrices ---------------------------------------------------------
class _IllustrationOps(ArrayOps):
    """``ArrayOps`` that keeps each broadcasting rule's contribution before it is summed down."""

    def __init__(self, sizes):
        super().__init__(sizes)
        self.before_sum = None

    def argmax_mask(self, a, axis, result):
        r = result if result.ndim == a.ndim else np.expand_dims(result, axis)
        mask = np.empty(a.shape, dtype=object)
        for idx in itertools.product(*[range(s) for s in a.shape]):
            mask[idx] = _IsMax(a[idx], r[tuple(0 if k == axis else i for k, i in enumerate(idx))])
        return mask

    def unbroadcast(self, g, shape, result_shape):
        self.before_sum = np.broadcast_to(np.asarray(g, dtype=object), tuple(result_shape))
        return super().unbroadcast(g, shape, result_shape)


def _illustration_sizes(graph: Graph) -> dict[str, int]:
    """Sizes for the illustrations: the batch 3, every other dimension 2, no axis longer than 3."""
    layer = graph.layer
    first = Counter(n.shape[0] for n in graph.nodes if n.shape and n.shape[0] in graph.sizes.values())
    lead = max(layer.dims, key=lambda d: (first[graph.sizes[d]], -layer.dims.index(d)))
    sizes = {d: 3 if d == lead else 2 for d in layer.dims}
    fixed = {str(s) for a in size_scalars(graph) for s in sp.sympify(a).free_symbols}  # 1/(n - 1) needs n > 1
    for _ in range(4 * len(sizes)):
        too_long = [s for n in graph.nodes for s in n.shape
                    if int(sp.sympify(s).xreplace(graph.size_values(sizes))) > 3]
        if not too_long:
            break
        factors = [str(f) for f in sp.Mul.make_args(too_long[0]) if sizes.get(str(f), 1) > 1]
        shrink = next((f for f in factors if f not in fixed and f != lead), factors[0])
        sizes[shrink] -= 1
    return graph.fitted(sizes)


def _concrete_symbols(name: str, shape: tuple, symbolic: tuple) -> np.ndarray:
    """Symbols ``name[0,1]`` (printed name_{01}); a kept size-1 axis is left out of the name, as in the
    generic notation."""
    out = np.empty(shape, dtype=object)
    for idx in itertools.product(*[range(s) for s in shape]):
        shown = [str(i) for i, s in zip(idx, symbolic) if s != 1]
        out[idx] = sp.Symbol(f"{name}[{','.join(shown)}]" if shown else name)
    return out


def _cell(value, p: _Printer2) -> str:
    """One entry of a small matrix; a long sum is broken over lines inside its cell."""
    value = sp.sympify(value)
    text = p.doprint(value)
    if isinstance(value, sp.Add) and width(text) > LINE_WIDTH / 2:
        return "\\begin{aligned}&" + r" \\ &".join(pieces_of(p, value, LINE_WIDTH / 2)) + "\\end{aligned}"
    return text


def _matrix(values, p: _Printer2) -> str:
    a = np.asarray(values, dtype=object)
    if a.ndim == 0:
        return _cell(a.item(), p)
    if a.ndim == 1 or (a.ndim == 2 and a.shape[0] == 1):
        cells = [_cell(x, p) for x in a.reshape(-1)]
        if width(" & ".join(cells)) > LINE_WIDTH:  # a long row is set as a column, transposed
            return "\\begin{bmatrix}\n%s\n\\end{bmatrix}^{\\top}" % " \\\\\n".join(cells)
        return "\\begin{bmatrix}\n%s\n\\end{bmatrix}" % " & ".join(cells)
    if a.ndim > 3:
        a = a.reshape((-1,) + a.shape[-2:])
    rows = [" & ".join(_matrix(x, p) if a.ndim == 3 else _cell(x, p) for x in row) for row in a]
    return "\\begin{bmatrix}\n%s\n\\end{bmatrix}" % " \\\\\n".join(rows)


def _shape_text(shape: tuple) -> str:
    return r" \times ".join(map(str, shape)) if shape else "1"


def _axes_text(axes: list) -> str:
    return f"axis {axes[0]}" if len(axes) == 1 else "axes " + ", ".join(map(str, axes[:-1])) + f" and {axes[-1]}"


# -- the document -----------------------------------------------------------------------------------
def _local_derivative(rhs: sp.Expr, origin: Node, note: _Notation) -> tuple[sp.Expr, sp.Expr] | None:
    """(element of the node, its partial derivative) read off the rule's result, which is linear in
    the node's adjoint: the summand's coefficient of that adjoint."""
    key = ADJOINT + origin.name

    def adjoint_atoms(e) -> set:
        if origin.shape:
            return {a for a in e.atoms(sp.Indexed) if str(a.base) == key}
        return {a for a in e.atoms(sp.Symbol) if a.name == key}

    def strip(e):  # drop the sums around the adjoint, outermost first: what remains is one summand
        if not adjoint_atoms(e):
            return e
        if isinstance(e, Red):
            return strip(e.body)
        return e if isinstance(e, Max) or not e.args else e.func(*[strip(a) for a in e.args])
    summand = strip(rhs)
    adjoints = sorted(adjoint_atoms(summand), key=sp.default_sort_key)
    if len(adjoints) != 1:
        return None
    x = sp.Dummy("x")
    linear = summand.xreplace({adjoints[0]: x})
    coefficient = sp.diff(linear, x)
    if x in coefficient.free_symbols or sp.expand(linear - coefficient * x) != 0:
        return None
    at = adjoints[0].indices if isinstance(adjoints[0], sp.Indexed) else ()
    return note.ref(origin.name, origin.shape, at if at else None), coefficient


def _called(graph: Graph) -> dict:
    """Output node -> region, for every call of a layer whose backward is its fused kernel."""
    return {r.output: r for r in graph.regions if has_fused_kernel(r.layer)}


def _fused_parts(region, needed: set) -> dict:
    """The fused kernel of a called layer, in the caller's names: argument node -> its gradient."""
    from .select import fused_kernel

    kernel = fused_kernel(region.layer)
    names, subs = region_renaming(kernel, region, ADJOINT + region.output.name)

    def rename(expr):
        expr = expr.xreplace(subs)  # sizes and constants; sums re-canonicalize their indices
        expr = expr.replace(lambda e: isinstance(e, sp.Indexed) and str(e.base) in names,
                            lambda e: sp.IndexedBase(names[str(e.base)])[e.indices])
        return expr.xreplace({s: sp.Symbol(names[s.name]) for s in expr.free_symbols
                              if isinstance(s, sp.Symbol) and not isinstance(s, sp.Idx) and s.name in names})

    parts = {}
    for f in kernel.formulas:
        arg = region.arguments[f.input]
        if arg not in needed:
            continue
        element = rename(f.element)
        free = tuple(sp.sympify(k).xreplace(subs) for k in kernel.elements.free(kernel.graph.inputs[f.input]))
        parts[arg] = Elt(arg.shape, lambda idx, e=element, free=free:
                         e.xreplace({k: i for k, i in zip(free, idx) if k != 0}))
    return parts


def _walks(graph: Graph, note: _Notation, sizes: dict):
    """The rules walked at generic indices and on small symbolic matrices, one record per contribution.

    Returns ``(records, values, adjoints)``: records are ``(origin, node, part, first, array, before)``
    (the element-wise part, whether it is the node's first contribution, the concrete part and, for a
    broadcasting rule, the concrete part before the de-broadcasting sum); values and adjoints are the
    concrete symbol arrays of every node.
    """
    records = []

    def record(node, current, part, origin):
        records.append([origin, node, part, current is None])
        return note.adjoint(node)
    walk(graph, IndexOps(), note.value, lambda n: n.shape, note.adjoint(graph.output), record,
         lambda region, grad, needed: _fused_parts(region, needed))

    subs = graph.size_values(sizes)
    values, adjoints = {}, {}
    for node in graph.nodes:
        shape = tuple(int(sp.sympify(s).xreplace(subs)) for s in node.shape)
        values[node] = (_labels(shape, subs[node.attrs["classes"]], 0) if node.op == "labels"
                        else _concrete_symbols(node.name, shape, node.shape))
        adjoints[node] = _concrete_symbols(ADJOINT + node.name, shape, node.shape)
    ops = _IllustrationOps(subs)
    concrete = []

    def record_concrete(node, current, part, origin):
        concrete.append((node, part, ops.before_sum))
        ops.before_sum = None
        return adjoints[node]

    def fused(region, grad, needed):  # a fused call is not illustrated
        return {arg: np.zeros(values[arg].shape, dtype=object) for arg in _fused_parts(region, needed)}
    walk(graph, ops, values.__getitem__, lambda n: values[n].shape, adjoints[graph.output], record_concrete, fused)
    if [r[1] for r in records] != [c[0] for c in concrete]:
        raise AssertionError(f"{graph.layer.name}: the symbolic and the concrete walks disagree")
    return [(*r, c[1], c[2]) for r, c in zip(records, concrete)], values, adjoints


def _pair(graph: Graph, records: list, lines: list) -> list[tuple[Node, list, list]]:
    """Group the records by the node they differentiate, each with its emitted lines.

    Returns ``[(origin, [(record, line)], preamble)]``: ``preamble`` holds the lines that assign no
    ``d<name>`` (the shared temporaries of a fused kernel). Within a group the lines' order wins.
    """
    out, pos = [], 0
    for origin, group in groupby(records, key=lambda r: r[0]):
        pending, pairs, preamble = list(group), [], []
        while pending:
            if pos == len(lines):
                raise AssertionError(f"{graph.layer.name}: no generated line for d{pending[0][1].name}")
            line = lines[pos]
            pos += 1
            target = line.code.split(" = ")[0]
            match = next((r for r in pending if f"d{r[1].name}" == target), None)
            if match is None:
                preamble.append(line)
            else:
                pending.remove(match)
                pairs.append((match, line))
        out.append((origin, pairs, preamble))
    if pos != len(lines):
        raise AssertionError(f"{graph.layer.name}: generated lines left unexplained: {lines[pos].code!r}")
    return out


# the TeX and the Markdown document of one graph are rendered one after the other, and all but
# the wording is the same for both
_ANALYSED = ByObject(maxsize=4)  # graph -> what _analyse works out


def _analysis(graph: Graph) -> tuple:
    """``_analyse(graph)``, once per graph for both formats."""
    return _ANALYSED.get(graph, _analyse)


def _analyse(graph: Graph) -> tuple:
    """What a step-by-step document shows, before it is worded in a format: the walk's lines paired
    with their rules, every equation, and the printer with the index letters for all of them."""
    note = _Notation(graph)
    lines = [line for line in emit(graph)[0] if not line.unreached]  # the walk's lines, each from a rule
    sizes = _illustration_sizes(graph)
    records, values, adjoints = _walks(graph, note, sizes)
    groups = _pair(graph, records, lines)

    # every equation first, then the index letters for all of them at once
    computed = [n for n in graph.nodes if n.op not in LEAVES]
    forward_eqs = {}
    for node in computed:
        operands = [note.value(a) if isinstance(a, Node) else Elt.const(a) for a in node.args]
        src = node.args[0] if node.op == "view" else None
        if src is not None and _is_merge(node.shape, src.shape):
            # a merge of axes reads best from the source's indices: embcat_{i, e k + l} = emb_{ikl}
            free = note.free(src.shape)
            forward_eqs[node] = (note.ref(node.name, node.shape, _view_index(node.shape, src.shape, free)),
                                 note.ref(src.name, src.shape, free))
        else:
            forward_eqs[node] = (note.ref(node.name, node.shape), _forward(node, operands).fn(note.free(node.shape)))
    derived = {}
    for origin, pairs, _ in groups:
        for record, _ in pairs:
            node, part = record[1], record[2]
            rhs = part.fn(note.free(node.shape))
            derived[id(record)] = (rhs, _local_derivative(rhs, origin, note))
    exprs = [e for pair in forward_eqs.values() for e in pair]
    exprs += [e for rhs, local in derived.values() for e in (rhs, *(local or ()))]
    # the element each gradient is taken at, whose indices a constant gradient does not mention
    exprs += [note.ref(r[1].name, r[1].shape) for _, pairs, _ in groups for r, _ in pairs]
    p = _Printer2(note.letters(exprs))
    return note, lines, sizes, values, adjoints, groups, computed, forward_eqs, derived, exprs, p


def _context(graph: Graph, fmt: _Format) -> dict:
    code = fmt.code
    note, lines, sizes, values, adjoints, groups, computed, forward_eqs, derived, exprs, p = _analysis(graph)
    called = _called(graph)

    inside = {}  # node -> the innermost call of another layer that recorded it
    for region in sorted(graph.regions, key=lambda r: len(r.nodes), reverse=True):
        inside.update({n: region for n in region.nodes})

    def where(node) -> str:
        region = inside.get(node)
        return f"line {node.line}" + (f" of {code(region.layer.name)}" if region else "")

    forward = []
    for (_, _, source), nodes in groupby(computed, key=lambda n: (id(inside.get(n)), n.line, n.source.strip())):
        nodes = list(nodes)
        region = inside.get(nodes[0])
        forward.append(dict(line=where(nodes[0]), source=code(source),
                            call=code(region.source) if region else "", equations=[
            dict(name=code(n.name), equation=fmt.display(equation(p, p.doprint(forward_eqs[n][0]), forward_eqs[n][1])))
            for n in nodes]))

    steps = []
    for origin, pairs, preamble in groups:
        region = called.get(origin)
        items = []
        for record, line in pairs:
            _, node, _, first, array, before = record
            rhs, local = derived[id(record)]
            local_tex = ""
            if local is not None:
                local_tex = fmt.display(equation(p, r"\frac{\partial %s}{\partial %s}" % (
                    p.doprint(local[0]), p.doprint(note.ref(node.name, node.shape))), local[1]))
            shown = None if region else _illustration(origin, node, first, array, before, values, adjoints, sizes, p, fmt)
            items.append(dict(target=code(node.name), grad=code(f"d{node.name}"), accumulates=not first,
                              equation=fmt.display(equation(p, p.doprint(note.ref(ADJOINT + node.name, node.shape)),
                                                            rhs, not first)),
                              local=local_tex, code=line.code, illustration=shown))
        eq = forward_eqs[origin]
        source = region.source if region else origin.source.strip()
        steps.append(dict(node=code(origin.name), line=f"the call of {code(region.layer.name)}" if region
                          else where(origin), source=code(source),
                          rule=code(origin.op), call=code(region.layer.name) if region else "",
                          derivation=fmt.link(region.layer.name, code(region.layer.name)) if region else "",
                          forward="" if region else fmt.display(equation(p, p.doprint(eq[0]), eq[1])),
                          preamble="\n".join(line.code for line in preamble), lines=items))

    seen = {i.name: i for e in exprs for i in e.atoms(sp.Idx)}
    indices = [dict(letter=letter, last=p.doprint(extent(seen[name]) - 1), size=p.doprint(extent(seen[name])),
                    kind="a summation index" if name.startswith("_") else "a free index")
               for name, letter in p.letters.items() if name in seen]
    out, layer = graph.output, graph.layer
    return dict(name=code(layer.name), doc=fmt.text(layer.doc), module=code(layer.module),
                file=code(f"{layer.name}_steps.py"), output=code(out.name), grad_output=code(f"d{out.name}"),
                indices=indices, forward=forward, steps=steps, count=len(lines), graph=graph_context(graph, fmt),
                inputs=", ".join(code(f"d{n}") for n in layer.differentiable), label=f"{layer.name}_steps",
                fused=fmt.link(layer.name, code(layer.name)) if has_fused_kernel(layer) else "")


def _illustration(origin: Node, node: Node, first: bool, array, before, values: dict, adjoints: dict,
                  sizes: dict, p: _Printer2, fmt: _Format) -> dict | None:
    """The rule on small symbolic matrices, where it broadcasts or reduces; None elsewhere."""
    broadcast = origin.op in BROADCASTING and tuple(node.shape) != tuple(origin.shape)
    if not (broadcast or origin.op in ILLUSTRATED):
        return None
    code = fmt.code
    used = {str(s) for n in [origin, *origin.inputs] for d in n.shape for s in sp.sympify(d).free_symbols}
    at = ", ".join(fmt.math(f"{tex_name(d)} = {sizes[d]}") for d in sizes if d in used)
    rows = []
    if adjoints[origin].ndim:
        rows.append(dict(caption=f"the upstream gradient {code('d' + origin.name)} "
                                 f"({fmt.math(_shape_text(values[origin].shape))}):",
                         math=fmt.display(equation(p, p.name(ADJOINT + origin.name), _matrix(adjoints[origin], p)))))
    for a in origin.inputs:
        if a.op == "labels":
            rows.append(dict(caption=f"the labels {code(a.name)}:", math=fmt.display(equation(p, p.name(a.name), _matrix(values[a], p)))))
    lhs = p.name(ADJOINT + node.name)
    if broadcast:
        res, arg = tuple(origin.shape), tuple(node.shape)
        extra = len(res) - len(arg)
        summed = list(range(extra))
        kept = [k for k in range(len(arg)) if arg[k] == 1 and res[extra + k] != 1]
        how = []
        if summed:
            how.append(f"summed over {_axes_text(summed)}")
        if kept:
            how.append(f"summed over {_axes_text([extra + k for k in kept])}, kept with size 1")
        rows.append(dict(caption=f"the rule's contribution, in the shape of the result "
                                 f"({fmt.math(_shape_text(before.shape))}):", math=fmt.display(Display(_matrix(before, p)))))
        rows.append(dict(caption=f"{' and '.join(how)}, back to the shape of {code(node.name)} "
                                 f"({fmt.math(_shape_text(np.asarray(array).shape))}): the de-broadcasting sum",
                         math=fmt.display(equation(p, lhs, _matrix(array, p), not first))))
    else:
        rows.append(dict(caption=f"the contribution to {code('d' + node.name)} "
                                 f"({fmt.math(_shape_text(np.asarray(array).shape))}):",
                         math=fmt.display(equation(p, lhs, _matrix(array, p), not first))))
    return dict(sizes=at, rows=rows)


def _render(graph: Graph, fmt: _Format) -> str:
    body = environment().get_template(fmt.template).render(**_context(graph, fmt)).lstrip("\n")
    return header(graph.layer, fmt.comment[0], body, fmt.comment[1], templates=[fmt.template, *fmt.includes]) + body


STEPS_TEX = dataclasses.replace(TEX, template="derivation_steps.tex.j2")
STEPS_MARKDOWN = dataclasses.replace(MARKDOWN, template="derivation_steps.md.j2")


def render_steps_tex(graph: Graph) -> str:
    """The step-by-step derivation as a standalone LaTeX document."""
    return _render(graph, STEPS_TEX)


def render_steps_markdown(graph: Graph) -> str:
    """The step-by-step derivation as GitHub Markdown: display math in ```math blocks, inline math as $`...`$."""
    return _render(graph, STEPS_MARKDOWN)


__all__ = ["render_steps_tex", "render_steps_markdown", "IndexOps", "Elt"]
