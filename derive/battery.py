"""The numerical battery: a kernel against autograd through its own spec, where floats run out.

The proof says a fused formula equals the spec's derivative in exact arithmetic; it cannot say how
the formula rounds. ``x`` rebuilt as ``log(exp(x))``, a sum squared that the spec only divided by,
``1 - p`` in a denominator, a difference of two large sums where the spec summed a difference: each
is exact and each fails in float32. So every value of a kernel (the output and every gradient) is
run here beside autograd through the spec, on inputs that reach those regimes:

* **scaled**: N(0, 1) inputs times 1, 10 and 100, and shifted by 1e3 and 1e6 (values that
  cancel, such as a logit and its row's maximum, must cancel before a small one is added);
* **saturating**, read off the spec as it runs: every call of a function that saturates or
  overflows (``exp``, ``tanh``, ``sigmoid``, ``softplus``, ``log``, ...) is recorded, and for each
  one the inputs (magnitudes in a narrow band, random signs) are scaled until that call's
  arguments reach a target size: ``tanh`` around 6, 20, 60 and 100 (where ``1 - tanh**2`` loses its
  digits, then rounds to 0), the spread before an ``exp`` as large (probabilities near one), the
  logarithm of a ``log``'s argument around 6, 20, 40 and 60 (a value near 0, or near 1e17, whose
  square overflows float32 where the value does not). float64 also goes where only it overflows
  (arguments near 800).

The reference is autograd through the spec in float64 on the same inputs; the bar is autograd
through the spec in float32. A value passes when it is finite wherever float32 autograd and the
reference are, and its largest error is at most ``SLACK`` times autograd's plus ``ULPS`` units in
the last place of the value's largest entry (a unit never less than the spacing of the subnormals:
a value below it cannot be held to more digits than it has; of a gradient that cancels to 0, a unit
of the upstream gradient's largest entry), each summed over a setting's three
draws (one draw's error of a total whose terms cancel is chance, autograd's as much as the
kernel's), and where that sum fails within a few times its bar, over six more draws too. In
float64 the bar is autograd's float32 error scaled to float64's precision, and finiteness wherever
float64 autograd is finite.

Memory too: once per battery, no tensor the kernel's forward and backward make may be more than
``MEMORY_SLACK`` times the largest that autograd through the spec makes. A product of tensors on
different axes written out before its sum is exact and, at real sizes, a dimension too large.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memo import ByObject
from .spec import Constant, Labels, Layer, Tensor, concrete_shape
from .verify import random_inputs, sample, upstream_for

SLACK, ULPS = 4.0, 4.0
# no tensor a kernel makes may hold more than this many times the bytes of the largest that autograd
# through the spec makes (or of the largest input): a product of tensors on different axes written out
# before it is summed (n x d x h where the matrix product is n x d) is larger by a whole dimension (13
# or more at the battery's sizes); an index of int64 beside a float32 tensor of its shape takes twice
MEMORY_SLACK = 2.0
FEW_ENTRIES = 3  # a gradient with at most this many distinct entries is one value broadcast (``Verdict.few``)
# A form is chosen with half the slack it is held to: the largest error over a draw varies from draw
# to draw, and a form chosen at the edge of the bar fails it at other inputs.
CHOOSE_SLACK = 2.0
# A value whose float32 errors over a setting's three draws fail the bar is judged over this many more
# draws of the setting too: one draw can make the whole sum (rows of a softmax one-hot on the other two
# draws, errors near 0), and on it autograd's error at the entry whose terms cancel is, by chance, a
# tenth of its typical size (at inputs 1e-5 away from that draw, the kernel's and autograd's errors
# had the same median, 1.9e-10 and 1.8e-10). A kernel worse on every draw, or by orders of magnitude
# on one, is still worse in the larger sum. A setting where some value's error is more than
# ``CONFIRM_WITHIN`` times its bar fails at once (a form ``select`` tries and drops costs no more draws).
CONFIRM_DRAWS, CONFIRM_WITHIN = 6, 4.0
F64_RELATIVE = 1e-7
F64_SLACK = 64.0
F64_EPS = torch.finfo(torch.float64).eps
NORMAL_SCALES = (1.0, 10.0, 100.0)
# inputs far from 0 (logits of 1e6): a sum whose terms cancel must cancel them before adding a small one
OFFSETS = (1e3, 1e6)
# target sizes of a saturating call's arguments (a log's: of the logarithm of its argument)
# (float32 overflows past e^88: a logarithm's argument of log-size 100 is already infinite, so
# logarithms and roots stop at 60, where their argument, and its square, are still finite)
TARGETS = {torch.float32: (6.0, 20.0, 60.0, 100.0), torch.float64: (20.0, 100.0, 800.0)}
LOG_TARGETS = {torch.float32: (6.0, 20.0, 40.0, 60.0), torch.float64: (20.0, 100.0, 600.0)}
# a saturating draw's signs: random, all positive, all negative (a function saturating on one side)
SIGNS = ((0, "random signs"), (1, "positive inputs"), (-1, "negative inputs"))
EDGE_STEPS = 12  # halvings of the log-scale gap between a finite and an overflowing draw (``_edges``)
# functions whose float behaviour changes with the size of their argument; a log or a root
# saturates towards 0 (its argument's logarithm is what grows)
SATURATING = {"exp", "exp_", "tanh", "tanh_", "sigmoid", "sigmoid_", "softplus", "logsigmoid", "expm1",
              "softmax", "log_softmax", "logsumexp", "erf", "erfc", "silu", "gelu", "elu", "cosh", "sinh"}
LOGARITHMIC = {"log", "log_", "log1p", "log2", "log10", "sqrt", "rsqrt", "reciprocal", "pow", "__pow__"}


@dataclass(frozen=True)
class Setting:
    """One way to draw the inputs: N(0, 1) (or, ``banded``, magnitudes in [1, 2) with random signs)
    times ``scale``, in ``dtype``."""

    label: str
    scale: float
    banded: bool
    dtype: torch.dtype
    sign: int = 0  # a banded draw's signs: random (0), all positive (1) or all negative (-1)
    offset: float = 0.0  # added to every differentiable input after scaling

    def inputs(self, layer: Layer, sizes: dict[str, int], seed: int) -> dict:
        return draw(layer, sizes, self.dtype, seed, self.scale, self.banded, self.sign, self.offset)


def draw(layer: Layer, sizes: dict[str, int], dtype: torch.dtype, seed: int, scale: float = 1.0,
         banded: bool = False, sign: int = 0, offset: float = 0.0) -> dict:
    """The spec's inputs (its ``.example`` where it has one) with every differentiable tensor scaled,
    an input with a declared domain only as far as it stays in it (``_in_domain``).

    A banded draw keeps every entry at one size (``sign * U[1, 2) * scale``), so that a whole tensor
    sits in the regime being tested rather than a few of its entries; with one sign for every entry,
    a function saturating on one side only (``softplus``, ``exp``) is seen there, where its
    derivative is tiny, and not hidden behind the large values of the other side."""
    values = random_inputs(layer, sizes, dtype, seed)
    g = torch.Generator().manual_seed(seed + 7)
    out = {}
    for name, value in values.items():
        decl = layer.inputs[name]
        if isinstance(decl, Tensor) and decl.differentiable and torch.is_tensor(value) and decl.domain != "real":
            value = _in_domain(decl.domain, value, g, scale, banded, offset)
        elif isinstance(decl, Tensor) and decl.differentiable and torch.is_tensor(value):
            if banded:
                magnitude = torch.rand(value.shape, generator=g, dtype=torch.float64) + 1
                signs = (torch.randint(0, 2, value.shape, generator=g).to(torch.float64) * 2 - 1 if sign == 0
                         else torch.full(value.shape, float(sign), dtype=torch.float64))
                value = (magnitude * signs).to(value.dtype)
            value = value * scale + offset
        out[name] = value
    return out


# the largest spread of a bounded domain's draw: sigmoid(2 * 4.5) is still below 1 in float32
BOUNDED_SCALE = 2.0


def _in_domain(domain: str, value: torch.Tensor, g: torch.Generator, scale: float, banded: bool,
               offset: float) -> torch.Tensor:
    """A draw of an input with a declared domain that stays in it. A positive (non-negative) input
    is scaled and shifted as a real one, its sign kept (magnitudes only, when banded); a bounded one
    (``unit``, ``probability``, ``binary``) is drawn again from the domain (``verify.sample``),
    sharper for a larger scale (probabilities nearer 0 and 1) but never out of it: a probability
    row still sums to 1, a mask is still 0 or 1."""
    if domain in ("positive", "nonnegative"):
        if banded:
            value = (torch.rand(value.shape, generator=g, dtype=torch.float64) + 1).to(value.dtype)
        return value * scale + abs(offset)
    return sample(domain, tuple(value.shape), value.dtype, g, min(scale, BOUNDED_SCALE))


class _Recorder(TorchFunctionMode):
    """Records, call by call, how large the argument of each saturating function is."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        arg = args[0] if args else kwargs.get("input")
        if name in ("pow", "__pow__"):  # a root or a reciprocal is a logarithmic call; x**3 is arithmetic
            exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
            if not isinstance(exponent, (int, float)) or (exponent >= 0 and float(exponent).is_integer()):
                name = ""
        if torch.is_tensor(arg) and arg.is_floating_point() and arg.numel() and name in SATURATING | LOGARITHMIC:
            with torch.no_grad():
                a = arg.detach().double().abs()
                if name in LOGARITHMIC:
                    a = a.clamp_min(1e-300).log().abs()
                self.sizes.append((name, float(a.median())))
        return func(*args, **kwargs)


class _Largest(TorchDispatchMode):
    """The most bytes one storage made by an operation run under it holds (autograd's backward
    included; the inputs' own storage, which a view or an in-place operation returns, not counted)."""

    def __init__(self, given: set):
        super().__init__()
        self.given = given
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.given:
                self.most = max(self.most, t.untyped_storage().nbytes())
        return out


# torch wraps a mode's ``__torch_dispatch__`` so that dynamo never traces it, and that wrapper imports
# torch._dynamo (a second, and Triton) on its first call; this mode is never compiled: marked as the
# wrapper would mark it, it runs as it is
_raw = getattr(_Largest.__torch_dispatch__, "__wrapped__", None)
if _raw is not None:
    _raw.__dynamo_disable = _raw


def largest_allocation(fn, inputs: dict, wanted: list[str], seed: int) -> int | None:
    """Bytes of the largest tensor ``fn``'s forward and backward make, or of the largest input if that
    is larger; None if ``fn`` raises."""
    tensors = [v for v in inputs.values() if torch.is_tensor(v)]
    mode = _Largest({t.untyped_storage().data_ptr() for t in tensors})
    try:
        with mode:
            _gradients(fn, inputs, wanted, seed)
    except Exception:
        return None
    return max([mode.most] + [t.untyped_storage().nbytes() for t in tensors])


def _judge_memory(layer: Layer, fn, setting: Setting, sizes: dict, seed: int, verdict: Verdict) -> None:
    """A finding where ``fn`` makes a tensor more than ``MEMORY_SLACK`` times the bytes of the largest
    that autograd through the spec makes: at real sizes it runs out of memory, or takes many times
    autograd's time (exact values cannot show it)."""
    inputs = setting.inputs(layer, sizes, seed)
    theirs = _kept(layer, ("memory", setting, tuple(sizes.items()), seed),
                   lambda: largest_allocation(layer.fn, inputs, layer.differentiable, seed))
    ours = largest_allocation(fn, inputs, layer.differentiable, seed)
    if theirs and ours and ours > MEMORY_SLACK * theirs:
        verdict.findings.append(Finding(setting, "the kernel", f"makes a tensor of {ours} bytes where the largest "
                                                              f"of autograd through the spec holds {theirs}"))


def _call_sizes(layer: Layer, inputs: dict) -> list[tuple[str, float]]:
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        try:
            layer.fn(**inputs)
        except Exception:  # a scale the spec cannot run at (it raised on its own): nothing to learn
            return []
    return recorder.sizes


def _scale_for(layer: Layer, sizes: dict, call: int, target: float, seed: int, dtype: torch.dtype) -> float | None:
    """The input scale at which the ``call``-th saturating call's arguments are about ``target``,
    by the secant method on log(size) against log(scale) (sizes grow like a power of the scale)."""
    points = []
    for log_scale in (0.0, math.log(4.0)):
        recorded = _call_sizes(layer, draw(layer, sizes, dtype, seed, math.exp(log_scale), banded=True))
        if len(recorded) <= call or not recorded[call][1] > 0 or not math.isfinite(recorded[call][1]):
            return None
        points.append((log_scale, math.log(recorded[call][1])))
    for _ in range(6):
        (s0, m0), (s1, m1) = points[-2], points[-1]
        if abs(m1 - math.log(target)) < math.log(1.25):
            return math.exp(s1)
        if abs(m1 - m0) < 1e-9:  # the call does not grow with the inputs
            return None
        s2 = s1 + (math.log(target) - m1) * (s1 - s0) / (m1 - m0)
        s2 = max(min(s2, math.log(1e30)), math.log(1e-30))
        recorded = _call_sizes(layer, draw(layer, sizes, dtype, seed, math.exp(s2), banded=True))
        if len(recorded) <= call or not recorded[call][1] > 0 or not math.isfinite(recorded[call][1]):
            return math.exp(s2) if points else None
        points.append((s2, math.log(recorded[call][1])))
    return math.exp(points[-1][0])


def settings(layer: Layer, sizes: dict[str, int], seed: int = 0) -> list[Setting]:
    """Every input draw of the battery for ``layer``: scaled, then saturating, read off its spec."""
    out = [Setting(f"N(0, 1) x {s:g}", s, False, dtype) for dtype in (torch.float32, torch.float64)
           for s in NORMAL_SCALES]
    out += [Setting(f"N(0, 1) + {c:g}", 1.0, False, torch.float32, offset=c) for c in OFFSETS]
    calls = _call_sizes(layer, draw(layer, sizes, torch.float64, seed, 1.0, banded=True))
    seen: list[tuple[torch.dtype, float]] = []
    for dtype in TARGETS:
        for k, (name, _) in enumerate(calls):
            for target in (LOG_TARGETS if name in LOGARITHMIC else TARGETS)[dtype]:
                scale = _scale_for(layer, sizes, k, target, seed, dtype)
                if scale is None or any(d == dtype and abs(math.log(scale / s)) < math.log(1.3) for d, s in seen):
                    continue
                seen.append((dtype, scale))
                what = f"log-size {target:g}" if name in LOGARITHMIC else f"size {target:g}"
                for sign, signs in SIGNS:
                    out.append(Setting(f"{name} call {k + 1} at argument {what} ({signs} x {scale:.3g})", scale,
                                       True, dtype, sign))
    return out + _edges(layer, sizes, seed, out)


def _edges(layer: Layer, sizes: dict, seed: int, drawn: list[Setting]) -> list[Setting]:
    """For each sign, where the spec's float32 output is finite at one saturating draw and not at a
    larger one: the largest scale at which it is still finite (bisected), so that the largest
    arguments sit just short of overflow. A kernel that overflows sooner than the spec (``c*exp(v)``
    multiplied before it is divided by a root near ``c``, at ``v`` of 88) is finite nowhere else the
    battery looks: a target below the edge does not reach it, and one past it makes the output
    infinite, where only the output is judged."""
    out = []
    for sign, signs in SIGNS:
        scales = sorted({s.scale for s in drawn if s.banded and s.dtype == torch.float32 and s.sign == sign})
        finite = {s: _finite_at(layer, sizes, seed, s, sign) for s in scales}
        low = max((s for s in scales if finite[s]), default=None)
        if low is None:
            continue
        high = min((s for s in scales if finite[s] is False and s > low), default=None)
        if high is None:
            continue
        for _ in range(EDGE_STEPS):
            middle = math.sqrt(low * high)
            if _finite_at(layer, sizes, seed, middle, sign):
                low = middle
            else:
                high = middle
        out.append(Setting(f"the edge of the spec's finite range ({signs} x {low:.4g})", low, True, torch.float32, sign))
    return out


def _finite_at(layer: Layer, sizes: dict, seed: int, scale: float, sign: int) -> bool | None:
    """Whether the spec's float32 output is finite at a banded draw (None where the spec raises)."""
    with torch.no_grad():
        try:
            value = layer.fn(**draw(layer, sizes, torch.float32, seed, scale, banded=True, sign=sign))
        except Exception:  # a scale the spec cannot run at: nothing to learn
            return None
    return bool(torch.isfinite(value).all())


@dataclass
class Finding:
    """A value that failed at one setting, and how."""

    setting: Setting
    value: str
    problem: str

    def __str__(self):
        return f"{self.value} at {self.setting.label}, {_dtype_name(self.setting.dtype)}: {self.problem}"


@dataclass
class Verdict:
    settings: list[Setting]
    findings: list[Finding] = field(default_factory=list)
    worst_ratio: float = 0.0  # the largest error against its bound over every value (float32)
    # gradients with at most ``FEW_ENTRIES`` distinct entries (one scalar broadcast): one error
    # sample per draw, so a draw says little of them (``select`` draws them again)
    few: set = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        if self.passed:
            return f"battery passed ({len(self.settings)} input draws, float32 error <= {self.worst_ratio:.2f} of the bar)"
        return f"battery failed: {self.findings[0]}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gradients(fn, inputs: dict, wanted: list[str], seed: int, dtype=None):
    leaves = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype, copy=True)
            leaves[k] = v.requires_grad_(k in wanted)
        else:
            leaves[k] = v
    out = fn(**leaves)
    out.backward(upstream_for(out.detach().double(), seed).to(out.dtype))
    grads = {k: torch.zeros_like(leaves[k]) if leaves[k].grad is None else leaves[k].grad for k in wanted}
    return [("output", out.detach())] + [(f"d{k}", grads[k]) for k in wanted]


def _values(fn, inputs, wanted, seed, dtype=None):
    """The output and gradients of ``fn``, or the exception it raised."""
    try:
        return _gradients(fn, inputs, wanted, seed, dtype)
    except Exception as e:  # a kernel that raises where autograd does not fails the battery
        return e


# What the spec itself gives on a draw, for the latest few layers: ``select`` runs the battery on each
# form it tries, with the same draws, and only the kernel's values differ (the spec's are two of the
# three calls of a float32 draw)
_SPEC_VALUES = ByObject(maxsize=4)


def _kept(layer: Layer, key, compute):
    table = _SPEC_VALUES.get(layer, lambda layer: {})
    if key not in table:
        table[key] = compute()
    return table[key]


def _reference(layer: Layer, setting: Setting, sizes: dict, seed: int) -> tuple:
    """``(inputs, reference, autograd's values)`` of a draw: autograd through the spec in float64 (the
    reference) and in the draw's dtype (the bar; in float64 the reference itself), each the values or
    the exception the spec raised. Read only: the kernels run on copies of the inputs."""
    def compute():
        inputs = setting.inputs(layer, sizes, seed)
        exact = _values(layer.fn, inputs, layer.differentiable, seed, torch.float64)
        if isinstance(exact, Exception) or setting.dtype == torch.float64:
            return inputs, exact, exact
        return inputs, exact, _values(layer.fn, inputs, layer.differentiable, seed)
    return _kept(layer, (setting, tuple(sizes.items()), seed), compute)


def _judge(setting: Setting, ours, theirs, exact, bar32: dict | None, verdict: Verdict, upstream: float = 0.0,
           slack: float = SLACK, pooled: dict | None = None, few_only: bool = False) -> dict:
    """Compare ``ours`` with ``theirs`` (autograd in the setting's dtype) against ``exact``.

    With ``pooled`` (float32), each value's errors are added to it (``name -> [(error, autograd's
    error, ulps)]``) for ``_judge_pooled`` instead of being held to the bar one draw at a time; with
    ``few_only`` too, only a value whose error is one sample a draw (``_few``: a scalar loss, a
    total broadcast), which is chance on one draw (``_judge_pooled``).

    Where the spec's own output is not finite (a loss of ``inf``: a probability that underflowed
    at its label), its gradients are not a reference and only the output is judged."""
    eps = torch.finfo(setting.dtype).eps
    # a unit in the last place of a value of size ``scale``: never less than the smallest normal
    # number (1.2e-38 in float32). Below it a value holds fewer digits the smaller it is, and one
    # that went through such a value on its way (``exp(-101)*c``) keeps that loss at any scale: an
    # error there is the format's underflow, whichever order rounds it (the spacing of the
    # subnormals, 2**-149, failed a kernel 3e-44 off where autograd's happened to land exactly)
    spacing = torch.finfo(setting.dtype).smallest_normal

    def ulps(scale: float) -> float:
        return ULPS * max(eps * scale, spacing)

    errors = {}
    broken = not bool(torch.isfinite(theirs[0][1]).all())
    values = [(name, mine, aut, ref) for (name, mine), (_, aut), (_, ref)
              in (zip(ours[:1], theirs, exact) if broken else zip(ours, theirs, exact))]
    compared = iter(_compared([v for v in values if v[1].shape == v[3].shape]))
    for name, mine, aut, ref in values:
        if mine.shape != ref.shape:
            verdict.findings.append(Finding(setting, name, f"shape {tuple(mine.shape)}, expected {tuple(ref.shape)}"))
            continue
        broken, finite, error, autograd_error, scale = next(compared)
        if broken:
            verdict.findings.append(Finding(setting, name, f"not finite at {broken:.0f} of {ref.numel()} entries where "
                                                           f"autograd through the spec is finite"))
            continue
        if not finite:
            continue
        if setting.dtype == torch.float32:
            errors[name] = autograd_error
            # a gradient that cancels to 0: float64 holds it only to its rounding of the upstream
            # gradient, and autograd's float32 has no digit of it. Its float32 value is rounding
            # whichever order computes it (autograd's lands on exactly 0 on some rows, by chance,
            # where an equally good order's is 1e-12 of the upstream): its unit is the upstream's
            cancelled = (name != "output" and autograd_error >= scale / 2
                         and scale <= 16 * F64_SLACK * F64_EPS * upstream)
            unit = ulps(upstream if cancelled else scale)
            if pooled is not None and (not few_only or _few(ref, aut)):  # judged over the setting's draws together
                pooled.setdefault(name, []).append((error, autograd_error, unit))
                continue
            bound = slack * autograd_error + unit
        elif bar32 is not None and name in bar32:  # float64: the float32 bar at float64's precision
            # (an estimate of autograd's float64 error, so with a wide margin: this bar is for gross errors)
            bound = F64_SLACK * bar32[name] * eps / torch.finfo(torch.float32).eps + 16 * ulps(scale)
        else:
            bound = math.inf
        if setting.dtype == torch.float64:  # a gross error only: precision is judged in float32, where
            # autograd's own rounding is the bar (float64 autograd is the reference itself, and differs
            # from the exact value where torch takes a shortcut, softplus is x itself above 20, or
            # where the value cancels to 0 and the reference keeps its rounding: a gradient error
            # below a few hundred ulps of the upstream gradient is that rounding)
            bound = max(bound, F64_RELATIVE * scale, 16 * F64_SLACK * eps * upstream)
        if error > bound:
            verdict.findings.append(Finding(setting, name, f"error {error:.3g} against the float64 reference, "
                                                           f"bar {bound:.3g} (autograd's own: {autograd_error:.3g})"))
        elif setting.dtype == torch.float32 and bound > 0:
            verdict.worst_ratio = max(verdict.worst_ratio, error / bound)
    return errors


def _few_distinct(value: torch.Tensor) -> bool:
    """Whether ``value`` has at most ``FEW_ENTRIES`` distinct entries: one value broadcast."""
    return torch.unique(value.detach()).numel() <= FEW_ENTRIES


def _few(reference: torch.Tensor, autograd: torch.Tensor) -> bool:
    """Whether a value's float32 error is one sample a draw: the value has at most ``FEW_ENTRIES``
    distinct entries, or autograd's error is one error shared by every entry (within half its size):
    a gradient through a mean of inputs far from 0 (``x - x.mean()`` at an offset of 1000) is off
    by the mean's rounding everywhere, and an equally accurate order's rounding of the mean is
    another sample of it, twice autograd's on one draw in three."""
    if reference.numel() <= FEW_ENTRIES or _few_distinct(reference):
        return True
    error = (autograd.detach().double() - reference.detach())
    error = error[torch.isfinite(error)]
    if error.numel() == 0:
        return False
    largest = float(error.abs().max())
    return largest > 0 and float(error.max() - error.min()) <= largest / 2


def _compared(values: list) -> list[list[float]]:
    """For each ``(name, ours, autograd's, reference)`` of one shape: ``[entries where ours is not
    finite though autograd's and the reference are, entries where both of those are finite, the
    largest error of ours there, of autograd's there, the largest reference value there]``. In NumPy:
    the tensors are small (a few thousand entries) and a call of torch costs more than its work."""
    out = []
    with np.errstate(invalid="ignore", over="ignore"):
        for _, *tensors in values:
            # float32 against float64 subtracts in float64 (NumPy promotes): the same as widening first
            mine, aut, ref = (t.detach().reshape(-1).numpy() for t in tensors)
            mask = np.isfinite(aut) & np.isfinite(ref)
            largest = [float(np.max(np.abs(t), where=mask, initial=0.0)) for t in (mine - ref, aut - ref, ref)]
            out.append([float(np.count_nonzero(mask & ~np.isfinite(mine))), float(np.count_nonzero(mask)), *largest])
    return out


def _pooled_failures(pooled: dict, slack: float) -> tuple[dict[str, tuple[str, float]], float]:
    """The values whose float32 errors, summed over a setting's draws, are above the bar summed
    likewise, each with what failed and its error over the bar; and the largest ratio of error to
    bar among the others."""
    failures, worst = {}, 0.0
    for name, records in pooled.items():
        error = sum(e for e, _, _ in records)
        autograd_error = sum(a for _, a, _ in records)
        bound = slack * autograd_error + sum(u for _, _, u in records)
        draws = f" (summed over {len(records)} draws)" if len(records) > 1 else ""
        if error > bound:
            failures[name] = (f"error {error:.3g} against the float64 reference{draws}, "
                              f"bar {bound:.3g} (autograd's own: {autograd_error:.3g})",
                              error / bound if bound > 0 else math.inf)
        elif bound > 0:
            worst = max(worst, error / bound)
    return failures, worst


def _judge_pooled(setting: Setting, pooled: dict, verdict: Verdict, slack: float) -> None:
    """Each value's float32 errors over a setting's draws, summed, against the bar summed likewise.

    A value with few independent entries (a total, a scalar loss, a gradient that is one sum
    broadcast) has one error per draw, and where its terms cancel that error is rounding noise as
    large as the terms: autograd's lands near 0 on some draws by chance, and an equally accurate
    kernel's is then many times it. Held draw by draw, an equally good form failed one setting in
    ten; over three draws the chance is small, while a form that is worse (on every draw, or by
    orders of magnitude on one: an entry that breaks) still is worse in the sum. One draw can still
    make the whole sum, where the others give errors near 0 (a softmax one-hot on their rows): a
    value that fails over three draws is drawn ``CONFIRM_DRAWS`` times more (``run``)."""
    failures, worst = _pooled_failures(pooled, slack)
    verdict.findings += [Finding(setting, name, problem) for name, (problem, _) in failures.items()]
    verdict.worst_ratio = max(verdict.worst_ratio, worst)


def run(layer: Layer, fn, sizes: dict[str, int], seed: int = 0, draws: list[Setting] | None = None,
        slack: float = SLACK, pooled: bool = True) -> Verdict:
    """``fn`` (called with the spec's arguments by name) through every setting of the battery.

    Each setting is drawn three times: at ``sizes``, then with the next seeds at 24 rows, every
    other dimension short too (7, 9, ...), and at 48 rows. The largest error over many entries is a
    lenient statistic (autograd's own grows with the count too): a form whose errors have a heavier
    tail than autograd's passes a large draw and fails a small one (a softmax over a (13, 13) input,
    its rows near one-hot at saturating inputs, hid a 150x error at the argmax that rows of 7
    show); and a form that breaks on rare entries (a probability that underflows at the label)
    needs more than one draw to be seen. Finiteness is judged draw by draw; float32 errors over the
    three draws together (``_judge_pooled``), or with ``pooled=False`` draw by draw: the stricter
    test a form is chosen by (``select``), so that the form written passes the pooled one at other
    inputs (chosen over the draws together, a form at the edge of the bar failed it). A value whose
    error is one sample a draw (``_few``) is judged over the draws together either way."""
    draws = settings(layer, sizes, seed) if draws is None else draws
    verdict = Verdict(draws)
    wanted = layer.differentiable
    first = next(iter(sizes), None)
    small = {d: min(size, 5 + 2 * k) for k, (d, size) in enumerate(sizes.items())}
    variants = [(sizes, seed)] + [({**(small if rows == 24 else sizes), first: min(rows, sizes[first])}, seed + k)
                                  for k, rows in enumerate((24, 48), start=1) if first]
    bars: dict[tuple, dict] = {}
    entries: dict[str, bool] = {}  # value -> few distinct entries at every N(0, 1) draw so far
    first32 = next((s for s in draws if s.dtype == torch.float32), None)
    if first32 is not None:
        _judge_memory(layer, fn, first32, sizes, seed, verdict)

    def judge_draw(setting: Setting, at: dict, draw_seed: int, pooled_errors: dict | None) -> None:
        key = (setting.scale, setting.banded, setting.sign, setting.offset, draw_seed)
        inputs, exact, theirs = _reference(layer, setting, at, draw_seed)
        if isinstance(exact, Exception):
            return  # the spec itself cannot run here: nothing to compare with
        ours = _values(fn, inputs, wanted, draw_seed)
        if isinstance(theirs, Exception):
            return
        if isinstance(ours, Exception):
            verdict.findings.append(Finding(setting, "the kernel", f"raised {type(ours).__name__}: {ours}"))
            return
        if setting.dtype == torch.float64 and setting.scale == 1.0 and not setting.banded and not setting.offset:
            # few at every N(0, 1) draw (a gradient can vanish on one, where a tanh saturates)
            for name, ref in exact[1:]:
                few = ref.numel() > 1 and _few_distinct(ref)
                entries[name] = entries.get(name, True) and few
        bar32 = bars.get(key) if setting.dtype == torch.float64 else None
        upstream = float(upstream_for(exact[0][1].double(), draw_seed).abs().max())
        errors = _judge(setting, ours, theirs, exact, bar32, verdict, upstream, slack, pooled_errors,
                        few_only=not pooled)
        if setting.dtype == torch.float32:
            bars[key] = errors

    for setting in sorted(draws, key=lambda s: s.dtype != torch.float32):
        pooled_errors: dict | None = {} if setting.dtype == torch.float32 else None
        for at, draw_seed in variants:
            judge_draw(setting, at, draw_seed, pooled_errors)
        if pooled_errors:
            failures, _ = _pooled_failures(pooled_errors, slack)
            if failures and max(over for _, over in failures.values()) <= CONFIRM_WITHIN:
                # failed over three draws, each value within a few times its bar: drawn again
                # before it is judged (``CONFIRM_DRAWS``)
                for k in range(CONFIRM_DRAWS):
                    judge_draw(setting, variants[k % len(variants)][0], seed + len(variants) + k, pooled_errors)
            _judge_pooled(setting, pooled_errors, verdict, slack)
    verdict.few = {name for name, few in entries.items() if few}
    return verdict


def battery_sizes(layer: Layer) -> dict[str, int]:
    """Large enough for sums to lose digits (128 rows), small enough to run in a fraction of a second."""
    return {d: 128 if k == 0 else 10 + 3 * k for k, d in enumerate(layer.dims)}


__all__ = ["Setting", "Verdict", "Finding", "run", "settings", "battery_sizes", "draw", "largest_allocation"]
