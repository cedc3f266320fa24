"""Everything a generated fused kernel is made of, decided in Python (templates only place it).

``build(layer)`` runs the pipeline: trace -> element-wise normal form -> reverse mode -> refold into
saved quantities -> closed form -> shared subexpressions (``cse``) -> printed torch code, plus the
saved tensors (read off the formulas' free symbols), the sizes, and the input checks.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

import sympy as sp

from .differentiate import Gradients, differentiate, replayed_maxima
from .elements import CONTRACTIONS, Elements
from .errors import DerivationError
from .forward import size_names, size_scalars
from .backward_plan import chain_form, linear_form
from .forward_plan import forward_code
from .functions import COMPARISON_MASKS, SplitExp, Wins
from .memo import LAYERS_KEPT, ByObject, kept_on
from .printer import (LAYOUT_CALLS, Frame, KernelPrinter, _wrap, fit_shape, stored_layouts, tanh_links,
                      temporaries, tensor_name)
from .simplify import closed_form, refold, scalars
from .spec import Labels, Layer, Tensor, constant_bounds, constant_range, dim_names
from .symbolic import GroupedRed, Red, expand, extent, hide_argmax, is_contraction, reductions
from .trace import Graph, trace
from .trace.tracer import reachable


@dataclass
class Formula:
    """The fused gradient of one input (or, with ``position`` None, the adjoint ``d<input>`` of an
    intermediate node the gradients read as a tensor: ``differentiate.Gradients.materialized``)."""

    input: str
    position: int | None  # argument position in forward
    element: sp.Expr  # closed form, element-wise, in saved quantities
    refolded: sp.Expr = sp.S.Zero  # the refold's result, before the closed form
    rewrites: list = field(default_factory=list)  # the refold's steps (simplify.Rewrite), for the document
    code: str = ""  # vectorized right-hand side (after shared subexpressions)
    needs: list[str] = field(default_factory=list)  # shared temporaries it reads
    fast: list[str] = field(default_factory=list)  # statements computing it in fewer passes, if any
    # statements computing it in place over few buffers (``backward_plan.chain_form``): eager
    # autograd's backward only, not a graph of the backward nor torch.func transforms
    chain: list[str] = field(default_factory=list)


@dataclass
class Shared:
    name: str
    code: str
    element: sp.Expr
    users: list[int]  # argument positions whose gradient reads it
    # a sum of a full-size product is computed from a named buffer (``scratch = body``), which
    # one full-size gradient later reuses for its result instead of allocating its own
    scratch: str = ""
    scratch_code: str = ""
    sum_code: str = ""  # the sum of the scratch buffer (``code`` stays the readable one-liner)
    fast: list[str] = field(default_factory=list)  # statements computing it in fewer passes, if any


@dataclass
class Check:
    condition: str  # true when the input is refused
    message: str
    kind: str = "value"  # "rank" checks run before the sizes are read from the shapes
    holds: str = ""  # true when the input passes: the checks combine into one condition on the fast path


@dataclass
class LabelCheck:
    """Labels must lie in ``[0, classes)``: a check of data, rendered as a call of the generated
    module's ``_labels_in_range`` (one reduction on the CPU; no device sync, no graph break elsewhere)."""

    tensor: str
    classes: str
    message: str
    kind: str = "labels"


@dataclass
class Kernel:
    layer: Layer
    graph: Graph
    elements: Elements
    gradients: Gradients
    formulas: list[Formula]
    shared: list[Shared]
    forward: list[tuple[str, str]]
    forward_with_graph: list[tuple[str, str]]  # the same without in-place updates (differentiable)
    saved: list[str]
    sizes: list[str]
    size_sources: list[tuple[str, str]]  # (code unpacking sizes, tensor)
    checks: list[Check | LabelCheck]
    constants_used: list[str]
    seconds: float = 0.0
    frame: list = field(default_factory=list)  # the printing frame's indices (printer.Frame)
    adjoints: list = field(default_factory=list)  # Formula per materialized adjoint, in the order computed
    forbidden: dict = field(default_factory=dict)  # input -> refold rewrites its gradient may not take
    as_written: frozenset = frozenset()  # inputs whose gradient is printed as its formula reads
    replayed: frozenset = frozenset()  # maxima whose adjoints are kept (``differentiate.replayed_maxima``)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def output(self) -> str:
        return self.graph.output.name


def _shapes(graph: Graph) -> dict[str, tuple]:
    shapes = {n.name: n.shape for n in graph.nodes}
    shapes[f"d{graph.output.name}"] = graph.output.shape
    return shapes


def size_sources(layer: Layer, names: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Lines that read every size from the first input declaring it: ``n, d = x.shape``
    (``names``: a dimension's variable where it is not the dimension's name, ``forward.size_names``)."""
    names = names or {}
    known, out = set(), []
    for name, decl in layer.tensors.items():
        targets = []
        for d in decl.dims:
            new = d not in known and dim_names(d) == [d]
            targets.append(names.get(d, d) if new else "_")
            known.update([d] if new else [])
        if any(t != "_" for t in targets):
            out.append((", ".join(targets) + ("," if len(targets) == 1 else ""), name))
    missing = [d for d in layer.dims if d not in known]
    if missing:
        raise DerivationError(layer.name, f"size {missing[0]!r} is not the size of any tensor input",
                              "declare a tensor input with that dimension")
    return out


LABEL_DTYPES = "(torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)"


def input_checks(layer: Layer, divisors: set, sources: list[tuple[str, str]], names: dict[str, str] | None = None,
                 derived: dict | None = None, unread: frozenset = frozenset()) -> list[Check | LabelCheck]:
    """What the generated Function checks before it computes, cheapest first: ranks (the size
    unpacking needs them), shapes, dtypes and devices, the declared range of each Constant, the size
    conditions the formulas divide by (and the exact divisions of sizes the spec computed as
    ``numerator // divisor``: ``derived``), then the labels' range (the only check that reads data).
    ``names``: the variables of renamed sizes. Labels named in ``unread``, which no operation
    reads, are checked for dtype but not for range: no value of them changes what is computed, and
    the range check is a reduction over them on every call."""
    names = names or {}
    name, checks = layer.name, []
    # a tensor all of whose sizes are read from its own shape needs no shape check
    self_defined = {tensor for unpack, tensor in sources if "_" not in unpack.replace(" ", "").split(",")}
    floats = [k for k, v in layer.tensors.items() if isinstance(v, Tensor)]
    first = floats[0]
    # (on the path where all is well, the ranks of the tensors sizes are read from alone: the shape
    # check of any other implies its rank)
    sourced = {tensor for _, tensor in sources}
    for k, decl in layer.tensors.items():
        dims = ", ".join(decl.dims)
        checks.append(Check(f"{k}.dim() != {len(decl.dims)}",
                            f"f\"{name}: {k} must have {len(decl.dims)} dimension(s) ({dims}), got shape {{tuple({k}.shape)}}\"",
                            kind="rank", holds=f"{k}.dim() == {len(decl.dims)}" if k in sourced else ""))

    def size(d):  # a dimension's size in code: its variable, a product of them, or 1
        return "*".join(names.get(part, part) for part in dim_names(d)) or "1"

    for k, decl in layer.tensors.items():
        if k in self_defined:
            continue
        shape = ", ".join(decl.dims) + ("," if len(decl.dims) == 1 else "")
        values = ", ".join(size(d) for d in decl.dims) + ("," if len(decl.dims) == 1 else "")
        checks.append(Check(f"{k}.shape != ({values})",
                            f"f\"{name}: {k} must have shape ({shape}) = {{({values})}}, got {{tuple({k}.shape)}}\"",
                            holds=f"{k}.shape == ({values})"))
    for k in floats[1:]:
        checks.append(Check(f"{k}.dtype != {first}.dtype or {k}.device != {first}.device",
                            f"f\"{name}: {k} is {{{k}.dtype}} on {{{k}.device}} but {first} is {{{first}.dtype}} on "
                            f"{{{first}.device}}; move them to one dtype and device\"",
                            holds=f"{k}.dtype == {first}.dtype and {k}.device == {first}.device"))
    for k in floats:
        # (on the path where all is well, the first tensor's alone: the others have its dtype)
        checks.append(Check(f"not {k}.is_floating_point()",
                            f"f\"{name}: {k} must be a floating-point tensor, got {{{k}.dtype}}\"",
                            holds=f"{k}.is_floating_point()" if k == first else ""))
    for k, decl in layer.tensors.items():
        if isinstance(decl, Labels):
            checks.append(Check(f"{k}.dtype not in {LABEL_DTYPES}",
                                f"f\"{name}: labels {k} must be an integer tensor, got {{{k}.dtype}}\"",
                                holds=f"{k}.dtype in {LABEL_DTYPES}"))
    for numerator, divisor in (derived or {}).values():
        top, bottom = sp.pycode(numerator), sp.pycode(divisor)
        checks.append(Check(f"{top} % {bottom} != 0",
                            f"f\"{name}: {bottom} must divide {top} (a view splits it), got {top} = {{{top}}} and "
                            f"{bottom} = {{{bottom}}}\"", holds=f"{top} % {bottom} == 0"))
    for k, decl in layer.constants.items():
        # a positive declaration the derivation relied on; bounds it did not: either way a call
        # outside the declaration is refused
        if constant_bounds(decl):
            condition = " and ".join(f"{k} {op} {bound!r}" for op, bound in constant_bounds(decl))
            checks.append(Check(f"not ({condition})",
                                f"f\"{name}: {k} is declared {constant_range(decl)}, got {{{k}!r}}\"",
                                holds=condition))
    for divisor in sorted(divisors, key=sp.default_sort_key):
        text = sp.sstr(divisor)
        code = sp.pycode(divisor.xreplace({s: sp.Symbol(names.get(s.name, s.name)) for s in divisor.free_symbols}))
        checks.append(Check(f"{code} == 0", kind="size", message=
                            f"f\"{name}: the formula divides by {text}, which is 0 for these sizes "
                            f"({', '.join(f'{s}={{{names.get(s, s)}}}' for s in sorted(map(str, divisor.free_symbols)))}); "
                            f"use larger sizes (for example a batch of at least 2 rows)\"", holds=f"{code} != 0"))
    for k, decl in layer.tensors.items():
        if isinstance(decl, Labels) and k not in unread:
            c = names.get(decl.classes, decl.classes)
            checks.append(LabelCheck(k, c, f"f\"{name}: labels {k} must lie in [0, {decl.classes}) = [0, {{{c}}})\""))
    return checks


def size_divisors(exprs: list[sp.Expr], sizes: set) -> set:
    """Factors of size-only denominators that can vanish for some positive integer sizes."""
    out = set()
    for expr in exprs:
        for p in expr.atoms(sp.Pow):
            base, e = p.as_base_exp()
            if e.is_negative and base.free_symbols and base.free_symbols <= sizes:
                for factor, _ in sp.factor_list(base)[1]:
                    if not factor.is_Symbol:  # a bare size is never 0
                        out.add(factor)
    return out


def size_checks(graph: Graph, formulas: list = ()) -> tuple[list[tuple[str, str]], list[Check], dict[str, str]]:
    """Where each size is read from, the input checks, and each dimension's variable, for ``graph``'s
    layer (``formulas``: expressions whose size-only divisors must not be 0 as well)."""
    layer = graph.layer
    renamed = size_names(graph)
    dim_text = {d: renamed[graph.sizes[d]].name for d in layer.dims}
    divisors = size_divisors(size_scalars(graph) + list(formulas), set(graph.sizes.values()))
    sources = size_sources(layer, dim_text)
    unread = frozenset(k for k, node in graph.inputs.items() if not graph.consumers(node))
    return sources, input_checks(layer, divisors, sources, dim_text, graph.derived, unread), dim_text


_BUILT = ByObject(maxsize=LAYERS_KEPT)  # layer -> its kernel (every rewrite allowed)
_DERIVED = ByObject(maxsize=LAYERS_KEPT)  # layer -> (graph, elements, gradients): what every variant shares


def build_cached(layer: Layer) -> Kernel:
    """``build(layer)``, once per layer object in this process (of the latest ``LAYERS_KEPT``)."""
    return _BUILT.get(layer, lambda layer: build(layer))


def derived(layer: Layer, replayed: frozenset = frozenset(), spelled: frozenset = frozenset()) -> tuple[Graph, Elements, Gradients]:
    """The traced graph, its normal form and the normal-form gradients, once per layer object
    (and set of ``replayed`` maxima: ``differentiate.replayed_maxima``; and of ``spelled`` lines,
    the named values kept as nodes of their own, read where autograd reads them)."""
    def derive(layer):
        graph = trace(layer)
        el = Elements(graph)
        return graph, el, differentiate(el)
    graph, el, grads = _DERIVED.get(layer, derive)
    if not replayed and not spelled:
        return graph, el, grads

    def again():
        maxima = [n for n in graph.nodes if n.name in replayed]
        nodes = replayed_maxima(graph, maxima) | {n for n in graph.nodes if n.name in spelled}
        kept = Elements(graph, frozenset(nodes))
        return graph, kept, differentiate(kept, frozenset(maxima))
    return kept_on(el, "_replayed", (replayed, spelled), again)


def _refolded(el, expr: sp.Expr, forbidden: frozenset) -> tuple:
    """``(refold(expr), its rewrites, its closed form)``, once per gradient and forbidden set of a
    layer's derivation: ``select`` builds the kernel again for each form it tries, and the gradients
    it does not change (and the adjoints) are the same (seconds each for a nested softmax)."""
    def compute():
        rewrites: list = []
        refolded = refold(el, expr, rewrites, forbidden)
        return refolded, tuple(rewrites), closed_form(refolded, scalars(el))

    return kept_on(el, "_refolded", (expr, forbidden), compute)


def build(layer: Layer, forbidden: dict[str, frozenset] | None = None, as_written: frozenset = frozenset(),
          replayed: frozenset = frozenset(), spelled: frozenset = frozenset()) -> Kernel:
    """The fused kernel of ``layer``. ``forbidden`` maps an input to the refold rewrites its
    gradient may not take (``(node, variable)`` names, see ``select``): a less folded form.
    The gradients of the inputs in ``as_written`` are printed as their formulas read, without
    the in-place forms of ``backward_plan`` (which order some operations differently). The maxima
    named in ``replayed`` keep their adjoints (``differentiate.replayed_maxima``); the lines
    named in ``spelled`` are nodes of their own (``select``'s last fused form)."""
    start = time.perf_counter()
    graph, el, grads = derived(layer, replayed, spelled)
    order = list(layer.inputs)
    formulas, adjoints = [], []
    for node, expr in grads.materialized:
        refolded, _, closed = _refolded(el, expr, frozenset())
        adjoints.append(Formula(node.name, None, closed, refolded))
    for node, expr in grads.grads.items():
        refolded, rewrites, closed = _refolded(el, expr, (forbidden or {}).get(node.name, frozenset()))
        formulas.append(Formula(node.name, order.index(node.name), closed, refolded, list(rewrites)))

    renamed = size_names(graph)
    size_text = {s: t.name for s, t in renamed.items() if t != s}
    frame = el.frame([f.element for f in adjoints + formulas])
    shapes = _shapes(graph)
    try:
        shared, codes = print_formulas(layer, el, formulas, frame, shapes,
                                       taken={n.name for n in graph.nodes} | {f"d{n.name}" for n in graph.nodes},
                                       size_text=size_text, adjoints=adjoints, as_written=as_written)
    except DerivationError as e:
        raise located(e, graph) from None
    read_by_output = reachable(graph.output)
    for f, (code, needs, fast, chain) in zip(formulas, codes):
        f.code, f.needs, f.fast, f.chain = code, needs, fast or [], chain or []
        if f.element == 0 and graph.inputs[f.input] not in read_by_output:
            # the output does not read this input: no gradient, as autograd gives none (None, and no
            # n x k zeros written for it)
            f.code, f.needs, f.fast, f.chain = "None", [], [], []

    read = set()
    for expr in [f.element for f in adjoints + formulas]:
        read |= {str(e.base) for e in expr.atoms(sp.Indexed)}
    # scalar (0-d) forward values the formulas read are Symbols, not Indexed: saved as 0-d tensors
    read |= {s.name for f in adjoints + formulas for s in f.element.free_symbols}
    saved = [n.name for n in graph.nodes if n.name in read and (n.shape or n.op not in ("input", "labels"))]
    used_symbols = set().union(*[f.element.free_symbols for f in adjoints + formulas]) if formulas else set()
    # a constant is read by the backward where a formula has it, or where it is a size (x.view(n, G, -1))
    as_sizes = set().union(*[sp.sympify(s).free_symbols for n in graph.nodes for s in n.shape])
    constants = [c for c, s in graph.constants.items()
                 if s in used_symbols or sp.Symbol(c, integer=True, positive=True) in as_sizes]
    sources, checks, dim_text = size_checks(graph, [f.element for f in adjoints + formulas])
    try:
        forward = forward_code(el, saved, frame, size_text)
        with_graph = forward_code(el, saved, frame, size_text, inplace=False)
    except DerivationError as e:
        raise located(e, graph) from None
    return Kernel(layer, graph, el, grads, formulas, shared, forward, with_graph, saved,
                  [dim_text[d] for d in layer.dims], sources, checks, constants,
                  time.perf_counter() - start, frame, adjoints, dict(forbidden or {}), frozenset(as_written),
                  frozenset(replayed))


def located(error: DerivationError, graph) -> DerivationError:
    """``error`` from the printer with the layer's name and the spec line of the tensor it could not
    print: the line computing it, or for an input the first line reading it."""
    if error.line:
        return error
    node = next((n for n in graph.nodes if n.name == error.tensor), None)
    if node is not None and node.op in ("input", "labels"):
        node = next((n for n in graph.nodes if node in n.args), None)
    line, source = (node.line, node.source) if node is not None else (None, "")
    return DerivationError(graph.layer.name, error.problem, error.fix, line, source, error.tensor)


def print_formulas(layer: Layer, el: Elements, formulas: list[Formula], frame: list, shapes: dict,
                   taken: set, rename: dict[str, str] | None = None, sizes: dict | None = None,
                   size_text: dict | None = None, adjoints: list[Formula] = (), as_written: frozenset = frozenset()):
    """``_print_group`` of the materialized ``adjoints`` the ``formulas`` read (each a temporary,
    ``dscores = ...``, in the layout of its node), then of the formulas, which read them as tensors.
    The gradients of the inputs in ``as_written`` are printed as their formulas read, without the
    in-place forms of ``backward_plan``; an adjoint is never an in-place chain (a linear form at most)."""
    rename = dict(rename or {})
    wanted = _needed_adjoints(formulas, adjoints)
    if not wanted:
        return _print_group(layer, el, formulas, frame, shapes, taken, rename, sizes, size_text, as_written)
    for a in wanted:
        rename.setdefault(f"d{a.input}", f"d{rename.get(a.input, a.input)}")
    # each adjoint in turn (a later one reads the earlier), told apart from the gradients by a
    # negative position: -1 the first, -2 the next
    shapes = dict(shapes)
    nodes = {n.name: n for n in el.graph.nodes}
    groups, entries = [], []
    for k, a in enumerate(wanted):
        temps, ((code, _, fast, _),) = _print_group(layer, el, [Formula(a.input, -(k + 1), a.element)], frame, shapes,
                                                 taken, rename, sizes, size_text, chains=False)
        name = rename[f"d{a.input}"]
        shapes[name] = nodes[a.input].shape  # its atoms, where a view splits them: _atomic_layouts
        groups.append(temps)
        entries.append(Shared(name, code, a.element, [], fast=fast or []))
        taken = set(taken) | {t.name for t in temps} | {name}
    second, codes = _print_group(layer, el, formulas, frame, shapes, taken, rename, sizes, size_text, as_written)
    # an adjoint is needed wherever a gradient reads it, directly or through a later adjoint
    readers: dict[int, set] = {}
    for k in reversed(range(len(wanted))):
        name = f"d{wanted[k].input}"
        users = {f.position for f in formulas if name in _bases(f.element)}
        for j in range(k + 1, len(wanted)):
            if name in _bases(wanted[j].element):
                users |= readers[-(j + 1)]
        readers[-(k + 1)] = users
    ordered = []
    for k, (temps, entry) in enumerate(zip(groups, entries)):  # each adjoint after the temporaries it reads
        for t in temps + [entry]:
            t.users = sorted(readers[-(k + 1)])
        ordered += temps + [entry]
    return ordered + second, codes


def _numbers_inline(replacements: list, reduced: list, scalars: set) -> tuple[list, list]:
    """cse's temporaries that are numbers of sizes and constants (``1/math.sqrt(d)``) put back where
    they are used: a Python number costs nothing to recompute, and a formula reading it stays a
    matrix product times a number (``(dt2 @ k)/math.sqrt(d)``)."""
    numbers: dict = {}
    kept = []
    for symbol, value in replacements:
        value = value.xreplace(numbers)
        if not value.atoms(sp.Indexed) and {s for s in value.free_symbols if not isinstance(s, sp.Idx)} <= scalars \
                and not value.atoms(sp.Idx):
            numbers[symbol] = value
        else:
            kept.append((symbol, value))
    return kept, [r.xreplace(numbers) for r in reduced]


def _scaled_entries_inline(replacements: list, reduced: list) -> tuple[list, list]:
    """cse's temporaries that are one tensor times a number (``-w``) put back where they are used:
    computing them again is one operation, and a formula reading a temporary is no matrix product
    (the printer refuses a temporary in an operand): ``sum_j sum_n (g[i, j] + g[j, i])*f(w[i] -
    p[n, i])*h(p[n, j])`` with ``-w`` shared was an (n x k x k) broadcast body, 60x autograd's time."""
    scaled = {symbol: value for symbol, value in replacements
              if value.is_Mul and len(value.args) == 2 and value.args[0].is_Number and isinstance(value.args[1], sp.Indexed)}
    if not scaled:
        return replacements, reduced
    kept = [(symbol, value.xreplace(scaled)) for symbol, value in replacements if symbol not in scaled]
    return kept, [r.xreplace(scaled) for r in reduced]


COLLECTED_MAX_TERMS = 12  # a longer sum is not searched (each pair of terms is one expansion)


def _tanh_derivatives_collected(expr: sp.Expr, tanhs: dict) -> sp.Expr:
    """``expr`` with the terms of each sum that carry the derivative ``1 - y**2`` of one saved tanh
    ``y`` (as ``1 - y**2``, ``y**2 - 1``, ``(y - 1)*(y + 1)``, or a pair ``g`` and ``-g*y**2``)
    collected into one ``(1 - y**2)*(g1 + g2 ...)``, which the printer computes as autograd's
    ``tanh_backward(g1 + g2, y)``: the upstream gradient first, then the derivative, as the chain
    rule goes. Spread over the terms (``v5 - y**2*v5`` beside ``tanh_backward(g, y)``), the
    difference rounded apart from the same quantity under a sum (a softmax's ``g - sum(g*p)`` at
    a one-hot ``p``): 3.6e-7 where autograd's gradient is exactly 0."""
    if not tanhs or not expr.args:
        return expr
    args = [_tanh_derivatives_collected(a, tanhs) for a in expr.args]
    expr = expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr
    if not expr.is_Add or len(expr.args) > COLLECTED_MAX_TERMS:
        return expr
    terms = list(expr.args)
    found = {k: _tanh_derivative(t, tanhs) for k, t in enumerate(terms)}
    # ``g`` beside ``-g*y**2``: together ``(1 - y**2)*g``
    for k, g in enumerate(terms):
        for m, other in enumerate(terms):
            if k == m or found[k] is not None or found[m] is not None:
                continue
            y = next((y for y in _tanh_squares(other, tanhs) if expand(other + g * y**2) == 0), None)
            if y is not None:
                found[k], found[m] = (y, g), (y, sp.S.Zero)
    groups: dict = {}
    for k, hit in found.items():
        if hit is not None:
            groups.setdefault(hit[0], []).append(k)
    collected, used = [], set()
    for y, members in groups.items():
        if len(members) < 2:
            continue
        used.update(members)
        collected.append((1 - y**2) * sp.Add(*[found[k][1] for k in members]))
    if not collected:
        return expr
    return sp.Add(*collected, *[t for k, t in enumerate(terms) if k not in used])


def _tanh_squares(term: sp.Expr, tanhs: dict) -> list:
    return [f.base for f in sp.Mul.make_args(term) if f.is_Pow and f.exp == 2
            and isinstance(f.base, sp.Indexed) and tensor_name(f.base) in tanhs]


def _tanh_derivative(term: sp.Expr, tanhs: dict) -> tuple | None:
    """``(y, g)`` for a term ``(1 - y**2)*g`` of a saved tanh ``y`` (the factor written any way
    ``printer.tanh_links`` reads it), the one nearest the output where it has several; else None."""
    links, rest, sign = tanh_links(list(sp.Mul.make_args(term)), tanhs)
    if not links:
        return None
    y, *others = links
    return y, sign * sp.Mul(*rest, *[1 - z**2 for z in others])


def _squares_inline(replacements: list, reduced: list, tanhs) -> tuple[list, list]:
    """cse's temporaries that are the square of a saved tanh (``v5**2``) put back where they are
    used: ``1 - v5**2`` then stays a factor the printer writes as ``tanh_backward``, autograd's own
    kernel (``1 - y*y`` in one rounding), where ``1 - shared0`` rounds the square first and loses
    the digits of a saturated tanh (4x autograd's error on ``rsqrt(tanh(c.mean())**2 + 1)``)."""
    squares = {symbol: value for symbol, value in replacements
               if value.is_Pow and value.exp == 2 and tensor_name(value.base) in tanhs}
    if not squares:
        return replacements, reduced
    kept = [(symbol, value.xreplace(squares)) for symbol, value in replacements if symbol not in squares]
    return kept, [r.xreplace(squares) for r in reduced]


def _whole_indices(replacements: list, reduced: list) -> tuple[list, list]:
    """cse's result with every index's range written out again: a range ``d - 1`` that cse shared
    with a coefficient ``1/(d - 1)`` must not leave a temporary inside the index."""
    values: dict = {}
    for symbol, value in replacements:
        values[symbol] = value.xreplace(values)

    def fix(expr):
        broken = {i for i in expr.atoms(sp.Idx) if (i.lower.free_symbols | i.upper.free_symbols) & set(values)}
        return expr.xreplace({i: sp.Idx(i.label, (i.lower.xreplace(values), i.upper.xreplace(values))) for i in broken})

    return [(s, fix(v)) for s, v in replacements], [fix(r) for r in reduced]


def _atomic_layouts(el: Elements, shapes: dict, rename: dict, sizes: dict) -> dict:
    """Record in ``shapes`` each value of the graph, its upstream gradient and adjoint, at its atoms
    (atoms.py), and return those stored with fewer axes: ``{name: atoms}`` (printed viewed)."""
    views = {}
    output = el.graph.output
    for n in el.graph.nodes:
        atomic = tuple(sp.sympify(s).xreplace(sizes) for s in el.shape(n))
        if atomic == tuple(sp.sympify(s).xreplace(sizes) for s in n.shape):
            continue
        for name in (n.name, f"d{n.name}"):
            key = rename.get(name, name)
            if key in shapes or name == f"d{output.name}" or name.startswith("d"):
                shapes[key] = atomic
                views[key] = atomic
    return views


def _bases(expr: sp.Expr) -> set[str]:
    return {str(e.base) for e in expr.atoms(sp.Indexed)}


def _needed_adjoints(formulas: list[Formula], adjoints: list[Formula]) -> list[Formula]:
    """The materialized adjoints the formulas read, directly or through one another, in order."""
    needed = set().union(*[{str(e.base) for e in f.element.atoms(sp.Indexed)} for f in formulas]) if formulas else set()
    out = []
    for a in reversed(list(adjoints)):
        if f"d{a.input}" in needed:
            out.append(a)
            needed |= {str(e.base) for e in a.element.atoms(sp.Indexed)}
    return list(reversed(out))


def _print_group(layer: Layer, el: Elements, formulas: list[Formula], frame: list, shapes: dict,
                 taken: set, rename: dict[str, str] | None = None, sizes: dict | None = None,
                 size_text: dict | None = None, as_written: frozenset = frozenset(), chains: bool = True):
    """Print ``formulas`` as torch code, with shared subexpressions (``cse``) as named temporaries.

    ``frame`` is the list of indices every tensor is laid out on (``Elements.frame``). ``rename``
    maps tensor names and ``sizes`` maps size symbols, so the same derived formulas can be printed
    in a caller's names (a batchnorm inside a model reads ``bngain``, ``dhpreact``, ``hidden``);
    ``size_text`` gives the code of a size whose variable is not its dimension's name. Returns
    ``(shared temporaries, [(code, temporaries read, in-place form, chain form)] per formula)``.

    A gradient of an input stored with an axis of 1 (``b`` of (n, 1)) that reads no shared
    temporary of more than one value is printed in that layout where it makes fewer layout calls
    (``2*b*dout/t2``, where the frame of its axes reads
    ``(2*b.view(n)*dout.view(n)/t2.view(n)).reshape(n, 1)``).
    """
    rename, sizes = rename or {}, sizes or {}
    bases = {b: sp.IndexedBase(rename.get(str(b), str(b)), **b.assumptions0)
             for f in formulas for b in f.element.atoms(sp.IndexedBase)}
    symbols = {sp.Symbol(k, **v.assumptions0): sp.Symbol(rename[k], **v.assumptions0)
               for f in formulas for v in f.element.free_symbols if isinstance(v, sp.Symbol) and (k := v.name) in rename}
    mapping = {**bases, **symbols, **sizes}
    elements = [f.element.xreplace(mapping) for f in formulas]
    dtype_of = rename.get(f"d{el.graph.output.name}", f"d{el.graph.output.name}")
    nodes = {n.name: n for n in el.graph.nodes}
    # only the axes these formulas need: a gradient of two axes prints as a matrix (and an input
    # without one, ``dA = 0`` of an input the output does not read, needs none)
    frame = el.frame([f.element for f in formulas] + [el.ref(nodes[f.input]) for f in formulas if f.element != 0],
                     within=frame)
    group_frame = frame
    frame = [i.xreplace(sizes) for i in frame]
    dims = [extent(i) for i in frame]
    shapes = dict(shapes)
    views = _atomic_layouts(el, shapes, rename, sizes)
    names = {s: sp.pycode(s) for s in dims} | dict(size_text or {})
    # the saved tanhs (by the names printed), each with its place in the forward
    tanhs = {rename.get(n.name, n.name): k for k, n in enumerate(el.graph.nodes) if n.op == "tanh"}
    elements = [_tanh_derivatives_collected(e, tanhs) for e in elements]
    elements = _exponentials_split(elements, {rename.get(n.name, n.name) for n in el.graph.nodes if n.op == "log_softmax"},
                                   _shifted_values(el, bases))
    # saved softmax values (in the names printed) and the stored axis each normalizes
    softmaxes = {rename.get(n.name, n.name): n.attrs["axes"][0] for n in el.graph.nodes
                 if n.op == "softmax" and len(n.attrs["axes"]) == 1}
    log_softmaxes = {rename.get(n.name, n.name): n.attrs["axes"][0] for n in el.graph.nodes
                     if n.op == "log_softmax" and len(n.attrs["axes"]) == 1}
    elements, masks = _masks_computed_once(elements, frame, taken | set(shapes))
    elements, products = _products_computed_once(elements, frame, taken | set(shapes) | {m for m, _ in masks},
                                                  set(softmaxes), set(log_softmaxes))
    masks += products
    for name, value in masks:
        shapes[name] = tuple(dims)
    elements, contractions = _contractions_computed_once(elements, frame, taken | set(shapes))
    for name, value in contractions:
        shapes[name] = tuple(extent(f) if f in value.free_symbols else 1 for f in frame)
    masks += contractions
    # a maximum inside a one-hot is not a value to share: cse sees each one-hot as one opaque call
    hidden, restore = hide_argmax(sp.Tuple(*elements))
    # (read after the rewrites above, which rename sums' indices: a value that reads an enclosing
    # sum's index is no temporary of the frame)
    bound = set().union(*[{r.index for r in reductions(e)} for e in elements]) if elements else set()
    replacements, reduced = sp.cse(list(hidden), symbols=sp.numbered_symbols("_cse"), ignore=tuple(bound), order="none")
    replacements, reduced = _whole_indices(replacements, reduced)
    numbers = set(el.graph.sizes.values()) | set(el.graph.constants.values()) | set(sizes.values())
    replacements, reduced = _numbers_inline(replacements, reduced, numbers)
    replacements, reduced = _scaled_entries_inline(replacements, reduced)
    replacements, reduced = _squares_inline(replacements, reduced, tanhs)
    replacements = [(symbol, restore(value)) for symbol, value in replacements]
    reduced = [restore(r) for r in reduced]
    taken = set(taken) | set(names.values())
    fresh = dict(zip([s for s, _ in replacements], map(sp.Symbol, _shared_names([v for _, v in replacements], taken))))
    replacements = [(fresh[s], v.xreplace(fresh)) for s, v in replacements]
    reduced = [spread_means(r.xreplace(fresh)) for r in reduced]
    written = dict(replacements)

    exponentials = frozenset(rename.get(n.name, n.name) for n in el.graph.nodes if n.op == "exp")
    # (the tensors a saved root's argument reads: entries of tensors, and 0-d values by name)
    node_names = {m.name for m in el.graph.nodes}
    arguments = {n: el.definition.get(n, el.nf[n]) for n in el.graph.nodes if n.op == "sqrt"}
    roots = {rename.get(n.name, n.name): frozenset(
        rename.get(t, t) for t in _bases(value) | {s.name for s in value.free_symbols if s.name in node_names})
        for n, value in arguments.items()}
    ops = {n.op for n in el.graph.nodes}
    softplus_grads = "softplus" in ops and "sigmoid" not in ops
    # a spec with a matrix product: its gradient's matrix-vector sums are matrix products, as
    # autograd's through ``@`` are (a spec without one, layernorm's ``(dout*gamma).mean(1)``, keeps
    # its sums as written, as its autograd does)
    products = bool(ops & set(CONTRACTIONS))

    def printer(frame=frame):
        p = KernelPrinter(Frame(frame), shapes, names, dtype_of, views)
        p.softmaxes = softmaxes
        p.log_softmaxes = log_softmaxes
        p.tanhs = tanhs
        p.exponentials = exponentials
        p.roots = roots
        p.softplus_grads = softplus_grads
        p.products = products
        p.written = written
        return p

    shared = []
    for name, value in masks:
        p = printer()
        p.full_rank = p._lower_rank(value)
        users = [f.position for f, r in zip(formulas, reduced) if sp.Symbol(name) in r.free_symbols]
        shared.append(Shared(name, p.doprint(value), value, users))
    for symbol, value in replacements:
        reads = [shapes[t.name] for t in temporaries(value, shapes)]
        # a value of 0-d tensors only (``dout*(1 - v4**2)`` for a scalar output) prints as 0-d
        scalar = not value.atoms(sp.Indexed) and all(len(r) == 0 for r in reads)
        shapes[str(symbol)] = () if scalar else tuple(extent(i) if varies(value, i, shapes, frame) else 1 for i in frame)
        users = [f.position for f, r in zip(formulas, reduced) if symbol in r.free_symbols]
        p = printer()
        p.full_rank = p._lower_rank(value)  # its recorded shape has the frame's rank
        shared.append(Shared(str(symbol), p.doprint(value), value, users))
    # a temporary read by another temporary is needed wherever that one is
    for later in reversed(shared):
        for earlier in shared:
            if sp.Symbol(earlier.name) in later.element.free_symbols:
                earlier.users = sorted(set(earlier.users) | set(later.users))
    # one that no gradient reads is not computed: the tie mask of ``minimum(x, x - u)``, whose two
    # sides both pass ``dx`` on, cancels from every formula (its ``if`` had no condition to test)
    shared = [s for s in shared if s.users]
    _name_scratch_buffers(shared, frame, shapes, printer(), taken)
    # temporaries of sizes and constants only are Python numbers at run time, not tensors
    number_temps: set = set()
    for s in shared:
        if all(v in scalars(el) or v.name in number_temps for v in s.element.free_symbols) and not s.element.atoms(sp.Indexed):
            number_temps.add(s.name)
    claimed = set()
    codes = []
    for f, element, r in zip(formulas, elements, reduced):
        node = nodes[f.input]
        target = [i.xreplace(sizes) if i != 0 else 0 for i in el.free(node)]
        symbols = {k: sp.Symbol(v) for k, v in names.items() if isinstance(k, sp.Symbol)}

        def text_of(dims):
            return [sp.pycode(sp.sympify(s).xreplace(sizes).xreplace(symbols)) for s in dims]

        shape = [sp.sympify(s).xreplace(sizes) for s in el.shape(node)]  # its atoms (atoms.py)
        shape_text, stored = text_of(el.shape(node)), text_of(node.shape)
        if element == 0:  # the output does not read this input, or its terms cancel (softmax(x).sum())
            codes.append((f"{dtype_of}.new_zeros(({', '.join(stored)}{',' if len(stored) == 1 else ''}))", [], None, None))
            continue

        def printed_in(frame):
            """``(code, in-place form, chain form, scratch buffer claimed)`` of the gradient in ``frame``."""
            p = printer(frame)
            # a gradient of the frame's rank read from lower-rank tensors alone (``dc = dout*w`` for a
            # (1, k) c and a (k,) w): view them into the frame, or the result lacks an axis
            p.full_rank = len(shape) == len(frame) and p._lower_rank(r)
            direct = p.print_in_order(r, [i for i in target if i != 0])
            code = direct or p.doprint(r)
            if direct:  # already the target's axes, in its order
                varying = [t for s, t in zip(shape, shape_text) if s != 1]
                fitted = code if varying == shape_text else f"({code}).reshape({', '.join(shape_text)}{',' if len(shape) == 1 else ''})"
            else:
                fitted = fit_shape(code, [k for k, i in enumerate(frame) if varies(r, i, shapes, frame)], frame, target,
                                   shape_text)
            if stored != shape_text:  # back from its atoms to the shape it is stored in
                atoms = f".reshape({', '.join(shape_text)}{',' if len(shape_text) == 1 else ''})"
                if fitted.endswith(atoms):
                    fitted = fitted[:-len(atoms)]
                fitted = f"{_wrap(fitted)}.reshape({', '.join(stored)}{',' if len(stored) == 1 else ''})"
            # a gradient already in its input's layout may be built in place, term by term
            # a scratch buffer from a sum this gradient's guard always computes
            scratch = next((s.scratch for s in shared if s.scratch and s.scratch not in claimed and f.position in s.users), "")
            # (or in the frame's layout, then reshaped: a pick's ``(n, k, 1)`` frame is the input's ``(n, k)``)
            reshape = _plain_reshape(code, fitted)
            fast = linear_form(f"d{f.input}", r, printer(frame), shapes, scratch, partial=bool(reshape)) \
                if reshape is not None and f.input not in as_written else None
            if fast and reshape:
                fast.append(f"d{f.input} = d{f.input}{reshape}")
            chain = None
            if fast is None and chains and fitted == code and f.input not in as_written:
                chain = chain_form(f"d{f.input}", r, printer(frame), shapes, taken, number_temps)
            return fitted, fast, chain, scratch if fast and scratch and f"{scratch}.copy_(" in fast[0] else ""

        try:
            options = [printed_in(frame)]
        except DerivationError as e:
            raise DerivationError(layer.name, f"d{f.input}: {e.problem}", e.fix, tensor=e.tensor or f.input) from None
        # (a shared temporary, read whole or at indices like a mask, is laid out in the group's frame;
        # in another it reads alike only if it holds one value)
        read = {str(e.base) for e in r.atoms(sp.Indexed)} | {t.name for t in temporaries(r, shapes)}
        if all(set(shapes[s.name]) <= {1} for s in shared if s.name in read):
            for layout in _stored_layouts(el, node, f, group_frame):
                try:
                    options.append(printed_in([i.xreplace(sizes) for i in layout]))
                except DerivationError:  # a sum with no axis of its size left
                    pass
        fitted, fast, chain, scratch = min(options, key=_layout_calls)
        if scratch:
            claimed.add(scratch)
        codes.append((fitted, [s.name for s in shared if sp.Symbol(s.name) in r.free_symbols], fast, chain))
    return shared, codes


def _stored_layouts(el: Elements, node, formula: Formula, frame: list) -> list[list]:
    """The frames that lay out the gradient ``formula`` of ``node`` as that input is stored, where it
    has an axis of 1 (``b`` of (n, 1)): the indices of ``frame`` it does not vary along (the one a sum
    runs over: ``(dout*x).sum(1, keepdim=True)``) on its axes of 1 or after them (``stored_layouts``)."""
    free = el.free(node)
    frame = el.frame([formula.element, el.ref(node)], within=frame)
    if formula.element == 0 or 0 not in free or not set(free) - {0} <= set(frame):
        return []
    # (the frame's other indices in the frame's order only, as gradients have been printed: every
    # order reprints a few, ``(c*dv).sum(1, keepdim=True)`` for a (1, k) ``c``, not weighed yet)
    spare = [i for i in frame if i not in free]
    return [axes for axes in stored_layouts(free, spare, every_order=False) if axes != frame]


def _layout_calls(printed: tuple) -> int:
    """How many layout calls a printed gradient makes, in every form it may run."""
    fitted, fast, chain, _ = printed
    return sum(len(LAYOUT_CALLS.findall(t)) for t in [fitted, *(fast or []), *(chain or [])])


def _plain_reshape(code: str, fitted: str) -> str | None:
    """``fitted``'s ``.reshape(...)`` where it is ``code`` reshaped and nothing else; "" where it is
    ``code``; else None."""
    if fitted == code:
        return ""
    wrapped = code if code.isidentifier() else f"({code})"
    tail = fitted[len(wrapped):]
    return tail if fitted.startswith(wrapped) and re.fullmatch(r"\.reshape\([^()]*\)", tail) else None


def varies(expr: sp.Expr, index: sp.Idx, shapes: dict, frame: list) -> bool:
    """Whether ``expr``, printed in ``frame``, varies along the axis of ``index`` (directly, or
    through a temporary whose frame layout does)."""
    if index in expr.free_symbols:
        return True
    axis = frame.index(index)
    return any(len(shapes[t.name]) == len(frame) and shapes[t.name][axis] != 1 for t in temporaries(expr, shapes))


def _unused(base: str, taken: set) -> str:
    """``base``, else ``base2``, ``base3``, ...: the first not in ``taken``, which it joins."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def _numbered(prefix: str, count: int, taken: set) -> list[str]:
    """``count`` names ``<prefix><k>``, the lowest numbers not in ``taken``."""
    names, k = [], 0
    while len(names) < count:
        if f"{prefix}{k}" not in taken:
            names.append(f"{prefix}{k}")
        k += 1
    return names


def _name_scratch_buffers(shared: list[Shared], frame: list, shapes: dict, printer: KernelPrinter,
                          taken: set) -> None:
    """``sum_bnraw_dout = (bnraw*dout).sum(0)`` becomes ``bnraw_dout = bnraw*dout`` then
    ``bnraw_dout.sum(0)``: the product's buffer, dead after the sum, can hold a gradient."""
    for s in shared:
        value = s.element
        if not isinstance(value, Red) or isinstance(value.body, (sp.Symbol, sp.Indexed)):
            continue
        body = value.body
        try:
            frame_with_bound, axis = Frame(frame).with_bound(value.index, body)
        except DerivationError:
            continue
        slots = frame_with_bound.slots
        axes = {slots.get(i) for i in body.free_symbols if i in slots}
        if len(axes - {None}) != len(frame):
            continue
        # a body no tensor it reads spans (``W[i_d, j]*dout[i_n, j]``, a matrix product) is never
        # written out: its buffer would be n x d x h where the product's result is n x d
        spans = [set(e.indices) - {0} for e in body.atoms(sp.Indexed)]
        if not any(t >= set().union(*spans) for t in spans):
            continue
        base = s.name[4:] if s.name.startswith("sum_") else f"{s.name}_terms"
        name = _unused(base, taken)
        s.scratch, s.scratch_code = name, printer._inner(frame_with_bound).doprint(body)
        s.sum_code = f"{name}.sum({axis}, keepdim=True)"


def spread_means(expr: sp.Expr) -> sp.Expr:
    """``(d*a - Red_j(b) - Red_j(c)*e)/d`` -> ``a - Red_j(b)/d - Red_j(c)*e/d`` when every term
    either cancels the size or sums over it: the sums then print as row means, as one writes them."""
    if isinstance(expr, sp.Mul):
        for inverse in [f for f in expr.args if isinstance(f, sp.Pow) and f.exp == -1 and f.base.is_Symbol]:
            size = inverse.base
            for add in [f for f in expr.args if isinstance(f, sp.Add)]:
                def fits(term):
                    factors = sp.Mul.make_args(term)
                    return size in factors or any(isinstance(g, Red) and extent(g.index) == size for g in factors)
                if all(fits(t) for t in add.args) and any(isinstance(g, Red) for t in add.args for g in sp.Mul.make_args(t)):
                    others = [f for f in expr.args if f is not inverse and f is not add]
                    return sp.Mul(*others) * sp.Add(*[t / size for t in add.args])
    return expr


_INDICATORS = (*COMPARISON_MASKS, Wins)


def _compound_mask(expr: sp.Expr) -> bool:
    """A mask that prints as several passes over memory: a tie-splitting ``Wins`` (two comparisons),
    or a product or sum of indicators (``NonNeg(0.5 - v)*NonNeg(v + 1)``, a clamp's)."""
    if isinstance(expr, Wins):
        return True
    if isinstance(expr, (sp.Mul, sp.Add)):
        parts = [a for a in expr.args if not a.is_number]
        return len(parts) >= 2 and all(isinstance(a, _INDICATORS) or _compound_mask(a) for a in parts)
    return False


def _mask_of(expr: sp.Expr) -> tuple[sp.Expr | None, list]:
    """(the compound mask ``expr`` is or has as factors, the other factors); ``(None, [])`` if none."""
    if _compound_mask(expr):
        return expr, []
    if isinstance(expr, sp.Mul):
        inside = [a for a in expr.args if isinstance(a, _INDICATORS) or _compound_mask(a)]
        mask = sp.Mul(*inside)
        if len(inside) > 1 or inside and _compound_mask(mask):
            return mask, [a for a in expr.args if a not in inside]
    return None, []


def _one_sign(mask: sp.Expr) -> tuple[sp.Expr, bool]:
    """``(Wins(u), True)`` for ``Wins(-u)``, which is ``1 - Wins(u)`` exactly (0, 1/2 and 1): the two
    operands' gradients of a maximum (``Wins(c - v)`` and ``Wins(v - c)``) read one mask; any other
    mask ``(mask, False)``."""
    if isinstance(mask, Wins):
        # expanded, so that ``(1 - b)*c`` and ``(b - 1)*c`` are seen to be each other's negative
        u = expand(mask.args[0])
        return (Wins(-u), True) if u.could_extract_minus_sign() else (Wins(u), False)
    return mask, False


def _kept_whole(red: Red, body: sp.Expr) -> sp.Expr:
    """``red`` with ``body``: a sum whose body a shared tensor now reads is kept whole
    (``GroupedRed``). A ``Red`` expands its body: ``sum(g*(1 - mask0))``, the complement of a shared
    mask, became ``sum(g) - sum(g*mask0)``, a difference of sums (two passes, and the digits the
    sum of differences keeps)."""
    if body is red.body:
        return red
    return GroupedRed(body, red.index) if type(red) is Red else type(red)(body, red.index)


def _bound_to_frame(red: Red, at: dict, frame: list) -> dict:
    """``at`` (bound indices of the enclosing sums -> frame indices) with ``red``'s bound index
    mapped to the frame index it stands for: the one of its size that its body does not read and
    no enclosing sum took (a softmax's row sum over ``k`` in a ``k x k`` frame: the column index,
    since its body reads the row's). None such, or several: ``at`` as it is, and the body's values
    stay apart from the frame's."""
    free = red.body.free_symbols
    taken = set(at.values())
    candidates = [f for f in frame if extent(f) == extent(red.index) and f not in free and f not in taken]
    return {**at, red.index: candidates[0]} if len(candidates) == 1 else at


def _masks_computed_once(elements: list, frame: list, taken: set) -> tuple[list, list]:
    """``elements`` with each full-size compound mask they compute more than once, inside a sum (at
    its bound index) or outside (at the frame's), read from one tensor ``mask<k>``; and
    ``[(name, value over the frame)]``. A clamp's mask in ``dx = (s - sum_j m*s)*m`` and in ``dw``
    was printed, and computed, three times (six passes each; 2.7x autograd's time at 1024 x 512).
    A tie-splitting mask and its complement (``_one_sign``) are one mask. A sum's index is matched
    with the frame's index it stands for (``_bound_to_frame``)."""
    full = set(frame)
    counts: dict = {}

    def count(expr, at):
        if isinstance(expr, Red):
            count(expr.body, _bound_to_frame(expr, at, frame))
            return
        mask, rest = _mask_of(expr)
        if mask is not None:
            value, _ = _one_sign(mask.xreplace(at))
            if {i for i in value.free_symbols if isinstance(i, sp.Idx)} == full:
                counts[value] = counts.get(value, 0) + 1
            for r in rest:
                count(r, at)
            return
        for a in expr.args:
            count(a, at)

    for e in elements:
        count(e, {})
    repeated = [v for v, c in counts.items() if c > 1]
    names = dict(zip(repeated, _numbered("mask", len(repeated), taken)))
    if not names:
        return elements, []

    def replaced(expr, at):
        if isinstance(expr, Red):
            return _kept_whole(expr, replaced(expr.body, _bound_to_frame(expr, at, frame)))
        mask, rest = _mask_of(expr)
        value, negated = _one_sign(mask.xreplace(at)) if mask is not None else (None, False)
        name = names.get(value)
        if name is not None:
            back = {f: j for j, f in at.items()}
            read = sp.IndexedBase(name)[tuple(back.get(f, f) for f in frame)]
            return sp.Mul(1 - read if negated else read, *[replaced(r, at) for r in rest])
        if not expr.args:
            return expr
        args = [replaced(a, at) for a in expr.args]
        return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr

    return [replaced(e, {}) for e in elements], [(name, value) for value, name in names.items()]


def _shifted_values(el: Elements, bases: dict) -> list[tuple[sp.Indexed, sp.Indexed]]:
    """``(a, r)`` for each forward value ``r`` that is a maximum or a logsumexp of ``a`` over some
    axes, as the formulas read them (``bases``: the names printed), so that ``a - r`` is at most 0:
    ``x - logsumexp(x, 1)`` is a log-softmax written out, ``x - x.amax(1)`` the shift before an
    ``exp``."""
    out = []
    for node in el.graph.nodes:
        if node.op in ("logsumexp", "max") and len(node.inputs) == 1 and node.inputs[0].op != "labels":
            a, r = el.ref(node.inputs[0]), el.ref(node)
            if isinstance(a, sp.Indexed) and isinstance(r, sp.Indexed):
                out.append((a.xreplace(bases), r.xreplace(bases)))
    return out


def _exponentials_split(elements: list, log_probabilities: set, shifted: list | None = None) -> list:
    """``exp(logp[i, j] + 2*logp[i, y[i]])`` as ``exp(logp[i, j])*exp(2*logp[i, y[i]])`` (``SplitExp``):
    the normal form adds the exponents of a product, so each term of a loss on a log-softmax
    (``-(1 - p)**2*logp`` at the label) evaluated its own full-size ``exp``; split by the axes each
    part varies along, the terms share one full-size ``exp(logp)`` and each has an ``exp`` per row.
    Only where every part is at most 0: a log-probability (times a positive number), or a value less
    its maximum or logsumexp (``shifted``, ``_shifted_values``: ``x - v1`` with ``v1 =
    logsumexp(x, 1)``, whose ``exp`` is autograd's backward of ``logsumexp``). Each factor is then at
    most 1, so no product overflows where the sum's ``exp`` did not, and where one factor underflows
    the whole does too. An ``exp`` of one such part alone is written the same way, so it is shared."""
    def indices(term):
        return frozenset(i for i in term.free_symbols if isinstance(i, sp.Idx))

    def nonpositive(term):
        number, rest = term.as_coeff_Mul()
        return number > 0 and isinstance(rest, sp.Indexed) and str(rest.base) in log_probabilities

    def pieces(exponent):
        """The exponent's terms with each shifted difference one piece (``x - v1`` stays whole), or
        None where a piece is not known to be at most 0."""
        terms = list(sp.Add.make_args(exponent))
        out = []
        for a, r in shifted or ():
            for t in list(terms):
                number, read = t.as_coeff_Mul()
                if number <= 0 or not isinstance(read, sp.Indexed) or read.base != a.base:
                    continue
                at = dict(zip(a.indices, read.indices))
                other = -number * r.xreplace(at)
                if other in terms:
                    terms.remove(t)
                    terms.remove(other)
                    out.append(t + other)
                    break
        if not all(nonpositive(t) for t in terms):
            return None
        return out + terms

    parts: dict = {}
    for e in elements:
        for atom in e.atoms(sp.exp):
            found = pieces(atom.args[0])
            if found is None or len(found) < 2:
                continue
            groups: dict = {}
            for t in found:
                groups.setdefault(indices(t), []).append(t)
            if len(groups) > 1:
                parts[atom] = [sp.Add(*g) for g in groups.values()]
    if not parts:
        return elements
    split = {a: sp.Mul(*[SplitExp(p) for p in ps], evaluate=False) for a, ps in parts.items()}
    alone = {p for ps in parts.values() for p in ps}
    for e in elements:
        split.update({a: SplitExp(a.args[0]) for a in e.atoms(sp.exp) if a.args[0] in alone})
    # and the full-size one a factor of the terms that read it: one product with a value per row
    # (as a label's one-hot is, one scatter of a value per row)
    widest = max(len(indices(p)) for p in alone)
    full = sorted({SplitExp(p) for p in alone if len(indices(p)) == widest}, key=sp.default_sort_key)
    out = []
    for e in elements:
        e = e.xreplace(split)
        deltas = sorted(e.atoms(sp.KroneckerDelta), key=sp.default_sort_key)
        if e.has(*full) and deltas:
            e = sp.collect(expand(e), full + deltas)
        elif e.has(*full):
            # without a one-hot, only the sums whose every term reads it: multiplying the rest out
            # would undo the closed form's products (``(t - 1)*(t + 1)`` of a tanh, exact where
            # ``t**2 - 1`` cancels)
            e = e.replace(lambda a: a.is_Add and _shared_by_every_term(a, full),
                          lambda a: _taken_out(a, _shared_by_every_term(a, full)))
        out.append(e)
    return out


def _shared_by_every_term(total: sp.Add, factors: list) -> list:
    """The ``factors`` that every term of ``total`` has (as a factor of its product)."""
    return [f for f in factors if all(f in sp.Mul.make_args(t) for t in total.args)]


def _taken_out(total: sp.Add, factors: list) -> sp.Expr:
    """``total`` as the product of ``factors`` and the sum of what is left of its terms."""
    product = sp.Mul(*factors)
    return sp.Mul(product, sp.Add(*[t / product for t in total.args]), evaluate=False)


def _contractions_computed_once(elements: list, frame: list, taken: set) -> tuple[list, list]:
    """``elements`` with each matrix product they compute in two places, one of them inside another
    sum (at its bound index), read from one tensor ``product<k>``; and ``[(name, value)]``, each
    value at the frame's indices. ``ds = sum_h W*sum_n(dt*x)`` and ``dW = s*sum_n(dt*x)`` of
    ``tanh((x*s) @ W)`` read the same ``x.T @ dt``: cse shares what is written alike, and a sum's
    body is written at its bound index, so the product was computed twice (three matrix products
    where autograd's backward has two)."""
    found: dict = {}  # the product at the frame's indices -> how many places compute it
    inner: set = set()  # those computed inside another sum somewhere (elsewhere cse shares them)

    def collect(expr, at):
        if isinstance(expr, Red):
            if is_contraction(expr):
                key = expr.xreplace(at)
                found[key] = found.get(key, 0) + 1
                if at:
                    inner.add(key)
            collect(expr.body, _bound_to_frame(expr, at, frame))
            return
        for a in expr.args:
            collect(a, at)

    for e in elements:
        collect(e, {})
    shared = [r for r, k in found.items() if k >= 2 and r in inner
              and {i for i in r.free_symbols if isinstance(i, sp.Idx)} <= set(frame)]
    if not shared:
        return elements, []
    shared = sorted(shared, key=sp.default_sort_key)
    names = dict(zip(shared, _numbered("product", len(shared), taken)))

    def replaced(expr, at):
        if isinstance(expr, Red):
            key = expr.xreplace(at)
            if key in names:
                back = {f: j for j, f in at.items()}
                free = key.free_symbols
                return sp.IndexedBase(names[key])[tuple(back.get(f, f) if f in free else 0 for f in frame)]
            return _kept_whole(expr, replaced(expr.body, _bound_to_frame(expr, at, frame)))
        if not expr.args:
            return expr
        args = [replaced(a, at) for a in expr.args]
        return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr

    return [replaced(e, {}) for e in elements], [(names[r], r) for r in shared]


def kernel_sums(expr: sp.Expr, softmaxes: set, log_softmaxes: set) -> set:
    """The row sums in ``expr`` that torch's softmax or log-softmax backward computes itself: the
    ``sum_j a*s`` of ``s*(a - sum_j a*s)`` and the ``sum_j a`` of ``a - exp(l)*sum_j a``, for a
    saved softmax ``s`` or log-softmax ``l`` (``KernelPrinter._softmax_backward``,
    ``_log_softmax_backward``)."""
    found = set()
    for product in expr.atoms(sp.Mul):
        factors = sp.Mul.make_args(product)
        if any(isinstance(f, sp.exp) and isinstance(f.args[0], sp.Indexed) and str(f.args[0].base) in log_softmaxes
               for f in factors):
            found |= {f for f in factors if isinstance(f, Red)}
        saved = {str(f.base) for f in factors if isinstance(f, sp.Indexed) and str(f.base) in softmaxes}
        for total in (f for f in factors if isinstance(f, sp.Add)) if saved else ():
            for term in total.args:
                found |= {r for r in sp.Mul.make_args(term) if isinstance(r, Red)
                          and saved & {str(e.base) for e in r.body.atoms(sp.Indexed)}}
    return found


def _products_computed_once(elements: list, frame: list, taken: set, softmaxes: set = frozenset(),
                            log_softmaxes: set = frozenset()) -> tuple[list, list]:
    """``elements`` with each product of full-size factors that they compute in two places, one of
    them inside a sum, read from one tensor ``common<k>``; and ``[(name, value over the frame)]``.
    cse shares what is written alike, and a sum's body is written at its bound index: the
    derivative of ``tanh(v1 @ c)`` was computed once for ``dx`` (summed over ``k``) and again for
    ``dc`` (summed over ``n``), and a softmax's upstream gradient ``g`` once in ``g*p`` and again
    in ``sum(g*p)``. Sums' indices are matched with the frame's (``_bound_to_frame``). The row sum
    of a saved softmax's or log-softmax's backward (``kernel_sums``) is not a place: torch's
    kernel computes it from the gradient it is given, which is then computed once as it is."""
    full = set(frame)
    own_sums = set().union(*[kernel_sums(e, softmaxes, log_softmaxes) for e in elements]) if elements else set()

    def parts(product, at) -> list:
        """``[(value at the frame's indices, the factors of ``product`` it stands for, their sign
        against it)]`` of its full-size factors. A sum of either sign is one value (``1 - y**2`` and
        ``y**2 - 1``), and ``(y - 1)*(y + 1)`` is ``y**2 - 1``, as the closed form writes a tanh's
        derivative outside a sum (a sum's grouped body has it factored)."""
        def signed(v):  # (a sum's sign: with its number positive, ``1 - y**2``, as tanh_backward computes it)
            if not v.is_Add:
                return v, 1
            number = sum(a for a in v.args if a.is_number)
            negative = number < 0 if number != 0 else v.could_extract_minus_sign()
            return (-v, -1) if negative else (v, 1)

        out = [(*signed(f.xreplace(at)), [f]) for f in product.args if not f.is_number and not isinstance(f, Red)]
        out = [(v, s, fs) for v, s, fs in out if {i for i in v.free_symbols if isinstance(i, sp.Idx)} == full]
        merging = True
        while merging:
            merging = False
            for k, (v, s, fs) in enumerate(out):
                written = s * v
                if not (written.is_Add and len(written.args) == 2 and sp.S.NegativeOne in written.args):
                    continue
                y = written + 1  # ``written`` is ``y - 1``
                m = next((m for m, (w, t, _) in enumerate(out) if m != k and t * w == y + 1), None)
                if m is not None:
                    out = [p for j, p in enumerate(out) if j not in (k, m)] + [(*signed(y**2 - 1), fs + out[m][2])]
                    merging = True
                    break
        return out

    def factors(read: list) -> Counter:
        """The full-size factors of a product, from its ``parts``."""
        return Counter(v for v, _, _ in read)

    found = []  # (full-size factors, the frame axes summed over where it stands: its context)

    def collect(expr, at, summed):
        if expr in own_sums:
            return
        if isinstance(expr, Red):
            mapped = _bound_to_frame(expr, at, frame)
            collect(expr.body, mapped, summed | {mapped.get(expr.index)})
            return
        if expr.is_Mul:
            mine = factors(parts(expr, at))
            # (one factor alone too where it calls a function: ``exp(t1 - out)`` in ``dx`` and in ``dw``'s sum)
            if sum(mine.values()) >= 2 or any(f.atoms(sp.Function) for f in mine):
                found.append((mine, summed))
        for a in expr.args:
            collect(a, at, summed)

    for e in elements:
        collect(e, {}, frozenset())
    common: dict = {}
    for k, (a, a_context) in enumerate(found):
        for b, b_context in found[k + 1:]:
            both = a & b
            # (in two sums over the same axes the whole sums are alike, and cse shares them)
            # a product of plain tensors is left as written: it costs one pass, and named once it
            # would be multiplied in another order than autograd's (``(dout*x)*inv`` for ``dout*(x*inv)``);
            # one factor alone is named where it calls a function (``exp``, ``tanh``): a pass of those
            # costs more than the buffer
            computed = [f for f in both if not isinstance(f, sp.Indexed)]
            if a_context != b_context and computed and (
                    sum(both.values()) >= 2 or any(f.atoms(sp.Function) for f in computed)):
                key = tuple(sorted(both.elements(), key=sp.default_sort_key))
                common[key] = sp.Mul(*key)
    if not common:
        return elements, []
    # the largest first; a product reads one of them, and one read in two contexts is kept
    chosen = sorted(common, key=lambda key: (-len(key), sp.default_sort_key(common[key])))
    contexts: dict = {}
    for mine, context in found:
        key = next((key for key in chosen if not Counter(key) - mine), None)
        contexts.setdefault(key, set()).add(context)
    chosen = [key for key in chosen if len(contexts.get(key, ())) >= 2]
    if not chosen:
        return elements, []
    names = dict(zip(chosen, _numbered("common", len(chosen), taken)))

    used = {}

    def replaced(expr, at):
        if isinstance(expr, Red):
            return _kept_whole(expr, replaced(expr.body, _bound_to_frame(expr, at, frame)))
        if expr.is_Mul:
            read = parts(expr, at)
            mine = factors(read)
            key = next((key for key in chosen if not Counter(key) - mine), None)
            if key is not None:
                rest, wanted, sign = list(expr.args), Counter(key), 1
                for v, s, fs in read:
                    if wanted[v] > 0:
                        wanted[v] -= 1
                        sign *= s  # the factors as written, against the common product's
                        for f in fs:
                            rest.remove(f)
                rest = [sign] + [replaced(f, at) for f in rest]
                back = {f: j for j, f in at.items()}
                used[key] = names[key]
                return sp.Mul(sp.IndexedBase(names[key])[tuple(back.get(f, f) for f in frame)], *rest)
        if not expr.args:
            return expr
        args = [replaced(a, at) for a in expr.args]
        return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr

    elements = [replaced(e, {}) for e in elements]
    return elements, [(name, common[key]) for key, name in used.items()]


def _shared_names(values: list[sp.Expr], taken: set) -> list[str]:
    """Readable names for shared temporaries: ``sum_bnraw_dout`` for a reduction, else ``shared<k>``."""
    names = []
    for k, value in enumerate(values):
        base = f"shared{k}"
        if isinstance(value, Red):
            base = "sum_" + "_".join(sorted(str(e.base) for e in value.body.atoms(sp.Indexed)))
        names.append(_unused(base, taken))
    return names


__all__ = ["build", "Kernel", "Formula", "Shared", "Check", "LabelCheck", "Red"]
