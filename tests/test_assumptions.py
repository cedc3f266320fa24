"""Assumptions come only from declarations: a Constant is a real number of either sign unless it is
declared positive, and the generated code is right for every value its declaration allows."""
from pathlib import Path

import pytest
import torch

from derive import Constant, Tensor, layer
from derive.codegen import render_function
from derive.errors import SpecError
from derive.kernel import build
from derive.layers import from_file
from derive.prove import prove
from derive.verify import against_autograd, load_module, table

SPECS = Path(__file__).resolve().parent / "specs" / "signed_constants.py"
LAYERS = {layer.name: layer for layer in from_file(str(SPECS))}


def generated(layer, folder: Path):
    path = folder / f"{layer.name}.py"
    path.write_text(render_function(build(layer)))
    return getattr(load_module(path), layer.name)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_either_sign_of_a_constant(name, tmp_path):
    layer = LAYERS[name]
    fn = generated(layer, tmp_path)
    (constant, decl), = layer.constants.items()
    for value in (decl.default, -decl.default, 3 * decl.default, -0.25 * decl.default):
        def call(**kw):
            return fn(**{**kw, constant: value})

        def spec(**kw):
            return layer.fn(**{**kw, constant: value})

        spec_layer = type(layer)(layer.name, spec, layer.inputs, layer.module)
        rows = against_autograd(spec_layer, call, {"n": 5, "d": 3}, torch.float64, seed=1)
        assert all(r.approximate for r in rows), f"{constant}={value}\n{table(rows)}"


@pytest.mark.parametrize("name", ["abs_scaled", "root_of_square"])
def test_the_proof_holds_without_the_sign(name):
    """The formula is proven with the constant a real symbol: the proof covers both signs."""
    proof = prove(build(LAYERS[name]), {"n": 2, "d": 3})
    assert proof.elements_checked > 0


def test_a_constant_is_real_unless_declared():
    from derive.trace import trace
    graph = trace(LAYERS["abs_scaled"])
    c = graph.constants["c"]
    assert c.is_real and c.is_positive is None


def test_a_positive_declaration_is_used_and_checked(tmp_path):
    @layer(x=Tensor("n", "d"), eps=Constant(0.5, positive=True))
    def scaled_abs(x, eps=0.5):
        out = (x * eps).abs()
        return out

    from derive.trace import trace
    assert trace(scaled_abs).constants["eps"].is_positive
    fn = generated(scaled_abs, tmp_path)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(fn(x, 0.25), (x * 0.25).abs())
    with pytest.raises(ValueError, match="eps is declared positive"):
        fn(x, -0.25)


def test_a_positive_declaration_needs_a_positive_default():
    with pytest.raises(SpecError, match=r"has the default -1.0, outside the values it declares \(positive\)"):
        @layer(x=Tensor("n", "d"), eps=Constant(-1.0, positive=True))
        def bad(x, eps=-1.0):
            return x * eps
