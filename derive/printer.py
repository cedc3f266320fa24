"""Print element-wise formulas as vectorized torch code.

Every tensor in a generated backward is laid out in the layer's *frame*: one axis per declared
dimension, in declaration order, size 1 where a tensor does not vary (keepdim layout). Broadcasting
is then always right, and most tensors already have that layout and print bare (``gamma``
of shape ``(d,)`` broadcasts as ``(1, d)``). An element ``T[i_n, i_d]`` prints as ``T`` viewed
into the frame; ``Red(body, j)`` prints the body with ``j`` on its dimension's axis and sums that
axis with ``keepdim=True``; ``KroneckerDelta(i_k, y[i_n])`` prints as a one-hot of the labels.
"""
from __future__ import annotations

import itertools
import re

import sympy as sp
from sympy.printing.pytorch import TorchPrinter

from .backends import CodeOps, number_text
from .errors import DerivationError
from .functions import (ACTIVATIONS, COMPARISON_MASKS, ActivationDerivative, Equal, NonNeg, Sigmoid, SplitExp, Step, Wins,
                        step_argument)
from .symbolic import (_Bound, _replace_free, AxisLogSumExp, AxisMax, AxisSoftmax, AxisSum, AxisVar, IsArgmax, IsTiedMax, Max, Red, extent,
                       free_indices, power_steps, reciprocal_integer_power, reciprocal_root_power, reciprocal_roots)


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
    """The axes a printed expression is laid out on, and which index lives on which axis.

    ``indices`` are the frame's own (one free index per axis: ``i_n, i_d`` or, with a square
    dimension, ``i_n, i_n_2, i_d``); ``dims`` their sizes. A sum's bound index is placed on an
    axis of its size that no other index of its body occupies (``with_bound``).
    """

    def __init__(self, indices: list[sp.Idx], slots: dict | None = None):
        self.indices = list(indices)
        self.dims = [extent(i) for i in self.indices]
        self.slots = dict(slots) if slots is not None else {i: k for k, i in enumerate(self.indices)}
        # the axes a full-size value varies along: all but a unit axis (a frame laid out as an
        # (n, 1) tensor is stored, ``stored_layouts``)
        self.sized = {k for k, d in enumerate(self.dims) if d != 1}

    def free_axis(self, size: sp.Expr, busy: set, prefer: sp.Idx | None = None) -> int | None:
        """An axis of ``size`` that no index in ``busy`` occupies (``prefer``'s own axis first)."""
        occupied = {a for i, a in self.slots.items() if i in busy and i != prefer}
        candidates = [k for k, d in enumerate(self.dims) if d == size and k not in occupied]
        if prefer in self.slots and self.slots[prefer] in candidates:
            return self.slots[prefer]
        return candidates[0] if candidates else None

    def with_bound(self, j: sp.Idx, body: sp.Expr) -> tuple["Frame", int]:
        """A frame where the bound index ``j`` sits on an axis of its size no other index of ``body`` uses."""
        busy = {i for i in body.free_symbols if isinstance(i, sp.Idx)} - {j}
        axis = self.free_axis(extent(j), busy, prefer=j)
        if axis is None:
            clash = next((i for i in busy if extent(i) == extent(j)), j)
            reader = next((str(e.base) for e in body.atoms(sp.Indexed) if clash in e.indices), "")
            raise DerivationError("", f"the reduction over {j} also reads {clash} of the same size",
                                  "this contraction needs einsum, which the fused printer does not emit yet",
                                  tensor=reader)
        slots = {i: a for i, a in self.slots.items() if a != axis}
        slots[j] = axis
        return Frame(self.indices, slots), axis


def stored_layouts(free: tuple, spare: list, every_order: bool = True) -> list[list]:
    """The frames that lay a value out as its node is stored (``free``: a frame index per stored
    axis, 0 for an axis of 1): the ``spare`` indices (a sum's, or the frame's others) placed on the
    axes of 1, in their own order first (and with ``every_order`` in every other), each axis of 1
    left a unit axis of its own (``_unit<k>``, of size 1), the spare indices not placed after them;
    last, every axis of 1 a unit axis. ``b.sum(0, keepdim=True)`` of an (n, 1) ``b`` in ``(i_n, 1)``
    reads ``b`` as it is, and ``2*b*dout`` in ``(i_n, _unit1)`` needs no view."""
    units = [k for k, i in enumerate(free) if i == 0]
    count = min(len(units), len(spare))
    orders = itertools.permutations(units, count) if every_order else [units[:count]]
    placements = [dict(zip(places, spare)) for places in orders]
    out = []
    for placed in placements + [{}]:
        axes = [placed.get(k, sp.Idx(f"_unit{k}", 1)) if i == 0 else i for k, i in enumerate(free)]
        axes += [i for i in spare if i not in axes]
        if axes not in out:
            out.append(axes)
    return out


def _summed(body: sp.Expr, indices: set) -> sp.Expr:
    """``body`` summed over ``indices`` (those it reads), innermost first in a fixed order."""
    for j in sorted(indices & body.free_symbols, key=lambda i: i.name):
        body = Red(body, j)
    return body


# the most matrix products one sum is multiplied out into (each of a (n x k) by (k x k) pair costs
# about what autograd's own products cost; the broadcast body they replace costs n*k*k elements)
MOST_CONTRACTIONS = 12


class KernelPrinter(TorchPrinter):
    """SymPy's torch printer, plus tensors laid out in a frame, reductions and one-hots."""

    full_rank = False  # print every tensor with the frame's rank (set inside reductions)

    def __init__(self, frame: Frame, shapes: dict[str, tuple], names: dict[sp.Symbol, str], dtype_of: str = "",
                 views: dict | None = None):
        super().__init__({"strict": False})
        # tensors stored with fewer axes than their atoms (``x`` of shape (n, d) read as (n, 2, d_2),
        # atoms.py): printed viewed into them
        self.views = views or {}
        self.frame = frame
        # A one-hot is an integer tensor; times a Python number it would become torch's default
        # dtype, so it is cast to the dtype of this tensor (the upstream gradient).
        self.dtype_of = dtype_of
        self.shapes = shapes  # tensor name -> its shape in sizes (1 for kept axes)
        self.names = names  # size symbol -> its variable in the generated code
        # saved softmax values -> the stored axis they normalize: the chain rule through one
        # prints as torch's own softmax backward (``_softmax_backward``)
        self.softmaxes: dict[str, int] = {}
        # saved log-softmax values -> the stored axis: ``a - exp(l)*sum_j a`` prints as torch's own
        # log-softmax backward (``_log_softmax_backward``)
        self.log_softmaxes: dict[str, int] = {}
        # saved tanh values, each with its place in the forward: ``g*(1 - y**2)`` prints as torch's
        # own kernel for it (``_tanh_backward``)
        self.tanhs: dict[str, int] = {}
        # saved exponentials (``v1 = A.exp()``, by the names printed): what overflows, as an ``exp``
        # the formula computes does (``upstream_first``)
        self.exponentials: frozenset = frozenset()
        # saved square roots (by the names printed) -> the tensors their argument reads: a root
        # bounds what its argument bounds (``c/v`` for ``v = sqrt(c**2 + 1)``, ``bounded_ratios``)
        self.roots: dict[str, frozenset] = {}
        # every sigmoid of the formulas is a softplus's derivative (the spec has softplus, no sigmoid):
        # ``g*sigmoid(z)`` prints as torch's own kernel for it (``_softplus_backward``)
        self.softplus_grads = False
        # the value printed is a matrix product in the spec (``c @ A``, ``v @ w``): a contraction
        # where one operand holds every index (a matrix times a vector, a dot product) is printed as
        # one too, rounding as the spec's ``@`` does (fused multiply-adds, blocked sums), not as a
        # broadcast product summed (a rounding per product: 10x autograd's error on a dot product
        # of values of 10). Elsewhere that shape of sum stays elementwise, as the spec wrote it
        # (layernorm's ``(dout*gamma).sum(1)``).
        self.products = False
        # cse's shared temporaries by name, with their values (``_written_out``)
        self.written: dict = {}

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
            # (Python's ``1/t`` is ``reciprocal(t)*1``: the same values, and a pass more over memory)
            return f"torch.reciprocal({self._print(base)})" if self._is_tensor(base) else f"1/{b}"
        if e == sp.Rational(1, 2):
            return f"torch.sqrt({self._print(base)})" if self._is_tensor(base) else f"math.sqrt({self._print(base)})"
        if e == sp.Rational(-1, 2) and self._is_tensor(base):
            return f"torch.rsqrt({self._print(base)})"
        if reciprocal_root_power(expr) and self._is_tensor(base):
            return self._whole_power(f"torch.rsqrt({self._print(base)})", reciprocal_root_power(expr))
        if reciprocal_integer_power(expr) and self._is_tensor(base):
            return self._whole_power(f"torch.reciprocal({self._print(base)})", reciprocal_integer_power(expr))
        if e.is_negative:
            return f"1/{self.parenthesize(base ** -e, sp.printing.precedence.PRECEDENCE['Mul'])}"
        if e.is_Integer and e > 3 and self._is_tensor(base) and (power_steps(int(e)) or isinstance(base, sp.Indexed)):
            return self._whole_power(b, int(e))  # (a base printed twice only where it is read, not computed)
        return f"{b}**{self.parenthesize(e, sp.printing.precedence.PRECEDENCE['Pow'])}"

    @staticmethod
    def _whole_power(b: str, m: int) -> str:
        """The tensor ``b`` (printed as a power's base) to the whole power ``m`` as squares and cubes
        (``(x**2)**2``, ``(x*((x**3)**2))``), torch's multiplications, never its per-element ``pow``
        (``symbolic.power_steps``): a rounding of half an ulp per step where ``pow`` has one, and an
        overflow only where the power itself overflows (each step is at most the whole power)."""
        steps = power_steps(m)
        if steps is None:  # 5, 7, 10: the base times the power one less
            return f"({b}*{KernelPrinter._whole_power(b, m - 1)})"
        power = f"{b}**{steps[0]}"
        for step in steps[1:]:
            power = f"({power})**{step}"  # (``x**3**2`` is x**9)
        return power

    def _is_tensor(self, expr) -> bool:
        return bool(self._tensors(expr))

    # -- tensors ----------------------------------------------------------------------------
    # what a printer knows of the derivation beyond its frame, which every printer made for the same
    # formulas carries: a sum's body printed without ``tanhs`` wrote ``(y - 1)*(y + 1)`` where the
    # same value outside it was ``tanh_backward(g, y)``, two roundings that no longer cancel
    KNOWN = ("softmaxes", "log_softmaxes", "tanhs", "exponentials", "roots", "softplus_grads", "written")

    def knowing(self, other: "KernelPrinter") -> "KernelPrinter":
        """This printer, told what ``other`` knows of the derivation (``KNOWN``)."""
        for attribute in self.KNOWN:
            setattr(self, attribute, getattr(other, attribute))
        return self

    def _inner(self, frame: Frame) -> "KernelPrinter":
        """A printer for a sub-expression laid out in ``frame`` (inside a reduction: its tensors
        keep the frame's rank where this one's do)."""
        inner = KernelPrinter(frame, self.shapes, self.names, self.dtype_of, self.views).knowing(self)
        inner.full_rank = self.full_rank
        return inner

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
        own = sp.Idx("_gathered", size)
        # the picked axis is 1 after the gather: any axis of its size the table's other indices leave free
        axis = self.frame.free_axis(size, {i for i in expr.indices if isinstance(i, sp.Idx)})
        if axis is None:
            raise DerivationError("", f"{expr} is read at labels along an axis the frame has no room for",
                                  "pick from a tensor computed on its own line", tensor=str(expr.base))
        table = self._inner(Frame(self.frame.indices, {**self.frame.slots, own: axis}))
        table_code = table._print(expr.base[tuple(own if k == position else ix for k, ix in enumerate(expr.indices))])
        rank = len(self.frame.dims)
        label_axes = [self.frame.slots[i] for i in labels.indices if isinstance(i, sp.Idx)]
        table_axes = [self.frame.slots[i] for i in expr.indices if isinstance(i, sp.Idx) and i in self.frame.slots]
        index_code = self._layout(str(labels.base), self.shapes[str(labels.base)], label_axes, full_rank=True)
        if set(table_axes) - set(label_axes):
            full = [self._print(self.frame.dims[k]) if k in table_axes or k in label_axes else "1" for k in range(rank)]
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
        if name in self.views and axes == sorted(axes):  # its atoms in order: one view into the frame
            viewed = self._layout(name, shape, axes, full_rank=True)
            return viewed if viewed != name else self.stored(name)
        return self._layout(self.stored(name), shape, axes)

    def stored(self, name: str) -> str:
        """The tensor ``name`` as its atoms: ``x.view(n, 2, d // 2)`` where a view splits its axis."""
        if name not in self.views:
            return name
        return f"{_wrap(name)}.view({', '.join(self._print(s) for s in self.views[name])})"

    def _contraction(self, body, summed: set, order: list | None = None):
        """A sum of a product of tensors that do not share all their axes (``sum_o dout[n, o]*W[i, o]``)
        is a contraction: ``dout @ W.T`` (``torch.einsum`` where it is not a matrix product), never
        the broadcast product (n x i x o elements). Laid out in the frame, or with ``order`` (indices)
        as exactly those axes. Returns None for anything else (a sum of one tensor, of an elementwise
        product of same-shaped tensors, or with a factor that is not a plain tensor or a scalar)."""
        tensors, scalars, composite = [], [], {}
        factors = sp.Mul.make_args(body)
        # tensors read at the same indices are one operand, their elementwise product: einsum over
        # ``cb,ac,ac->ab`` contracts the first two into an (k x k x n) tensor first
        def indices_of(f):
            return frozenset(i for i in f.free_symbols if isinstance(i, sp.Idx))

        # a factor read along none of the summed indices multiplies the contraction's result:
        # ``sum_c v1[a, c]*(v1[a, b]**2 - 1)*g[c, b]`` is ``(v1**2 - 1)*(v1 @ g)``; an operand of the
        # einsum, it made torch contract ``ac,ab`` into an (n x k x k) tensor first (23x autograd's time)
        outside = [f for f in factors if indices_of(f) and not indices_of(f) & set(summed)
                   and not f.atoms(*_NOT_ELEMENTWISE)]
        if outside and order is None:
            inner = self._contraction(sp.Mul(*[f for f in factors if f not in outside]), summed)
            if inner is not None:
                return f"{_wrap(self._print(sp.Mul(*outside)))}*{_wrap(inner)}"

        read_at = [indices_of(f) for f in factors if not isinstance(f, sp.Indexed) or
                   all(isinstance(i, sp.Idx) for i in f.indices)]
        for f in factors:
            if isinstance(f, sp.Indexed) and all(isinstance(i, sp.Idx) for i in f.indices) \
                    and read_at.count(indices_of(f)) > 1:
                composite.setdefault(indices_of(f), []).append(f)
            elif isinstance(f, sp.Indexed):
                tensor = self._operand(f)
                if tensor is None:
                    return None
                tensors.append(tensor)
            elif f.atoms(*_NOT_ELEMENTWISE) or any(  # a sum, or a temporary
                    isinstance(s, sp.Symbol) and s.name in self.shapes for s in _outside_elements(f)):
                return None
            elif f.atoms(sp.Indexed) or any(isinstance(s, sp.Idx) for s in f.free_symbols):
                # a factor computed from tensors (``1 - A[i, j]``): an operand of its own, with the
                # other factors on exactly its indices ((1 - A) @ (1 - A), never a k x k x k product)
                if any(not isinstance(i, sp.Idx) and i != 0 for e in f.atoms(sp.Indexed) for i in e.indices):
                    return None  # read at labels
                composite.setdefault(frozenset(i for i in f.free_symbols if isinstance(i, sp.Idx)), []).append(f)
            else:
                scalars.append(f)
        plain = len(tensors)
        for indices, factors in composite.items():
            # the axes in the order the factor reads them (``1 - A[j, l]`` is ``1 - A``, not ``(1 - A.T).T``)
            reads = [i for e in sorted(sp.Mul(*factors).atoms(sp.Indexed), key=sp.default_sort_key) for i in e.indices]
            axes = sorted(indices, key=lambda i: (reads.index(i) if i in reads else len(reads), i.name))
            inner = self._inner(Frame(axes))
            inner.full_rank = True
            tensors.append(_Operand(inner._print(sp.Mul(*factors)), tuple(axes)))
        if len(tensors) < 2:
            return None
        every = set().union(*[set(t.indices) for t in tensors])
        holds_every = [set(t.indices) == every for t in tensors]
        # a matrix times a vector is a product where the matrix is a tensor as stored; a computed
        # one (``(b**2*g + g.T)``) would be a full-size body: multiplied out it may be two products
        # (two tensors of one shape summed along some axes only are an elementwise product summed:
        # ``(dout*x).sum(0)``; along all of them, a dot product)
        matrix_vector = self.products and len(tensors) == 2 and not any(holds_every[plain:]) \
            and not (all(holds_every) and set(summed) != every)
        if (any(holds_every) and not matrix_vector) or not set(summed) <= every:
            return None  # an elementwise product of same-shaped tensors: print the plain sum
        out = [i for i in every if i not in summed]
        if any(i not in self.frame.slots for i in out):
            return None
        if order is None:
            out.sort(key=self.frame.slots.__getitem__)
        elif set(order) == set(out):
            out = list(order)
        else:
            return None
        code = _product(tensors, out, self._index_letters(every))
        if order is None:
            code = self._layout(code, tuple(extent(i) for i in out), [self.frame.slots[i] for i in out])
            code = _wrap(code)  # ``a*(dout @ W.T)``: @ binds no tighter than *
        return self._scaled(code, scalars)

    def _contractions(self, body, summed: set):
        """A sum of a sum of contractions (``sum_r (A[r, i] - 1)*g[r, j] + A[j, r]*g[i, r]``, the
        gradient of ``(1 - A) @ (1 - A)``) as the sum of their matrix products, never the broadcast
        products; None where a term is not a contraction over all of ``summed``."""
        if not isinstance(body, sp.Add):
            return None
        terms = [self._contraction(t, summed) for t in body.args]
        if any(t is None for t in terms):
            return None
        return f"({' + '.join(terms)})"  # one operand of whatever multiplies the sum

    def _distributed_contractions(self, body, summed: set):
        """A sum that holds contractions once its sums are multiplied out and the factors free of the
        summed indices are taken out of each term: ``sum_j (b[j]**2*g[j, i] + 3*b[i]**2*g[i, j])*b[j]``,
        the gradient of the outer product ``b**3 @ b.T``, is ``3*b**2*(g @ b) + g.T @ b**3``, two
        matrix-vector products, never the (n x n) broadcast body (15x autograd's time at n = 1024);
        the gradient of ``(v3 + v4 - log(s))*v3).T @ v4`` has nine such terms in three groups
        (three products, where the (n x k x k) broadcast took 350x autograd's time at 1024 x 512).
        Terms with the same contraction share it; a term summed along fewer axes than the body (a
        row's dot product) is summed as written beside the products. None where a term that reads
        every axis is not a contraction, or where no term is one."""
        printed: dict = {}  # core -> its contraction's code, or None (each printed once)

        def contraction(core):
            if core not in printed:
                printed[core] = self._contraction(core, summed)
            return printed[core]

        def split(product):
            factors = sp.Mul.make_args(product)
            free = [f for f in factors if not (f.free_symbols & summed)]
            return sp.Mul(*free), sp.Mul(*[f for f in factors if f.free_symbols & summed])

        def terms(expr) -> list:
            """``expr`` as ``[(scale, core)]``, ``scale`` free of the summed indices, ``core`` a
            contraction where a sum it holds need not be multiplied out for one."""
            if isinstance(expr, sp.Add):
                return [t for a in expr.args for t in terms(a)]
            scale, core = split(expr)
            sums = [f for f in sp.Mul.make_args(core) if isinstance(f, sp.Add)]
            if not sums or contraction(core) is not None:
                return [(scale, core)]
            rest = sp.Mul(*[f for f in sp.Mul.make_args(core) if f is not sums[0]])
            return [(scale * s, c) for a in sums[0].args for s, c in terms(sp.Mul(rest, a))]

        outside, inner = split(body)
        if not isinstance(inner, sp.Add) and not any(isinstance(f, sp.Add) for f in sp.Mul.make_args(inner)) \
                and outside == 1:
            return None  # nothing taken out, nothing multiplied out: the plain contraction failed
        by_scale: dict = {}
        for scale, core in terms(inner):
            by_scale.setdefault(scale, []).append(core)
        grouped: dict = {}  # contraction -> its scales
        for scale, cores in by_scale.items():
            # the terms of one scale as one contraction where they share their tensors (as the spec
            # grouped them: ``((v3 + v4 - t1)*v3) @ dv10``, not three products added)
            shared = sp.gcd_terms(sp.Add(*cores)) if len(cores) > 1 else cores[0]
            for core in [shared] if contraction(shared) is not None else cores:
                grouped.setdefault(core, []).append(scale)
        if len(grouped) > MOST_CONTRACTIONS:
            return None
        every = {i for i in body.free_symbols if isinstance(i, sp.Idx)}
        codes, products = [], 0
        for core, scales in grouped.items():
            code = contraction(core)
            products += code is not None
            if code is None and {i for i in core.free_symbols if isinstance(i, sp.Idx)} >= every:
                return None
            if code is None:  # a sum along fewer axes than the body's (a row's dot product): as written
                code = _wrap(self._print(_summed(core, summed)))
            scale = sp.Add(*scales)
            codes.append(code if scale == 1 else self._times(scale, code))
        if not products:
            return None
        # (each code is one product: ``a + -b*c`` is ``a - b*c``)
        total = "".join(c if not k else f" - {c[1:]}" if c.startswith("-") else f" + {c}" for k, c in enumerate(codes))
        total = f"({total})" if len(codes) > 1 else codes[0]
        return total if outside == 1 else self._times(outside, total)

    def _times(self, factor, code: str) -> str:
        """``factor`` (printed in this frame) times the printed operand ``code``."""
        slot = sp.Symbol("_operand_")
        return self._print(factor*slot).replace(slot.name, code)

    def _operand(self, f: sp.Indexed):
        """A factor of a contraction as ``_Operand`` (its code and one index per axis), or None: a
        tensor read at its own indices (``W.view(t, e, h)`` where a view splits it), or a table read
        at labels (``C[X]``, indexed by the labels' indices then the table's other ones)."""
        if isinstance(f.indices[0], sp.Indexed):
            labels, rest = f.indices[0], f.indices[1:]
            shape = tuple(self.shapes[str(labels.base)]) + tuple(self.shapes[str(f.base)][1:])
            indices = tuple(labels.indices) + tuple(rest)
            code = f"{_wrap(self.stored(str(f.base)))}[{labels.base}]"
        else:
            shape, indices, code = self.shapes[str(f.base)], tuple(f.indices), self.stored(str(f.base))
        if any(s == 1 and i != 0 for s, i in zip(shape, indices)):
            return None
        if 1 in shape:  # a kept axis of size 1 takes no part: the tensor without it
            varying = [(s, i) for s, i in zip(shape, indices) if s != 1]
            code = f"{_wrap(code)}.view({', '.join(self._print(s) for s, _ in varying) or ''}{',' if len(varying) == 1 else ''})"
            indices = tuple(i for _, i in varying)
        if not indices or not all(isinstance(i, sp.Idx) for i in indices) or len(set(indices)) < len(indices):
            return None
        return _Operand(code, indices)

    def _scaled(self, code: str, scalars: list) -> str:
        """``code`` times the product of ``scalars``: ``(a @ b)/math.sqrt(d)``, ``2*(a @ b)``."""
        if not scalars:
            return code
        top, bottom = sp.fraction(sp.Mul(*scalars))
        mul = sp.printing.precedence.PRECEDENCE["Mul"]
        text = _wrap(code) if top == 1 else f"{self.parenthesize(top, mul)}*{_wrap(code)}"
        # a product of sizes below parenthesized: ``/(n*o)``, never ``/n*o`` (Python reads ``(../n)*o``)
        return text if bottom == 1 else f"{text}/{self.parenthesize(bottom, mul)}"

    def _index_letters(self, indices: set) -> dict:
        """einsum subscripts: each index by its dimension's initial where those differ, else a, b, c, ..."""
        ordered = sorted(indices, key=lambda i: (self.frame.slots.get(i, len(self.frame.dims)), i.name))
        initials = [str(extent(i))[0].lower() for i in ordered]
        if len(set(initials)) == len(initials) and all(c.isalpha() for c in initials):
            return dict(zip(ordered, initials))
        return dict(zip(ordered, "abcdefghijklmnopqrstuvwxyz"))

    def print_in_order(self, expr: sp.Expr, order: list) -> str | None:
        """``expr``, a sum that is a contraction (times numbers), with its axes exactly ``order``
        (``x.T @ dout`` for ``dW[i, o]``), or None where it is not one."""
        factors = sp.Mul.make_args(expr)
        sums = [f for f in factors if isinstance(f, (Red, AxisSum))]
        rest = [f for f in factors if not isinstance(f, (Red, AxisSum))]
        if len(sums) != 1 or not all(_is_scalar_factor(f, self.shapes) for f in rest):
            return None
        bound, red = [], sums[0]
        while isinstance(red, (Red, AxisSum)):
            bound.append(red.index)
            red = red.body
        code = self._contraction(red, set(bound), order)
        return None if code is None else self._scaled(code, rest)

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
        return self._layout(f"{_wrap(self.stored(str(expr.base)))}[{labels.base}]", shape, axes)

    def _layout(self, name: str, shape: tuple, axes: list[int], full_rank: bool = False) -> str:
        """``name`` viewed so that its varying axes sit on ``axes`` of the frame (permuted first
        where they are stored in another order: ``W.T``, ``x.permute(1, 0, 2)``)."""
        rank = len(self.frame.dims)
        target = [1] * rank
        varying = [s for s in shape if s != 1]
        for axis, size in zip(axes, varying):
            target[axis] = size
        if axes != sorted(axes):
            order = sorted(range(len(axes)), key=axes.__getitem__)
            if len(varying) != len(shape):  # drop the kept axes first: a view of any layout
                name = f"{_wrap(name)}.view({', '.join(self._print(s) for s in varying)})"
            if order == [1, 0]:
                name = f"{_wrap(name)}.T"
            else:
                name = f"{_wrap(name)}.permute({', '.join(map(str, order))})"
            shape = tuple(varying[k] for k in order)
        padded = list(_padded(shape, rank))
        # inside a reduction every tensor keeps the frame's rank: ``w.sum(1)`` of a (k,) vector
        # would name an axis it does not have
        if len(shape) <= rank and _broadcasts_as(padded, target) and not ((self.full_rank or full_rank) and len(shape) < rank):
            return name
        sizes = ", ".join(self._print(s) for s in target)
        return f"{_wrap(name)}.view({sizes})"

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
        scatter = self._index_add(expr)
        if scatter is not None:
            return scatter
        bound, body = [], expr
        while isinstance(body, Red):
            bound.append(body.index)
            body = body.body
        contraction = self._contraction(body, set(bound))  # no axis of the frame for what it sums
        if contraction is not None:
            return contraction
        contractions = self._contractions(body, set(bound))
        if contractions is not None:
            return contractions
        distributed = self._distributed_contractions(body, set(bound))
        if distributed is not None:
            return distributed
        frame, axes = self.frame, []
        while isinstance(expr, Red):
            frame, axis = frame.with_bound(expr.index, expr.body)
            axes.append(axis)
            expr = expr.body
        return self._reduce_body(self._inner(frame), expr, axes)

    def _index_add(self, expr) -> str | None:
        """``sum_{n,t} [X[n, t] == v] * g[n, t, e]``, the gradient of a table read at labels
        (``C[X]``), is ``g`` added into the rows ``X`` names: ``index_add_``, never an (v, n, t)
        one-hot. None for any other sum."""
        bound, body, outside = [], expr, []
        while True:  # sum_n f[n]*sum_t h[n, t] is sum_n sum_t f[n]*h[n, t]
            if isinstance(body, Red):
                bound.append(body.index)
                body = body.body
                continue
            sums = [f for f in sp.Mul.make_args(body) if isinstance(f, Red)]
            if isinstance(body, sp.Mul) and len(sums) == 1:
                outside += [f for f in body.args if f is not sums[0]]
                body = sums[0]
                continue
            break
        body = sp.Mul(*outside, body)
        deltas = [f for f in sp.Mul.make_args(body) if isinstance(f, sp.KroneckerDelta)]
        for delta in deltas:
            row, labels = delta.args if isinstance(delta.args[1], sp.Indexed) else delta.args[::-1]
            if not (isinstance(row, sp.Idx) and row in self.frame.slots and isinstance(labels, sp.Indexed)
                    and all(i in bound for i in labels.indices) and len(set(labels.indices)) == len(labels.indices)):
                continue
            rest = body / delta
            if row in rest.free_symbols or rest.atoms(sp.KroneckerDelta) or any(
                    isinstance(i, sp.Indexed) for e in rest.atoms(sp.Indexed) for i in e.indices):
                continue  # a value read at the labels too (a pick) is printed with its one-hot
            for j in reversed([j for j in bound if j not in labels.indices]):  # summed before the scatter
                rest = Red(rest, j)
            others = sorted((i for i in rest.free_symbols if isinstance(i, sp.Idx) and i in self.frame.slots
                             and i not in bound), key=self.frame.slots.__getitem__)
            spare = [sp.Idx(f"_spare{k}", extent(j)) for k, j in enumerate(bound) if j not in labels.indices]
            inner = self._inner(Frame(list(labels.indices) + others + spare))
            inner.full_rank = True
            sizes = [self._print(extent(i)) for i in list(labels.indices) + others] + ["1"] * len(spare)
            kept = sizes[len(labels.indices):len(labels.indices) + len(others)]
            values = inner._print(rest) if self._is_tensor(rest) else \
                f"{self.dtype_of}.new_full((1,), {inner._print(rest)})"  # counting: a number per label
            source = f"{_wrap(values)}.expand({', '.join(sizes)}).reshape(-1{''.join(', ' + x for x in kept)})"
            shape = (extent(row), *[extent(i) for i in others])
            zeros = f"{self.dtype_of}.new_zeros(({', '.join(self._print(x) for x in shape)}{',' if len(shape) == 1 else ''}))"
            code = f"{zeros}.index_add(0, {labels.base}.reshape(-1), {source})"  # out of place: vmap batches it
            return self._layout(code, shape, [self.frame.slots[row]] + [self.frame.slots[i] for i in others])
        return None

    _print_GroupedRed = _print_Red  # SymPy's dispatch does not pass a renamed subclass to its parent's method

    def _reduce_body(self, inner: "KernelPrinter", body: sp.Expr, axes: list[int], method: str = "sum",
                     options: str = "") -> str:
        """``body``, printed by ``inner`` (whose frame holds the bound axes), reduced over ``axes``
        (``options``: more keyword arguments of the reduction, after the axes)."""
        if method == "sum":
            contraction = inner._contraction(body, {i for i, a in inner.frame.slots.items() if a in axes})
            if contraction is not None:
                return contraction
        inner.full_rank = self._lower_rank(body)
        text = inner._print(body)
        if not text.isidentifier():
            text = f"({text})"
        where = str(axes[0]) if len(axes) == 1 else str(tuple(sorted(axes)))
        if method == "logsumexp":
            return f"torch.logsumexp({text}, {where}, keepdim=True)"
        return f"{text}.{method}({where}{options}, keepdim=True)"

    def _softmax_backward(self, expr) -> str | None:
        """``s*(a - sum_j a*s)`` with ``s`` a saved softmax along ``j``'s axis and ``a`` a tensor of
        its layout: the chain rule through the softmax, printed as torch's own kernel for it
        (``torch._softmax_backward_data``), which rounds as autograd through the spec does
        (its row sum accumulates as the softmax's own backward does, not as ``.sum``). None for
        anything else."""
        factors = sp.Mul.make_args(expr)
        # (numbers, and values the same at every entry, such as the upstream gradient of a whole
        # sum, multiply the kernel's result: ``dv*(m - sum_j m*s)*s`` is ``dv*softmax_backward(m, s)``)
        one_value = [f for f in factors if _same_everywhere(f)]
        coeff = sp.Mul(*one_value)
        rest = [f for f in factors if f not in one_value]
        if len(rest) != 2 or not self.softmaxes:
            return None
        s = next((f for f in rest if isinstance(f, sp.Indexed) and str(f.base) in self.softmaxes), None)
        add = next((f for f in rest if isinstance(f, sp.Add)), None)
        if s is None or add is None or len(add.args) != 2 or not self._stored_entry(s):
            return None
        axis = self.softmaxes[str(s.base)]
        # (or its negative, ``s*(sum_j a*s - a)``: minus the kernel's result)
        for sign, terms in ((1, add), (-1, -add)):
            total = next((-t for t in sp.Add.make_args(terms) if isinstance(-t, Red)), None)
            if total is not None:
                coeff *= sign
                break
        else:
            return None
        a = next((t for t in sp.Add.make_args(terms) if t != -total), None)
        read = set() if a is None else {i for i in a.free_symbols if isinstance(i, sp.Idx)}
        if a is None or str(s.base) in self.views or a.atoms(Red) or not read <= set(_indices_of(s)):
            return None
        j, own = total.index, s.indices[axis]
        if not isinstance(own, sp.Idx) or extent(j) != extent(own) \
                or sp.expand(total.body - (self._written_out(a) * s).xreplace({own: j})) != 0:
            return None  # (a softmax along an axis of 1 is 1: no kernel for it)
        inside, coeff = self._tensor_coefficient(coeff)
        a = inside * a
        grad = self._laid_out_as(a, s)
        if grad is None:
            return None
        if grad.startswith("-"):
            negated = self._laid_out_as(-a, s)
            if negated is not None and not negated.startswith("-"):
                # the kernel is linear in its gradient: ``-kernel(g)``, not ``kernel(-g)`` (a pass more)
                grad, coeff = negated, -coeff
        if read != set(_indices_of(s)):
            # a gradient the same along some of the softmax's axes (a column total's, ``s.sum(0)``):
            # spread over its shape without a copy, as autograd's sum backward hands it on
            grad = f"{_wrap(grad)}.expand_as({s.base})"
        code = f"torch._softmax_backward_data({grad}, {s.base}, {axis}, {grad if grad.isidentifier() else s.base}.dtype)"
        code = self._stored_layout(code, s)
        return code if coeff == 1 else self._scaled(_wrap(code), [coeff])

    def _log_softmax_backward(self, expr) -> str | None:
        """``a - exp(l)*sum_j a`` with ``l`` a saved log-softmax along ``j``'s axis and ``a`` of its
        shape: the chain rule through the log-softmax, printed as torch's own kernel for it
        (``torch._log_softmax_backward_data``), one pass where the difference, the exponential and
        the product are three (2x autograd's backward at 1024 x 512). Values the same at every entry
        multiply it (the upstream gradient of a whole sum: ``dv*(m - exp(l)*sum_j m)``), and an
        ``a`` that is one itself (``dv*(1 - k*exp(l))``, ``log_softmax(x).sum()``) is the kernel of
        it spread over ``l``'s shape, as autograd's expanded gradient. None for anything else."""
        if not self.log_softmaxes:
            return None
        # a number both terms carry (``2*a - 2*exp(l)*sum_j a``, the spec's ``v + v``) multiplies it
        content, expr = expr.as_content_primitive() if expr.is_Add else (sp.S.One, expr)
        factors = sp.Mul.make_args(expr)
        one_value = [f for f in factors if _same_everywhere(f)]
        coeff, rest = content * sp.Mul(*one_value), sp.Mul(*[f for f in factors if f not in one_value])
        if not isinstance(rest, sp.Add) or len(rest.args) != 2:
            return None
        for shifted, a in (rest.args, rest.args[::-1]):
            parts = sp.Mul.make_args(-shifted)
            e = next((f for f in parts if isinstance(f, sp.exp)), None)
            if e is None:
                continue
            total = sp.Mul(*[f for f in parts if f is not e])
            l = e.args[0]
            if not isinstance(l, sp.Indexed) or str(l.base) not in self.log_softmaxes or str(l.base) in self.views \
                    or not self._stored_entry(l) or a.atoms(Red):
                continue
            axis = self.log_softmaxes[str(l.base)]
            own = l.indices[axis]
            if not isinstance(own, sp.Idx):
                continue  # (along an axis of 1: 0 everywhere)
            if _same_everywhere(a):
                upstream = coeff * a
                if total != extent(own) * a or not self._tensors(upstream):
                    continue
                grad, coeff = f"{_wrap(self._print(upstream))}.expand_as({l.base})", sp.S.One
            elif isinstance(total.as_coeff_Mul()[1], Red) \
                    and {i for i in a.free_symbols if isinstance(i, sp.Idx)} == set(_indices_of(l)):
                # (the total as the closed form writes it: ``-sum_j (1 - y**2)`` of an ``a`` factored
                # as ``(y - 1)*(y + 1)``)
                number, red = total.as_coeff_Mul()
                whole = self._written_out(a)
                if extent(red.index) != extent(own) or (
                        number * red.body != whole.xreplace({own: red.index})
                        and sp.expand(number * red.body - whole.xreplace({own: red.index})) != 0):
                    continue
                inside, rest_coeff = self._tensor_coefficient(coeff)
                grad = self._laid_out_as(inside * a, l)
                if grad is None:
                    continue
                coeff = rest_coeff
            else:
                continue
            code = f"torch._log_softmax_backward_data({grad}, {l.base}, {axis}, {grad if grad.isidentifier() else l.base}.dtype)"
            code = self._stored_layout(code, l)
            return code if coeff == 1 else self._scaled(_wrap(code), [coeff])
        return None

    def _written_out(self, expr) -> sp.Expr:
        """``expr`` with the shared temporaries it reads (``written``: cse's, by name) replaced by
        their values: a one-pass kernel's gradient ``a`` is compared with the sum's body, which cse
        leaves as written (its index is bound), while ``a`` outside it reads ``shared0 = v1**2``."""
        while expr.free_symbols & self.written.keys():
            expr = expr.xreplace(self.written)
        return expr

    def _tensor_coefficient(self, coeff) -> tuple:
        """``(tensors, rest)`` of a one-pass kernel's coefficient: its 0-d tensors (the upstream
        gradient of a whole sum) go into the gradient the kernel is given, as autograd's chain rule
        meets them first (``log_softmax_backward(tanh_backward(dv, y), l)``, where ``dv`` outside
        the kernel was a pass of its own after it, and the tanh's factor two more); numbers stay
        outside."""
        tensors = sp.Mul(*[f for f in sp.Mul.make_args(coeff) if self._tensors(f)])
        return tensors, coeff / tensors

    def _stored_entry(self, saved) -> bool:
        """Whether ``saved``'s entry reads each stored axis once, at an index of the frame or at 0
        (an axis of 1: the log-softmax of a ``(1, k)`` input is read as ``v[0, i_k]``)."""
        indices = _indices_of(saved)
        return len(set(indices)) == len(indices) and all(
            i in self.frame.slots if isinstance(i, sp.Idx) else i == 0 for i in saved.indices)

    def _stored_layout(self, code: str, saved) -> str:
        """A kernel's result, of ``saved``'s stored shape, laid out in the frame."""
        shape = tuple(extent(i) if isinstance(i, sp.Idx) else 1 for i in saved.indices)
        return self._layout(code, shape, [self.frame.slots[i] for i in _indices_of(saved)])

    def _laid_out_as(self, a, saved) -> str | None:
        """The upstream gradient ``a`` of a one-pass kernel, in the layout of the saved value
        ``saved`` the kernel reads: its name where it is a tensor read as stored, else computed
        (``tanh_backward(dv4, v4)``); None where ``saved`` has an axis of 1 and ``a`` is not
        a tensor read as stored."""
        if isinstance(a, sp.Indexed) and a.indices == saved.indices and str(a.base) not in self.views:
            return str(a.base)
        if not all(isinstance(i, sp.Idx) for i in saved.indices):
            return None
        inner = self._inner(Frame(list(saved.indices)))
        inner.full_rank = True
        return inner._print(a)

    def one_call_within(self, expr) -> tuple | None:
        """``(code, others)`` of a product part of which is torch's softmax or log-softmax backward
        kernel (``is_one_call``: with the factors that are one value at every entry), printed, and
        the rest full-size or smaller factors that multiply its result: ``softmax(p*x)``'s gradient is
        ``softmax_backward(dv, s)*p``, one pass and a product, as autograd's chain rule meets ``p``
        after the kernel, where the product written out is five passes. None where the kernel is
        the whole product (printed as it is) or no part of it."""
        if not isinstance(expr, sp.Mul) or not (self.softmaxes or self.log_softmaxes):
            return None
        factors = sp.Mul.make_args(expr)
        one_value = [f for f in factors if _same_everywhere(f)]
        tensors = [f for f in factors if f not in one_value]
        for add in (f for f in tensors if isinstance(f, sp.Add)):
            for saved in [None] + [f for f in tensors if isinstance(f, sp.Indexed)]:
                used = [add] if saved is None else [add, saved]
                others = [f for f in tensors if f not in used]
                part = sp.Mul(*one_value, *used)
                code = (self._softmax_backward(part) or self._log_softmax_backward(part)) if others else None
                if code is not None:
                    return code, others
        return None

    def is_one_call(self, expr) -> bool:
        """Whether ``expr`` prints as one call over memory that no chain of in-place updates beats:
        torch's softmax or log-softmax backward kernel, or a ``scatter_add`` at an argmax."""
        return any(special(expr) is not None
                   for special in (self._softmax_backward, self._log_softmax_backward, self._added_at_argmax))

    def _tanh_backward(self, expr) -> str | None:
        """``g*(1 - y**2)`` with ``y`` a saved tanh and ``g`` a tensor: the chain rule through the
        tanh, printed as torch's own kernel for it (``torch.ops.aten.tanh_backward(g, y)``), which
        rounds as autograd through the spec does: ``1 - y*y`` in one rounding, where ``1 - y**2``
        rounds ``y**2`` first and loses the digits of a saturated ``y``. A chain of tanhs (each
        factor ``1 - y**2``, or ``(y - 1)*(y + 1)`` as the closed form factors it) is one kernel per
        link, as autograd's: printed as the product, each factor was a pass over memory of its own
        (13 for ``tanh(tanh(tanh(x)))``, 3x autograd's time). None for anything else."""
        if not self.tanhs:
            return None
        links, rest, sign = tanh_links(list(sp.Mul.make_args(expr)), self.tanhs)
        if not links:
            return None
        # a softplus inside the tanh: its kernel takes the tanh's result (``sigmoid(z)`` as a
        # factor of its own is 0 from z = -89 in float32, where the gradient is subnormal)
        sigmoids = [r for r in rest if isinstance(r, Sigmoid)] if self.softplus_grads else []
        rest = [r for r in rest if r not in sigmoids]

        def call(g):
            for y in links:  # the outermost tanh first, as the chain rule meets them
                g = CodeOps.KERNELS["tanh"].format(grad=g, saved=self._print(y))
            return self._through_softplus(g, sigmoids)

        return self._kernel_of_gradient(rest, call, sign)  # None: no tensor to pass it (a number times 1 - y**2)

    def _threshold_backward(self, expr) -> str | None:
        """``g*Step(u)`` with ``u`` one tensor (a ReLU's output, read where the forward saved it):
        torch's one-pass kernel, ``threshold_backward(g, u, 0)``, as autograd's ReLU backward. The
        mask cast from bool and multiplied in, ``(u > 0).to(g.dtype)*g``, is three passes over
        memory (on this CPU a comparison and a cast from bool each take several times a product's
        time) and 0*inf where ``g`` is infinite; the kernel gives autograd's 0 there. None otherwise."""
        factors = list(sp.Mul.make_args(expr))
        steps = [f for f in factors if isinstance(f, Step)]
        if len(steps) != 1 or any(isinstance(f, COMPARISON_MASKS + (Wins,)) for f in factors if f is not steps[0]):
            return None
        u = step_argument(steps[0].args[0])
        if not (isinstance(u, sp.Indexed) or u in temporaries(u, self.shapes)) or not self._is_tensor(u):
            return None
        rest = [f for f in factors if f is not steps[0]]
        return self._kernel_of_gradient(rest, lambda g: CodeOps.KERNELS["relu"].format(grad=g, saved=self._print(u)))

    def _kernel_of_gradient(self, factors: list, call, sign=1) -> str | None:
        """``call(g)`` for the upstream gradient ``g`` among the tensor ``factors`` (all of them where
        none is it), times the other factors and the number ones (and ``sign``): a one-pass kernel
        of torch's applied to the upstream gradient. The kernel's factor can be exactly 0 (``1 -
        y**2`` of a saturated tanh): it meets the upstream gradient alone, then each other factor,
        never their product first (``tanh_backward(dout*exp(b), y)`` made ``inf*0`` where
        ``dout*exp(b)`` overflowed and autograd's ``tanh_backward(dout, y)*exp(b)`` is 0). Each
        partial product is then at most the upstream gradient times the factors met so far.
        None when no factor is a tensor (the kernel needs one to pass)."""
        # numbers, sizes and constants scale the result (``/k``), never ``*1/k*`` between tensors
        plain = [r for r in factors if r.is_number or not self._is_tensor(r)]
        inside, outside = self.upstream_first([r for r in factors if r not in plain])
        g = sp.Mul(*inside)
        if not g.atoms(sp.Indexed) and not temporaries(g, self.shapes):
            return None
        full = self.frame.sized
        small = {r for r in outside if self._axes(r) != full}
        # the factors that vary on fewer axes than the frame met first (stable), then the full-size
        # ones: one pass over memory for each full-size factor, not one more for a small one after it
        outside = [r for r in outside if r in small] + [r for r in outside if r not in small]
        coefficient, sign = sign * sp.Mul(*plain), 1
        if coefficient != 1 and self._axes(g) != full:
            # a number scales the gradient the kernel is given while it is small (``dv/k``, a 0-d
            # upstream gradient), not the full-size result (one more pass): the kernel is linear in it
            g, coefficient = coefficient * g, sp.S.One
        gradient = self._print(g)
        if gradient.startswith(("-", "(-1)*")):
            # the kernel is linear in the gradient: its sign goes outside (``-tanh_backward(a, y)``,
            # never ``-tanh_backward((-1)*a, y)``, two passes that negate)
            negated = self._print(-g)
            if not negated.startswith(("-", "(-1)*")):
                gradient, sign = negated, -sign
        code = self._times_each(call(gradient), outside)
        coefficient = sign * coefficient
        if coefficient.could_extract_minus_sign():
            return f"-{self._scaled(code, [-coefficient]) if coefficient != -1 else code}"
        return code if coefficient == 1 else self._scaled(code, [coefficient])

    def _axes(self, expr) -> set:
        """The frame axes ``expr`` varies on (``varying_axes``)."""
        return varying_axes(expr, self.frame.slots, self.shapes)

    def upstream_first(self, tensors: list) -> tuple[list, list]:
        """(what a one-pass kernel is given, what multiplies its result) of the tensor factors of
        its gradient: the upstream gradient (the output's, ``dtype_of``, read as it is) and the
        rest. Where no factor is the upstream gradient itself, every factor but the exponentials
        (an ``exp``, or a saved one, ``exponentials``): an ``exp`` is what overflows, and autograd
        multiplies it in after the kernel (the chain rule meets ``exp(A)`` below ``tanh(exp(A))``),
        so the kernel's 0 meets it last (``tanh_backward(g, y)*exp(A + v)``, never
        ``tanh_backward(g*exp(A + v), y)``, ``inf*0`` once ``exp(A + v)`` overflows where ``exp(A)``
        did not; ``tanh_backward(g, v4)*v1`` for ``v4 = tanh(v1)``, ``v1 = exp(A)``, never
        ``tanh_backward(g*v1, v4)``, infinite where ``g*v1`` passes float32's range and ``v1`` does not)."""
        inside = [r for r in tensors if tensor_name(r) == self.dtype_of]
        if not inside:
            inside = [r for r in tensors if not self._exponential(r.base if r.is_Pow else r)] or list(tensors)
        return inside, [r for r in tensors if r not in inside]

    def _exponential(self, factor) -> bool:
        return isinstance(factor, (sp.exp, SplitExp)) or tensor_name(factor) in self.exponentials

    def _softplus_backward(self, expr) -> str | None:
        """``g*sigmoid(z)``, the chain rule through ``F.softplus(z)``, with ``g`` a tensor: printed as
        torch's own kernel for it (``torch.ops.aten.softplus_backward(g, z, 1, 20)``, F.softplus's
        beta and threshold), which rounds as autograd through the spec does: ``exp(z)/(exp(z) + 1)``
        keeps the subnormal digits of a very negative ``z`` that ``sigmoid(z) = 1/(1 + exp(-z))``
        loses to an overflow (0 from z = -89 in float32). None for anything else."""
        if not self.softplus_grads:
            return None
        factors = list(sp.Mul.make_args(expr))
        sigmoids = [f for f in factors if isinstance(f, Sigmoid)]
        if not sigmoids:
            return None

        return self._kernel_of_gradient([f for f in factors if not isinstance(f, Sigmoid)],
                                        lambda code: self._through_softplus(code, sigmoids))

    def _through_softplus(self, code: str, sigmoids: list) -> str:
        """``code`` (a gradient) through the softplus kernel of each of ``sigmoids`` in turn: softplus
        of softplus is one kernel per link of the chain."""
        for sigmoid in sigmoids:
            code = CodeOps.KERNELS["softplus"].format(grad=code, saved=self._print(sigmoid.args[0]))
        return code

    def _activation_backward(self, expr) -> str | None:
        """``g*gelu'(z)`` (any ``ActivationDerivative``) with ``g`` a tensor: torch's own backward
        kernel of the activation given ``g`` (``torch.ops.aten.gelu_backward(g, z)``), one pass, as
        autograd through the spec computes it; a chain of them is one kernel per link. None for
        anything else."""
        factors = list(sp.Mul.make_args(expr))
        derivatives = [f for f in factors if isinstance(f, ActivationDerivative)]
        if not derivatives:
            return None

        def through(code):
            for d in derivatives:
                code = d.activation.backward_call(code, *self._printed_arguments(d))
            return code
        return self._kernel_of_gradient([f for f in factors if f not in derivatives], through)

    def _printed_arguments(self, expr) -> tuple[str, list]:
        """An activation's (or its derivative's) argument and numbers, printed."""
        return self._print(expr.args[0]), [self._print(a) for a in expr.args[1:]]

    def _print_Activation(self, expr):
        return expr.forward_call(*self._printed_arguments(expr))

    def _print_ActivationDerivative(self, expr):
        # alone (not meeting a gradient): the kernel given ones
        x, numbers = self._printed_arguments(expr)
        return expr.activation.backward_call(f"torch.ones_like({x})", x, numbers)

    def _print_Mul(self, expr):
        if all(isinstance(f, COMPARISON_MASKS) for f in expr.args):
            return self._mask(self.condition(expr))  # masks multiplied: one ``&`` of bool tensors, one cast
        softmax = self._softmax_backward(expr)
        if softmax is not None:
            return softmax
        log_softmax = self._log_softmax_backward(expr)
        if log_softmax is not None:
            return log_softmax
        tanh = self._tanh_backward(expr)
        if tanh is not None:
            return tanh
        softplus = self._softplus_backward(expr)
        if softplus is not None:
            return softplus
        activation = self._activation_backward(expr)
        if activation is not None:
            return activation
        threshold = self._threshold_backward(expr)
        if threshold is not None:
            return threshold
        within = self.one_call_within(expr)
        if within is not None:
            code, others = within
            return self._times_each(code, others)
        indicator = _masked_count_factor(expr)
        if indicator is not None:
            # a row a mask leaves out gets exactly 0, also when the mask leaves out every row and its
            # count is 0 (0/0): the mean over no rows contributes nothing, as in torch's own losses
            return f"torch.where({self._print(indicator)} != 0, {self._print_product(expr)}, 0)"
        return self._print_product(expr)

    def _print_product(self, expr):
        # a sum divided by the number of its terms reads as the mean it is
        # (the forward's one-axis sums too: ``b.mean(0)``, one call where ``.sum(0)/n`` is two, and
        # on the CPU the same rounding, torch's mean being the sum divided)
        factors = list(expr.args)
        for r in factors:
            if not isinstance(r, (Red, AxisSum)) or isinstance(r.body, (Red, AxisSum)):
                continue
            inverse = 1 / extent(r.index)
            if inverse not in factors:
                continue
            total = self._print(r)
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
        rest, roots = reciprocal_roots(expr, self._is_tensor)
        if roots:  # multiplied as ``rsqrt(q)**3`` and ``(1/q)**2``, not divided by ``q**1.5`` or ``q**2``
            powers = "*".join(self._print_Pow(f) for f in roots)
            if rest == 1:
                return powers
            return f"{self.parenthesize(rest, sp.printing.precedence.PRECEDENCE['Mul'])}*{powers}"
        grouped = self._small_factors_first(expr)
        if grouped is not None:
            return grouped
        divided = self._divided(expr)
        if divided is not None:
            return divided
        return super()._print_Mul(expr)

    def _small_factors_first(self, expr) -> str | None:
        """A full-size product of full-size factors and of two or more that vary on fewer axes
        (numbers, per-row values): those multiplied together first, then the full-size ones
        (``(4*g*t/n)*torch.exp(x - m)``), one pass over memory per full-size factor rather than per
        factor (the order SymPy sorts them in had ``4*torch.exp(x - m)*g*t/n``: five passes, 2.6x
        autograd's time). It is also the order of autograd's chain rule, which carries the upstream
        gradient through the small values before it meets a full-size one. None for anything else,
        and where a ratio divided first (``bounded_ratios``) has a full-size side."""
        grouped = self.small_factors_grouped(expr)
        if grouped is None:
            return None
        small, large = grouped
        # (inside the ``torch.where`` of a masked count, which ``_print_Mul`` puts around the whole)
        text = f"({self._print_product(small) if _masked_count_factor(small) is not None else self._print(small)})"
        return self._times_each(text, large)

    def small_factors_grouped(self, expr) -> tuple | None:
        """``(the small factors' product, [the full-size factors])`` where ``_small_factors_first``
        prints the product so (the in-place form, ``backward_plan``, computes it in that order)."""
        full = self.frame.sized
        axes = {f: self._axes(f) for f in expr.args}
        if not full or set().union(*axes.values()) != full:
            return None
        if any(temporaries(r.body, self.shapes) for r in expr.atoms(_Bound)):
            return None  # a named tensor summed: the axes it keeps are not read off its name
        small = [f for f in expr.args if axes[f] != full]
        large = [f for f in expr.args if axes[f] == full]
        if len(small) < 2 or not large or not any(self._is_tensor(f) for f in small) \
                or set().union(*[axes[f] for f in small]) == full:
            # (numbers and sizes alone stay where SymPy puts them: a sum divided by n, not times 1/n
            # rounded; per-row times per-column values are a full-size product anyway)
            return None
        if any(self._axes(f) == full or self._axes(d) == full for f, d in self.bounded_ratios(expr)[2]):
            return None
        return sp.Mul(*small), large

    def _times_each(self, code: str, factors: list) -> str:
        """``code`` multiplied by each of ``factors`` in turn, left to right, divided by a factor's
        base where its exponent is negative (``/(v**2 + 1)``, never ``*1/(v**2 + 1)``)."""
        mul = sp.printing.precedence.PRECEDENCE["Mul"]
        for f in factors:
            base, e = f.as_base_exp()
            if e.is_number and e.is_negative:
                code += f"/{self.parenthesize(base ** -e, mul, strict=True)}"
            else:
                code += f"*{self.parenthesize(f, mul)}"
        return code

    def _divided(self, expr: sp.Mul) -> str | None:
        """A product divided by two tensors or more, divided by each in turn (``g*v/s/(w**2 + 1)``),
        as autograd's chain rule divides: the product of the divisors overflows float32 where each
        does not (``sqrt(v**2 + 1)*(w**2 + 1)`` at ``w`` of 1e19, where the gradient is 1e-19); and
        a numerator factor read from no other tensors than a divisor divided by it first
        (``bounded_ratios``). None for anything else (one divisor that bounds no factor)."""
        numerator, divisors, ratios = self.bounded_ratios(expr)
        numerator = sp.Mul(*numerator)
        if len(divisors) < 2 and (not ratios or (numerator == 1 and len(ratios) == 1 and not divisors)):
            return None  # (a ratio alone: as SymPy prints it)
        mul = sp.printing.precedence.PRECEDENCE["Mul"]
        text = f"({self._print(numerator)})" if numerator.is_Add else self._print(numerator)
        text = "*".join(([] if numerator == 1 else [text])
                        + [f"({self.parenthesize(f, mul)}/{self.parenthesize(d, mul, strict=True)})" for f, d in ratios])
        return (text or "1") + "".join(f"/{self.parenthesize(d, mul, strict=True)}" for d in divisors)

    def bounded_ratios(self, expr: sp.Mul) -> tuple[list, list, list]:
        """(numerator factors, tensor divisors, ``[(factor, divisor)]``) of a product: each pair a
        numerator factor that its divisor bounds (``c/sqrt(c**2 + 1)``, read from no other tensors).
        Divided first: multiplied out, ``dout*exp(v)*c`` overflows float32 where the gradient does
        not (``c`` of 88, ``exp(v)`` of 1e38), while autograd's chain divides by the root before it
        meets ``c``. The upstream gradient is never such a factor."""
        numerator, divisors = [], []
        for f in sp.Mul.make_args(expr):
            base, e = f.as_base_exp()
            if e.is_negative and e.is_number and self._is_tensor(base):
                divisors.append(base ** -e)
            else:
                numerator.append(f)
        ratios = []
        for d in list(divisors):
            mine = self._tensors(d)
            mine = mine.union(*[self.roots.get(t, ()) for t in mine])
            f = next((f for f in numerator if not f.is_number and self._tensors(f) and self._tensors(f) <= mine
                      and tensor_name(f.as_base_exp()[0]) != self.dtype_of), None)
            if f is not None:
                numerator.remove(f)
                divisors.remove(d)
                ratios.append((f, d))
        return numerator, divisors, ratios

    def _tensors(self, expr) -> set:
        """The tensors ``expr`` reads (the bases of its entries, and 0-d tensors by name)."""
        return {str(e.base) for e in expr.atoms(sp.Indexed)} | {str(s) for s in expr.free_symbols if str(s) in self.shapes}

    def _print_Add(self, expr, order=None):
        """Positive terms first, so a difference reads ``probs - onehot``."""
        for special in (self._log_softmax_backward, self._added_at_argmax):
            code = special(expr)
            if code is not None:
                return code
        return self._add_terms(sorted(expr.as_ordered_terms(), key=lambda t: t.could_extract_minus_sign()))

    def _added_at_argmax(self, expr) -> str | None:
        """``a + onehot(argmax)*b`` with ``b`` one value per row of the maximum (nothing along its
        axis) and ``a`` full-size: ``b`` added into ``a`` at the argmax (``scatter_add``), one pass
        where the one-hot built, scaled and added is four (the replayed maximum's row total,
        ``differentiate.replayed_maxima``). None for anything else."""
        if not isinstance(expr, sp.Add):
            return None
        for term in expr.args:
            marks = [f for f in sp.Mul.make_args(term) if isinstance(f, IsArgmax)]
            if len(marks) != 1 or type(marks[0]) is not IsArgmax or not isinstance(marks[0].args[1], Max):
                continue
            (mark,), rest = marks, expr - term
            j, m = mark.args
            b = term / mark
            row = free_indices(m.body) - {m.index}
            if j not in self.frame.slots or b.atoms(IsArgmax) or free_indices(b) != row \
                    or not row | {j} <= free_indices(rest) or not self._is_tensor(rest) or not self._is_tensor(b):
                continue
            body, axis = self._argmax_of(m)
            if axis != self.frame.slots[j]:
                continue
            into = self._print(rest)
            at = f"{body}.argmax({axis}, keepdim=True)"
            if into.isidentifier() and self._minus_row_total(b, rest, j):
                # ``a`` less its row total at the argmax is minus the total of the row's other
                # entries: summed with the argmax's entry zeroed, so that a rounding residue there
                # (where ``a`` is a difference that is 0 in exact arithmetic) cannot swallow them
                # as ``a - a.sum()`` does (the row's others of 1e-20 beside a residue of 1e-8). The
                # argmax, a pass over its input as costly as the rest, is named where it is first
                # read (``:=``: the first argument is evaluated before the second) and read again
                return (f"{into}.scatter({axis}, (_argmax := {at}), "
                        f"-{into}.scatter({axis}, _argmax, 0).sum({axis}, keepdim=True))")
            into = into if into.isidentifier() else f"({into})"
            return f"{into}.scatter_add({axis}, {at}, {self._print(b)})"
        return None

    @staticmethod
    def _minus_row_total(b, rest, j) -> bool:
        """Whether ``b`` is minus the total of ``rest`` along ``j`` (a replayed maximum's adjoint)."""
        total = -b
        return isinstance(total, Red) and _replace_free(total.body, total.index, j) == rest

    def _add_terms(self, terms: list) -> str:
        """``terms`` added left to right, in this order (Python's, and so torch's, order)."""
        text = self._print(terms[0])
        for t in terms[1:]:
            # a sum kept whole (``_spec_grouping``) is subtracted only when all its terms are negative:
            # ``b + (1 - x)``, not ``b - (x - 1)`` (the same value: negation is exact)
            negative = all(a.could_extract_minus_sign() for a in t.args) if isinstance(t, sp.Add) \
                else t.could_extract_minus_sign()
            if negative:
                term = self.parenthesize(-t, sp.printing.precedence.PRECEDENCE["Add"])
                # (a kernel's factor may carry the sign back: ``-(y - 1)*(y + 1)*g`` negated prints
                # as ``-tanh_backward(g, y)``, which reads as a sum, not ``x - -tanh_backward``)
                text += " + " + term[1:] if term.startswith("-") else " - " + term
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
        # a comparison, not F.one_hot: torch.func.vmap cannot batch F.one_hot's check of the values
        code = f"({name}.unsqueeze(-1) == torch.arange({self._print(extent(a))}, device={name}.device))"
        if self.dtype_of:
            code += f".to({self.dtype_of}.dtype)"
        shape = tuple(s for s, i in zip(self.shapes[name], b.indices)) + (extent(a),)
        return self._layout(code, shape, labels_axes + [axis])

    def _print_SplitExp(self, expr):
        return f"torch.exp({self._print(expr.args[0])})"

    def _print_Sigmoid(self, expr):
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_Softplus(self, expr):
        return f"F.softplus({self._print(expr.args[0])})"

    def _print_Relu(self, expr):
        return f"torch.relu({self._print(expr.args[0])})"

    def _print_Root(self, e):  # the value of a root whose derivative is masked at 0: a root
        return self._print(sp.sqrt(e.args[0]))

    def _mask(self, code: str) -> str:
        """A comparison's bool tensor, cast to the gradient's dtype when it is multiplied."""
        mask = f"({code})"
        return f"{mask}.to({self.dtype_of}.dtype)" if self.dtype_of else mask

    def condition(self, m: sp.Expr) -> str:
        """A 0/1 mask as the bool condition of ``torch.where`` (``x > 0``, ``y != c``)."""
        rel = sp.printing.precedence.PRECEDENCE["Relational"]
        if isinstance(m, (Step, NonNeg, Equal)):
            a, b = _sides(step_argument(m.args[0]) if isinstance(m, Step) else m.args[0])
            symbol = {Step: ">", NonNeg: ">=", Equal: "=="}[type(m)]
            return f"{self.parenthesize(a, rel)} {symbol} {self.parenthesize(b, rel)}"
        if isinstance(m, sp.KroneckerDelta):
            return f"{self._print(m.args[0])} == {self._print(m.args[1])}"
        if isinstance(m, sp.Add) and len(m.args) == 2 and 1 in m.args:  # 1 - mask
            (inner,) = [a for a in m.args if a != 1]
            if inner.could_extract_minus_sign():
                return f"~({self.condition(-inner)})"
        if isinstance(m, sp.Mul) and (not m.atoms(sp.Number) - {sp.S.One}
                                      or all(isinstance(f, COMPARISON_MASKS) for f in m.args)):
            return " & ".join(f"({self.condition(f)})" for f in m.args)
        return f"{self._print(m)} != 0"

    def _print_Step(self, expr):
        # a bool mask cast to the gradient's dtype: 1 where the argument is positive, 0 at 0 (as torch)
        return self._mask(self.condition(expr))

    def _print_NonNeg(self, expr):
        return self._mask(self.condition(expr))

    def _print_Wins(self, expr):
        # 1/2 at a tie, else the strict comparison's mask: four passes over memory, where the two
        # masks of ``halves()`` scaled and added are seven
        u = expr.args[0]
        return f"torch.where({self.condition(Equal(u))}, 0.5, {self._print(Step(u))})"

    def _print_Equal(self, expr):
        return self._mask(self.condition(expr))

    def _print_Where(self, expr):
        m, a, b = expr.args
        return f"torch.where({self.condition(m)}, {self._print(a)}, {self._print(b)})"

    _print_Guarded = _print_Where  # (SymPy looks a subclass of a function up by its own name)

    # torch.maximum (minimum) itself: one op, and NaN propagates as in the spec
    def _print_Maximum(self, expr):
        return self._extremum(expr, "maximum", "min")

    def _print_Minimum(self, expr):
        return self._extremum(expr, "minimum", "max")

    def _extremum(self, expr, function: str, bound: str) -> str:
        """``torch.<function>(a, b)``; of a tensor and a number, ``torch.clamp`` with the number as
        its ``bound`` (``torch.minimum(0, v2)`` raised TypeError: it takes tensors only, and the
        layer fell to the step-by-step kernel). NaN propagates through both."""
        a, b = expr.args[1], expr.args[2]
        if a.is_number != b.is_number:
            number, value = (a, b) if a.is_number else (b, a)
            return f"torch.clamp({self._print(value)}, {bound}={self._print(number)})"
        return f"torch.{function}({self._print(a)}, {self._print(b)})"

    def _print_Clamp(self, expr):
        x, lo, hi = expr.args
        bounds = [f"{k}={self._print(v)}" for k, v in (("min", lo), ("max", hi)) if v.is_finite]
        return f"torch.clamp({self._print(x)}, {', '.join(bounds)})"

    def _print_Max(self, expr):
        raise DerivationError("", "a maximum left in a backward formula", "report this as a bug")

    def _print_IsArgmax(self, expr):
        """The one-hot of the maximum's position along the axis of ``j``: torch's ``max(dim)``
        routes the gradient to the one index it returns, and so does this (the first maximum)."""
        j, m = expr.args
        if not isinstance(m, Max) or j not in self.frame.slots:
            raise DerivationError("", "the gradient flows through max() at a position the fused printer "
                                  "cannot lay out", "mark the layer fused = False for the step-by-step backward")
        body, axis = self._argmax_of(m)
        if isinstance(expr, IsTiedMax):  # amax: an equal share to each position that ties
            ties = f"({body} == {body}.amax({axis}, keepdim=True))"
            return f"{ties}.to({body}.dtype)/{ties}.sum({axis}, keepdim=True)"
        return f"torch.zeros_like({body}).scatter_({axis}, {body}.argmax({axis}, keepdim=True), 1.0)"

    # SymPy's dispatch does not pass a renamed subclass to its parent's method
    _print_TiedMax, _print_IsTiedMax = _print_Max, _print_IsArgmax

    def _argmax_of(self, m: Max) -> tuple[str, int]:
        """What the maximum ``m`` maximises, printed (an operand), and the axis it is taken along."""
        frame, axis = self.frame.with_bound(m.index, m.body)
        inner = self._inner(frame)
        inner.full_rank = self._lower_rank(m.body)
        body = inner._print(m.body)
        return (body if body.isidentifier() else f"({body})"), axis


# SymPy dispatches a subclass of Function to a method of its own name only: each activation's
for _activation in ACTIVATIONS.values():
    setattr(KernelPrinter, f"_print_{_activation.__name__}", KernelPrinter._print_Activation)
    setattr(KernelPrinter, f"_print_{_activation.derivative.__name__}", KernelPrinter._print_ActivationDerivative)


class ForwardPrinter(KernelPrinter):
    """Prints forward values: sums and maxima as written, one statement at a time, and (with
    ``inplace``) results written into temporaries that die at this line."""

    _UNARY = {sp.exp: "exp", sp.log: "log", sp.tanh: "tanh"}

    def __init__(self, frame: Frame, shapes: dict, names: dict, reusable: set = frozenset(), inplace: bool = True,
                 dtype_of: str = "", views: dict | None = None, computed: set = frozenset(),
                 sums: tuple = ()):
        super().__init__(frame, shapes, names, dtype_of, views)
        self.reusable = set(reusable)  # temporaries that may be overwritten by this statement
        self.inplace = inplace
        self.computed = set(computed)  # temporaries holding a function of values (added last in a sum)
        # the spec's own sums (each a frozenset of its terms), kept together where a printed sum has
        # all of one's terms: SymPy's ``Add`` flattens ``b + (1 - x)`` to ``b + 1 - x``, and where
        # the terms cancel the two groupings round apart (``spec_sums``)
        self.sums = sums
        # the one sum that may be a fused multiply-add (``addcmul``): a statement's whole value, a
        # tensor of its own that the backward reads as it is. Inside an expression (``(v4 - b*x)**2``)
        # it would round otherwise than the backward that computes ``v4 - b*x`` again, and the
        # gradient would mix two values of it (7x autograd's error where ``b*x`` nearly cancels ``v4``)
        self.fusable = None

    def _inner(self, frame: Frame) -> "ForwardPrinter":
        inner = ForwardPrinter(frame, self.shapes, self.names, inplace=self.inplace, dtype_of=self.dtype_of,
                               views=self.views, computed=self.computed, sums=self.sums)
        inner.full_rank = self.full_rank
        return inner

    def statement(self, expr: sp.Expr) -> str:
        """The right-hand side of one statement, updating a dying temporary in place if one fits
        (``self.updated`` then names it)."""
        self.updated = None
        self.fusable = expr
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
        self.fusable = expr
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
        grouped = self._spec_grouping(expr)
        if grouped is not None:
            return self._add_terms(sorted(grouped, key=lambda t: _last_in_a_sum(t, self.computed)))
        # c + a*b in one pass over memory instead of two (a statement's whole value only: ``fusable``)
        for term in (expr.as_ordered_terms() if expr == self.fusable else []):
            coeff, factors = term.as_coeff_mul()
            tensors = [f for f in factors if self._is_tensor(f)]
            if len(tensors) == 2 and len(factors) == 2 and term != expr and self._is_tensor(expr - term):
                rest = self._print(expr - term)
                a, b = (self._print(f) for f in tensors)
                value = "" if coeff == 1 else f", value={self._print(coeff)}"
                return f"torch.addcmul({rest}, {a}, {b}{value})"
        return self._add_terms(sorted(expr.as_ordered_terms(), key=lambda t: _last_in_a_sum(t, self.computed)))

    def _spec_grouping(self, expr: sp.Add) -> list | None:
        """The terms of ``expr`` with each largest spec sum among them (``self.sums``) as one term,
        an ``Add`` printed in parentheses; None where no spec sum is a proper part of ``expr``."""
        terms = set(expr.args)
        parts = sorted((s for s in self.sums if 1 < len(s) < len(terms) and s <= terms), key=len, reverse=True)
        groups = []
        for part in parts:
            if not any(part & g for g in groups):
                groups.append(part)
        if not groups:
            return None
        alone = terms.difference(*groups)
        return [t for t in expr.as_ordered_terms() if t in alone] + [sp.Add(*g) for g in groups]

    def _print_AxisSum(self, expr):
        # a product summed over several axes is one contraction (C[X] reshaped @ W1: einsum over t, e);
        # anything else one axis at a time, in the spec's order (the forward's rounding is the spec's)
        bound, body = [], expr
        while isinstance(body, AxisSum):
            bound.append(body.index)
            body = body.body
        contraction = self._contraction(body, set(bound))
        if contraction is not None:
            return contraction
        whole = self._sum_at_once(expr)
        return whole if whole is not None else self._reduce(expr, "sum")

    def _sum_at_once(self, expr) -> str | None:
        """A sum over every axis (``v.sum()``; a mean over every entry, ``v.mean()``, is one in its
        normal form: ``sum_k (sum_n v/n)/k``) as one reduction over all of them, its sizes divided
        once (``v.sum((0, 1), keepdim=True)/(k*n)``), as torch sums and autograd's spec rounds.
        Summed one axis at a time it rounds like a running sum down the first axis: up to 10x
        autograd's float32 error. None for a sum over fewer axes or one this frame cannot lay out."""
        bound, body, scale = [], expr, []
        while True:
            if isinstance(body, AxisSum):
                bound.append(body.index)
                body = body.body
                continue
            inner = [f for f in sp.Mul.make_args(body) if isinstance(f, AxisSum)]
            rest = [f for f in sp.Mul.make_args(body) if not isinstance(f, AxisSum)]
            if bound and isinstance(body, sp.Mul) and len(inner) == 1 and \
                    all(_is_scalar_factor(f, self.shapes) for f in rest):
                scale += rest
                body = inner[0]
                continue
            break
        # only a sum over every axis the value has: a spec reduces several axes at once only with
        # ``.sum()``; a partial one is written axis by axis (batchnorm3d's ``x.sum(0).sum(2)``), and
        # torch's sum over two of three axes rounds worse than that (2.8x autograd's float32 error at
        # offset 1000). The frame may have more axes than the value (``A.sum()`` of a (k, k) ``A``
        # beside an (n, k) ``x``): those the value does not vary along do not count.
        if len(bound) < 2:
            return None
        frame, axes = self.frame, []
        try:
            for j in bound:
                frame, axis = frame.with_bound(j, body)
                axes.append(axis)
        except DerivationError:
            return None
        rank = len(self.frame.dims)
        if {i for i in body.free_symbols if isinstance(i, sp.Idx)} - set(bound) or any(
                size != 1 and k not in axes for t in temporaries(body, self.shapes)
                for k, size in enumerate(_padded(self.shapes[t.name], rank))):
            return None
        if len(set(axes)) < len(axes) or not all(self._varies_along(body, j, a) for j, a in zip(bound, axes)):
            return None
        return self._scaled(self._reduce_body(self._inner(frame), body, axes, "sum"), scale)

    def _print_AxisMax(self, expr):
        return self._reduce(expr, "amax")

    def _print_AxisLogSumExp(self, expr):
        return self._reduce(expr, "logsumexp")

    def _print_AxisVar(self, expr):
        return self._reduce(expr, "var")

    def _print_AxisSoftmax(self, expr):
        """``torch.softmax`` (``log_softmax``) along the axis of the element's own index."""
        method = "log_softmax" if type(expr).__name__ == "AxisLogSoftmax" else "softmax"
        axis = self.frame.slots[expr.index]
        if not self._varies_along(expr.body, expr.index, axis):  # a constant row: every entry 1/k
            uniform = 1 / extent(expr.index)
            return self._print(sp.log(uniform) if method == "log_softmax" else uniform)
        inner = self._inner(self.frame)
        inner.full_rank = True
        body = _wrap(inner._print(expr.body))
        # along the axes it varies on only: torch's softmax over a middle axis of a (n, 1, m, 1)
        # view is ten times slower than over the last of an (n, m) one
        varying = sorted({self.frame.slots[i] for i in expr.body.free_symbols if i in self.frame.slots}
                         | {k for t in temporaries(expr.body, self.shapes) for k, size in
                            enumerate(_padded(self.shapes[t.name], len(self.frame.dims))) if size != 1} | {axis})
        if len(varying) == len(self.frame.dims):
            return f"{body}.{method}({axis})"
        compact = ", ".join(self._print(self.frame.dims[k]) for k in varying)
        full = ", ".join(self._print(self.frame.dims[k]) if k in varying else "1" for k in range(len(self.frame.dims)))
        return f"{body}.view({compact}).{method}({varying.index(axis)}).view({full})"

    _print_AxisLogSoftmax = _print_AxisSoftmax  # SymPy looks a subclass of a function up by its own name

    def _reduce(self, expr, method: str) -> str:
        frame, axis = self.frame.with_bound(expr.index, expr.body)
        if not self._varies_along(expr.body, expr.index, axis):
            # a body that simplified to a value constant along the axis (``(v - v).exp().sum(1)``
            # reads a (n, 1) temporary): summing its one entry would miss the other k - 1
            if method == "var":
                return self._print(sp.S.Zero)
            return self._print(expr.body * extent(expr.index) if method == "sum" else expr.body)
        if method == "var":
            return self._reduce_body(self._inner(frame), expr.body, [axis], method, f", correction={expr.correction}")
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


def _sides(e: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """``a - b`` as ``(a, b)`` for printing ``a > b``: the negative terms go to the right (else 0),
    and a number beside a tensor crosses over (``v >= -1``, not ``v + 1 >= 0``: one comparison, no
    addition, and the comparison autograd's clamp makes)."""
    terms = sp.Add.make_args(e)
    numbers = [t for t in terms if t.is_number]
    others = [t for t in terms if not t.is_number]
    right = [-t for t in others if t.could_extract_minus_sign()]
    left = [t for t in others if not t.could_extract_minus_sign()]
    if left:
        right += [-t for t in numbers]
    else:
        left += numbers
    if not left or not right:
        return e, sp.S.Zero
    return sp.Add(*left), sp.Add(*right)


def _outside_elements(expr: sp.Expr) -> set:
    """The free symbols of ``expr`` but those of its tensor elements (their bases and indices)."""
    return expr.xreplace({e: sp.Dummy() for e in expr.atoms(sp.Indexed)}).free_symbols


def _indices_of(entry: sp.Indexed) -> list:
    """The frame indices an entry reads (not the 0 of an axis of 1)."""
    return [i for i in entry.indices if isinstance(i, sp.Idx)]


def _same_everywhere(f: sp.Expr) -> bool:
    """Whether the factor ``f`` is one value at every entry of the frame: a number, a size, a
    constant or a 0-d tensor (the upstream gradient of a whole sum), nothing read at an index."""
    return not f.atoms(sp.Indexed, Red) and not any(isinstance(i, sp.Idx) for i in f.free_symbols)


def _is_scalar_factor(f: sp.Expr, shapes: dict) -> bool:
    """Whether ``f`` is a number, size or constant (no tensor element, index or named tensor)."""
    return not f.atoms(sp.Indexed) and not any(isinstance(s, sp.Idx) or s.name in shapes for s in f.free_symbols)


# a sum, a reduction or an argmax inside a factor: never an operand of a contraction
_NOT_ELEMENTWISE = (Red, AxisSum, AxisMax, AxisSoftmax, AxisLogSumExp, AxisVar, Max, IsArgmax)


class _Operand:
    """A tensor in a contraction: its code and its indices, one per axis."""

    def __init__(self, code: str, indices: tuple):
        self.base, self.indices = code, indices


def _product(tensors: list, out: list, letters: dict) -> str:
    """The contraction of ``tensors`` (elements) onto the indices ``out``, in that order: a matrix
    product with transposes where it is one (``dout @ W.T``, a batch with ``.mT``), else einsum."""
    if len(tensors) == 2 and len(out) < 2:
        product = _vector_product(tensors, out)
        if product is not None:
            return product
    if len(tensors) == 2 and len(out) >= 2:
        summed = (set(tensors[0].indices) & set(tensors[1].indices)) - set(out)
        batch, (a, b) = out[:-2], out[-2:]
        for left, right in (tensors, tensors[::-1]):
            li, ri = list(left.indices), list(right.indices)
            if len(summed) != 1 or len(li) != len(batch) + 2 or len(ri) not in (2, len(batch) + 2):
                continue
            (r,) = summed
            # the right operand may be one matrix for every matrix of the left's batch
            if li[:-2] != batch or ri[:-2] not in (batch, []) or set(li[-2:]) != {a, r} or set(ri[-2:]) != {r, b}:
                continue
            lhs = _wrap(left.base) + (f".{'mT' if batch else 'T'}" if li[-2:] == [r, a] else "")
            rhs = _wrap(right.base) + (f".{'mT' if ri[:-2] else 'T'}" if ri[-2:] == [b, r] else "")
            return f"{lhs} @ {rhs}"
    spec = ",".join("".join(letters[i] for i in t.indices) for t in tensors) + "->" + "".join(letters[i] for i in out)
    return f"torch.einsum('{spec}', {', '.join(t.base for t in tensors)})"


def _vector_product(tensors: list, out: list) -> str | None:
    """``v @ M`` (a vector times a matrix, the matrix oriented (summed, kept): ``c @ A``) or ``v @ w``
    (a dot product), or None for anything else."""
    summed = (set(tensors[0].indices) & set(tensors[1].indices)) - set(out)
    if len(summed) != 1:
        return None
    (r,) = summed
    for vector, other in (tensors, tensors[::-1]):
        if list(vector.indices) != [r]:
            continue
        indices = list(other.indices)
        if indices == [r] and not out:
            return f"{_wrap(vector.base)} @ {_wrap(other.base)}"
        if out and len(indices) == 2 and set(indices) == {r, out[0]}:
            return f"{_wrap(vector.base)} @ {_wrap(other.base)}{'.T' if indices == [out[0], r] else ''}"
    return None


def _wrap(code: str) -> str:
    """``code`` ready for a method call: a name, possibly with calls, subscripts and attributes
    (``w[y]``, ``x.sum(0)``), as it is; anything else in parentheses."""
    return code if _is_primary(code) else f"({code})"


def _is_primary(code: str) -> bool:
    """Whether ``code`` is a name or a parenthesized group, followed only by trailers: ``(...)``,
    ``[...]``, ``.name``."""
    k = 0
    if code.startswith("("):
        depth = 0
        for k, c in enumerate(code):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                break
        k += 1
    else:
        while k < len(code) and (code[k].isalnum() or code[k] == "_"):
            k += 1
        if k == 0 or not code[0].isidentifier():
            return False
    while k < len(code):
        if code[k] == ".":
            k += 1
            start = k
            while k < len(code) and (code[k].isalnum() or code[k] == "_"):
                k += 1
            if k == start:
                return False
        elif code[k] in "([":
            close = {"(": ")", "[": "]"}[code[k]]
            depth, opener = 0, code[k]
            while k < len(code):
                depth += code[k] == opener
                depth -= code[k] == close
                k += 1
                if depth == 0:
                    break
            if depth:
                return False
        else:
            return False
    return True
def _last_in_a_sum(term: sp.Expr, computed: set = frozenset()) -> tuple:
    """Where a forward value's term goes in its sum: the values read as they are first, then the
    functions computed from them. Terms of one scale cancel before a small one is added:
    ``logits[y] - logit_maxes - log(counts_sum)`` is exact to float32 at logits of 1e6, where
    ``logits[y] - log(counts_sum) - logit_maxes`` rounds ``log(counts_sum)`` away. Positive terms
    first within each group. ``computed`` names the temporaries that hold such functions."""
    function = any((isinstance(f, sp.Function) and not isinstance(f, (AxisSum, AxisMax)))
                   or (isinstance(f, sp.Symbol) and f.name in computed) for f in sp.preorder_traversal(term))
    return function, term.could_extract_minus_sign()


def varying_axes(expr: sp.Expr, slots: dict, shapes: dict) -> set:
    """The frame axes ``expr`` varies on: those of its indices (``slots``: index -> axis), and those
    of the named tensors it reads whole (by their recorded ``shapes``)."""
    axes = {slots[s] for s in expr.free_symbols if s in slots}
    for s in temporaries(expr, shapes):
        axes |= {k for k, size in enumerate(shapes[s.name]) if size != 1}
    return axes


def temporaries(expr: sp.Expr, shapes: dict) -> list[sp.Symbol]:
    """The named tensors (saved values, shared temporaries) ``expr`` reads as whole symbols, by
    their names in ``shapes``; the labels of indexed elements (``x`` of ``x[i, j]``) are not among them."""
    labels = {b.label for b in expr.atoms(sp.IndexedBase)}  # their elements carry their indices
    return [s for s in expr.free_symbols - labels if isinstance(s, sp.Symbol) and s.name in shapes]


def one_minus(f):
    """``(y, sign)`` for ``sign*(1 - y)``, else None."""
    if isinstance(f, sp.Add) and len(f.args) == 2:
        numbers = [a for a in f.args if a.is_number]
        if len(numbers) == 1 and numbers[0] in (1, -1):
            one = numbers[0]
            other = f.args[0] if f.args[1] is one else f.args[1]
            y = -other if one == 1 else other
            if not y.could_extract_minus_sign():
                return y, one
    return None


def tanh_links(factors: list, tanhs: dict) -> tuple[list, list, int]:
    """(the saved tanhs ``y`` (``tanhs``: name -> place in the forward) whose ``1 - y**2`` is among
    ``factors``, outermost first; the other factors; the sign they leave). ``1 - y**2`` is one
    factor, or two: ``(y - 1)*(y + 1)`` (``-(1 - y**2)``) or ``(1 - y)*(1 + y)``."""
    def saved(y) -> bool:
        return tensor_name(y) in tanhs

    links, rest, sign = [], list(factors), 1
    for f in factors:
        found = one_minus_square(f)
        if found is not None and saved(found[0]):
            links.append(found[0])
            sign *= found[1]
            rest.remove(f)
    for f in list(rest):
        if not (f.is_Add and len(f.args) == 2 and f in rest):
            continue
        y = next((a for a in f.args if saved(a)), None)
        if y is None:
            continue
        for minus, plus, s in ((y - 1, y + 1, -1), (1 - y, 1 + y, 1)):
            if f in (minus, plus) and minus in rest and plus in rest:
                rest.remove(minus)
                rest.remove(plus)
                links.append(y)
                sign *= s
                break
    # the chain rule meets the tanh nearest the output first
    links.sort(key=lambda y: -tanhs[tensor_name(y)])
    return links, rest, sign


def tensor_name(e) -> str | None:
    """The tensor ``e`` is an entry of (``t[i_n, i_k]``: ``t``), or the 0-d tensor it is; else None."""
    if isinstance(e, sp.Indexed):
        return str(e.base)
    return e.name if isinstance(e, sp.Symbol) else None


def one_minus_square(f):
    """``(y, sign)`` for ``sign*(1 - y**2)``, else None."""
    found = one_minus(f)
    if found is not None and found[0].is_Pow and found[0].exp == 2:
        return found[0].base, found[1]
    return None


def _padded(shape, rank: int) -> tuple:
    """``shape`` with leading 1s up to ``rank`` axes, as broadcasting lines it up with the frame."""
    return (1,) * (rank - len(shape)) + tuple(shape)


def _broadcasts_as(shape: list, target: list) -> bool:
    return all(s == t for s, t in zip(shape, target))


# the calls that only lay out memory: each is a call's time (and under autograd a backward node),
# which counts at small sizes; a line or gradient is printed in the frame that needs the fewest
LAYOUT_CALLS = re.compile(r"\.(?:view|reshape|expand|expand_as|permute|unsqueeze|squeeze|contiguous)\(|\.T\b")


def fit_shape(code: str, varying: list[int], frame: list, target: list, shape: list[str]) -> str:
    """``code``, a value printed in ``frame`` (size 1 except on the axes ``varying``), as a tensor
    whose axes are ``target`` (a frame index per axis, 0 for an axis of size 1) with sizes ``shape``
    (code): expanded where it lacks one of those axes (a broadcast input), permuted where their
    order differs from the frame's, then reshaped where the ranks differ (``(1, d)`` -> ``(d,)``)."""
    rank = len(frame)
    position = {i: k for k, i in enumerate(frame)}
    wanted = [(position[i], text) for i, text in zip(target, shape) if i != 0]
    layout = tuple("1" if k not in varying else next((t for a, t in wanted if a == k), "?") for k in range(rank))
    axes = tuple(next((t for a, t in wanted if a == k), "1") for k in range(rank))

    def sizes(dims):
        return ", ".join(dims) + ("," if len(dims) == 1 else "")

    if not shape and not varying:  # a whole tensor summed to a number: one reduction, no reshapes
        whole = _whole_reduction(code)
        if whole is not None:
            return whole
    wrapped = code if code.isidentifier() else f"({code})"
    if not varying and layout != axes and len(shape) >= rank:
        # one value spread over the target, a view of it in one call (``(dv/n).expand(n, 1)``, not
        # ``.expand(n,).reshape(n, 1)``): it broadcasts to any shape of its rank or more
        return f"{wrapped}.expand({sizes(tuple(shape))})"
    if layout != axes:
        wrapped += f".expand({sizes(axes)})"
    order = [a for a, _ in wanted]
    current = axes
    if order != sorted(order):
        rest = [k for k in range(rank) if k not in order]
        perm = order + rest
        wrapped += ".T" if perm == [1, 0] else f".permute({', '.join(map(str, perm))})"
        current = tuple(axes[k] for k in perm)
    if current != tuple(shape):
        wrapped += f".reshape({sizes(tuple(shape)) or '()'})"
    return code if wrapped == f"({code})" else wrapped


# (divided by a size after it, as a mean prints: ``(w.view(1, k)).sum(1, keepdim=True)/k``)
# or over several axes at once (``x.sum((0, 1), keepdim=True)``, 1.2x the time of ``x.sum()``)
_KEPT_REDUCTION = re.compile(r"^(?P<value>.+)\.(?P<how>sum|mean)\((\d+|\([\d, ]+\)), keepdim=True\)(?P<after>(/([A-Za-z_]\w*|\([A-Za-z_]\w*(\*[A-Za-z_]\w*)+\)))?)$")
_VIEW_OF_A_NAME = re.compile(r"^\(?(?P<name>[A-Za-z_]\w*)\.view\([^()]*\)\)?$")


def _whole_reduction(code: str) -> str | None:
    """``w.sum()`` for ``(w.view(1, k)).sum(1, keepdim=True)`` printed as a number (every axis it
    keeps has size 1, so it sums the whole tensor): one call where the frame's form is three (a view,
    the sum, a reshape to a number), which counts in a layer that small. None for any other code."""
    match = _KEPT_REDUCTION.match(code)
    if match is None or not _one_value(match["value"]):
        return None
    value = match["value"]
    view = _VIEW_OF_A_NAME.match(value)
    if view is not None and _one_value(value):
        value = view["name"]  # a view that only adds axes of size 1 to the tensor summed whole
    return f"{value if _one_value(value) else f'({value})'}.{match['how']}(){match['after']}"


def _one_value(text: str) -> bool:
    """Whether ``text`` is a name, a parenthesized expression or a chain of calls on one (a method
    call after it applies to all of it)."""
    depth = 0
    for k, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")
        if depth == 0 and ch in " +-*/@<>=&|~" and k > 0:
            return False
        if depth < 0:
            return False
    return depth == 0 and not text.startswith(("-", "~"))


__all__ = ["Frame", "KernelPrinter", "ForwardPrinter", "Red", "Max", "IsArgmax", "fit_shape", "temporaries"]
