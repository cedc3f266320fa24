"""The kernel plan: a fused kernel as loops over memory, read off its closed form.

The eager kernel is a list of torch calls, each a pass over memory. A native kernel instead makes
as few passes as its reductions allow, and the plan says which. Every value of the forward and of
the backward becomes a ``Value`` with a *layout*: the frame axes it varies on (a full-size
element ``(row, col)``, a per-row value ``(row,)``, a per-column value ``(col,)``, a scalar). A
reduction is a value too, with the axis it sums (or maximises) and its body. Then:

* **levels**: a value's *time* is ``(sweep, loop)``. A reduction over the columns of a row of a
  body computed in loop ``p`` is known after that loop (``p + 1``): the rows are independent, so
  one sweep over the rows runs several loops over each row while it is in cache (cross-entropy:
  the maximum, then the sum of exponentials, then the output). A reduction over the rows needs
  every row: it is accumulated per chunk of rows during one sweep and known in the next
  (batchnorm: the sum, then the sum of squared deviations, then the output). Identical reductions
  are one value (``cse``), and reductions of the same time share their loop.
* **finalize** steps run between sweeps over the kept axis (``mean = sum/n``, ``1/sqrt(var + eps)``,
  per-column coefficients, ``dgamma``), in double precision.
* **element maps**: each full-size expression is split by layout (``hoist``): factors and terms
  that vary per column only become per-column values computed once, per-row ones once per row,
  so the loop body is the part that really varies per element.
* **frames of more axes**: the innermost axis is the columns and the outer axes, flattened, the rows
  (``x (n, c, l)``: rows ``(n, c)``, columns ``l``); a value varies on any subset of the axes
  (``full_of``, ``row_of``, ``col_of``), and one that varies on fewer than the rows (a mean per
  channel ``c``) is an array computed between sweeps. A sum over several axes takes the innermost
  first (``sum_n sum_l``: a sum over each row, then the rows' sums added per chunk into a partial per
  ``c``). A sum over an axis of a product of factors on different axes (a contraction, ``x @ W``)
  is refused here: a matrix product, not a loop over rows (``stages.py`` lowers such a kernel as
  ``at::mm`` steps with loop programs of this plan between them, for the C++ backend).
* **labels**: a Kronecker delta of a column and a label (``probs - onehot(y)``) is 0 in the loop
  and a per-row fix-up writes the label's column afterwards: a scatter of ``n`` values.
* **saved values, by cost**: the forward saves every per-row and per-column value the backward
  reads (a few bytes); a full-size value is recomputed in the backward from the inputs and those
  when that costs less than writing and reading it again (``recompute``).
* **statistics in double**: every sum is accumulated in double precision, whatever the dtype, and
  never as ``E[x^2] - E[x]^2``. A sum over the rows of a polynomial in per-column values of the
  sweep before (the squared deviations from the mean) is taken in that sweep as sums shifted by
  each column's first row, their bodies evaluated in double (``_shifted``): batchnorm's forward is
  two sweeps over ``x``, not three. The rewrite is a Taylor expansion, exact for a polynomial and
  checked by ``expand`` before it is used; everything else computes the closed form as it is.

``lower(kernel)`` returns a ``Plan`` or raises ``NotLowered`` with the reason (a layer the plan
cannot lower keeps its eager kernel, and the generate report says why).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import sympy as sp

from .functions import Clamp, Equal, NonNeg, Relu, Sigmoid, Softplus, Step, Where, Wins
from .forward_plan import plan as forward_statements
from .spec import Labels, dim_names
from .symbolic import AxisLogSoftmax, AxisLogSumExp, AxisMax, AxisSoftmax, AxisSum, AxisVar, GroupedRed, IsArgmax, Max, Red, extent

FULL, ROW, COL, SCALAR = frozenset({0, 1}), frozenset({0}), frozenset({1}), frozenset()


def full_of(ndim: int) -> frozenset:
    """Every axis of a frame of ``ndim`` axes: a full-size element (``FULL`` for two)."""
    return frozenset(range(ndim))


def row_of(ndim: int) -> frozenset:
    """Every axis but the innermost: one value per row (``ROW`` for two). The rows of a frame of
    more axes are its outer axes flattened (``n, c`` of ``x (n, c, l)``), the columns its innermost."""
    return frozenset(range(ndim - 1))


def col_of(ndim: int) -> frozenset:
    """The innermost axis alone (``COL`` for two)."""
    return frozenset({ndim - 1})
# element functions every printer of the plan knows
FUNCTIONS = (sp.exp, sp.log, sp.tanh, Sigmoid, Softplus, Relu, Step, Wins, sp.Abs, sp.sign, sp.KroneckerDelta,
             NonNeg, Equal, Where, Clamp)
# a full-size value is recomputed in the backward rather than saved when its cost, in passes over
# memory, is below saving it (a write in the forward and a read in the backward); a transcendental
# function per element costs about a third of a pass on a machine with vectorized math
SAVE_COST, READ_COST, TRANSCENDENTAL_COST = 2.0, 1.0, 0.35


class NotLowered(Exception):
    """The plan cannot lower this kernel; the message says why (the eager kernel is used)."""


@dataclass
class Value:
    name: str
    layout: frozenset
    expr: sp.Expr  # element expression, or for a reduction its body
    reduce: str = ""  # "sum" or "max" for a reduction over ``axis``
    axis: int = -1
    time: tuple = (0, 0)  # (sweep, loop) from which it is known
    wide: bool = False  # a sum whose body is evaluated in double precision (a shifted sum)
    shifted: sp.Expr | None = None  # for a value taken from shifted sums: the body of the sum it replaces

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name)


@dataclass
class TensorArg:
    """A tensor the native function reads or writes, flat and contiguous."""

    name: str
    layout: frozenset  # for an input: the frame axes of its declared dims
    shape: tuple = ()  # declared dims (size names, "1"), for inputs and outputs
    labels: bool = False
    double: bool = False  # a saved per-row or per-column value, kept in double precision


@dataclass
class Loop:
    """One pass over the columns of a row."""

    locals: list  # full-size Values computed per element (dependencies first)
    row_reductions: list
    col_reductions: list
    stores: list  # (tensor name, value name) of full-size outputs
    after: list = field(default_factory=list)  # per-row steps once the loop is done (``RowStep``)


@dataclass
class RowStep:
    kind: str  # "value", "reduced" (a row reduction finished), "store", "fixup", "accumulate"
    value: Value
    tensor: str = ""
    expr: sp.Expr | None = None  # the fix-up's expression at the label's column
    label: sp.Expr | None = None  # the label element (``y[i_n]``) naming that column


@dataclass
class Sweep:
    """A parallel pass over chunks of rows; ``before`` runs once, before it (the finalize)."""

    before: list  # ("combine", Value) | ("value", Value) | ("store", tensor, Value)
    start: list  # RowSteps before the first loop of each row
    loops: list


@dataclass
class Program:
    """One native function: the forward or the backward."""

    name: str
    inputs: list  # TensorArg
    scalars: list  # constants passed as numbers
    outputs: list  # (TensorArg, value name)
    values: dict  # name -> Value
    sweeps: list
    tail: list  # finalize after the last sweep
    kept_rows: list  # row values read in a later sweep than their own (kept in an array)
    frame: list = field(default_factory=list)  # size names of the frame's axes
    ndim: int = 2  # axes of the frame; the innermost is the columns, the others flattened are the rows
    index: list = field(default_factory=list)  # the frame's indices (``sp.Idx``), as the values read them

    @property
    def full(self) -> frozenset:
        return full_of(self.ndim)

    @property
    def row(self) -> frozenset:
        return row_of(self.ndim)

    @property
    def col(self) -> frozenset:
        return col_of(self.ndim)

    def dims(self, layout) -> list:
        """The frame's size names of ``layout``, outermost first."""
        return [self.frame[a] for a in sorted(layout)]

    def summary(self) -> list[str]:
        """Which sums run in which pass, in words (for the derivation documents)."""
        lines = []
        for k, sweep in enumerate(self.sweeps):
            combined = [step[1].name for step in sweep.before if step[0] == "combine"]
            if combined:
                lines.append(f"after sweep {k}: the partial sums of each chunk of rows added up: {', '.join(combined)}")
            for step in sweep.before:
                v = step[-1]
                if step[0] == "value" and v.shifted is not None:
                    lines.append(f"then {v.name} = sum over rows of {_text(v.shifted)}, from those sums "
                                 f"(shifted by each column's first row: no sweep of its own)")
            for p, loop in enumerate(sweep.loops):
                parts = []
                if loop.row_reductions:
                    parts.append("accumulates " + ", ".join(_describe(v, self) for v in loop.row_reductions))
                if loop.col_reductions:
                    parts.append("accumulates per chunk " + ", ".join(_describe(v, self) for v in loop.col_reductions))
                if loop.stores:
                    parts.append("writes " + ", ".join(t for t, _ in loop.stores))
                added = [_describe(s.value, self) for s in loop.after if s.kind == "accumulate"]
                if added:
                    parts.append("then adds up per chunk " + ", ".join(added))
                fix = [s.tensor for s in loop.after if s.kind == "fixup"]
                if fix:
                    parts.append("then writes the label's column of " + ", ".join(fix))
                lines.append(f"sweep {k + 1}, pass {p + 1} over each row: " + "; ".join(parts or ["reads"]))
        finals = [s[2] if s[0] == "store" else s[1].name for s in self.tail if s[0] in ("store", "value")]
        if finals:
            lines.append("finally: " + ", ".join(dict.fromkeys(str(x if isinstance(x, str) else x.name) for x in finals)))
        return lines


def _describe(v: Value, program: "Program") -> str:
    if program.ndim == 2:
        over = "columns" if v.axis == 1 else "rows"
    else:
        over = f"{program.frame[v.axis]}" + (" (the columns)" if v.axis == program.ndim - 1 else "")
    expr = v.expr
    if v.wide:  # a shifted sum: its per-column shift spelled out down to the inputs (``x[0]``)
        for _ in range(10):
            inner = {sp.Symbol(n): program.values[n].expr for n in _reads(expr, set(program.values))
                     if not program.values[n].reduce and 0 not in program.values[n].layout}
            if not inner:
                break
            expr = expr.xreplace(inner)
    return f"{v.name} = {'max' if v.reduce == 'max' else 'sum'} over {over} of {_text(expr)}"


def _text(expr: sp.Expr) -> str:
    """An element expression as one reads it: ``x*dout`` for ``x[i_n, i_d]*dout[i_n, i_d]``, ``logits[y]``
    for a label's pick."""
    def plain(e):
        # a label's element is read as a name already (``replace`` works from the inside out)
        picks = [i for i in e.indices if isinstance(i, sp.Symbol) and not isinstance(i, sp.Idx)]
        first = any(i == 0 for i in e.indices) and len(e.indices) > 1
        return sp.Symbol(f"{e.base}[{picks[0]}]" if picks else f"{e.base}[0]" if first else str(e.base))

    return sp.sstr(expr.replace(lambda e: isinstance(e, sp.Indexed), plain))


@dataclass
class Plan:
    forward: Program
    backward: Program
    saved: list  # (name, layout) the forward returns for the backward
    recomputed: list  # full-size forward values the backward recomputes instead of reading
    frame: list  # size names of the frame's axes (the innermost last)

    def summary(self) -> dict:
        return {"forward": self.forward.summary(), "backward": self.backward.summary(),
                "saved": [n for n, _ in self.saved], "recomputed": list(self.recomputed)}


# -- building values from the closed form ------------------------------------------------------
class _Builder:
    """Turns element expressions into Values: reductions named, loads normalized, layouts known."""

    def __init__(self, kernel, frame_index: list, tensors: dict, prefix: str):
        self.kernel = kernel
        self.frame_index = frame_index  # [i_rows, i_cols]
        self.axis_of = {idx: k for k, idx in enumerate(frame_index)}
        self.tensors = tensors  # name -> TensorArg (inputs of the program)
        self.values: dict[str, Value] = {}
        self.by_key: dict = {}  # (reduce, axis, body) -> name: identical reductions are one value
        self.prefix = prefix
        self.count = 0
        ndim = len(frame_index)
        self.full, self.row, self.col = full_of(ndim), row_of(ndim), col_of(ndim)

    def fresh(self, stem: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}{stem}{self.count}"
            if name not in self.values and name not in self.tensors:
                return name

    def named(self, stem: str) -> str:
        """``sum_bnraw_dout``: a reduction named after what it reads (a number added if taken)."""
        name, k = stem, 1
        while name in self.values or name in self.tensors:
            k += 1
            name = f"{stem}{k}"
        return name

    def layout(self, expr: sp.Expr) -> frozenset:
        axes = set()
        for s in expr.free_symbols:
            if s in self.axis_of:
                axes.add(self.axis_of[s])
            elif isinstance(s, sp.Symbol) and s.name in self.values:
                axes |= self.values[s.name].layout
        return frozenset(axes)

    def add(self, name: str, expr: sp.Expr, reduce: str = "", axis: int = -1) -> Value:
        layout = self.layout(expr)
        if reduce:
            layout = layout - {axis}
        value = Value(name, layout, expr, reduce, axis)
        self.values[name] = value
        return value

    def reduction(self, kind: str, body: sp.Expr, index: sp.Idx, name: str = "") -> sp.Symbol:
        nested = _nested_sums(body, index) if kind == "sum" else []
        if len(nested) > 1:  # a sum over several axes: the innermost axis first (a sum per row, then over rows)
            body = nested[-1][0]
            for _, idx in nested:
                frame_idx = self.frame_index[self._axis(idx)]
                if idx != frame_idx:
                    if frame_idx in body.free_symbols:
                        raise NotLowered(f"a reduction over {idx} also reads {frame_idx} (a contraction)")
                    body = body.xreplace({idx: frame_idx})
            order = sorted(nested, key=lambda pair: -self._axis(pair[1]))
            for k, (_, idx) in enumerate(order):
                frame_idx = self.frame_index[self._axis(idx)]
                body = self.reduction(kind, body, frame_idx, name=name if k == len(order) - 1 else "")
            return body
        axis = self._axis(index)
        frame_idx = self.frame_index[axis]
        if index != frame_idx:
            if frame_idx in body.free_symbols:
                raise NotLowered(f"a reduction over {index} also reads {frame_idx} (a contraction)")
            body = body.xreplace({index: frame_idx})
        body = self.convert(body)
        self._refuse_contraction(body, axis)
        key = (kind, axis, body)
        if key in self.by_key and not name:
            return sp.Symbol(self.by_key[key])
        reads = sorted({str(e.base) for e in body.atoms(sp.Indexed)} | {s.name for s in body.free_symbols
                                                                       if isinstance(s, sp.Symbol) and s.name in self.values})
        name = name or self.named(f"{kind}_{'_'.join(reads[:2]) or 'value'}")
        self.by_key.setdefault(key, name)
        self.add(name, body, kind, axis)
        return sp.Symbol(name)

    def _refuse_contraction(self, body: sp.Expr, axis: int) -> None:
        """A sum over an axis of a product of two factors that vary on different axes besides it
        (``sum_i x[n, i]*W[i, o]``) is a matrix product: loops over memory would keep a partial sum
        per chunk of rows of every output element; it keeps its eager kernel (torch's matmul)."""
        for term in sp.Add.make_args(body):
            layouts = [self.layout(f) for f in sp.Mul.make_args(term) if axis in self.layout(f)]
            for k, a in enumerate(layouts):
                for c in layouts[k + 1:]:
                    if not (a <= c or c <= a):
                        names = ", ".join(str(self.frame_index[x]).replace("i_", "") for x in sorted(a | c))
                        raise NotLowered(f"a contraction (a sum over {str(self.frame_index[axis]).replace('i_', '')} "
                                         f"of a product of factors on different axes, over {names}): a matrix "
                                         f"product the plan has no step for; torch's matmul in the eager kernel")

    def _axis(self, index: sp.Idx) -> int:
        size = extent(index)
        sizes = [extent(i) for i in self.frame_index]
        if size not in sizes:
            raise NotLowered(f"a reduction over {index} is not over an axis of the frame")
        if sizes.count(size) > 1:
            raise NotLowered("two axes of the same size")
        return sizes.index(size)

    def convert(self, expr: sp.Expr) -> sp.Expr:
        """Reductions become Values (innermost first); reads of earlier values become Symbols."""
        if isinstance(expr, (Red, GroupedRed, AxisSum)):
            return self.reduction("sum", expr.body, expr.index)
        if isinstance(expr, (Max, AxisMax)):
            return self.reduction("max", expr.body, expr.index)
        if isinstance(expr, IsArgmax):
            raise NotLowered("the gradient of a maximum that does not cancel (a one-hot of its position)")
        if isinstance(expr, sp.Indexed):
            name = str(expr.base)
            if name in self.values:
                value = self.values[name]
                natural = [self.frame_index[a] if a in value.layout else None for a in range(len(self.frame_index))]
                reads = [i for i in expr.indices if i != 0]
                if reads != [i for i in natural if i is not None] and len(expr.indices) >= 1:
                    picked = [i for i in expr.indices if not isinstance(i, sp.Idx) and i != 0]
                    if picked and value.layout == self.full and not value.reduce:
                        # a value read at the labels (``log_softmax(z)[range(n), y]``): its element
                        # there, the loads it makes at the label's column (its per-row values as they are)
                        at = dict(zip([self.frame_index[a] for a in sorted(value.layout)], reads))
                        return self.convert(_inline_full(value.expr, self.values, self.full).xreplace(at))
                    if picked:
                        raise NotLowered(f"{name} is read at a label's position; only inputs are picked")
                return sp.Symbol(name)
            if name not in self.tensors:
                raise NotLowered(f"{name} is read but neither an input nor a value of the kernel")
            return expr
        if isinstance(expr, sp.Symbol) and expr.name in self.values:
            return expr
        if isinstance(expr, sp.Function) and not isinstance(expr, FUNCTIONS):
            raise NotLowered(f"the function {type(expr).__name__} has no native form")
        if isinstance(expr, (sp.Piecewise, sp.Integral, sp.Derivative)):
            raise NotLowered(f"{type(expr).__name__} has no native form")
        if not expr.args:
            return expr
        return expr.func(*[self.convert(a) for a in expr.args])


def _nested_sums(body: sp.Expr, index) -> list:
    """``sum_n sum_l f`` as ``[(sum_l f, n), (f, l)]``: the bodies and indices of directly nested sums."""
    chain = [(body, index)]
    while isinstance(chain[-1][0], (Red, GroupedRed, AxisSum)):
        inner = chain[-1][0]
        chain.append((inner.body, inner.index))
    return chain


def _tensors_of(kernel) -> dict[str, TensorArg]:
    layer = kernel.layer
    frame = list(layer.dims)
    out = {}
    for name, decl in layer.tensors.items():
        dims = tuple(decl.dims)
        axes = frozenset(frame.index(d) for d in dims if d in frame)
        if any(d != "1" and d not in frame for d in dims):
            raise NotLowered(f"{name} has a dimension made of several sizes ({', '.join(dims)})")
        out[name] = TensorArg(name, axes, dims, isinstance(decl, Labels))
    return out


def _check_frame(kernel) -> list:
    layer = kernel.layer
    if len(layer.dims) < 2:
        raise NotLowered(f"the plan lowers layers over two axes or more; this one has {len(layer.dims)} "
                         f"({', '.join(layer.dims)})")
    if any(len(dim_names(d)) != 1 for d in layer.dims):
        raise NotLowered("a dimension made of several sizes")
    for name, decl in layer.tensors.items():
        dims = [d for d in decl.dims if d != "1"]
        if dims != [d for d in layer.dims if d in dims]:
            raise NotLowered(f"{name} is stored across the frame's order of axes")
    sizes = [kernel.graph.sizes[d] for d in layer.dims]
    if kernel.frame and [extent(i) for i in kernel.frame] != sizes:
        raise NotLowered("the kernel is printed on other axes than the layer's declared ones")
    return sizes


def lower(kernel) -> Plan:
    """The plan of ``kernel`` (a ``kernel.Kernel``), or ``NotLowered`` with the reason."""
    sizes = _check_frame(kernel)
    el = kernel.elements
    frame_index = [el.index[s] for s in sizes]
    tensors = _tensors_of(kernel)
    output = kernel.graph.output

    # forward: the spec's values as the eager forward computes them (``forward_plan``)
    fwd = _Builder(kernel, frame_index, tensors, "f")
    statements = forward_statements(el, kernel.saved, frame_index)
    for st in statements:
        fwd.add(st.name, sp.S.Zero)  # placeholders: later statements read them as Symbols
    for st in statements:
        value = written_out(st.value)  # a softmax as one torch op: its maximum, sum and element
        if isinstance(value, (AxisSum, AxisMax)):
            kind = "sum" if isinstance(value, AxisSum) else "max"
            del fwd.values[st.name]
            fwd.reduction(kind, value.body, value.index, name=st.name)
        else:
            fwd.values[st.name] = Value(st.name, frozenset(), sp.S.Zero)
            fwd.add(st.name, fwd.convert(value))

    # backward: the closed forms; forward values they read are recomputed or saved
    grad_out = f"d{output.name}"
    b_tensors = dict(tensors)
    b_tensors[grad_out] = TensorArg(grad_out, _layout_of_shape(output.shape, sizes), tuple(map(str, output.shape)))
    bwd = _Builder(kernel, frame_index, b_tensors, "b")
    forward_names = set(fwd.values)
    for name in forward_names:  # read as Symbols (a pick at the labels: its element there); resolved below
        bwd.values[name] = Value(name, fwd.values[name].layout, fwd.values[name].expr, fwd.values[name].reduce,
                                 fwd.values[name].axis)
    grads = []
    for f in kernel.formulas:
        name = f"d{f.input}"
        bwd.values[name] = Value(name, frozenset(), sp.S.Zero)
        bwd.add(name, bwd.convert(f.element))
        grads.append(name)
    for v in bwd.values.values() if not output.shape else []:  # a 0-d upstream gradient is a Symbol: a load
        upstream = {s: sp.Indexed(sp.IndexedBase(grad_out), 0) for s in v.expr.free_symbols
                    if isinstance(s, sp.Symbol) and s.name == grad_out}
        v.expr = v.expr.xreplace(upstream)

    # a sum the forward already took (the backward's ``sum(t1)`` over the recomputed ``t1``) is read
    # from the forward, saved (a per-row or per-column value), not taken again
    same = {k: sp.Symbol(fwd.by_key[(v.reduce, v.axis, v.expr)]) for k, v in bwd.values.items()
            if k not in forward_names and v.reduce and (v.reduce, v.axis, v.expr) in fwd.by_key}
    for k in same:
        del bwd.values[k]
    for v in bwd.values.values():
        v.expr = v.expr.xreplace({sp.Symbol(k): s for k, s in same.items()})
    grads = [same.get(g, sp.Symbol(g)).name for g in grads]
    saved, recomputed = _saved(fwd, bwd, grads, forward_names, output.name)
    for name in forward_names:
        if name not in recomputed and name not in {n for n, _ in saved}:
            bwd.values.pop(name, None)
    for name in recomputed:
        bwd.values[name] = Value(name, fwd.values[name].layout, fwd.values[name].expr,
                                 fwd.values[name].reduce, fwd.values[name].axis)
    saved_names = [n for n, _ in saved]
    frame_names = list(kernel.layer.dims)
    for name in saved_names:  # a saved value is an input of the backward, flat in its layout
        bwd.values.pop(name, None)
        layout = fwd.values[name].layout
        # kept in double: the backward recomputes exactly the values the forward computed from them
        b_tensors[name] = TensorArg(name, layout, tuple(frame_names[a] for a in sorted(layout)),
                                    double=layout != fwd.full)
    loads = {sp.Symbol(n): _natural(n, fwd.values[n].layout, frame_index) for n in saved_names}
    bwd.values = {k: Value(v.name, v.layout, v.expr.xreplace(loads), v.reduce, v.axis)
                  for k, v in bwd.values.items()}

    f_outputs = [(TensorArg(output.name, _layout_of_shape(output.shape, sizes), tuple(map(str, output.shape))),
                  output.name)]
    f_outputs += [(b_tensors[n], n) for n, _ in saved if n != output.name]
    b_outputs = [(TensorArg(f"d{f.input}", tensors[f.input].layout, tensors[f.input].shape), f"d{f.input}")
                 for f in kernel.formulas]
    constants = list(kernel.layer.constants)
    forward = _program(f"{kernel.name}_forward", fwd, [tensors[k] for k in kernel.layer.tensors], constants,
                       f_outputs)
    b_inputs = [b_tensors[grad_out]] + [tensors[k] for k in kernel.layer.tensors] + [b_tensors[n] for n in saved_names]
    backward = _program(f"{kernel.name}_backward", bwd, b_inputs, constants, b_outputs)
    return Plan(forward, backward, saved, recomputed, [str(s) for s in sizes])


def loop_program(kernel, name: str, frame_index: list, tensors: dict, definitions: list, outputs: list) -> Program:
    """One program of loops over ``frame_index`` (a stage of a kernel with matrix products,
    ``stages.py``): ``definitions`` are ``(name, element expression)`` in order, each reading the
    ``tensors`` (name -> TensorArg, laid out on this frame) and the definitions before it by name;
    ``outputs`` are ``(TensorArg, name)`` written. Reductions, hoisting, labels and scheduling as
    for a whole kernel."""
    b = _Builder(kernel, frame_index, tensors, "s")
    for value_name, expr in definitions:
        b.values[value_name] = Value(value_name, frozenset(), sp.S.Zero)  # read by name as a Symbol
        b.add(value_name, b.convert(expr))
    reads = {str(e.base) for v in b.values.values() for e in v.expr.atoms(sp.Indexed)}
    inputs = [t for t in tensors.values() if t.name in reads]
    if not any(not t.labels for t in inputs):
        raise NotLowered(f"{name} reads no tensor of floating values")
    return _program(name, b, inputs, list(kernel.layer.constants), outputs)


def written_out(expr: sp.Expr) -> sp.Expr:
    """A softmax, log-softmax or logsumexp along an axis written out as the loops compute it: the
    maximum, the sum of exponentials shifted by it, then the element; a variance as the mean, then
    the sum of squared deviations from it (the loops accumulate in double)."""
    def softmax(e):
        shifted = e.body - AxisMax(e.body, e.index)
        total = AxisSum(sp.exp(shifted), e.index)
        return shifted - sp.log(total) if isinstance(e, AxisLogSoftmax) else sp.exp(shifted)/total

    def logsumexp(e):
        top = AxisMax(e.body, e.index)
        return top + sp.log(AxisSum(sp.exp(e.body - top), e.index))

    def variance(e):
        centred = e.body - AxisSum(e.body, e.index) / extent(e.index)
        return AxisSum(centred**2, e.index) / (extent(e.index) - e.correction)

    expr = expr.replace(lambda e: isinstance(e, AxisSoftmax), softmax)
    expr = expr.replace(lambda e: isinstance(e, AxisVar), variance)
    return expr.replace(lambda e: isinstance(e, AxisLogSumExp), logsumexp)


def _layout_of_shape(shape: tuple, sizes: list) -> frozenset:
    return frozenset(k for k, s in enumerate(sizes) if s in tuple(shape))


def _natural(name: str, layout: frozenset, frame_index: list) -> sp.Expr:
    """A flat tensor of ``layout`` read at the frame's own indices (a 0-d one at 0)."""
    indices = [frame_index[a] for a in sorted(layout)] or [0]
    return sp.Indexed(sp.IndexedBase(name), *indices)


def _reads(expr: sp.Expr, names: set) -> set:
    return {s.name for s in expr.free_symbols if isinstance(s, sp.Symbol) and s.name in names}


def _cost(expr: sp.Expr) -> float:
    calls = sum(1 for e in sp.preorder_traversal(expr) if isinstance(e, (sp.exp, sp.log, sp.tanh, Sigmoid, Softplus))
                or (isinstance(e, sp.Pow) and not e.exp.is_Integer))
    return calls * TRANSCENDENTAL_COST


def _saved(fwd: _Builder, bwd: _Builder, grads: list, forward_names: set, output: str):
    """Which forward values the backward reads as saved tensors, and which it recomputes. The
    forward writes its ``output`` anyway: saving it costs the backward's read alone (``tanh``'s
    backward reads ``out`` rather than computing ``tanh(x)`` again, as autograd's does)."""
    saved, recomputed = {}, []
    needed = set()
    for g in grads:
        needed |= _reads(bwd.values[g].expr, forward_names)
    for v in list(bwd.values.values()):
        if v.name not in forward_names:
            needed |= _reads(v.expr, forward_names)
    full_inputs_read = {str(e.base) for v in bwd.values.values() if v.name not in forward_names
                        for e in v.expr.atoms(sp.Indexed)}
    stack = sorted(needed)
    while stack:
        name = stack.pop()
        value = fwd.values[name]
        if value.layout != fwd.full or value.reduce:
            saved[name] = value.layout
            continue
        deps = _reads(value.expr, forward_names)
        new_reads = {str(e.base) for e in value.expr.atoms(sp.Indexed)} - full_inputs_read
        cost = len([r for r in new_reads if fwd.tensors[r].layout == fwd.full]) + _cost(value.expr)
        if cost < (READ_COST if name == output else SAVE_COST):
            if name not in recomputed:
                recomputed.append(name)
                full_inputs_read |= new_reads
                stack.extend(d for d in deps if d not in recomputed and d not in saved)
        else:
            saved[name] = value.layout
    order = list(fwd.values)
    return sorted(saved.items(), key=lambda kv: order.index(kv[0])), sorted(recomputed, key=order.index)


# -- scheduling -----------------------------------------------------------------------------------
def _label_deltas(expr: sp.Expr, col_index) -> list:
    return [d for d in expr.atoms(sp.KroneckerDelta) if col_index in d.free_symbols
            and any(isinstance(a, sp.Indexed) for a in d.args)]


def _program(name: str, b: _Builder, inputs: list, scalars: list, outputs: list) -> Program:
    col_i = b.frame_index[-1]
    FULL = b.full
    needed, stack = set(), [v for _, v in outputs]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(_reads(b.values[n].expr, set(b.values)))
    vals = {k: b.values[k] for k in _topological({k: v for k, v in b.values.items() if k in needed})}
    vals = _shifted(vals, b)
    # split full-size expressions by layout: per-column and per-row parts computed once
    hoister = _Hoister(b, vals, {t.name for t in inputs if t.double})
    for k, v in list(vals.items()):
        if v.layout == FULL or (v.reduce and b.layout(v.expr) == FULL):
            hoister.flatten = not v.reduce  # a sum's body keeps the values it is described by
            vals[k] = replace(v, expr=hoister.hoist(v.expr))
    merged = {**vals, **hoister.new}
    vals = {k: merged[k] for k in _topological(merged)}
    # label fix-ups: a full-size output with a delta of its column and a label
    fixups = {}
    for tensor, vname in outputs:
        v = vals[vname]
        deltas = _label_deltas(v.expr, col_i)
        if deltas and v.layout == FULL and not v.reduce:
            label = next(a for a in deltas[0].args if isinstance(a, sp.Indexed))
            at_label = _inline_full(v.expr, vals, FULL).xreplace({d: 1 for d in deltas})
            fixups[vname] = (at_label.xreplace({col_i: label}), label)
            vals[vname] = replace(v, expr=v.expr.xreplace({d: 0 for d in deltas}))
    for v in vals.values():
        if _label_deltas(v.expr, col_i) and v.name not in fixups:
            raise NotLowered("a one-hot of the labels inside a value that is not written out")
    _times(vals, b)
    return _schedule(name, b, inputs, scalars, outputs, vals, fixups)


def _shifted(vals: dict, b: _Builder) -> dict:
    """Sums over the rows of a polynomial in per-column values of the sweep before, taken in that
    sweep as shifted sums (the forward's variance: one sweep over ``x`` instead of two).

    ``sum_n (x - m)**2`` with ``m = sum_n x / n`` needs ``m`` first, so a sweep of its own. Written
    around a shift ``m0`` known before the sweep (each sum in ``m`` estimated from the first row
    alone: ``m0 = x[0]``), the body is a polynomial in ``d = m - m0`` whose coefficients are its
    derivatives at ``m0`` (Taylor, exact for a polynomial): ``sum_n (x - m0)**2 - 2*d*sum_n (x - m0)
    + n*d**2``. Each coefficient is summed in the earlier sweep (in double precision, ``wide``), or
    read off a sum that sweep takes already (``sum_n 2*(x - m0) = 2*sum_x - 2*n*m0``), or is ``n``
    times a value that does not vary down the rows. Nothing cancels more than the deviation of the
    first row from the mean (in double precision), never ``E[x**2] - E[x]**2``. The identity is
    checked symbolically (``expand``) before it is used; a body that is not a polynomial in those
    values, or a frame of more than two axes, keeps its sweep."""
    if len(b.frame_index) != 2:
        return vals
    _times(vals, b)
    axis = 0
    row_index = b.frame_index[axis]
    count = extent(row_index)
    out = dict(vals)
    for name, v in vals.items():
        if v.reduce != "sum" or v.axis != axis or b.layout(v.expr) != b.full:
            continue
        sweep = _body_time(v, vals)[0]
        if sweep < 1:
            continue
        body = _inline_full(v.expr, vals, b.full)
        reads = _reads(body, set(vals))
        late = sorted(n for n in reads if vals[n].time[0] >= sweep)
        if not late or any(axis in vals[n].layout for n in late):
            continue
        try:
            degree = sp.Poly(body, *[sp.Symbol(n) for n in late]).total_degree()
        except sp.PolynomialError:
            continue
        if degree > 2:
            continue
        shifts = {}
        for n in late:
            estimate = _first_row(sp.Symbol(n), vals, b, sweep, row_index, count)
            if estimate is None:
                break
            shifts[n] = estimate
        else:
            rewritten = _shifted_sum(name, body, degree, shifts, vals, b, sweep, count, out)
            if rewritten is not None:
                out[name] = Value(name, v.layout, rewritten, shifted=v.expr)
    return {k: out[k] for k in _topological(out)}


def _first_row(expr: sp.Expr, vals: dict, b: _Builder, sweep: int, row_index, count) -> sp.Expr | None:
    """``expr`` estimated from the first row alone: each sum over the rows as ``count`` times its
    body at row 0, each maximum as its body there. None when it reads a value it cannot place
    before the sweep (a per-row one, or one of the sweep itself)."""
    def at_first(e):
        for n in sorted(_reads(e, set(vals))):
            w = vals[n]
            if w.reduce:  # a sum over the rows: count times its body at row 0; a maximum: its body there
                if w.axis != 0:
                    return None
                inner = at_first(_inline_full(w.expr, vals, b.full).xreplace({row_index: 0}))
                estimate = None if inner is None else count*inner if w.reduce == "sum" else inner
            elif w.layout == b.full:
                estimate = at_first(w.expr.xreplace({row_index: 0}))
            elif 0 in w.layout:  # a per-row value: not known before the sweep
                return None
            elif w.time[0] >= sweep:  # a per-column value of the sums: estimated from its definition
                estimate = at_first(w.expr)
            else:
                continue
            if estimate is None:
                return None
            e = e.xreplace({sp.Symbol(n): estimate})
        return e.xreplace({row_index: 0})

    return at_first(expr)


def _shifted_sum(name: str, body: sp.Expr, degree: int, shifts: dict, vals: dict, b: _Builder, sweep: int,
                 count, out: dict) -> sp.Expr | None:
    """The finalize expression of ``sum_rows body`` (a polynomial of ``degree`` in the values of
    ``shifts``) from shifted sums (``_shifted``); the new values (the shifts, the sums) go into
    ``out``. None when the identity does not check."""
    late = [sp.Symbol(n) for n in shifts]
    at_shift = {}
    for s, estimate in zip(late, shifts.values()):
        value = b.add(b.named(f"first_{s.name}"), estimate)
        out[value.name] = value
        at_shift[s] = value.symbol
    same_sweep = [w for w in vals.values() if w.reduce == "sum" and w.axis == 0 and not w.wide
                  and _body_time(w, vals)[0] == sweep - 1 and b.layout(w.expr) == b.full]
    total, check = sp.S.Zero, sp.S.Zero
    for powers in itertools.product(range(degree + 1), repeat=len(late)):
        if sum(powers) > degree:
            continue
        coefficient = body
        for s, k in zip(late, powers):
            coefficient = sp.diff(coefficient, s, k)
        coefficient = coefficient.xreplace(at_shift) / math.prod(math.factorial(k) for k in powers)
        if coefficient == 0:
            continue
        monomial = sp.Mul(*[(s - at_shift[s])**k for s, k in zip(late, powers)])
        check += coefficient*monomial
        total += _summed(name, coefficient, same_sweep, vals, b, count, out)*monomial
    if sp.expand(check - body) != 0:
        return None
    return total


def _summed(name: str, body: sp.Expr, same_sweep: list, vals: dict, b: _Builder, count, out: dict) -> sp.Expr:
    """``sum_rows body``: ``count*body`` when it does not vary down the rows, else read off a sum the
    sweep takes already when affine in its body, else a new sum in double precision."""
    if 0 not in b.layout(body):
        return count*body
    t = sp.Dummy("t")
    for w in same_sweep:
        inner = _inline_full(w.expr, vals, b.full)
        affine = body.xreplace({inner: t})
        if t not in affine.free_symbols:
            continue
        slope, offset = sp.diff(affine, t), affine.xreplace({t: 0})
        if t not in slope.free_symbols and 0 not in b.layout(slope) | b.layout(offset):
            return slope*sp.Symbol(w.name) + count*offset
    value = b.add(b.named(f"shifted_{name}"), body, "sum", 0)
    value.wide = True
    out[value.name] = value
    return value.symbol


def _topological(values: dict) -> list:
    done, out = set(), []

    def visit(n):
        if n in done:
            return
        done.add(n)
        for d in sorted(_reads(values[n].expr, set(values)) - {n}):
            visit(d)
        out.append(n)

    for n in values:
        visit(n)
    return out


def _inline_full(expr: sp.Expr, vals: dict, FULL: frozenset = FULL) -> sp.Expr:
    """``expr`` with every full-size element value substituted (for a value at one element)."""
    for _ in range(100):
        reads = [n for n in _reads(expr, set(vals)) if vals[n].layout == FULL and not vals[n].reduce]
        if not reads:
            return expr
        expr = expr.xreplace({sp.Symbol(n): vals[n].expr for n in reads})
    raise NotLowered("values read each other in a cycle")


def computed(expr: sp.Expr, vals: dict) -> bool:
    """Whether ``expr`` evaluates a function (``log(s)``), itself or through a value it reads, rather
    than reading values as they are. Sums add such terms last (``logits - m - log(s)``: the values
    cancel first, as the eager forward does; at logits of 1e6 the other order loses ``log(s)``)."""
    for e in sp.preorder_traversal(expr):
        if isinstance(e, sp.Function) and not isinstance(e, sp.KroneckerDelta):
            return True
        if isinstance(e, sp.Symbol) and e.name in vals and not vals[e.name].reduce and vals[e.name].expr is not expr \
                and computed(vals[e.name].expr, vals):
            return True
    return False


class _Hoister:
    """Parts of a full-size expression that vary along one axis only become values of their own."""

    def __init__(self, b: _Builder, vals: dict, doubles: set = frozenset()):
        self.b, self.vals, self.new = b, vals, {}
        self.doubles = doubles  # tensors of doubles: read into values of their own, never into a vector
        self.flatten = True  # products read through full-size values they name (``factors``)

    def atomic(self, e) -> bool:
        return _atomic(e) and not any(str(i.base) in self.doubles for i in e.atoms(sp.Indexed))

    def layout(self, e):
        names = {**self.vals, **self.new}
        axes = set()
        for s in e.free_symbols:
            if s in self.b.axis_of:
                axes.add(self.b.axis_of[s])
            elif isinstance(s, sp.Symbol) and s.name in names:
                axes |= names[s.name].layout
        return frozenset(axes)

    def name_of(self, e):
        FULL = self.b.full
        if self.atomic(e) or self.layout(e) == FULL:
            return e
        for k, v in self.new.items():
            if v.expr == e:
                return sp.Symbol(k)
        layout = self.layout(e)
        name = self.b.fresh("c" if layout == self.b.col else "r" if layout == self.b.row else "s")
        self.new[name] = Value(name, layout, e)
        self.b.values[name] = self.new[name]
        return sp.Symbol(name)

    def factors(self, e) -> list:
        """The factors of ``e``, a full-size value that is a product read through its own (``bnraw``
        of ``bnraw*gamma``): its per-column factors then join the others (``bnvar_inv*gamma``, one
        value per column) rather than costing a multiply per element each."""
        if self.flatten and isinstance(e, sp.Symbol) and e.name in self.vals:
            v = self.vals[e.name]
            if v.layout == self.b.full and not v.reduce and isinstance(v.expr, sp.Mul):
                return [f for a in v.expr.args for f in self.factors(a)]
        return [e]

    def hoist(self, e):
        if self.atomic(e) or not e.args:
            return e
        if self.layout(e) != self.b.full:
            return self.name_of(e)
        if isinstance(e, (sp.Add, sp.Mul)):
            groups: dict = {}
            names = {**self.vals, **self.new}
            args = [f for a in e.args for f in self.factors(a)] if isinstance(e, sp.Mul) else e.args
            for a in args:  # functions of values are not summed with the values they would round away
                key = (self.layout(a), isinstance(e, sp.Add) and computed(a, names))
                groups.setdefault(key, []).append(a)
            if isinstance(e, sp.Mul) and (SCALAR, False) in groups:  # a scalar factor joins a per-column
                partner = next((k for k in ((self.b.col, False), (self.b.row, False)) if k in groups), None)
                if partner is not None:  # or per-row one: one value, computed once
                    groups[partner] += groups.pop((SCALAR, False))
            parts = []
            for (layout, _), args in groups.items():
                if layout == self.b.full:
                    parts += [self.hoist(a) for a in args]
                else:
                    parts.append(self.name_of(e.func(*args)))
            return e.func(*parts)
        if isinstance(e, (sp.KroneckerDelta, sp.Indexed)):
            return e
        return e.func(*[self.hoist(a) for a in e.args])


def _atomic(e) -> bool:
    return (e.is_Number or isinstance(e, (sp.Symbol, sp.Indexed, sp.Idx))
            or (isinstance(e, sp.Mul) and len(e.args) == 2 and e.args[0].is_Number and _atomic(e.args[1])))


def _body_time(v: Value, vals: dict) -> tuple:
    return max([vals[d].time for d in _reads(v.expr, set(vals)) - {v.name}], default=(0, 0))


def _times(vals: dict, b: _Builder) -> None:
    """Each value's time ``(sweep, loop)``: see the module docstring."""
    inner = len(b.frame_index) - 1
    for v in vals.values():
        t = _body_time(v, vals)
        if v.reduce:
            body = b.layout(v.expr)
            if v.axis not in body:
                raise NotLowered(f"a sum over an axis its body does not vary on ({sp.sstr(v.expr)})")
            if v.axis == inner and body == b.full:  # over the columns of each row: known after the loop
                t = (t[0], t[1] + 1)
            elif v.axis != inner and b.row <= body:  # over the rows: known in the next sweep
                t = (t[0] + 1, 0)
            # else a value that varies on fewer axes than the rows summed: a finalize step
        v.time = t


def _schedule(name, b, inputs, scalars, outputs, vals, fixups) -> Program:
    store_of: dict = {}
    for tensor, vname in outputs:
        store_of.setdefault(vname, []).append(tensor.name)
    FULL, ROW = b.full, b.row
    points = [v.time[0] for v in vals.values() if ROW <= v.layout and not v.reduce]
    points += [_body_time(v, vals)[0] for v in vals.values() if v.reduce and ROW <= b.layout(v.expr)]
    sweeps = [Sweep([], [], []) for _ in range(1 + max(points, default=0))]
    tail: list = []

    def loop(s: int, p: int) -> Loop:
        while len(sweeps[s].loops) <= p:
            sweeps[s].loops.append(Loop([], [], [], []))
        return sweeps[s].loops[p]

    def row_steps(s: int, p: int) -> list:
        """Per-row steps known at (s, p): before the first loop, or after loop p - 1."""
        return sweeps[s].start if p == 0 else loop(s, p - 1).after

    def before(s: int) -> list:
        return sweeps[s].before if s < len(sweeps) else tail

    for v in vals.values():
        s, p = v.time
        body = b.layout(v.expr) if v.reduce else v.layout
        if v.reduce and body == FULL:
            bs, bp = _body_time(v, vals)
            target = loop(bs, bp)
            if v.axis == len(b.frame_index) - 1:
                target.row_reductions.append(v)
                target.after.append(RowStep("reduced", v))
            else:
                target.col_reductions.append(v)
                before(bs + 1).append(("combine", v))
        elif v.reduce and body == ROW:  # a per-row value summed over the rows, per chunk of rows
            bs, bp = _body_time(v, vals)
            row_steps(bs, bp).append(RowStep("accumulate", v))
            before(bs + 1).append(("combine", v))
        elif v.reduce or not ROW <= v.layout:
            before(s).append(("value", v))
        elif v.layout == ROW:
            row_steps(s, p).append(RowStep("value", v))
        for tensor in store_of.get(v.name, []):
            if v.layout == FULL:
                loop(s, p).stores.append((tensor, v.name))
                if v.name in fixups:
                    loop(s, p).after.append(RowStep("fixup", v, tensor, *fixups[v.name]))
            elif v.layout == ROW:
                row_steps(s, p).append(RowStep("store", v, tensor))
            else:
                before(s).append(("store", tensor, v))
    for sweep in sweeps:  # each loop computes the full-size values its reductions and stores read
        for lp in sweep.loops:
            roots = [v.expr for v in lp.row_reductions + lp.col_reductions] + [vals[v].expr for _, v in lp.stores]
            lp.locals = _full_closure(roots, vals, FULL)
    kept = []  # per-row values read in a later sweep than their own are kept in an array
    for k, sweep in enumerate(sweeps):
        exprs = [v.expr for lp in sweep.loops for v in lp.locals + lp.row_reductions + lp.col_reductions]
        exprs += [s.value.expr for lp in sweep.loops for s in lp.after] + [s.value.expr for s in sweep.start]
        exprs += [s.expr for lp in sweep.loops for s in lp.after if s.expr is not None]
        for e in exprs:
            for n in _reads(e, set(vals)):
                if vals[n].layout == ROW and vals[n].time[0] < k and n not in kept:
                    kept.append(n)
    frame = [str(extent(i)) for i in b.frame_index]
    return Program(name, inputs, scalars, outputs, vals, sweeps, tail, kept, frame, len(frame), list(b.frame_index))


def _full_closure(roots: list, vals: dict, FULL: frozenset) -> list:
    names, stack = set(), list(roots)
    while stack:
        e = stack.pop()
        for n in _reads(e, set(vals)):
            v = vals[n]
            if v.layout == FULL and not v.reduce and n not in names:
                names.add(n)
                stack.append(v.expr)
    return [v for k, v in vals.items() if k in names]


__all__ = ["lower", "loop_program", "written_out", "Plan", "Program", "Value", "NotLowered", "FULL", "ROW", "COL", "SCALAR"]
