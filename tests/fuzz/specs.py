"""Random layer specs, as the Python source a user would write, for the fuzz tests.

A spec is built line by line. Every value the spec computes carries its shape (in named
dimensions: ``("n", "k")``, ``("n", "1")``, ``("k",)``, ...) and numeric bounds: ``hi`` bounds its
magnitude on the test inputs, ``lo`` (when not None) bounds it from below by a positive number.
The bounds decide which operations are safe: ``log`` and ``/`` only of values bounded away from 0,
``exp`` only of moderate values, nothing whose magnitude would leave float64's comfortable range.
So every drawn spec is a well-defined, smooth function on its test inputs, and any disagreement
with autograd is the toolkit's fault.

Two families: ``fused`` specs use what the fused engine derives (elementwise functions, roots,
clamps and masks with ``torch.where``, broadcasting arithmetic, sums and means over one or two
axes, variances over one, ``F.softmax``/``log_softmax``/``logsumexp``, picking by label, ``max`` as the shift of a
softmax, ``@`` with a square matrix and transposes); ``steps`` specs (``fused = False``,
step-by-step backward only) also use a free ``max`` and matrices of another size.

Shrinking: the number of lines, each operand and each operation are drawn as small integers
whose smallest values are the simplest choice, so a failure shrinks to a short spec.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from hypothesis import strategies as st

# Test inputs are N(0, 1); |x| < 6 except with negligible probability.
INPUT_BOUND = 6.0
LARGEST = 1e4  # no value may grow beyond this (keeps float64 rounding far below the tolerance)
SMALLEST_DIVISOR = 1e-2  # log and / only of values at least this large
SIZE_BOUND = 6  # the largest concrete size of a dimension in the numeric checks


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple
    hi: float
    lo: float | None = None  # a positive lower bound, when the value is known positive
    reads: frozenset = frozenset()  # the inputs it depends on

    @property
    def positive(self) -> bool:
        return self.lo is not None and self.lo >= SMALLEST_DIVISOR


@dataclass(frozen=True)
class FuzzSpec:
    """One random layer: its source file text, its name, and whether it asks for a fused kernel."""

    name: str
    source: str
    fused: bool
    sizes: dict

    def __repr__(self):  # hypothesis prints the failing example: show the spec as code
        return f"FuzzSpec(fused={self.fused}, sizes={self.sizes}):\n{self.source}"


# -- the inputs a spec may declare ---------------------------------------------------------------
# name -> (declaration, shape); x is always there, the others are drawn.
OPTIONAL_INPUTS = {
    "b": ('Tensor("n", "1")', ("n", "1")),
    "c": ('Tensor("1", "k")', ("1", "k")),
    "w": ('Tensor("k")', ("k",)),
    "u": ('Tensor("n", "k", differentiable=False)', ("n", "k")),
    "A": ('Tensor("k", "k")', ("k", "k")),  # a square matrix: one dimension twice
}
# inputs of a declared domain, with their bounds (hi, lo): a probability row is positive and below 1
DOMAIN_INPUTS = {"p": ('Tensor("n", "k", differentiable=False, domain="probability")', ("n", "k"), 1.0, SMALLEST_DIVISOR)}
# Matrices for '@' (step specs): x @ W is (n, m), and (n, m) @ V is back in the (n, k) family.
STEP_INPUTS = {"W": ('Tensor("k", "m")', ("k", "m")), "V": ('Tensor("m", "k")', ("m", "k"))}


def broadcast(a: tuple, b: tuple) -> tuple | None:
    """The broadcast shape of two named shapes, or None when torch would refuse (n != k) or the
    result would have one dimension twice ((n,) - (n, 1) is (n, n): the engine refuses that shape,
    as tests/test_spec_errors.py asserts, and the fuzzer tests what it accepts)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else "1"
        y = b[-i] if i <= len(b) else "1"
        if x != "1" and y != "1" and x != y:
            return None
        out.append(y if x == "1" else x)
    varying = [d for d in out if d != "1"]
    return tuple(reversed(out)) if len(set(varying)) == len(varying) else None


# Scalar factors: (code, largest magnitude, smallest value when positive, else None); sizes and
# declared constants included, so formulas carry ``1/n`` and ``scale`` through.
FACTORS = [("0.5", 0.5, 0.5), ("2.0", 2.0, 2.0), ("-1.5", 1.5, None), ("(1 / n)", 0.5, 1 / SIZE_BOUND),
           ("(1 / k)", 0.5, 1 / SIZE_BOUND), ("scale", 0.75, 0.75)]


# Names a user may give a line that the generated code gives its own values too: the output
# (``out``), the trace's ``t<k>``, the printers' temporaries (``common0``, ``mask0``, ``sum_x``...).
USER_NAMES = ["out", "h", "t1", "t2", "common0", "mask0", "product0", "shared0", "sum_x", "shared0_terms", "out_2"]


def _bounded(hi: float) -> bool:
    return hi <= LARGEST


class Builder:
    """Draws lines of a spec, keeping every value's shape and bounds."""

    def __init__(self, draw, fused: bool, labels: bool):
        self.draw = draw
        self.fused = fused
        self.labels = labels
        self.values: list[Value] = []
        self.lines: list[str] = []
        self.count = 0

    def fresh(self) -> str:
        """``v<k>``, or now and then a name users write that the generated code also makes for itself."""
        self.count += 1
        taken = {v.name for v in self.values}
        if self.draw(st.integers(0, 3)) == 3:
            name = self.draw(st.sampled_from(USER_NAMES))
            if name not in taken:
                return name
        return f"v{self.count}"

    def emit(self, code: str, shape: tuple, hi: float, lo: float | None = None) -> Value:
        operands = [v for v in self.values if re.search(rf"\b{v.name}\b", code)]
        value = Value(self.fresh(), shape, hi, lo, frozenset().union(*[v.reads for v in operands]))
        self.lines.append(f"    {value.name} = {code}")
        self.values.append(value)
        return value

    def pick_value(self, allowed=lambda v: True) -> Value | None:
        """A value already computed, preferring the most recent (so lines tend to chain)."""
        candidates = [v for v in reversed(self.values) if allowed(v)]
        if not candidates:
            return None
        if len(candidates) == 1 or not self.draw(st.booleans()):
            return candidates[0]
        return candidates[self.draw(st.integers(1, len(candidates) - 1))]

    # -- operations: each returns a new Value, or None when it does not apply --------------
    def unary(self, a: Value, kind: int) -> Value | None:
        name, shape, hi, lo = a.name, a.shape, a.hi, a.lo
        if kind == 0:
            return self.emit(f"torch.tanh({name})", shape, 1.0)
        if kind == 1 and hi <= 8:
            return self.emit(f"{name}.exp()", shape, math.exp(hi), math.exp(-hi))
        if kind == 2 and a.positive:
            low = math.log(lo)
            return self.emit(f"{name}.log()", shape, max(abs(low), math.log(hi)), low if low > 0.05 else None)
        if kind == 3 and _bounded(hi * hi + 1):  # a log of a value that is positive by construction
            return self.emit(f"({name} * {name} + 1).log()", shape, math.log(hi * hi + 1))
        if kind == 4 and _bounded(hi**2):
            return self.emit(f"{name}**2", shape, hi**2)
        if kind == 5 and _bounded(hi**3):
            return self.emit(f"{name} ** 3", shape, hi**3, lo**3 if lo else None)
        if kind == 6 and a.positive:
            return self.emit(f"{name}**0.5", shape, math.sqrt(hi), math.sqrt(lo))
        if kind == 7 and a.positive:
            return self.emit(f"{name} ** -1", shape, 1 / lo, 1 / hi)
        if kind == 8 and a.positive:
            return self.emit(f"({name} + eps) ** -0.5", shape, (lo) ** -0.5, (hi + 1) ** -0.5)
        if kind == 9:
            return self.emit(f"-{name}", shape, hi)
        if kind == 10:
            text, largest, smallest = self.draw(st.sampled_from(FACTORS))
            if not _bounded(hi * largest):
                return None
            code = f"{text} * {name}" if self.draw(st.booleans()) else f"{name} * {text}"
            return self.emit(code, shape, hi * largest, lo * smallest if lo and smallest else None)
        if kind == 11 and _bounded(hi + 1):
            return self.emit(f"1 - {name}", shape, hi + 1)
        if kind == 12 and _bounded(hi * hi + 1):
            return self.emit(f"torch.sqrt({name} * {name} + 1)", shape, math.sqrt(hi * hi + 1), 1.0)
        if kind == 13 and _bounded(hi * hi + 1):
            return self.emit(f"torch.rsqrt({name} * {name} + 1)", shape, 1.0, 1 / math.sqrt(hi * hi + 1))
        if kind == 14:
            return self.emit(f"{name}.clamp(min=-1.0, max=0.5)", shape, min(hi, 1.0))
        if kind == 15:
            return self.emit(f"torch.where({name} > 0, {name}, 0.1 * {name})", shape, hi)
        if kind == 16 and hi <= 8:
            return self.emit(f"F.softplus({name})", shape, hi + 1, math.log1p(math.exp(-hi)))
        if kind == 17 and _bounded(hi**2):
            return self.emit(f"{name}.square()", shape, hi**2)
        return None

    def reduce(self, a: Value, kind: int) -> Value | None:
        axes = [k for k, d in enumerate(a.shape) if d != "1"]
        if not axes:
            return None
        if kind == 5:  # a spread over one axis: a variance, biased or not (at most twice the square
            # of the bound), its root (std), or a 2-norm (whose gradient torch takes as 0 where it is 0)
            axis = self.draw(st.sampled_from(axes))
            keepdim, unbiased = self.draw(st.booleans()), self.draw(st.booleans())
            statistic = self.draw(st.sampled_from(["var", "std", "norm"]))
            if not _bounded(2 * a.hi**2):
                return None
            shape = tuple("1" if k == axis else d for k, d in enumerate(a.shape)) if keepdim else \
                tuple(d for k, d in enumerate(a.shape) if k != axis)
            if statistic == "norm":
                return self.emit(f"{a.name}.norm(dim={axis}{', keepdim=True' if keepdim else ''})", shape,
                                 math.sqrt(SIZE_BOUND) * a.hi)
            options = ("" if unbiased else ", unbiased=False") + (", keepdim=True" if keepdim else "")
            bound = 2 * a.hi**2 if statistic == "var" else math.sqrt(2) * a.hi
            return self.emit(f"{a.name}.{statistic}({axis}{options})", shape, bound)
        op = "sum" if kind in (0, 2) else "mean"
        hi = a.hi * (SIZE_BOUND if op == "sum" else 1)
        if not _bounded(hi):
            return None
        if kind == 4:  # over both axes of a matrix at once
            if len(a.shape) != 2 or "1" in a.shape or not _bounded(a.hi * SIZE_BOUND**2):
                return None
            keepdim = self.draw(st.booleans())
            shape = ("1", "1") if keepdim else ()
            return self.emit(f"{a.name}.sum(dim=(0, 1){', keepdim=True' if keepdim else ''})", shape,
                             a.hi * SIZE_BOUND**2, a.lo)
        if kind >= 2:  # over everything: a scalar
            return self.emit(f"{a.name}.{op}()", (), hi, a.lo)
        axis = self.draw(st.sampled_from(axes))
        keepdim = self.draw(st.booleans())
        shape = tuple("1" if k == axis else d for k, d in enumerate(a.shape)) if keepdim else \
            tuple(d for k, d in enumerate(a.shape) if k != axis)
        keep = ", keepdim=True" if keepdim else ""
        return self.emit(f"{a.name}.{op}({axis}{keep})", shape, hi, a.lo)

    def binary(self, a: Value, kind: int) -> Value | None:
        if kind >= 4:  # the larger or smaller of two values
            b = self.pick_value(lambda v: broadcast(a.shape, v.shape) is not None)
            if b is None:
                return None
            function = "torch.maximum" if kind == 4 else "torch.minimum"
            return self.emit(f"{function}({a.name}, {b.name})", broadcast(a.shape, b.shape), max(a.hi, b.hi))
        op = ["+", "*", "-", "/"][kind]
        b = self.pick_value(lambda v: broadcast(a.shape, v.shape) is not None and (op != "/" or v.positive))
        if b is None:
            return None
        shape = broadcast(a.shape, b.shape)
        if op == "+":
            hi, lo = a.hi + b.hi, (a.lo + b.lo if a.lo and b.lo else None)
        elif op == "-":
            hi, lo = a.hi + b.hi, None
        elif op == "*":
            hi, lo = a.hi * b.hi, (a.lo * b.lo if a.lo and b.lo else None)
        else:
            hi, lo = a.hi / b.lo, (a.lo / b.hi if a.lo else None)
        if not _bounded(hi):
            return None
        return self.emit(f"{a.name} {op} {b.name}", shape, hi, lo)

    def softmax(self, a: Value, kind: int) -> Value | None:
        """The numerically stable (log-)softmax over an axis (the last one first; along an axis of
        1 it is a constant): max, shift, exp, normalize."""
        if len(a.shape) != 2 or a.hi > 6:
            return None
        dim = self.draw(st.sampled_from([1, 0]))
        kept = (a.shape[0], "1") if dim == 1 else ("1", a.shape[1])
        if kind == 2:
            return self.emit(f"F.softmax({a.name}, dim={dim})", a.shape, 1.0, math.exp(-2 * a.hi) / SIZE_BOUND)
        if kind == 3:
            return self.emit(f"F.log_softmax({a.name}, dim={dim - 2})", a.shape, 2 * a.hi + math.log(SIZE_BOUND))
        if kind == 4:
            return self.emit(f"torch.logsumexp({a.name}, dim={dim}, keepdim=True)", kept, a.hi + math.log(SIZE_BOUND))
        m = self.emit(f"{a.name}.max({dim}, keepdim=True).values", kept, a.hi)
        z = self.emit(f"{a.name} - {m.name}", a.shape, 2 * a.hi)
        e = self.emit(f"{z.name}.exp()", a.shape, 1.0, math.exp(-2 * a.hi))
        s = self.emit(f"{e.name}.sum({dim}, keepdim=True)", m.shape, SIZE_BOUND, 1.0)
        if kind == 0:
            return self.emit(f"{e.name} / {s.name}", a.shape, 1.0, math.exp(-2 * a.hi) / SIZE_BOUND)
        return self.emit(f"{z.name} - {s.name}.log()", a.shape, 2 * a.hi + math.log(SIZE_BOUND))

    def pick(self, a: Value, kind: int) -> Value | None:
        if not self.labels or a.shape != ("n", "k"):
            return None
        return self.emit(f"{a.name}[range(n), y]", ("n",), a.hi, a.lo)

    def maximum(self, a: Value, kind: int) -> Value | None:
        """A free ``max(dim).values`` (its gradient is a one-hot of the argmax): step specs only."""
        axes = [k for k, d in enumerate(a.shape) if d != "1"]
        if self.fused or not axes:
            return None
        axis = self.draw(st.sampled_from(axes))
        keepdim = self.draw(st.booleans())
        shape = tuple("1" if k == axis else d for k, d in enumerate(a.shape)) if keepdim else \
            tuple(d for k, d in enumerate(a.shape) if k != axis)
        keep = ", keepdim=True" if keepdim else ""
        return self.emit(f"{a.name}.max({axis}{keep}).values", shape, a.hi, a.lo)

    def matmul(self, a: Value, kind: int) -> Value | None:
        """``a @ b`` with rank-2 operands whose inner dimensions agree (fused specs: square matrices,
        or a transposed operand), or a transposed value."""
        if len(a.shape) != 2:
            return None
        if kind == 1:  # a transposed value
            return self.emit(f"{a.name}.T", (a.shape[1], a.shape[0]), a.hi, a.lo)
        if kind == 2 and "1" not in a.shape and _bounded(a.hi**2 * SIZE_BOUND):  # the Gram matrix of a's columns
            return self.emit(f"{a.name}.T @ {a.name}", (a.shape[1], a.shape[1]), a.hi**2 * SIZE_BOUND)
        b = self.pick_value(lambda v: len(v.shape) == 2 and v.shape[0] == a.shape[1]
                            and (a.shape[1] != "1" or v.shape[1] != "1"))
        if b is None:
            return None
        hi = a.hi * b.hi * SIZE_BOUND
        if not _bounded(hi):
            return None
        return self.emit(f"{a.name} @ {b.name}", (a.shape[0], b.shape[1]), hi)

    def use_every_input(self) -> None:
        """Make the output read every input: add each one it misses (reduced, if it does not broadcast).
        Step specs only (half of them); the other half leaves some inputs unread on purpose."""
        inputs = [v for v in self.values if v.reads == frozenset([v.name])]
        for v in inputs:
            last = self.values[-1]
            if v.name in last.reads:
                continue
            term = v.name if broadcast(last.shape, v.shape) == last.shape else f"torch.tanh({v.name}).mean()"
            self.emit(f"{last.name} + {term}", last.shape, last.hi + (INPUT_BOUND if term == v.name else 1), None)

    OPERATIONS = ["unary", "binary", "reduce", "softmax", "pick", "maximum", "matmul"]
    KINDS = {"unary": 18, "binary": 6, "reduce": 6, "softmax": 5, "pick": 1, "maximum": 1, "matmul": 3}

    def line(self) -> None:
        """One more line (or a few, for a softmax): an operation on a value already computed."""
        a = self.pick_value()
        for _ in range(8):
            op = self.draw(st.sampled_from(self.OPERATIONS))
            kind = self.draw(st.integers(0, self.KINDS[op] - 1))
            if getattr(self, op)(a, kind) is not None:
                return
        self.unary(a, 0)  # tanh always applies


@st.composite
def layer_specs(draw, fused: bool, max_lines: int = 4) -> FuzzSpec:
    """A random layer spec: inputs, ``max_lines`` or fewer operations, a scalar or tensor output."""
    labels = draw(st.booleans())
    optional = OPTIONAL_INPUTS | ({} if fused else STEP_INPUTS) | {k: v[:2] for k, v in DOMAIN_INPUTS.items()}
    chosen = [k for k in optional if draw(st.booleans())]
    builder = Builder(draw, fused, labels)
    decls = {"x": ('Tensor("n", "k")', ("n", "k"))} | {k: optional[k] for k in chosen}
    # x last: operands are drawn most recent first, so the simplest choice is x, then each new line
    for name in [*chosen, "x"]:
        hi, lo = DOMAIN_INPUTS[name][2:] if name in DOMAIN_INPUTS else (INPUT_BOUND, None)
        builder.values.append(Value(name, decls[name][1], hi, lo, reads=frozenset([name])))
    for _ in range(draw(st.integers(1, max_lines))):
        builder.line()
    if not fused and draw(st.booleans()):
        builder.use_every_input()
    last = builder.values[-1]
    if draw(st.booleans()) and last.shape != ():
        builder.reduce(last, draw(st.sampled_from([2, 3])))
    out = builder.values[-1]
    if not out.reads & {"x", "b", "c", "w", "W", "V", "A"}:  # something to differentiate
        out = builder.emit(f"{out.name} + torch.tanh(x).mean()", out.shape, out.hi + 1)
    # the output named ``out`` as the spec's last line, or returned as it is (the generated code names it)
    returned = out.name if draw(st.booleans()) else "out"
    if returned == "out" and out.name != "out":
        builder.lines.append(f"    out = {out.name}")
    params = list(decls) + (["y"] if labels else []) + ["eps", "scale"]
    declared = [f"{k}={decl}" for k, (decl, _) in decls.items()]
    declared += ['y=Labels("n", classes="k")'] if labels else []
    declared += ["eps=Constant(1e-3)", "scale=Constant(0.75)"]
    body = "\n".join(builder.lines)
    digest = hashlib.sha256(f"{fused}{params}{body}".encode()).hexdigest()[:10]
    name = f"fuzz_{'fused' if fused else 'steps'}_{digest}"
    signature = ", ".join(p if p not in ("eps", "scale") else f"{p}={1e-3 if p == 'eps' else 0.75}" for p in params)
    source = "\n".join([
        "import torch",
        "import torch.nn.functional as F",
        "from derive import Constant, Labels, Tensor, layer",
        "",
        "",
        f"@layer({', '.join(declared)})",
        f"def {name}({signature}):",
        "    n, k = x.shape",
        body,
        f"    return {returned}",
        "",
        *([] if fused else ["", f"{name}.fused = False", ""]),
    ])
    n = draw(st.integers(2, SIZE_BOUND))
    k = draw(st.integers(2, SIZE_BOUND))
    sizes = {"n": n, "k": k} | ({"m": draw(st.integers(2, SIZE_BOUND))} if {"W", "V"} & set(chosen) else {})
    return FuzzSpec(name, source, fused, sizes)
