"""The Triton backend: the same kernel plan (``plan.py``) printed as Triton kernels and a Python driver.

Each sweep of a program is one kernel launched over chunks of rows (one row per program where the
sweep has no sums over the rows); each program walks its rows, and for each row makes the plan's
passes over the columns in blocks of ``BLOCK``: sums over the columns accumulate in float64
registers, sums over the rows into a per-chunk float64 buffer. The finalize steps between sweeps
(per-column and scalar values) are float64 torch code in the driver. Element maps are printed by
``VectorPrinter`` (``tl`` on blocks), per-row values by ``RowPrinter`` (float64 scalars), finalize
steps by ``TorchPrinter``: three SymPy Python printers.

Transcendental functions go through small helpers: on a GPU, CUDA's libdevice (``exp``, ``log``,
``tanh``, ``log1p``: accurate to an ulp or two, as torch's own CUDA kernels); under the interpreter
(``TRITON_INTERPRET=1``, how the tests run them on CPU), ``tl``'s NumPy-backed functions, ``tanh``
and ``log1p`` through float64.
"""
from __future__ import annotations

import re
from pathlib import Path

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .cpp import _exponent, _multiplied_roots, axis_names, flat_index, numel, split_row
from .functions import step_argument
from .plan import COL, FULL, ROW, SCALAR, Plan, Program, Value, _inline_full, computed
from .stages import Spelling, Staged, contexts, driver_context
from .symbolic import reciprocal_root_power
from .templating import environment

CHUNKS = 256  # the most chunks of rows a sweep with sums over the rows is split into


def _literal(value) -> str:
    return repr(float(value))


class _Base(PythonCodePrinter):
    def __init__(self, names: "Names"):
        super().__init__({"strict": False, "fully_qualified_modules": False})
        self.names = names

    def _print_Integer(self, e):
        return _literal(e)

    _print_Rational = _print_Float = _print_Integer

    def _print_Add(self, e, order=None):
        """Terms that read values first, functions of values last (``plan.computed``)."""
        terms = sorted(e.args, key=lambda t: (computed(t, self.names.values), t.is_number, sp.default_sort_key(t)))
        text = ""
        for k, term in enumerate(terms):
            coefficient, _ = term.as_coeff_Mul()
            if k and coefficient.is_negative:
                text += " - " + self.parenthesize(-term, 40)
            else:
                text += (" + " if k else "") + self.parenthesize(term, 40)
        return text

    def _print_Mul(self, e):
        return _multiplied_roots(self, e) or super()._print_Mul(e)

    def _print_Pow(self, e, rational=False):
        base, exp = e.as_base_exp()
        exp = _exponent(exp)
        b = self._print(base)
        if exp.is_Integer and 1 < exp <= 4:
            return "(" + "*".join([f"({b})"] * int(exp)) + ")"
        if exp == -1:
            return f"(1.0/({b}))"
        if exp == sp.S.Half:
            return self._sqrt(b)
        if exp == -sp.S.Half:
            return f"(1.0/{self._sqrt(b)})"
        if reciprocal_root_power(e):
            return "(" + "*".join([f"(1.0/{self._sqrt(b)})"] * reciprocal_root_power(e)) + ")"
        return self._pow(b, self._print(exp))

    def _print_KroneckerDelta(self, e):
        a, b = (self._print(x) for x in e.args)
        return self._where(f"({a}) == ({b})", "1.0", "0.0")

    def _print_Root(self, e):  # the value of a root whose derivative is masked at 0: a root
        return self._print(sp.sqrt(e.args[0]))

    def _print_Step(self, e):
        return self._where(f"({self._print(step_argument(e.args[0]))}) > 0.0", "1.0", "0.0")

    def _print_sign(self, e):
        a = self._print(e.args[0])
        return f"({self._where(f'({a}) > 0.0', '1.0', '0.0')} - {self._where(f'({a}) < 0.0', '1.0', '0.0')})"

    def _print_NonNeg(self, e):
        return self._where(f"({self._print(e.args[0])}) >= 0.0", "1.0", "0.0")

    def _print_Equal(self, e):
        return self._where(f"({self._print(e.args[0])}) == 0.0", "1.0", "0.0")

    def _print_Where(self, e):
        m, a, b = (self._print(x) for x in e.args)
        return self._where(f"({m}) != 0.0", a, b)

    _print_Maximum = _print_Minimum = _print_Guarded = _print_Where  # the value of a Where

    def _print_Wins(self, e):
        return f"({self._print(e.halves())})"

    def _print_Clamp(self, e):
        # comparisons are false for NaN: it stays NaN, as torch.clamp; an infinite bound is no bound
        x, lo, hi = e.args
        text = self._print(x)
        if lo != -sp.oo:
            text = self._where(f"({text}) < ({self._print(lo)})", self._print(lo), text)
        if hi != sp.oo:
            text = self._where(f"({text}) > ({self._print(hi)})", self._print(hi), text)
        return text


class VectorPrinter(_Base):
    """Element maps on a block of columns ``cols`` of row ``row`` (masked by ``mask``), in dtype ``DT``."""

    def _print_Symbol(self, s):
        return self.names.vector(s.name)

    def _print_Indexed(self, e):
        return self.names.vector_load(e)

    def _sqrt(self, b):
        return f"_sqrt({b}, DEVICE_MATH)"

    def _pow(self, b, e):
        return f"_pow({b}, {e}, DEVICE_MATH)"

    def _where(self, c, a, b):
        return f"tl.where({c}, {a}, {b})"

    def _print_exp(self, e):
        return f"_exp({self._print(e.args[0])}, DEVICE_MATH)"

    def _print_log(self, e):
        return f"_log({self._print(e.args[0])}, DEVICE_MATH)"

    def _print_tanh(self, e):
        return f"_tanh({self._print(e.args[0])}, DEVICE_MATH)"

    def _print_Abs(self, e):
        return f"tl.abs({self._print(e.args[0])})"

    def _print_Relu(self, e):
        a = self._print(e.args[0])
        return f"tl.where(({a}) > 0.0, {a}, 0.0 * ({a}))"

    def _print_Sigmoid(self, e):
        return f"(1.0 / (1.0 + _exp(-({self._print(e.args[0])}), DEVICE_MATH)))"

    def _print_Softplus(self, e):
        a = self._print(e.args[0])
        return f"tl.where(({a}) > 20.0, {a}, _log1p(_exp({a}, DEVICE_MATH), DEVICE_MATH))"


class WidePrinter(VectorPrinter):
    """The body of a sum kept in float64 (``Value.wide``, a shifted sum): loads widened before any
    arithmetic, per-column values read as the float64 they are stored in."""

    def _print_Symbol(self, s):
        return self.names.vector(s.name, "tl.float64")

    def _print_Indexed(self, e):
        return f"{self.names.vector_load(e)}.to(tl.float64)"


class RowPrinter(VectorPrinter):
    """Per-row values: float64 scalars in the kernel."""

    def __init__(self, names: "Names", col: str = "cols"):
        super().__init__(names)
        self.col = col

    def _print_Symbol(self, s):
        return self.names.scalar(s.name, self.col)

    def _print_Idx(self, i):
        return self.names.index(i, self.col)

    def _print_Indexed(self, e):
        return f"tl.load({self.names.pointer(e, self)}).to(tl.float64)"


class TorchPrinter(_Base):
    """Finalize steps: per-column values as (columns,) float64 tensors, scalars as 0-d ones."""

    def _print_Symbol(self, s):
        return self.names.finalize(s.name)

    def _print_Indexed(self, e):
        return f"{self.names.whole(e)}.double()"

    def _sqrt(self, b):
        return f"torch.sqrt(torch.as_tensor({b}, dtype=torch.float64))"

    def _pow(self, b, e):
        return f"torch.pow({b}, {e})"

    def _where(self, c, a, b):
        return f"torch.where({c}, {a}, {b})"

    def _print_exp(self, e):
        return f"torch.exp({self._print(e.args[0])})"

    def _print_log(self, e):
        return f"torch.log({self._print(e.args[0])})"

    def _print_tanh(self, e):
        return f"torch.tanh({self._print(e.args[0])})"

    def _print_Abs(self, e):
        return f"torch.abs({self._print(e.args[0])})"

    def _print_Relu(self, e):
        return f"torch.relu({self._print(e.args[0])})"

    def _print_Sigmoid(self, e):
        return f"torch.sigmoid({self._print(e.args[0])})"

    def _print_Softplus(self, e):
        return f"torch.nn.functional.softplus({self._print(e.args[0])})"


class Names:
    """How each quantity of one program is spelled in the kernels and in the driver."""

    def __init__(self, program: Program, plan: Plan, kernel, sweep: int = 0):
        self.program, self.plan, self.kernel = program, plan, kernel
        self.values = dict(program.values)
        self.sweep = sweep
        self.tensors = {t.name: t for t in program.inputs}
        self.sizes = {str(s): f"sz_{s}" for s in kernel.graph.sizes.values()}
        self.constants = {c: f"k_{c}" for c in kernel.layer.constants}
        self.frame = program.index  # the indices of the program's own frame (a loop stage's: not the layer's)
        self.axes = axis_names(program.frame)

    def index(self, i, col: str) -> str:
        if i == self.frame[-1]:
            return col
        if i in self.frame:
            return self.axes[self.frame.index(i)]
        raise ValueError(f"index {i}")

    def flat(self, layout, col: str) -> str:
        return flat_index(layout, self.axes[:-1] + [col], self.program.frame)

    def shape(self, layout) -> str:
        """The shape a finalize step's tensor of ``layout`` has in the driver: the frame's trailing
        axes from its outermost one, 1 where it does not vary (so tensors broadcast)."""
        if not layout:
            return "()"
        frame = self.program.frame
        dims = [f"sz_{frame[a]}" if a in layout else "1" for a in range(min(layout), len(frame))]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def scalar(self, name: str, col: str) -> str:
        if name in self.sizes:
            return f"tl.cast({self.sizes[name]}, tl.float64)"
        if name in self.constants:
            return self.constants[name]
        v = self.values[name]
        if v.layout == self.program.row:
            return f"tl.load(kr_{name} + row)" if name in self.program.kept_rows and v.time[0] < self.sweep else f"r_{name}"
        if v.layout == SCALAR:
            return f"tl.load(ps_{name})"
        if v.layout != self.program.full:
            return f"tl.load(cv_{name} + {self.flat(v.layout, col)})"
        raise ValueError(f"{name} is a full-size value read outside a loop")

    def vector(self, name: str, dtype: str = "DT") -> str:
        if name in self.sizes:
            return f"tl.cast({self.sizes[name]}, {dtype})"
        if name in self.constants:
            return self.constants[name]
        v = self.values[name]
        if v.layout == self.program.full:
            return f"v_{name}"
        if self.program.col <= v.layout:
            return f"tl.load(cv_{name} + {self.flat(v.layout, 'cols')}, mask=mask, other=0.0).to({dtype})"
        return f"({self.scalar(name, 'cols')}).to({dtype})"

    def offset(self, e: sp.Indexed, printer, col: str) -> tuple[str, bool]:
        tensor = self.tensors[str(e.base)]
        dims = list(tensor.shape) if tensor.shape else []
        if not dims:
            return "0", False
        parts, moves = [], False
        for k, (dim, idx) in enumerate(zip(dims, e.indices)):
            if dim == "1" or idx == 0:
                continue
            stride = "*".join(self.sizes[d] for d in dims[k + 1:] if d != "1")
            if idx == self.frame[-1]:
                moves, text = True, col
            elif idx in self.frame:
                text = self.axes[self.frame.index(idx)]
            else:
                text = f"tl.load({self.pointer(idx, printer)})"
            parts.append(f"{text}*{stride}" if stride else text)
        return " + ".join(parts) or "0", moves

    def pointer(self, e: sp.Indexed, printer, col: str = "cols") -> str:
        offset, _ = self.offset(e, printer, getattr(printer, "col", col))
        return f"p_{e.base} + {offset}"

    def vector_load(self, e: sp.Indexed) -> str:
        offset, moves = self.offset(e, RowPrinter(self), "cols")
        if moves:
            return f"tl.load(p_{e.base} + {offset}, mask=mask, other=0.0)"
        return f"tl.load(p_{e.base} + {offset}).to(DT)"

    def finalize(self, name: str) -> str:
        if name in self.sizes:
            return f"float({self.sizes[name]})"
        if name in self.constants:
            return self.constants[name]
        v = self.values[name]
        if not v.layout:
            return f"ps_{name}"
        return f"cv_{name}" if v.layout == self.program.col else f"cv_{name}.view{self.shape(v.layout)}"

    def whole(self, e: sp.Indexed) -> str:
        """An input that varies on fewer axes than the rows, read whole in the driver:
        ``p_gamma.reshape(-1)``."""
        layout = frozenset(k for k, i in enumerate(self.frame) if i in e.free_symbols)
        if any(isinstance(i, sp.Indexed) for i in e.indices) or self.program.row <= layout:
            raise ValueError(f"{e} read in a finalize step")
        base = f"p_{e.base}"
        dims = list(self.tensors[str(e.base)].shape)
        if any(i == 0 and d != "1" for d, i in zip(dims, e.indices)):  # its first entry along an axis
            sizes = ", ".join("1" if d == "1" else f"sz_{self.kernel.graph.sizes[d]}" for d in dims)
            picks = ", ".join("0:1" if i == 0 and d != "1" else ":" for d, i in zip(dims, e.indices))
            base = f"{base}.reshape({sizes})[{picks}]"
        if layout == self.program.col:
            return f"{base}.reshape(-1)"
        return f"{base}.reshape({self.shape(layout)})"


def _cse(exprs: list, printer: VectorPrinter, prefix: str) -> tuple[list[str], list[str]]:
    replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(f"{prefix}_t"), order="none")
    lines = []
    for symbol, value in replacements:
        printer.names.values[symbol.name] = Value(symbol.name, printer.names.program.full, value)
        lines.append(f"v_{symbol.name} = {printer._print(value)}")
    return lines, [printer._print(r) for r in reduced]


def program_context(program: Program, plan: Plan, kernel, sizes: list | None = None) -> dict:
    """Everything ``triton_module.py.j2`` places for one program (the forward or the backward, or a
    loop stage of either: ``sizes`` are then every size of the layer, its frame's and others)."""
    vals = program.values
    kept = program.kept_rows
    frame = program.frame
    rows = "*".join(f"sz_{s}" for s in frame[:-1])
    rows = rows if len(frame) == 2 else f"({rows})"
    doubles = {t.name: t.double for t, _ in program.outputs}

    def finalize(steps: list, sweep: int) -> list[str]:
        names = Names(program, plan, kernel, sweep)
        tp = TorchPrinter(names)
        lines = []
        for step in steps:
            kind, v = step[0], step[-1]
            target = f"cv_{v.name}" if v.layout else f"ps_{v.name}"
            if kind == "combine":
                how = "sum" if v.reduce == "sum" else "amax"
                lines.append(f"{target} = part_{v.name}.{how}(0)" + ("" if v.layout else ".reshape(())"))
            elif kind == "value" and v.reduce:  # an array summed over one of its axes
                how = "sum" if v.reduce == "sum" else "amax"
                body = v.layout | {v.axis}
                dim = v.axis - len(frame)  # counted from the end: every shape ends at the innermost axis
                flat = ".reshape(-1)" if v.layout else ".reshape(())"
                lines.append(f"{target} = torch.as_tensor({tp._print(v.expr)}, dtype=torch.float64, "
                             f"device=device).expand{names.shape(body)}.{how}({dim}, keepdim=True){flat}")
            elif kind == "value":
                shape = f".expand{names.shape(v.layout)}.contiguous().reshape(-1)" if v.layout else ".reshape(())"
                lines.append(f"{target} = torch.as_tensor({tp._print(v.expr)}, "
                             f"dtype=torch.float64, device=device){shape}")
            elif kind == "store":
                lines.append(f"o_{step[1]}.copy_({names.finalize(v.name)}.reshape(-1).expand_as(o_{step[1]}))")
        return lines

    def row_step(step, names: Names, rp: RowPrinter) -> list[str]:
        v = step.value
        if step.kind == "reduced":
            line = f"r_{v.name} = tl.sum(acc_{v.name}, axis=0)" if v.reduce == "sum" else \
                f"r_{v.name} = tl.max(acc_{v.name}, axis=0).to(tl.float64)"
            return [line] + ([f"tl.store(kr_{v.name} + row, r_{v.name})"] if v.name in kept else [])
        if step.kind == "value":
            return [f"r_{v.name} = {rp._print(v.expr)}"] + (
                [f"tl.store(kr_{v.name} + row, r_{v.name})"] if v.name in kept else [])
        if step.kind == "store":
            cast = "tl.float64" if doubles.get(step.tensor) else "DT"
            return [f"tl.store(o_{step.tensor} + row, ({names.scalar(v.name, 'cols')}).to({cast}))"]
        if step.kind == "accumulate" and v.layout:  # into the chunk's partial of this row's entry
            body = rp._print(v.expr)
            q = f"part_{v.name} + chunk*{numel(v.layout, frame)} + {names.flat(v.layout, 'cols')}"
            if v.reduce == "sum":
                return [f"tl.store({q}, tl.load({q}) + {body})"]
            return [f"tl.store({q}, tl.maximum(tl.load({q}), {body}, propagate_nan=tl.PropagateNan.ALL))"]
        if step.kind == "accumulate":
            body = rp._print(v.expr)
            if v.reduce == "sum":
                return [f"pacc_{v.name} += {body}"]
            return [f"pacc_{v.name} = tl.maximum(pacc_{v.name}, {body}, propagate_nan=tl.PropagateNan.ALL)"]
        if step.kind == "fixup":
            label_rp = RowPrinter(names, col="label_col")
            return [f"label_col = tl.load({names.pointer(step.label, rp)})",
                    f"tl.store(o_{step.tensor} + row*sz_{frame[-1]} + label_col, "
                    f"({label_rp._print(step.expr)}).to(DT))"]
        raise ValueError(step.kind)

    sweeps = []
    for k, sweep in enumerate(program.sweeps):
        names = Names(program, plan, kernel, k)
        rp, vp = RowPrinter(names), VectorPrinter(names)
        loops = []
        for p, lp in enumerate(sweep.loops):
            setup, body = [], []
            for v in lp.row_reductions:
                setup.append(f"acc_{v.name} = tl.zeros([BLOCK], dtype=tl.float64)" if v.reduce == "sum"
                             else f"acc_{v.name} = tl.full([BLOCK], float('-inf'), dtype=DT)")
            narrow = [v for v in lp.col_reductions if not v.wide]
            exprs = [_inline_full(v.expr, vals, program.full) for v in lp.row_reductions + narrow] + \
                    [_inline_full(vals[x].expr, vals, program.full) for _, x in lp.stores]
            temps, printed = _cse(exprs, vp, f"e{p}")
            body += temps
            it = iter(printed)
            for v in lp.row_reductions:
                text = next(it)
                if v.reduce == "sum":
                    body.append(f"acc_{v.name} += tl.where(mask, ({text}).to(tl.float64), 0.0)")
                else:
                    body.append(f"acc_{v.name} = tl.maximum(acc_{v.name}, tl.where(mask, {text}, float('-inf')), "
                                f"propagate_nan=tl.PropagateNan.ALL)")
            for v in lp.col_reductions:
                text = WidePrinter(names)._print(_inline_full(v.expr, vals, program.full)) if v.wide else next(it)
                q = f"part_{v.name} + chunk*{numel(v.layout, frame)} + {names.flat(v.layout, 'cols')}"
                if v.reduce == "sum":
                    body.append(f"tl.store({q}, tl.load({q}, mask=mask, other=0.0) + ({text}).to(tl.float64), mask=mask)")
                else:
                    body.append(f"tl.store({q}, tl.maximum(tl.load({q}, mask=mask, other=0.0), ({text}).to(tl.float64), "
                                f"propagate_nan=tl.PropagateNan.ALL), mask=mask)")
            for tensor, _ in lp.stores:
                body.append(f"tl.store(o_{tensor} + row*sz_{frame[-1]} + cols, ({next(it)}).to(DT), mask=mask)")
            after = [line for step in lp.after for line in row_step(step, names, rp)]
            loops.append(dict(setup=setup, body=body, after=after, index=p))
        accumulated = [s.value for s in sweep.start + [x for lp in sweep.loops for x in lp.after] if s.kind == "accumulate"]
        start = split_row(frame, style="triton") + [line for step in sweep.start for line in row_step(step, names, rp)]
        col_parts = [v for lp in sweep.loops for v in lp.col_reductions] + [v for v in accumulated if v.layout]
        accumulated = [v for v in accumulated if not v.layout]  # one sum per chunk, kept in a register
        partials = [f"part_{v.name} = torch.full((chunks, {numel(v.layout, frame)}), {_start(v)}, "
                    f"dtype=torch.float64, device=device)" for v in col_parts]
        partials += [f"part_{v.name} = torch.empty(chunks, dtype=torch.float64, device=device)" for v in accumulated]
        chunk_start = [f"pacc_{v.name} = tl.full([1], {_start(v)}, tl.float64)" for v in accumulated]
        chunk_end = [f"tl.store(part_{v.name} + chunk + tl.arange(0, 1), pacc_{v.name})" for v in accumulated]
        sweep_context = dict(before=finalize(sweep.before, k), partials=partials, start=start, loops=loops, index=k,
                             chunk_start=chunk_start, chunk_end=chunk_end,
                             chunks=f"min({rows}, {CHUNKS})" if col_parts or accumulated else f"max(1, {rows})")
        text = "\n".join([rows] + sweep_context["start"] + sweep_context["chunk_start"] + sweep_context["chunk_end"]
                         + [line for lp in loops for line in lp["setup"] + lp["body"] + lp["after"]])
        sweep_context["params"] = _params(text)
        sweeps.append(sweep_context)
    tail = finalize(program.tail, len(program.sweeps))
    first = next(t for t in program.inputs if not t.labels)
    allocations = []
    for t, v in program.outputs:
        size = numel(t.layout, frame)
        dtype = "torch.float64" if t.double else f"p_{first.name}.dtype"
        fill = "torch.zeros" if vals[v].expr == 0 and not vals[v].reduce else "torch.empty"
        allocations.append(f"o_{t.name} = {fill}({size}, dtype={dtype}, device=device)")
    kept_lines = [f"kr_{n} = torch.empty({rows}, dtype=torch.float64, device=device)" for n in kept]
    signatures = {}
    for s in sweeps:
        signatures[f"_{program.name}_sweep{s['index']}"] = {p: _type(p, program, doubles) for p in s["params"]}
    return dict(name=program.name, args=[t.name for t in program.inputs], constants=[f"k_{c}" for c in program.scalars],
                sizes=[f"sz_{s}" for s in sizes or frame], allocations=allocations, kept=kept_lines, sweeps=sweeps,
                tail=tail, first=first.name, outputs=[t.name for t, _ in program.outputs], signatures=signatures,
                rows=rows, cols=f"sz_{frame[-1]}")


def _start(v: Value) -> str:
    """Where a sum (0) or a maximum (minus infinity) starts."""
    return "0.0" if v.reduce == "sum" else "float('-inf')"


_PARAM = re.compile(r"\b((?:p|o|cv|ps|part|kr|k|sz)_\w+)")


def _params(text: str) -> list[str]:
    return sorted(set(_PARAM.findall(text)))


def _type(param: str, program: Program, doubles: dict) -> str:
    """The parameter's Triton type for a float32 launch (ahead-of-time compilation)."""
    kind, _, name = param.partition("_")
    tensors = {t.name: t for t in program.inputs}
    if kind == "p":
        t = tensors[name]
        return "*i64" if t.labels else "*fp64" if t.double else "*fp32"
    if kind == "o":
        return "*fp64" if doubles.get(name) else "*fp32"
    if kind in ("cv", "ps", "part", "kr"):
        return "*fp64"
    if kind == "k":
        return "fp32"
    return "i32"


class _DriverNames:
    """Sizes and constants, the only symbols a product's scale reads (``stages.define``)."""

    values: dict = {}

    def __init__(self, kernel):
        self.constants = {c: f"k_{c}" for c in kernel.layer.constants}

    def finalize(self, name: str) -> str:
        return self.constants.get(name, f"float(sz_{name})")


# a staged driver in Python: tensors ``p_<name>``, ``torch.mm`` (cuBLAS on a GPU) of ``view(sizes)``s
TRITON_SPELLING = Spelling(tensor="p_{}", view="{tensor}.view({shape})", product="{out} = torch.mm({left}, {right})",
                           scaled="{out}.mul_(float({scale}))", call="{out} = _{function}({args})[0]",
                           comment="# {text}", mm="torch.mm")


def staged_context(staged: Staged, plan: Plan, kernel) -> dict:
    """The Python function that runs a staged forward or backward (``stages.py``) step by step: each
    product a ``torch.mm`` of two views (cuBLAS on a GPU, as the C++ stages call ``at::mm``), each
    loop program a call of its driver (Triton kernels)."""
    return driver_context(staged, plan, kernel, TRITON_SPELLING, TorchPrinter(_DriverNames(kernel)))


def render_module(kernel, plan: Plan, module_context: dict) -> str:
    """``<name>_triton.py``: a driver and Triton kernels for each program; a staged plan
    (``stages.py``) prints each loop program so, and a driver of its steps for each direction."""
    programs, drivers = contexts(plan, kernel, program_context, staged_context)
    return environment().get_template("triton_module.py.j2").render(header="", programs=programs, drivers=drivers,
                                                                     **module_context)


__all__ = ["render_module", "program_context"]


def compile_ahead(paths, arch: int = 90) -> dict[str, dict]:
    """Compile every kernel of the generated Triton modules at ``paths`` for a CUDA GPU of compute
    capability ``arch`` without one (Triton's compiler and its bundled ``ptxas``), float32,
    ``BLOCK=1024`` with 8 warps (as the driver launches a block of 1024 columns):
    kernel name -> ``{"registers": int, "spill_stores": int, "spill_loads": int}`` as ``ptxas -v``
    reports them. Compile errors raise. It runs in a fresh process: Triton's interpreter
    (``TRITON_INTERPRET=1``) patches ``triton.language`` in a process where it ran, and the compiler
    then fails on the patched operators."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", f"import json, sys; from derive.triton_backend import _compile_here; "
                          f"print(json.dumps(_compile_here(sys.argv[2:], int(sys.argv[1]))))", str(arch),
                          *map(str, paths)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    if run.returncode != 0:
        raise RuntimeError(f"compiling the Triton kernels ahead of time failed: {run.stderr.strip()[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _compile_here(paths, arch: int) -> dict[str, dict]:
    """``compile_ahead`` in this process (one where Triton's interpreter never ran)."""
    import subprocess
    import tempfile

    from .verify import load_module

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    out = {}
    ptxas = get_ptxas(arch).path if "arch" in get_ptxas.__code__.co_varnames else get_ptxas().path
    for path in paths:
        module = load_module(Path(path))
        for name, params in module._SIGNATURES.items():
            signature = {**params, "rows_per_chunk": "i32", "BLOCK": "constexpr", "DT": "constexpr",
                         "DEVICE_MATH": "constexpr"}
            source = ASTSource(getattr(module, name), signature,
                               constexprs={"BLOCK": 1024, "DT": tl.float32, "DEVICE_MATH": True})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            with tempfile.TemporaryDirectory() as folder:
                ptx = Path(folder) / "kernel.ptx"
                ptx.write_text(compiled.asm["ptx"])
                report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                                         str(ptx), "-o", str(Path(folder) / "kernel.cubin")],
                                        capture_output=True, text=True, check=True).stderr
            numbers = {key: int(m.group(1)) if (m := re.search(pattern, report)) else 0 for key, pattern in
                       {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
                        "spill_loads": r"(\d+) bytes spill loads"}.items()}
            out[name] = numbers
    return out
