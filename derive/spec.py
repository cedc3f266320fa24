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
  which values it takes: the proof assumes it and the checks draw their inputs from it; ``batch="n"``
  declares ``n`` the batch axis, split across the ranks of a process group in data-parallel training
  (the generator then also writes ``<name>_synced.py``, whose sums over that axis run over every
  rank: ``derive/synced.py``);
* a layer's ``.example(sizes, dtype=..., seed=...)``, when set, returns the test inputs instead (for
  what a domain cannot say: rows whose labels are not all ignored, weights in a range);
* ``Labels(*dims, classes="k")`` is an integer tensor with values in ``range(k)``; never differentiable;
* ``Constant(default)`` is a Python number fixed for the call, real and of either sign;
  ``Constant(1e-5, positive=True)`` declares it positive (``eps``), which the derivation may then use;
  ``low=`` and ``high=`` (inclusive) bound the values it may take (``Constant(0.1, low=0, high=1)``
  for a label smoothing, as ``F.cross_entropy`` refuses 1.5); the generated Function refuses others;
* the function returns one tensor. Run on real tensors it is the autograd reference.
"""
from __future__ import annotations

import functools
import inspect
import keyword
import linecache
import math
import numbers
import re
from collections.abc import Set as AbstractSet
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
    batch: str | None = None  # the dimension split across ranks in data-parallel training

    def __init__(self, *dims: str, differentiable: bool = True, domain: str = "real", batch: str | None = None):
        object.__setattr__(self, "dims", tuple(dims))
        object.__setattr__(self, "differentiable", differentiable)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "batch", batch)


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
    """A number fixed for the call. It is a real number and nothing more, unless declared
    ``positive=True`` (``eps``): only then may the derivation rely on its sign (``|eps*x|`` is
    ``eps*|x|``, a division by it is safe), and the generated code checks each value it is given."""

    default: float
    positive: bool = False
    low: float | None = None  # the value must be >= low (checked at each call, not assumed)
    high: float | None = None  # the value must be <= high
    differentiable = False

    def assumptions(self) -> dict:
        """The SymPy assumptions of its symbol: exactly what the declaration says."""
        return {"positive": True} if self.positive else {"real": True}


Declaration = Tensor | Labels | Constant

class _GeneratedNames(AbstractSet):
    """Names the generated code uses for itself: what the templates write (``templating.generated_names``:
    imports, functions, locals, the builtins they call) and what the printers write besides. A spec
    name among them would shadow generated code or be shadowed by it. Read off the templates the
    first time it is asked (a run answered from the cache never renders one)."""

    PRINTED = frozenset({"ctx", "torch", "F", "grad", "self", "math", "needs", "cache", "grads", "int"})

    @functools.cached_property
    def _names(self) -> frozenset:
        from .templating import generated_names
        return self.PRINTED | generated_names()[0]

    def __contains__(self, name):
        return name in self._names

    # listed in messages: the names a user could have chosen (those starting with _ are refused anyway)
    def __iter__(self):
        return iter(sorted(n for n in self._names if not n.startswith("_")))

    def __len__(self):
        return sum(1 for _ in self)


RESERVED = _GeneratedNames()
MODULE_NAMES = RESERVED  # a layer's name is a function of its generated module: the same names clash


@dataclass
class Layer:
    """A declared layer. Calling it runs the forward pass on real tensors."""

    name: str
    fn: Callable
    inputs: dict[str, Declaration]
    module: str = ""
    source_file: str = ""
    spec_path: str = ""  # the spec file as the user named it (``--layer``); "" for a built-in
    depends: frozenset = frozenset()  # files of the user's modules that loading the spec file imported
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
    def batch(self) -> str | None:
        """The dimension declared the batch axis (``Tensor(..., batch="n")``), or None."""
        return next((d.batch for d in self.inputs.values() if isinstance(d, Tensor) and d.batch), None)

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


def sizes_text(sizes: dict) -> str:
    """``n=32, d=64``: sizes as every report and message writes them."""
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def concrete_shape(dims: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of declared ``dims`` at concrete ``sizes`` (``("n", "t*e")`` -> ``(32, 30)``)."""
    return tuple(math.prod(sizes[name] for name in dim_names(d)) for d in dims)


def _shown(names) -> str:
    return ", ".join(sorted(n for n in names if not n.startswith("_")))


def _clash(name: str) -> str:
    """Why ``name`` cannot name something of a spec, or ""."""
    if keyword.iskeyword(name):
        return "is a Python keyword"
    if name.startswith("_"):
        return "starts with _ (generated code keeps such names for itself)"
    if name in RESERVED:
        return "is a name the generated code uses for itself"
    return ""


def constant_bounds(decl: Constant) -> list[tuple[str, float]]:
    """What a Constant's declaration requires, as ``(operator, bound)`` pairs: ``[(">", 0)]`` for
    ``positive=True``, ``[(">=", 0), ("<=", 1)]`` for ``low=0, high=1``."""
    bounds = [(">", 0)] if decl.positive else []
    bounds += [(">=", decl.low)] if decl.low is not None else []
    bounds += [("<=", decl.high)] if decl.high is not None else []
    return bounds


def constant_allows(decl: Constant, value: float) -> bool:
    compare = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    return all(compare[op](value, bound) for op, bound in constant_bounds(decl))


def constant_range(decl: Constant) -> str:
    """``"positive"``, ``">= 0 and <= 1"``: the declared values, in words for messages."""
    return " and ".join("positive" if (op, bound) == (">", 0) else f"{op} {bound!r}"
                        for op, bound in constant_bounds(decl))


def _check(name: str, fn: Callable, inputs: dict[str, Declaration]) -> None:
    code = getattr(fn, "__code__", None)
    line = code.co_firstlineno if code else None  # the first decorator's line: @layer(...)
    file = code.co_filename if code else ""
    source = linecache.getline(file, line) if line else ""

    def refuse(problem: str, fix: str):
        raise SpecError(name, problem, fix, line, source, file=file)

    if _clash(name):
        refuse(f"the layer's name {name!r} clashes with a name its generated module uses",
               f"rename the function (not a keyword, nor one of: {_shown(MODULE_NAMES)}, nor starting with _)")
    signature = inspect.signature(fn)
    params = list(signature.parameters)
    for p, decl in inputs.items():
        if p not in params:
            close = [q for q in params if q.lower() == p.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            refuse(f"declared input {p!r} is not a parameter of the function{hint}",
                   "declare exactly the function's parameters")
        if _clash(p):
            refuse(f"input name {p!r} clashes with a name the generated code uses: it {_clash(p)}",
                   f"rename the parameter (not a keyword, nor one of: {_shown(RESERVED)}, nor starting with _)")
        if not isinstance(decl, (Tensor, Labels, Constant)):
            refuse(f"input {p!r} is declared as {decl!r}", "use Tensor(...), Labels(...) or Constant(...)")
        if isinstance(decl, Tensor) and decl.domain not in DOMAINS:
            refuse(f"input {p!r} has domain {decl.domain!r}", f"use one of: {', '.join(repr(d) for d in DOMAINS)}")
        if isinstance(decl, (Tensor, Labels)):
            if not decl.dims or not all(isinstance(d, str) and DIM.match(d) for d in decl.dims):
                refuse(f"input {p!r} has dims {decl.dims!r}",
                       "give each dimension a name, e.g. Tensor('n', 'd') (or a product, 't*e')")
            batch = getattr(decl, "batch", None)
            if batch is not None and (batch not in decl.dims or dim_names(batch) != [batch]):
                refuse(f"input {p!r} declares batch={batch!r}, which is not one of its dimensions {decl.dims!r}",
                       f"name one of its own axes, e.g. batch={decl.dims[0]!r}")
            if isinstance(decl, Labels) and not (isinstance(decl.classes, str) and DIM.match(decl.classes)
                                                 and decl.classes != "1"):
                refuse(f"input {p!r} has classes={decl.classes!r}", "name the number of classes, e.g. classes='k'")
        else:
            _check_constant(p, decl, signature.parameters[p].default, refuse)
    for p in params:
        if p not in inputs:
            refuse(f"parameter {p!r} is not declared", f"add {p}=Tensor(...), Labels(...) or Constant(...) to @layer(...)")
    dims = {n for decl in inputs.values() if not isinstance(decl, Constant)
            for d in (*decl.dims, *([decl.classes] if isinstance(decl, Labels) else [])) for n in dim_names(d)}
    for dim in sorted(dims):
        if _clash(dim):
            refuse(f"the dimension name {dim!r} {_clash(dim)} (generated code keeps each size in a variable "
                   f"of its dimension's name)", f"rename the dimension {dim!r} in the declaration")
        # a dimension named like an input tensor (``h`` of an RNN's hidden state ``h``) is fine: its
        # size's variable is renamed in the generated code (forward.size_names); a Constant is a
        # number of the derivation itself, and one symbol cannot be both
        if dim in inputs and isinstance(inputs[dim], Constant):
            refuse(f"the dimension name {dim!r} is also the name of a Constant (generated code keeps each size in "
                   f"a variable of its dimension's name)", f"rename the dimension {dim!r} in the declaration")
    batches = sorted({d.batch for d in inputs.values() if isinstance(d, Tensor) and d.batch})
    if len(batches) > 1:
        refuse(f"inputs declare different batch axes: {', '.join(map(repr, batches))}",
               "declare one dimension the batch axis (the same batch= on every input that says it)")
    if not any(isinstance(d, Tensor) and d.differentiable for d in inputs.values()):
        refuse("no differentiable input", "declare at least one Tensor(...)")


def _check_constant(p: str, decl: Constant, default, refuse) -> None:
    """A Constant's default is a finite real number, and the function's default is the same number
    (the generated function takes the declared one; the spec, the reference, its own)."""
    value = decl.default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        refuse(f"Constant {p!r} has the default {value!r}, not a finite real number",
               f"give it a number, e.g. {p}=Constant(1e-5)")
    if not constant_allows(decl, value):
        refuse(f"constant {p!r} has the default {value!r}, outside the values it declares ({constant_range(decl)})",
               "make the default one of the values it allows")
    from .templating import generated_names
    if p in generated_names()[1]:
        refuse(f"Constant {p!r} has the name of an attribute the generated code keeps on ctx (ctx.{p})",
               f"rename the parameter (not one of: {', '.join(sorted(generated_names()[1]))})")
    if default is inspect.Parameter.empty:
        refuse(f"Constant {p!r} has no default in the function, while @layer declares {value!r}",
               f"write the same default in the function: {p}={value!r}")
    if isinstance(default, bool) or not isinstance(default, numbers.Real) or default != value:
        refuse(f"Constant {p!r} defaults to {value!r} in @layer but to {default!r} in the function",
               "make the two defaults the same number")


def layer(*bare, **inputs: Declaration) -> Callable[[Callable], Layer]:
    """Declare a layer: ``@layer(x=Tensor("n", "d"), ...)`` above its forward function."""
    if bare:
        fn = bare[0]
        code = getattr(fn, "__code__", None)
        file, line = (code.co_filename, code.co_firstlineno) if code else ("", None)
        raise SpecError(getattr(fn, "__name__", "?"), "@layer is used without its declarations",
                        "declare every parameter in parentheses: @layer(x=Tensor('n', 'd'), ...)", line,
                        linecache.getline(file, line) if line else "", file=file)

    def wrap(fn: Callable) -> Layer:
        name = fn.__name__
        _check(name, fn, inputs)
        return Layer(name=name, fn=fn, inputs=dict(inputs), module=fn.__module__,
                     source_file=inspect.getsourcefile(fn) or "", doc=inspect.getdoc(fn) or "")
    return wrap
