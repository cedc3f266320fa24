"""Layers written the way PyTorch users write them first (tests/specs/natural_layers.py):
normalizations, attention, recurrent cells, pooling, losses, quadratic forms and heads. Each one
derives, fused and step by step, and matches autograd through its own function in float64 at odd
sizes; the fused engine derives every one of them, and its kernel holds no tensor much larger than
autograd's largest."""
from pathlib import Path

import pytest
import torch

from derive.battery import MEMORY_SLACK, largest_allocation
from derive.layers import from_file
from derive.verify import random_inputs

from kernels import fused, fused_maxdiff, steps_maxdiff

LAYERS = {layer.name: layer for layer in from_file(str(Path(__file__).parent / "specs" / "natural_layers.py"))}


def sizes(layer) -> dict:
    return {d: 3 + 2 * (k % 3) for k, d in enumerate(layer.dims)}  # 3, 5, 7, 3, ...: odd, and small


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fused_matches_autograd(name, tmp_path):
    assert fused_maxdiff(LAYERS[name], tmp_path, sizes(LAYERS[name]), seed=1) < 1e-10


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_step_by_step_matches_autograd(name, tmp_path):
    assert steps_maxdiff(LAYERS[name], tmp_path, sizes(LAYERS[name]), seed=1) < 1e-10


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_fused_kernel_allocates_no_more_than_autograd(name, tmp_path):
    """Forward and backward at sizes that differ by dimension: no tensor of the kernel is a dimension
    larger than autograd's largest (a product broadcast over one more axis before its sum). The
    numerical battery holds every kernel to this; here it is asked of the fused form itself."""
    layer = LAYERS[name]
    inputs = random_inputs(layer, {d: 6 + 5 * k for k, d in enumerate(layer.dims)}, torch.float64, seed=1)
    ours = largest_allocation(fused(layer, tmp_path), inputs, layer.differentiable, seed=1)
    theirs = largest_allocation(layer.fn, inputs, layer.differentiable, seed=1)
    assert ours <= MEMORY_SLACK * theirs, f"the kernel makes a tensor of {ours} bytes, autograd's largest is {theirs}"
