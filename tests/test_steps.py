"""The generated step-by-step backward: the exercise's table, and equal to the fused form."""
import importlib
import weakref

import pytest
import torch

from derive.layers import FUSED, makemore_mlp
from derive.layers.makemore_mlp import EXERCISE_SIZES
from derive.prove import prove_steps
from derive.trace import trace
from derive.verify import against_autograd, random_inputs, steps_table, table, upstream_for

GENERATED = "generated"


def steps(layer):
    return importlib.import_module(f"{GENERATED}.{layer.name}_steps")


def test_makemore_table_float32():
    rows = steps_table(makemore_mlp, steps(makemore_mlp), EXERCISE_SIZES, torch.float32)
    print("\n" + table(rows))
    names = [r.name for r in rows]
    # every intermediate of the exercise, dlogprobs down to dC, and every parameter
    for name in ["logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
                 "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
                 "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C"]:
        assert name in names
    assert all(r.approximate for r in rows), table(rows)


def test_makemore_float64_maxdiff():
    rows = steps_table(makemore_mlp, steps(makemore_mlp), EXERCISE_SIZES, torch.float64)
    assert len(rows) >= 26 and max(r.maxdiff for r in rows) < 1e-12, table(rows)


def test_embedding_gradient_is_vectorized_and_every_line_commented():
    source = importlib.import_module(f"{GENERATED}.makemore_mlp_steps").__file__
    text = open(source).read()
    backward = text[text.index("def backward"):]
    backward = backward[:backward.index("\ndef ", 1)]  # (the Functions' copy after it has no comments)
    assert "index_add(" in backward and "for " not in backward.split('"""')[2]
    body = [line for line in backward.splitlines() if line.startswith("    d") and " = " in line]
    assert body and all("# grad of: " in line for line in body)


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_step_by_step_equals_elementwise_derivative_symbolically(layer):
    # The fused formula is proven against the same element-wise derivative (test_prove.py),
    # so the two forms are equal at these sizes.
    for n in (2, 3):
        sizes = {d: (n if k == 0 else 2) for k, d in enumerate(layer.dims)}
        prove_steps(trace(layer), sizes)


@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_step_by_step_equals_fused_numerically(layer):
    sizes = {"n": 32, "k": 27, "d": 64, "c": 8, "l": 4, "i": 30, "o": 64}
    sizes = {d: sizes.get(d, 16) for d in layer.dims}
    inputs = random_inputs(layer, sizes, torch.float64, seed=5)
    out, cache = steps(layer).forward(**inputs)
    ours = steps(layer).backward(cache, upstream_for(out, 5))
    fused = getattr(importlib.import_module(f"{GENERATED}.{layer.name}"), layer.name)
    leaves = {k: (v.clone().requires_grad_(k in layer.differentiable) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    fused_out = fused(**leaves)
    fused_out.backward(upstream_for(fused_out, 5))
    for name in layer.differentiable:
        assert torch.allclose(ours[f"d{name}"], leaves[name].grad, rtol=1e-12, atol=1e-14)
    assert against_autograd(layer, fused, sizes)[0].maxdiff < 1e-12


def steps_module(tmp_path, name: str, source: str):
    """The spec ``source`` as a user's file, its layer, and the step-by-step module generated for it."""
    from derive.generate import render
    from derive.layers import from_file
    from derive.verify import load_module

    spec = tmp_path / f"{name}.py"
    spec.write_text(source)
    (layer,) = from_file(str(spec))
    steps = tmp_path / f"{name}_steps.py"
    steps.write_text(render(layer)[f"{name}_steps.py"])
    return layer, load_module(steps)


def test_a_full_maximum_of_a_vector_prints_as_a_tensor(tmp_path):
    """``v.max(0).values`` of a 1-d value reduces everything: the forward prints ``v.max()``
    (``v.max().values`` would be a method, not the maximum) and the steps pass gradcheck."""
    _, module = steps_module(tmp_path, "vmax", "from derive import Tensor, layer\n\n\n"
                                               "@layer(x=Tensor('n', 'd'))\n"
                                               "def vmax(x):\n"
                                               "    v = x.sum(1)\n"
                                               "    m = v.max(0).values\n"
                                               "    out = x * m\n"
                                               "    return out\n\n\n"
                                               "vmax.fused = False\n")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module.vmax, (x,))


def test_a_value_broadcast_over_new_and_kept_axes_sums_as_autograd(tmp_path):
    """``w.mean(0, keepdim=True)`` of shape (1,) added to an (n, k) value: its gradient sums over a
    new axis and a kept one. Summed axis after axis (``g.sum(0).sum(0, keepdim=True)``) it rounded
    in another order than autograd's one reduction over both (``sum_to``), up to 8x autograd's error
    where the terms cancel; as one sum the step-by-step gradient is autograd's, bit for bit."""
    layer, module = steps_module(tmp_path, "centred", "import torch\nfrom derive import Tensor, layer\n\n\n"
                                 "@layer(x=Tensor('n', 'k'), b=Tensor('n', '1'), w=Tensor('k'))\n"
                                 "def centred(x, b, w):\n"
                                 "    gap = w.mean(0, keepdim=True) + b * x\n"
                                 "    return (gap * gap + 1).log()\n\n\n"
                                 "centred.fused = False\n")
    g = torch.Generator().manual_seed(0)
    x, b, w = (4 * torch.randn(shape, generator=g) for shape in ((64, 7), (64, 1), (7,)))
    upstream = torch.randn(64, 7, generator=g) / 64
    grads = []
    for fn in (layer.fn, module.centred):
        leaf = w.clone().requires_grad_()
        fn(x, b, leaf).backward(upstream)
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1]), (grads[0] - grads[1]).abs().max()


def test_the_gradient_of_a_transposed_operand_is_laid_out_as_autograd_lays_it_out(tmp_path):
    """``q @ k.T``: ``k.T`` is a view laid out by columns, and autograd computes its gradient as the
    transposed product (``(g.T @ q).T``), so ``dk`` comes out in ``k``'s own layout and the steps
    after it read memory in order. The step-by-step backward printed ``q.T @ g``, whose transpose
    ``dk`` was laid out by columns: the elementwise steps after such a gradient took 1.4x
    autograd's time in a random layer at 1024 x 512."""
    from derive.codegen import render_steps
    from derive.layers import from_file
    from derive.verify import load_module

    spec = tmp_path / "spec.py"
    spec.write_text("import torch\nfrom derive import Tensor, layer\n\n\n"
                    "@layer(q=Tensor(\"n\", \"d\"), k=Tensor(\"m\", \"d\"), v=Tensor(\"n\", \"m\"))\n"
                    "def scores(q, k, v):\n    s = (q @ k.T) * v\n    u = (s * s).T\n    return u @ q\n")
    (layer,) = from_file(str(spec))
    path = tmp_path / "scores_steps.py"
    path.write_text(render_steps(trace(layer)))
    module = load_module(path)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 4), (5, 4), (6, 5)))
    out, cache = module.forward(q, k, v)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = module.backward(cache, upstream)
    # each gradient is laid out as its value is (``dt1`` of ``t1 = k.T`` by columns, ``dk`` in order)
    values = {**cache, "q": q, "k": k, "v": v}
    assert all(g.stride() == values[name[1:]].stride() for name, g in grads.items()), \
        {name: (g.stride(), values[name[1:]].stride()) for name, g in grads.items()}
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(layer.fn(qs, ks, vs), (qs, ks, vs), upstream)
    for name, e in zip(("dq", "dk", "dv"), expected):
        torch.testing.assert_close(grads[name], e, rtol=1e-12, atol=1e-12)


def test_a_sum_spreads_its_gradient_as_a_view_and_a_row_maximum_scatters_it(tmp_path):
    """As in autograd's own backward of ``sum``, ``mean`` and ``max(dim)``: the gradient a sum or a
    mean gives its input is the upstream gradient expanded, a view (``torch.ones_like(x) * g``
    wrote an n x k tensor, and the random layers' step-by-step kernels took up to 1.8x autograd's
    time), and a maximum's gradient is added at the index ``max`` returns (one ``scatter_add``, not
    a full-size select and sum), to the first of tied entries as autograd does."""
    layer, module = steps_module(tmp_path, "shifted", "import torch\nfrom derive import Tensor, layer\n\n\n"
                                 "@layer(x=Tensor('n', 'k'))\n"
                                 "def shifted(x):\n"
                                 "    m = x.max(1, keepdim=True).values\n"
                                 "    e = (x - m).exp()\n"
                                 "    p = e / e.sum(1, keepdim=True)\n"
                                 "    return (p * x).sum() + e.mean(0).sum()\n\n\n"
                                 "shifted.fused = False\n")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (16, 5), generator=g).to(torch.float64)  # small integers: rows with tied maxima
    assert ((x == x.max(1, keepdim=True).values).sum(1) > 1).any()
    out, cache = module.forward(x)
    grads = module.backward(cache)
    assert any(0 in t.stride() for t in grads.values()), {name: t.stride() for name, t in grads.items()}
    steps = [line for line in open(module.__file__).read().splitlines() if "# grad of: " in line]
    assert steps and not any("ones_like(" in line for line in steps)
    assert any(".scatter_add(1, x.max(1, keepdim=True).indices" in line for line in steps)
    leaf = x.clone().requires_grad_()
    layer.fn(leaf).backward()
    torch.testing.assert_close(grads["dx"], leaf.grad, rtol=1e-13, atol=1e-13)
    assert torch.equal(module.shifted(x.clone().requires_grad_()).detach(), layer.fn(x))


def test_a_variances_steps_are_not_computed_where_nothing_reads_them(tmp_path):
    """``x.var(0)`` is traced as its steps (mean, centred values, squares, their sum) and computed
    with ``torch.var``. The backward reads the centred values only: the squares and their sum were
    two passes over memory the spec does not make; they are left out, the gradient unchanged."""
    layer, module = steps_module(tmp_path, "spread", "import torch\nfrom derive import Tensor, layer\n\n\n"
                                 "@layer(x=Tensor('n', 'k'))\n"
                                 "def spread(x):\n"
                                 "    v = torch.tanh(x).var(0, unbiased=False)\n"
                                 "    return (v * v).sum()\n\n\n"
                                 "spread.fused = False\n")
    source = open(module.__file__).read()
    forward = source[source.index("def forward("):source.index("def backward(")]
    # the line's steps: the tanh, the mean, the centred values and torch.var itself
    steps = [line for line in forward.splitlines() if "# spec line 7:" in line]
    assert len(steps) == 4 and not any("**2" in line or ".sum(" in line for line in steps), forward
    x = torch.randn(32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, cache = module.forward(x)
    assert torch.equal(out, layer.fn(x))
    leaf = x.clone().requires_grad_()
    layer.fn(leaf).backward()
    torch.testing.assert_close(module.backward(cache)["dx"], leaf.grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(module.spread, (x.clone().requires_grad_(),))


class _FullSizeOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The operations that made a tensor of ``numel`` elements, by name."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.names = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.numel() == self.numel
               for t in (out if isinstance(out, (tuple, list)) else [out])):
            self.names.append(func.__name__.split(".")[0])
        return out


def test_a_negated_gradient_is_summed_then_negated_and_a_relu_s_is_autograd_s_kernel(tmp_path):
    """The gradient ``x - m`` sends ``m`` is ``-g`` summed: printed ``(-g).sum(0)`` it negated every
    entry first, a full-size pass autograd's backward does not make (it negates the sum), in every
    step-by-step kernel of a centred value; the sum of the negation is the negation of the sum,
    exactly. A ReLU's gradient was ``torch.where(x > 0, g, 0)``, twenty times the time of autograd's
    ``threshold_backward(g, out, 0)`` on this CPU, and 0 where ``x`` is NaN (autograd's: ``g``)."""
    layer, module = steps_module(tmp_path, "centred_units", "import torch\nfrom derive import Tensor, layer\n\n\n"
                                 "@layer(x=Tensor('n', 'k'), w=Tensor('k'))\n"
                                 "def centred_units(x, w):\n"
                                 "    c = x - x.mean(0, keepdim=True)\n"
                                 "    return torch.relu(c * w - (x * w).sum(1, keepdim=True))\n\n\n"
                                 "centred_units.fused = False\n")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x[3, 2] = float("nan")  # a NaN through the ReLU: its row's outputs are NaN, their gradients autograd's
    out, cache = module.forward(x, w)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    with _FullSizeOps(x.numel()) as ops:
        grads = module.backward(cache, upstream)
    assert "neg" not in ops.names and "where" not in ops.names, ops.names
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    layer.fn(*leaves).backward(upstream)
    for name, leaf in zip(("dx", "dw"), leaves):
        torch.testing.assert_close(grads[name], leaf.grad, rtol=1e-13, atol=1e-13, equal_nan=True)


class _LiveGradients(torch.utils._python_dispatch.TorchDispatchMode):
    """The most tensors of ``numel`` elements that operations made and that are alive at once."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.alive, self.most = numel, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                self.alive.append(weakref.ref(t))
        self.alive = [r for r in self.alive if r() is not None]
        self.most = max(self.most, len(self.alive))
        return out


def test_the_functions_let_each_intermediate_gradient_go_after_its_last_use():
    """``backward`` returns every intermediate gradient (the exercise's table), so each lives to its
    end; the Functions run the same lines and let each go once read for the last time, as autograd
    does. Kept to the end, makemore's gradients held the whole chain's memory at once, and the
    allocator took its pages from the system again every call (a step-by-step kernel read 1.4x
    autograd's time, 1.15x without them; sys time, page faults). The gradients are the same."""
    from derive.codegen import _freeing

    assert _freeing(["dh = dout * w", "dh = dh + dout", "dx = dh * 2", "dw = (dout * h).sum(0)"], {"dx", "dw"}) \
        == ["dh = dout * w", "dh = dh + dout", "dx = dh * 2", "del dh", "dw = (dout * h).sum(0)"]
    module = steps(makemore_mlp)
    inputs = random_inputs(makemore_mlp, EXERCISE_SIZES, torch.float64, seed=3)
    out, cache = module.forward(**inputs)
    upstream = upstream_for(out, 3)
    full = cache["hpreact"].numel()
    with _LiveGradients(full) as kept:
        grads = module.backward(cache, upstream)
    with _LiveGradients(full) as freed:
        ours = module._input_grads(cache, upstream)
    assert freed.most < kept.most, (freed.most, kept.most)
    expected = [grads[f"d{k}"] if k in makemore_mlp.differentiable else None for k in makemore_mlp.inputs]
    for a, b in zip(ours, expected):
        assert (a is None and b is None) or torch.equal(a, b)
