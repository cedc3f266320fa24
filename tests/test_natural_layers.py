"""Layers written the way PyTorch users write them first (tests/specs/natural_layers.py):
normalizations, attention, recurrent cells, pooling, losses, quadratic forms and heads. Each one
derives, fused and step by step, and matches autograd through its own function in float64 at odd
sizes; the fused engine derives every one of them."""
from pathlib import Path

import pytest

from derive.layers import from_file

from kernels import fused_maxdiff, steps_maxdiff

LAYERS = {layer.name: layer for layer in from_file(str(Path(__file__).parent / "specs" / "natural_layers.py"))}


def sizes(layer) -> dict:
    return {d: 3 + 2 * (k % 3) for k, d in enumerate(layer.dims)}  # 3, 5, 7, 3, ...: odd, and small


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fused_matches_autograd(name, tmp_path):
    assert fused_maxdiff(LAYERS[name], tmp_path, sizes(LAYERS[name]), seed=1) < 1e-10


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_step_by_step_matches_autograd(name, tmp_path):
    assert steps_maxdiff(LAYERS[name], tmp_path, sizes(LAYERS[name]), seed=1) < 1e-10
