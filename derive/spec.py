"""Layer specs: a plain PyTorch forward function plus a declaration of its inputs.

Contract for a spec::

    @layer(x=Tensor("n", "d"), gamma=Tensor("d"), beta=Tensor("d"), eps=Constant(1e-5))
    def batchnorm(x, gamma, beta, eps=1e-5):
        ...ordinary torch code, one named intermediate per line...
        return out

* every parameter of the function is declared, and every declaration names a parameter;
* ``Tensor(*dims)`` is a floating-point input; dims are names, the same name means the same size
  (also within one input: ``Tensor("d", "d")`` is a square matrix), inputs in any order of dimensions,
  a product of names (``"t*e"``) is the size of a flattened axis, ``"1"`` an axis of size 1; ``differentiable=False
  excludes it from the backward; ``domain=`` one of ``DOMAINS`` (``"positive"``, ``"probability"``, ...) says
  which values it takes: the proof assumes it and the checks draw their inputs from it;
* a layer's ``.example(sizes, dtype=..., seed=...)``, when set, returns the test inputs instead (for
  what a domain cannot say: rows whose labels are not all ignored, weights in a range);
* ``Labels(*dims, classes="k")`` is an integer tensor with values in ``range(k)``; never differentiable;
* ``Constant(default)`` is a Python number fixed for the call (``eps``);
* the function returns one tensor. Run on real tensors it is the autograd reference.
"""
from __future__ import annotations

import inspect
import keyword
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from .errors import SpecError


# The values an input may take, declared as ``Tensor(..., domain=...)``: the proof assumes them (a
# positive entry is a positive symbol) and the checks draw test inputs from them (verify.sample).
DOMAINS = {
    "real": "any real number (the default; test inputs ~ N(0, 1))",
    "positive": "a number > 0 (a scale, a variance, a rate)",
    "nonnegative": "a number >= 0 (a count, a squared distance)",
    "unit": "a number in (0, 1) (a probability of its own, a gate)",
    "probability": "entries > 0 that sum to 1 along the last axis (a distribution per row: soft targets)",
    "binary": "0 or 1 (a mask)",
}


@dataclass(frozen=True)
class Tensor:
    dims: tuple[str, ...]
    differentiable: bool = True
    domain: str = "real"

    def __init__(self, *dims: str, differentiable: bool = True, domain: str = "real"):
        object.__setattr__(self, "dims", tuple(dims))
        object.__setattr__(self, "differentiable", differentiable)
        object.__setattr__(self, "domain", domain)


@dataclass(frozen=True)
class Labels:
    dims: tuple[str, ...]
    classes: str
    differentiable = False

    def __init__(self, *dims: str, classes: str):
        object.__setattr__(self, "dims", tuple(dims))
        object.__setattr__(self, "classes", classes)


@dataclass(frozen=True)
class Constant:
    default: float
    differentiable = False


Declaration = Tensor | Labels | Constant

# Names the generated code uses for itself; a spec variable of that name would be shadowed.
RESERVED = {"ctx", "torch", "F", "grad", "self", "math", "needs", "cache", "grads"}
# Names a generated module defines at its top level; a layer of that name would replace one.
MODULE_NAMES = RESERVED | {"forward", "backward", "once_differentiable"}


@dataclass
class Layer:
    """A declared layer. Calling it runs the forward pass on real tensors."""

    name: str
    fn: Callable
    inputs: dict[str, Declaration]
    module: str = ""
    source_file: str = ""
    doc: str = field(default="")
    example: Callable | None = None  # example_inputs(sizes, dtype) -> inputs; random normal when None
    fused: bool = True  # also derive a fused kernel (False: step-by-step backward only)

    def __call__(self, *args, **kwargs):
        """Run the forward on real tensors; inside another spec being traced, record a call."""
        for value in (*args, *kwargs.values()):
            tracer = getattr(value, "_tracer", None)
            if tracer is not None:
                return tracer.call(self, args, kwargs)
        return self.fn(*args, **kwargs)

    @property
    def tensors(self) -> dict[str, Tensor | Labels]:
        return {k: v for k, v in self.inputs.items() if not isinstance(v, Constant)}

    @property
    def constants(self) -> dict[str, Constant]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, Constant)}

    @property
    def differentiable(self) -> list[str]:
        return [k for k, v in self.inputs.items() if isinstance(v, Tensor) and v.differentiable]

    @property
    def dims(self) -> list[str]:
        """Every dimension name, in order of first appearance (labels' class counts included)."""
        seen: list[str] = []
        for decl in self.tensors.values():
            for d in (*decl.dims, *([decl.classes] if isinstance(decl, Labels) else [])):
                for name in dim_names(d):
                    if name not in seen:
                        seen.append(name)
        return seen


DIM = re.compile(r"^([A-Za-z_]\w*(\*[A-Za-z_]\w*)*|1)$")


def dim_names(dim: str) -> list[str]:
    """The names a dimension is made of: ``"t*e"`` -> ``["t", "e"]``; ``"1"`` (a broadcast axis) -> ``[]``."""
    return [] if dim == "1" else dim.split("*")


def concrete_shape(dims: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of declared ``dims`` at concrete ``sizes`` (``("n", "t*e")`` -> ``(32, 30)``)."""
    return tuple(math.prod(sizes[name] for name in dim_names(d)) for d in dims)


def _check(name: str, fn: Callable, inputs: dict[str, Declaration]) -> None:
    if name in MODULE_NAMES or name.startswith("_"):
        raise SpecError(name, f"the layer's name {name!r} clashes with a name its generated module uses",
                        f"rename the function (not one of: {', '.join(sorted(MODULE_NAMES))}, nor starting with _)")
    params = list(inspect.signature(fn).parameters)
    for p, decl in inputs.items():
        if p not in params:
            close = [q for q in params if q.lower() == p.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(name, f"declared input {p!r} is not a parameter of the function{hint}",
                            "declare exactly the function's parameters")
        if keyword.iskeyword(p) or p in RESERVED or p.startswith("_"):
            raise SpecError(name, f"input name {p!r} clashes with a name the generated code uses",
                            "rename the parameter")
        if not isinstance(decl, (Tensor, Labels, Constant)):
            raise SpecError(name, f"input {p!r} is declared as {decl!r}",
                            "use Tensor(...), Labels(...) or Constant(...)")
        if isinstance(decl, Tensor) and decl.domain not in DOMAINS:
            raise SpecError(name, f"input {p!r} has domain {decl.domain!r}",
                            f"use one of: {', '.join(repr(d) for d in DOMAINS)}")
        if isinstance(decl, (Tensor, Labels)):
            if not decl.dims or not all(isinstance(d, str) and DIM.match(d) for d in decl.dims):
                raise SpecError(name, f"input {p!r} has dims {decl.dims!r}",
                                "give each dimension a name, e.g. Tensor('n', 'd') (or a product, 't*e')")
    for p in params:
        if p not in inputs:
            raise SpecError(name, f"parameter {p!r} is not declared",
                            f"add {p}=Tensor(...), Labels(...) or Constant(...) to @layer(...)")
    if not any(isinstance(d, Tensor) and d.differentiable for d in inputs.values()):
        raise SpecError(name, "no differentiable input", "declare at least one Tensor(...)")


def layer(**inputs: Declaration) -> Callable[[Callable], Layer]:
    """Declare a layer: ``@layer(x=Tensor("n", "d"), ...)`` above its forward function."""
    def wrap(fn: Callable) -> Layer:
        name = fn.__name__
        _check(name, fn, inputs)
        return Layer(name=name, fn=fn, inputs=dict(inputs), module=fn.__module__,
                     source_file=inspect.getsourcefile(fn) or "", doc=inspect.getdoc(fn) or "")
    return wrap
