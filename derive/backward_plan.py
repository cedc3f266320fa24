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

import sympy as sp

from .errors import DerivationError
from .functions import Step
from .printer import KernelPrinter, temporaries
from .symbolic import expand


def _axes(expr: sp.Expr, slots: dict, shapes: dict, frame: list) -> set:
    """The frame axes ``expr`` varies on."""
    axes = {slots[s] for s in expr.free_symbols if s in slots}
    for s in temporaries(expr, shapes):
        axes |= {k for k, size in enumerate(shapes[s.name]) if size != 1}
    return axes


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
                scratch: str = "") -> list[str] | None:
    """Statements computing ``grad = expr`` as a linear combination plus label scatters, or None.

    ``scratch`` names a full-size buffer no longer needed, which the first statement writes into.
    """
    frame, slots = printer.frame.dims, printer.frame.slots
    full = set(range(len(frame)))
    if _axes(expr, slots, shapes, frame) != full:
        return None
    groups: dict = {}  # full-size tensor (or None for the constant term) -> coefficient
    scatters: dict = {}  # (class index, labels) -> coefficient
    for term in sp.Add.make_args(expand(expr)):
        factors = sp.Mul.make_args(term)
        deltas = [d for d in (_label_delta(f, slots) for f in factors) if d]
        big = [f for f in factors if not _label_delta(f, slots) and _axes(f, slots, shapes, frame) == full]
        rest = sp.Mul(*[f for f in factors if f not in big and not _label_delta(f, slots)])
        if deltas:
            if len(deltas) > 1 or big:
                return None
            (index, labels), = deltas
            if slots[index] in _axes(rest, slots, shapes, frame):
                return None
            scatters[(index, labels)] = scatters.get((index, labels), 0) + rest
            continue
        if len(big) > 1 or big and not isinstance(big[0], (sp.Indexed, sp.Symbol)):
            return None
        key = big[0] if big else None
        groups[key] = groups.get(key, 0) + rest
    tensors = [t for t in groups if t is not None]
    if not tensors or len(groups) + len(scatters) < 2:
        return None

    def text(e):
        return printer.doprint(sp.factor_terms(e))

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
    rank = len(frame)
    for (index, labels), coefficient in sorted(scatters.items(), key=lambda kv: sp.default_sort_key(kv[0][1])):
        axis = slots[index]
        label_axes = [slots[i] for i in labels.indices if isinstance(i, sp.Idx)]
        target = [printer.doprint(frame[k]) if k in label_axes else "1" for k in range(rank)]
        full_sizes = [printer.doprint(frame[k]) if k != axis else "1" for k in range(rank)]
        index_code = f"{labels.base}.view({', '.join(target)})"
        if set(range(rank)) - set(label_axes) - {axis}:
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
# operation and then updated in place, one line per buffer
# (``dx = torch.mul(a, b).mul_(c).add_(d)``), and what torch does in one pass is one call:
# ``a + c*b`` (``add_(b, alpha=c)``), ``a + b*c`` (``addcmul_``), ``a + b/c`` (``addcdiv_``), and the
# one-pass kernels of autograd's own backward
_TANH_BACKWARD = "torch.ops.aten.tanh_backward"  # (g, y) -> g*(1 - y**2)
_SIGMOID_BACKWARD = "torch.ops.aten.sigmoid_backward"  # (g, y) -> g*(1 - y)*y
_THRESHOLD_BACKWARD = "torch.ops.aten.threshold_backward"  # (g, u, 0) -> g where u > 0, else 0

# The planner weighs the ways it can print a formula (which term starts a sum's buffer, whether a
# small factor goes into a sum or is applied after it) by the passes over memory they make; each
# way is printed in full to be counted, so a large formula gets this many tries, then the first way.
PLAN_TRIES = 400


class _Chain:
    """``scale`` times a full-size value built in one buffer: its allocating expression, then
    in-place updates. ``scale`` (small) is still to be applied, or absorbed by whoever reads it."""

    def __init__(self, head: str, function: bool = False, plain: bool = False):
        self.head = head
        self.updates: list[str] = []
        self.frozen = function  # the head is a function's output: the next update allocates
        self.allocations = 1
        self.scale = sp.S.One
        self.plain = plain  # ``torch.mul(a, b)`` of two tensors: no better than ``a*b``

    def then(self, method: str, arguments: str = "") -> "_Chain":
        self.updates.append(f".{method}({arguments})" if self.frozen else f".{method}_({arguments})")
        self.allocations += self.frozen
        self.frozen = self.plain = False
        return self

    def text(self) -> str:
        head = self.head if not self.updates or _atomic(self.head) else f"({self.head})"
        return head + "".join(self.updates)

    @property
    def passes(self) -> int:
        return 1 + len(self.updates)


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

    def __init__(self, grad: str, printer: KernelPrinter, shapes: dict, taken: set):
        self.grad = grad
        self.frame, self.slots = printer.frame.dims, printer.frame.slots
        self.shapes = dict(shapes)  # the buffers too, so the printer knows them as full-size tensors
        self.printer = KernelPrinter(printer.frame, self.shapes, printer.names, printer.dtype_of)
        self.taken = set(taken)
        self.lines: list[str] = []
        self.passes = 0  # full-size passes over memory of the buffers written so far
        self.allocations = 0
        self.tries = 0

    # -- what a value is --------------------------------------------------------------------
    def full(self, e) -> bool:
        return _axes(e, self.slots, self.shapes, self.frame) == set(range(len(self.frame)))

    @staticmethod
    def leaf(e) -> bool:
        """A value read as it is printed: a tensor, a temporary, a one-hot."""
        return isinstance(e, (sp.Indexed, sp.Symbol, sp.KroneckerDelta)) or not isinstance(
            e, (sp.Add, sp.Mul, sp.Pow, sp.Function))

    def plain(self, product) -> bool:
        """A tensor, or a product or quotient of two, each read as it is (one ``add_``,
        ``addcmul_`` or ``addcdiv_`` adds it)."""
        factors = sp.Mul.make_args(product)
        if len(factors) == 1:
            return self.leaf(factors[0])
        inverse = [f for f in factors if f.is_Pow and f.exp == -1 and self.leaf(f.base)]
        return len(factors) == 2 and len(inverse) <= 1 and all(self.leaf(f) or f in inverse for f in factors)

    def text(self, e) -> str:
        return self.printer.doprint(e)

    def wrapped(self, e) -> str:
        t = self.text(e)
        return t if t.isidentifier() else f"({t})"

    def number(self, e) -> bool:
        """A run-time number (sizes and constants too): not a tensor."""
        return not self.printer._is_tensor(e)

    # -- choosing among ways to print ------------------------------------------------------
    def best(self, ways: list) -> _Chain:
        """The chain of the way (a function building one) with the fewest passes over memory."""
        if len(ways) == 1 or self.tries >= PLAN_TRIES:
            return ways[0]()
        state = (list(self.lines), set(self.taken), dict(self.shapes), self.passes, self.allocations)
        scores = []
        for k, way in enumerate(ways):
            self.tries += 1
            chain = way()
            scores.append((self.passes + chain.passes + 0.5 * (chain.scale != 1),
                           self.allocations + chain.allocations, k))
            self.lines, self.taken, self.shapes, self.passes, self.allocations = (
                list(state[0]), set(state[1]), dict(state[2]), state[3], state[4])
        return ways[min(scores)[2]]()

    # -- buffers -----------------------------------------------------------------------------
    def finish(self, chain: _Chain) -> _Chain:
        """Apply the chain's pending scale."""
        scale, chain.scale = chain.scale, sp.S.One
        if scale == -1:
            chain.then("neg")
        elif scale != 1:
            chain.then("mul", self.text(scale))
        return chain

    def buffer(self, e, keep_number_scale: bool = False) -> tuple[str, sp.Expr]:
        """``e`` computed into a fresh buffer of its own (a line before the gradient's): its name,
        and the numeric scale left to apply (1 unless ``keep_number_scale``)."""
        chain = self.chain(e)
        scale = sp.S.One
        if keep_number_scale and chain.scale.is_number:
            scale, chain.scale = chain.scale, sp.S.One
        self.finish(chain)
        k = 1
        while f"{self.grad}_t{k}" in self.taken:
            k += 1
        name = f"{self.grad}_t{k}"
        self.taken.add(name)
        self.shapes[name] = tuple(self.frame)
        self.lines.append(f"{name} = {chain.text()}")
        self.passes += chain.passes
        self.allocations += chain.allocations
        return name, scale

    def operand(self, e) -> str:
        """``e`` as an argument: a small value or a leaf as printed, anything else in a buffer."""
        if not self.full(e) or self.leaf(e):
            return self.wrapped(e)
        return self.buffer(e)[0]

    # -- chains ------------------------------------------------------------------------------
    def chain(self, e, coefficient=sp.S.One) -> _Chain:
        """A chain whose value times its scale is ``coefficient*e`` (``e`` full-size, not a leaf;
        ``coefficient`` small)."""
        if isinstance(e, sp.Mul):
            return self.product(list(sp.Mul.make_args(e)) + list(sp.Mul.make_args(coefficient)))
        if isinstance(e, sp.Add):
            return self.total([coefficient * t for t in e.args])
        chain = self.single(e)
        chain.scale = coefficient
        return chain

    def single(self, e) -> _Chain:
        """A power or a function of full-size values."""
        if isinstance(e, sp.Pow):
            base, exponent = e.as_base_exp()
            if exponent.is_Integer and exponent > 1:
                method, argument = ("square", "") if exponent == 2 else ("pow", self.text(exponent))
                if self.leaf(base):
                    return _Chain(f"torch.{method}({self.wrapped(base)}{', ' * bool(argument)}{argument})")
                return self.finish(self.chain(base)).then(method, argument)
        # anything else as the printer writes it, its full-size arguments computed first
        arguments = {a: sp.Symbol(self.buffer(a)[0]) for a in e.args if self.full(a) and not self.leaf(a)}
        return _Chain(self.text(e.xreplace(arguments)), function=isinstance(e, sp.Function))

    def product(self, factors: list) -> _Chain:
        small = sp.Mul(*[f for f in factors if not self.full(f)])
        big = [f for f in factors if self.full(f)]
        denominators = [1 / f for f in big if f.is_Pow and f.exp.is_negative]
        numerators = [f for f in big if not (f.is_Pow and f.exp.is_negative)]
        compound = [f for f in numerators if not self.leaf(f)]
        if any(self.kernel_of(f, numerators) for f in numerators):
            return self.kernel(numerators, denominators, small)
        if not compound:
            return self.leaves(numerators, denominators, small)
        ways = []
        for head in compound:
            ways.append(lambda head=head: self.product_from(head, numerators, denominators, small, push=False))
            if head.is_Add and small != 1:
                ways.append(lambda head=head: self.product_from(head, numerators, denominators, small, push=True))
        return self.best(ways)

    def product_from(self, head, numerators, denominators, small, push: bool) -> _Chain:
        """The product with the buffer of ``head``; ``push``: the small factor goes into its terms."""
        chain = self.chain(head, small if push else sp.S.One)
        if not push:
            chain.scale *= small
        rest = list(numerators)
        rest.remove(head)
        return self.times(chain, rest, denominators)

    def times(self, chain: _Chain, numerators, denominators) -> _Chain:
        for f in numerators:
            if self.leaf(f):
                chain.then("mul", self.wrapped(f))
            else:
                name, scale = self.buffer(f, keep_number_scale=True)
                chain.then("mul", name)
                chain.scale *= scale
        for f in denominators:
            if self.leaf(f):
                chain.then("div", self.wrapped(f))
            else:
                name, scale = self.buffer(f, keep_number_scale=True)
                chain.then("div", name)
                chain.scale /= scale
        return chain

    def leaves(self, numerators, denominators, small) -> _Chain:
        """A product of tensors read as they are."""
        if len(numerators) >= 2:
            chain = _Chain(f"torch.mul({self.wrapped(numerators[0])}, {self.wrapped(numerators[1])})", plain=True)
            chain.scale = small
            return self.times(chain, numerators[2:], denominators)
        if numerators and denominators and self.leaf(denominators[0]):
            chain = _Chain(f"torch.div({self.wrapped(numerators[0])}, {self.wrapped(denominators[0])})")
            chain.scale = small
            return self.times(chain, [], denominators[1:])
        if numerators and small == -1:
            chain = _Chain(f"torch.neg({self.wrapped(numerators[0])})")
        elif numerators and small != 1:
            chain = _Chain(f"torch.mul({self.wrapped(numerators[0])}, {self.text(small)})")
        elif numerators:
            chain = _Chain(f"{self.wrapped(numerators[0])}.clone()")
        else:  # a small value over full-size ones: as the printer writes it
            chain = _Chain(self.text(small / sp.Mul(*denominators)))
            denominators = []
        return self.times(chain, [], denominators)

    def kernel_of(self, f, factors):
        """``(kernel, argument, factors it replaces, sign, extra arguments)`` when ``f`` is the
        polynomial factor of one of autograd's one-pass kernels, else None."""
        if isinstance(f, Step) and self.full(f.args[0]):
            return _THRESHOLD_BACKWARD, f.args[0], [f], 1, ", 0"
        y = _one_minus_square(f)
        if y is not None and self.full(y[0]):
            return _TANH_BACKWARD, y[0], [f], y[1], ""
        y = _one_minus(f)
        if y is not None and y[0] in factors and self.full(y[0]):
            return _SIGMOID_BACKWARD, y[0], [f, y[0]], y[1], ""
        return None

    def kernel(self, numerators, denominators, small) -> _Chain:
        """The product through the one-pass kernel found in it, applied to the rest of it."""
        f = next(f for f in numerators if self.kernel_of(f, numerators))
        name, argument, used, sign, extra = self.kernel_of(f, numerators)
        rest = list(numerators)
        for u in used:
            rest.remove(u)
        compound = [g for g in rest if not self.leaf(g)]
        leaves = [g for g in rest if self.leaf(g)]
        scale = sp.S.One
        if compound:  # the gradient it scales: what needs a buffer anyway, or a tensor as it is
            grad, scale = self.buffer(sp.Mul(*compound), keep_number_scale=True)
        elif leaves:
            grad = self.wrapped(leaves.pop(0))
        elif not self.number(small):
            grad, small = self.wrapped(small), sp.S.One
        else:
            grad, small = f"torch.ones_like({self.operand(argument)})", small
        chain = _Chain(f"{name}({grad}, {self.operand(argument)}{extra})")
        chain.scale = small * sign * scale
        return self.times(chain, leaves, denominators)

    def total(self, terms: list) -> _Chain:
        small = sp.Add(*[t for t in terms if not self.full(t)])
        parts = []  # (small coefficient, product of full-size factors) of each full-size term
        for t in terms:
            if self.full(t):
                factors = sp.Mul.make_args(t)
                parts.append((sp.Mul(*[f for f in factors if not self.full(f)]),
                              sp.Mul(*[f for f in factors if self.full(f)])))
        if not parts:  # small terms that broadcast to full size: as the printer writes them
            return _Chain(self.text(sp.Add(*terms)))
        # the buffer starts from a term that needs one anyway, or from a plain one (with the small
        # constant, where one call does both); a number that term is multiplied by may be taken out
        # of the sum (the other terms divided by it), for a factor outside to absorb
        heads = [p for p in parts if not self.plain(p[1])]
        heads.append(min([p for p in parts if self.plain(p[1])] or parts,
                         key=lambda p: (p[0] not in (1, -1), sp.default_sort_key(p[1]))))
        ways = []
        for head in dict.fromkeys(heads):
            ways.append(lambda head=head: self.total_from(head, parts, small, sp.S.One))
            if head[0].is_number and head[0] not in (1, -1, 0):
                ways.append(lambda head=head: self.total_from(head, parts, small, head[0]))
        return self.best(ways)

    def total_from(self, head, parts, small, out) -> _Chain:
        """The sum with the buffer of ``head``, ``out`` (a number) taken out of every term."""
        rest = [(c / out, p) for c, p in parts if (c, p) != head]
        coefficient, product = head[0] / out, head[1]
        small = small / out
        if self.plain(product):
            chain, small = self.start(coefficient, product, small)
        else:
            chain = self.chain(product, coefficient)
        if not chain.scale.is_number or chain.scale == 0:
            self.finish(chain)
        inner, chain.scale = chain.scale, chain.scale * out
        for c, p in rest:
            self.accumulate(chain, c / inner, p)
        if small != 0:
            chain.then("add", self.text(small / inner))
        return chain

    def start(self, coefficient, product, small) -> tuple[_Chain, sp.Expr]:
        """The buffer of one plain term plus the small constant, where one call does both; the
        constant left to add."""
        factors = sp.Mul.make_args(product)
        if small != 0 and not self.number(small) and self.number(coefficient):
            value = "" if coefficient == 1 else f", value={self.text(coefficient)}"
            alpha = "" if coefficient == 1 else f", alpha={self.text(coefficient)}"
            if len(factors) == 1:
                return _Chain(f"torch.add({self.text(small)}, {self.wrapped(factors[0])}{alpha})"), sp.S.Zero
            a, b = factors
            if a.is_Pow or b.is_Pow:
                a, b = (b, a.base) if a.is_Pow else (a, b.base)
                return _Chain(f"torch.addcdiv({self.text(small)}, {self.wrapped(a)}, {self.wrapped(b)}{value})"), \
                    sp.S.Zero
            return _Chain(f"torch.addcmul({self.text(small)}, {self.wrapped(a)}, {self.wrapped(b)}{value})"), sp.S.Zero
        if small != 0 and len(factors) == 1:
            tensor = self.wrapped(factors[0])
            if not self.number(small):
                return _Chain(f"torch.addcmul({self.text(small)}, {self.text(coefficient)}, {tensor})"), sp.S.Zero
            if coefficient == 1:
                return _Chain(f"torch.add({tensor}, {self.text(small)})"), sp.S.Zero
            if coefficient == -1:
                return _Chain(f"torch.rsub({tensor}, {self.text(small)})"), sp.S.Zero
        return self.product(list(factors) + list(sp.Mul.make_args(coefficient))), small

    def accumulate(self, chain: _Chain, coefficient, product) -> None:
        """``chain += coefficient*product``, in one update where torch has one."""
        factors = sp.Mul.make_args(product)
        number = self.number(coefficient)
        if self.plain(product) and len(factors) == 1:
            tensor = self.wrapped(factors[0])
            if not number:
                chain.then("addcmul", f"{self.text(coefficient)}, {tensor}")
            elif coefficient == -1:
                chain.then("sub", tensor)
            else:
                chain.then("add", tensor + ("" if coefficient == 1 else f", alpha={self.text(coefficient)}"))
            return
        if self.plain(product):
            a, b = factors
            if not number:  # the coefficient times one of them first, at one pass
                if a.is_Pow:
                    a, b = b, a
                a = sp.Symbol(self.buffer(coefficient * a)[0])
                coefficient = sp.S.One
            value = "" if coefficient == 1 else f", value={self.text(coefficient)}"
            if a.is_Pow or b.is_Pow:
                a, b = (b, a.base) if a.is_Pow else (a, b.base)
                chain.then("addcdiv", f"{self.wrapped(a)}, {self.wrapped(b)}{value}")
            else:
                chain.then("addcmul", f"{self.wrapped(a)}, {self.wrapped(b)}{value}")
            return
        name, scale = self.buffer(product, keep_number_scale=True)
        coefficient = coefficient * scale
        if number:
            chain.then("add", name + ("" if coefficient == 1 else f", alpha={self.text(coefficient)}"))
        else:
            chain.then("addcmul", f"{self.text(coefficient)}, {name}")


def _one_minus(f):
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


def _one_minus_square(f):
    """``(y, sign)`` for ``sign*(1 - y**2)``, else None."""
    found = _one_minus(f)
    if found is not None and found[0].is_Pow and found[0].exp == 2:
        return found[0].base, found[1]
    return None


def chain_form(grad: str, expr: sp.Expr, printer: KernelPrinter, shapes: dict, taken: set) -> list[str] | None:
    """Statements computing the full-size ``grad = expr`` over few buffers, updated in place (see
    above), or None when ``expr`` is not full-size or is one product of two tensors anyway."""
    planner = _Planner(grad, printer, shapes, taken)
    if not planner.full(expr) or planner.leaf(expr):
        return None
    try:
        chain = planner.finish(planner.chain(expr))
    except DerivationError:
        return None
    if not planner.lines and chain.plain:
        return None  # ``a*b``: as written
    return planner.lines + [f"{grad} = {chain.text()}"]


__all__ = ["linear_form", "chain_form"]
