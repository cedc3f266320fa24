"""Indexing a traced tensor: picking ``t[range(n), y]`` (or ``t.gather(1, y[:, None])``), the lookup
``table[index]``, and ``None``/``...``/``:`` entries, which only add axes of size 1."""
from __future__ import annotations

import torch


class Indexing:
    def __getitem__(self, key):
        t = self._tracer
        if hasattr(key, "node") and key.node.op == "labels":
            if key.node.attrs["classes"] != self.node.shape[0]:
                t.fail("an embedding lookup whose index classes differ from the table's rows",
                       "declare the index tensor's classes as the table's first dimension")
            return t.record("embed", (self.node, key.node), key.node.shape + self.node.shape[1:])
        if isinstance(key, tuple) and len(key) == 2 and self.ndim == 2:
            rows, labels = key
            size = self.node.shape[0]
            if self._is_arange(rows, size) and hasattr(labels, "node") and labels.node.op == "labels":
                return self._pick(labels)
        axes = self._unsqueezed(key)
        if axes is not None:
            return self.view(*axes)
        parts = key if isinstance(key, tuple) else (key,)
        floats = [p.node.name for p in parts if hasattr(p, "node") and p.node.op != "labels"]
        if floats:
            t.fail(f"indexing with {floats[0]!r}, which is declared as a floating-point Tensor",
                   f"declare the indices as Labels, e.g. {floats[0]}=Labels('n', classes='k')")
        t.fail(f"indexing with {_describe(key)}", "the supported indexing is picking t[range(n), y] with declared "
               "Labels y, table[index] with declared Labels index, and None/:/... to add axes of size 1")

    def _pick(self, labels):
        t = self._tracer
        size = self.node.shape[0]
        if labels.node.shape != (size,):
            t.fail(f"picking with labels of shape {labels.node.shape}", f"labels must have shape ({size},)")
        if labels.node.attrs["classes"] != self.node.shape[1]:
            t.fail("picking with labels whose classes differ from the tensor's columns",
                   "declare the labels' classes as the size of the picked axis")
        return t.record("pick", (self.node, labels.node), (size,))

    def gather(self, dim, index):
        """``t.gather(1, y[:, None])``: picking, as a column."""
        node = getattr(index, "node", None)
        labels = node.args[0] if node is not None and node.op == "view" and node.args[0].op == "labels" else None
        if self.ndim != 2 or dim % 2 != 1 or labels is None or node.shape != (labels.shape[0], 1):
            self._tracer.fail("gather other than t.gather(1, y.view(-1, 1)) of a matrix",
                              "pick with t[range(n), y], or gather(1, y.unsqueeze(1)) with declared Labels y")
        return self._pick(_Labels(labels)).unsqueeze(1)

    def _unsqueezed(self, key):
        """The shape after ``key`` when it only adds size-1 axes (``x[:, None]``), else None."""
        parts = list(key) if isinstance(key, tuple) else [key]
        if not all(p is None or p is Ellipsis or (isinstance(p, slice) and p == slice(None)) for p in parts):
            return None
        if sum(p is Ellipsis for p in parts) > 1:
            return None
        shape = list(self.node.shape)
        explicit = sum(p is not None and p is not Ellipsis for p in parts)
        if explicit > len(shape):
            return None
        if Ellipsis not in parts:
            parts.append(Ellipsis)
        out, axis = [], 0
        for p in parts:
            if p is None:
                out.append(1)
            elif p is Ellipsis:
                skip = len(shape) - explicit
                out += shape[axis:axis + skip]
                axis += skip
            else:
                out.append(shape[axis])
                axis += 1
        return out

    def _is_arange(self, rows, size) -> bool:
        tokens = self._tracer.tokens
        if isinstance(rows, range) and rows.start == 0 and rows.step == 1:
            return tokens.get(rows.stop) == size
        if isinstance(rows, torch.Tensor) and rows.ndim == 1:
            return tokens.get(len(rows)) == size
        return False


class _Labels:
    """A labels node seen as the traced tensor ``_pick`` expects."""

    def __init__(self, node):
        self.node = node


def _describe(key) -> str:
    """An index as the spec wrote it, near enough: symbolic tensors by name, ranges by their bounds."""
    from .sizes import TOKEN_BASE
    if isinstance(key, tuple):
        return "[" + ", ".join(_describe(k) for k in key) + "]"
    if hasattr(key, "node"):
        return key.node.name or "a tensor"
    if isinstance(key, range):
        return "a range" if key.stop >= TOKEN_BASE else repr(key)
    return repr(key)
