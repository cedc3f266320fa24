"""Everything a generated fused kernel is made of, decided in Python (templates only place it).

``build(layer)`` runs the pipeline: trace -> element-wise normal form -> reverse mode -> refold into
saved quantities -> closed form -> shared subexpressions (``cse``) -> printed torch code, plus the
saved tensors (read off the formulas' free symbols), the sizes, and the input checks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy as sp

from .differentiate import Gradients, differentiate
from .elements import Elements
from .errors import DerivationError
from .forward import size_scalars
from .backward_plan import chain_form, linear_form
from .forward_plan import forward_code
from .memo import ByObject
from .printer import Frame, KernelPrinter, fit_shape, temporaries
from .simplify import closed_form, refold, scalars
from .spec import Labels, Layer, Tensor, constant_bounds, constant_range, dim_names
from .symbolic import Red, extent, hide_argmax, reductions
from .trace import Graph, trace


@dataclass
class Formula:
    """The fused gradient of one input."""

    input: str
    position: int  # argument position in forward
    element: sp.Expr  # closed form, element-wise, in saved quantities
    refolded: sp.Expr = sp.S.Zero  # the refold's result, before the closed form
    rewrites: list = field(default_factory=list)  # the refold's steps (simplify.Rewrite), for the document
    code: str = ""  # vectorized right-hand side (after shared subexpressions)
    needs: list[str] = field(default_factory=list)  # shared temporaries it reads
    fast: list[str] = field(default_factory=list)  # statements computing it in fewer passes, if any


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
    forbidden: dict = field(default_factory=dict)  # input -> refold rewrites its gradient may not take
    as_written: frozenset = frozenset()  # inputs whose gradient is printed as its formula reads

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


def size_sources(layer: Layer) -> list[tuple[str, str]]:
    """Lines that read every size from the first input declaring it: ``n, d = x.shape``."""
    known, out = set(), []
    for name, decl in layer.tensors.items():
        targets = [d if d not in known and dim_names(d) == [d] else "_" for d in decl.dims]
        if any(t != "_" for t in targets):
            out.append((", ".join(targets) + ("," if len(targets) == 1 else ""), name))
            known.update(t for t in targets if t != "_")
    missing = [d for d in layer.dims if d not in known]
    if missing:
        raise DerivationError(layer.name, f"size {missing[0]!r} is not the size of any tensor input",
                              "declare a tensor input with that dimension")
    return out


LABEL_DTYPES = "(torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)"


def input_checks(layer: Layer, divisors: set, sources: list[tuple[str, str]]) -> list[Check | LabelCheck]:
    """What the generated Function checks before it computes, cheapest first: ranks (the size
    unpacking needs them), shapes, dtypes and devices, the declared range of each Constant, the size
    conditions the formulas divide by, then the labels' range (the only check that reads data)."""
    name, checks = layer.name, []
    # a tensor all of whose sizes are read from its own shape needs no shape check
    self_defined = {tensor for unpack, tensor in sources if "_" not in unpack.replace(" ", "").split(",")}
    floats = [k for k, v in layer.tensors.items() if isinstance(v, Tensor)]
    first = floats[0]
    for k, decl in layer.tensors.items():
        dims = ", ".join(decl.dims)
        checks.append(Check(f"{k}.dim() != {len(decl.dims)}",
                            f"f\"{name}: {k} must have {len(decl.dims)} dimension(s) ({dims}), got shape {{tuple({k}.shape)}}\"",
                            kind="rank", holds=f"{k}.dim() == {len(decl.dims)}"))
    for k, decl in layer.tensors.items():
        if k in self_defined:
            continue
        shape = ", ".join(decl.dims) + ("," if len(decl.dims) == 1 else "")
        checks.append(Check(f"{k}.shape != ({shape})",
                            f"f\"{name}: {k} must have shape ({shape}) = {{({shape})}}, got {{tuple({k}.shape)}}\"",
                            holds=f"{k}.shape == ({shape})"))
    for k in floats[1:]:
        checks.append(Check(f"{k}.dtype != {first}.dtype or {k}.device != {first}.device",
                            f"f\"{name}: {k} is {{{k}.dtype}} on {{{k}.device}} but {first} is {{{first}.dtype}} on "
                            f"{{{first}.device}}; move them to one dtype and device\"",
                            holds=f"{k}.dtype == {first}.dtype and {k}.device == {first}.device"))
    for k in floats:
        checks.append(Check(f"not {k}.is_floating_point()",
                            f"f\"{name}: {k} must be a floating-point tensor, got {{{k}.dtype}}\"",
                            holds=f"{k}.is_floating_point()"))
    for k, decl in layer.tensors.items():
        if isinstance(decl, Labels):
            checks.append(Check(f"{k}.dtype not in {LABEL_DTYPES}",
                                f"f\"{name}: labels {k} must be an integer tensor, got {{{k}.dtype}}\"",
                                holds=f"{k}.dtype in {LABEL_DTYPES}"))
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
        checks.append(Check(f"{text} == 0",
                            f"f\"{name}: the formula divides by {text}, which is 0 for these sizes "
                            f"({', '.join(f'{s}={{{s}}}' for s in sorted(map(str, divisor.free_symbols)))}); "
                            f"use larger sizes (for example a batch of at least 2 rows)\"", holds=f"{text} != 0"))
    for k, decl in layer.tensors.items():
        if isinstance(decl, Labels):
            c = decl.classes
            checks.append(LabelCheck(k, c, f"f\"{name}: labels {k} must lie in [0, {c}) = [0, {{{c}}})\""))
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


_BUILT = ByObject(maxsize=32)  # layer -> its kernel (every rewrite allowed)
_DERIVED = ByObject(maxsize=32)  # layer -> (graph, elements, gradients): what every variant shares


def build_cached(layer: Layer) -> Kernel:
    """``build(layer)``, once per layer object in this process (of the latest 32)."""
    return _BUILT.get(layer, lambda layer: build(layer))


def derived(layer: Layer) -> tuple[Graph, Elements, Gradients]:
    """The traced graph, its normal form and the normal-form gradients, once per layer object."""
    def derive(layer):
        graph = trace(layer)
        el = Elements(graph)
        return graph, el, differentiate(el)
    return _DERIVED.get(layer, derive)


def build(layer: Layer, forbidden: dict[str, frozenset] | None = None, as_written: frozenset = frozenset()) -> Kernel:
    """The fused kernel of ``layer``. ``forbidden`` maps an input to the refold rewrites its
    gradient may not take (``(node, variable)`` names, see ``select``): a less folded form.
    The gradients of the inputs in ``as_written`` are printed as their formulas read, without
    the in-place forms of ``backward_plan`` (which order some operations differently)."""
    start = time.perf_counter()
    graph, el, grads = derived(layer)
    order = list(layer.inputs)
    formulas = []
    for node, expr in grads.grads.items():
        rewrites: list = []
        refolded = refold(el, expr, rewrites, (forbidden or {}).get(node.name, frozenset()))
        formulas.append(Formula(node.name, order.index(node.name), closed_form(refolded, scalars(el)), refolded,
                                rewrites))

    frame_dims = [graph.sizes[d] for d in layer.dims]
    shapes = _shapes(graph)
    try:
        shared, codes = print_formulas(layer, el, formulas, frame_dims, shapes,
                                       taken={n.name for n in graph.nodes} | {f"d{n.name}" for n in graph.nodes},
                                       as_written=as_written)
    except DerivationError as e:
        raise located(e, graph) from None
    for f, (code, needs, fast) in zip(formulas, codes):
        f.code, f.needs, f.fast = code, needs, fast or []
    names = {s: str(s) for s in graph.sizes.values()}

    read = set()
    for expr in [f.element for f in formulas]:
        read |= {str(e.base) for e in expr.atoms(sp.Indexed)}
    # scalar (0-d) forward values the formulas read are Symbols, not Indexed: saved as 0-d tensors
    read |= {s.name for f in formulas for s in f.element.free_symbols}
    saved = [n.name for n in graph.nodes if n.name in read and (n.shape or n.op not in ("input", "labels"))]
    used_symbols = set().union(*[f.element.free_symbols for f in formulas]) if formulas else set()
    constants = [c for c, s in graph.constants.items() if s in used_symbols]
    sizes = set(graph.sizes.values())
    divisors = size_divisors(size_scalars(graph) + [f.element for f in formulas], sizes)
    sources = size_sources(layer)
    try:
        forward = forward_code(el, saved, frame_dims, names)
        with_graph = forward_code(el, saved, frame_dims, names, inplace=False)
    except DerivationError as e:
        raise located(e, graph) from None
    return Kernel(layer, graph, el, grads, formulas, shared, forward, with_graph, saved,
                  [str(s) for s in frame_dims], sources, input_checks(layer, divisors, sources), constants,
                  time.perf_counter() - start, dict(forbidden or {}), frozenset(as_written))


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


def print_formulas(layer: Layer, el: Elements, formulas: list[Formula], frame_dims: list, shapes: dict,
                   taken: set, rename: dict[str, str] | None = None, sizes: dict | None = None,
                   as_written: frozenset = frozenset()):
    """Print ``formulas`` as torch code, with shared subexpressions (``cse``) as named temporaries.

    ``rename`` maps tensor names and ``sizes`` maps size symbols, so the same derived formulas can
    be printed in a caller's names (a batchnorm inside a model reads ``bngain``, ``dhpreact``,
    ``hidden``). Returns ``(shared temporaries, [(code, temporaries read)] per formula)``.
    """
    rename, sizes = rename or {}, sizes or {}
    bases = {b: sp.IndexedBase(rename.get(str(b), str(b)), **b.assumptions0)
             for f in formulas for b in f.element.atoms(sp.IndexedBase)}
    symbols = {sp.Symbol(k, **v.assumptions0): sp.Symbol(rename[k], **v.assumptions0)
               for f in formulas for v in f.element.free_symbols if isinstance(v, sp.Symbol) and (k := v.name) in rename}
    mapping = {**bases, **symbols, **sizes}
    elements = [f.element.xreplace(mapping) for f in formulas]
    dtype_of = rename.get(f"d{el.graph.output.name}", f"d{el.graph.output.name}")
    frame = [sp.sympify(s).xreplace(sizes) for s in frame_dims]
    index = {s.xreplace(sizes): el.index[s].xreplace(sizes) for s in frame_dims}
    shapes = dict(shapes)
    names = {s: sp.pycode(s) for s in frame}
    bound = set().union(*[{r.index for r in reductions(e)} for e in elements]) if elements else set()
    # a maximum inside a one-hot is not a value to share: cse sees each one-hot as one opaque call
    hidden, restore = hide_argmax(sp.Tuple(*elements))
    replacements, reduced = sp.cse(list(hidden), symbols=sp.numbered_symbols("_cse"), ignore=tuple(bound), order="none")
    replacements = [(symbol, restore(value)) for symbol, value in replacements]
    reduced = [restore(r) for r in reduced]
    taken = set(taken) | set(names.values())
    fresh = dict(zip([s for s, _ in replacements], map(sp.Symbol, _shared_names([v for _, v in replacements], taken))))
    replacements = [(fresh[s], v.xreplace(fresh)) for s, v in replacements]
    reduced = [spread_means(r.xreplace(fresh)) for r in reduced]
    slots = {index[s]: k for k, s in enumerate(frame)}
    shared = []
    for symbol, value in replacements:
        reads = [shapes[t.name] for t in temporaries(value, shapes)]
        # a value of 0-d tensors only (``dout*(1 - v4**2)`` for a scalar output) prints as 0-d
        scalar = not value.atoms(sp.Indexed) and all(len(r) == 0 for r in reads)
        shapes[str(symbol)] = () if scalar else tuple(s if index[s] in value.free_symbols else 1 for s in frame)
        users = [f.position for f, r in zip(formulas, reduced) if symbol in r.free_symbols]
        printer = KernelPrinter(Frame(frame, slots), shapes, names, dtype_of)
        printer.full_rank = printer._lower_rank(value)  # its recorded shape has the frame's rank
        shared.append(Shared(str(symbol), printer.doprint(value), value, users))
    # a temporary read by another temporary is needed wherever that one is
    for later in reversed(shared):
        for earlier in shared:
            if sp.Symbol(earlier.name) in later.element.free_symbols:
                earlier.users = sorted(set(earlier.users) | set(later.users))
    _name_scratch_buffers(shared, frame, index, shapes, names, dtype_of, slots, taken)
    # temporaries of sizes and constants only are Python numbers at run time, not tensors
    numbers: set = set()
    for s in shared:
        if all(v in scalars(el) or v.name in numbers for v in s.element.free_symbols) and not s.element.atoms(sp.Indexed):
            numbers.add(s.name)
    claimed = set()
    codes = []
    for f, element, r in zip(formulas, elements, reduced):
        dims = [sp.pycode(sp.Mul(*[sp.Symbol(p, integer=True, positive=True) for p in dim_names(d)]).xreplace(sizes))
                for d in layer.tensors[f.input].dims]
        if element == 0:  # the output does not read this input, or its terms cancel (softmax(x).sum())
            codes.append((f"{dtype_of}.new_zeros(({', '.join(dims)}{',' if len(dims) == 1 else ''}))", [], None))
            continue
        printer = KernelPrinter(Frame(frame, slots), shapes, names, dtype_of)
        # a gradient of the frame's rank read from lower-rank tensors alone (``dc = dout*w`` for a
        # (1, k) c and a (k,) w): view them into the frame, or the result lacks an axis
        printer.full_rank = len(dims) == len(frame) and printer._lower_rank(r)
        try:
            code = printer.doprint(r)
        except DerivationError as e:
            raise DerivationError(layer.name, f"d{f.input}: {e.problem}", e.fix, tensor=e.tensor) from None
        fitted = _fit(code, element, f.input, layer, index, frame, dims)
        # a gradient already in its input's layout may be built in place, term by term
        # a scratch buffer from a sum this gradient's guard always computes
        scratch = next((s.scratch for s in shared if s.scratch and s.scratch not in claimed and f.position in s.users), "")
        fast = linear_form(f"d{f.input}", r, KernelPrinter(Frame(frame, slots), shapes, names, dtype_of), shapes,
                           scratch) if fitted == code and f.input not in as_written else None
        if fast and scratch and f"{scratch}.copy_(" in fast[0]:
            claimed.add(scratch)
        if fast is None and fitted == code and f.input not in as_written:
            fast = chain_form(f"d{f.input}", r, KernelPrinter(Frame(frame, slots), shapes, names, dtype_of), shapes,
                              taken, numbers)
        codes.append((fitted, [s.name for s in shared if sp.Symbol(s.name) in r.free_symbols], fast))
    return shared, codes


def _name_scratch_buffers(shared: list[Shared], frame: list, index: dict, shapes: dict, names: dict,
                          dtype_of: str, slots: dict, taken: set) -> None:
    """``sum_bnraw_dout = (bnraw*dout).sum(0)`` becomes ``bnraw_dout = bnraw*dout`` then
    ``bnraw_dout.sum(0)``: the product's buffer, dead after the sum, can hold a gradient."""
    for s in shared:
        value = s.element
        if not isinstance(value, Red) or isinstance(value.body, (sp.Symbol, sp.Indexed)):
            continue
        body = value.body
        axes = {slots.get(i) for i in body.free_symbols if i in slots} | {frame.index(extent(value.index))}
        if len(axes - {None}) != len(frame):
            continue
        base = s.name[4:] if s.name.startswith("sum_") else f"{s.name}_terms"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}{k}"
        taken.add(name)
        frame_with_bound, axis = Frame(frame, slots).with_bound(value.index, body)
        printer = KernelPrinter(frame_with_bound, shapes, names, dtype_of)
        s.scratch, s.scratch_code = name, printer.doprint(body)
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


def _fit(code: str, expr: sp.Expr, name: str, layer: Layer, index: dict, frame_dims: list, dims: list[str]) -> str:
    """Make the frame-shaped gradient the input's shape (``(1, d)`` -> ``(d,)``, broadcast -> full)."""
    frame = [sp.pycode(s) for s in frame_dims]
    varying_dims = [d for d in dims if d != "1"]
    if [d for d in frame if d in varying_dims] != varying_dims:
        raise DerivationError(layer.name, f"{name}'s dimensions {dims} are not in the order {frame}",
                              "declare every input's dimensions in one consistent order")
    varying = {sp.pycode(s) for s in frame_dims if index[s] in expr.free_symbols}
    layout = tuple(d if d in varying and d in dims else "1" for d in frame)
    axes = tuple(d if d in dims else "1" for d in frame)
    return fit_shape(code, layout, axes, tuple(dims),
                     lambda shape: ", ".join(shape) + ("," if len(shape) == 1 else ""))


def _shared_names(values: list[sp.Expr], taken: set) -> list[str]:
    """Readable names for shared temporaries: ``sum_bnraw_dout`` for a reduction, else ``shared<k>``."""
    names = []
    for k, value in enumerate(values):
        base = f"shared{k}"
        if isinstance(value, Red):
            base = "sum_" + "_".join(sorted(str(e.base) for e in value.body.atoms(sp.Indexed)))
        name, suffix = base, 1
        while name in taken:
            suffix += 1
            name = f"{base}{suffix}"
        taken.add(name)
        names.append(name)
    return names


__all__ = ["build", "Kernel", "Formula", "Shared", "Check", "LabelCheck", "Red"]
