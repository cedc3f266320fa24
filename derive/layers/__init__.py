"""The built-in layers, and loading layers from a user's file.

To add a built-in layer: write its spec in a module here and list it in ``BUILTIN``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..errors import SpecError
from ..spec import Layer
from .activations import gelu_tanh, relu, sigmoid, softplus, tanh
from .attention import attention
from .batchnorm import batchnorm, batchnorm_biased
from .cross_entropy import cross_entropy
from .losses import (bce_with_logits, cross_entropy_ignore, cross_entropy_smooth, cross_entropy_temperature,
                     cross_entropy_weighted, mse)
from .makemore_mlp import makemore_mlp
from .makemore_model import makemore_model
from .mlp_parts import embedding, linear
from .normalization import batchnorm3d, layernorm, rmsnorm

BUILTIN: list[Layer] = [cross_entropy, batchnorm, batchnorm_biased, embedding, linear, tanh,
                        makemore_mlp, makemore_model,
                        layernorm, rmsnorm, batchnorm3d, cross_entropy_smooth, cross_entropy_temperature,
                        cross_entropy_weighted, cross_entropy_ignore, mse,
                        bce_with_logits, sigmoid, relu, softplus, gelu_tanh, attention]
FUSED: list[Layer] = [layer for layer in BUILTIN if layer.fused]


def by_name(name: str) -> Layer:
    for layer in BUILTIN:
        if layer.name == name:
            return layer
    known = ", ".join(layer.name for layer in BUILTIN)
    raise SpecError(name, "no built-in layer of that name", f"use one of: {known}, or --layer FILE.py[:name]")


def from_file(argument: str) -> list[Layer]:
    """Layers declared with ``@layer`` in ``FILE.py``; ``FILE.py:name`` picks one."""
    path, _, wanted = argument.partition(":")
    file = Path(path)
    if not file.is_file():
        raise SpecError(argument, f"no such file {path!r}", "pass the path of a Python file with @layer specs")
    module_name = f"_derive_user_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    layers = [v for v in vars(module).values() if isinstance(v, Layer)]
    if wanted:
        layers = [layer for layer in layers if layer.name == wanted]
    if not layers:
        raise SpecError(argument, "no @layer spec found" + (f" named {wanted!r}" if wanted else ""),
                        "decorate the forward function with @layer(...)")
    for layer in layers:
        layer.module = str(file) if not file.is_absolute() else file.name
    return layers
