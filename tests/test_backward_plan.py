"""The in-place printing of full-size gradients (``backward_plan.chain_form``): the same values as
the formula printed as written, never fewer decimals, never an input written to, no more passes
over full-size memory; and a second derivative of a generated module, which does not run these
lines, still right."""
import math

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from derive.backward_plan import chain_form
from derive.functions import NonNeg, Sigmoid, Step
from derive.kernel import build
from derive.layers import by_name
from derive.printer import Frame, KernelPrinter
from derive.same_kernels import _Computed
from kernels import user_layer

N, D = sp.Symbol("n", integer=True, positive=True), sp.Symbol("d", integer=True, positive=True)
I, J = sp.Idx("i_n", N), sp.Idx("i_d", D)
SHAPES = {"a": (N, D), "b": (N, D), "c": (N, D), "g": (D,), "r": (N, 1), "s": ()}
a, b, c = (sp.IndexedBase(k, real=True)[I, J] for k in "abc")
g, r = sp.IndexedBase("g", real=True)[J], sp.IndexedBase("r", real=True)[I, 0]
s = sp.Symbol("s", real=True)  # a 0-d tensor (an upstream gradient of a loss)

FORMULAS = {
    "tanh'": (1 - a**2) * b,
    "sigmoid'": (1 - a) * a * b,
    "relu'": Step(a) * b,
    "nested tanh'": (a - 1) * (a + 1) * (c - 1) * (c + 1) * b,
    "scaled tanh'": (1 - a**2) * g * b * r,
    "mean square": 2 * s * a / (N * D),
    "quotient": s * b * a / (c + 2),
    "sum of products": (a + r) * (b - g) * c,
    "sigmoid of a sum": s * (1 - Sigmoid(a + b) - c) / N,
    "polynomial": -sp.Rational(1, 2) * (a + 1) * (sp.Float(0.0356) * a**3 * b + sp.Float(0.7978) * a * b - 1) * c,
    "exp and a column": sp.exp(a) * b + c * r,
    "difference then product": (b - (b * a) * g) * a,
    "nested sums": (1 - (a - 1) * g * c) * b * a,
    "outer product term": a * r + 2 * r * g,
    "tensor minus a tanh' with its sign": c - b * (a**2 - 1),
    "exp of a difference": sp.exp(a - r) * b,
    "log of a square plus one": sp.log(a**2 + 1) * b * g,
    "tanh of a product, then a sum": sp.tanh(a * b) * c + r,
    "clamp of a clamp": NonNeg(sp.Rational(1, 2) - a) * NonNeg(a + 1) * NonNeg(sp.Rational(1, 2) - c) * NonNeg(c + 1) * b,
    "a mask times a quotient": NonNeg(a - c) * b / (c**2 + 1),
    "an eighth power": a**8 * b,
    "a fifth power of a sum": (a + c)**5 * b,
    "a sixth power of a reciprocal": b * (1 / (c**2 + 1))**6,
}


def printer():
    return KernelPrinter(Frame([I, J]), dict(SHAPES), {N: "n", D: "d"}, "b")


def tensors(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    n, d = 6, 5
    full = {k: torch.randn(n, d, generator=gen, dtype=dtype) for k in "abc"}
    return dict(full, g=torch.randn(d, generator=gen, dtype=dtype), r=torch.randn(n, 1, generator=gen, dtype=dtype),
                s=torch.randn((), generator=gen, dtype=dtype)), n, d


def run(code_lines: list[str], values: dict, n: int, d: int):
    scope = dict(values, torch=torch, F=F, math=math, n=n, d=d)
    exec("\n".join(code_lines), scope)
    return scope["dx"]


class FullSizeOps(TorchDispatchMode):
    """Counts the operations that write a full-size tensor: passes over memory (with ``fresh``,
    only those that allocate it: not the in-place ones). Views write nothing."""

    def __init__(self, numel, fresh=False):
        super().__init__()
        self.numel, self.fresh, self.count = numel, fresh, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and not name.startswith(
                ("aten::view", "aten::expand", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::permute",
                 "aten::transpose")) and name != "aten::t" \
                and not (self.fresh and name.endswith("_")):
            self.count += 1
        return out


class MatrixProducts(TorchDispatchMode):
    """Counts the matrix products computed."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
        return func(*args, **(kwargs or {}))


class Calls(_Computed):
    """The operations computed, by name (``same_kernels._Computed``), as ``count``."""
    count = property(lambda self: self.counts)


def backward_counts(functions, inputs: tuple, g, counter) -> tuple[list, list]:
    """For each of ``functions`` (a kernel, autograd through its spec), what ``counter()`` counts
    while the gradients of its output at ``g`` with respect to ``inputs`` are computed, and those
    gradients."""
    counts, grads = [], []
    for fn in functions:
        out = fn(*inputs)
        with counter() as mode:
            grads.append(torch.autograd.grad(out, inputs, g))
        counts.append(mode.count)
    return counts, grads


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_the_in_place_form_computes_the_formula(name):
    expr = FORMULAS[name]
    lines = chain_form("dx", expr, printer(), dict(SHAPES), {"a", "b", "c", "g", "r", "s"})
    assert lines is not None, name
    plain = [f"dx = {printer().doprint(expr)}"]
    values, n, d = tensors()
    before = {k: v.clone() for k, v in values.items()}
    ours, theirs = run(lines, values, n, d), run(plain, values, n, d)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    for k in values:  # nothing it reads is written to
        assert torch.equal(values[k], before[k]), (name, k)
    counted = []
    for code in (lines, plain):
        with FullSizeOps(n * d) as mode:
            run(code, values, n, d)
        counted.append(mode.count)
    assert counted[0] <= counted[1], (name, counted, lines)


def test_a_difference_whose_kernel_carries_the_sign_is_added_without_a_negation():
    """``c - b*(a**2 - 1)`` is ``c + tanh_backward(b, a)``: the kernel's result added to, two calls,
    where ``c - (-tanh_backward(b, a))`` negates a full-size buffer first."""
    lines = chain_form("dx", FORMULAS["tensor minus a tanh' with its sign"], printer(), dict(SHAPES), {"a", "b", "c"})
    code = [line for line in lines if not line.startswith("#")]
    assert code == ["dx = torch.ops.aten.tanh_backward(b, a).add_(c)"], lines


@pytest.mark.parametrize("expr", [s * (1 - a**2) / (N * D), -2 * r * (a**2 - 1)],
                         ids=["a mean's 0-d gradient", "a column's, negated"])
def test_numbers_scale_the_small_gradient_a_kernel_is_given(expr):
    """``tanh(x).mean()``: ``dx = tanh_backward(s/(n*d), a)``, one full-size pass, as autograd's;
    the number was applied to the kernel's full-size result (``.mul_(1/(n*d))``), a pass of its own."""
    lines = chain_form("dx", expr, printer(), dict(SHAPES), {"a", "r", "s"})
    values, n, d = tensors()
    with FullSizeOps(n * d) as mode:
        ours = run(lines, values, n, d)
    assert mode.count == 1, lines
    torch.testing.assert_close(ours, run([f"dx = {printer().doprint(expr)}"], values, n, d), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("expr", [sp.exp(a) * b * g, sp.tanh(a) * r * 3, Sigmoid(a) * (b + c)],
                         ids=["exp", "tanh", "sigmoid"])
def test_torch_s_call_of_a_function_is_a_buffer_to_update(expr):
    """``torch.exp(a)`` is a fresh tensor (an elementwise operation of torch's): the product
    updates it in place, one full-size buffer in all (two where ``b + c`` needs its own)."""
    lines = chain_form("dx", expr, printer(), dict(SHAPES), {"a", "b", "c", "g", "r", "s"})
    values, n, d = tensors()
    with FullSizeOps(n * d, fresh=True) as mode:
        ours = run(lines, values, n, d)
    sums = [f for f in sp.Mul.make_args(expr) if isinstance(f, sp.Add)]
    assert mode.count == 1 + len(sums), lines
    torch.testing.assert_close(ours, run([f"dx = {printer().doprint(expr)}"], values, n, d), rtol=1e-13, atol=1e-13)


def test_masks_multiplied_are_one_mask():
    """The masks of a clamp of a clamp compare their sides as printed, ``(0.5 >= a)``, joined by
    ``&`` and cast once, then scale the gradient in place: the chain computed each side's
    difference into a buffer, compared it, cast it and multiplied (13 full-size passes)."""
    lines = chain_form("dx", FORMULAS["clamp of a clamp"], printer(), dict(SHAPES), {"a", "b", "c"})
    code = [line for line in lines if not line.startswith("#")]
    assert len(code) == 1 and code[0].count(".to(") == 1 and code[0].endswith(".mul_(b)"), lines


LOGSUMEXP = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def row_logsumexp(x):
    return torch.logsumexp(x, dim=1, keepdim=True)
"""


def test_a_function_of_a_computed_buffer_is_applied_in_place(tmp_path):
    """logsumexp's ``dx = exp(x - out)*dout``: the difference's buffer is exponentiated and scaled
    in place, one full-size buffer where ``torch.exp(t).mul(dout)`` (and autograd) make three. A
    second derivative cannot differentiate an update of ``exp``'s result, and does not run these
    lines: it is still right (gradgradcheck)."""
    _, kernel = user_layer(tmp_path, LOGSUMEXP, "row_logsumexp")
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    out = kernel(x)
    g = torch.randn_like(out)
    with FullSizeOps(x.numel(), fresh=True) as mode:
        (dx,) = torch.autograd.grad(out, x, g)
    assert mode.count == 1
    torch.testing.assert_close(dx, torch.autograd.grad(torch.logsumexp(x, 1, keepdim=True), x, g)[0])
    assert torch.autograd.gradgradcheck(kernel, (x,))


CUBED_COLUMN_TOTALS = {
    "a line each": """
    v1 = x ** 3
    v2 = v1.sum(0)
    v3 = torch.tanh(v2)
    v4 = (v3 * v3 + 1).log()
    v5 = torch.tanh(v4)
    return v5.mean()
""",
    "nested calls": """
    v3 = torch.tanh((x ** 3).sum(0))
    return torch.tanh((v3 * v3 + 1).log()).mean()
""",
}


@pytest.mark.parametrize("written", sorted(CUBED_COLUMN_TOTALS))
def test_a_kernel_of_a_small_gradient_meets_the_small_factors_before_the_full_size_one(written, tmp_path):
    """``dx = 6*tanh'(..)*v3/(k*v3**2 + k)*x**2``, every factor per column but ``x**2``: the number
    scales the 0-d upstream gradient the tanh kernels are given and the per-column factors follow
    them, then ``x**2`` (a power and one product over the full size, as autograd's). Printed with
    the number outside and ``v3`` after ``x**2``, two more full-size passes (1.26x autograd's time).
    Written as nested calls, the tanh's derivative reads its saved result ``v3`` too: it took
    ``tanh((x**3).sum(0))`` again, a power and a sum over the full size."""
    source = ("import torch\n\nfrom derive import Tensor, layer\n\n\n@layer(x=Tensor(\"n\", \"k\"))\n"
              "def tanh_of_cubed_column_totals(x):" + CUBED_COLUMN_TOTALS[written])
    layer, kernel = user_layer(tmp_path, source, "tanh_of_cubed_column_totals")
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    counts = []
    for fn in (kernel, layer.fn):
        out = fn(x)
        with FullSizeOps(x.numel()) as mode:
            (dx,) = torch.autograd.grad(out, x)
        counts.append(mode.count)
    assert counts[0] <= 2 <= counts[1], counts
    torch.testing.assert_close(dx, torch.autograd.grad(kernel(x), x)[0])


OUTER_PRODUCT = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"))
def outer_product_times_x(x, b, c):
    v1 = b @ c
    return v1 * x
"""


def test_a_matrix_product_over_an_axis_of_one_has_its_adjoint_computed_once(tmp_path):
    """``b @ c`` of an (n, 1) and a (1, k) is an outer product, no sum: still a matrix product, its
    adjoint ``dv1 = dout*x`` is one tensor that ``db = dv1 @ c.T`` and ``dc = b.T @ dv1`` read, and
    ``dx = dout*v1`` reads the product the forward saved, as autograd's backward does. Inlined as
    ``b*c``, each gradient multiplied ``dout*x`` again and summed a broadcast product, and ``dx``
    multiplied ``b*c`` again: eight full-size passes for autograd's two (2.6x its time)."""
    layer, kernel = user_layer(tmp_path, OUTER_PRODUCT, "outer_product_times_x")
    gen = torch.Generator().manual_seed(0)
    x, b, c = (torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
               for shape in ((30, 7), (30, 1), (1, 7)))
    g = torch.randn(30, 7, dtype=torch.float64, generator=gen)
    counts, grads = backward_counts((kernel, layer.fn), (x, b, c), g, lambda: FullSizeOps(x.numel()))
    assert counts[0] <= counts[1] == 2, counts
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.autograd.gradcheck(kernel, (x, b, c))


LOG_OF_SQUARED_LOG_PROBABILITIES = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def log_of_squared_log_probabilities(x):
    m = x.max(1, keepdim=True).values
    z = x - m
    s = z.exp().sum(1, keepdim=True)
    logp = z - s.log()
    h = torch.tanh((logp * logp + 1).log())
    return (h * h + 1).log()
"""


def test_a_product_of_denominators_is_not_multiplied_out(tmp_path):
    """The derivative of ``log(h*h + 1)`` with ``h = tanh(log(logp*logp + 1))`` divides by
    ``(h**2 + 1)*(logp**2 + 1)``. Multiplied out (``h**2*logp**2 + h**2 + logp**2 + 1``, SymPy's
    expand) inside the row sum as well as in the gradient, the terms over the two forms were
    not alike: 20 full-size passes for autograd's 16 (in a larger layer, the saved ``logp**2 + 1``
    matched part of the sum and the shift's zero adjoint went unseen: 2.4x autograd's time)."""
    layer, kernel = user_layer(tmp_path, LOG_OF_SQUARED_LOG_PROBABILITIES, "log_of_squared_log_probabilities")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(30, 7, dtype=torch.float64, generator=gen)
    counts, grads = backward_counts((kernel, layer.fn), (x,), g, lambda: FullSizeOps(x.numel()))
    assert counts[0] < counts[1], counts
    torch.testing.assert_close(grads[0], grads[1])


DOUBLED_LOG_SOFTMAX = """import torch
import torch.nn.functional as F

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def doubled_log_softmax(x):
    logp = F.log_softmax(x, dim=-1)
    return logp + logp
"""


def test_a_log_softmax_backward_times_a_number_is_torch_s_kernel(tmp_path):
    """``logp + logp``: the gradient ``2*g - 2*exp(logp)*sum(g)`` carries the 2 in both terms, and
    did not match the log-softmax backward ``a - exp(l)*sum(a)`` the printer writes as torch's
    one-pass kernel: the exponential, two products and the difference were five full-size passes
    (1.4x autograd's time at 1024 x 512). The number is taken out first."""
    layer, kernel = user_layer(tmp_path, DOUBLED_LOG_SOFTMAX, "doubled_log_softmax")
    source = (tmp_path / "gen" / "doubled_log_softmax.py").read_text()
    assert "torch._log_softmax_backward_data(" in source[source.index("def _backward("):]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(30, 7, dtype=torch.float64, generator=gen)
    counts, grads = backward_counts((kernel, layer.fn), (x,), g, lambda: FullSizeOps(x.numel()))
    assert counts[0] <= counts[1], counts
    torch.testing.assert_close(grads[0], grads[1])


def _assert_two_matrix_products_as_autograd(folder, source, name):
    """The layer ``name`` of ``source``, ``f(x) @ A`` of an ``(n, k)`` input and a ``(k, k)`` one:
    its backward computes no more matrix products than autograd's two, and the same gradients."""
    layer, kernel = user_layer(folder, source, name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(7, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(30, 7, dtype=torch.float64, generator=gen)
    counts, grads = backward_counts((kernel, layer.fn), (x, A), g, MatrixProducts)
    assert counts[0] <= counts[1] == 2, counts
    torch.testing.assert_close(grads[0], grads[1])


LOG_PROBABILITY_WEIGHTED_PRODUCT = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def log_probability_weighted_product(x, A):
    m = x.max(1, keepdim=True).values
    z = x - m
    logp = z - z.exp().sum(1, keepdim=True).log()
    return torch.tanh((z * logp) @ A)
"""


def test_a_matrix_products_operand_that_reads_a_row_statistic_has_its_adjoint_computed_once(tmp_path):
    """``(z * logp) @ A`` with ``logp`` a log-softmax written out: the operand reads the row's
    ``m`` and ``log(sum)``, whose adjoints sum the operand's adjoint along the row. With the operand
    inlined into the product, those sums became products of their own (``(logp @ A)*dt5`` summed,
    and ``dt5 @ A.T`` twice): four matrix products where autograd's backward has two. The operand
    is now a node, its adjoint ``dt4 = dt5 @ A.T`` one tensor, and ``dA`` reads the saved operand."""
    _assert_two_matrix_products_as_autograd(tmp_path, LOG_PROBABILITY_WEIGHTED_PRODUCT, "log_probability_weighted_product")


CLIPPED_LOG_PROBABILITIES_PRODUCT = """import torch
import torch.nn.functional as F

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def clipped_log_probabilities_product(x, A):
    logp = F.log_softmax(x, dim=1)
    clipped = torch.maximum(2 * logp, x)
    return torch.tanh(clipped @ A)
"""


def test_a_matrix_products_operand_that_reads_two_variables_has_its_adjoint_computed_once(tmp_path):
    """``maximum(2*logp, x) @ A`` reads ``x`` directly and through the log-softmax, so both their
    gradients take the product's adjoint. Inlined into the product, each carried ``dv @ A.T`` in its
    own formula: three matrix products where autograd's backward has two (1.3x its time at
    1024 x 512). The operand is now a node, its adjoint one tensor that both read."""
    _assert_two_matrix_products_as_autograd(tmp_path, CLIPPED_LOG_PROBABILITIES_PRODUCT, "clipped_log_probabilities_product")


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_float32_rounds_as_the_formula_does(name):
    """The operations are the printed formula's, in its order: float32 results agree with it to a
    few units in the last place (fused multiply-adds round once where the formula rounds twice)."""
    expr = FORMULAS[name]
    lines = chain_form("dx", expr, printer(), dict(SHAPES), {"a", "b", "c", "g", "r", "s"})
    values, n, d = tensors(2, torch.float32)
    ours = run(lines, values, n, d)
    theirs = run([f"dx = {printer().doprint(expr)}"], values, n, d)
    exact = run([f"dx = {printer().doprint(expr)}"], {k: v.double() for k, v in values.items()}, n, d)
    scale = float(exact.abs().max())
    assert float((ours.double() - exact).abs().max()) <= 2 * float((theirs.double() - exact).abs().max()) \
        + 8 * torch.finfo(torch.float32).eps * scale, name


@pytest.mark.parametrize("layer, kernel", [("tanh", "tanh_backward"), ("sigmoid", "sigmoid_backward"),
                                           ("relu", "threshold_backward")])
def test_an_activation_backward_is_one_pass(layer, kernel):
    """The derivative of tanh, sigmoid and relu is one call of the kernel autograd runs for it."""
    (formula,) = build(by_name(layer)).formulas
    executed = [line for line in formula.chain if not line.startswith("#")]
    assert len(executed) == 1 and f"torch.ops.aten.{kernel}(" in executed[0]


def test_a_gradient_can_be_printed_as_written():
    """``as_written`` (what ``select`` asks for when an in-place form fails the battery) prints the
    formula as it reads."""
    layer = by_name("gelu_tanh")
    assert build(layer).formulas[0].chain
    assert build(layer, as_written=frozenset({"x"})).formulas[0].chain == []


def test_softplus_reads_the_sum_the_forward_computed():
    """``1 + exp(x)`` is computed by the forward and kept by autograd for the log's derivative: the
    backward reads it (``t2``) instead of adding 1 to ``t1`` again."""
    from derive.select import chosen

    kernel = chosen(by_name("softplus")).kernel
    (formula,) = kernel.formulas
    assert "t2" in kernel.saved and "t1 + 1" not in formula.code


RATIOS = {
    "bounded ratio": s * b * (1 - a) / (a + 2),
    "bounded ratio and a divisor": s * b * (1 - a**2) / ((a**2 + 1) * (c + 3)),
    "bounded ratio of a column": s * b * (r - 1) / (r**2 + 1),
}


@pytest.mark.parametrize("name", sorted({**FORMULAS, **RATIOS}))
def test_the_printed_formula_is_the_formula(name):
    """The printed code computes the formula, whatever order it divides in (a factor its divisor
    bounds is divided first, ``b*((1 - a)/(a + 2))``: its numerator parenthesized)."""
    expr = {**FORMULAS, **RATIOS}[name]
    values, n, d = tensors()
    printed = run([f"dx = {printer().doprint(expr)}"], values, n, d)
    # the formula evaluated entry by entry by SymPy's own printer, each tensor broadcast as read
    plain = {e: sp.Symbol(str(e.base)) for e in expr.atoms(sp.Indexed)}
    names = [sp.Symbol(k) for k in "abcgrs"] + [N, D]
    arguments = [values[k] for k in "abcgrs"] + [n, d]

    def evaluate(e):
        return sp.lambdify(names, e, modules=torch)(*arguments)

    # a step is a mask of its argument's sign (NonNeg with 0 included); a sigmoid its definition
    steps = {f: sp.Symbol(f"step{k}") for k, f in enumerate(expr.xreplace(plain).atoms(Step, NonNeg))}
    masks = [torch.as_tensor(evaluate(f.args[0])) >= 0 if isinstance(f, NonNeg) else torch.as_tensor(evaluate(f.args[0])) > 0
             for f in steps]
    formula = expr.xreplace(plain).xreplace(steps).replace(Sigmoid, lambda z: 1 / (1 + sp.exp(-z)))
    want = sp.lambdify(names + list(steps.values()), formula, modules=torch)(*arguments, *[m.double() for m in masks])
    torch.testing.assert_close(printed.expand(n, d), torch.as_tensor(want).expand(n, d), rtol=1e-12, atol=1e-12)


class WholePowers(TorchDispatchMode):
    """The exponents of the tensors raised to a number (``aten::pow.Tensor_Scalar``)."""

    def __init__(self):
        super().__init__()
        self.exponents = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("aten::pow") and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            self.exponents.append(args[1])
        return func(*args, **(kwargs or {}))


CUBED_CUBES = """import torch

from derive import Tensor, layer


@layer(A=Tensor("k", "k"))
def cubed_cubes(A):
    v2 = torch.tanh(torch.tanh(A))
    return (v2 ** 3) ** 3
"""


def test_a_whole_power_above_three_is_computed_by_multiplications(tmp_path):
    """``(v**3)**3`` is ``v**9`` and its derivative ``9*v**8``: torch raises a tensor to a whole
    power through the C library's ``pow``, element by element, except squares and cubes, which it
    multiplies (``t**8`` took ten times ``t*t`` at 512 x 512, float32, and the kernel 1.2x
    autograd's time). Printed ``(v2**3)**3`` and ``((v2**2)**2)**2``, every power is a square or a
    cube, as autograd's own are here; the gradient as autograd's."""
    layer, kernel = user_layer(tmp_path, CUBED_CUBES, "cubed_cubes")
    A = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 7, dtype=torch.float64)
    with WholePowers() as mode:
        out = kernel(A)
        (dA,) = torch.autograd.grad(out, A, g)
    assert mode.exponents and set(mode.exponents) <= {2, 3}, mode.exponents
    torch.testing.assert_close(out, layer.fn(A))
    torch.testing.assert_close(dA, torch.autograd.grad(layer.fn(A), A, g)[0])


COLUMN_SHARE_SUMMED = """import torch
import torch.nn.functional as F

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def column_share(x):
    return torch.tanh(F.softmax(x, dim=1).sum(0))
"""


def test_a_softmax_under_a_column_total_is_differentiated_by_torch_s_kernel(tmp_path):
    """``tanh(softmax(x).sum(0))``: the softmax's gradient ``s*(a - sum_j a*s)`` with ``a`` the
    same in every row (the column total's). Printed as written, a product, a row sum, a sum and a
    product over the full size (1.9x the time of torch's kernel for it, 1024 x 512, float32); as
    autograd does, ``a`` spread over the rows without a copy into ``_softmax_backward_data``."""
    layer, kernel = user_layer(tmp_path, COLUMN_SHARE_SUMMED, "column_share")
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, dtype=torch.float64)
    counts, grads = backward_counts((kernel, layer.fn), (x,), g, lambda: FullSizeOps(x.numel()))
    assert counts[0] <= counts[1], counts
    torch.testing.assert_close(grads[0], grads[1])


SQUASHED_TOTAL = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def squashed_total(x):
    n, k = x.shape
    v1 = x.sum()
    v2 = torch.tanh(v1)
    v3 = torch.tanh(v2)
    return torch.tanh(v3) / k
"""


def test_a_function_of_a_number_the_forward_computed_is_read_not_computed_again(tmp_path):
    """``tanh(tanh(tanh(x.sum())))/k``: every value after the sum is 0-d, and such a layer's
    backward costs its calls alone (microseconds each). The gradient took the three tanhs again
    and wrote their derivatives ``(v - 1)*(v + 1)``, 17 calls where autograd's backward makes 4
    (1.4x its time at 1024 x 512); now it reads the tanhs the forward saved, through autograd's
    kernel, ``tanh_backward``, as autograd's backward does. The forward's 0-d values are 0-d as
    printed: no ``.reshape(())`` of each (a call too)."""
    from derive.codegen import render_function

    layer, kernel = user_layer(tmp_path, SQUASHED_TOTAL, "squashed_total")
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    counts, grads = backward_counts((kernel, layer.fn), (x,), torch.tensor(1.0, dtype=torch.float64), Calls)
    assert "aten::tanh" not in counts[0] and sum(counts[0].values()) <= sum(counts[1].values()), counts
    torch.testing.assert_close(grads[0], grads[1])
    source = render_function(build(layer))
    forward = source[source.index("def _forward("):source.index("def _forward_with_graph(")]
    assert "reshape(())" not in forward, forward


ROOT_OF_A_SCALED_SQUARE = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), c=Tensor("1", "k"))
def root_of_a_scaled_square(x, c):
    v1 = torch.logsumexp(c, dim=1, keepdim=True)
    v2 = v1 * x
    return torch.sqrt(v2 * v2 + 1).sum()
"""


def test_a_gradient_divided_by_a_root_reads_the_root_the_forward_computed(tmp_path):
    """``sqrt(v*v + 1)``'s derivative divides by the root: ``q**(-1/2)`` where the forward saved
    ``sqrt(q)``. Only positive powers of a saved root were read, so both gradients computed the
    square and the root again (a square root and three more passes over the full size each, 1.5x
    autograd's time at 1024 x 512); divided by the saved root, as autograd's ``SqrtBackward``
    divides by its result, the backward takes no root."""

    layer, kernel = user_layer(tmp_path, ROOT_OF_A_SCALED_SQUARE, "root_of_a_scaled_square")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    c = torch.randn(1, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    counts, grads = backward_counts((kernel, layer.fn), (x, c), torch.tensor(1.0, dtype=torch.float64), Calls)
    assert "aten::sqrt" not in counts[0], counts[0]
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("call, kernels", [
    ("F.gelu(v)", ("aten::gelu", "aten::gelu_backward")),
    ('F.gelu(v, approximate="tanh")', ("aten::gelu", "aten::gelu_backward")),
    ("F.silu(v)", ("aten::silu", "aten::silu_backward")),
    ("F.elu(v, 0.5)", ("aten::elu", "aten::elu_backward")),
    ("F.leaky_relu(v, 0.2)", ("aten::leaky_relu", "aten::leaky_relu_backward")),
], ids=["gelu", "gelu tanh", "silu", "elu", "leaky relu"])
def test_torch_s_activations_are_its_own_kernels_each_way(call, kernels, tmp_path):
    """``F.gelu`` was written out as ``v/2*(1 + erf(v/sqrt(2)))``: four passes and four saved
    tensors in the forward, ``erf`` and an ``exp`` again in the backward (5x autograd's time for
    ``F.gelu`` alone, 1.5x for an MLP block around it, at 1024 x 256); ``F.silu`` as
    ``v*sigmoid(v)`` (1.3x), ``F.leaky_relu`` and ``F.elu`` with ``torch.where`` (15x and 7x, and
    ``F.elu``'s discarded ``exp`` overflowed into the gradient: ``0*inf``). Each is now one atom,
    computed by torch's own kernel forward and backward, as autograd through the spec computes it:
    the same calls."""
    source = ("import torch\nimport torch.nn.functional as F\n\nfrom derive import Tensor, layer\n\n\n"
              '@layer(x=Tensor("n", "d"), w1=Tensor("d", "h"), w2=Tensor("h", "d"))\n'
              f"def mlp_block(x, w1, w2):\n    v = x @ w1\n    return x + {call} @ w2\n")
    layer, kernel = user_layer(tmp_path, source, "mlp_block")
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in [(7, 5), (5, 6), (6, 5)]]
    g = torch.randn(7, 5, dtype=torch.float64)
    counts, grads = [], []
    for fn in (kernel, layer.fn):
        with Calls() as mode:
            grads.append(torch.autograd.grad(fn(*inputs), inputs, g))
        counts.append(mode.count)
    forward, backward = kernels
    assert counts[0][forward] == counts[0][backward] == 1, counts[0]
    assert not {"aten::erf", "aten::exp", "aten::tanh", "aten::sigmoid", "aten::where.self"} & set(counts[0]), counts[0]
    assert sum(counts[0].values()) <= sum(counts[1].values()), counts
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


WEIGHTED_LOGSUMEXP = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def weighted_logsumexp(x, w):
    return torch.logsumexp(x * w, dim=1)
"""


def test_a_function_two_gradients_read_in_different_sums_is_computed_once(tmp_path):
    """``dx = exp(t1 - out)*dout*w`` and ``dw = sum_n exp(t1 - out)*dout*x``: the exponential was
    computed in each (two ``exp`` and two subtractions over the full size, 1.3x autograd's time at
    1024 x 256), since a product was shared only where two full-size factors repeat. A function
    alone is a factor to share too: one ``exp``, as autograd's backward of ``logsumexp``."""
    layer, kernel = user_layer(tmp_path, WEIGHTED_LOGSUMEXP, "weighted_logsumexp")
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    counts, grads = backward_counts((kernel, layer.fn), (x, w), torch.randn(6, dtype=torch.float64), Calls)
    assert counts[0]["aten::exp"] + counts[0]["aten::exp_"] == 1, counts[0]
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)
