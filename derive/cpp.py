"""The C++ backend: a kernel plan (``plan.py``) printed as loops over memory with ATen's vectors.

Element expressions are printed by two SymPy C printers: ``ScalarPrinter`` (per-row, per-column and
scalar values, in double precision) and ``VectorPrinter`` (the element maps, on
``at::vec::Vectorized<scalar_t>``: its ``exp`` (printed ``derive_exp``: the same values), ``log``,
``tanh`` are torch's own, so NaN and infinity behave as in autograd; no ``-ffast-math``). Sizes
print as floating values (``static_cast<double>(n)``: ``n/(n - 1)`` is never an integer division),
literals in the kernel's dtype (``scalar_t(0.5)``), a Kronecker delta as a comparison. The loop
skeleton (sweeps over chunks of rows with ``at::parallel_for``, loops over the columns of a row,
finalize steps) is in ``templates/native_kernel.cpp.j2``; this module decides every line placed in it.

Rows are split into a fixed number of chunks (``CHUNKS`` at most) whatever the number of threads,
and partial sums are combined in chunk order: the result does not depend on the thread count.
Within a chunk, a sweep that only adds up columns over the rows takes ``BLOCK_ROWS`` rows per
vector of columns, summed in double in registers, before one update of the chunk's partial sums;
a row's reduction in a pass that does little else is taken in ``LANES`` independent accumulators.
Both orders are fixed by the sizes alone.
"""
from __future__ import annotations

import re

import sympy as sp
from sympy.printing.c import C99CodePrinter

from .functions import Relu, Sigmoid, Softplus, Step, step_argument
from sympy.printing.precedence import PRECEDENCE

from .plan import COL, FULL, ROW, SCALAR, Plan, Program, Value, _inline_full, computed
from .stages import Spelling, Staged, contexts, driver_context
from .symbolic import reciprocal_root_power, reciprocal_roots
from .templating import environment

CHUNKS = 64  # the most chunks of rows a sweep is split into (partial sums: chunks x columns doubles)
BLOCK_ROWS = 8  # rows of a chunk summed in registers before one update of its partial sums
LANES = 4  # independent accumulators of a row's reduction (vector k of the row into k % LANES)


def _multiplied_roots(printer, e: sp.Expr) -> str | None:
    """A product with factors ``q**(-k/2)`` as the rest times ``rsqrt(q)**k``, or None without them
    (``symbolic.reciprocal_roots``)."""
    rest, roots = reciprocal_roots(e)
    if not roots:
        return None
    powers = "*".join(printer._print(f) for f in roots)
    return powers if rest == 1 else f"({printer._print(rest)})*{powers}"


def _exponent(exp: sp.Expr) -> sp.Expr:
    """A float exponent that is a simple fraction as that fraction (``x**-0.5`` is a reciprocal root)."""
    if exp.is_Float:
        fraction = sp.Rational(float(exp))
        if fraction.q <= 4:
            return fraction
    return exp


def _literal(value) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".en") else text + ".0"


class ScalarPrinter(C99CodePrinter):
    """One value in double precision: per-row code (``row``), per-column loops (``col``), scalars."""

    def __init__(self, names: "Names", col: str = "col"):
        super().__init__({"strict": False})
        self.names, self.col = names, col

    def _print_Symbol(self, s):
        return self.names.scalar(s.name, self.col)

    def _print_Idx(self, i):
        return self.names.index(i, self.col)

    def _print_Indexed(self, e):
        return f"static_cast<double>({self.names.load(e, self, self.col)})"

    def _print_Integer(self, e):
        return _literal(e)

    def _print_Rational(self, e):
        return _literal(e)

    def _print_Float(self, e):
        return _literal(e)

    def _print_Add(self, e, order=None):
        """Terms that read values first, functions of values last (``plan.computed``)."""
        terms = sorted(e.args, key=lambda t: (computed(t, self.names.values), t.is_number, sp.default_sort_key(t)))
        text = ""
        for k, term in enumerate(terms):
            coefficient, rest = term.as_coeff_Mul()
            if k and coefficient.is_negative:
                text += " - " + self.parenthesize(-term, PRECEDENCE["Add"])
            else:
                text += (" + " if k else "") + self.parenthesize(term, PRECEDENCE["Add"])
        return text

    def _print_Mul(self, e):
        return _multiplied_roots(self, e) or super()._print_Mul(e)

    def _print_Pow(self, e):
        base, exp = e.as_base_exp()
        exp = _exponent(exp)
        b = self._print(base)
        if exp == 2:
            return f"(({b})*({b}))"
        if exp == -1:
            return f"(1.0/({b}))"
        if exp == sp.S.Half:
            return f"std::sqrt({b})"
        if exp == -sp.S.Half:
            return f"(1.0/std::sqrt({b}))"
        if reciprocal_root_power(e):
            return "(" + "*".join([f"(1.0/std::sqrt({b}))"] * reciprocal_root_power(e)) + ")"
        return f"std::pow({b}, {self._print(exp)})"

    def _print_exp(self, e):
        return f"std::exp({self._print(e.args[0])})"

    def _print_log(self, e):
        return f"std::log({self._print(e.args[0])})"

    def _print_tanh(self, e):
        return f"std::tanh({self._print(e.args[0])})"

    def _print_Abs(self, e):
        return f"std::abs({self._print(e.args[0])})"

    def _print_sign(self, e):
        a = self._print(e.args[0])
        return f"derive_sign({a})"

    def _print_Step(self, e):
        return f"(({self._print(step_argument(e.args[0]))}) > 0.0 ? 1.0 : 0.0)"

    def _print_Root(self, e):  # the value of a root whose derivative is masked at 0: a root
        return self._print(sp.sqrt(e.args[0]))

    def _print_Relu(self, e):
        return f"derive_relu({self._print(e.args[0])})"

    def _print_Sigmoid(self, e):
        return f"(1.0/(1.0 + std::exp(-({self._print(e.args[0])}))))"

    def _print_Softplus(self, e):
        return f"derive_softplus({self._print(e.args[0])})"

    def _print_KroneckerDelta(self, e):
        a, b = (self._print(x) for x in e.args)
        return f"(({a}) == ({b}) ? 1.0 : 0.0)"

    def _print_NonNeg(self, e):
        return f"(({self._print(e.args[0])}) >= 0.0 ? 1.0 : 0.0)"

    def _print_Equal(self, e):
        return f"(({self._print(e.args[0])}) == 0.0 ? 1.0 : 0.0)"

    def _print_Where(self, e):
        m, a, b = (self._print(x) for x in e.args)
        return f"(({m}) != 0.0 ? ({a}) : ({b}))"

    _print_Maximum = _print_Minimum = _print_Guarded = _print_Where  # the value of a Where

    def _print_Wins(self, e):
        return f"({self._print(e.halves())})"

    # a bound from below and one from above; NaN stays NaN, as torch.clamp (std::max(NaN, lo) is its
    # first argument; ATen's clamp_min and clamp_max, in VectorPrinter, keep it too)
    CLAMP = ("std::max<double>", "std::min<double>")

    def _print_Clamp(self, e):
        x, lo, hi = e.args
        text = self._print(x)
        if lo != -sp.oo:  # an infinite bound is no bound
            text = f"{self.CLAMP[0]}({text}, {self._print(lo)})"
        if hi != sp.oo:
            text = f"{self.CLAMP[1]}({text}, {self._print(hi)})"
        return text


class VectorPrinter(ScalarPrinter):
    """An element map on ``Vec`` (``at::vec::Vectorized<scalar_t>``), at columns ``col .. col + cnt``."""

    ZERO, ONE = "Vec(scalar_t(0))", "Vec(scalar_t(1))"
    VEC = "Vec"
    CLAMP = ("at::vec::clamp_min", "at::vec::clamp_max")

    def _vec(self, text: str) -> str:
        return f"Vec(static_cast<scalar_t>({text}))"

    def _print_Symbol(self, s):
        return self.names.vector(s.name)

    def _print_Indexed(self, e):
        return self.names.vector_load(e, ScalarPrinter(self.names))

    def _print_Integer(self, e):
        return f"Vec(scalar_t({_literal(e)}))"

    _print_Rational = _print_Float = _print_Integer

    def _print_Pow(self, e):
        base, exp = e.as_base_exp()
        exp = _exponent(exp)
        b = self._print(base)
        if exp.is_Integer and 1 < exp <= 4:
            return "(" + "*".join([f"({b})"] * int(exp)) + ")"
        if exp == -1:
            return f"({b}).reciprocal()"
        if exp.is_Integer and -4 <= exp < -1:  # (a power of the reciprocal: symbolic.reciprocal_integer_power)
            return "(" + "*".join([f"({b}).reciprocal()"] * int(-exp)) + ")"
        if exp == sp.S.Half:
            return f"({b}).sqrt()"
        if exp == -sp.S.Half:
            return f"({b}).rsqrt()"
        if reciprocal_root_power(e):
            return "(" + "*".join([f"({b}).rsqrt()"] * reciprocal_root_power(e)) + ")"
        return f"({b}).pow({self._print(exp)})"

    def _print_exp(self, e):
        return f"derive_exp({self._print(e.args[0])})"

    def _print_log(self, e):
        return f"({self._print(e.args[0])}).log()"

    def _print_tanh(self, e):
        return f"({self._print(e.args[0])}).tanh()"

    def _print_Abs(self, e):
        return f"({self._print(e.args[0])}).abs()"

    def _print_sign(self, e):
        a = self._print(e.args[0])
        return f"(({a}).gt({self.ZERO}) - ({a}).lt({self.ZERO}))"

    def _print_Step(self, e):
        return f"({self._print(step_argument(e.args[0]))}).gt({self.ZERO})"

    def _print_Relu(self, e):
        return f"at::vec::clamp_min({self._print(e.args[0])}, {self.ZERO})"

    def _print_Sigmoid(self, e):
        return f"({self.ONE} / ({self.ONE} + derive_exp(({self._print(e.args[0])}).neg())))"

    def _print_Softplus(self, e):
        return f"derive_softplus_vec({self._print(e.args[0])})"

    def _print_KroneckerDelta(self, e):
        raise ValueError("a Kronecker delta in an element map")  # the plan hoists or fixes them up

    def _print_NonNeg(self, e):
        return f"({self._print(e.args[0])}).ge({self.ZERO})"

    def _print_Equal(self, e):
        return f"({self._print(e.args[0])}).eq({self.ZERO})"

    def _print_Where(self, e):
        m, a, b = (self._print(x) for x in e.args)
        return f"{self.VEC}::blendv({b}, {a}, ({m}) != {self.ZERO})"

    _print_Maximum = _print_Minimum = _print_Guarded = _print_Where  # the value of a Where


class WidePrinter(VectorPrinter):
    """The body of a sum kept in double precision (``Value.wide``, a shifted sum): half ``h`` of a
    vector of ``scalar_t`` as ``DVec`` lanes, ``m`` of them in the row; per-column values read from
    their double arrays, not rounded to the kernel's dtype."""

    ZERO, ONE = "DVec(0.0)", "DVec(1.0)"
    VEC = "DVec"

    def _vec(self, text: str) -> str:
        return f"DVec({text})"

    def _print_Symbol(self, s):
        names, program = self.names, self.names.program
        if s.name in names.sizes or s.name in names.constants:
            return self._vec(names.scalar(s.name, "col"))
        v = names.values[s.name]
        if v.layout == program.full:
            raise ValueError(f"{s.name}: a full-size value in a body kept in double (inlined by the plan)")
        if program.col <= v.layout:
            return f"DVec::loadu(c_{s.name}.data() + {names.flat(v.layout, 'col')} + h*DVec::size(), m)"
        return self._vec(names.scalar(s.name, "col"))

    def _print_Indexed(self, e):
        offset, moves = self.names.offset(e, ScalarPrinter(self.names), "col")
        if moves:
            return f"derive_half(Vec::loadu(p_{e.base} + {offset}, cnt), h)"
        return self._vec(f"static_cast<double>(p_{e.base}[{offset}])")

    def _print_Integer(self, e):
        return self._vec(_literal(e))

    _print_Rational = _print_Float = _print_Integer


class Names:
    """How each quantity of one program is spelled in C++, where it is read from."""

    def __init__(self, program: Program, plan: Plan, kernel, sweep: int = 0):
        self.program, self.plan, self.kernel = program, plan, kernel
        self.values = dict(program.values)
        self.sweep = sweep
        self.tensors = {t.name: t for t in program.inputs}
        self.sizes = {str(s): f"sz_{s}" for s in kernel.graph.sizes.values()}
        self.constants = {c: f"k_{c}" for c in kernel.layer.constants}
        self.frame = program.index
        self.axes = axis_names(program.frame)

    def index(self, i, col: str) -> str:
        if i == self.frame[-1]:
            return col
        if i in self.frame:
            return self.axes[self.frame.index(i)]
        raise ValueError(f"index {i}")

    def flat(self, layout, col: str) -> str:
        """The offset of the current element in an array of ``layout`` (its axes, outermost first)."""
        return flat_index(layout, self.axes[:-1] + [col], self.program.frame)

    def scalar(self, name: str, col: str) -> str:
        if name in self.sizes:
            return f"static_cast<double>({self.sizes[name]})"
        if name in self.constants:
            return self.constants[name]
        v = self.values[name]
        if v.layout == self.program.row:
            return f"kr_{name}[row]" if name in self.program.kept_rows and v.time[0] < self.sweep else f"r_{name}"
        if v.layout == SCALAR:
            return f"s_{name}"
        if v.layout != self.program.full:  # an array of the values of the finalize steps
            return f"c_{name}[{self.flat(v.layout, col)}]"
        raise ValueError(f"{name} is a full-size value read outside a loop")

    def vector(self, name: str) -> str:
        if name in self.sizes or name in self.constants:
            return f"Vec(static_cast<scalar_t>({self.scalar(name, 'col')}))"
        v = self.values[name]
        if v.layout == self.program.full:
            return f"v_{name}"
        if self.program.col <= v.layout:  # consecutive along the columns
            return f"Vec::loadu(cv_{name}.data() + {self.flat(v.layout, 'col')}, cnt)"
        return f"Vec(static_cast<scalar_t>({self.scalar(name, 'col')}))"

    def offset(self, e: sp.Indexed, printer, col: str) -> tuple[str, bool]:
        """The flat offset of ``e`` in its tensor, and whether it moves with the column."""
        tensor = self.tensors[str(e.base)]
        dims = [d for d in tensor.shape] if tensor.shape else []
        indices = list(e.indices)
        if not dims:
            return "0", False
        parts, moves = [], False
        for k, (dim, idx) in enumerate(zip(dims, indices)):
            if dim == "1" or idx == 0:
                continue
            stride = "*".join(self.sizes[d] for d in dims[k + 1:] if d != "1")
            if idx == self.frame[-1]:
                moves = True
                text = col
            elif idx in self.frame:
                text = self.axes[self.frame.index(idx)]
            else:
                text = f"static_cast<int64_t>({printer._print(idx).replace('static_cast<double>', '')})"
            parts.append(f"{text}*{stride}" if stride else text)
        return " + ".join(parts) or "0", moves

    def load(self, e: sp.Indexed, printer, col: str) -> str:
        offset, _ = self.offset(e, printer, col)
        return f"p_{e.base}[{offset}]"

    def vector_load(self, e: sp.Indexed, scalar_printer) -> str:
        offset, moves = self.offset(e, scalar_printer, "col")
        if moves:
            return f"Vec::loadu(p_{e.base} + {offset}, cnt)"
        return f"Vec(p_{e.base}[{offset}])"


def axis_names(frame: list) -> list[str]:
    """The loop variable of each axis of the frame: ``row`` and ``col`` for two axes; with more, the
    outer axes are ``a_<size>`` (taken apart from the flat ``row``) and the innermost ``col``."""
    if len(frame) == 2:
        return ["row", "col"]
    return [f"a_{s}" for s in frame[:-1]] + ["col"]


def flat_index(layout, variables: list[str], frame: list, size=lambda s: f"sz_{s}") -> str:
    """``a_c*sz_l + col``: the offset in a contiguous array over ``layout``'s axes (frame order)."""
    axes = sorted(layout)
    parts = []
    for k, a in enumerate(axes):
        stride = "*".join(size(frame[b]) for b in axes[k + 1:])
        parts.append(f"{variables[a]}*{stride}" if stride else variables[a])
    return " + ".join(parts) or "0"


def numel(layout, frame: list, size=lambda s: f"sz_{s}") -> str:
    return "*".join(size(frame[a]) for a in sorted(layout)) or "1"


def split_row(frame: list, row: str = "row", size=lambda s: f"sz_{s}", style: str = "cpp") -> list[str]:
    """The outer axes' indices of a flat ``row`` (frames of three axes or more)."""
    if len(frame) <= 2:
        return []
    names = axis_names(frame)[:-1]
    lines, rest = [], row
    for k in range(len(names) - 1, 0, -1):
        if style == "cpp":
            lines.append(f"const int64_t {names[k]} = ({rest}) % {size(frame[k])}; (void){names[k]};")
        else:
            lines.append(f"{names[k]} = ({rest}) % {size(frame[k])}")
        rest = f"({rest}) // {size(frame[k])}" if style != "cpp" else f"({rest}) / {size(frame[k])}"
    lines.append(f"const int64_t {names[0]} = {rest}; (void){names[0]};" if style == "cpp" else f"{names[0]} = {rest}")
    return lines


def loop_nest(layout, frame: list, body: str) -> str:
    """``body`` inside a loop over each axis of ``layout`` (the variables of ``axis_names``)."""
    names = axis_names(frame)
    text = body
    for a in sorted(layout, reverse=True):
        text = f"for (int64_t {names[a]} = 0; {names[a]} < sz_{frame[a]}; ++{names[a]}) {{ {text} }}"
    return text


def _cse_lines(exprs: list, printer, prefix: str) -> tuple[list[str], list[str]]:
    """Repeated subexpressions of one loop's element maps as vector temporaries ``v_<prefix>_t<k>``."""
    replacements, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(f"{prefix}_t"), order="none")
    lines = []
    for symbol, value in replacements:
        printer.names.values[symbol.name] = Value(symbol.name, printer.names.program.full, value)
        lines.append(f"const Vec v_{symbol.name} = {printer._print(value)};")
    return lines, [printer._print(r) for r in reduced]


# What the loops of a sweep read from the enclosing function: pointers (``p_``, ``o_``), sizes,
# constants, scalars, the arrays of per-row and per-column values and of partial sums.
_OUTER = re.compile(r"\b(?:(?:p|o|sz|k|s)_\w+|rows_per_chunk)\b")
_OUTER_ARRAY = re.compile(r"\b((?:cv|part|c|kr)_\w+)(?:\.data\(\)|(?=\[))")


# the lines of one pass over a row (``_localized`` renames what they read from the function)
LOOP_LINES = ("setup", "body", "after", "flush", "exact")


def _localized(blocks: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The lines of a sweep's loops reading local copies of what they use from the enclosing
    function, and the declarations of those copies (placed at the top of the parallel region).

    The parallel region captures the function's variables by reference and escapes into the thread
    pool, and a vector store (``Vectorized::store``, a may-alias type) may write any memory that
    escaped: read through the captures, every pointer, size and ``std::vector``'s data pointer is
    loaded again at each vector of each row. A local copy whose address is never taken stays in a
    register."""
    text = "\n".join(line for block in blocks for line in block)
    arrays = sorted(set(_OUTER_ARRAY.findall(text)))
    scalars = sorted(set(_OUTER.findall(text)))
    local = [f"auto* const l_{a} = {a}.data();" for a in arrays] + [f"const auto l_{n} = {n};" for n in scalars]

    def rename(line: str) -> str:
        line = _OUTER_ARRAY.sub(lambda m: f"l_{m.group(1)}", line)
        return _OUTER.sub(lambda m: f"l_{m.group(0)}", line)

    return local, [[rename(line) for line in block] for block in blocks]


_ROW_LOAD = re.compile(r"Vec::loadu\((l_p_\w+) \+ (row\*[\w*]+) \+ col, cnt\)")


def _prefetching(first: list[str], ahead: str = "1") -> list[str]:
    """Prefetches of the entries ``ahead`` rows on that a sweep's first pass over a row reads.

    Placed in the last pass over a row (``ahead`` 1): the first pass streams the row from memory and
    later passes read it from cache; without the prefetch the first pass waits on memory while the
    later ones (an ``exp`` at every entry) leave the memory idle. In a pass over a block of rows
    (``ahead`` a block): it reads a vector of columns from each row of the block in turn, a pattern
    of short strides the hardware's prefetchers follow badly when rows are shorter than a page. A
    prefetch never faults: past the last row it reads nothing."""
    loads = sorted(set(_ROW_LOAD.findall("\n".join(first))))
    return [f"__builtin_prefetch({pointer} + {offset.replace('row*', f'(row + {ahead})*', 1)} + col);"
            for pointer, offset in loads]


def _accumulator(v: Value, vals: dict, program: Program) -> str:
    """The accumulator a reduction is printed with: ``DeriveRowMax`` for a maximum; for a sum
    ``DoubleLanes`` (in double), or ``PairedLanes`` where no term can be negative (a sum of
    exponentials, of squares), whose float vectors are added in pairs before being widened. Decided on
    the term with every value it reads real: the kernel's values are floats (a NaN is carried
    either way), which says nothing about the user's symbols and enters no proof."""
    if v.reduce != "sum":
        return "DeriveRowMax"
    if v.wide:  # its body is evaluated in double already
        return "DoubleLanes"
    term = _inline_full(v.expr, vals, program.full)
    real = {a: sp.Dummy(real=True) for a in term.atoms(sp.Indexed) | term.free_symbols}
    return "PairedLanes" if term.xreplace(real).is_nonnegative else "DoubleLanes"


def program_context(program: Program, plan: Plan, kernel, sizes: list | None = None) -> dict:
    """Everything ``native_kernel.cpp.j2`` places for one program (the forward or the backward, or
    a loop stage of either: ``sizes`` are then every size of the layer, its frame's and others)."""
    vals = program.values
    frame = program.frame
    rows_size = "*".join(f"sz_{s}" for s in frame[:-1])
    rows_size = rows_size if len(frame) == 2 else f"({rows_size})"
    cols_size = f"sz_{frame[-1]}"
    sweeps, kept = [], program.kept_rows
    first_float = next(t for t in program.inputs if not t.labels)
    vector_cols = {n for sweep in program.sweeps for lp in sweep.loops
                   for v in lp.locals + lp.row_reductions + lp.col_reductions + [vals[x] for _, x in lp.stores]
                   for n in _symbols(v.expr) if n in vals and program.col <= vals[n].layout != program.full}
    doubles = {t.name: t.double for t, _ in program.outputs}

    def finalize(steps: list, sweep: int) -> list[str]:
        names = Names(program, plan, kernel, sweep)
        sp_ = ScalarPrinter(names)
        lines = []
        for step in steps:
            kind, v = step[0], step[-1]
            if kind == "combine":
                init = "0.0" if v.reduce == "sum" else "-INFINITY"
                add = "a += q;" if v.reduce == "sum" else "a = derive_max(a, q);"
                if v.layout:
                    # chunk by chunk, each a contiguous row of partial sums (a vector loop; a loop down
                    # the chunks of one column would stride a page per load): each column still adds its
                    # chunks in chunk order
                    size = numel(v.layout, frame)
                    add_row = "a[at] += q[at];" if v.reduce == "sum" else "a[at] = derive_max(a[at], q[at]);"
                    lines += [f"std::vector<double> c_{v.name}({size}, {init});",
                              f"for (int64_t chunk = 0; chunk < chunks; ++chunk) {{ double* const a = c_{v.name}.data(); "
                              f"const double* const q = part_{v.name}.data() + chunk*{size}; "
                              f"for (int64_t at = 0; at < {size}; ++at) {add_row} }}"]
                else:
                    lines += [f"double s_{v.name} = {init};",
                              f"for (int64_t chunk = 0; chunk < chunks; ++chunk) {{ const double q = part_{v.name}[chunk]; "
                              f"{add.replace('a ', f's_{v.name} ').replace('(a,', f'(s_{v.name},')} }}"]
            elif kind == "value" and v.reduce:  # an array summed over one of its axes
                init = "0.0" if v.reduce == "sum" else "-INFINITY"
                body = sp_._print(v.expr)
                target = f"s_{v.name}" if not v.layout else f"c_{v.name}[{names.flat(v.layout, 'col')}]"
                op = f"a += {body};" if v.reduce == "sum" else f"a = derive_max(a, {body});"
                inner = loop_nest({v.axis}, frame, op)
                if not v.layout:
                    lines += [f"double s_{v.name} = {init};",
                              inner.replace("a += ", f"s_{v.name} += ").replace("a = derive_max(a,", f"s_{v.name} = derive_max(s_{v.name},")]
                else:
                    lines += [f"std::vector<double> c_{v.name}({numel(v.layout, frame)});",
                              loop_nest(v.layout, frame, f"double a = {init}; {inner} {target} = a;")]
            elif kind == "value" and v.layout:
                lines += [f"std::vector<double> c_{v.name}({numel(v.layout, frame)});",
                          loop_nest(v.layout, frame, f"c_{v.name}[{names.flat(v.layout, 'col')}] = {sp_._print(v.expr)};")]
            elif kind == "value":
                lines.append(f"const double s_{v.name} = {sp_._print(v.expr)};")
            elif kind == "store":
                tensor = step[1]
                cast = "double" if doubles.get(tensor) else "scalar_t"
                if v.layout:
                    lines.append(loop_nest(v.layout, frame, f"o_{tensor}[{names.flat(v.layout, 'col')}] = "
                                                            f"static_cast<{cast}>({names.scalar(v.name, 'col')});"))
                else:
                    lines.append(f"o_{tensor}[0] = static_cast<{cast}>({names.scalar(v.name, 'col')});")
            if kind in ("value", "combine") and v.name in vector_cols:
                lines.append(f"std::vector<scalar_t> cv_{v.name}(c_{v.name}.begin(), c_{v.name}.end());")
        return lines

    def row_step(step, names: Names, sp_: ScalarPrinter) -> list[str]:
        v = step.value
        if step.kind == "reduced":
            total = "derive_total" if v.reduce == "sum" else "derive_max_total"
            line = f"const double r_{v.name} = {total}(acc_{v.name});"
            return [line] + ([f"kr_{v.name}[row] = r_{v.name};"] if v.name in kept else [])
        if step.kind == "value":
            return [f"const double r_{v.name} = {sp_._print(v.expr)};"] + (
                [f"kr_{v.name}[row] = r_{v.name};"] if v.name in kept else [])
        if step.kind == "store":
            cast = "double" if doubles.get(step.tensor) else "scalar_t"
            return [f"o_{step.tensor}[row] = static_cast<{cast}>({names.scalar(v.name, 'col')});"]
        if step.kind == "accumulate":
            body = sp_._print(v.expr)
            at = f"chunk*{numel(v.layout, frame)} + {names.flat(v.layout, 'col')}" if v.layout else "chunk"
            if v.reduce == "sum":
                return [f"part_{v.name}[{at}] += {body};"]
            return [f"part_{v.name}[{at}] = derive_max(part_{v.name}[{at}], {body});"]
        if step.kind == "fixup":
            label_sp = ScalarPrinter(names, col="label_col")
            return [f"{{ const int64_t label_col = {names.load(step.label, sp_, 'col')}; "
                    f"o_{step.tensor}[row*{cols_size} + label_col] = static_cast<scalar_t>({label_sp._print(step.expr)}); }}"]
        raise ValueError(step.kind)

    slots = []  # the partial sums' buffers (``derive_scratch``), one slot each
    for k, sweep in enumerate(program.sweeps):
        names = Names(program, plan, kernel, k)
        sp_, vp = ScalarPrinter(names), VectorPrinter(names)
        partials = []
        loops = []
        # a sweep that only adds up columns over rows (batchnorm's statistics) sums a block of rows
        # per vector of columns in registers before adding to the chunk's partial sums
        blocked = bool(sweep.loops) and not sweep.start and not split_row(frame) and all(
            not lp.row_reductions and not lp.stores and not lp.after
            and all(v.reduce == "sum" and v.layout == program.col for v in lp.col_reductions)
            for lp in sweep.loops)
        for p, lp in enumerate(sweep.loops):
            setup, body, flush = [], [], []
            # independent accumulators for a row's reductions where the pass does little else per
            # vector (a pass adding up columns too spends its time on the partial sums' memory); a
            # pass over a block of rows is unrolled as much (its vectors of columns are independent)
            lanes = LANES if (lp.row_reductions and not lp.col_reductions) or blocked else 1
            for v in lp.row_reductions:
                setup.append(f"{_accumulator(v, vals, program)}<scalar_t> acc_{v.name}[{lanes}];")
            # full-size values are inlined, and cse shares what they have in common
            narrow = [v for v in lp.col_reductions if not v.wide]
            exprs = [_inline_full(v.expr, vals, program.full) for v in lp.row_reductions + narrow] + \
                    [_inline_full(vals[x].expr, vals, program.full) for _, x in lp.stores]
            temps, printed = _cse_lines(exprs, vp, f"e{p}")
            body += temps
            it = iter(printed)
            for v in lp.row_reductions:
                text = next(it)
                if v.reduce == "sum":  # the lanes past the row's end add nothing
                    body.append(f"acc_{v.name}[lane].add(Vec::set(Vec(scalar_t(0)), {text}, cnt));")
                else:  # the lanes past the row's end are -inf
                    body.append(f"acc_{v.name}[lane].add(Vec::set(Vec(-std::numeric_limits<scalar_t>::infinity()), "
                                f"{text}, cnt));")
            # a row's maximum leaves NaN aside and adds its values into a probe (``DeriveRowMax``):
            # where a probe is NaN the maximum runs again (``exact``), its maps alone, NaN winning
            maxes = [v for v in lp.row_reductions if v.reduce != "sum"]
            exact = []
            if maxes:
                temps, printed = _cse_lines([_inline_full(v.expr, vals, program.full) for v in maxes], vp, f"x{p}")
                exact = temps + [f"acc_{v.name}[lane].add_exact(Vec::set(Vec(-std::numeric_limits<scalar_t>::infinity()), "
                                 f"{text}, cnt));" for v, text in zip(maxes, printed)]
            for v in lp.col_reductions:
                q = f"part_{v.name}.data() + chunk*{numel(v.layout, frame)} + {names.flat(v.layout, 'col')}"
                if blocked:
                    setup.append(f"{_accumulator(v, vals, program)}<scalar_t> block_{v.name};")
                    flush.append(f"block_{v.name}.add_to({q}, cnt);")
                if v.wide:
                    wide = WidePrinter(names)._print(_inline_full(v.expr, vals, program.full))
                    adding = f"block_{v.name}.add_wide(cnt, " if blocked else f"derive_add_wide<scalar_t>({q}, cnt, "
                    body.append(f"{adding}[&](int64_t h, int64_t m) __attribute__((always_inline)) {{ return {wide}; }});")
                    continue
                text = next(it)
                if blocked:
                    body.append(f"block_{v.name}.add({text});")
                elif v.reduce == "sum":
                    body.append(f"derive_add_to({q}, {text}, cnt);")
                else:
                    body.append(f"{{ ({text}).store(buf); double* q = {q}; for (int64_t l = 0; l < cnt; ++l) "
                                f"q[l] = derive_max(q[l], static_cast<double>(buf[l])); }}")
            for tensor, x in lp.stores:
                body.append(f"({next(it)}).store(o_{tensor} + row*{cols_size} + col, cnt);")
            after = [line for step in lp.after for line in row_step(step, names, sp_)]
            loops.append(dict(setup=setup, body=body, after=after, flush=flush, index=p, lanes=lanes, exact=exact,
                              maxes=[v.name for v in maxes]))
        steps = sweep.start + [s for lp in sweep.loops for s in lp.after]
        accumulated = [x for lp in sweep.loops for x in lp.col_reductions] + \
                      [step.value for step in steps if step.kind == "accumulate"]
        chunk_start = []
        for v in accumulated:
            size = numel(v.layout, frame)
            partials.append(f"std::vector<double>& part_{v.name} = derive_scratch({len(slots)}, "
                            f"{'chunks' if size == '1' else f'chunks*{size}'});")
            chunk_start.append(f"std::fill(part_{v.name}.data() + chunk*{size}, part_{v.name}.data() + (chunk + 1)*{size}, "
                               f"{'0.0' if v.reduce == 'sum' else '-INFINITY'});")
            slots.append(v.name)
        start = split_row(frame) + [line for step in sweep.start for line in row_step(step, names, sp_)]
        local, (chunk_start, start, *parts) = _localized(
            [chunk_start, start] + [lp[key] for lp in loops for key in LOOP_LINES])
        for lp in loops:
            lp.update(zip(LOOP_LINES, parts[:len(LOOP_LINES)]))
            parts = parts[len(LOOP_LINES):]
        if blocked:
            loops[0]["body"] = _prefetching(loops[0]["body"], "derive_block_rows") + loops[0]["body"]
        elif len(loops) > 1:
            loops[-1]["body"] = _prefetching(loops[0]["body"]) + loops[-1]["body"]
        sweeps.append(dict(before=finalize(sweep.before, k), partials=partials, start=start, loops=loops, index=k,
                           local=local, chunk_start=chunk_start, blocked=blocked))
    tail = finalize(program.tail, len(program.sweeps))
    allocations = []
    for t, v in program.outputs:
        size = numel(t.layout, frame)
        fill = "at::zeros" if vals[v].expr == 0 and not vals[v].reduce else "at::empty"
        dtype = ".dtype(at::kDouble)" if t.double else ""
        allocations.append((t.name, f"{fill}({{{size}}}, t_{first_float.name}.options(){dtype})",
                            "double" if t.double else "scalar_t"))
    args = [(t.name, "const int64_t" if t.labels else "const double" if t.double else "const scalar_t")
            for t in program.inputs]
    # a label is a column read and written at its row: one outside the columns is memory out of
    # bounds, whatever the wrapper's input checks (``check_inputs(False)``) did
    labels = [(t.name, cols_size, frame[-1]) for t in program.inputs if t.labels]
    return dict(name=program.name, args=args, constants=[f"k_{c}" for c in program.scalars],
                sizes=[f"sz_{s}" for s in sizes or frame], rows=rows_size, cols=cols_size,
                kept=[f"std::vector<double> kr_{n}({rows_size});" for n in kept],
                allocations=allocations, sweeps=sweeps, tail=tail, dispatch=first_float.name, slots=len(slots),
                labels=labels, layer=kernel.name,
                outputs=[t.name for t, _ in program.outputs])


def _symbols(expr: sp.Expr) -> set:
    return {s.name for s in expr.free_symbols if isinstance(s, sp.Symbol)}


class _DriverNames:
    """Sizes and constants, the only symbols a product's scale reads (``stages.define``)."""

    def __init__(self, kernel):
        self.constants = {c: f"k_{c}" for c in kernel.layer.constants}

    def scalar(self, name: str, col: str) -> str:
        return self.constants.get(name, f"static_cast<double>(sz_{name})")


# a staged driver in C++: tensors ``t_<name>``, ``at::mm`` of ``view({sizes})``s
CPP_SPELLING = Spelling(tensor="t_{}", view="{tensor}.view({{{shape}}})",
                        product="at::Tensor {out} = at::mm({left}, {right});", scaled="{out}.mul_({scale});",
                        call="at::Tensor {out} = {function}({args})[0];", comment="// {text}", mm="at::mm")


def staged_context(staged: Staged, plan: Plan, kernel) -> dict:
    """The function that runs a staged forward or backward (``stages.py``) step by step: each
    product an ``at::mm`` of two views (torch's BLAS), each loop program a call of its function."""
    context = driver_context(staged, plan, kernel, CPP_SPELLING, ScalarPrinter(_DriverNames(kernel)))
    context["args"] = [(name, "") for name in context["args"]]
    return context


def render_source(plan: Plan, kernel) -> str:
    """The C++ of one layer's forward and backward (a namespace of its own, no includes: the
    module's loader compiles every layer of its folder as one translation unit). A staged plan
    (``stages.py``) prints each loop program as a function and a driver of its steps."""
    programs, drivers = contexts(plan, kernel, program_context, staged_context)
    context = dict(layer=kernel.name, programs=programs, drivers=drivers, chunks=CHUNKS, block_rows=BLOCK_ROWS,
                   slots=max([1] + [p["slots"] for p in programs]))
    return environment().get_template("native_kernel.cpp.j2").render(**context)


__all__ = ["render_source", "ScalarPrinter", "VectorPrinter", "CHUNKS"]
