"""The committed generated Functions on the inputs users actually pass: low precision, strided views,
degenerate batches, and inputs that must be refused with a message naming the layer and the problem."""
import importlib

import pytest
import torch

from derive.layers import BUILTIN, FUSED, batchnorm, batchnorm_biased, cross_entropy
from derive.verify import random_inputs, upstream_for

# The step-by-step Functions of the small layers (the models are covered by their own tests).
STEPS = [layer for layer in BUILTIN if layer.name not in ("makemore_mlp", "makemore_model")]


def fused(layer):
    return getattr(importlib.import_module(f"generated.{layer.name}"), layer.name)


def steps(layer):
    return getattr(importlib.import_module(f"generated.{layer.name}_steps"), layer.name)


def grads(fn, inputs: dict, wanted: list[str], dtype=None, seed: int = 0):
    """Output and gradients of ``fn`` (inputs cast to ``dtype``), upstream as in the exercise."""
    leaves = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()).requires_grad_(k in wanted)
              if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = fn(**leaves)
    upstream = upstream_for(out, seed).to(out.dtype)
    return out.detach(), dict(zip(wanted, torch.autograd.grad(out, [leaves[k] for k in wanted], upstream)))


def sizes_of(layer, base=6):
    return {d: base + k for k, d in enumerate(layer.dims)}


# -- bfloat16 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [fused, steps], ids=["fused", "steps"])
@pytest.mark.parametrize("layer", FUSED, ids=lambda s: s.name)
def test_bfloat16_is_as_accurate_as_autograd_in_bfloat16(layer, fn):
    """Against a float64 reference, the generated bfloat16 result errs no more than autograd's own
    bfloat16 chain through the spec (3x slack, plus bfloat16's resolution near 1)."""
    inputs = random_inputs(layer, sizes_of(layer, 8), torch.float64, seed=4)
    wanted = layer.differentiable
    exact_out, exact = grads(layer.fn, inputs, wanted)
    ref_out, ref = grads(layer.fn, inputs, wanted, torch.bfloat16)
    out, ours = grads(fn(layer), inputs, wanted, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in ours.values())
    pairs = [("output", out, ref_out, exact_out)] + [(f"d{k}", ours[k], ref[k], exact[k]) for k in wanted]
    for name, mine, theirs, truth in pairs:
        scale = float(truth.abs().max())
        mine_error = float((mine.double() - truth).abs().max())
        their_error = float((theirs.double() - truth).abs().max())
        assert mine_error <= 3 * their_error + 2**-8 * scale, (layer.name, name, mine_error, their_error)


# -- strided inputs --------------------------------------------------------------------------------
def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view: a transpose for a matrix (unless an axis has size 1,
    which makes the transpose contiguous again), every other element otherwise."""
    view = t.T.contiguous().T if t.dim() == 2 else t
    if view.is_contiguous():
        view = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


FUNCTIONS = [(layer, fn) for layer in STEPS for fn in ([fused, steps] if layer.fused else [steps])]


@pytest.mark.parametrize("layer, fn", FUNCTIONS, ids=lambda v: getattr(v, "name", getattr(v, "__name__", "")))
def test_non_contiguous_inputs_give_the_contiguous_results(layer, fn):
    inputs = random_inputs(layer, sizes_of(layer), torch.float64, seed=5)
    wanted = layer.differentiable
    out, g = grads(fn(layer), inputs, wanted)
    views = {k: strided(v) if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items()}
    try:
        layer.fn(**views)
    except RuntimeError as e:
        # the spec itself cannot run on these views (embedding: .view of a strided lookup); the
        # generated code, which replays the spec's lines, fails the same way, not with another error
        with pytest.raises(RuntimeError, match=str(e).split(" (")[0][:40]):
            grads(fn(layer), views, wanted)
        return
    out_strided, g_strided = grads(fn(layer), views, wanted)
    assert torch.allclose(out, out_strided, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(g[k], g_strided[k], rtol=1e-12, atol=1e-12) for k in wanted)


def test_strided_float_inputs_with_contiguous_labels_run_everywhere():
    from derive.layers import embedding
    inputs = random_inputs(embedding, {"v": 5, "e": 3, "n": 4, "t": 2}, torch.float64, seed=5)
    out = steps(embedding)(strided(inputs["C"]).requires_grad_(), inputs["X"])
    reference = embedding.fn(inputs["C"], inputs["X"])
    assert torch.equal(out.detach(), reference)


# -- degenerate batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [batchnorm, batchnorm_biased], ids=lambda s: s.name)
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_a_constant_column_and_a_tiny_eps_match_autograd(layer, eps):
    """A column with zero variance divides by sqrt(eps) only: finite, and what autograd computes."""
    inputs = random_inputs(layer, {"n": 7, "d": 4}, torch.float64, seed=6)
    inputs["x"][:, 1] = 0.25
    inputs["eps"] = eps
    wanted = layer.differentiable
    ref_out, ref = grads(layer.fn, inputs, wanted)
    out, ours = grads(fused(layer), inputs, wanted)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in ours.values())
    assert torch.allclose(out, ref_out, rtol=1e-9, atol=1e-9)
    for k in wanted:
        scale = 1.0 + float(ref[k].abs().max())
        assert torch.allclose(ours[k], ref[k], rtol=1e-7, atol=1e-9 * scale), (k, float((ours[k] - ref[k]).abs().max()))


# -- refused inputs: the fused and the step-by-step Function check alike -------------------------
BOTH = pytest.mark.parametrize("fn", [fused, steps], ids=["fused", "steps"])


@BOTH
def test_a_wrong_rank_is_refused_before_its_sizes_are_read(fn):
    with pytest.raises(ValueError, match=r"batchnorm: x must have 2 dimension\(s\) \(n, d\), got shape \(2, 3, 4\)"):
        fn(batchnorm)(torch.randn(2, 3, 4), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"cross_entropy: y must have 1 dimension\(s\) \(n\), got shape \(3, 1\)"):
        fn(cross_entropy)(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long))


@BOTH
def test_mismatched_devices_are_refused(fn):
    # the meta device stands in for a second device on a CPU-only machine
    with pytest.raises(ValueError, match=r"batchnorm: gamma is torch.float32 on meta but x is torch.float32 on cpu; "
                                         r"move them to one dtype and device"):
        fn(batchnorm)(torch.randn(4, 3), torch.ones(3, device="meta"), torch.zeros(3))


@BOTH
def test_mismatched_dtypes_are_refused(fn):
    with pytest.raises(ValueError, match=r"batchnorm: gamma is torch.float64 on cpu but x is torch.float32 on cpu"):
        fn(batchnorm)(torch.randn(4, 3), torch.ones(3, dtype=torch.float64), torch.zeros(3))


@BOTH
def test_an_integer_tensor_where_a_float_is_declared_is_refused(fn):
    with pytest.raises(ValueError, match=r"cross_entropy: logits must be a floating-point tensor, got torch.int64"):
        fn(cross_entropy)(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


@BOTH
def test_float_labels_are_refused_even_when_they_ask_for_a_gradient(fn):
    # integer tensors cannot require grad in torch; float labels can, and must be refused
    labels = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match=r"cross_entropy: labels y must be an integer tensor, got torch.float32"):
        fn(cross_entropy)(torch.randn(3, 4, requires_grad=True), labels)


@BOTH
def test_labels_out_of_range_are_refused(fn):
    with pytest.raises(ValueError, match=r"cross_entropy: labels y must lie in \[0, k\) = \[0, 4\), got values in \[0, 4\]"):
        fn(cross_entropy)(torch.randn(3, 4), torch.tensor([0, 4, 1]))


@BOTH
def test_one_row_under_bessels_correction_is_refused(fn):
    with pytest.raises(ValueError, match=r"batchnorm: the formula divides by n - 1, which is 0 for these sizes \(n=1\)"):
        fn(batchnorm)(torch.randn(1, 3), torch.ones(3), torch.zeros(3))


@BOTH
def test_eps_is_a_constant_of_the_call(fn):
    """eps given at the call is the eps computed with: the spec's value at that eps, not at the default."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.05  # a variance near eps: eps shows
    gamma, beta = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    ours = fn(batchnorm)(x, gamma, beta, 1e-2)
    torch.testing.assert_close(ours, batchnorm.fn(x, gamma, beta, 1e-2))
    assert not torch.allclose(ours, fn(batchnorm)(x, gamma, beta))
