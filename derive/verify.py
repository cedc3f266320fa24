"""Numeric check of a generated kernel against autograd through the very same spec.

The exercise's comparison table: for each gradient, ``exact`` (bitwise equal), ``approximate``
(``torch.allclose``) and ``maxdiff`` (largest absolute difference).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .errors import DeriveError
from .memo import ByObject
from .spec import Constant, Labels, Layer, concrete_shape, sizes_text


@dataclass
class Row:
    name: str
    exact: bool
    approximate: bool
    maxdiff: float

    def __str__(self):
        return f"{self.name:15s} | exact: {str(self.exact):5s} | approximate: {str(self.approximate):5s} | maxdiff: {self.maxdiff:.3e}"

    @property
    def detail(self) -> str:
        return f"maxdiff {self.maxdiff:.3e}"


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor) -> Row:
    """One row of the table (the exercise's ``cmp``). A NaN where autograd of the spec has one is a
    match (a spec undefined there, ``sqrt`` of a negative draw: the kernel is as the spec); a NaN on
    one side only is an infinite difference. No gradient (None: an input the output does not read)
    matches no gradient only."""
    if ours is None or reference is None:
        same = ours is None and reference is None
        return Row(name, same, same, 0.0 if same else float("inf"))
    ours, reference = ours.detach(), reference.detach()
    both = torch.isnan(ours) & torch.isnan(reference)
    exact = bool(torch.equal(ours[~both], reference[~both]) and ours.shape == reference.shape)
    approximate = bool(torch.allclose(ours, reference, equal_nan=True))
    difference = (ours - reference).abs().masked_fill(both, 0.0).nan_to_num(nan=float("inf"))
    maxdiff = float(difference.max()) if ours.numel() else 0.0
    return Row(name, exact, approximate, maxdiff)


def sample(domain: str, shape: tuple, dtype=torch.float64, generator: torch.Generator | None = None,
           scale: float = 1.0) -> torch.Tensor:
    """Random values of a declared ``domain`` (``spec.DOMAINS``). ``scale`` spreads them as far as
    the domain allows: N(0, scale^2) for a real input; for the others the same normal numbers go
    through the map onto the domain (``exp``, ``abs``, ``sigmoid``, a softmax along the last axis),
    so a large scale gives values near the domain's edges (probabilities near 0 and 1)."""
    if domain == "real":
        z = torch.randn(shape, generator=generator, dtype=dtype)
        return z if scale == 1 else z * scale
    z = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if domain == "positive":
        z = z.mul(0.5).exp()
    elif domain == "nonnegative":
        z = z.abs()
    elif domain == "unit":
        z = torch.sigmoid(z)
    elif domain == "probability":
        z = torch.softmax(z, dim=-1) if z.dim() else torch.ones_like(z)
    elif domain == "binary":
        z = (z > 0).to(z.dtype)
    else:
        raise DeriveError(f"no such domain {domain!r}")
    return z.to(dtype)


_TRACED = ByObject(maxsize=64)  # layer -> its traced graph (for the sizes it divides)


def fitted_sizes(layer: Layer, sizes: dict[str, int]) -> dict[str, int]:
    """``sizes`` made to divide where the spec splits a size (``x.view(n, G, d // G)``)."""
    from .trace import trace

    def traced(layer):
        try:
            return trace(layer)
        except DeriveError:  # a spec that does not trace has no divided sizes to honour
            return None
    graph = _TRACED.get(layer, traced)
    return graph.fitted(sizes) if graph is not None and graph.derived else dict(sizes)


def random_inputs(layer: Layer, sizes: dict[str, int], dtype=torch.float64, seed: int = 0, scale: float = 1.0) -> dict:
    """Inputs for ``layer``: its own example inputs if it has them, else floats drawn from each
    input's declared domain (``sample``; N(0, 1) for a plain ``Tensor``) and uniform labels."""
    if layer.example is not None:
        return layer.example(sizes, dtype=dtype, seed=seed)
    sizes = fitted_sizes(layer, sizes)
    g = torch.Generator().manual_seed(seed)
    values = {}
    for name, decl in layer.inputs.items():
        if isinstance(decl, Constant):
            values[name] = decl.default
        elif isinstance(decl, Labels):
            shape = concrete_shape(decl.dims, sizes)
            values[name] = torch.randint(0, sizes[decl.classes], shape, generator=g)
        else:
            shape = concrete_shape(decl.dims, sizes)
            values[name] = sample(decl.domain, shape, dtype, g, scale)
    return values


def autograd_everything(layer: Layer, inputs: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Autograd's gradient of every input and every named intermediate of the spec (``retain_grad``)."""
    wanted = layer.differentiable
    leaves = {k: (v.clone().requires_grad_(k in wanted) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    local = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is layer.fn.__code__:
            local.update(frame.f_locals)

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        out = layer.fn(**leaves)
    finally:
        sys.setprofile(old)
    tensors = {k: v for k, v in local.items() if isinstance(v, torch.Tensor) and v.requires_grad and k not in leaves}
    for t in tensors.values():
        t.retain_grad()
    if out.requires_grad:
        out.backward(upstream_for(out, seed))
    # an input the output does not read has no gradient: None, as autograd leaves it
    inputs = {k: leaves[k].grad for k in wanted}
    return {**inputs, **{k: t.grad for k, t in tensors.items() if t.grad is not None}}


def steps_table(layer: Layer, module, sizes: dict[str, int], dtype=torch.float32, seed: int = 0) -> list[Row]:
    """The exercise's table for a generated step-by-step backward: every intermediate and input."""
    inputs = random_inputs(layer, sizes, dtype, seed)
    reference = autograd_everything(layer, inputs, seed)
    out, cache = module.forward(**inputs)
    ours = module.backward(cache, upstream_for(out, seed))
    order = [name for name in reversed(list(cache)) if f"d{name}" in ours and name in reference]
    return [compare(name, ours[f"d{name}"], reference[name]) for name in order]


def upstream_for(out: torch.Tensor, seed: int) -> torch.Tensor:
    """The upstream gradient, as the exercise has it: 1 for a scalar loss (``loss.backward()``),
    else the gradient of a batch-mean loss, random entries of size ~1/n."""
    if out.dim() == 0:
        return torch.ones((), dtype=out.dtype)
    return _upstream(tuple(out.shape), seed).to(out.dtype, copy=True)  # a copy: a backward may write into it


# drawn once per shape and seed: the battery asks for the same one thousands of times, and a draw of a
# few thousand normal numbers costs 40 us where the copy costs a few
@functools.lru_cache(maxsize=64)
def _upstream(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g, dtype=torch.float64).div(shape[0])


def gradients(fn, inputs: dict, wanted: list[str], seed: int, dtype=None) -> tuple[torch.Tensor, dict]:
    """Output and input gradients of ``fn`` on copies of ``inputs`` (cast to ``dtype`` if given)."""
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
            leaves[k] = v.requires_grad_(k in wanted)
        else:
            leaves[k] = v
    out = fn(**leaves)
    out.backward(upstream_for(out, seed))
    # autograd leaves .grad unset for an input the output does not read: its gradient is zero
    return out, {k: torch.zeros_like(leaves[k]) if leaves[k].grad is None else leaves[k].grad for k in wanted}


def against_autograd(layer: Layer, fused, sizes: dict[str, int], dtype=torch.float64, seed: int = 0) -> list[Row]:
    """Gradients of ``fused`` (a generated functional) vs autograd of the spec, same inputs and upstream."""
    inputs = random_inputs(layer, sizes, dtype, seed)
    wanted = layer.differentiable
    out_ref, ref = gradients(layer.fn, inputs, wanted, seed)
    out_ours, ours = gradients(fused, inputs, wanted, seed)
    rows = [compare("output", out_ours, out_ref)]
    rows += [compare(f"d{k}", ours[k], ref[k]) for k in wanted]
    return rows


# In float32 a value passes when its error against the float64 reference is at most this many times
# autograd's own float32 error (another order of operations rounds differently), plus this many
# float32 units in the last place of the value's largest entry (for values autograd gets exactly).
FLOAT32_SLACK, FLOAT32_ULPS = 4.0, 4.0


@dataclass
class ErrorRow:
    """One value of a float32 kernel: its error against float64 and autograd's float32 error."""

    name: str
    error: float
    autograd_error: float
    scale: float  # the largest entry of the float64 reference

    @property
    def approximate(self) -> bool:
        bound = FLOAT32_SLACK * self.autograd_error + FLOAT32_ULPS * torch.finfo(torch.float32).eps * self.scale
        return self.error <= bound

    @property
    def detail(self) -> str:
        return f"error {self.error:.3e} against float64, autograd's float32 error {self.autograd_error:.3e}"

    def __str__(self):
        return (f"{self.name:15s} | error: {self.error:.3e} | autograd of the spec, float32: {self.autograd_error:.3e} "
                f"| within: {self.approximate}")


def float32_errors(layer: Layer, fn, sizes: dict[str, int], seed: int = 0) -> list[ErrorRow]:
    """The output and every gradient of ``fn`` in float32, against autograd of the spec in float64
    on the same (float32) inputs, next to the error of autograd of the spec in float32."""
    inputs = random_inputs(layer, sizes, torch.float32, seed)
    wanted = layer.differentiable
    out_exact, exact = gradients(layer.fn, inputs, wanted, seed, dtype=torch.float64)
    out_ref, ref = gradients(layer.fn, inputs, wanted, seed)
    out_ours, ours = gradients(fn, inputs, wanted, seed)

    def row(name, mine, theirs, truth):
        error = float((mine.detach().double() - truth.detach()).abs().max()) if truth.numel() else 0.0
        autograd_error = float((theirs.detach().double() - truth.detach()).abs().max()) if truth.numel() else 0.0
        return ErrorRow(name, error, autograd_error, float(truth.detach().abs().max()) if truth.numel() else 0.0)

    return [row("output", out_ours, out_ref, out_exact)] + [row(f"d{k}", ours[k], ref[k], exact[k]) for k in wanted]


def accuracy(layer: Layer, fused, sizes: dict[str, int], seed: int = 0) -> dict:
    """Largest float32 error of each gradient against a float64 reference: ``{name: (fused, autograd)}``."""
    return {r.name: (r.error, r.autograd_error) for r in float32_errors(layer, fused, sizes, seed)[1:]}


@dataclass
class KernelCheck:
    """A hand-written kernel held against autograd of its spec: the table at each size (the
    exercise's in float64; errors against a float64 reference in float32), and, in float64,
    ``torch.autograd.gradcheck`` (its backward against its own forward)."""

    layer: str
    kernel: str
    tables: list[tuple[dict, list]]  # (sizes, [Row or ErrorRow])
    gradcheck: str  # "passed (sizes)", "failed: why (sizes)", or why it did not run

    def failures(self) -> list[str]:
        """One line per failed comparison (empty when the kernel matches the spec)."""
        out = [f"{r.name} differs from autograd of the spec at {sizes_text(sizes)} ({r.detail})"
               for sizes, rows in self.tables for r in rows if not r.approximate]
        if self.gradcheck.startswith("failed"):
            out.append(f"gradcheck {self.gradcheck}")
        return out


def kernel_sizes(layer: Layer, exercise: dict[str, int]) -> list[dict[str, int]]:
    """The exercise's sizes, and a small one with odd sizes (a batch of 5: Bessel's n - 1 is not n)."""
    return [{d: exercise.get(d, 16) for d in layer.dims}, {d: 5 if k == 0 else 3 for k, d in enumerate(layer.dims)}]


def check_kernel(layer: Layer, fn, kernel: str, sizes: list[dict[str, int]], dtype=torch.float64,
                 seed: int = 0) -> KernelCheck:
    """``fn``, called with the spec's arguments by name, against autograd through ``layer.fn``: the
    output and every gradient at each of ``sizes``, then (float64) ``gradcheck`` at a small size.

    In float64 the values must agree as the exercise's ``approximate`` (``allclose``). In float32 a
    kernel rounds differently from autograd, so each value's error against a float64 reference is
    held against autograd's own float32 error (``FLOAT32_SLACK``, ``FLOAT32_ULPS``). A kernel that
    raises is reported as a failure with the exception, not raised."""
    tables = []
    for size in sizes:
        try:
            rows = (against_autograd(layer, fn, size, dtype=torch.float64, seed=seed) if dtype == torch.float64
                    else float32_errors(layer, fn, size, seed=seed))
        except Exception as e:  # the kernel's own error: the verdict names it
            rows = [Row(f"the kernel raised {type(e).__name__}: {e}", False, False, float("nan"))]
        tables.append((size, rows))
    name = f"{kernel} (layer {layer.name})"
    if dtype != torch.float64:
        return KernelCheck(layer.name, name, tables, "not run (it needs float64)")
    small = {d: 3 if k == 0 else 2 for k, d in enumerate(layer.dims)}
    inputs = random_inputs(layer, small, torch.float64, seed + 1)
    names, wanted = list(inputs), set(layer.differentiable)
    args = tuple(v.clone().requires_grad_(k in wanted) if torch.is_tensor(v) else v for k, v in inputs.items())
    try:
        passed = torch.autograd.gradcheck(lambda *a: fn(**dict(zip(names, a))), args, raise_exception=False)
        verdict = "passed" if passed else "failed: the backward disagrees with finite differences"
    except Exception as e:
        verdict = f"failed: {type(e).__name__}: {e}"
    return KernelCheck(layer.name, name, tables, f"{verdict} ({sizes_text(small)})")


def as_function(kernel, layer: Layer):
    """``kernel`` as a function of the spec's arguments by name: a function as it is, an
    ``autograd.Function`` subclass through its ``apply``, with the arguments in the spec's order."""
    if isinstance(kernel, type) and issubclass(kernel, torch.autograd.Function):
        order = list(layer.inputs)
        return lambda **arguments: kernel.apply(*[arguments[k] for k in order])
    return kernel


def load_function(argument: str):
    """The function (or ``autograd.Function`` class) ``NAME`` of ``FILE.py``, from ``FILE.py:NAME``."""
    path, _, name = argument.rpartition(":")
    if not path or not name.isidentifier():
        raise DeriveError(f"--kernel {argument}: expected FILE.py:NAME, the file and the function in it")
    if not Path(path).is_file():
        raise DeriveError(f"--kernel {argument}: no such file {path!r}")
    module = load_module(Path(path))
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise DeriveError(f"--kernel {argument}: {path} has no function {name!r}"
                          + (f" (it defines {', '.join(found)})" if found else ""))
    return fn


def load_module(path: Path) -> ModuleType:
    """Import a Python file by path, a generated module or a hand-written kernel (fresh each time,
    so a regenerated file is picked up)."""
    name = f"_derive_loaded_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def table(rows: list[Row]) -> str:
    """The rows one per line, their names padded to the longest (each row prints its name in 15 columns)."""
    width = max([15] + [len(r.name) for r in rows])
    return "\n".join(r.name.ljust(width) + str(r)[max(15, len(r.name)):] for r in rows)
