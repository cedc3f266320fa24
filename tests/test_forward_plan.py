"""The fused forward: exactly the saved tensors, numerically stable, and no wasted full-size work."""
import ast
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from derive.kernel import build
from derive.layers import by_name
from derive.forward_plan import stabilise
from kernels import user_layer
from generated import batchnorm_biased, cross_entropy


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_is_stable_for_huge_logits(scale, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(64, 27, dtype=dtype) * scale).requires_grad_()
    y = torch.randint(0, 27, (64,))
    loss = cross_entropy.cross_entropy(logits, y)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(ref, y)
    (expected_grad,) = torch.autograd.grad(expected, ref)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad)


def test_batchnorm_constant_column_and_tiny_eps():
    x = torch.randn(16, 4, dtype=torch.float64)
    x[:, 2] = 3.0  # variance exactly 0: the output is beta, the gradient finite
    x.requires_grad_()
    gamma = torch.rand(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = batchnorm_biased.batchnorm_biased(x, gamma, beta, 1e-12)
    native = F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-12)
    torch.testing.assert_close(out, native)
    upstream = torch.randn_like(out)
    mine = torch.autograd.grad(out, (x, gamma, beta), upstream)
    theirs = torch.autograd.grad(native, (x, gamma, beta), upstream)
    for a, b in zip(mine, theirs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_stabilise_cancels_log_of_exp_only_when_it_removes_one():
    import sympy as sp
    a = sp.Symbol("a", real=True)
    s = sp.Symbol("s", positive=True)
    assert stabilise(sp.log(sp.exp(a) / s)) == a - sp.log(s)
    assert stabilise(sp.log(s * a**2)) == sp.log(s * a**2)  # splitting would add a log


@pytest.mark.parametrize("name", ["cross_entropy", "batchnorm", "batchnorm_biased"])
def test_forward_computes_only_what_is_returned_or_saved(name):
    """Every value the fused forward computes is read again: no line of the spec is replayed for nothing."""
    kernel = build(by_name(name))
    assigned = [code.split(" = ")[0] for code, _ in kernel.forward]
    text = "\n".join(code for code, _ in kernel.forward)
    for target in assigned[:-1]:
        later = "\n".join(code.split(" = ", 1)[1] for code, _ in kernel.forward[assigned.index(target) + 1:])
        assert target in kernel.saved or target in later, f"{target} is computed and never used"
    assert assigned[-1] == kernel.output
    assert len(assigned) < len([n for n in kernel.graph.nodes if n.op not in ("input", "labels")])
    ast.parse(text)


def test_cross_entropy_backward_builds_no_one_hot():
    """The label term is a scatter of n values, not a dense (n, k) one-hot."""
    source = inspect.getsource(cross_entropy._backward)
    assert "one_hot" not in source and "scatter_add_" in source


def test_compiled_kernels_match_eager(tmp_path):
    """``compile_kernels()`` runs the same math through torch.compile: same loss and gradients."""
    import importlib.util
    from pathlib import Path

    path = Path(cross_entropy.__file__)
    spec = importlib.util.spec_from_file_location("compiled_cross_entropy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.compile_kernels(dynamic=False)
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    eager = cross_entropy.cross_entropy(logits, y)
    compiled = module.cross_entropy(logits, y)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, logits)[0], torch.autograd.grad(eager, logits)[0])
    assert module._kernels["forward"] is not module._forward  # the compiled one ran


def test_layernorm_formula_reads_row_means():
    """Layer norm's dx is written as one does by hand: row means of dout*gamma and of dout*gamma*xhat."""
    from derive.codegen import formula_lines

    (dx,) = [line for line in formula_lines(build(by_name("layernorm"))) if line.startswith("dx = ")]
    assert dx.count(".mean(1, keepdim=True)") == 2 and ".sum(1" not in dx and "/d" not in dx


PRODUCTS_OF_COMPUTED_MATRICES = '''import torch
import torch.nn.functional as F

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def gram_of_log_softmax(x, A):
    shifted = x - x.max(1, keepdim=True).values
    logp = shifted - shifted.exp().sum(1, keepdim=True).log()
    return (logp.T @ logp).T


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def total_of_a_square(x, A):
    return (A @ A).sum()


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def chain_of_products(x, A):
    t = torch.tanh(A)
    s = t - t.max(1, keepdim=True).values
    h = s - s.exp().sum(1, keepdim=True).log()
    g = h.T @ h
    return g @ h + torch.tanh(x).mean()
'''


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest number of elements any operation writes (a view of an argument, ``x.detach()``
    of an input the output does not read, writes none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["gram_of_log_softmax", "total_of_a_square", "chain_of_products"])
def test_a_product_of_computed_matrices_is_a_matrix_product(name, tmp_path):
    """``h.T @ h`` of a computed ``h`` (a log-softmax, ``A @ A`` summed): the fused kernel writes no
    tensor larger than autograd through the spec does. Inlined into the product, a computed operand
    was printed as a broadcast product summed, n x k x k elements (40 to 400 times the spec's time
    at 1024 x 512); ``sum_m(A[j, m] + A[m, i])`` grouped into one sum was k x k x k."""
    layer, kernel = user_layer(tmp_path, PRODUCTS_OF_COMPUTED_MATRICES, name)
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for fn in (kernel, layer.fn):
        x = torch.randn(48, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        A = torch.randn(16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        with LargestTensor() as mode:
            out = fn(x, A)
            out.backward(torch.ones_like(out))
        sizes.append(mode.largest)
    assert sizes[0] <= sizes[1], sizes


NESTED_SUMS = '''import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"))
def tanh_of_a_shifted_difference(x, b):
    return torch.tanh(b + (1 - x))


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"))
def sums_within_sums(x, b, c, w):
    h = x - c
    g = w + h
    return (g - b) * (b - (c - 2.5))
'''


@pytest.mark.parametrize("name", ["tanh_of_a_shifted_difference", "sums_within_sums"])
def test_the_forward_keeps_the_spec_s_grouping_of_sums(name, tmp_path):
    """A sum of sums is added as the spec groups it: ``b + (1 - x)`` rounds apart from
    ``b + 1 - x`` where the terms cancel (float32 at 100 times N(0, 1)), and SymPy's flattened
    ``Add`` forgot the grouping. The fused forward is then bit-equal to the spec's."""
    layer, kernel = user_layer(tmp_path, NESTED_SUMS, name)
    gen = torch.Generator().manual_seed(0)
    shapes = {"x": (64, 32), "b": (64, 1), "c": (1, 32), "w": (32,)}
    inputs = [100 * torch.randn(shapes[a], generator=gen) for a in inspect.signature(layer.fn).parameters]
    assert torch.equal(kernel(*inputs), layer.fn(*inputs))


class FullSizeWrites(torch.utils._python_dispatch.TorchDispatchMode):
    """The operations that write a tensor of ``numel`` elements: passes over full-size memory."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and torch.Tag.pointwise in func.tags:
            self.count += 1
        return out


WRITTEN_OUT = '''import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"))
def written_log_softmax(x):
    v = x - x.max(1, keepdim=True).values
    return v - v.exp().sum(1, keepdim=True).log()


@layer(x=Tensor("n", "k"))
def shifted_twice(x):
    a = torch.tanh(x)
    v = a - a.max(1, keepdim=True).values
    return torch.exp(v - v.max(1, keepdim=True).values)
'''


@pytest.mark.parametrize("name", ["written_log_softmax", "shifted_twice"])
def test_a_difference_read_negated_is_stored_as_the_spec_writes_it(name, tmp_path):
    """SymPy's ``cse`` takes the sign out of ``x - max``: the forward stored ``_t0 = max - x`` and
    read it as ``-_t0``, a negation per read (five elementwise passes for three in the spec). A
    temporary every read negates is stored negated: no more elementwise passes than the spec."""
    layer, kernel = user_layer(tmp_path, WRITTEN_OUT, name)
    x = torch.randn(64, 32)
    counts = []
    for fn in (kernel, layer.fn):
        with FullSizeWrites(x.numel()) as mode:
            out = fn(x)
        counts.append(mode.count)
    assert counts[0] <= counts[1], counts
    torch.testing.assert_close(out, kernel(x))


DEGENERATE_LINES = '''import torch

from derive import Tensor, layer


@layer(x=Tensor("n", "k"), A=Tensor("k", "k"))
def row_shares_beside_a_total(x, A):
    v3 = A.exp()
    return (v3 / v3.sum(1, keepdim=True)).sum() + x.sum()


@layer(x=Tensor("n", "k"), c=Tensor("1", "k"), A=Tensor("k", "k"))
def tanh_of_a_difference_with_itself(x, c, A):
    v1 = c @ A
    v2 = v1 - v1
    v3 = v2 + v2
    v4 = torch.tanh(v3)
    v5 = torch.tanh(v4)
    return v5.sum(1)
'''


@pytest.mark.parametrize("name", ["row_shares_beside_a_total", "tanh_of_a_difference_with_itself"])
def test_a_line_of_lower_rank_tensors_or_of_none_is_computed_as_the_spec_does(name, tmp_path):
    """Two forward lines the fused kernel could not compute (the step-by-step kernel was written
    instead, saying so): ``A.exp()`` of a (k, k) matrix in a frame (n, k, k) was a temporary of two
    axes where later lines read three (``v3.sum(2)``: IndexError); and ``v1 - v1``, which is 0,
    was read for every 0 of the later values, the indices of their entries included (``v5[0, k]``
    as ``v5[v2[0, k], k]``: KeyError, "report this as a bug"). The fused kernel's output and
    gradients are autograd's through the spec."""
    from derive.layers import from_file
    from kernels import fused

    spec = tmp_path / "degenerate.py"
    spec.write_text(DEGENERATE_LINES)
    (layer,) = [found for found in from_file(str(spec)) if found.name == name]
    function = fused(layer, tmp_path)
    gen = torch.Generator().manual_seed(0)
    shapes = {"x": (5, 3), "c": (1, 3), "A": (3, 3)}
    inputs = [torch.randn(*shapes[k], generator=gen, dtype=torch.float64) for k in layer.inputs]
    results = []
    for fn in (function, layer.fn):
        args = [t.clone().requires_grad_() for t in inputs]
        out = fn(*args)
        results.append((out.detach(), torch.autograd.grad(out, args, torch.ones_like(out), materialize_grads=True)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
