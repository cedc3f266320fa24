"""A layer whose derived backward is autograd's own kernel for its one operation (``tanh``,
``sigmoid``, ``relu``, ``softmax``, ``log_softmax``, written by a user or built in), or its own kernels for a chain of such
operations, runs those operations under autograd in eager mode: the same kernels, without a Python
``autograd.Function``'s fixed cost per call. Anything else, and a hand edit of the kernel, goes
through the Function."""
from pathlib import Path

import pytest
import torch

from derive.cli import main
from derive.layers import from_file
from derive.same_kernels import _Computed
from derive.verify import load_module

ROOT = Path(__file__).resolve().parent.parent

SPEC = '''import torch
import torch.nn.functional as F

from derive import Labels, Tensor, layer


@layer(x=Tensor("n", "d"))
def squash(x):
    """tanh, as a user writes it."""
    out = torch.tanh(x)
    return out


@layer(x=Tensor("n", "d"))
def gate(x):
    """A logistic gate."""
    return torch.sigmoid(x)


@layer(x=Tensor("n", "d"))
def clipped(x):
    """A rectifier."""
    return x.relu()


@layer(x=Tensor("n", "d"))
def probabilities(x):
    """A softmax over each row."""
    return F.softmax(x, dim=1)


@layer(x=Tensor("n", "d"))
def log_probabilities(x):
    """A log-softmax over each row."""
    return x.log_softmax(-1)


@layer(x=Tensor("n", "d"), b=Tensor("n", "1"), y=Labels("n", classes="d"))
def squash_beside(x, b, y):
    """One operation beside inputs it does not read: they have no gradient either way."""
    return torch.tanh(x)


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def total(x, w):
    """A whole sum: its gradient is the upstream one expanded, autograd's ``SumBackward``."""
    return w.sum()


@layer(x=Tensor("n", "d"))
def squash_squash(x):
    """A chain: autograd's two ``tanh_backward`` calls, in the same order, are the derived backward."""
    return torch.tanh(torch.tanh(x))


@layer(x=Tensor("n", "d"))
def gate_of_rectified(x):
    """A rectifier, then a logistic gate."""
    h = torch.relu(x)
    return torch.sigmoid(h)


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def squash_of_a_sum(x, w):
    """Not a chain of one input: the sum's two operands."""
    return torch.tanh(torch.tanh(x + w))


@layer(x=Tensor("n", "d"), c=Tensor("1", "d"), p=Tensor("n", "d", differentiable=False), y=Labels("n", classes="d"))
def shifted(x, c, p, y):
    """A bias broadcast over the rows, beside a frozen input and labels it does not read:
    autograd's backward through ``c + x`` is the derived one (``dx = dout``, ``dc = dout.sum(0)``)."""
    return c + x


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def shifted_probabilities(x, w):
    """A softmax plus a bias: ``dx = _softmax_backward_data(dout, s)``, ``dw = dout.sum(0)``, the
    kernels autograd's backward runs."""
    return w + F.softmax(x, dim=1)


@layer(x=Tensor("n", "d"), y=Labels("n", classes="d"))
def picked_square(x, y):
    """``x[range(n), y]**2``: the derived backward scatters ``2*x*dout`` once; autograd's scatters the
    upstream gradient, then multiplies: other operations, so the Function runs."""
    n = x.shape[0]
    return x[range(n), y] ** 2


@layer(x=Tensor("n", "d"))
def squash_twice(x):
    """Two operations: autograd runs two backward kernels, the derived backward one pass."""
    return torch.tanh(x) * 2.0


@layer(x=Tensor("n", "d"), b=Tensor("n", "1"), c=Tensor("1", "d"), w=Tensor("d"),
       p=Tensor("n", "d", differentiable=False))
def doubled_bias(x, b, c, w, p):
    """Vectors alone, beside inputs it does not read: a row and a bias, doubled, through two tanhs.
    The fused forward writes ``torch.tanh(2*c + 2*w)`` (under autograd, a multiply more each way)."""
    v = w + c
    return torch.tanh(torch.tanh(v + v))


@layer(c=Tensor("1", "d"))
def row_log_probabilities(c):
    """A log-softmax of one row: the fused forward reads it as ``c.view(d)`` (two views more)."""
    return F.log_softmax(c, dim=-1)


@layer(b=Tensor("n", "1"))
def spread(b):
    """A variance of a column: the trace records the centred values and their squares for the
    step-by-step rule, which ``b.var(0)`` does not compute."""
    return b.var(0, unbiased=False)


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def column_totals(x, w):
    """A full-size input that a sum alone reads: autograd's backward of the sum spreads the
    gradient as a view, as the derived one does."""
    v = x.sum(0)
    return (v * v + 1).log() + w


@layer(x=Tensor("n", "d"))
def column_means(x):
    """A full-size input a mean reads: autograd's backward divides the spread gradient (a full-size
    buffer), the derived one divides the row before it spreads it."""
    return torch.tanh(x.mean(0))


@layer(b=Tensor("n", "1"), c=Tensor("1", "d"))
def outer_total(b, c):
    """Vectors in, a full-size value inside (the outer product): the Function."""
    return torch.tanh(b @ c).sum()
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("autograd_kernel")
    (root / "specs.py").write_text(SPEC)
    assert main(["generate", "--no-prove", "--layer", str(root / "specs.py"), "--out", str(root / "gen")]) == 0
    return root / "gen"


def module(folder: Path, name: str):
    return load_module(folder / f"{name}.py")


def _row_softmax(x):
    return torch.softmax(x, 1)


def _row_log_softmax(x):
    return torch.log_softmax(x, 1)


@pytest.mark.parametrize("name, op, node", [("squash", torch.tanh, "TanhBackward0"), ("gate", torch.sigmoid, "SigmoidBackward0"),
                                            ("clipped", torch.relu, "ReluBackward0"),
                                            ("probabilities", _row_softmax, "SoftmaxBackward0"),
                                            ("log_probabilities", _row_log_softmax, "LogSoftmaxBackward0")])
def test_one_operation_with_its_own_kernel_runs_under_autograd(folder, name, op, node):
    """A softmax's derived backward is ``torch._softmax_backward_data(dout, out, 1, dout.dtype)``,
    autograd's own for it (through the Function: 1.08x to 1.18x autograd's time at 1024 x 512)."""
    m = module(folder, name)
    assert m._autograd_is_the_kernel()
    x = (torch.randn(64, 33, dtype=torch.float32) * 30).requires_grad_()
    out = getattr(m, name)(x)
    assert type(out.grad_fn).__name__ == node  # autograd's own node
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    # the Function computes the same values: the derived backward is that kernel
    x2 = x.detach().requires_grad_()
    out2 = getattr(m, "".join(part.capitalize() for part in name.split("_")) + "Function").apply(x2)[0]
    (dx2,) = torch.autograd.grad(out2, x2, dout)
    ref = x.detach().clone().requires_grad_()
    (dref,) = torch.autograd.grad(op(ref), ref, dout)
    assert torch.equal(out, out2) and torch.equal(dx, dx2) and torch.equal(dx, dref)


@pytest.mark.parametrize("name, ops, node", [("squash_squash", (torch.tanh, torch.tanh), "TanhBackward0"),
                                             ("gate_of_rectified", (torch.relu, torch.sigmoid), "SigmoidBackward0")])
def test_a_chain_of_operations_with_their_own_kernels_runs_under_autograd(folder, name, ops, node):
    """``tanh(tanh(x))``: the derived backward is ``tanh_backward(tanh_backward(dout, out), t)``,
    autograd's two kernels in its order, so the chain runs under autograd (through the Function it
    took 1.2x to 1.3x autograd's time at 1024 x 512 with the same kernels); values equal the Function's."""
    m = module(folder, name)
    assert m._autograd_is_the_kernel()
    x = (torch.randn(64, 33, dtype=torch.float32) * 3).requires_grad_()
    out = getattr(m, name)(x)
    assert type(out.grad_fn).__name__ == node
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    x2 = x.detach().requires_grad_()
    function = getattr(m, "".join(part.capitalize() for part in name.split("_")) + "Function")
    out2 = function.apply(x2)[0]
    (dx2,) = torch.autograd.grad(out2, x2, dout)
    ref = x.detach().clone().requires_grad_()
    (dref,) = torch.autograd.grad(ops[1](ops[0](ref)), ref, dout)
    assert torch.equal(out, out2) and torch.equal(dx, dx2) and torch.equal(dx, dref)


def test_a_chain_that_reads_two_inputs_keeps_the_function(folder):
    m = module(folder, "squash_of_a_sum")
    assert not hasattr(m, "_autograd_is_the_kernel")


def test_inputs_the_operation_does_not_read_keep_it_under_autograd(folder):
    """``tanh(x)`` declared beside a bias and labels it does not read went through the Function (1.17x
    autograd's time at 1024 x 512): those inputs have no gradient in either, so autograd runs it."""
    m = module(folder, "squash_beside")
    assert m._autograd_is_the_kernel()
    x, b = torch.randn(8, 5, requires_grad=True), torch.randn(8, 1, requires_grad=True)
    out = m.squash_beside(x, b, torch.randint(0, 5, (8,)))
    assert type(out.grad_fn).__name__ == "TanhBackward0"
    out.sum().backward()
    ref = x.detach().clone().requires_grad_()
    torch.tanh(ref).sum().backward()
    assert b.grad is None and torch.equal(x.grad, ref.grad)
    with pytest.raises(m.InputError, match="b must have shape"):
        m.squash_beside(x, torch.randn(8, 2), torch.randint(0, 5, (8,)))


def test_a_whole_sum_runs_under_autograd(folder):
    """``w.sum()``: the derived gradient ``dout.expand(d,)`` is autograd's own for a sum, so the
    generated module runs the sum under autograd (a Function cost 43 us against autograd's 16 us)."""
    m = module(folder, "total")
    assert m._autograd_is_the_kernel()
    w = torch.randn(7, requires_grad=True)
    out = m.total(torch.randn(3, 7), w)
    assert type(out.grad_fn).__name__ == "SumBackward0"
    out.backward()
    assert torch.equal(w.grad, torch.ones(7))


def test_the_input_checks_still_run(folder):
    m = module(folder, "squash")
    with pytest.raises(m.InputError, match="x must have 2 dimension"):
        m.squash(torch.randn(3))
    with pytest.raises(m.InputError, match="x must be a floating-point tensor"):
        m.squash(torch.ones(2, 3, dtype=torch.long))


def test_two_operations_keep_the_function(folder):
    m = module(folder, "squash_twice")
    assert not hasattr(m, "_autograd_is_the_kernel")
    out = m.squash_twice(torch.randn(4, 3, requires_grad=True))
    assert type(out.grad_fn).__name__.endswith("FunctionEagerBackward")


@pytest.mark.parametrize("name, names", [("shifted", ("x", "c", "p", "y")), ("shifted_probabilities", ("x", "w"))])
def test_a_layer_whose_backward_autograd_computes_alike_runs_under_autograd(folder, name, names):
    """Where autograd's backward through the fused forward runs the derived backward's operations,
    as many of each, with equal results (``same_kernels.runs_the_same``, when the file is written),
    ``<name>(...)`` runs the forward under autograd (through the Function ``c + x`` took 1.1x
    autograd's time at 1024 x 512, a tiny layer 2.7x): the values are the Function's, bit for bit."""
    m = module(folder, name)
    assert m._autograd_is_the_kernel() and "checked when this file was generated" in m.__doc__
    gen = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(16, 9, generator=gen) * 10, "c": torch.randn(1, 9, generator=gen),
              "w": torch.randn(9, generator=gen), "p": torch.rand(16, 9, generator=gen),
              "y": torch.randint(0, 9, (16,), generator=gen, dtype=torch.int32)}  # int32 labels: made int64 as the Function does
    function = getattr(m, "".join(part.capitalize() for part in name.split("_")) + "Function")
    upstream = torch.randn(16, 9, generator=gen)
    results = []
    for run in (lambda args: getattr(m, name)(*args), lambda args: function.apply(*args)[0]):
        args = [inputs[k].clone().requires_grad_(k in ("x", "c", "w")) for k in names]
        out = run(args)
        grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], upstream)
        results.append((type(out.grad_fn).__name__, out.detach(), grads))
    (node_run, out, grads), (function_node, out2, grads2) = results
    assert node_run == "AddBackward0" and function_node.endswith("FunctionBackward")
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_a_gradient_of_a_frozen_input_is_still_refused(folder):
    """``p`` is declared differentiable=False: asked for its gradient, the call goes through the
    Function, which raises, as it does without the route."""
    m = module(folder, "shifted")
    x, c = torch.randn(4, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    out = m.shifted(x, c, torch.rand(4, 3, requires_grad=True), torch.randint(0, 3, (4,)))
    assert type(out.grad_fn).__name__.endswith("FunctionEagerBackward")
    with pytest.raises(RuntimeError, match="p is declared differentiable=False"):
        out.sum().backward()


def test_other_operations_in_autograd_keep_the_function(folder):
    m = module(folder, "picked_square")
    assert not hasattr(m, "_autograd_is_the_kernel")


def _edited(folder: Path, tmp_path: Path, name: str, line: str):
    """The module ``name`` with the backward's ``line`` scaled by 1.01, as a hand edit would."""
    text = (folder / f"{name}.py").read_text()
    assert line in text
    edited = tmp_path / f"{name}.py"
    edited.write_text(text.replace(line, line[:-1] + " * 1.01\n"))
    return load_module(edited)


def test_a_hand_edit_of_the_kernel_runs_the_edit(folder, tmp_path):
    """The edited backward is what runs (and what ``derive verify`` then holds against autograd)."""
    m = _edited(folder, tmp_path, "squash", "        dx = torch.ops.aten.tanh_backward(dout, out)\n")
    assert not m._autograd_is_the_kernel()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = m.squash(x)
    assert type(out.grad_fn).__name__.endswith("FunctionEagerBackward")
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(dx, (1 - torch.tanh(x.detach()) ** 2) * 1.01)


def test_compiled_kernels_and_transforms_go_through_the_function(folder, tmp_path):
    text = (folder / "squash.py").read_text()
    path = tmp_path / "squash.py"
    path.write_text(text)
    m = load_module(path)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert m._autograd_is_the_kernel()
    calls = []
    original = m._apply
    m._apply = lambda *args: (calls.append(args[0]), original(*args))[1]
    m.squash(x)
    assert calls == []  # eager: the operation under autograd
    torch.func.vmap(m.squash)(x.unsqueeze(0).expand(2, 3, 2))
    assert calls == [m.SquashFunction]  # under vmap the Function, with its vmap rule
    m._kernels["backward"] = m._backward  # what compile_kernels() does, without compiling
    assert not m._autograd_is_the_kernel()


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu"])
def test_the_built_in_one_operation_layers_take_it(name):
    m = load_module(ROOT / "generated" / f"{name}.py")
    assert m._autograd_is_the_kernel()


def _recorded(out) -> list[str]:
    """The backward nodes autograd recorded for ``out``, outputs first (breadth first)."""
    names, seen, queue = [], set(), [out.grad_fn]
    while queue:
        node = queue.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        queue += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("name, names, read", [("doubled_bias", ("x", "b", "c", "w", "p"), ("c", "w")),
                                               ("row_log_probabilities", ("c",), ("c",)), ("total", ("x", "w"), ("w",)),
                                               ("spread", ("b",), ("b",)), ("column_totals", ("x", "w"), ("x", "w"))])
def test_a_layer_of_vectors_runs_the_spec_s_operations_under_autograd(folder, name, names, read):
    """Every value at most one axis of a size, or a full-size input that only a sum reads: a call
    computes a few vectors, and through the Function (``tanh(tanh(2*(w + c)))`` beside three unread
    inputs) it took 1.8x autograd's time through the spec at 1024 x 512, a log-softmax of one row
    3.2x, ``log(A.sum(0)**2 + 1)`` 1.3x. ``<name>(...)`` runs the spec's operations
    under autograd: the nodes autograd records, the output and the gradients are those of autograd
    through the spec, bit for bit, and the operations run forward and backward are the spec's (a
    variance of a column computed the trace's centred values and squares beside it: 1.55x); the
    Function's derived gradients agree with them."""
    m = module(folder, name)
    assert m._autograd_is_the_kernel() and hasattr(m, "_forward_as_written")
    assert "runs the spec's operations under autograd" in m.__doc__
    (spec,) = [layer for layer in from_file(str(folder.parent / "specs.py")) if layer.name == name]
    gen = torch.Generator().manual_seed(1)
    sizes = {"n": 6, "d": 5}
    inputs = {k: torch.randn(*[sizes.get(s, 1) for s in (("n", "d") if k in ("x", "p") else ("n", 1) if k == "b"
                                                         else (1, "d") if k == "c" else ("d",))],
                             generator=gen, dtype=torch.float64) * 3 for k in names}
    function = getattr(m, "".join(part.capitalize() for part in name.split("_")) + "Function")
    results = []
    for run in (lambda args: getattr(m, name)(*args), spec.fn, lambda args: function.apply(*args)[0]):
        args = [inputs[k].clone().requires_grad_(k != "p") for k in names]
        with _Computed() as computed:
            out = run(*args) if run is spec.fn else run(args)
            grads = torch.autograd.grad(out, [a for k, a in zip(names, args) if k in read], torch.randn(out.shape, generator=gen.manual_seed(2), dtype=out.dtype))
        results.append((_recorded(out), out.detach(), grads, computed.counts))
    (routed_nodes, out, grads, routed_ops), (spec_nodes, spec_out, spec_grads, spec_ops), (function_nodes, out3, grads3, _) \
        = results
    assert routed_nodes == spec_nodes and not any("Function" in node for node in routed_nodes)
    assert routed_ops == spec_ops
    assert function_nodes[0].endswith("FunctionBackward")
    assert torch.equal(out, spec_out) and all(torch.equal(a, b) for a, b in zip(grads, spec_grads))
    torch.testing.assert_close(out3, out)
    for a, b in zip(grads3, grads):
        torch.testing.assert_close(a, b)


def test_a_hand_edit_of_a_vector_layer_s_backward_runs_the_edit(folder, tmp_path):
    """The route runs the spec's operations; an edit of the derived backward sends the calls through
    the Function again, which runs the edit."""
    m = _edited(folder, tmp_path, "doubled_bias",
                "        dv = 2*torch.ops.aten.tanh_backward(torch.ops.aten.tanh_backward(dout, out), t2)\n")
    assert not m._autograd_is_the_kernel()
    c = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    x, b, p = (torch.randn(*shape, dtype=torch.float64) for shape in ((3, 5), (3, 1), (3, 5)))
    out = m.doubled_bias(x, b, c, torch.randn(5, dtype=torch.float64), p)
    assert type(out.grad_fn).__name__.endswith("FunctionEagerBackward")


@pytest.mark.parametrize("name, shapes", [("outer_total", ((4, 1), (1, 3))), ("column_means", ((4, 3),))])
def test_a_full_size_value_inside_keeps_the_function(folder, name, shapes):
    """``tanh(b @ c).sum()`` reads vectors only, but computes an (n, d) value; ``tanh(x.mean(0))``
    reads a full-size input through a mean, whose backward in autograd is a full-size buffer: the
    derived backward can save passes over them, and the Function runs it."""
    m = module(folder, name)
    assert not hasattr(m, "_forward_as_written")
    out = getattr(m, name)(*[torch.randn(*shape, requires_grad=True) for shape in shapes])
    assert type(out.grad_fn).__name__.endswith("FunctionEagerBackward")
