"""Layers outside the built-in list, derived with no change to the engine, checked against
autograd of their spec, gradcheck, and the native torch op where there is one."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from derive.book import build_book
from derive.layers import from_file
from derive.verify import against_autograd, load_module, table

from conftest import ink

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs" / "unseen_layers.py"
LAYERS = {layer.name: layer for layer in from_file(str(SPECS))}
SIZES = {"n": 6, "d": 5, "k": 4}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    result = subprocess.run([sys.executable, "-m", "derive", "generate", "--no-prove", "--layer", str(SPECS),
                             "--out", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return folder


def fused(out, name):
    return getattr(load_module(out / f"{name}.py"), name)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_matches_autograd_of_the_spec(out, name):
    layer = LAYERS[name]
    sizes = {d: SIZES[d] for d in layer.dims}
    rows = against_autograd(layer, fused(out, name), sizes, torch.float64, seed=7)
    assert max(r.maxdiff for r in rows) < 1e-10, table(rows)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradcheck(out, name):
    layer = LAYERS[name]
    sizes = {d: SIZES[d] - 2 for d in layer.dims}
    from derive.verify import random_inputs
    inputs = random_inputs(layer, sizes, torch.float64, seed=3)
    args = [v.requires_grad_() if k in layer.differentiable else v for k, v in inputs.items()]
    assert torch.autograd.gradcheck(lambda *a: fused(out, name)(*a), tuple(args))


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*tensors)
    return value, torch.autograd.grad(value, tensors, torch.ones_like(value))


NATIVE = {
    "softmax": (lambda f: f, lambda x: F.softmax(x, dim=1), [(6, 4)]),
    "l2_normalize": (lambda f: f, lambda x: F.normalize(x, dim=1), [(6, 5)]),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_matches_the_native_op(out, name):
    wrap, native, shapes = NATIVE[name]
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    ours, ours_grads = grads(wrap(fused(out, name)), *tensors)
    theirs, their_grads = grads(native, *tensors)
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ours_grads, their_grads))


def test_derivations_compile_into_one_book(out, tmp_path):
    """Every document of every unseen layer (compute graph, chain rule, refold) compiles: one latexmk run."""
    pdf = build_book(list(LAYERS.values()), out / "derivations", tmp_path)
    assert ink(pdf) > 0.01
