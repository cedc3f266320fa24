"""Exact printed forms of what the engine learned for the new built-ins: a contraction prints as
a matrix product, a table read at labels as ``w[y]``, a label mask as ``y == c``, nested sums as one sum."""
import re

import pytest
import sympy as sp
import torch

from derive.codegen import render_function
from derive.kernel import build
from derive.layers import batchnorm3d, cross_entropy_ignore, cross_entropy_weighted, linear, tanh


def code(layer, name):
    return next(f.code for f in build(layer).formulas if f.input == name)


def backward_code(kernel, name):
    """The code of ``name``'s gradient with the temporaries it reads (a materialized adjoint,
    ``dv3 = v3 @ (dv4 + dv4.T)``, holds the matrix product the gradient reads)."""
    formula = next(f for f in kernel.formulas if f.input == name)
    return " ".join([s.code for s in kernel.shared] + [formula.code])


def test_linear_gradients_are_contractions_not_broadcast_products():
    assert code(linear, "W") == "x.T @ dout"
    assert code(linear, "x") == "dout @ W.T"


def test_a_weight_read_at_the_labels_prints_as_w_of_y():
    assert "w[y].view(n, 1)" in code(cross_entropy_weighted, "logits")


def test_an_ignore_mask_prints_as_a_label_comparison():
    kernel = build(cross_entropy_ignore)
    printed = " ".join([f.code for f in kernel.formulas] + [s.code for s in kernel.shared])
    assert "(y.view(n, 1) == ignore_index).to(dloss.dtype)" in printed


def test_sums_over_two_axes_are_one_reduction():
    shared = {s.name: s.code for s in build(batchnorm3d).shared}
    assert shared["sum_dout"] == "dout.sum((0, 2), keepdim=True)"


def test_a_softplus_inside_a_tanh_is_two_kernels(tmp_path):
    """``tanh(softplus(c).sum(1))``: the softplus's ``sigmoid(c)`` beside ``tanh_backward`` was printed
    ``torch.sigmoid(c)``, 0 from ``c`` = -89 in float32 where the gradient is subnormal; autograd's
    ``softplus_backward`` (``exp(c)/(exp(c) + 1)``) keeps it. Each link is its own kernel. Written
    as one expression, the output (a tanh of a sum) is read as the saved tanh too: it recomputed
    ``tanh`` of the row total and printed ``1 - tanh(..)**2``."""
    from derive.layers import from_file

    spec = tmp_path / "softplus_tanh.py"
    spec.write_text('''import torch
import torch.nn.functional as F
from derive import Tensor, layer


@layer(c=Tensor("n", "k"))
def tanh_of_softplus_total(c):
    total = F.softplus(c).sum(1)
    out = torch.tanh(total)
    return out


@layer(c=Tensor("n", "k"))
def tanh_of_softplus_total_inline(c):
    return torch.tanh(F.softplus(c).sum(1))
''')
    for found in from_file(str(spec)):
        printed = code(found, "c")
        assert printed.startswith("torch.ops.aten.softplus_backward(torch.ops.aten.tanh_backward(") and \
            "torch.sigmoid" not in printed and "torch.tanh" not in printed, printed


def test_tanh_gradient_reads_the_saved_output():
    # (1 - out**2)*dout, as autograd computes it: 1 - out*out in one rounding
    assert code(tanh, "x") == "torch.ops.aten.tanh_backward(dout, out)"


def test_a_contraction_of_computed_factors_is_a_matrix_product(tmp_path):
    """``(1 - A) @ (1 - A)`` and ``(x.T @ x).sum(1)`` as users write them: the factors computed from
    tensors are operands of the product (in the forward, computed once as the spec names them), and a gradient that is a sum of two contractions is the
    sum of two products, never a k x k x k broadcast product (200x slower than autograd at k = 512)."""
    from derive.layers import from_file

    spec = tmp_path / "products.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(A=Tensor("k", "k"))
def square_of_complement(A):
    v = 1 - A
    return v @ v


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"))
def gram_row_sums(x, b):
    return torch.maximum(b, (x.T @ x).sum(1)).T
''')
    first, second = from_file(str(spec))
    forward = build(first).forward
    # the operand computed once, as the spec's ``v``, and the product of it
    assert [line for line, _ in forward] == ["v = 1 - A", "out = v @ v"], forward
    gradient = code(first, "A")
    assert gradient.count(" @ ") == 2 and "view(1, k, 1, k)" not in gradient, gradient
    assert code(second, "x").startswith("x @ "), code(second, "x")


def test_a_matrix_times_a_vector_in_the_spec_is_a_product_in_the_forward(tmp_path):
    """``c @ A`` with ``c`` of shape (1, k), and a dot product ``v @ c.T``: one operand holds every
    index, which elsewhere prints as the elementwise product summed (layernorm's ``(dout*gamma)``
    summed over a row, as its spec writes it). Where the spec wrote ``@``, the forward computes
    ``@``: summed as a broadcast product, ``tanh(c @ A)`` rounded each product and was 2x the
    battery's bar at inputs of 10."""
    from derive.layers import from_file

    spec = tmp_path / "vectors.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(c=Tensor("1", "k"), A=Tensor("k", "k"))
def tanh_of_vector_product(c, A):
    return torch.tanh(c @ A)


@layer(c=Tensor("1", "k"))
def dot_of_log(c):
    v = torch.log(c * c + 1)
    return v @ c.T
''')
    first, second = from_file(str(spec))
    for found in (first, second):
        forward = "\n".join(line for line, _ in build(found).forward)
        assert " @ " in forward and ".sum(" not in forward, forward


def test_the_gradient_of_an_outer_product_is_two_matrix_vector_products(tmp_path):
    """``b**3 @ b.T`` for a column ``b``: its gradient sums ``(b[j]**2*g[j, i] + 3*b[i]**2*g[i, j])*b[j]``
    over ``j``. Multiplied out, with ``b[i]**2`` taken out of its sum, it is ``g.T @ b**3`` plus
    ``3*b**2*(g @ b)``, what autograd computes through the spec's ``@``; summed as written it
    built three (n x n) bodies, one read transposed: 15x autograd's time at n = 1024. A spec with
    no ``@`` keeps its matrix-vector sums as written (layernorm's ``(dout*gamma).mean(1)``)."""
    from derive.layers import from_file, layernorm

    spec = tmp_path / "outer.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(b=Tensor("n", "1"))
def cubed_outer(b):
    return b ** 3 @ b.T
''')
    (found,) = from_file(str(spec))
    gradient = code(found, "b")
    assert gradient.count(" @ ") == 2 and ".sum(" not in gradient and "view(1, n)" not in gradient, gradient
    assert "(dout*gamma).mean(1, keepdim=True)" in code(layernorm, "x") and " @ " not in code(layernorm, "x")


def test_a_gradient_divides_by_each_tensor_in_turn(tmp_path):
    """``sqrt((2*sum(log(w*w + 1)))**2 + 1)``: ``dw`` divides by ``w**2 + 1`` and by the square root.
    Printed as one division by their product, that product overflows float32 at ``w`` of 1e19 and
    the gradient (1e-19 there) came out 0; autograd divides by each in turn, and so does the kernel."""
    from derive.layers import from_file

    spec = tmp_path / "divisors.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(w=Tensor("k"))
def root_of_log_total(w):
    total = (w * w + 1).log().sum(0)
    return torch.sqrt((total + total) ** 2 + 1)
''')
    (found,) = from_file(str(spec))
    printed = code(found, "w")
    # each divisor divides alone, never their product: the root the factor it bounds, first
    # (``total/out``, the saved root ``out = sqrt(4*total**2 + 1)``: ``KernelPrinter.bounded_ratios``),
    # then the saved ``t2 = w**2 + 1`` before ``w`` multiplies, as autograd's log backward divides
    # before its product's backward multiplies
    assert "/t2*w" in printed and "(total/out)" in printed and ")*torch.sqrt" not in printed \
        and "+ 1)*(w" not in printed and "*t2" not in printed, printed


def test_a_product_divided_by_a_product_of_sizes(tmp_path):
    """The mean over every entry of a matrix product: ``dx = (dt1 @ W.T)/(n*o)``. Printed
    ``(dt1 @ W.T)/n*o``, which Python reads as ``((dt1 @ W.T)/n)*o``, the fused kernel was o**2
    times too large, the battery refused it and the layer fell back to the step-by-step backward."""
    from derive.layers import from_file
    from derive.select import chosen

    spec = tmp_path / "regression.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "i"), W=Tensor("i", "o"), y=Tensor("n", "o"))
def regression(x, W, y):
    pred = x @ W
    loss = ((pred - y) ** 2).mean()
    return loss
''')
    (layer,) = from_file(str(spec))
    assert code(layer, "x").endswith("@ W.T)/(n*o)") and code(layer, "W").endswith("/(n*o)")
    assert chosen(layer).fused, chosen(layer).reason


def test_taking_a_common_factor_out_keeps_an_exponential_whole(tmp_path):
    """``logsumexp(softmax(x))``: its gradient reads ``exp(v1 - v2)`` (``v2`` the row's logsumexp),
    inside the row's sum, as autograd's logsumexp backward does. Dividing each term by the terms'
    common factor with ``cancel`` split it into ``exp(v1)*exp(-v2)`` and took ``exp(-v2)`` out of the
    sum: three roundings for one and an exponential the spec never takes (the form then failed the
    battery at saturated rows). No exponential of the closed form is missing from the refolded one."""
    from derive.layers import from_file
    from derive.kernel import derived
    from derive.risk import risky_atoms
    from derive.simplify import closed_form, refold, scalars

    spec = tmp_path / "lse.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def logsumexp_of_softmax(x):
    v1 = torch.softmax(x, dim=1)
    return torch.logsumexp(v1, dim=1, keepdim=True)
''')
    (layer,) = from_file(str(spec))
    _, el, grads = derived(layer)
    (expr,) = grads.grads.values()
    refolded = refold(el, expr)
    closed = closed_form(refolded, scalars(el))
    assert any(str(a).startswith("exp(") for a in risky_atoms(refolded))
    assert set(risky_atoms(closed)) <= set(risky_atoms(refolded)), closed
    assert "exp(-" not in code(layer, "x"), code(layer, "x")


def test_a_product_reads_a_factor_the_forward_saves(tmp_path):
    """``v1 = x - c`` is saved (``dA`` reads it); ``v1 @ A`` is a matrix product of the saved tensor,
    not ``x - c`` computed again and multiplied entry by entry with ``A``: the broadcast sum rounded
    each product (no fused multiply-add) and, at inputs of 1e6, was 36x less accurate than autograd."""
    from derive.layers import from_file

    spec = tmp_path / "centred.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"), c=Tensor("1", "k"), A=Tensor("k", "k"))
def centred_product(x, c, A):
    v1 = x - c
    v2 = v1 @ A
    return torch.tanh(v2)
''')
    (layer,) = from_file(str(spec))
    forward = [line for line, _ in build(layer).forward]
    assert any(line.endswith(" = v1 @ A") for line in forward), forward


def test_a_fractional_power_of_a_sum_stays_whole(tmp_path):
    """The derivative of ``rsqrt(q)`` reads ``q**(-3/2)``. Expanded, as SymPy writes it, it was
    ``1/(k*n*sqrt(q)*v**2 + k*n*sqrt(q))``: terms of size ``k*n*v**3`` that overflow float32 at
    |v| = 2e12, and the mean's size inside every term; ``q**1.5`` itself overflows at q = 5e25, where
    autograd's ``rsqrt(q)**3`` is a subnormal."""
    from derive.layers import from_file
    from derive.symbolic import expand

    v, w = sp.symbols("v w", real=True)
    power = (v**2 + 1) ** sp.Rational(-3, 2)
    assert expand(power * (v + w) * w) == v * w * power + w**2 * power
    assert expand((v + w) ** 2) == v**2 + 2 * v * w + w**2  # integer powers are expanded as before
    # a product of reciprocals of sums stays a product: never 1/(v**2*w**2 + v**2 + w**2 + 1)
    h = sp.Symbol("h", real=True)
    both = expand((v + h) * w / ((v**2 + 1) * (w**2 + 1)))
    assert both == v * w / (v**2 + 1) / (w**2 + 1) + h * w / (v**2 + 1) / (w**2 + 1), both
    assert expand((v + w) ** -2) == (v + w) ** -2  # a reciprocal square kept (its base expanded)
    assert expand(1 / ((v + 1) * w + 1)) == 1 / (v * w + w + 1)

    spec = tmp_path / "inverse_root.py"
    spec.write_text('''import torch
import torch.nn.functional as F
from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def inverse_root(x):
    v = F.log_softmax(x, dim=-1)
    return torch.rsqrt(v * v + 1).mean()
''')
    (layer,) = from_file(str(spec))
    element = next(f.element for f in build(layer).formulas if f.input == "x")
    powers = [p for p in element.atoms(sp.Pow) if p.exp.is_negative]
    roots_in_sums = [q for p in powers if p.base.is_Add for q in p.base.atoms(sp.Pow) if not q.exp.is_Integer]
    assert not roots_in_sums, element  # no 1/(sqrt(q)*v**2 + sqrt(q))
    assert any(p.exp == sp.Rational(-3, 2) for p in powers), element
    # multiplied as rsqrt(q)**3, as autograd's rsqrt backward: q**1.5 overflows float32 from q = 5e25
    # (in the formula, or in the product it shares with its row sum, ``common0``)
    kernel = build(layer)
    code = " ".join([next(f.code for f in kernel.formulas if f.input == "x")] + [s.code for s in kernel.shared])
    assert "*torch.rsqrt(v**2 + 1)**3" in code and "**(1.5)" not in code, code


def test_a_squared_denominator_is_the_reciprocal_squared(tmp_path):
    """The mean of ``rsqrt(c*c + 1)**2`` has the gradient ``-2*c/(k*(c**2 + 1)**2)``. ``cancel``
    multiplied the square out, ``k*c**4 + 2*k*c**2 + k``, infinite in float32 from c = 1e10, where
    the gradient (autograd's ``rsqrt(q)**4``) is a subnormal: it came out 0. The square is factored
    again and multiplied as a power of the reciprocal, whose range is the gradient's own."""
    from derive.layers import from_file
    from derive.simplify import _cancelled

    c, k = sp.symbols("c k", positive=True)
    assert _cancelled(-2 * c / (k * (c**2 + 1) ** 2)) == -2 * c / (k * (c**2 + 1) ** 2)
    spec = tmp_path / "squared_reciprocal.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"), c=Tensor("1", "k"))
def squared_reciprocal(x, c):
    v = torch.rsqrt(c * c + 1)
    return (v * v).mean() + x.sum()
''')
    (layer,) = from_file(str(spec))
    kernel = build(layer)
    code = " ".join([next(f.code for f in kernel.formulas if f.input == "c")] + [s.code for s in kernel.shared])
    assert "torch.reciprocal(" in code and "**2 + 1)**2" in code and "**4" not in code, code


def test_factoring_keeps_each_exponential_whole():
    """SymPy's ``factor`` writes ``exp(x - m)`` as ``exp(x)*exp(-m)``: at x and m near -6000 that is
    ``0*inf``, NaN, where the spec's ``exp(x - m)`` is finite. A sum's body is factored with the sum."""
    from derive.simplify import _factor
    from derive.symbolic import Red

    x, m, a, b = (sp.IndexedBase(s) for s in "xmab")
    i, j = sp.Idx("i", 4), sp.Idx("j", 5)
    shifted = sp.exp(x[i, j] - m[i])
    factored = _factor(shifted * a[i, j] + shifted * b[i, j])
    assert factored.atoms(sp.exp) == {shifted}, factored
    assert sp.expand(factored - shifted * (a[i, j] + b[i, j])) == 0
    summed = _factor(Red(shifted * a[i, j], j) * b[i, j] + Red(shifted * a[i, j], j))
    assert summed.atoms(Red) == {Red(shifted * a[i, j], j)}, summed  # the index stays bound


def test_a_constant_exponent_stays_a_number_when_factoring():
    """Factoring whole names each non-integer constant (the spec's 0.044715 stays itself), but not
    an exponent: ``(n - 1)**c0`` is no polynomial generator, and ``factor`` took minutes over the
    gradient of ``(x - x.mean(0))/(x.std(0) + 1e-5)``. A root stays a root."""
    from derive.simplify import _outside_exponents

    n, s, c = sp.symbols("n s c", positive=True)
    expr = sp.Rational(1, 2) * s + sp.sqrt(n - 1) * s ** sp.Rational(3, 2)
    named = _outside_exponents(expr, {sp.Rational(1, 2): c})
    assert named == c * s + sp.sqrt(n - 1) * s ** sp.Rational(3, 2), named


def test_a_nonzero_difference_is_found_at_a_point_before_cancel():
    """``is_zero`` decides a difference of two forms: a nonzero one is found at numbers set for its
    atoms (cancelling a standardization's 450 operations took 9 s each time); one that is zero as a
    function of its atoms is left to ``cancel``, which proves it."""
    from derive.document.written import _nonzero_somewhere, is_zero
    from derive.symbolic import Red

    x = sp.IndexedBase("x")
    n = sp.Symbol("n", integer=True, positive=True)
    i, j = sp.Idx("i", n), sp.Idx("j", n)
    total, eps = Red(x[j], j), sp.Symbol("eps", positive=True)
    var = (Red(x[j] ** 2, j) - total**2 / n) / (n - 1)
    zero = x[i] / sp.sqrt(var + eps) - x[i] * sp.sqrt(var + eps) / (var + eps)
    assert not _nonzero_somewhere(zero) and is_zero(zero)
    assert _nonzero_somewhere(zero + total / n) and not is_zero(zero + total / n)


def test_one_divided_by_two_tensors_in_turn_is_valid_python():
    """``1/((c**2 + 1)*v**2)`` is divided by each tensor in turn. With no numerator factor left the
    kernel printed ``shared1 = /(c**2 + 1)/v**2``, a SyntaxError in the generated module (a random
    layer's battery run; it depended on the order SymPy gave the factors, so on the hash seed)."""
    from derive.printer import Frame, KernelPrinter

    n, k = sp.Symbol("n", integer=True, positive=True), sp.Symbol("k", integer=True, positive=True)
    i, j = sp.Idx("i_n", n), sp.Idx("i_k", k)
    c, v = sp.IndexedBase("c", real=True)[i, j], sp.IndexedBase("v", real=True)[i, 0]
    printed = KernelPrinter(Frame([i, j]), {"c": (n, k), "v": (n, 1)}, {n: "n", k: "k"}, "c")._divided(
        1 / ((c**2 + 1) * v**2))
    assert printed in ("1/(c**2 + 1)/v**2", "1/v**2/(c**2 + 1)"), printed
    assert eval(printed, {"c": 3.0, "v": 2.0}) == 1 / 40


def test_a_one_hot_times_a_product_scatters_the_product_as_written(tmp_path):
    """The gradient of ``minimum(tanh(x[range(n), y]).var(0), x[range(n), y].var(0))`` is a one-hot
    of the labels times a product of sums (which variance is the smaller, its deviations, the
    tanh's derivative). It was multiplied out into a dozen terms before the scatter, each with its
    own copy of the tie-splitting mask: 60 operations on n values, 2.9x autograd's time at
    1024 x 512. The coefficient is scattered as the product it is."""
    from derive.layers import from_file

    spec = tmp_path / "smaller_variance.py"
    spec.write_text('''import torch
from derive import Labels, Tensor, layer


@layer(x=Tensor("n", "k"), y=Labels("n", classes="k"))
def smaller_variance(x, y):
    n, k = x.shape
    v1 = x[range(n), y]
    v2 = v1.var(0, unbiased=False, keepdim=True)
    v4 = torch.tanh(v1).var(0, unbiased=False)
    return torch.minimum(v4, v2)
''')
    from derive.codegen import render_function

    (found,) = from_file(str(spec))
    source = render_function(build(found))
    printed = source[source.index("def _backward("):source.index("# The math above")]
    (scatter,) = [line for line in printed.splitlines() if "scatter_add_" in line]
    assert "tanh_backward" in scatter, scatter
    # the two tie-splitting masks, each printed once
    assert scatter.count(".to(") == 2 and scatter.count("torch.where(") == 2, scatter


def test_a_negated_tensor_is_not_a_temporary_that_blocks_a_product(tmp_path):
    """``dw`` of ``v3.T @ v3`` with ``v3 = tanh(maximum(w, p))**2`` sums ``(g[i, j] + g[j, i])*f(n, i)*h(n, j)``
    over ``n`` and ``j``: a matrix product, then a sum. cse shared ``-w`` (the tie mask reads
    ``w - p`` with either sign) as a temporary, and a factor reading a temporary is no operand of a
    product: the gradient was an (n x k x k) broadcast body, 60x autograd's time at 1024 x 512.
    A tensor times a number is put back where it is used."""
    from derive.layers import from_file

    spec = tmp_path / "gram_of_squares.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"), w=Tensor("k"), p=Tensor("n", "k", differentiable=False, domain="probability"))
def gram_of_squares(x, w, p):
    v1 = torch.maximum(w, p)
    v2 = torch.tanh(v1)
    v3 = v2**2
    return v3.T @ v3
''')
    from derive.simplify import EVERY_REWRITE

    (found,) = from_file(str(spec))
    # the form the battery came down to: the gradient as differentiated, no rewrite
    unfolded = build(found, {"w": frozenset({EVERY_REWRITE})})
    printed = backward_code(unfolded, "w")
    assert " @ " in printed and "view(n, k, 1)" not in printed, printed


def test_a_sum_split_into_a_product_and_a_row_total_is_no_broadcast_body(tmp_path):
    """``sum_j (g[i, j] + g[j, i] - 2*(s @ g)[n, j])*s[n, j]``, the gradient of ``s.T @ s`` through a
    softmax written out: the first two terms are a matrix product, the third is a row's dot product
    along fewer axes than the body. One term that is no product kept the whole sum an (n x k x k)
    broadcast body, 58x autograd's time at 1024 x 512; such a term is summed as written beside the
    products."""
    from derive.layers import from_file

    spec = tmp_path / "gram_of_softmax.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def gram_of_softmax(x):
    v2 = x.max(1, keepdim=True).values
    v3 = x - v2
    v4 = v3.exp()
    v5 = v4.sum(1, keepdim=True)
    v6 = v4 / v5
    v7 = v6.T @ v6
    v8 = torch.tanh(v7)
    return torch.tanh(v8)
''')
    (found,) = from_file(str(spec))
    printed = backward_code(build(found), "x")
    assert " @ " in printed and "view(1, k, k)" not in printed, printed


def test_small_factors_are_multiplied_together_before_a_full_size_one(tmp_path):
    """``d/dx log(m**2 + 1)`` with ``m = logsumexp(x)`` per row is ``2*g*m/(m**2 + 1)*exp(x - m)``:
    SymPy's order of factors put the number first, ``2*torch.exp(x - m)*g*m/(m**2 + 1)``, each
    product a pass over (n, k) (five where one does; 2.6x autograd's time in a random layer).
    The per-row factors are multiplied first, as autograd's chain rule carries the upstream
    gradient through them, and meet the full-size factor once."""
    from derive.layers import from_file

    spec = tmp_path / "log_of_logsumexp.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def log_of_logsumexp(x):
    m = torch.logsumexp(x, dim=1, keepdim=True)
    return (m * m + 1).log().sum()
''')
    (layer,) = from_file(str(spec))
    printed = code(layer, "x")
    head, _, last = printed.rpartition(")*")
    assert head.startswith("(") and last.startswith("torch.exp(") and "torch.exp" not in head, printed


def test_a_row_value_s_exponential_is_a_factor_beside_one_full_size_exponential(tmp_path):
    """``log_softmax`` over the rows of a function of ``v1 = logsumexp(x, 1)``: the chain rule
    reads ``exp(x - v1)``, autograd's backward of ``logsumexp``, and ``exp(v5)`` per row. The
    normal form adds the exponents of a product, so the gradient computed a second full-size
    ``exp(v5 + x - v1)`` beside ``exp(x - v1)`` (2.1x autograd's time in a random layer). Both
    exponents are at most 0 (a log-probability; a value less its logsumexp), so the exponential is
    split by the axes each part varies along: one full-size ``exp``, met last."""
    found = _layer(tmp_path, "log_softmax_of_a_logsumexp", """    v1 = torch.logsumexp(x, dim=1, keepdim=True)
    v2 = torch.tanh(v1)
    v4 = (v2 * v2 + 1).log()
    return F.log_softmax(v4, dim=0)""")
    printed = code(found, "x")
    assert printed.count("torch.exp(") == 2 and printed.endswith("*torch.exp(x - v1)"), printed
    assert "torch.exp(x - v1)" not in printed[:-len("*torch.exp(x - v1)")], printed


def test_a_power_of_a_saved_root_reads_the_root(tmp_path):
    """``rsqrt(x*x + 1)``'s derivative has ``(x**2 + 1)**(-3/2)``, the cube of the output. It was
    computed again from ``x`` (``torch.rsqrt(x**2 + 1)**3``: three more passes, and the forward
    saved nothing; 1.7x autograd's time); the forward's value is read, as autograd reads it."""
    from derive.layers import from_file

    spec = tmp_path / "inverse_root.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def inverse_hypot(x):
    out = torch.rsqrt(x * x + 1)
    return out
''')
    (layer,) = from_file(str(spec))
    kernel = build(layer)
    printed = code(layer, "x")
    assert "rsqrt" not in printed and "out**3" in printed, printed
    assert "out" in kernel.saved


def _layer(tmp_path, name, body, declared='x=Tensor("n", "k")', signature="x"):
    from derive.layers import from_file

    spec = tmp_path / f"{name}.py"
    spec.write_text(f'''import torch
import torch.nn.functional as F
from derive import Labels, Tensor, layer


@layer({declared})
def {name}({signature}):
{"    n, k = x.shape" if "x" in signature.split(", ") else ""}
{body}
''')
    (found,) = from_file(str(spec))
    return found


def _backward_source(kernel):
    from derive.codegen import render_function

    source = render_function(kernel)
    end = source.find("def _backward_in_place(")
    return source[source.index("def _backward("):end if end > 0 else source.index("# The math above")]


def test_nested_tanhs_read_the_values_the_forward_computed(tmp_path):
    """``tanh`` five times over: the gradient expands to hundreds of operations, which factor into
    ten binomials. Weighed unfactored, reading a saved tanh looked dearer than computing it again:
    the forward saved one value and the backward computed ``tanh`` four more times (twice
    autograd's time). Weighed factored, it reads each value, as autograd's backward does."""
    layer = _layer(tmp_path, "tanh5", "    v1 = torch.tanh(x)\n    v2 = torch.tanh(v1)\n    v3 = torch.tanh(v2)\n"
                                      "    v4 = torch.tanh(v3)\n    return torch.tanh(v4)")
    kernel = build(layer)
    printed = _backward_source(kernel)
    assert "torch.tanh(" not in printed, printed
    assert printed.count("tanh_backward(") >= 5, printed


def test_the_two_gradients_of_a_maximum_read_one_mask(tmp_path):
    """``maximum(tanh(a), b)``: ``da`` has the tie-splitting mask of ``t - b`` and ``db`` of
    ``b - t``, one the complement of the other (0, 1/2 and 1 exactly). Two comparisons each were
    computed twice; now the mask once, and ``1 - mask`` where the other operand needs it."""
    layer = _layer(tmp_path, "maximum_of_two", "    return torch.maximum(torch.tanh(a), b)",
                   declared='a=Tensor("n", "k"), b=Tensor("n", "k")', signature="a, b")
    printed = _backward_source(build(layer))
    # one mask, once: 1/2 where the operands tie, else the strict comparison (four passes, where
    # the two comparisons' masks scaled and added were seven)
    assert printed.count(".to(") == 1 and printed.count("torch.where(") == 1, printed
    assert "mask0 = torch.where(b == t1, 0.5, (b > t1).to(dout.dtype))" in printed and "1 - mask0" in printed, printed


def test_a_kept_value_is_read_where_the_gradient_has_its_negative(tmp_path):
    """``c - b*c`` holds ``-b*c``, which is ``-v2`` for the kept ``v2 = b*c``: matched with its number."""
    from derive.functions import Wins
    from derive.kernel import derived
    from derive.simplify import _kept_reads

    layer = _layer(tmp_path, "kept_negative", "    v2 = b * c\n    return torch.maximum(c, v2)",
                   declared='b=Tensor("n", "1"), c=Tensor("1", "k")', signature="b, c")
    graph, el, grads = derived(layer)
    (v2,) = [n for n in graph.nodes if n.name == "v2"]
    (dc,) = [e for node, e in grads.grads.items() if node.name == "c"]
    # (a value a maximum compares is read in its masks from the start, as autograd saves it:
    # ``Elements``; the same gradient with ``v2`` written out, as a formula of other values has it)
    assert all("v2[" in str(m) for m in dc.atoms(Wins)) and dc.atoms(Wins), dc
    bases = {str(e.base): e.base for e in dc.atoms(sp.Indexed)}  # (with their assumptions)
    b, c = bases["b"], bases["c"]
    written_out = dc.replace(lambda e: isinstance(e, sp.Indexed) and str(e.base) == "v2",
                             lambda e: b[e.indices[0], 0] * c[0, e.indices[1]])
    read = _kept_reads(el, v2, written_out)
    masks = read.atoms(Wins) if read is not None else set()
    assert len(masks) == 2 and all("v2[" in str(m) and "b[" not in str(m) for m in masks), (written_out, read)


def test_labels_nothing_reads_are_not_range_checked(tmp_path):
    """The labels' range check is a reduction over them on every call; labels no operation reads
    change nothing computed, so only their dtype is checked. Labels that are read keep it."""
    from derive.codegen import render_function

    unread = _layer(tmp_path, "unread_labels", "    return w.sum()",
                    declared='x=Tensor("n", "k"), w=Tensor("k"), y=Labels("n", classes="k")', signature="x, w, y")
    read = _layer(tmp_path, "read_labels", "    return x[range(n), y].sum()",
                  declared='x=Tensor("n", "k"), y=Labels("n", classes="k")', signature="x, y")
    assert "_labels_in_range(y," not in render_function(build(unread))
    assert "y.dtype in (" in render_function(build(unread))
    assert "_labels_in_range(y," in render_function(build(read))


@pytest.mark.parametrize("summed", ["w", "x"])
def test_a_whole_tensor_summed_to_a_number_is_one_call(summed, tmp_path):
    """``w.sum()`` of a vector printed as ``((w.view(1, k)).sum(1, keepdim=True)).reshape(())``:
    three calls, which count in a layer that small; now the one call the spec makes. A matrix's
    ``x.sum((0, 1), keepdim=True)`` takes 1.2x the time of ``x.sum()`` (1024 x 512, float32): one
    call too."""
    from derive.codegen import render_function

    for how in ("sum", "mean"):
        layer = _layer(tmp_path, f"{summed}_{how}", f"    return {summed}.{how}()",
                       declared='x=Tensor("n", "k"), w=Tensor("k")', signature="x, w")
        source = render_function(build(layer))
        forward = source[source.index("def _forward("):source.index("def _forward_with_graph(")]
        (line,) = [t.split("#")[0].strip() for t in forward.splitlines() if t.strip().startswith("out =")]
        assert line in (f"out = {summed}.sum()", f"out = {summed}.sum()/k", f"out = {summed}.mean()",
                        f"out = {summed}.sum()/(k*n)"), forward


def test_a_softmax_is_read_not_rebuilt_from_a_sum_it_is_part_of(tmp_path):
    """``clamp(softmax(x) + tanh(w))``: the refold solved ``v9 = v1 + v8`` for the softmax,
    ``v1 = v9 - v8``, a difference that rounds each probability to the sum's ulp and costs a pass
    (computed twice). The softmax is read, as autograd reads it, and the clamp's mask reads the
    kept sum ``v9`` where the gradient has it among other terms (``v1 + v8 + 1``)."""
    layer = _layer(tmp_path, "clamped_shift", "    v1 = torch.softmax(x, dim=1)\n    v9 = v1 + torch.tanh(w)\n"
                                              "    return v9.clamp(min=-1.0, max=0.5).mean()",
                   declared='x=Tensor("n", "k"), w=Tensor("k")', signature="x, w")
    kernel = build(layer)
    printed = _backward_source(kernel)
    dx = code(layer, "x")
    assert " - v9" not in dx and "v9 - " not in dx and "v1" in dx, dx
    assert "v9 >= -1" in printed and "v1 + v8" not in printed, printed
    assert {"v1", "v9"} <= set(kernel.saved), kernel.saved


def test_a_product_inside_and_outside_a_sum_is_computed_once(tmp_path):
    """cse shares what is written alike, and a sum's body is written at its bound index: the
    derivative of ``tanh(v1 @ c)`` was computed for ``dx`` (summed over ``k``) and again for ``dc``
    (summed over ``n``), and a softmax's upstream gradient ``g`` in ``g*p`` and again in
    ``sum(g*p)`` (1.5x autograd's time). Each is now computed once: the first as one tensor, the
    second as the gradient torch's softmax backward is given (its row sum is the kernel's)."""
    outer = _layer(tmp_path, "tanh_of_outer", "    v1 = x.sum(1, keepdim=True)\n    return torch.tanh(v1 @ c)",
                   declared='x=Tensor("n", "k"), c=Tensor("1", "k")', signature="x, c")
    printed = _backward_source(build(outer))
    # (the outer product ``v1 @ c`` is a matrix product: its adjoint, the tanh's derivative, is one
    # tensor ``dt1`` that both gradients read as matrix-vector products)
    assert printed.count("tanh_backward(") == 1 and re.search(r"\b\w+ = torch\.ops\.aten\.tanh_backward\(", printed), printed
    cubic = _layer(tmp_path, "softmax_cubic", "    v2 = torch.softmax(x, dim=1)\n    v5 = v2 + v2**3\n    return v5 + v5")
    printed = _backward_source(build(cubic))
    assert printed.count("v2**2") == 1 and "torch._softmax_backward_data(" in printed, printed


def test_a_product_of_plain_tensors_is_left_as_written(tmp_path):
    """Only a product holding a computed factor is named once: rmsnorm's ``dout*x`` appears in
    ``dx`` and in ``dg``'s column sum, and named once it would be summed as ``(dout*x)*inv`` where
    autograd sums ``dout*(x*inv)`` (off by an ulp in float32, against the exercise table)."""
    from derive.layers import rmsnorm

    printed = _backward_source(build(rmsnorm))
    assert "common" not in printed and "dg = " in printed, printed


def test_a_square_matrix_s_row_sum_shares_its_body_with_the_gradient(tmp_path):
    """In a ``k x k`` frame a row sum's bound index stands for the column index (its body reads
    the row's), and the sum's body writes a tanh's derivative factored, ``(y - 1)*(y + 1)``, where
    the term beside it has ``y**2 - 1``: the chain of two tanh derivatives is computed once, not
    once outside the sum and again inside it."""
    body = ("    v5 = (A - A.max(1, keepdim=True).values).exp()\n    v7 = v5 / v5.sum(1, keepdim=True)\n"
            "    return torch.tanh(torch.tanh(v7))")
    layer = _layer(tmp_path, "tanh_of_tanh_of_softmax", body, declared='A=Tensor("k", "k")', signature="A")
    printed = _backward_source(build(layer))
    assert printed.count("tanh_backward(") == 2 and "common0 = " in printed, printed
    assert "(common0*" in printed, printed


def test_a_factor_free_of_the_summed_index_multiplies_the_contraction(tmp_path):
    """``sum_c v1[a, c]*(v1[a, b]**2 - 1)*g[c, b]`` is ``(v1**2 - 1)*(v1 @ g)``: as an operand of
    one einsum, torch contracted ``ac,ab`` first, an (n x k x k) tensor (23x autograd's time at
    1024 x 512 for the gradient of ``tanh(x @ (tanh(x).T @ tanh(x)))`` picked at labels)."""
    from derive.layers import from_file

    source = tmp_path / "gram_of_tanh.py"
    source.write_text(
        "import torch\nfrom derive import Labels, Tensor, layer\n\n\n"
        '@layer(x=Tensor("n", "k"), y=Labels("n", classes="k"))\n'
        "def gram_of_tanh(x, y):\n    n, k = x.shape\n    v1 = torch.tanh(x)\n    v2 = v1.T @ v1\n"
        "    v4 = torch.tanh(x @ v2)\n    return (v4 + v4)[range(n), y]\n")
    (layer,) = from_file(str(source))
    printed = _backward_source(build(layer))
    assert not re.search(r"einsum\('\w+,\w+,\w+->", printed), printed
    assert "@ (dv2 + dv2.T)" in printed, printed


def test_the_chain_rule_through_a_saved_log_softmax_is_torch_s_own_kernel(tmp_path):
    """``a - exp(l)*sum_j a`` of a saved log-softmax ``l`` prints as one call of
    ``torch._log_softmax_backward_data``, as autograd's backward: the difference, the exponential
    and the product were three passes (3.5x autograd's time for ``F.log_softmax(x, dim=-1)`` at
    1024 x 512), and the upstream gradient may be a product (``dout*w``)."""
    layer = _layer(tmp_path, "log_softmax_scaled", "    v = torch.log_softmax(x, dim=1)\n    return v * w",
                   declared='x=Tensor("n", "k"), w=Tensor("1", "k")', signature="x, w")
    printed = _backward_source(build(layer))
    assert "dx = torch._log_softmax_backward_data(dout*w, v, 1, v.dtype)" in printed, printed
    assert "exp(" not in printed, printed


@pytest.mark.parametrize("function, kernel", [("softmax", "_softmax_backward_data"),
                                              ("log_softmax", "_log_softmax_backward_data")])
def test_a_softmax_under_a_whole_sum_is_torch_s_own_kernel_times_the_upstream_value(tmp_path, function, kernel):
    """``F.softmax(x).clamp(max=0.5).sum()``: the upstream gradient ``dv`` is one value, a factor
    outside the chain rule through the softmax, ``dv*(m - sum_j m*s)*s``. It printed as the product,
    the clamp's mask twice and a row sum of its own (2.2x autograd's time at 1024 x 512); now
    torch's own kernel on ``dv`` times the mask, as autograd's chain rule meets them."""
    body = f"    v = torch.{function}(x, dim=1)\n    return v.clamp(min=-1.0, max=0.5).sum()"
    layer = _layer(tmp_path, f"clamped_{function}_total", body, declared='x=Tensor("n", "k")', signature="x")
    printed = _backward_source(build(layer))
    assert re.search(rf"dx = torch\.{kernel}\(dout\*(mask0|\(0\.5 >= v\)\.to\(dout\.dtype\)), v, ", printed), printed
    assert ".sum(" not in printed, printed


@pytest.mark.parametrize("total", ["sum()", "mean()", "clamp(min=-1.0, max=0.5).sum()"])
def test_a_log_softmax_under_a_whole_sum_is_torch_s_own_kernel_in_both_backwards(tmp_path, total):
    """``F.log_softmax(x).sum()``: ``dx = dv*(1 - k*exp(v))``, printed as the product, was the
    exponential, a scaling, a subtraction and a product (1.65x autograd's time at 1024 x 512); its
    ``a`` is one value, so it is torch's kernel of the upstream gradient spread over the rows (a
    view), as autograd computes it. With a clamp the in-place backward wrote the mask's row sum and
    the difference (1.63x); now both backwards call the kernel."""
    body = f"    v = torch.log_softmax(x, dim=1)\n    return v.{total}"
    layer = _layer(tmp_path, "total_of_a_log_softmax", body, declared='x=Tensor("n", "k")', signature="x")
    source = render_function(build(layer))
    for name in ("_backward", "_backward_in_place"):  # (the second only where its lines differ)
        start = source.find(f"def {name}(")
        if start < 0:
            continue
        body = source[start:source.index("\n\n\n", start)]
        assert "torch._log_softmax_backward_data(" in body and "exp(" not in body and ".sum(" not in body, body


def test_a_shift_by_a_maximum_cancels_from_a_later_maximum_s_gradient(tmp_path):
    """``exp(v - max(v))`` with ``v = a - max(a)``: the gradient through ``max(a)`` is the row sum
    of ``v``'s gradient, which holds ``sum_j 1[j = argmax v] = 1``. Left as a one-hot summed, it
    printed a second one-hot (``a.argmax``) times ``(one-hot row sum - 1)``, which is 0: two
    full-size one-hots and their product for nothing."""
    body = ("    a = torch.tanh(x)\n    v = a - a.max(1, keepdim=True).values\n"
            "    return torch.exp(v - v.max(1, keepdim=True).values)")
    kernel = build(_layer(tmp_path, "shifted_twice", body))
    printed = _backward_source(kernel)
    assert printed.count("argmax(") == 1 and "keepdim=True) - 1" not in printed, printed
    # the in-place backward too adds at the argmax in one call (``scatter_add``) inside its chain,
    # where it built the one-hot (``zeros_like(...).scatter_``) and scaled it
    source = render_function(kernel)
    in_place = source[source.index("def _backward_in_place("):source.index("# The math above")]
    assert "scatter_add(" in in_place and "zeros_like(" not in in_place, in_place


def test_two_inputs_added_have_one_adjoint(tmp_path):
    """``v1 = w + x`` read nowhere else: ``dx = dv1`` and ``dw = dv1.sum(0)``, as autograd computes
    them, where ``dw`` repeated ``dx``'s whole formula inside a sum over the rows (3.4x autograd's
    time for ``tanh(softmax(tanh(w + x)))``). ``dv1`` is autograd's chain: the upstream gradient
    shared by the softmax's two terms and passed through torch's own kernels, its sign outside."""
    body = "    v1 = w + x\n    v3 = torch.softmax(torch.tanh(v1), dim=1)\n    return torch.tanh(v3)"
    layer = _layer(tmp_path, "tanh_softmax_tanh_of_a_sum", body, declared='x=Tensor("n", "k"), w=Tensor("k")',
                   signature="x, w")
    printed = _backward_source(build(layer))
    assert "dx = dv1\n" in printed and "dv1.sum(0" in printed, printed
    assert "dv1 = torch.ops.aten.tanh_backward(torch._softmax_backward_data(" in printed, printed
    assert printed.count("tanh_backward(") == 2 and "(-1)*" not in printed, printed


def test_a_sum_reading_a_shared_mask_s_complement_stays_one_sum(tmp_path):
    """``db = sum(g*Wins(x - b))`` reads ``1 - mask0`` once ``dx``'s ``Wins(b - x)`` is shared; kept
    as one sum of ``g*(1 - mask0)``, not expanded to ``sum(g) - sum(g*mask0)`` (two passes, and a
    difference of sums), and ``g`` is computed once for both gradients (1.34x autograd's time)."""
    body = "    v2 = torch.minimum(x, b)\n    v3 = v2**2\n    return (v3 * v3 + 1).log()**2"
    layer = _layer(tmp_path, "squared_log_of_a_minimum", body, declared='x=Tensor("n", "k"), b=Tensor("n", "1")',
                   signature="x, b")
    printed = _backward_source(build(layer))
    (db,) = [line for line in printed.splitlines() if line.strip().startswith("db = ") and "None" not in line]
    assert db.count(".sum(") == 1 and "(1 - mask0)*common0" in db, printed


COLUMN_SHARE = """import torch
import torch.nn.functional as F

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), w=Tensor("k"), b=Tensor("k"), A=Tensor("k", "k"))
def column_share(x, w, b, A):
    p = F.softmax(x, dim=1)
    share = p.sum(0)
    return torch.tanh(w * share + b)
"""


def test_vectors_do_not_choose_the_batch_axis(tmp_path):
    """The rows' axis is the batch, the first of every value printed, though more of the layer's
    values (``w``, ``b``, the column total, its ``tanh``, the unread ``A``) have ``k`` first: those
    are vectors and a square matrix, stored alike wherever the batch goes. With ``k`` first, the
    softmax was printed transposed and summed along strides (``v1.T``, 3x autograd's time at
    1024 x 512)."""
    from kernels import user_layer

    layer, _ = user_layer(tmp_path, COLUMN_SHARE, "column_share")
    kernel = build(layer)
    assert str(kernel.frame[0].upper + 1) == "n", kernel.frame
    forward = "\n".join(code for code, _ in kernel.forward)
    assert ".T" not in forward and ".T" not in backward_code(kernel, "x"), forward


BESIDE_A_SQUARE = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def doubled_beside_a_square(x, A):
    v1 = x + x
    v2 = torch.tanh(v1 @ A)
    return v2.sum(0)
"""


def test_a_line_is_printed_in_the_frame_of_the_axes_it_reads(tmp_path):
    """The (k, k) matrix gives the kernel a frame of three axes, (n, k, k); ``x + x`` reads two of
    them and was printed ``(2*x.view(n, k, 1)).reshape(n, k)``: two views, and under autograd
    (a second derivative, torch.func, a layer that runs under autograd) two backward nodes more,
    the time of the product itself at small sizes. Printed in its own axes, it is ``2*x``."""
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, BESIDE_A_SQUARE, "doubled_beside_a_square")
    source = render_function(build(layer))
    forward = source[source.index("def _forward("):source.index("def _forward_with_graph(")]
    (line,) = [t.split("#")[0].strip() for t in forward.splitlines() if t.strip().startswith("v1 =")]
    assert line == "v1 = 2*x", forward
    x, A = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(kernel(x, A), layer.fn(x, A))


PER_ROW_BESIDE_A_SQUARE = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"), A=Tensor("k", "k"))
def per_row_beside_a_square(x, b, A):
    total = b.sum(0, keepdim=True)
    v = torch.tanh(b * b).exp()
    return torch.tanh(x @ A).sum(1, keepdim=True) * v + total
"""


def _lines(source: str, start: str, end: str) -> list[str]:
    text = source[source.index(start):source.index(end)]
    return [t.split("#")[0].strip() for t in text.splitlines()[1:] if "=" in t and not t.strip().startswith(("#", '"'))]


_LAYOUT = re.compile(r"\.(view|reshape|expand)\(")


def test_a_line_of_a_per_row_input_is_printed_as_the_input_is_stored(tmp_path):
    """``b`` of (n, 1) beside a (k, k) matrix: the frame has three axes, and a line of ``b`` alone
    was printed in it or in the axes it reads, ``(torch.tanh(b.view(n, 1, 1)**2)).reshape(n, 1)``
    and ``((b.view(n, 1, 1)).sum(0, keepdim=True)).reshape(1, 1)``, its gradient
    ``(... b.view(n) ...).reshape(n, 1)``: views that cost a call each, and under autograd a
    backward node each. In the input's own layout they need none."""
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, PER_ROW_BESIDE_A_SQUARE, "per_row_beside_a_square")
    source = render_function(build(layer))
    forward = _lines(source, "def _forward(", "def _forward_with_graph(")
    of_b = [line for line in forward if " x" not in line and "A" not in line]
    assert any(line.startswith("total = ") for line in of_b) and len(of_b) >= 2, forward
    assert not any(_LAYOUT.search(line) for line in of_b), forward
    gradient = backward_code(build(layer), "b")
    assert not _LAYOUT.search(gradient), gradient
    x, b, A = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64),
               torch.randn(3, 3, dtype=torch.float64))
    torch.testing.assert_close(kernel(x, b, A), layer.fn(x, b, A))
    b.requires_grad_(True)
    kernel(x, b, A).sum().backward()
    expected, = torch.autograd.grad(layer.fn(x, b, A).sum(), b)
    torch.testing.assert_close(b.grad, expected)


UNREAD_INPUT = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"), w=Tensor("k"))
def reads_b_alone(x, b, w):
    return torch.log(b * b + 1)
"""


def test_an_input_the_output_does_not_read_is_no_edge_of_the_graph(tmp_path):
    """``x`` and ``w`` are declared but not read: the Function gets them detached (a layer of
    vectors, as this one, runs the spec's operations), so autograd has no edge to them (each such
    edge cost about as much as a small layer's own operation), and their gradient stays None, as
    autograd through the spec leaves it; ``b``'s is the spec's."""
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, UNREAD_INPUT, "reads_b_alone")
    x, b, w = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
               torch.randn(4, 1, dtype=torch.float64, requires_grad=True),
               torch.randn(3, dtype=torch.float64, requires_grad=True))
    out = kernel(x, b, w)
    leaves, nodes, seen = [], [out.grad_fn], set()
    while nodes:  # every tensor autograd would accumulate a gradient into
        node = nodes.pop()
        if node in seen:
            continue
        seen.add(node)
        leaves += [node.variable] if hasattr(node, "variable") else []
        nodes += [f for f, _ in node.next_functions if f is not None]
    assert len(leaves) == 1 and leaves[0] is b, leaves
    out.sum().backward()
    expected, = torch.autograd.grad(layer.fn(x, b, w).sum(), b)
    assert x.grad is None and w.grad is None
    torch.testing.assert_close(b.grad, expected)


COMPARED_VALUES = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"), u=Tensor("n", "k", differentiable=False))
def maximum_of_a_cube(x, b, u):
    v = b + x ** 3 / 4
    return torch.maximum(u, v)


@layer(x=Tensor("n", "k"), c=Tensor("1", "k"))
def minimum_of_two_values(x, c):
    s = torch.tanh(x) * c
    t = x * x - c
    return torch.minimum(s, t).sum(1)
"""


@pytest.mark.parametrize("name, values", [("maximum_of_a_cube", ["v"]), ("minimum_of_two_values", ["s", "t"])])
def test_a_value_an_elementwise_extremum_compares_is_read_not_computed_again(name, values, tmp_path):
    """``maximum(u, b + x**3/4)``: the backward's mask compares the same two values as the forward,
    and autograd saves both. Written out, ``b + x**3/4`` was computed again in the backward, twice
    (``torch.where(v == u, 0.5, (v > u))``): 1.2x autograd's time at 1024 x 512. The compared
    values are read as the forward computed them."""
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, COMPARED_VALUES, name)
    built = build(layer)
    assert set(values) <= set(built.saved), built.saved
    codes = [s.code for s in built.shared] + [f.code for f in built.formulas]
    masks = [c for c in codes if "torch.where(" in c]
    # each mask compares the saved values, and reads no input to compute them again
    assert masks and not any(re.search(r"\b(x|b|c)\b", m) for m in masks), codes
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    others = {"b": torch.randn(6, 1, dtype=torch.float64, requires_grad=True),
              "u": torch.randn(6, 5, dtype=torch.float64),
              "c": torch.randn(1, 5, dtype=torch.float64, requires_grad=True)}
    args = [x] + [others[k] for k in list(layer.inputs)[1:]]
    grads = []
    for fn in (kernel, layer.fn):
        out = fn(*args)
        wanted = [a for a in args if a.requires_grad]
        grads.append(torch.autograd.grad(out, wanted, torch.ones_like(out)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


MEANS = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"))
def centred_by_a_mean(x, b):
    return torch.tanh(x - x.mean(0, keepdim=True)) + b.mean(0, keepdim=True)
"""


def test_a_sum_divided_by_its_count_is_a_mean_and_one_value_spreads_in_one_call(tmp_path):
    """``x.mean(0)`` was printed ``x.sum(0, keepdim=True)/n``, and the gradient of ``b.mean(0)`` of
    an (n, 1) ``b`` ``(dout.sum()/n).expand(n,).reshape(n, 1)``: two calls where one does (torch's
    mean on the CPU is its sum divided, the same rounding; a value the same everywhere broadcasts
    to any shape of its rank or more). Each call counts at small sizes, and under autograd each is
    a backward node."""
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, MEANS, "centred_by_a_mean")
    built = build(layer)
    forward = " ".join(code for code, _ in built.forward)
    assert ".mean(0, keepdim=True)" in forward and "/n" not in forward, forward
    db = backward_code(built, "b")
    assert db.endswith(".expand(n, 1)") and ".reshape(" not in db, db
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 1, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(kernel(x, b), layer.fn(x, b), rtol=0, atol=0)
    d = torch.randn(7, 3, dtype=torch.float64)
    ours = torch.autograd.grad(kernel(x, b), (x, b), d)
    theirs = torch.autograd.grad(layer.fn(x, b), (x, b), d)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


MINIMUM_OF_A_ROW_AND_A_VECTOR = """import torch

from derive import Tensor, layer


@layer(c=Tensor("1", "k"), w=Tensor("k"))
def minimum_of_a_row_and_a_vector(c, w):
    return torch.minimum(w, c).sum()
"""


def test_a_gradient_reading_a_shared_mask_keeps_the_frame_the_mask_is_laid_out_in(tmp_path):
    """``dc`` of a ``(1, k)`` input reads the mask ``dw`` reads too, laid out as ``(k,)`` in their
    common frame. Printed in ``c``'s own layout, its in-place form wrote ``addcmul(dv, -dv, mask0)``,
    of shape ``(k,)``, and the Function failed (a gradient of the wrong shape; the battery fell back to
    the step-by-step kernel). A gradient reading a shared tensor of more than one value stays in
    the group's frame."""
    from kernels import fused, user_layer

    layer, _ = user_layer(tmp_path, MINIMUM_OF_A_ROW_AND_A_VECTOR, "minimum_of_a_row_and_a_vector")
    kernel = fused(layer, tmp_path)
    c = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w.data[2] = c.data[0, 2]  # a tie: half the gradient each
    ours = torch.autograd.grad(kernel(c, w), (c, w))
    theirs = torch.autograd.grad(layer.fn(c, w), (c, w))
    for a, e in zip(ours, theirs):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)


def _both_backwards(kernel) -> list[str]:
    """The bodies of ``_backward`` and, where its lines differ, ``_backward_in_place``."""
    source = render_function(kernel)
    bodies = []
    for name in ("_backward", "_backward_in_place"):
        start = source.find(f"def {name}(")
        if start >= 0:
            bodies.append(source[start:source.index("\n\n\n", start)])
    return bodies


def test_a_factor_outside_a_softmax_multiplies_torch_s_kernel(tmp_path):
    """``softmax(p*x)``: ``dx = (dv - sum_j dv*s)*s*p``, printed as the product, was five passes
    over memory (1.3x to 1.5x autograd's time at 1024 x 512); the part that is the chain rule through
    the softmax is torch's kernel, and ``p`` multiplies its result, as autograd's chain rule meets it."""
    layer = _layer(tmp_path, "softmax_of_a_product", "    return torch.softmax(p * x, dim=1)",
                   declared='x=Tensor("n", "k"), p=Tensor("n", "k", differentiable=False)', signature="x, p")
    backward, *in_place = _both_backwards(build(layer))
    assert "dx = torch._softmax_backward_data(dout, out, 1, dout.dtype)*p" in backward, backward
    for body in in_place:
        assert "torch._softmax_backward_data(dout, out, 1, dout.dtype).mul_(p)" in body, body


@pytest.mark.parametrize("body, chain", [
    ("    v1 = torch.log_softmax(x, dim=1)\n    v2 = torch.tanh(v1)\n    v3 = torch.tanh(v2)\n    return v3.sum()",
     "torch._log_softmax_backward_data(torch.ops.aten.tanh_backward(torch.ops.aten.tanh_backward(dout, v3), v2), "
     "v1, 1, v1.dtype)"),
    ("    v1 = torch.log_softmax(x, dim=1)\n    v2 = torch.tanh(-v1)\n    return v2.sum()",
     "torch._log_softmax_backward_data(-torch.ops.aten.tanh_backward(dout, v2), v1, 1, v1.dtype)"),
], ids=["two tanhs", "a negated tanh"])
def test_a_whole_sum_s_upstream_value_enters_the_chain_through_a_log_softmax_first(body, chain, tmp_path):
    """``tanh(tanh(log_softmax(x))).sum()``: the upstream gradient ``dv``, one value, was taken out
    of the kernel (``dv*log_softmax_backward(common0, v1)``) and the tanhs' factors computed as a
    product of their own (``common0 = (1 - v2**2)*(1 - v3**2)``, named because the kernel's row sum
    reads it too), 1.6x to 1.8x autograd's time; ``-tanh(log_softmax(x))``'s row sum, as the closed
    form writes it (``-sum_j (1 - y**2)`` beside ``(y - 1)*(y + 1)``), was not seen as the kernel's.
    Now the kernels chain as autograd's backward does, ``dv`` given to the first."""
    layer = _layer(tmp_path, "tanhs_of_a_log_softmax", body)
    for printed in _both_backwards(build(layer)):
        assert f"dx = {chain}" in printed, printed
        assert "common" not in printed and ".sum(" not in printed, printed


@pytest.mark.parametrize("body, printed", [
    ("    return torch.log_softmax(c, dim=1) * x",
     "dc = torch._log_softmax_backward_data(dt1, t1, 1, dt1.dtype)"),
    ("    return torch.tanh(torch.softmax(c, dim=1)) * x", "dc = torch._softmax_backward_data(dt1, t1, 1, dt1.dtype)"),
], ids=["log_softmax", "softmax"])
def test_a_softmax_of_an_input_stored_with_an_axis_of_1_is_torch_s_kernel(body, printed, tmp_path):
    """The (log-)softmax of a ``(1, k)`` input is read as ``v[0, i_k]``, an entry at 0 on its axis of
    1, which the kernels' printers did not take: ``dc = dv - exp(v)*dv.sum(1)``, four calls where
    autograd makes one (3x autograd's time for ``F.log_softmax(c, dim=-1)`` alone, whose fixed
    cost is most of it)."""
    layer = _layer(tmp_path, "softmax_of_a_row", body, declared='x=Tensor("n", "k"), c=Tensor("1", "k")',
                   signature="x, c")
    for code in _both_backwards(build(layer)):
        assert printed in code and "exp(" not in code, code


def test_a_product_shared_inside_nested_sums_is_read_at_their_indices(tmp_path):
    """``dw`` sums over ``n`` a sum over ``k`` of a product that ``dx`` computes too, so it is one
    tensor (``common0``) read inside both sums. Naming it renames the sums' indices, and ``cse``,
    told to leave alone only the indices it had before, took the inner sum, which reads the outer
    one's index, for a value of the frame: "common0[_r2_n, _r1_k] is read at a computed position",
    and the layer fell to the step-by-step backward with "report this as a bug"."""
    body = ("    ff = (torch.tanh(x * w) * x).sum(1, keepdim=True)\n"
            "    ee = ff / (x * x).sum(1, keepdim=True)\n"
            "    return torch.softmax(ee * x, dim=1) * x")
    layer = _layer(tmp_path, "softmax_of_a_tanh_weighted_share", body, declared='x=Tensor("n", "k"), w=Tensor("k")',
                   signature="x, w")
    kernel = build(layer)
    assert "common0" in {s.name for s in kernel.shared}, [s.name for s in kernel.shared]
    from kernels import fused_maxdiff
    assert fused_maxdiff(layer, tmp_path, {"n": 5, "k": 3}, seed=1) < 1e-10


def test_a_maximum_s_two_shares_of_one_input_add_up_to_one(tmp_path):
    """``tanh(maximum(log_softmax(x), x))``: ``x`` reaches the maximum through both operands, and
    its gradient reads both operands' shares, ``Wins(v1 - x) + Wins(x - v1)``, which is exactly 1
    (0 + 1, 1/2 + 1/2, 1 + 0). Computed as the two masks and their sum beside the one the
    softmax's part reads (three masks in all), the kernel took 1.6x autograd's time in a random
    layer; it reads one mask."""
    found = _layer(tmp_path, "maximum_of_log_softmax_and_input", """    v1 = F.log_softmax(x, dim=-1)
    return torch.tanh(torch.maximum(v1, x)).sum()""")
    printed = backward_code(build(found), "x")
    assert printed.count("torch.where(") == 1, printed


def test_a_maximum_of_an_input_and_its_multiple_splits_a_tie_as_autograd(tmp_path):
    """``maximum(x, 2*x)`` ties at ``x = 0``: autograd gives each operand half, ``1/2 + 2/2``. The
    shares of one input written as one mask and its complement keep that."""
    from kernels import fused

    found = _layer(tmp_path, "maximum_of_input_and_double", "    return torch.tanh(torch.maximum(x, 2 * x)).sum()")
    x = torch.tensor([[0.0, -1.5, 2.0], [0.0, 0.25, -0.0]], dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.tanh(torch.maximum(leaf, 2 * leaf)).sum(), leaf)
    leaf = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(fused(found, tmp_path)(leaf), leaf)
    assert torch.equal(got, expected), (got, expected)
    assert expected[0, 0] == 1.5


def test_a_log_softmax_s_kernel_is_found_where_a_square_is_shared_outside_its_sum(tmp_path):
    """``log(rsqrt(v1**2 + 1)**2 + 1)`` of a log-softmax ``v1``: the gradient is ``a - exp(v1)*sum_j a``
    with ``a = 2*g*v1/((v1**2 + 1)*(v1**2 + 2))``, torch's one-pass kernel. cse shares ``v1**2``
    in ``a`` outside the sum but not in its body (its index is bound), and the two no longer read
    alike: ``a`` was computed twice, with a sum, an ``exp`` and a product beside (1.4x autograd's
    time in a random layer). Compared with its temporaries written out, it is the kernel."""
    found = _layer(tmp_path, "log_of_a_root_of_a_log_softmax", """    v1 = F.log_softmax(x, dim=-1)
    v2 = torch.rsqrt(v1 * v1 + 1)
    return (v2 * v2 + 1).log()""")
    printed = backward_code(build(found), "x")
    assert "torch._log_softmax_backward_data(" in printed and ".sum(" not in printed and "exp(" not in printed, printed


RECTIFIED_AFFINE = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), w=Tensor("k"), b=Tensor("k"))
def rectified_affine(x, w, b):
    return torch.relu(x * w + b)


@layer(x=Tensor("n", "k"))
def gate_of_rectified_input(x):
    h = torch.relu(x)
    return torch.sigmoid(h) * x
"""


@pytest.mark.parametrize("name", ["rectified_affine", "gate_of_rectified_input"])
def test_a_relu_s_gradient_is_autograd_s_threshold_kernel(tmp_path, name):
    """A ReLU's derivative, ``Step`` of its argument, was printed ``(b + w*x > 0).to(dout.dtype)*dout``:
    the argument computed again (two passes), compared, cast from bool (on this CPU a comparison
    and a cast each take several times a product's time) and multiplied in, 2.2x autograd's time
    for ``relu(x*w + b)`` at 1024 x 512. It is ``Step`` of the ReLU's result now, read where the
    forward keeps it (the output here), and printed as autograd's own one-pass kernel,
    ``threshold_backward(dout, out, 0)``; where the result is not kept, of the argument itself,
    never the ReLU computed again."""
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, RECTIFIED_AFFINE, name)
    source = render_function(build(layer))
    backward = source[source.index("def _backward("):source.index("def _backward_in_place(")] \
        if "def _backward_in_place(" in source else source[source.index("def _backward("):]
    assert "threshold_backward(" in backward and ".to(dout.dtype)" not in backward and "relu(" not in backward, backward
    if name == "rectified_affine":
        assert "threshold_backward(dout, out, 0)" in backward, backward
    g = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(*[{"n": 16, "k": 5}[s] for s in layer.inputs[k].dims], generator=g, dtype=torch.float64)
              for k in layer.inputs}
    grads = []
    for f in (kernel, layer.fn):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = f(**leaves)
        grads.append(torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out)))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)


EXTREMUM_OF_A_NUMBER = """import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def clipped_total(x):
    v2 = x.sum(0, keepdim=True)
    t1 = torch.tanh(v2)
    return torch.tanh(torch.minimum(t1 - t1, v2)) + torch.maximum(v2, t1 - t1)
"""


def test_an_extremum_of_a_value_and_a_number_is_a_clamp(tmp_path):
    """``minimum(t1 - t1, v2)`` is ``minimum(0, v2)``: printed ``torch.minimum(0, v2)``, which raises
    TypeError (it takes tensors only), so the fused form failed the battery and the step-by-step
    kernel was written (2.1x to 2.3x autograd's time, four layers of a timing soak). Of a tensor and
    a number it is ``torch.clamp``, the number as the bound."""
    from derive.select import chosen
    from kernels import user_layer

    layer, kernel = user_layer(tmp_path, EXTREMUM_OF_A_NUMBER, "clipped_total")
    assert chosen(layer).fused, chosen(layer).summary()
    source = render_function(build(layer))
    assert "torch.clamp(v2, max=0)" in source and "torch.clamp(v2, min=0)" in source, source
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for f in (kernel, layer.fn):
        leaf = x.clone().requires_grad_()
        out = f(leaf)
        grads.append((out.detach(), torch.autograd.grad(out, leaf, torch.ones_like(out))[0]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-13)
