"""Generating a layer's modules in a test, in-process: the fused Function and the step-by-step one."""
from __future__ import annotations

from pathlib import Path

from derive.codegen import render_function, render_steps
from derive.kernel import build_cached
from derive.trace import trace
from derive.verify import against_autograd, load_module, steps_table


def user_layer(folder: Path, source: str, name: str):
    """The spec ``source`` as a user's file, its layer ``name``, and the kernel ``derive generate``
    writes for it (the file may hold other layers)."""
    from derive.cli import main
    from derive.layers import from_file

    spec = Path(folder) / f"{name}_spec.py"
    spec.write_text(source)
    assert main(["generate", "--no-prove", "--layer", f"{spec}:{name}", "--out", str(Path(folder) / "gen")]) == 0
    layer = next(layer for layer in from_file(str(spec)) if layer.name == name)
    return layer, getattr(load_module(Path(folder) / "gen" / f"{name}.py"), name)


def fused(layer, folder: Path):
    """The generated fused function of ``layer`` (written to ``folder`` and imported), derived once
    per layer object in a process (``build_cached``): several tests of a file read the same one."""
    path = Path(folder) / f"{layer.name}.py"
    path.write_text(render_function(build_cached(layer)))
    return getattr(load_module(path), layer.name)


def steps(layer, folder: Path):
    """The generated step-by-step module of ``layer``."""
    path = Path(folder) / f"{layer.name}_steps.py"
    path.write_text(render_steps(trace(layer)))
    return load_module(path)


def odd_sizes(layer) -> dict:
    return {d: 3 + 2 * k for k, d in enumerate(layer.dims)}


def fused_maxdiff(layer, folder: Path, sizes: dict | None = None, seed: int = 0) -> float:
    """The fused function's largest difference from autograd through the spec (float64)."""
    rows = against_autograd(layer, fused(layer, folder), sizes or odd_sizes(layer), seed=seed)
    return max(r.maxdiff for r in rows)


def steps_maxdiff(layer, folder: Path, sizes: dict | None = None, seed: int = 0) -> float:
    """The step-by-step backward's largest difference from autograd through the spec (float64)."""
    import torch
    rows = steps_table(layer, steps(layer, folder), sizes or odd_sizes(layer), torch.float64, seed)
    return max(r.maxdiff for r in rows)
