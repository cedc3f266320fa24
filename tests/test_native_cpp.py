"""The C++ kernels printed from the kernel plan (``derive generate --backend cpp``).

The built-ins' extension (generated/native/*.cpp) is built once for the session (cached under the
hash of its sources, in ``DERIVE_NATIVE_CACHE`` when set), and every test below uses it.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from derive import native
from derive.layers import FUSED
from derive.plan import COL, FULL, ROW, Program, lower
from derive.kernel import build_cached
from derive.cpp import _accumulator
from derive.select import fused_kernel
from derive.stages import Product, Staged

ROOT = Path(__file__).resolve().parent.parent
LOWERED = [layer for layer in FUSED if (ROOT / "generated" / f"{layer.name}_cpp.py").exists()]


def cpp_module(name):
    return importlib.import_module(f"generated.{name}_cpp")


def test_every_fused_builtin_has_a_cpp_kernel():
    """Every built-in fused layer has generated/<name>_cpp.py: the plan lowers it over one frame, or,
    with matrix products (linear, attention), as stages of ``at::mm`` and loop programs."""
    missing = {layer.name: native.lowered(fused_kernel(layer)).reason for layer in FUSED if layer not in LOWERED}
    assert not missing
    assert all(native.lowered(fused_kernel(layer)).reason == "" for layer in FUSED)
    staged = {layer.name for layer in FUSED if isinstance(native.lowered(fused_kernel(layer)).plan.forward, Staged)}
    assert staged == {"linear", "attention"}


def test_the_stages_of_linear_and_attention():
    """A matrix product is one ``at::mm`` of stored tensors, a transposed view where the stored order
    asks for it; a value that is a product times a number is the product, scaled; the rest is loops
    over a frame of its own (attention's softmax and its backward over (n, m), linear's bias)."""
    by_name = {layer.name: layer for layer in FUSED}
    linear = native.lowered(fused_kernel(by_name["linear"])).plan
    [product, bias] = linear.forward.steps
    assert (product.left, product.left_t, product.right, product.right_t, product.over) == ("x", False, "W", False, "i")
    assert bias.frame == ["n", "o"] and [t.name for t, _ in bias.outputs] == ["out"]
    products = {s.name: s for s in linear.backward.steps if isinstance(s, Product)}
    assert (products["dx"].right, products["dx"].right_t) == ("W", True)
    assert (products["dW"].left, products["dW"].left_t, products["dW"].dims) == ("x", True, ("i", "o"))
    [db] = [s for s in linear.backward.steps if isinstance(s, Program)]
    assert [v.name for v in db.sweeps[0].loops[0].col_reductions] == ["sum_dout"] and linear.saved == []

    attention = native.lowered(fused_kernel(by_name["attention"])).plan
    kinds = [type(s).__name__ for s in attention.forward.steps]
    assert kinds == ["Product", "Program", "Product"], kinds
    scores, softmax, out = attention.forward.steps
    assert (scores.right, scores.right_t) == ("k", True) and out.name == "out" and out.left == "probs"
    assert [len(loop.row_reductions) for loop in softmax.sweeps[0].loops] == [1, 1, 0]  # max, sum, probs
    assert [n for n, _ in attention.saved] == ["probs"]
    products = {s.name: s for s in attention.backward.steps if isinstance(s, Product)}
    assert set(products) == {"dprobs", "dq", "dk", "dv"}
    assert str(products["dq"].scale) == "1/sqrt(d)" and products["dk"].left_t and products["dv"].left == "probs"
    text = "\n".join(native.plan_lines(attention))
    assert "product dk = dt2.T @ q times 1/sqrt(d) (at::mm: the sum over n)" in text, text


def test_a_sum_of_terms_one_of_them_constant_is_no_product(tmp_path):
    """A random layer of the soak: a sum over ``k`` whose body has a term without ``k`` (the sum is
    that term times ``k``, no sum at all) stopped the search for matrix products with an
    AttributeError, and ``derive generate`` with it. Now the plan gives its reason in one line."""
    from derive.layers import from_file
    from derive.select import chosen

    spec = tmp_path / "soaked.py"
    spec.write_text('''import torch
from derive import Constant, Tensor, layer


@layer(x=Tensor("n", "k"), b=Tensor("n", "1"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"),
       p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75))
def soaked(x, b, u, A, p, eps=0.001, scale=0.75):
    v1 = x.sum(dim=(0, 1), keepdim=True)
    v2 = torch.minimum(v1, x)
    v3 = A.max(1, keepdim=True).values
    v4 = A - v3
    v7 = v4 - v4.exp().sum(1, keepdim=True).log()
    return torch.tanh(torch.minimum(v2, x))
''')
    (layer,) = from_file(str(spec))
    choice = chosen(layer)
    assert choice.fused, choice.reason
    result = native.lowered(choice.kernel)  # no matrix product: the plan over one frame's reason
    assert result.plan is None and result.reason == "A is stored across the frame's order of axes", result


def test_a_saturated_softmax_in_cpp_is_one_hot_as_in_autograd():
    """At scores hundreds apart the softmax of attention is one-hot and its gradient 0 in float32
    autograd. The loops compute ``s*x`` in the pass that finds the maximum and ``s*x - max`` in the
    next: fused into an FMA there only (the compiler's default), the maximum's entry was exp(3e-4),
    and dq off by 3e-3; compiled with -ffp-contract=off, as autograd's."""
    module = cpp_module("attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64) * 100 for shape in ((7, 9), (11, 9), (11, 13)))
    dout = torch.randn(7, 13, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn(*xs).backward(dout.to(dtype))
        return [x.grad.double() for x in xs]

    spec = next(x for x in FUSED if x.name == "attention").fn
    reference, autograd, cpp = grads(spec, torch.float64), grads(spec, torch.float32), grads(module.attention, torch.float32)
    for r, a, c in zip(reference, autograd, cpp):
        assert (c - r).abs().max() <= 4 * (a - r).abs().max() + 1e-30
    saturated = autograd[0].abs().amax(1) == 0  # rows of dq autograd gets exactly 0: a one-hot softmax
    assert saturated.sum() >= 3 and (cpp[0][saturated] == 0).all()


@pytest.mark.parametrize("layer", LOWERED, ids=lambda layer: layer.name)
def test_cpp_kernel_passes_the_battery(layer):
    verdict = native.check_module(layer, cpp_module(layer.name), "cpp")
    assert verdict.startswith("battery passed"), verdict


def test_the_plan_of_batchnorm_and_cross_entropy():
    """Batchnorm: the column statistics take one sweep (the mean, and the squared deviations as a
    sum shifted by each column's first row, in double: never E[x^2] - E[x]^2), per-column values
    are saved and the normalized values recomputed.
    Cross-entropy: one sweep, two passes over each row, nothing full-size saved, and the label's
    column written by a per-row fix-up."""
    by_name = {layer.name: layer for layer in FUSED}
    bn = lower(build_cached(by_name["batchnorm_biased"]))
    assert len(bn.forward.sweeps) == 2 and len(bn.backward.sweeps) == 2
    [shifted] = [v for v in bn.forward.sweeps[0].loops[0].col_reductions if v.wide]
    assert bn.forward.values["sum_bndiff"].shifted is not None and not bn.forward.values["sum_bndiff"].reduce
    assert "then sum_bndiff = sum over rows of bndiff**2, from those sums" in " ".join(bn.forward.summary())
    assert "(x - x[0])**2" in " ".join(bn.forward.summary()), shifted
    assert all(layout == COL for _, layout in bn.saved) and "bnraw" in bn.recomputed
    ce = lower(build_cached(by_name["cross_entropy"]))
    assert len(ce.forward.sweeps) == 1 and len(ce.forward.sweeps[0].loops) == 2
    assert all(layout == ROW for _, layout in ce.saved) and "probs" in ce.recomputed
    [loop] = ce.backward.sweeps[0].loops
    assert [step.kind for step in loop.after] == ["fixup"] and FULL not in {layout for _, layout in ce.saved}


def test_the_plan_of_a_frame_of_three_axes():
    """batchnorm3d, x (n, c, l): the rows are (n, c) flattened and the columns l. Each statistic per
    channel is a sum over l in a pass over each row, then those per-row sums added per chunk of rows
    into a per-channel partial: one sweep each (the mean, then the squared deviations), and the
    values saved for the backward vary on c alone."""
    by_name = {layer.name: layer for layer in FUSED}
    plan = lower(build_cached(by_name["batchnorm3d"]))
    assert plan.forward.ndim == 3 and len(plan.forward.sweeps) == 3 and len(plan.backward.sweeps) == 2
    channel = frozenset({1})
    assert plan.saved and all(layout == channel for _, layout in plan.saved), plan.saved
    first = plan.forward.sweeps[0]
    [loop] = first.loops
    assert [v.layout for v in loop.row_reductions] == [frozenset({0, 1})]
    assert [(s.kind, s.value.layout) for s in loop.after if s.kind == "accumulate"] == [("accumulate", channel)]


def test_an_output_the_backward_reads_is_saved_not_recomputed():
    """The forward writes its output anyway: tanh's and sigmoid's backward read it (as autograd's do)
    rather than evaluating the function again; softplus's reads x, so nothing is saved."""
    by_name = {layer.name: layer for layer in FUSED}
    for name in ("tanh", "sigmoid"):
        plan = lower(build_cached(by_name[name]))
        assert plan.saved == [("out", FULL)] and plan.recomputed == [], (name, plan.saved, plan.recomputed)
    assert lower(build_cached(by_name["softplus"])).saved == []


@pytest.mark.parametrize("name", ["batchnorm_biased", "cross_entropy", "batchnorm3d"])
def test_the_result_does_not_depend_on_the_thread_count(name):
    layer = next(x for x in FUSED if x.name == name)
    from derive.verify import random_inputs

    # chunks of 33 rows, 1,221 entries: a thread takes 26 chunks (GRAIN_SIZE entries), so two threads share them
    inputs = random_inputs(layer, {d: 2051 if k == 0 else 37 for k, d in enumerate(layer.dims)}, torch.float32, seed=3)
    fn = getattr(cpp_module(name), name)
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = {k: v.clone().requires_grad_(k in layer.differentiable) if v.is_floating_point() else v
                      for k, v in inputs.items() if torch.is_tensor(v)}
            out = fn(**leaves)
            grads = torch.autograd.grad(out, [leaves[k] for k in layer.differentiable], torch.ones_like(out))
            results.append([out, *grads])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_sweeps_that_only_add_up_columns_sum_blocks_of_rows_in_registers():
    """A sweep whose passes only add up columns over the rows (batchnorm's statistics, forward and
    backward) takes a block of rows per vector of columns before one update of the partial sums; a
    sweep writing a full-size output, reducing rows, or of a frame of three axes does not, and a
    row's reductions get independent accumulators only in a pass that does little else."""
    from derive.cpp import LANES, program_context

    by_name = {layer.name: layer for layer in FUSED}

    def contexts(name):
        kernel = build_cached(by_name[name])
        plan = lower(kernel)
        return [program_context(p, plan, kernel) for p in (plan.forward, plan.backward)]

    forward, backward = contexts("batchnorm_biased")
    assert [s["blocked"] for s in forward["sweeps"]] == [True, False]
    assert [s["blocked"] for s in backward["sweeps"]] == [True, False]
    body = " ".join(forward["sweeps"][0]["loops"][0]["body"])
    assert "block_sum_x.add(" in body and "__builtin_prefetch(l_p_x + (row + derive_block_rows)*" in body
    assert "block_sum_x.add_to(l_part_sum_x" in " ".join(forward["sweeps"][0]["loops"][0]["flush"])
    ce_forward, ce_backward = contexts("cross_entropy")
    assert not any(s["blocked"] for p in (ce_forward, ce_backward) for s in p["sweeps"])
    assert [lp["lanes"] for lp in ce_forward["sweeps"][0]["loops"]] == [LANES, LANES]
    assert [lp["lanes"] for lp in ce_backward["sweeps"][0]["loops"]] == [1]
    ln_backward = contexts("layernorm")[1]
    assert not ln_backward["sweeps"][0]["blocked"] and ln_backward["sweeps"][0]["loops"][0]["lanes"] == 1
    assert not any(s["blocked"] for p in contexts("batchnorm3d") for s in p["sweeps"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["batchnorm_biased", "cross_entropy", "layernorm", "rmsnorm"])
def test_long_rows_and_chunks_take_every_path_of_the_loops(name, dtype):
    """The battery's rows are short (13 columns) and its chunks of rows shorter than a block: here
    150 columns (groups of LANES vectors, then single vectors, then a tail) and 773 rows (chunks of
    13 rows: a full block of rows and a partial one), against the eager kernel in float64 (a lane,
    row or block left out or counted twice is an error of the order of the values)."""
    layer = next(x for x in FUSED if x.name == name)
    from derive.verify import random_inputs

    inputs = random_inputs(layer, {d: 773 if k == 0 else 150 for k, d in enumerate(layer.dims)}, torch.float64, seed=8)
    inputs = {k: v * 3 + 2 if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}

    def run(f, dtype):
        leaves = {k: v.to(dtype).requires_grad_(k in layer.differentiable) if v.is_floating_point() else v
                  for k, v in inputs.items() if torch.is_tensor(v)}
        out = f(**leaves)
        upstream = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
        return [x.detach().double() for x in
                [out, *torch.autograd.grad(out, [leaves[k] for k in layer.differentiable], upstream)]]

    eager = getattr(importlib.import_module(f"generated.{name}"), name)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in zip(run(getattr(cpp_module(name), name), dtype), run(eager, torch.float64)):
        assert torch.allclose(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max())), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rows_maximum_sees_every_lane(dtype):
    """The row's maximum is taken in independent accumulators and combined: a largest value, or a
    NaN (which wins, as in torch's max), in any vector of a row of 150 columns (each accumulator of
    the groups, the single vectors after them, the tail) is the row's saved maximum. The fast
    maximum leaves NaN aside and a probe sum finds it (``DeriveRowMax``): a NaN beside infinities, and
    infinities of both signs without a NaN (the probe NaN, the row's maximum run again) give what
    torch's max gives."""
    module = cpp_module("cross_entropy").native_module()
    big = torch.finfo(dtype).max
    for column in range(150):
        logits = torch.randn(8, 150, dtype=dtype)
        logits[1, column] = 50.0
        logits[2, column] = float("nan")
        logits[3, column], logits[3, (column + 17) % 150] = float("inf"), float("-inf")
        logits[4, column], logits[4, (column + 16) % 150] = float("nan"), float("inf")
        logits[5, column] = float("-inf")
        logits[6] = -big  # the probe's sums overflow to -inf, no NaN
        logits[6, column] = big
        logits[7] = float("-inf")
        _, maxes, _ = module.cross_entropy_forward(logits, torch.zeros(8, dtype=torch.long), 8, 150)
        expected = logits.max(1).values.to(maxes.dtype)
        assert torch.equal(maxes.isnan(), expected.isnan()), column
        assert torch.equal(maxes[~expected.isnan()], expected[~expected.isnan()]), column
        assert maxes[1] == 50.0 and torch.isnan(maxes[2]) and maxes[3] == float("inf") and torch.isnan(maxes[4]), column


def test_a_sum_of_exponentials_adds_pairs_in_float_and_loses_at_most_half_an_ulp():
    """A sum whose terms cannot be negative adds its float vectors in pairs before widening them
    (``PairedLanes``): one rounding a pair, so the row's sum is within half an ulp (2**-24,
    relative) of the same terms added in double, at every row length (a float sum of the row would
    drift with it: about 1e-5 at 32,000 columns). The sums of signed terms stay in double."""
    module = cpp_module("cross_entropy").native_module()
    for k in (1, 15, 16, 17, 33, 150, 4096, 32000):
        for seed in range(3):
            logits = torch.randn(4, k, generator=torch.Generator().manual_seed(1000 * k + seed)) * 4
            logits[3] = torch.linspace(-90, 10, k)  # terms from 1 down to the subnormals
            _, maxes, sums = module.cross_entropy_forward(logits, torch.zeros(4, dtype=torch.long), 4, k)
            # the kernel's own terms: torch's vectorized float exp, which also computes the kernel's
            # partial vector at a row's end. Unpadded, torch computes its buffer's last entries with
            # the scalar exp, whose bits differ by an ulp (the sum was then 1.02 half-ulps off at
            # k = 33); padded with -inf (terms of 0) to whole vectors, every entry is a vector lane
            width = -(-k // 64) * 64
            shifted = torch.full((4, width), -float("inf"))
            shifted[:, :k] = logits - maxes.float()[:, None]
            exact = torch.exp(shifted).double().sum(1)
            assert ((sums - exact).abs() / exact).max() <= 2.0 ** -24, (k, seed)
    plan = native.lowered(fused_kernel(next(layer for layer in FUSED if layer.name == "layernorm"))).plan
    accumulators = {v.name: _accumulator(v, plan.forward.values, plan.forward) for v in plan.forward.values.values()
                    if v.reduce == "sum"}
    assert accumulators == {"sum_x": "DoubleLanes", "sum_xc": "PairedLanes"}


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_ignore"])
def test_a_label_outside_the_classes_is_refused_by_the_loops_themselves(name):
    """With the wrapper's checks switched off (``check_inputs(False)``, a trusted training loop) a
    label outside [0, k) would be a read and a write out of bounds in the loops: the kernel refuses
    it, naming the range and the values found; with the checks on, the eager kernel's one-line
    InputError comes first, as before."""
    module = cpp_module(name)
    logits = torch.randn(6, 5, requires_grad=True)
    fn = getattr(module, name)
    try:
        module.check_inputs(False)
        for labels, found in (([0, 1, 4, 2, 5, 3], r"\[0, 5\]"), ([0, -1, 4, 2, 1, 3], r"\[-1, 4\]")):
            with pytest.raises(IndexError, match=rf"{name}: labels y must lie in \[0, k\) = \[0, 5\), got values in {found}"):
                fn(logits, torch.tensor(labels))
        assert torch.isfinite(fn(logits, torch.tensor([0, 1, 4, 2, 4, 3])))
    finally:
        module.check_inputs(True)
    with pytest.raises(module._eager().InputError, match="labels y must lie in"):
        fn(logits, torch.tensor([0, 1, 4, 2, 5, 3]))


@pytest.mark.parametrize("name", ["batchnorm_biased", "layernorm", "batchnorm3d"])
def test_partial_sums_kept_between_calls_start_afresh(name):
    """The partial sums' buffers (``derive_scratch``) outlive a call and hold the largest size seen:
    after a larger call, a smaller one must give what it gives in a fresh process, the eager
    kernel's result within float32 rounding, and the same bits twice."""
    layer = next(x for x in FUSED if x.name == name)
    from derive.verify import random_inputs

    fn = getattr(cpp_module(name), name)
    eager = getattr(importlib.import_module(f"generated.{name}"), name)

    def run(f, inputs):
        leaves = {k: v.clone().requires_grad_(k in layer.differentiable) if v.is_floating_point() else v
                  for k, v in inputs.items() if torch.is_tensor(v)}
        out = f(**leaves)
        return [out, *torch.autograd.grad(out, [leaves[k] for k in layer.differentiable], torch.ones_like(out))]

    small = random_inputs(layer, {d: 7 if k == 0 else 5 for k, d in enumerate(layer.dims)}, torch.float64, seed=5)
    large = random_inputs(layer, {d: 300 if k == 0 else 41 for k, d in enumerate(layer.dims)}, torch.float64, seed=6)
    large = {k: v * 1e3 + 1e4 if torch.is_tensor(v) and v.is_floating_point() else v for k, v in large.items()}
    first = run(fn, small)
    run(fn, large)
    again = run(fn, small)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(again, run(eager, small)))


SPREAD_LAYERS = '''
import torch
from derive import Constant, Tensor, layer


@layer(x=Tensor("n", "d"), w=Tensor("d"), eps=Constant(1e-5, positive=True))
def weighted_standardize(x, w, eps=1e-5):
    mu = x.mean(0, keepdim=True)
    xc = x - mu
    var = (w * xc**2).mean(0, keepdim=True)
    out = xc / torch.sqrt(var + eps)
    return out


@layer(x=Tensor("n", "d"), eps=Constant(1e-5, positive=True))
def mean_abs_scale(x, eps=1e-5):
    mu = x.mean(0, keepdim=True)
    xc = x - mu
    mad = xc.abs().mean(0, keepdim=True)
    out = xc / (mad + eps)
    return out
'''


def test_shifted_sums_take_polynomials_of_the_mean_and_nothing_else(tmp_path):
    """A user's spread written their own way: a weighted sum of squared deviations is a polynomial
    in the mean, taken in the mean's sweep as one shifted sum (its first-order term read off the sum
    of ``x``: ``2*w*(x - x[0])`` is affine in ``x``); a mean absolute deviation is not a polynomial
    in the mean and keeps a sweep of its own."""
    from derive.layers import from_file

    spec = tmp_path / "spreads.py"
    spec.write_text(SPREAD_LAYERS)
    plans = {layer.name: lower(build_cached(layer)) for layer in from_file(str(spec))}
    weighted = plans["weighted_standardize"].forward
    assert len(weighted.sweeps) == 2
    assert [v.name for v in weighted.values.values() if v.wide] == ["shifted_sum_w_xc"]
    assert "w*(x - x[0])**2" in " ".join(weighted.summary())
    spread = plans["mean_abs_scale"].forward
    assert len(spread.sweeps) == 3
    assert not any(v.wide or v.shifted is not None for v in spread.values.values())


@pytest.mark.parametrize("name", ["batchnorm_biased", "batchnorm"])
def test_the_shifted_variance_keeps_a_first_row_far_from_the_mean(name):
    """The variance is summed around each column's first row in one sweep: with the first row 50
    deviations off a mean of 1e4, float32 inputs, its deviations squared in float32 would lose four
    digits to the shift (a sum of about n*2500 of which 1 is the variance); in double the inverse
    deviation the forward saves is exact to double rounding. An outlier elsewhere is no different."""
    generator = torch.Generator().manual_seed(0)
    n, d = 257, 9
    x = (1e4 + torch.randn(n, d, generator=generator, dtype=torch.float64)).float()
    x[0] += 50.0
    x[100, 3] -= 80.0
    gamma, beta = torch.ones(d), torch.zeros(d)
    module = cpp_module(name).native_module()
    _, inv_std, _ = getattr(module, f"{name}_forward")(x, gamma, beta, 1e-5, n, d)
    exact = x.double()
    var = exact.var(0, unbiased=name == "batchnorm")
    wanted = 1 / torch.sqrt(var + 1e-5)
    assert inv_std.dtype == torch.float64
    assert torch.allclose(inv_std, wanted, rtol=1e-10, atol=0)


def test_the_loops_run_on_torchs_threads():
    """``at::parallel_for`` is an OpenMP loop in torch's headers when torch's threads are OpenMP's:
    the extension must be compiled with OpenMP (it calls libgomp's parallel region), else every
    chunk of rows runs on one thread."""
    module = cpp_module("cross_entropy").native_module()
    binary = Path(module.__file__).read_bytes()
    assert ("OpenMP" in torch.__config__.parallel_info()) == (b"GOMP_parallel" in binary)


def test_strided_inputs_are_copied_and_other_dtypes_use_the_eager_kernel():
    from generated.batchnorm_biased import batchnorm_biased as eager

    fn = cpp_module("batchnorm_biased").batchnorm_biased
    x = torch.randn(12, 40, dtype=torch.float64).t()  # (40, 12), not contiguous
    gamma, beta = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    assert torch.allclose(fn(x, gamma, beta), eager(x.contiguous(), gamma, beta), atol=1e-12)
    half = [t.to(torch.bfloat16) for t in (x, gamma, beta)]
    assert torch.equal(fn(*half), eager(*half))


def test_second_derivative_runs_through_the_eager_backward():
    from generated.layernorm import layernorm as eager

    fn = cpp_module("layernorm").layernorm
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    gamma, beta = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    penalties = []
    for f in (fn, eager):
        (g,) = torch.autograd.grad((f(x, gamma, beta) ** 3).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(g.square().sum(), x)[0])
    assert torch.allclose(*penalties, atol=1e-10)


def test_the_build_is_keyed_by_its_whole_source():
    """The cached extension is found by a digest of everything compiled: a header or a binding of the
    loader changed is another build, not the old library loaded under the kernels' unchanged name."""
    module = cpp_module("cross_entropy")
    unity = module._extension_source()
    assert unity[0].startswith("#include") and unity[-1] == "}"
    assert any("cross_entropy_forward" in line for line in unity)
    name = module._extension_name(unity)
    assert name == module._extension_name(list(unity))
    assert name != module._extension_name(["#include <torch/extension.h>"] + unity[1:])
    assert name != module._extension_name(unity[:-2] + unity[-1:])  # one binding fewer


def test_without_a_compiler_the_eager_kernel_is_used_with_a_warning(tmp_path):
    """A machine without a working C++ compiler: one warning, and the eager kernel's values."""
    code = ("import torch, warnings\n"
            "from generated.cross_entropy_cpp import cross_entropy\n"
            "from generated.cross_entropy import cross_entropy as eager\n"
            "x = torch.randn(5, 7); y = torch.randint(0, 7, (5,))\n"
            "assert torch.equal(cross_entropy(x, y), eager(x, y))\n"
            "assert torch.equal(cross_entropy(x, y), eager(x, y))\n")
    env = {**os.environ, "DERIVE_NATIVE_CACHE": str(tmp_path), "CXX": "/bin/false"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("cannot be built here") == 1, run.stderr


USER_LAYERS = '''
import torch
from derive import Labels, Tensor, layer


@layer(x=Tensor("n", "d"), b=Tensor("d"))
def swish_scaled(x, b):
    out = x * torch.sigmoid(b * x)
    return out


@layer(x=Tensor("n", "d"), g=Tensor("d"))
def col_center(x, g):
    mu = x.mean(0, keepdim=True)
    out = (x - mu) * g
    return out


@layer(x=Tensor("n", "c", "l"), g=Tensor("c", "1"))
def channel_scale(x, g):
    out = x * g
    return out


@layer(x=Tensor("n", "i"), W=Tensor("i", "o"))
def project(x, W):
    out = x @ W
    return out


@layer(x=Tensor("b", "t", "c"), w=Tensor("b", "c", "s"))
def batched(x, w):
    out = x @ w
    return out


@layer(x=Tensor("n", "d"), s=Tensor("d"), W=Tensor("d", "o"))
def scaled_project(x, s, W):
    out = (x * s) @ W
    return out


@layer(x=Tensor("n", "i"), h=Tensor("n", "h"), wx=Tensor("i", "h"), wh=Tensor("h", "h"), b=Tensor("h"))
def rnn_cell(x, h, wx, wh, b):
    return torch.tanh(x @ wx + h @ wh + b)


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def clipped(x, w):
    c = x.clamp(min=-1.0, max=2.0)
    return torch.where(c > 0, c * w, 0.1 * c)


@layer(x=Tensor("n", "d"), c=Tensor("d"))
def tied(x, c):
    return torch.maximum(x, c) * torch.minimum(x, 2 * c)


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def functional_ce(logits, y):
    return torch.nn.functional.cross_entropy(logits, y)


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def focal(logits, y):
    logp = torch.nn.functional.log_softmax(logits, dim=-1)[torch.arange(logits.shape[0]), y]
    p = logp.exp()
    return (-(1 - p) ** 2 * logp).mean()
'''


def test_generate_backend_cpp_for_a_users_layers(tmp_path):
    """``derive generate --backend cpp`` on a user's spec file: a native kernel for each layer the plan
    lowers (checked and built once: a matrix product of a computed factor, a square weight ``(h, h)``
    beside an input named ``h``, ``clamp`` and ``torch.where``, ties of ``torch.maximum`` and ``minimum``, ``F.cross_entropy``, a log-softmax read at the labels), the reason for the one it does not, ``derive check`` passing,
    and the kernels matching the spec."""
    spec = tmp_path / "mylayers.py"
    spec.write_text(USER_LAYERS)
    out = tmp_path / "gen"
    derive = [sys.executable, "-m", "derive"]
    run = subprocess.run(derive + ["generate", "--layer", str(spec), "--out", str(out), "--backend", "cpp", "--no-prove"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("swish_scaled", "col_center", "channel_scale", "project", "scaled_project", "rnn_cell",
                 "clipped", "tied", "functional_ce", "focal"):
        assert f"note: {name}: cpp kernel: battery passed" in run.stdout, run.stdout
        assert (out / f"{name}_cpp.py").exists() and (out / "native" / f"{name}.cpp").exists()
    assert "batched: cpp kernel: the kernel plan cannot lower it: a sum over c of factors on (b, s, t): " \
           "not a matrix product" in run.stdout, run.stdout
    assert not (out / "batched_cpp.py").exists()
    check = subprocess.run(derive + ["check", "--layer", str(spec), "--out", str(out), "--backend", "cpp"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr
    code = ("import torch, mylayers\nfrom gen.col_center_cpp import col_center\n"
            "x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True); g = torch.randn(4, dtype=torch.float64)\n"
            "a = col_center(x, g); (da,) = torch.autograd.grad(a.sum(), x)\n"
            "b = mylayers.col_center.fn(x, g); (db,) = torch.autograd.grad(b.sum(), x)\n"
            "assert torch.allclose(a, b, atol=1e-12) and torch.allclose(da, db, atol=1e-12)\n"
            # ties of maximum and minimum: half the gradient to each operand, as autograd splits it
            "from gen.tied_cpp import tied\n"
            "c = torch.tensor([1.0, -2.0, 0.5, 3.0]); x = torch.tensor([[1.0, -4.0, 0.25, 6.0], [2.0, -2.0, 1.0, -1.0]])\n"
            "ours = torch.autograd.grad(tied(x.requires_grad_(), c.requires_grad_()).sum(), [x, c])\n"
            "spec = torch.autograd.grad(mylayers.tied.fn(x, c).sum(), [x, c])\n"
            "assert all(torch.equal(a, b) for a, b in zip(ours, spec)), (ours, spec)\n")
    used = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert used.returncode == 0 and "cannot be built" not in used.stderr, used.stderr


def test_the_c_printers():
    """Sizes print as doubles (``n/(n - 1)`` is no integer division), literals in the kernel's dtype,
    transcendental functions as ATen's vector methods, a Kronecker delta as a comparison."""
    import sympy as sp

    from derive.cpp import Names, ScalarPrinter, VectorPrinter

    layer = next(x for x in FUSED if x.name == "batchnorm")
    kernel = build_cached(layer)
    names = Names(lower(kernel).backward, lower(kernel), kernel)
    n = next(s for s in kernel.graph.sizes.values() if str(s) == "n")
    i_n, i_d = names.frame
    x = sp.IndexedBase("x")[i_n, i_d]
    assert ScalarPrinter(names).doprint(n / (n - 1)) == \
        "static_cast<double>(sz_n)/(static_cast<double>(sz_n) - 1.0)"
    assert VectorPrinter(names).doprint(sp.exp(x) / 2) == \
        "(Vec(scalar_t(0.5)))*derive_exp(Vec::loadu(p_x + row*sz_d + col, cnt))"
    assert VectorPrinter(names).doprint(x ** -0.5) == "(Vec::loadu(p_x + row*sz_d + col, cnt)).rsqrt()"
    assert ScalarPrinter(names).doprint(sp.KroneckerDelta(i_d, 3)) == "((3.0) == (col) ? 1.0 : 0.0)"
    # q**(-3/2) multiplied as rsqrt(q)**3 (q**1.5 overflows float32 from q = 5e25), never divided by q**1.5
    load, y = "Vec::loadu(p_x + row*sz_d + col, cnt)", sp.IndexedBase("dout")[i_n, i_d]
    assert VectorPrinter(names).doprint(y * x ** sp.Rational(-3, 2)) == \
        f"(Vec::loadu(p_dout + row*sz_d + col, cnt))*(({load}).rsqrt()*({load}).rsqrt()*({load}).rsqrt())"
    assert "pow" not in ScalarPrinter(names).doprint(x ** -1.5) and "sqrt" in ScalarPrinter(names).doprint(x ** -1.5)
    # q**-2 multiplied as the reciprocal squared (q*q overflows float32 from q = 2e19, its reciprocal's
    # square is a subnormal there), never one reciprocal of the product
    assert VectorPrinter(names).doprint(y * x ** -2) == \
        f"(Vec::loadu(p_dout + row*sz_d + col, cnt))*(({load}).reciprocal()*({load}).reciprocal())"


EXP_CHECK = r"""
#include <ATen/cpu/vec/vec.h>
#include <cstdint>
#include <cstdio>
using at::vec::Vectorized;
DERIVE_EXP
// every float's bit pattern, a vector at a time: derive_exp against torch's Vectorized<float>::exp
// (lanes equal as bits, or NaN in both)
int main() {
  uint64_t differ = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i step = _mm512_set1_epi32(16);
  __m512i bits = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (uint64_t start = 0; start < (uint64_t(1) << 32); start += 16, bits = _mm512_add_epi32(bits, step)) {
    const Vectorized<float> x(_mm512_castsi512_ps(bits));
    const __m512 a = x.exp(), b = derive_exp(x);
    const __mmask16 same = _mm512_cmpeq_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(b));
    const __mmask16 nans = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    differ += __builtin_popcount(0xffffu & ~(same | nans));
  }
#else
  const __m256i step = _mm256_set1_epi32(8);
  __m256i bits = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (uint64_t start = 0; start < (uint64_t(1) << 32); start += 8, bits = _mm256_add_epi32(bits, step)) {
    const Vectorized<float> x(_mm256_castsi256_ps(bits));
    const __m256 a = x.exp(), b = derive_exp(x);
    const int same = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b))));
    const int nans = _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) & _mm256_movemask_ps(_mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    differ += __builtin_popcount(0xff & ~(same | nans));
  }
#endif
  std::printf("%llu\n", static_cast<unsigned long long>(differ));
}
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"), reason="derive_exp is exp itself here")
def test_the_kernels_exp_is_torchs_exp_for_every_float(tmp_path):
    """``derive_exp`` (SLEEF's algorithm inlined, float on AVX-512 and AVX2) as printed into the
    generated kernels gives the same bits as ``Vectorized<float>::exp`` for all 2^32 floats (NaN for
    NaN): the kernels' values do not depend on which of the two they call. Built with the flags of
    the extension itself (-ffp-contract=off included) against torch's headers and library."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_exp

    check = bench_exp.build(EXP_CHECK.replace("DERIVE_EXP", bench_exp.exp_source()), tmp_path)
    ran = subprocess.run([str(check)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.split() == ["0"], (ran.stdout, ran.stderr[-2000:])


def test_the_exp_benchmark_runs():
    """scripts/bench_exp.py: both exponentials timed, one line with their ratio."""
    import re

    ran = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_exp.py"), "--repeat", "3"],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    found = re.search(r"torch ([0-9.]+) ns/float, derive_exp ([0-9.]+) ns/float, derive_exp/torch ([0-9.]+)", ran.stdout)
    assert found and all(float(v) > 0 for v in found.groups()), ran.stdout


def test_the_all_layers_sweep_has_the_cpp_column(tmp_path):
    """scripts/bench_sweep.py: the C++ kernel timed beside the others where the plan lowers the
    layer (``linear`` too: its matrix products are stages of the plan)."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_sweep

    out, table = tmp_path / "sweep.json", tmp_path / "sweep.md"
    assert bench_sweep.main(["--sizes", "32x16", "--layers", "sigmoid,linear", "--repeat", "2", "--no-compile",
                             "--min-sample-ms", "1", "--json", str(out), "--markdown", str(table)]) == 0
    rows = {row["layer"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["sigmoid"]["columns"]["cpp"]["median_ms"] > 0 and rows["sigmoid"]["ratios"]["cpp_over_spec"]["median"] > 0
    assert rows["linear"]["columns"]["cpp"]["median_ms"] > 0 and rows["linear"]["ratios"]["cpp_over_spec"]["median"] > 0
    assert "| cpp ms |" in table.read_text() and "cpp/spec" in table.read_text()


def test_the_native_benchmark_runs(tmp_path):
    """scripts/bench_native.py at a small size: every column timed, the C++ kernel's float32 error
    no worse than a few times native's."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_native

    out = tmp_path / "bench.json"
    assert bench_native.main(["--sizes", "64x48", "--layers", "cross_entropy,batchnorm_biased", "--repeat", "2",
                              "--no-compile", "--no-build", "--steady-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert "freed memory kept in the process" in report["title"]
    assert {row["layer"] for row in rows} == {"cross_entropy", "batchnorm_biased"}
    for row in rows:
        assert all(ms > 0 for ms in row["ms"].values()) and set(row["ms"]) >= {"native", "spec", "generated", "cpp", "floor"}
        assert row["errors"]["cpp"] <= 4 * row["errors"]["native"] + 1e-6, row["errors"]
