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

from .printer import KernelPrinter, temporaries
from .symbolic import Red, expand, reindex


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
        if len(deltas) == 1:
            # the one-hot is 0 off the label: the other factors are needed at the label only
            # (``counts*onehot(y)`` is ``counts[y]*onehot(y)``, a gather, not a full-size tensor)
            (index, labels), = deltas
            factors = [f if _label_delta(f, slots) else reindex(f, {index: labels}) for f in factors]
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
        if len(big) > 1 or big and big[0].atoms(Red, sp.KroneckerDelta):
            return None
        key = big[0] if big else None
        groups[key] = groups.get(key, 0) + rest
    tensors = [t for t in groups if t is not None]
    if not scatters and any(not isinstance(t, (sp.Indexed, sp.Symbol)) for t in tensors):
        return None  # a function of a tensor (sigmoid(t)) goes through as written, unless a one-hot is to be scattered

    def text(e):
        return printer.doprint(sp.factor_terms(e))

    if not tensors and scatters and not groups:  # a one-hot only (a pick's gradient): zeros, then scatters
        return [f"{grad} = {printer.dtype_of}.new_zeros(({', '.join(printer.doprint(s) for s in frame)},))"] + \
            _scatters(grad, scatters, printer, slots, frame, text)
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
    return lines + _scatters(grad, scatters, printer, slots, frame, text)


def _scatters(grad: str, scatters: dict, printer, slots: dict, frame: list, text) -> list[str]:
    """``grad.scatter_add_`` of each one-hot term: n values, never a dense (n, k) one-hot."""
    lines = []
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


__all__ = ["linear_form"]
