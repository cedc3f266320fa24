"""A worked example for a document: real numbers through the forward and the backward pass.

The sizes are small and all different (a batch of 3, then 4, 2, 5, ...), so no two axes can be
confused (``W2`` and ``W2.T`` have different shapes). The inputs are the layer's own example inputs
(``verify.random_inputs``) rounded to two decimals, so a reader can redo a line by hand. The spec
runs in float64 with autograd; every named line's value and gradient is read from it
(``retain_grad``), and the generated step-by-step and fused modules run on the same numbers, as
the exercise's ``cmp`` compares them. Everything is deterministic: same numbers on every run.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..spec import Layer
from ..trace import Graph
from ..verify import random_inputs, upstream_for

LEAD_SIZE = 3  # the batch: the exercise's n = 3
OTHER_SIZES = (4, 2, 5, 6, 7)  # every other dimension, in declaration order, each different
DECIMALS = 2  # of the example's inputs
SHOWN_DIGITS = 3  # significant digits of a value shown in a document
SEEDS = 20  # seeds tried for inputs whose pass is finite everywhere


@dataclass
class Example:
    sizes: dict[str, int]
    inputs: dict[str, object]  # name -> tensor (float64, labels int64) or number
    values: dict[str, np.ndarray]  # every input and named line -> its value
    grads: dict[str, np.ndarray]  # every differentiable input and named line -> autograd's gradient
    upstream: np.ndarray  # d<output>


def example_sizes(graph: Graph) -> dict[str, int]:
    """The batch (the size most tensors are indexed by first) 3, the other sizes 4, 2, 5, ..."""
    layer = graph.layer
    first = {}
    for node in graph.nodes:
        if node.shape and node.shape[0] != 1:
            first[node.shape[0]] = first.get(node.shape[0], 0) + 1
    lead = max(layer.dims, key=lambda d: (first.get(graph.sizes[d], 0), -layer.dims.index(d)))
    others = iter(OTHER_SIZES)
    return {d: LEAD_SIZE if d == lead else next(others) for d in layer.dims}


def _rounded(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = torch.round(v.to(torch.float64) * 10**DECIMALS) / 10**DECIMALS
        out[k] = v
    return out


@contextmanager
def one_thread():
    """Torch on one thread while the tiny example runs: documents are rendered in forked workers,
    and a worker must not start (nor inherit) a thread pool for a 3 x 4 tensor."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(layer: Layer, inputs: dict, output: str, upstream: torch.Tensor | None = None, seed: int = 0,
        renamed: dict | None = None):
    """The spec's output, every local tensor of its frame (named lines) and their gradients, by the
    names of their nodes (``renamed``: a spec variable -> its node's name, where they differ)."""
    with one_thread():
        return _run(layer, inputs, output, upstream, seed, renamed or {})


def _run(layer: Layer, inputs: dict, output: str, upstream: torch.Tensor | None, seed: int, renamed: dict):
    wanted = layer.differentiable
    leaves = {k: (v.clone().requires_grad_(k in wanted) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    frame: dict = {}

    def profile(f, event, arg):
        if event == "return" and f.f_code is layer.fn.__code__:
            frame.update(f.f_locals)

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        out = layer.fn(**leaves)
    finally:
        sys.setprofile(old)
    # (an input's name bound again, ``x = torch.tanh(x)``, holds the new value: its node's own name)
    tensors = {renamed.get(k, k): v for k, v in frame.items() if isinstance(v, torch.Tensor)
               and (k not in leaves or (k in renamed and v is not leaves[k]))}
    for t in tensors.values():
        if t.requires_grad:
            t.retain_grad()
    upstream = upstream_for(out, seed) if upstream is None else upstream
    if out.requires_grad:
        out.backward(upstream)
    values = {k: v.detach().numpy() for k, v in {**leaves, **tensors}.items() if isinstance(v, torch.Tensor)}
    values[output] = out.detach().numpy()
    grads = {k: (leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k])).numpy() for k in wanted}
    grads.update({k: t.grad.numpy() for k, t in tensors.items() if t.grad is not None})
    grads[output] = upstream.detach().numpy()
    return out, values, grads, upstream


def example(graph: Graph) -> Example:
    """The layer's worked example (see the module docstring)."""
    layer = graph.layer
    sizes = example_sizes(graph)
    for seed in range(SEEDS):
        inputs = _rounded(random_inputs(layer, sizes, torch.float64, seed))
        _, values, grads, upstream = run(layer, inputs, graph.output.name, seed=seed,
                                         renamed={n.var: n.name for n in graph.nodes if n.var})
        if all(np.isfinite(v).all() for v in [*values.values(), *grads.values()]):
            break
    return Example(sizes, inputs, values, grads, upstream.detach().numpy())


# -- numbers as a reader sees them ----------------------------------------------------------------
def number(v: float) -> str:
    """A value with about three significant digits, no exponent for ordinary magnitudes."""
    v = float(v)
    if v == 0 or abs(v) < 0.5 * 10 ** -(SHOWN_DIGITS + 2):
        return "0"
    if not math.isfinite(v):
        return r"\infty" if v > 0 else r"-\infty"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        mantissa, power = f"{v:.{SHOWN_DIGITS - 1}e}".split("e")
        return r"%s \cdot 10^{%d}" % (mantissa.rstrip("0").rstrip("."), int(power))
    decimals = max(0, SHOWN_DIGITS - 1 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text in ("-0", "") else text


def matrix(values, shape: tuple | None = None, cell=number) -> str:
    """A tensor as a bmatrix, one row per line of source: a (1, d) or (d,) tensor is a row, an
    (n, 1) tensor a column; a 3-d tensor one block of columns per leading index."""
    a = np.asarray(values)
    if a.ndim == 0:
        return cell(a.item())
    squeezed = a.reshape([s for s in a.shape if s != 1]) if 1 in a.shape and a.ndim > 1 else a
    if squeezed.ndim == 1:
        column = a.ndim == 2 and a.shape[1] == 1 and a.shape[0] != 1
        glue = " \\\\\n" if column else " & "
        return "\\begin{bmatrix}\n%s\n\\end{bmatrix}" % glue.join(cell(x) for x in squeezed.reshape(-1))
    if squeezed.ndim == 0:
        return cell(squeezed.item())
    if squeezed.ndim > 2:
        squeezed = squeezed.reshape(squeezed.shape[0], -1)
    rows = [" & ".join(cell(x) for x in row) for row in squeezed]
    return "\\begin{bmatrix}\n%s\n\\end{bmatrix}" % " \\\\\n".join(rows)


def sizes_text(sizes: dict[str, int], math) -> str:
    return ", ".join(math(f"{name} = {value}") for name, value in sizes.items())


__all__ = ["Example", "example", "example_sizes", "run", "one_thread", "number", "matrix", "sizes_text"]
