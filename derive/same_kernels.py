"""Whether autograd, run through a fused kernel's own forward, computes the derived backward kernel
for kernel. Then ``<name>(...)`` runs that forward under autograd in eager mode: the same kernels,
without a Python ``autograd.Function``'s fixed cost per call (tens of microseconds, which is most of
a call at small sizes), and without its other order of freeing buffers.

``codegen._autograd_runs_it`` recognizes the simplest layers from the printed formulas (one
operation whose gradient is autograd's own one-pass kernel). This checks any layer by running both
on one draw of the battery's inputs in float64: the module as generated (its forward and backward
through the Function) and the module with the route (the forward under autograd, and autograd's
backward). Every operation that computes a tensor is recorded (a view computes nothing). When the
two ran the same operations, as many times each, and gave the same output and gradients bit for
bit, autograd there is the derived kernel: ``c + x`` (``dc = dout.sum(0)``), ``x @ W + b``,
``w + softmax(x)``. Where they differ in one operation (``c.square()``, whose derived ``2*c*dout``
is not autograd's backward of a power; an in-place update; a one-pass kernel where autograd runs
two), the Function runs what was derived.
"""
from __future__ import annotations

import inspect
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .battery import _gradients, battery_sizes, draw
from .layers import Layer
from .select import _imported


class _Computed(TorchDispatchMode):
    """Counts the operations run, by name and overload, leaving out views (they compute nothing;
    an in-place update does)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        alias = returns[0].alias_info if returns else None
        if alias is None or alias.is_write:
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


class _NoGraph(Exception):
    """The output has no gradient to take: a forward that cancels to a constant, which autograd
    does not record, where the Function's output, like the spec's, has a backward giving zeros."""


def _run(fn, layer: Layer, inputs: dict, seed: int) -> tuple[Counter, list]:
    """The operations one forward and backward of ``fn`` computes, as the battery takes its
    gradients (``battery._gradients``), and its output and gradients."""
    def forward(**leaves):
        out = fn(**leaves)
        if not out.requires_grad:
            raise _NoGraph
        return out

    with _Computed() as computed:
        values = _gradients(forward, inputs, list(layer.differentiable), seed)
    return computed.counts, [value for _, value in values]


def runs_the_same(layer: Layer, function_source: str, routed_source: str, seed: int = 0) -> bool:
    """Whether ``routed_source`` (the module with the route under autograd) computes what
    ``function_source`` (the module as generated) computes through its Function, operation for
    operation and bit for bit, on one draw of the battery's inputs (the input checks left out:
    the route runs them too)."""
    inputs = draw(layer, battery_sizes(layer), torch.float64, seed)
    runs = []
    try:
        for routed, source in ((False, function_source), (True, routed_source)):
            with _imported(layer.name, source) as fn:  # (torch on one thread: the same reduction order)
                module = inspect.getmodule(fn)
                if routed and not module._autograd_is_the_kernel():
                    return False  # (the route not taken: nothing to compare)
                module.check_inputs(False)
                runs.append(_run(fn, layer, inputs, seed))
    except _NoGraph:
        return False
    (ours, our_values), (theirs, their_values) = runs
    return ours == theirs and all(torch.equal(a, b) for a, b in zip(our_values, their_values))


__all__ = ["runs_the_same"]
