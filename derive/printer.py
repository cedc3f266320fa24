"""Print element-wise formulas as vectorized torch code.

Every tensor in a generated backward is laid out in the layer's *frame*: one axis per declared
dimension, in declaration order, size 1 where a tensor does not vary (keepdim layout). Broadcasting
is then always right, and most tensors already have that layout and print bare (``gamma``
of shape ``(d,)`` broadcasts as ``(1, d)``). An element ``T[i_n, i_d]`` prints as ``T`` viewed
into the frame; ``Red(body, j)`` prints the body with ``j`` on its dimension's axis and sums that
axis with ``keepdim=True``; ``KroneckerDelta(i_k, y[i_n])`` prints as a one-hot of the labels.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.pytorch import TorchPrinter

from .backends import number_text
from .errors import DerivationError
from .symbolic import AxisMax, AxisSum, IsArgmax, Max, Red, extent


def _is_indicator(expr: sp.Expr) -> bool:
    """A function of label-against-value comparisons only (``1 - KroneckerDelta(c, y[i])``): a mask."""
    deltas = [d for d in expr.atoms(sp.KroneckerDelta) if not any(isinstance(a, sp.Idx) for a in d.args)]
    if not deltas:
        return False
    inside = set().union(*[d.free_symbols for d in deltas])
    return expr.free_symbols <= inside and not expr.atoms(Red)


def _masked_count_factor(expr: sp.Mul):
    """The mask factor of a product ``mask_i * .../count`` whose divisor counts masked rows (a sum of
    the same kind of comparison), else None."""
    mask = next((f for f in expr.args if _is_indicator(f)), None)
    if mask is None:
        return None
    for f in expr.args:
        if isinstance(f, sp.Pow) and f.exp.is_negative and any(
                any(_is_indicator(d) for d in r.body.atoms(sp.KroneckerDelta)) for r in f.base.atoms(Red)):
            return mask
    return None


class Frame:
    """Which axis each index lives on, for one expression being printed."""

    def __init__(self, dims: list[sp.Symbol], slots: dict | None = None):
        self.dims = list(dims)
        self.slots = dict(slots or {})  # Idx -> axis

    def with_bound(self, j: sp.Idx, body: sp.Expr) -> tuple["Frame", int]:
        """A frame where the bound index ``j`` sits on its dimension's axis."""
        axis = self.dims.index(extent(j))
        clash = [i for i, a in self.slots.items() if a == axis and i in body.free_symbols and i != j]
        if clash:
            reader = next((str(e.base) for e in body.atoms(sp.Indexed) if clash[0] in e.indices), "")
            raise DerivationError("", f"the reduction over {j} also reads {clash[0]} of the same size",
                                  "this contraction needs einsum, which the fused printer does not emit yet",
                                  tensor=reader)
        slots = {i: a for i, a in self.slots.items() if a != axis}
        slots[j] = axis
        return Frame(self.dims, slots), axis


class KernelPrinter(TorchPrinter):
    """SymPy's torch printer, plus tensors laid out in a frame, reductions and one-hots."""

    full_rank = False  # print every tensor with the frame's rank (set inside reductions)

    def __init__(self, frame: Frame, shapes: dict[str, tuple], names: dict[sp.Symbol, str], dtype_of: str = ""):
        super().__init__({"strict": False})
        self.frame = frame
        # A one-hot is an integer tensor; times a Python number it would become torch's default
        # dtype, so it is cast to the dtype of this tensor (the upstream gradient).
        self.dtype_of = dtype_of
        self.shapes = shapes  # tensor name -> its shape in sizes (1 for kept axes)
        self.names = names  # size symbol -> its variable in the generated code

    # -- scalars ----------------------------------------------------------------------------
    def _print(self, expr, **kwargs):
        # a function of numbers (``log(2)`` left where a constant factor cancelled) is a Python
        # float: ``torch.log(2)`` would refuse the int
        if isinstance(expr, sp.Function) and expr.is_number:
            return sp.pycode(expr)
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, expr):
        return self.names.get(expr, expr.name)

    def _print_Idx(self, expr):
        raise DerivationError("", f"index {expr} is used outside an element", "report this as a bug")

    def _print_Rational(self, expr):
        return number_text(expr)

    def _print_Pow(self, expr, rational=False):
        base, e = expr.as_base_exp()
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
        if e == -1:
            return f"1/{b}"
        if e == sp.Rational(1, 2):
            return f"torch.sqrt({self._print(base)})" if self._is_tensor(base) else f"math.sqrt({self._print(base)})"
        if e == sp.Rational(-1, 2) and self._is_tensor(base):
            return f"torch.rsqrt({self._print(base)})"
        if e.is_negative:
            return f"1/{self.parenthesize(base ** -e, sp.printing.precedence.PRECEDENCE['Mul'])}"
        return f"{b}**{self.parenthesize(e, sp.printing.precedence.PRECEDENCE['Pow'])}"

    def _is_tensor(self, expr) -> bool:
        return bool(expr.atoms(sp.Indexed)) or any(
            str(s) in self.shapes for s in expr.free_symbols)

    # -- tensors ----------------------------------------------------------------------------
    def _inner(self, frame: Frame) -> "KernelPrinter":
        return KernelPrinter(frame, self.shapes, self.names, self.dtype_of)

    def _print_Indexed(self, expr):
        """``x[i_n, y[i_n]]``, a tensor read at labels along a later axis, is a ``gather``."""
        picked = [(k, ix) for k, ix in enumerate(expr.indices) if isinstance(ix, sp.Indexed)]
        if not picked or [k for k, _ in picked] == [0]:  # a table read at labels prints as ``w[y]``
            return self._print_element(expr)
        if len(picked) > 1:
            raise DerivationError("", f"{expr} is read at two label positions", "pick with one label tensor at a time",
                                  tensor=str(expr.base))
        position, labels = picked[0]
        size = self.shapes[str(expr.base)][position]
        axis = self.frame.dims.index(size)
        own = sp.Idx("_gathered", size)
        table = self._inner(Frame(self.frame.dims, {**self.frame.slots, own: axis}))
        table_code = table._print(expr.base[tuple(own if k == position else ix for k, ix in enumerate(expr.indices))])
        rank = len(self.frame.dims)
        label_axes = [self.frame.slots[i] for i in labels.indices if isinstance(i, sp.Idx)]
        table_axes = [self.frame.slots[i] for i in expr.indices if isinstance(i, sp.Idx) and i in self.frame.slots]
        target = [self._print(self.frame.dims[k]) if k in label_axes else "1" for k in range(rank)]
        index_code = f"{labels.base}.view({', '.join(target)})"
        if set(table_axes) - set(label_axes):
            full = [self._print(self.frame.dims[k]) if k in table_axes else "1" for k in range(rank)]
            index_code += f".expand({', '.join(full)})"
        if not table_code.isidentifier():
            table_code = f"({table_code})"
        if set(label_axes) - set(table_axes):  # a table broadcast along the labels' axes (a (1, k) row)
            sizes = [self._print(self.frame.dims[k]) if k in label_axes else "-1" for k in range(rank)]
            table_code += f".expand({', '.join(sizes)})"
        return f"{table_code}.gather({axis}, {index_code})"

    def _print_element(self, expr):
        """A tensor read at frame indices (or a table at labels), laid out in the frame."""
        if expr.indices and isinstance(expr.indices[0], sp.Indexed):
            return self._print_lookup(expr)
        name = str(expr.base)
        shape = self.shapes[name]
        axes = []
        for size, index in zip(shape, expr.indices):
            if size == 1 or index == 0:
                continue
            if not isinstance(index, sp.Idx) or index not in self.frame.slots:
                raise DerivationError("", f"{expr} is read at a computed position",
                                      "gather-style reads are not vectorized yet", tensor=name)
            axes.append(self.frame.slots[index])
        return self._layout(name, shape, axes)

    def _contraction(self, body, bound: list[int]):
        """A sum of a product of tensors that do not share all their axes (``sum_o dout[n, o]*W[i, o]``)
        is a contraction: ``torch.einsum('no,io->ni', dout, W)``, never the broadcast product
        (n x i x o elements). Returns None for anything else (a sum of one tensor, of an elementwise
        product of same-shaped tensors, or with a factor that is not a plain tensor or a scalar)."""
        tensors, scalars = [], []
        for f in sp.Mul.make_args(body):
            if isinstance(f, sp.Indexed) and not isinstance(f.indices[0], sp.Indexed):
                tensors.append(f)
            elif f.atoms(sp.Indexed) or any(isinstance(s, sp.Idx) for s in f.free_symbols) or f.atoms(Red):
                return None
            else:
                scalars.append(f)
        if len(tensors) < 2:
            return None
        # subscripts named after the dimensions (``'no,ni->io'``) when their initials differ
        initials = [str(d)[0].lower() for d in self.frame.dims]
        distinct = len(set(initials)) == len(initials) and all(c.isalpha() for c in initials)
        letters, operands, axes_of = initials if distinct else "abcdefghijklmnopqrstuvwxyz", [], []
        for t in tensors:
            shape = self.shapes[str(t.base)]
            if any(s == 1 for s in shape) or not all(isinstance(i, sp.Idx) and i in self.frame.slots for i in t.indices):
                return None
            axes_of.append([self.frame.slots[i] for i in t.indices])
            operands.append(str(t.base))
        every = set().union(*map(set, axes_of))
        if any(set(a) == every for a in axes_of):
            return None  # an elementwise product of same-shaped tensors: print the plain sum
        out_axes = sorted(every - set(bound))
        spec = ",".join("".join(letters[k] for k in a) for a in axes_of) + "->" + "".join(letters[k] for k in out_axes)
        code = self._layout(f"torch.einsum('{spec}', {', '.join(operands)})", tuple(self.frame.dims[k] for k in out_axes),
                            out_axes)
        if scalars:
            code = f"{self._print(sp.Mul(*scalars))}*{code}"
        return code

    def _print_lookup(self, expr):
        """``w[y[i_n]]`` (a table read at labels) prints as ``w[y]``: the labels' axes, then the
        table's remaining axes, laid out in the frame like any tensor."""
        labels, rest = expr.indices[0], expr.indices[1:]
        table_shape = self.shapes[str(expr.base)]
        if any(not isinstance(i, (sp.Idx, sp.Integer)) for i in (*labels.indices, *rest)):
            raise DerivationError("", f"{expr} is read at a computed position", "only table[labels] reads are vectorized",
                                  tensor=str(expr.base))
        shape = tuple(self.shapes[str(labels.base)]) + tuple(table_shape[1:])
        indices = tuple(labels.indices) + tuple(rest)
        axes = [self.frame.slots[i] for s, i in zip(shape, indices) if s != 1 and i != 0]
        return self._layout(f"{expr.base}[{labels.base}]", shape, axes)

    def _layout(self, name: str, shape: tuple, axes: list[int]) -> str:
        """``name`` viewed so that its varying axes sit on ``axes`` of the frame."""
        if axes != sorted(axes):
            raise DerivationError("", f"{name} would need its axes permuted", "transposed reads are not vectorized yet",
                                  tensor=name)
        rank = len(self.frame.dims)
        target = [1] * rank
        varying = [s for s in shape if s != 1]
        for axis, size in zip(axes, varying):
            target[axis] = size
        padded = list(_padded(shape, rank))
        # inside a reduction every tensor keeps the frame's rank: ``w.sum(1)`` of a (k,) vector
        # would name an axis it does not have
        if len(shape) <= rank and _broadcasts_as(padded, target) and not (self.full_rank and len(shape) < rank):
            return name
        sizes = ", ".join(self._print(s) for s in target)
        return f"{name}.view({sizes})"

    def _lower_rank(self, body: sp.Expr) -> bool:
        """True when every tensor ``body`` reads has fewer axes than the frame: its sum must then
        view them into the frame (``w.view(1, k).sum(1)``), or it would name an axis they lack."""
        rank = len(self.frame.dims)
        elements = body.atoms(sp.Indexed)
        shapes = ([self.shapes[s.name] for s in temporaries(body, self.shapes)]
                  + [self.shapes[str(e.base)] for e in elements])
        return bool(elements) and all(len(shape) < rank for shape in shapes)  # a 0-d temporary is lower too

    def _print_Red(self, expr):
        # nested sums over several axes are one torch reduction (pairwise summation over all of
        # them: more accurate in float32 than summing axis after axis, and one pass)
        frame, axes = self.frame, []
        while isinstance(expr, Red):
            frame, axis = frame.with_bound(expr.index, expr.body)
            axes.append(axis)
            expr = expr.body
        return self._reduce_body(KernelPrinter(frame, self.shapes, self.names, self.dtype_of), expr, axes)

    _print_GroupedRed = _print_Red  # SymPy's dispatch does not pass a renamed subclass to its parent's method

    def _reduce_body(self, inner: "KernelPrinter", body: sp.Expr, axes: list[int], method: str = "sum") -> str:
        """``body``, printed by ``inner`` (whose frame holds the bound axes), reduced over ``axes``."""
        if method == "sum":
            contraction = inner._contraction(body, axes)
            if contraction is not None:
                return contraction
        inner.full_rank = self._lower_rank(body)
        text = inner._print(body)
        if not text.isidentifier():
            text = f"({text})"
        where = str(axes[0]) if len(axes) == 1 else str(tuple(sorted(axes)))
        return f"{text}.{method}({where}, keepdim=True)"

    def _print_Mul(self, expr):
        indicator = _masked_count_factor(expr)
        if indicator is not None:
            # a row a mask leaves out gets exactly 0, also when the mask leaves out every row and its
            # count is 0 (0/0): the mean over no rows contributes nothing, as in torch's own losses
            return f"torch.where({self._print(indicator)} != 0, {self._print_product(expr)}, 0)"
        return self._print_product(expr)

    def _print_product(self, expr):
        # a sum divided by the number of its terms reads as the mean it is
        factors = list(expr.args)
        for r in factors:
            if not isinstance(r, Red) or isinstance(r.body, Red):
                continue
            inverse = 1 / extent(r.index)
            if inverse not in factors:
                continue
            total = self._print_Red(r)
            head, dot, tail = total.rpartition(".sum(")
            if not dot or not tail.endswith(", keepdim=True)"):
                continue  # a contraction (einsum): left as a sum
            mean = f"{head}.mean({tail}"
            rest = list(factors)
            rest.remove(r)
            rest.remove(inverse)
            rest = sp.Mul(*rest)
            sign = ""
            if rest.could_extract_minus_sign():
                sign, rest = "-", -rest
            if rest == 1:
                return f"{sign}{mean}"
            return f"{sign}{self.parenthesize(rest, sp.printing.precedence.PRECEDENCE['Mul'], strict=True)}*{mean}"
        return super()._print_Mul(expr)

    def _print_Add(self, expr, order=None):
        """Positive terms first, so a difference reads ``probs - onehot``."""
        return self._add_terms(sorted(expr.as_ordered_terms(), key=lambda t: t.could_extract_minus_sign()))

    def _add_terms(self, terms: list) -> str:
        """``terms`` added left to right, in this order (Python's, and so torch's, order)."""
        text = self._print(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                text += " - " + self.parenthesize(-t, sp.printing.precedence.PRECEDENCE["Add"])
            else:
                text += " + " + self.parenthesize(t, sp.printing.precedence.PRECEDENCE["Add"])
        return text

    def _print_KroneckerDelta(self, expr):
        a, b = expr.args
        if not isinstance(a, sp.Idx) and not isinstance(b, sp.Idx):
            # a label against a number (``keep = y != ignore_index``): a mask in the gradient's dtype
            labels, value = (a, b) if isinstance(a, sp.Indexed) else (b, a)
            mask = f"({self._print(labels)} == {self._print(value)})"
            return f"{mask}.to({self.dtype_of}.dtype)" if self.dtype_of else mask
        if isinstance(a, sp.Indexed):
            a, b = b, a
        if not (isinstance(a, sp.Idx) and isinstance(b, sp.Indexed)):
            raise DerivationError("", f"{expr} compares two positions", "only label one-hots are vectorized")
        labels_axes = [self.frame.slots[i] for i in b.indices if isinstance(i, sp.Idx)]
        axis = self.frame.slots[a]
        name = str(b.base)
        if labels_axes + [axis] == sorted(labels_axes + [axis]) and axis == max(labels_axes + [axis]):
            # a comparison, not F.one_hot: torch.func.vmap cannot batch F.one_hot's check of the values
            code = f"({name}.unsqueeze(-1) == torch.arange({self._print(extent(a))}, device={name}.device))"
            if self.dtype_of:
                code += f".to({self.dtype_of}.dtype)"
            rank = len(self.frame.dims)
            used = labels_axes + [axis]
            if used == list(range(rank - len(used), rank)):
                return code
            target = [self._print(self.frame.dims[k]) if k in used else "1" for k in range(rank)]
            return f"{code}.view({', '.join(target)})"
        raise DerivationError("", f"{expr} needs the class axis before the label axes", "reorder the dimensions")

    def _print_Sigmoid(self, expr):
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_Softplus(self, expr):
        return f"F.softplus({self._print(expr.args[0])})"

    def _print_Relu(self, expr):
        return f"torch.relu({self._print(expr.args[0])})"

    def _print_Step(self, expr):
        # a bool mask cast to the gradient's dtype: 1 where the argument is positive, 0 at 0 (as torch)
        mask = f"({self._print(expr.args[0])} > 0)"
        return f"{mask}.to({self.dtype_of}.dtype)" if self.dtype_of else mask

    def _print_Max(self, expr):
        raise DerivationError("", "a maximum left in a backward formula", "report this as a bug")

    def _print_IsArgmax(self, expr):
        """The one-hot of the maximum's position along the axis of ``j``: torch's ``max(dim)``
        routes the gradient to the one index it returns, and so does this (the first maximum)."""
        j, m = expr.args
        if not isinstance(m, Max) or j not in self.frame.slots:
            raise DerivationError("", "the gradient flows through max() at a position the fused printer "
                                  "cannot lay out", "mark the layer fused = False for the step-by-step backward")
        frame, axis = self.frame.with_bound(m.index, m.body)
        inner = KernelPrinter(frame, self.shapes, self.names, self.dtype_of)
        inner.full_rank = self._lower_rank(m.body)
        body = inner._print(m.body)
        if not body.isidentifier():
            body = f"({body})"
        return f"torch.zeros_like({body}).scatter_({axis}, {body}.argmax({axis}, keepdim=True), 1.0)"


class ForwardPrinter(KernelPrinter):
    """Prints forward values: sums and maxima as written, one statement at a time, and (with
    ``inplace``) results written into temporaries that die at this line."""

    _UNARY = {sp.exp: "exp", sp.log: "log", sp.tanh: "tanh"}

    def __init__(self, frame: Frame, shapes: dict, names: dict, reusable: set = frozenset(), inplace: bool = True,
                 dtype_of: str = "", computed: set = frozenset()):
        super().__init__(frame, shapes, names, dtype_of)
        self.reusable = set(reusable)  # temporaries that may be overwritten by this statement
        self.inplace = inplace
        self.computed = set(computed)  # temporaries holding a function of values (added last in a sum)

    def _inner(self, frame: Frame) -> "ForwardPrinter":
        return ForwardPrinter(frame, self.shapes, self.names, inplace=self.inplace, dtype_of=self.dtype_of,
                              computed=self.computed)

    def statement(self, expr: sp.Expr) -> str:
        """The right-hand side of one statement, updating a dying temporary in place if one fits
        (``self.updated`` then names it)."""
        self.updated = None
        for target in sorted(self.reusable):
            self.updated = target
            symbol = sp.Symbol(target)
            if isinstance(expr, sp.Mul) and symbol in expr.args:
                rest = expr / symbol
                base, e = rest.as_base_exp()
                if e == -1:
                    return f"{target}.div_({self._print(base)})"
                return f"{target}.mul_({self._print(rest)})"
            if isinstance(expr, sp.Add) and symbol in expr.args:
                rest = expr - symbol
                if rest.could_extract_minus_sign():
                    return f"{target}.sub_({self._print(-rest)})"
                return f"{target}.add_({self._print(rest)})"
            if type(expr) in self._UNARY and expr.args[0] == symbol:
                return f"{target}.{self._UNARY[type(expr)]}_()"
        self.updated = None
        return self._print(expr)

    def into(self, expr: sp.Expr, buffer: str) -> str | None:
        """``expr`` computed into the existing tensor ``buffer`` (``torch.mul(a, b, out=buffer)``),
        or None when its outermost operation has no such form."""
        out = f"out={buffer}"
        if isinstance(expr, sp.Add):
            text = self._print_Add(expr)
            if text.startswith("torch.addcmul("):
                return f"{text[:-1]}, {out})"
            first, rest = expr.as_two_terms()
            if not self._is_tensor(first):
                first, rest = rest, first
            if rest.could_extract_minus_sign():
                return f"torch.sub({self._print(first)}, {self._print(-rest)}, {out})"
            return f"torch.add({self._print(first)}, {self._print(rest)}, {out})"
        if isinstance(expr, sp.Mul):
            first, rest = expr.as_two_terms()
            if not self._is_tensor(first):
                first, rest = rest, first
            return f"torch.mul({self._print(first)}, {self._print(rest)}, {out})"
        if isinstance(expr, sp.Pow) and expr.exp == 2:
            base = self._print(expr.base)
            return f"torch.mul({base}, {base}, {out})"
        if type(expr) in self._UNARY:
            return f"torch.{self._UNARY[type(expr)]}({self._print(expr.args[0])}, {out})"
        return None

    def _print_Function(self, expr):
        # f(a - b) computes a - b into a fresh buffer; apply f there instead of allocating again
        op = self._UNARY.get(type(expr))
        arg = expr.args[0] if expr.args else None
        if self.inplace and op and isinstance(arg, (sp.Add, sp.Mul)) and self._is_tensor(arg):
            return f"({self._print(arg)}).{op}_()"
        return super()._print_Function(expr)

    def _print_Add(self, expr, order=None):
        # c + a*b in one pass over memory instead of two
        for term in expr.as_ordered_terms():
            coeff, factors = term.as_coeff_mul()
            tensors = [f for f in factors if self._is_tensor(f)]
            if len(tensors) == 2 and len(factors) == 2 and term != expr and self._is_tensor(expr - term):
                rest = self._print(expr - term)
                a, b = (self._print(f) for f in tensors)
                value = "" if coeff == 1 else f", value={self._print(coeff)}"
                return f"torch.addcmul({rest}, {a}, {b}{value})"
        return self._add_terms(sorted(expr.as_ordered_terms(), key=lambda t: _last_in_a_sum(t, self.computed)))

    def _print_AxisSum(self, expr):
        # a sum over every axis (``x.sum()``, ``x.mean()``) is one torch reduction, as the spec's
        # is: summing axis after axis rounds like a plain running sum down the first axis, several
        # times the error of torch's pairwise summation over all of them
        # (a mean's division by each extent is taken out and done after the sum)
        frame, axes, body, scale = self.frame, [], expr, sp.Integer(1)
        while isinstance(body, AxisSum):
            frame, axis = frame.with_bound(body.index, body.body)
            axes.append((body.index, axis))
            body = body.body
            if isinstance(body, sp.Mul):
                sums = [f for f in body.args if isinstance(f, AxisSum)]
                if len(sums) == 1 and self._is_size(body / sums[0]):
                    scale, body = scale * body / sums[0], sums[0]
        # only a sum over every axis: a spec reduces several axes at once only with ``.sum()`` (a
        # partial one is written axis by axis, and then rounds as written)
        if len(axes) == len(self.frame.dims) > 1 and all(self._varies_along(body, j, axis) for j, axis in axes):
            total = self._reduce_body(self._inner(frame), body, [axis for _, axis in axes], "sum")
            numerator, denominator = sp.fraction(scale)
            if numerator != 1:
                total = f"{self.parenthesize(numerator, sp.printing.precedence.PRECEDENCE['Mul'], strict=True)}*{total}"
            for d in sp.Mul.make_args(denominator) if denominator != 1 else ():
                total = f"{total}/{self.parenthesize(d, sp.printing.precedence.PRECEDENCE['Mul'], strict=True)}"
            return total
        # otherwise axis by axis, in the spec's order (the forward's rounding is the spec's)
        return self._reduce(expr, "sum")

    def _print_AxisMax(self, expr):
        return self._reduce(expr, "amax")

    def _is_size(self, factor: sp.Expr) -> bool:
        """Whether ``factor`` is a number or a function of the sizes alone (no element, no temporary)."""
        return not factor.atoms(sp.Indexed, sp.Idx) and not temporaries(factor, self.shapes) and not factor.has(AxisSum, AxisMax)

    def _reduce(self, expr, method: str) -> str:
        frame, axis = self.frame.with_bound(expr.index, expr.body)
        if not self._varies_along(expr.body, expr.index, axis):
            # a body that simplified to a value constant along the axis (``(v - v).exp().sum(1)``
            # reads a (n, 1) temporary): summing its one entry would miss the other k - 1
            return self._print(expr.body * extent(expr.index) if method == "sum" else expr.body)
        return self._reduce_body(self._inner(frame), expr.body, [axis], method)

    def _varies_along(self, body: sp.Expr, j: sp.Idx, axis: int) -> bool:
        """Whether ``body`` reads an element at ``j`` or a temporary that is not size 1 on ``axis``."""
        if j in body.free_symbols:
            return True
        rank = len(self.frame.dims)
        for s in temporaries(body, self.shapes):
            shape = self.shapes[s.name]
            if len(shape) > rank or _padded(shape, rank)[axis] != 1:
                return True
        return False


def _last_in_a_sum(term: sp.Expr, computed: set = frozenset()) -> tuple:
    """Where a forward value's term goes in its sum: the values read as they are first, then the
    functions computed from them. Terms of one scale cancel before a small one is added:
    ``logits[y] - logit_maxes - log(counts_sum)`` is exact to float32 at logits of 1e6, where
    ``logits[y] - log(counts_sum) - logit_maxes`` rounds ``log(counts_sum)`` away. Positive terms
    first within each group. ``computed`` names the temporaries that hold such functions."""
    function = any((isinstance(f, sp.Function) and not isinstance(f, (AxisSum, AxisMax)))
                   or (isinstance(f, sp.Symbol) and f.name in computed) for f in sp.preorder_traversal(term))
    return function, term.could_extract_minus_sign()


def temporaries(expr: sp.Expr, shapes: dict) -> list[sp.Symbol]:
    """The named tensors (saved values, shared temporaries) ``expr`` reads as whole symbols, by
    their names in ``shapes``; the labels of indexed elements (``x`` of ``x[i, j]``) are not among them."""
    labels = {b.label for b in expr.atoms(sp.IndexedBase)}  # their elements carry their indices
    return [s for s in expr.free_symbols - labels if isinstance(s, sp.Symbol) and s.name in shapes]


def _padded(shape, rank: int) -> tuple:
    """``shape`` with leading 1s up to ``rank`` axes, as broadcasting lines it up with the frame."""
    return (1,) * (rank - len(shape)) + tuple(shape)


def _broadcasts_as(shape: list, target: list) -> bool:
    return all(s == t for s, t in zip(shape, target))


def fit_shape(code: str, layout: tuple, axes: tuple, shape: tuple, sizes) -> str:
    """``code``, a value printed in the frame ``layout`` (size 1 on the axes it does not vary on),
    given the shape ``shape``: expanded to ``axes`` (the shape's axes laid out in the frame) where
    it lacks some of them, then reshaped where the frame's rank is not the shape's
    (``(1, d)`` -> ``(d,)``). ``sizes`` prints a shape as the arguments of ``expand``/``reshape``."""
    wrapped = code if code.isidentifier() else f"({code})"
    if layout != axes:
        wrapped += f".expand({sizes(axes)})"
    if axes != shape:
        wrapped += f".reshape({sizes(shape) or '()'})"
    return code if wrapped == f"({code})" else wrapped


__all__ = ["Frame", "KernelPrinter", "ForwardPrinter", "Red", "Max", "IsArgmax", "fit_shape", "temporaries"]
