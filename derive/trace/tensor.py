"""``SymTensor``: a tensor stand-in that records every torch operation applied to it.

The operations live in mixins by job (``elementwise.py``, ``reductions.py``, ``shapes.py``,
``indexing.py``); torch's functions (``torch.exp(x)``, ``F.softmax(x, dim=1)``) reach the same
methods through ``__torch_function__`` and the table in ``functions.py``. Anything else is refused
at its line with what is supported.
"""
from __future__ import annotations

from .elementwise import MASKS, Elementwise
from .indexing import Indexing
from .reductions import Reductions
from .shapes import Shapes


class SymTensor(Elementwise, Reductions, Shapes, Indexing):
    _op_priority = 100.0  # SymPy scalars defer to our __rmul__ etc.

    def __init__(self, tracer, node):
        self._tracer = tracer
        self.node = node

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self._tracer.size_table.dim(s) for s in self.node.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self):
        return len(self.node.shape)

    def dim(self):
        return self.ndim

    def numel(self):
        from .sizes import Dim
        total = 1
        for s in self.shape:
            total = total * s
        return total if not isinstance(total, Dim) else total.symbol

    # -- dtype and memory layout: no effect on the values ------------------------------------
    def _same(self, *args, **kwargs):
        return self

    float = double = contiguous = clone = type_as = to = _same

    @property
    def dtype(self):
        import torch
        return torch.bool if self.node.op in MASKS else torch.get_default_dtype()

    @property
    def device(self):
        import torch
        return torch.device("cpu")

    def bool(self):
        if self.node.op not in MASKS:
            return self != 0
        return self

    # -- torch functions ---------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from .functions import dispatch
        return dispatch(func, args, dict(kwargs or {}))

    def __getattr__(self, attr):
        from .functions import SUPPORTED
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in ("item", "tolist", "numpy"):
            self._value()
        if attr.endswith("_"):
            self._tracer.fail(f"in-place operation .{attr}(...)", f"use the out-of-place form (a = a.{attr[:-1]}(...) "
                              f"or arithmetic), built from supported primitives: {SUPPORTED}")
        self._tracer.fail(f"tensor method .{attr} is not supported",
                          f"write it from supported primitives: {SUPPORTED}")

    # -- what a traced forward may not do ----------------------------------------------------
    def __bool__(self):
        self._tracer.fail("a tensor's value decides Python control flow (if/while/and/or on a tensor)",
                          "the forward must be the same sequence of operations for every input; "
                          "use arithmetic or torch.where with a mask instead of branching")

    def __array_ufunc__(self, ufunc, method, *args, **kwargs):
        from .functions import SUPPORTED
        self._tracer.fail(f"numpy's {ufunc.__name__} on a tensor", f"use torch's (torch.{ufunc.__name__}), or "
                          f"supported primitives: {SUPPORTED}")

    def __array_function__(self, func, types, args, kwargs):
        from .functions import SUPPORTED
        self._tracer.fail(f"numpy's {func.__name__} on a tensor", f"use torch's, or supported primitives: {SUPPORTED}")

    def _value(self, *a):
        self._tracer.fail("a tensor's value is read as a Python number (float(), int(), len(), .item())",
                          "the forward must not depend on tensor values; sizes come from x.shape")

    __float__ = __int__ = __len__ = __index__ = _value

    def __iter__(self):
        self._tracer.fail("a Python loop over a tensor's rows", "write it with whole-tensor operations "
                          "(a sum over rows is x.sum(0))")

    def __setitem__(self, key, value):
        self._tracer.fail("in-place assignment into a tensor", "build a new tensor instead of mutating one "
                          "(torch.where(mask, value, x) for a masked fill)")

    def _inplace(self, *a, **k):
        self._tracer.fail("in-place operation", "use the out-of-place form (a = a + b)")

    __iadd__ = __isub__ = __imul__ = __itruediv__ = _inplace
    __hash__ = object.__hash__
