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

import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .battery import battery_sizes, draw
from .layers import Layer
from .verify import load_module, upstream_for


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


def _run(module, layer: Layer, inputs: dict, seed: int) -> tuple[Counter, list] | None:
    """The operations one forward and backward of ``module``'s ``<name>`` computes (the input checks
    left out: the route runs them too), and its output and gradients; None where the output has no
    gradient to take (a forward that cancels to a constant: autograd records nothing, where the
    Function's output, like the spec's, has a backward that gives zeros)."""
    wanted = list(layer.differentiable)
    leaves = {k: v.detach().clone().requires_grad_(k in wanted) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    module.check_inputs(False)
    with _Computed() as computed:
        out = getattr(module, layer.name)(**leaves)
        if not out.requires_grad:
            return None
        grads = torch.autograd.grad(out, [leaves[k] for k in wanted], upstream_for(out.detach(), seed), allow_unused=True)
    return computed.counts, [out.detach(), *grads]


def _same(a, b) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def runs_the_same(layer: Layer, function_source: str, routed_source: str, seed: int = 0) -> bool:
    """Whether ``routed_source`` (the module with the route under autograd) computes what
    ``function_source`` (the module as generated) computes through its Function, operation for
    operation and bit for bit, on one draw of the battery's inputs."""
    inputs = draw(layer, battery_sizes(layer), torch.float64, seed)
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the same reduction order in both)
    try:
        for routed, source in ((False, function_source), (True, routed_source)):
            with tempfile.TemporaryDirectory(prefix="derive-same-") as folder:
                path = Path(folder) / f"{layer.name}.py"
                path.write_text(source)
                module = load_module(path)
                if routed and not module._autograd_is_the_kernel():
                    return False  # (the route not taken: nothing to compare)
                runs.append(_run(module, layer, inputs, seed))
    finally:
        torch.set_num_threads(threads)
    if None in runs:
        return False
    (ours, our_values), (theirs, their_values) = runs
    return ours == theirs and all(_same(a, b) for a, b in zip(our_values, their_values))


__all__ = ["runs_the_same"]
