"""Layers written the way users write them: maxima and minima (tests/specs/extrema_layers.py),
losses, normalizations and units written out (tests/specs/losses_and_units.py), and variances and
standard deviations (tests/specs/statistics_layers.py). Each layer gets a kernel that passes the
numerical battery, fused wherever a fused form passes, and matches autograd through its spec in
float64 at inputs where entries tie (small integers), where ``max(dim)`` routes the gradient to one
index, ``amax`` shares it, and masks and clamps sit on their bounds."""
import ast
from pathlib import Path

import pytest
import torch

from derive import Labels, battery
from derive.generate import render_kernel
from derive.layers import from_file
from derive.select import chosen
from derive.verify import load_module

SPECS = Path(__file__).parent / "specs"
LAYERS = {layer.name: layer for spec in ("extrema_layers.py", "losses_and_units.py", "statistics_layers.py")
          for layer in from_file(str(SPECS / spec))}
# fused forms that fail the battery, so the kernel is the step-by-step backward: BCE through
# sigmoid(x) + 1e-7 rounds worse than autograd's chain at N(0, 1); the variance of a product is
# differentiated into differences of sums. (A softmax written out with its shift,
# ``softmax_inline_shift``, is fused: its shift's zero adjoint replayed, see ``select``; so is the
# variance of a saturating tanh, with the variance kept as a node.)
STEPS = {"attention_manual", "bce_manual", "variance_of_a_product"}
# and of those, the ones whose step-by-step kernel fails the battery too (reported, see select)
STEPS_FAIL: set = set()


def kernel(layer, folder: Path):
    path = folder / f"{layer.name}.py"
    path.write_text(render_kernel(layer))
    return getattr(load_module(path), layer.name)


def inputs(layer, sizes: dict, draw) -> dict:
    """Small integers (entries tie often) for tensors, labels in range."""
    out = {}
    for name, decl in layer.tensors.items():
        shape = tuple(sizes[d] for d in decl.dims)
        if isinstance(decl, Labels):
            out[name] = torch.randint(0, sizes[decl.classes], shape, generator=draw)
        else:
            out[name] = torch.randint(-2, 3, shape, generator=draw).double()
    return out


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_kernel_is_fused_where_a_form_passes_and_passes_the_battery(name, tmp_path):
    layer = LAYERS[name]
    choice = chosen(layer)
    assert choice.fused == (name not in STEPS), choice.summary()
    torch.set_num_threads(1)
    verdict = battery.run(layer, kernel(layer, tmp_path), {d: 24 if k == 0 else 7 + 2 * k for k, d in enumerate(layer.dims)}, seed=3)
    assert verdict.passed != (name in STEPS_FAIL), "\n".join(map(str, verdict.findings[:3]))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_kernel_matches_autograd_where_entries_tie(name, tmp_path):
    layer = LAYERS[name]
    fn = kernel(layer, tmp_path)
    draw = torch.Generator().manual_seed(0)
    values = inputs(layer, {d: 5 + k for k, d in enumerate(layer.dims)}, draw)
    differentiable = layer.differentiable
    results = []
    for f in (fn, layer.fn):
        args = {k: v.clone().requires_grad_() if k in differentiable else v for k, v in values.items()}
        out = f(**args)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append(torch.autograd.grad(out, [args[k] for k in differentiable], upstream))
    for k, mine, theirs in zip(differentiable, *results):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_forward_computes_nothing_it_does_not_read(name):
    """Every name the generated forward assigns is read by a later line or returned: a sum's body
    named for reuse inside another sum (``x - x.min(1).values`` summed) was computed, then the
    statement around it computed it again and never read the name."""
    tree = ast.parse(render_kernel(LAYERS[name]))
    for function in [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name in ("_forward", "forward")]:
        assigned = [t.id for node in ast.walk(function) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
        read = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert not [a for a in assigned if a not in read], f"{function.name} computes names it never reads"
