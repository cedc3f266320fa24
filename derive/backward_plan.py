"""Print a full-size gradient in as few passes over memory as its algebra allows.

A fused formula such as batchnorm's
``dx = (n*dout - n*sum_bnraw_dout*bnraw/(n - 1) - sum_dout)*bnvar_inv*gamma/n``, evaluated as
written, makes one full-size temporary per operator. Expanded, it is a *linear combination* of
full-size tensors with small (per-column) coefficients,
``dx = a*dout + b*bnraw + c``, which torch computes in two passes:
``torch.addcmul(c, b, bnraw).addcmul_(a, dout)``. A one-hot term ``B*onehot(y)`` is not a
full-size tensor at all: it is ``n`` updates, ``dx.scatter_add_(1, y.view(n, 1), B)``
(the cross-entropy ``probs - onehot(y)`` never builds the ``(n, k)`` one-hot).

``linear_form`` returns those lines, or ``None`` when the formula is not of that shape (a product
of two full-size tensors, as in GELU's derivative): it is then printed as written.
"""
from __future__ import annotations

import functools
import re

import sympy as sp
import torch

from .backends import SOFTPLUS_ARGUMENTS
from .errors import DerivationError
from .functions import ACTIVATIONS, COMPARISON_MASKS, ActivationDerivative, Sigmoid, Step, step_argument
from .printer import (KernelPrinter, one_minus as _one_minus, one_minus_square as _one_minus_square, tensor_name,
                      varying_axes)
from .symbolic import Red, expand, multiplied_reciprocal, power_steps, reindex


def _label_delta(factor: sp.Expr, slots: dict):
    """``(class index, labels element)`` for ``KroneckerDelta(i_k, y[i_n])``, else None."""
    if not isinstance(factor, sp.KroneckerDelta):
        return None
    a, b = factor.args
    if isinstance(a, sp.Indexed):
        a, b = b, a
    if isinstance(a, sp.Idx) and a in slots and isinstance(b, sp.Indexed):
        return a, b
    return None


def linear_form(grad: str, expr: sp.Expr, printer: KernelPrinter, shapes: dict,
                scratch: str = "", partial: bool = False) -> list[str] | None:
    """Statements computing ``grad = expr`` as a linear combination plus label scatters, or None.

    ``scratch`` names a full-size buffer no longer needed, which the first statement writes into.
    With ``partial``, ``expr`` may be constant along some axes of the frame (a pick's frame
    ``(n, k, k)`` has its gathered axis, which the gradient does not vary on): ``grad`` then has
    size 1 there.
    """
    frame, slots = printer.frame.dims, printer.frame.slots
    full = varying_axes(expr, slots, shapes)
    if not full or (full != printer.frame.sized and not partial):
        return None
    groups: dict = {}  # full-size tensor (or None for the constant term) -> coefficient
    scatters: dict = {}  # (class index, labels) -> coefficient
    # a one-hot times a coefficient, as a product: the coefficient as written (multiplied out below,
    # the minimum of two variances' gradient was 60 operations on n values where 20 do)
    terms = sp.Add.make_args(expand(expr))
    factors = sp.Mul.make_args(expr)
    deltas = [d for d in (_label_delta(f, slots) for f in factors) if d]
    if len(deltas) == 1 and len(terms) > 1 and not any(f.atoms(sp.KroneckerDelta) for f in factors if not _label_delta(f, slots)):
        (index, labels), = deltas
        rest = sp.Mul(*[reindex(f, {index: labels}) for f in factors if not _label_delta(f, slots)])
        product = sp.KroneckerDelta(index, labels) * rest
        if slots[index] not in varying_axes(rest, slots, shapes) and isinstance(product, sp.Mul):
            terms = (product,)
    for term in terms:
        factors = sp.Mul.make_args(term)
        deltas = [d for d in (_label_delta(f, slots) for f in factors) if d]
        if len(deltas) == 1:
            # the one-hot is 0 off the label: the other factors are needed at the label only
            # (``counts*onehot(y)`` is ``counts[y]*onehot(y)``, a gather, not a full-size tensor)
            (index, labels), = deltas
            factors = [f if _label_delta(f, slots) else reindex(f, {index: labels}) for f in factors]
        big = [f for f in factors if not _label_delta(f, slots) and varying_axes(f, slots, shapes) == full]
        rest = sp.Mul(*[f for f in factors if f not in big and not _label_delta(f, slots)])
        if deltas:
            if len(deltas) > 1 or big:
                return None
            (index, labels), = deltas
            if slots[index] in varying_axes(rest, slots, shapes):
                return None
            scatters[(index, labels)] = scatters.get((index, labels), 0) + rest
            continue
        if len(big) > 1 or big and big[0].atoms(Red, sp.KroneckerDelta):
            return None
        key = big[0] if big else None
        groups[key] = groups.get(key, 0) + rest
    tensors = [t for t in groups if t is not None]
    if not scatters and any(not isinstance(t, (sp.Indexed, sp.Symbol)) for t in tensors):
        return None  # a function of a tensor (sigmoid(t)) goes through as written, unless a one-hot is to be scattered

    def text(e):
        return printer.doprint(sp.factor_terms(e))

    if not tensors and scatters and (not groups or list(groups) == [None]):
        # one-hots alone (a pick's gradient): zeros, then the scatters; or one-hots beside a value
        # constant along the frame's last axes (``g*x[y]`` everywhere, ``g*s`` at the label): that
        # value written once, broadcast, then the scatters (not a dense one-hot times a row)
        sizes = [printer.doprint(s) if k in full else "1" for k, s in enumerate(frame)]
        shape = f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"
        constant = groups.get(None)
        if constant is None:
            first = f"{printer.dtype_of}.new_zeros({shape})"
        elif printer._is_tensor(constant):
            first = f"{printer.dtype_of}.new_empty({shape}).copy_({text(constant)})"
        else:
            first = f"{printer.dtype_of}.new_full({shape}, {text(constant)})"
        return [f"{grad} = {first}"] + _scatters(grad, scatters, printer, slots, frame, text, full)
    if not tensors or len(groups) + len(scatters) < 2:
        return None

    tensors.sort(key=sp.default_sort_key)
    first, others = tensors[0], tensors[1:]
    constant = groups.get(None)
    tensor_constant = constant is not None and printer._is_tensor(constant)

    def plus(t, method: str, to: str = "") -> str:
        """``method(to, coefficient, t)`` (``addcmul``), or ``add`` with ``alpha=`` for a plain number."""
        c, to = groups[t], f"{to}, " if to else ""
        if printer._is_tensor(c):
            return f"{method}({to}{text(c)}, {printer.doprint(t)})"
        alpha = "" if c == 1 else f", alpha={text(c)}"
        return f"{method.replace('addcmul', 'add')}({to}{printer.doprint(t)}{alpha})"

    # The scratch buffer is written in place (not ``out=``, which autograd refuses when the
    # backward itself is differentiated): its old value is not needed by anyone, the graph included.
    if tensor_constant:
        lines = [f"{grad} = {scratch}.copy_({text(constant)}){plus(first, '.addcmul_')}" if scratch
                 else f"{grad} = {plus(first, 'torch.addcmul', text(constant))}"]
    elif scratch:
        lines = [f"{grad} = {scratch}.copy_({printer.doprint(first)})"
                 + ("" if groups[first] == 1 else f".mul_({text(groups[first])})")]
    elif groups[first] == 1:
        lines = [f"{grad} = {printer.doprint(first)}.clone()"]
    else:
        lines = [f"{grad} = {printer.doprint(first)} * ({text(groups[first])})"]
    lines += [f"{grad}{plus(t, '.addcmul_')}" for t in others]
    if constant is not None and not tensor_constant:
        lines.append(f"{grad}.add_({text(constant)})")
    return lines + _scatters(grad, scatters, printer, slots, frame, text, full)


def _scatters(grad: str, scatters: dict, printer, slots: dict, frame: list, text, full: set) -> list[str]:
    """``grad.scatter_add_`` of each one-hot term: n values, never a dense (n, k) one-hot. ``full``:
    the frame axes ``grad`` has (size 1 on the others)."""
    lines = []
    rank = len(frame)
    for (index, labels), coefficient in sorted(scatters.items(), key=lambda kv: sp.default_sort_key(kv[0][1])):
        axis = slots[index]
        label_axes = [slots[i] for i in labels.indices if isinstance(i, sp.Idx)]
        target = [printer.doprint(frame[k]) if k in label_axes else "1" for k in range(rank)]
        full_sizes = [printer.doprint(frame[k]) if k != axis and k in full else "1" for k in range(rank)]
        index_code = f"{labels.base}.view({', '.join(target)})"
        if full - set(label_axes) - {axis}:
            index_code += f".expand({', '.join(full_sizes)})"
        if printer._is_tensor(coefficient):
            source = f"({text(coefficient)}).expand({', '.join(full_sizes)})"
        else:
            source = f"{grad}.new_full(({', '.join(full_sizes)},), {text(coefficient)})"
        lines.append(f"{grad}.scatter_add_({axis}, {index_code}, {source})")
    return lines


# -- in-place chains ---------------------------------------------------------------------------
#
# Any other full-size formula, printed as written, allocates one full-size temporary per operator:
# ``(1 - out**2)*dout`` is three passes over memory and three fresh buffers. ``chain_form``
# computes it over as few buffers as its expression tree needs: a buffer is allocated by its first
# operation and then updated in place, one line per buffer (``dx = torch.add(t5, 1).mul_(t4)``),
# and what torch does in one pass is one call: ``a + c*b`` (``add_(b, alpha=c)``), ``a + b*c``
# (``addcmul_``), ``a + b/c`` (``addcdiv_``), and the one-pass kernels of autograd's own backward,
# each a polynomial of whatever tensors it is given: ``g*(1 - y**2)`` is ``tanh_backward(g, y)``,
# ``g*y*(1 - y)`` is ``sigmoid_backward(g, y)``, ``g*Step(u)`` is ``threshold_backward(g, u, 0)``.
#
# The operations are those of the formula as printed, in its order (a product left to right, its
# divisions last; a sum term by term), so the chain rounds as the printed formula does: only the
# numbers (literals, sizes, constants) of a product are multiplied together first. Reordering more
# is not safe: ``(x*counts)*s`` loses ``x*counts`` to denormals where ``(s*x)*counts`` does not.
#
# These lines run only in eager autograd's backward without a graph: a second derivative
# (``create_graph=True``), torch.func transforms and torch.compile take the formulas as written
# (``codegen``). Still, a buffer is never an argument of its own update, and a buffer read by
# another operation is not updated afterwards (every buffer is fresh; only the one being built is
# updated). A function's result is updated in place only where the printer writes it as torch's
# own call of an elementwise operation, a fresh tensor (``torch.exp(v1).mul_(k)``), applied in
# place where its argument is a buffer built here (``torch.sub(x, out).exp_()``); any other
# printed function may be a tensor the kernel did not make (a saved ``exp`` read by its name, a
# mask), so the next operation on it allocates (``v1.mul(c)``).

# one-pass kernels of autograd's own backward
_TANH_BACKWARD = "torch.ops.aten.tanh_backward"  # (g, y) -> g*(1 - y**2)
_SIGMOID_BACKWARD = "torch.ops.aten.sigmoid_backward"  # (g, y) -> g*(1 - y)*y
_THRESHOLD_BACKWARD = "torch.ops.aten.threshold_backward"  # (g, u, 0) -> g where u > 0, else 0
_SOFTPLUS_BACKWARD = "torch.ops.aten.softplus_backward"  # (g, z, beta, threshold) -> g*sigmoid(z)
# the arguments each takes after the upstream gradient and the saved value
_EXTRA_ARGUMENTS = {_THRESHOLD_BACKWARD: ", 0", _SOFTPLUS_BACKWARD: f", {SOFTPLUS_ARGUMENTS}"}
_KERNEL_VALUES = {_TANH_BACKWARD: "{g}*(1 - {y}**2)", _SIGMOID_BACKWARD: "{g}*(1 - {y})*{y}",
                  _THRESHOLD_BACKWARD: "{g} where {y} > 0, else 0", _SOFTPLUS_BACKWARD: "{g}*sigmoid({y})"}


for _op, _activation in reversed(ACTIVATIONS.items()):  # (gelu's own name for the kernel both gelus call)
    _KERNEL_VALUES[_activation.kernel()] = f"{{g}}*{_op}'({{y}})"


def _called(name: str, g: str, y: str, extra) -> str:
    """A one-pass kernel's call: ``name(g, y<extra>)``, or ``extra(g, y)`` for a kernel that takes
    its arguments in an order of its own (an activation's: ``elu_backward(g, alpha, 1, 1, False, y)``)."""
    return extra(g, y) if callable(extra) else f"{name}({g}, {y}{extra})"


class _Chain:
    """A full-size value built in one buffer: its allocating expression, then in-place updates."""

    def __init__(self, head: str, function: bool = False):
        self.head = head
        self.updates: list[str] = []
        self.frozen = function  # the head is a function's output: the next update allocates

    def then(self, method: str, arguments: str = "") -> "_Chain":
        self.updates.append(f".{method}({arguments})" if self.frozen else f".{method}_({arguments})")
        self.frozen = False
        return self

    def operations(self) -> int:
        """The calls it makes: the allocating one, then one per update."""
        return 1 + len(self.updates)

    def text(self) -> str:
        head = self.head if not self.updates or _atomic(self.head) else f"({self.head})"
        return head + "".join(self.updates)


def _mask_chain(text: str) -> _Chain:
    """A mask as the printer writes it: cast from bool (``(a >= b).to(g.dtype)``), a fresh tensor
    to update in place; by its name (a shared temporary), one the next operation must not write."""
    return _Chain(text, function=re.search(r"\)\.to\(\w+\.dtype\)$", text) is None)


@functools.cache
def _elementwise_in_place(name: str) -> bool:
    """Whether ``torch.<name>`` is an elementwise operation (torch's ``pointwise`` tag) with an
    in-place form (``exp_``): its result is a fresh tensor of its input's dtype, to update in place."""
    op = getattr(torch.ops.aten, name, None)
    return op is not None and hasattr(op, "default") and torch.Tag.pointwise in op.default.tags \
        and hasattr(torch.Tensor, f"{name}_")


def _one_mask(factors: list) -> list:
    """``factors`` with their masks multiplied into one, first: masks multiplied are one mask (``&``
    of bool tensors, one cast, as the printer writes them), not a full-size product per mask."""
    masks = [f for f in factors if isinstance(f, COMPARISON_MASKS)]
    if len(masks) < 2:
        return list(factors)
    return [sp.Mul(*masks, evaluate=False)] + [f for f in factors if f not in masks]


def _atomic(text: str) -> bool:
    """Whether ``text`` is a name or one call (``torch.mul(a, b)``): a method call then applies to all of it."""
    if text.isidentifier():
        return True
    head, paren, _ = text.partition("(")
    if not paren or not all(part.isidentifier() for part in head.split(".")):
        return False
    depth = 0
    for k, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and ch == ")":
            return k == len(text) - 1
    return False


class _Planner:
    """Writes the statements of one gradient: ``lines`` (its operand buffers), then its own chain."""

    def __init__(self, grad: str, printer: KernelPrinter, shapes: dict, taken: set, numbers: set):
        self.grad = grad
        self.numbers = numbers  # temporaries that hold a Python number (a size expression), not a tensor
        self.frame, self.slots = printer.frame.dims, printer.frame.slots
        self.shapes = dict(shapes)  # the buffers too, so the printer knows them as full-size tensors
        # (a sigmoid is a softplus's derivative there too, through softplus's kernel: ``kernel_of``)
        self.printer = KernelPrinter(printer.frame, self.shapes, printer.names, printer.dtype_of).knowing(printer)
        self.places = printer.tanhs  # the saved tanhs' places in the forward (the order of a chain)
        self.taken = set(taken)
        self.lines: list[str] = []
        self.notes: list[str] = []  # what each one-pass kernel used computes, for a comment

    # -- what a value is --------------------------------------------------------------------
    def full(self, e) -> bool:
        return varying_axes(e, self.slots, self.shapes) == self.printer.frame.sized

    @staticmethod
    def leaf(e) -> bool:
        """A value read as it is printed: a tensor, a temporary, a one-hot."""
        return isinstance(e, (sp.Indexed, sp.Symbol, sp.KroneckerDelta)) or not isinstance(
            e, (sp.Add, sp.Mul, sp.Pow, sp.Function))

    def number(self, e) -> bool:
        """A run-time number (a literal, a size, a constant): not a tensor."""
        return not e.atoms(sp.Indexed) and not any(
            s.name in self.shapes and s.name not in self.numbers for s in e.free_symbols if isinstance(s, sp.Symbol))

    def text(self, e) -> str:
        if e.is_number and e.is_Rational and not e.is_Integer:
            return repr(float(e))  # a coefficient made here: the float Python would make of it
        return self.printer.doprint(e)

    def wrapped(self, e) -> str:
        t = self.text(e)
        return t if t.isidentifier() else f"({t})"

    def operand(self, e) -> str:
        """``e`` as an argument: a small value or a leaf as printed, anything else in a buffer."""
        if not self.full(e) or self.leaf(e):
            return self.text(e)
        return self.buffer(e)

    def buffer(self, e) -> str:
        """``e`` computed into a fresh buffer of its own (a line before the gradient's); its name."""
        chain = self.chain(e)
        k = 1
        while f"{self.grad}_t{k}" in self.taken:
            k += 1
        name = f"{self.grad}_t{k}"
        self.taken.add(name)
        self.shapes[name] = tuple(self.frame)
        self.lines.append(f"{name} = {chain.text()}")
        return name

    def _calls(self, e) -> int:
        """The calls ``chain(e)`` makes, its operand buffers counted one each (tried, then taken back)."""
        lines, taken, shapes, notes = list(self.lines), set(self.taken), dict(self.shapes), list(self.notes)
        calls = self.chain(e).operations() + len(self.lines) - len(lines)
        # put back in place: the planner's printer reads the same ``shapes``
        self.lines[:], self.notes[:] = lines, notes
        self.taken.clear(), self.taken.update(taken)
        self.shapes.clear(), self.shapes.update(shapes)
        return calls

    def passes(self, e) -> int:
        """The full-size operations ``e`` makes printed as written (Python evaluating it left to right)."""
        if not self.full(e) or self.leaf(e):
            return 0
        if isinstance(e, (sp.Mul, sp.Add)):
            parts = e.as_ordered_factors() if isinstance(e, sp.Mul) else e.as_ordered_terms()
            return sum(self.passes(p) for p in parts) + len(parts) - 1
        return sum(self.passes(a) for a in e.args) + 1

    # -- chains ------------------------------------------------------------------------------
    def chain(self, e) -> _Chain:
        """A chain computing ``e`` (full-size, not a leaf)."""
        if self.printer.is_one_call(e):  # torch's kernel, one pass into a fresh tensor (``scatter_add``)
            return _Chain(self.text(e))
        if isinstance(e, sp.Mul) and all(isinstance(f, COMPARISON_MASKS) for f in e.args):
            return _mask_chain(self.text(e))  # one mask, as the printer writes it
        if isinstance(e, sp.Mul):
            return self.product(e)
        if isinstance(e, sp.Add):
            return self.total(e)
        return self.single(e)

    def single(self, e) -> _Chain:
        """A power or a function of full-size values."""
        if isinstance(e, COMPARISON_MASKS):
            # a mask compares its sides as the printer writes it (``(0.5 >= v1)``): its argument
            # computed into a buffer first (``0.5 - v1``, then ``>= 0``) is a pass for nothing
            return _mask_chain(self.text(e))
        if isinstance(e, sp.Pow):
            base, exponent = e.as_base_exp()
            if exponent.is_Integer and exponent > 1:
                steps = power_steps(int(exponent))
                if steps is None:  # as printed (``symbolic.power_steps``)
                    return _Chain(self.text(e))
                calls = [("square", "") if step == 2 else ("pow", "3") for step in steps]
                if self.leaf(base):
                    method, argument = calls.pop(0)
                    chain = _Chain(f"torch.{method}({self.text(base)}{', ' * bool(argument)}{argument})")
                else:
                    chain = self.chain(base)
                for method, argument in calls:
                    chain.then(method, argument)
                return chain
        method = self._in_place_function(e)
        if method is not None:
            return self.chain(e.args[0]).then(method)
        # anything else as the printer writes it, its full-size arguments computed first
        arguments = {a: sp.Symbol(self.buffer(a)) for a in e.args if self.full(a) and not self.leaf(a)}
        text = self.text(e.xreplace(arguments))
        # (a function's result is another's tensor, unless the printer calls torch for it: ``torch.exp(v1)``)
        call = re.fullmatch(r"torch\.(\w+)\(.*\)", text)
        fresh = call is not None and _atomic(text) and _elementwise_in_place(call.group(1))
        return _Chain(text, function=isinstance(e, sp.Function) and not fresh)

    def _in_place_function(self, e) -> str | None:
        """The method name of a function of one computed full-size value that the printer writes as
        torch's own call of it (``torch.exp(t)``) and that tensors have in place (``exp_``): applied
        to that value's chain it needs no buffer of its own (``torch.sub(x, out).exp_().mul_(g)``,
        one allocation where ``torch.exp(t).mul(g)`` made three). None for anything else: its
        output, another call's (a saved tensor, a mask), is not a fresh buffer to update."""
        if not isinstance(e, sp.Function) or len(e.args) != 1 or self.leaf(e.args[0]) or not self.full(e.args[0]):
            return None
        probe = "_in_place_probe"
        self.shapes[probe] = tuple(self.frame)  # a full-size tensor to the printer
        try:
            call = re.fullmatch(rf"torch\.(\w+)\({probe}\)", self.text(e.func(sp.Symbol(probe))))
        finally:
            del self.shapes[probe]
        if call is None or not _elementwise_in_place(call.group(1)):
            return None
        return call.group(1)

    def product(self, e) -> _Chain:
        """A product as the printer writes it: its factors left to right, then divided by its
        denominators; its numbers multiplied together first."""
        factors = e.as_ordered_factors()
        numbers = sp.Mul(*[f for f in factors if self.number(f)])
        tensors = [f for f in factors if not self.number(f)]
        # ``q**(-3/2)`` multiplies as ``rsqrt(q)**3``, ``q**-2`` as ``(1/q)**2``
        # (symbolic.multiplied_reciprocal): numerators
        divides = [f for f in tensors if f.is_Pow and f.exp.is_negative and not multiplied_reciprocal(f)]
        denominators = [1 / f for f in divides]
        numerators = [f for f in tensors if f not in divides]
        small_den = [d for d in denominators if not self.full(d)]
        if small_den:  # small tensors it divides by go last, as printed, with the numbers it divides by
            numbers = sp.Mul(*[f for f in factors if self.number(f) and not (f.is_Pow and f.exp.is_negative)])
            small_den = [sp.Mul(*small_den, *[1 / f for f in factors if self.number(f) and f.is_Pow
                                              and f.exp.is_negative])]
        full_den = [d for d in denominators if self.full(d)]
        chain = self.kernel(numerators, numbers)
        within = self.printer.one_call_within(e) if chain is None else None
        if within is not None:
            # torch's softmax or log-softmax backward, then each other factor in place, as printed
            code, others = within
            chain = _Chain(code)
            for f in others:
                self.times(chain, f)
            return chain
        if chain is None:
            chain = self.small_factors_first(e)
            if chain is not None:
                return chain
            chain, prefix, rest = None, numbers, list(numerators)
            rest = _one_mask(rest)
            while rest:
                f = rest.pop(0)
                if chain is None and not self.full(f):
                    prefix *= f
                elif chain is None:
                    if prefix != 1 and small_den:
                        # the small values it divides by (one product) meet the small ones before the
                        # full-size factor, as printed (``tanh_backward(g, v)/s*v*x**2``): not a pass
                        # of their own after it
                        prefix, small_den = prefix / small_den[0], []
                    chain = self.first_factor(f, prefix, rest, full_den)
                else:
                    chain.then("mul", self.operand(f))
            if chain is None:  # small factors that broadcast to full size: as printed
                chain = _Chain(self.text(prefix * sp.Mul(*[1 / d for d in full_den])))
                full_den = []
        for d in full_den:
            chain.then("div", self.operand(d))
        for d in small_den:
            chain.then("div", self.text(d))
        return chain

    def small_factors_first(self, e) -> _Chain | None:
        """A product the printer writes as its small factors' product times each full-size factor
        in turn (``KernelPrinter._small_factors_first``, ``(6*g*v/(k*s))*x**2``): the first
        full-size factor's buffer times (or divided into) that product, then the others multiplied
        or divided in place, the printer's operations in its order. None where it prints the
        product another way (a mean, reciprocal roots, a masked count's ``where``)."""
        grouped = self.printer.small_factors_grouped(e)
        if grouped is None or self.text(e) != self.printer._small_factors_first(e):
            return None
        small, large = grouped
        large = _one_mask(large)
        chain = None
        for f in large:
            base, exponent = f.as_base_exp()
            if chain is None and exponent.is_number and exponent.is_negative:
                chain = _Chain(f"torch.div({self.text(small)}, {self.operand(base ** -exponent)})")
            elif chain is None:
                chain = self.first_factor(f, small, [], [])
            else:
                self.times(chain, f)
        return chain

    def times(self, chain: _Chain, f) -> _Chain:
        """``chain`` multiplied in place by the factor ``f``, or divided by its base where its exponent
        is negative (``/(v**2 + 1)``, as ``KernelPrinter._times_each`` prints it)."""
        base, exponent = f.as_base_exp()
        if exponent.is_number and exponent.is_negative:
            return chain.then("div", self.operand(base ** -exponent))
        return chain.then("mul", self.operand(f))

    def first_factor(self, f, prefix, rest: list, denominators: list) -> _Chain:
        """The buffer of a product's first full-size factor times what came before it, or (a tensor
        alone) times the factor after it (taken from ``rest`` or ``denominators``)."""
        if not self.leaf(f):
            chain = self.chain(f)
            return chain if prefix == 1 else self.scaled(chain, prefix)
        if prefix == -1:
            return _Chain(f"torch.neg({self.text(f)})")
        if prefix != 1:
            return _Chain(f"torch.mul({self.text(f)}, {self.text(prefix)})")
        if rest:
            g = rest.pop(0)
            if self.leaf(g) or not self.full(g):
                return _Chain(f"torch.mul({self.text(f)}, {self.text(g)})")
            return self.chain(g).then("mul", self.text(f))  # f*g is g*f, exactly
        if denominators:
            return _Chain(f"torch.div({self.text(f)}, {self.operand(denominators.pop(0))})")
        return _Chain(f"{self.wrapped(f)}.clone()")

    def scaled(self, chain: _Chain, factor) -> _Chain:
        return chain.then("neg") if factor == -1 else chain.then("mul", self.text(factor))

    def kernel(self, numerators, numbers) -> _Chain | None:
        """The product through one of autograd's one-pass kernels, if one fits it: the kernel
        applied to the rest of the product (a tensor, or the rest in a buffer), then the numbers."""
        for f, found in self.kernels_of(numerators):
            name, argument, used, sign, extra = found
            rest = list(numerators)
            for u in used:
                rest.remove(u)
            if not rest:
                continue
            # the upstream gradient alone through the kernel, the other factors after it, as the
            # printed formula reads (``KernelPrinter._kernel_of_gradient``): the kernel's 0 of a
            # saturated tanh meets one factor at a time, never their overflowed product
            inside, outside = self.printer.upstream_first(rest)
            # a chain of them (``tanh(tanh(x))``): each link's kernel takes the last one's result, as
            # autograd's backward does, where a factor multiplied in would be passes of their own
            links = []
            while True:
                link = next(iter(self.kernels_of(outside)), None)
                if link is None:
                    break
                link_name, link_argument, used, link_sign, link_extra = link[1]
                for u in used:
                    outside.remove(u)
                sign *= link_sign
                links.append((link_name, link_argument, link_extra))
            factor = numbers * sign
            given = sp.Mul(*inside)
            if factor != 1 and not self.full(given):
                # the numbers scale the small gradient the kernel is given (``dv.sum()/(k*n)``), as
                # the printed formula does (``KernelPrinter._kernel_of_gradient``), not its full-size
                # result (a pass of their own)
                given, inside, factor = factor * given, [factor * given], sp.S.One
            grad = self.text(inside[0]) if len(inside) == 1 and self.leaf(inside[0]) else self.buffer(given)
            y = self.operand(argument)
            call = _called(name, grad, y, extra)
            self.notes.append(f"{call.removeprefix('torch.ops.aten.')} = " + _KERNEL_VALUES[name].format(g=grad, y=y))
            for link_name, link_argument, link_extra in links:
                call = _called(link_name, call, self.operand(link_argument), link_extra)
            chain = _Chain(call)
            for r in outside:
                chain.then("mul", self.operand(r))
            return chain if factor == 1 else self.scaled(chain, factor)
        return None

    def kernels_of(self, factors: list) -> list:
        """``[(factor, kernel_of(factor))]`` for the factors that are a one-pass kernel's, the one
        nearest the output first (for tanh: their place in the forward, ``KernelPrinter.tanhs``)."""
        found = [(f, k) for f in factors for k in [self.kernel_of(f, factors)] if k is not None]
        return sorted(found, key=lambda fk: -self.places.get(tensor_name(fk[1][1]), -1))

    def kernel_of(self, f, factors):
        """``(kernel, argument, factors it replaces, sign, extra arguments)`` when ``f`` is the
        polynomial factor of one of autograd's one-pass kernels, else None."""
        if isinstance(f, Step) and self.full(step_argument(f.args[0])):
            return _THRESHOLD_BACKWARD, step_argument(f.args[0]), [f], 1, _EXTRA_ARGUMENTS[_THRESHOLD_BACKWARD]
        if isinstance(f, ActivationDerivative) and self.full(f.args[0]):
            activation, numbers = f.activation, [self.text(a) for a in f.args[1:]]
            return activation.kernel(), f.args[0], [f], 1, lambda g, y: activation.backward_call(g, y, numbers)
        if isinstance(f, Sigmoid) and self.printer.softplus_grads and self.full(f.args[0]):
            # a softplus's derivative, as the printer writes it (``KernelPrinter._softplus_backward``):
            # ``exp(z)/(exp(z) + 1)`` keeps the subnormal digits ``torch.sigmoid`` loses
            return _SOFTPLUS_BACKWARD, f.args[0], [f], 1, _EXTRA_ARGUMENTS[_SOFTPLUS_BACKWARD]
        y = _one_minus_square(f)
        if y is not None and self.full(y[0]):
            return _TANH_BACKWARD, y[0], [f], y[1], ""
        y = _one_minus(f)
        if y is not None and y[0] in factors and self.full(y[0]):
            return _SIGMOID_BACKWARD, y[0], [f, y[0]], y[1], ""
        if y is not None and y[0] + 1 in factors and self.full(y[0]):  # (y - 1)*(y + 1), factored
            return _TANH_BACKWARD, y[0], [f, y[0] + 1], y[1], ""
        return None

    def total(self, e) -> _Chain:
        """A sum as the printer writes it: term by term, left to right."""
        terms = [t for t in sorted(e.as_ordered_terms(), key=lambda t: t.could_extract_minus_sign())]
        small, chain = sp.S.Zero, None
        while terms:
            t = terms.pop(0)
            if chain is None and not self.full(t):
                small += t
            elif chain is None:
                chain = self.first_term(t, small, terms)
            elif not self.full(t):
                chain.then("add", self.text(t))
            else:
                self.accumulate(chain, *self.split(t))
        if chain is None:  # small terms that broadcast to full size: as printed
            return _Chain(self.text(e))
        return chain

    def first_term(self, t, small, rest: list) -> _Chain:
        """The buffer of a sum's first full-size term plus what came before it, or (a tensor alone)
        plus the term after it (taken from ``rest``): one call where torch has one."""
        coefficient, product = self.split(t)
        if small != 0:
            chain = self.start(coefficient, product, small)
            if chain is not None:
                return chain
            if t.could_extract_minus_sign():  # ``small - u``: one subtraction
                positive = self.chain(-t).text()
                if self.number(small):
                    return _Chain(f"torch.rsub({positive}, {self.text(small)})")
                return _Chain(f"torch.sub({self.text(small)}, {positive})")
            chain = self.chain(t) if not self.leaf(t) else _Chain(f"{self.wrapped(t)}.clone()")
            return chain.then("add", self.text(small))
        if not self.leaf(t):
            return self.chain(t)
        if not rest:
            return _Chain(f"{self.wrapped(t)}.clone()")
        u = rest.pop(0)
        if not self.full(u):
            return _Chain(f"torch.add({self.text(t)}, {self.text(u)})")
        c, p = self.split(u)
        if self.plain(p) and self.number(c):
            chain = _Chain("")
            self.accumulate(chain, c, p)
            method, _, arguments = chain.updates[0][1:].partition("_(")
            return _Chain(f"torch.{method}({self.text(t)}, {arguments}")
        if u.could_extract_minus_sign():
            # ``t - v``, unless ``u`` as it is takes fewer calls: a tanh kernel's sign cancels the
            # minus (``tanh_backward(g, y).add_(t)``, where ``t - v`` negates a full-size buffer first)
            if self._calls(u) < self._calls(-u):
                return self.chain(u).then("add", self.text(t))
            return _Chain(f"torch.sub({self.text(t)}, {self.buffer(-u)})")
        return self.chain(u).then("add", self.text(t))  # t + u is u + t, exactly

    def split(self, term) -> tuple:
        """(small coefficient, product of full-size factors) of one term."""
        factors = sp.Mul.make_args(term)
        if not any(self.full(f) for f in factors):  # full-size only together (``r[i, 0]*g[j]``): its
            # numbers are the coefficient, its tensors the product (broadcast by the update itself)
            return (sp.Mul(*[f for f in factors if self.number(f)]), sp.Mul(*[f for f in factors if not self.number(f)]))
        return (sp.Mul(*[f for f in factors if not self.full(f)]), sp.Mul(*[f for f in factors if self.full(f)]))

    def plain(self, product) -> bool:
        """A tensor, or a product or quotient of two, each read as it is (one ``add_``,
        ``addcmul_`` or ``addcdiv_`` adds it)."""
        factors = sp.Mul.make_args(product)
        if len(factors) == 1:
            return self.leaf(factors[0])
        inverse = [f for f in factors if f.is_Pow and f.exp == -1 and self.leaf(f.base)]
        return len(factors) == 2 and len(inverse) <= 1 and all(self.leaf(f) or f in inverse for f in factors)

    def start(self, coefficient, product, small) -> _Chain | None:
        """``small + coefficient*product`` in one call, where torch has one; else None."""
        if not self.plain(product):
            return None
        factors = sp.Mul.make_args(product)
        number = self.number(coefficient)
        if len(factors) == 1:
            tensor = self.text(factors[0])
            if not self.number(small):
                if number:
                    alpha = "" if coefficient == 1 else f", alpha={self.text(coefficient)}"
                    return _Chain(f"torch.add({self.text(small)}, {tensor}{alpha})")
                return _Chain(f"torch.addcmul({self.text(small)}, {self.text(coefficient)}, {tensor})")
            if coefficient == 1:
                return _Chain(f"torch.add({tensor}, {self.text(small)})")
            if coefficient == -1:
                return _Chain(f"torch.rsub({tensor}, {self.text(small)})")
            return None
        if number and not self.number(small):
            a, b = factors
            value = "" if coefficient == 1 else f", value={self.text(coefficient)}"
            if a.is_Pow or b.is_Pow:
                a, b = (b, a.base) if a.is_Pow else (a, b.base)
                return _Chain(f"torch.addcdiv({self.text(small)}, {self.text(a)}, {self.text(b)}{value})")
            return _Chain(f"torch.addcmul({self.text(small)}, {self.text(a)}, {self.text(b)}{value})")
        return None

    def accumulate(self, chain: _Chain, coefficient, product) -> None:
        """``chain += coefficient*product``, in one update where torch has one."""
        factors = sp.Mul.make_args(product)
        number = self.number(coefficient)
        if self.plain(product) and len(factors) == 1:
            tensor = self.text(factors[0])
            if not number:
                chain.then("addcmul", f"{self.text(coefficient)}, {tensor}")
            elif coefficient == -1:
                chain.then("sub", tensor)
            else:
                chain.then("add", tensor + ("" if coefficient == 1 else f", alpha={self.text(coefficient)}"))
            return
        if self.plain(product) and number:
            a, b = factors
            value = "" if coefficient == 1 else f", value={self.text(coefficient)}"
            if a.is_Pow or b.is_Pow:
                a, b = (b, a.base) if a.is_Pow else (a, b.base)
                chain.then("addcdiv", f"{self.text(a)}, {self.text(b)}{value}")
            else:
                chain.then("addcmul", f"{self.text(a)}, {self.text(b)}{value}")
            return
        term = coefficient * product
        negative = term.could_extract_minus_sign()
        chain.then("sub" if negative else "add", self.buffer(-term if negative else term))


def chain_form(grad: str, expr: sp.Expr, printer: KernelPrinter, shapes: dict, taken: set,
               numbers: set = frozenset()) -> list[str] | None:
    """Statements computing the full-size ``grad = expr`` over few buffers, updated in place (see
    above), or None when ``expr`` is not full-size or is one product of two tensors anyway.
    ``numbers``: the temporaries in ``shapes`` that hold a Python number, not a tensor."""
    planner = _Planner(grad, printer, shapes, taken, set(numbers))
    if not planner.full(expr) or planner.leaf(expr) or printer.is_one_call(expr):
        return None
    if any(m.is_Mul and printer.bounded_ratios(m)[2] for m in sp.preorder_traversal(expr)):
        return None  # a factor divided before it is multiplied in (``KernelPrinter.bounded_ratios``): as printed
    try:
        chain = planner.chain(expr)
    except DerivationError:
        return None
    if not planner.lines and not chain.updates and not chain.head.startswith(_KERNELS) and planner.passes(expr) <= 1:
        return None  # one operation either way: as written
    notes = [f"# {note}, in one pass (autograd's own kernel)" for note in dict.fromkeys(planner.notes)]
    return notes + planner.lines + [f"{grad} = {chain.text()}"]


_KERNELS = (_TANH_BACKWARD, _SIGMOID_BACKWARD, _THRESHOLD_BACKWARD, _SOFTPLUS_BACKWARD)


def one_kernel_of(chain: list[str], upstream: str) -> str | None:
    """The tensor that ``chain`` (``chain_form``'s statements) passes, with the upstream gradient
    alone, to one of autograd's one-pass kernels, when that one call is the whole gradient
    (``dx = tanh_backward(dout, out)``); else None."""
    found = kernel_chain_of(chain, upstream)
    return found[0][1] if found is not None and len(found) == 1 else None

# the one-pass kernel autograd's backward of each operation runs (``derivatives.yaml``), and the
# value it reads: the operation's output (``TanhBackward0``: ``tanh_backward(grad, result)``) or,
# for ``relu``, the output or the input (``u > 0`` is ``relu(u) > 0``)
AUTOGRAD_KERNEL_OF = {"tanh": (_TANH_BACKWARD, ("output",)), "sigmoid": (_SIGMOID_BACKWARD, ("output",)),
                      "relu": (_THRESHOLD_BACKWARD, ("output", "input"))}


def kernel_chain_of(chain: list[str], upstream: str) -> list[tuple[str, str]] | None:
    """``[(kernel, tensor)]``, outermost call first, when ``chain`` (``chain_form``'s statements) is
    the upstream gradient passed through one-pass kernels and nothing else
    (``dx = tanh_backward(tanh_backward(dv2, v2), v1)``: ``[(tanh_backward, v1), (tanh_backward, v2)]``);
    else None."""
    code = [line for line in chain if not line.lstrip().startswith("#")]
    if len(code) != 1:
        return None
    _, _, call = code[0].partition(" = ")
    found = []
    while call != upstream:
        for name in _KERNELS:
            tail = _EXTRA_ARGUMENTS.get(name, "") + ")"
            if call.startswith(f"{name}(") and call.endswith(tail):
                inner, _, tensor = call[len(name) + 1:-len(tail)].rpartition(", ")
                if not tensor.isidentifier() or not inner:
                    return None
                found.append((name, tensor))
                call = inner
                break
        else:
            return None
    return found or None


__all__ = ["linear_form", "chain_form", "one_kernel_of", "kernel_chain_of", "AUTOGRAD_KERNEL_OF"]
