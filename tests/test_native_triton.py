"""The Triton kernels printed from the kernel plan (``derive generate --backend triton``).

No GPU here: every kernel runs under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set
before the kernels are defined), and is compiled ahead of time for a current GPU (sm_90) by
Triton's compiler and its bundled ptxas, which must report no register spills.
"""
import importlib
import os
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # read when a module's kernels are defined
triton = pytest.importorskip("triton")

from derive import battery  # noqa: E402
from derive.layers import FUSED  # noqa: E402
from derive.triton_backend import compile_ahead  # noqa: E402
from derive.verify import against_autograd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOWERED = [layer for layer in FUSED if (ROOT / "generated" / f"{layer.name}_triton.py").exists()]
CPP = {layer.name for layer in FUSED if (ROOT / "generated" / f"{layer.name}_cpp.py").exists()}


def module(name):
    return importlib.import_module(f"generated.{name}_triton")


def test_every_layer_with_a_cpp_kernel_has_a_triton_kernel():
    """Those with matrix products too (``linear``, ``attention``: stages of ``torch.mm`` and loops),
    whose modules say so, and run the battery at the C++ kernel's sizes (their loops run over the
    rows of one axis)."""
    assert {layer.name for layer in LOWERED} == CPP
    for name in ("linear", "attention"):
        assert module(name)._STAGED and "torch.mm(" in (ROOT / "generated" / f"{name}_triton.py").read_text()
    assert not module("cross_entropy")._STAGED


def test_a_staged_triton_kernel_is_the_products_and_the_loops_between():
    """attention's backward: ``dprobs = dout @ v.T`` (torch.mm), the softmax's backward as Triton
    loops over ``(n, m)``, then the three gradients, ``dq`` and ``dk`` scaled by ``1/sqrt(d)``; the
    same values as the C++ kernel's stages (float64)."""
    text = (ROOT / "generated" / "attention_triton.py").read_text()
    driver = text[text.index("def _attention_backward(p_dout"):]
    assert driver.index("p_dprobs = torch.mm(p_dout.view(sz_n, sz_e), p_v.view(sz_m, sz_e).t())") \
        < driver.index("p_dt2 = _attention_backward_dt2(") < driver.index("p_dq = torch.mm(p_dt2.view(sz_n, sz_m), p_k.view(sz_m, sz_d))")
    assert driver.count(".mul_(float(") == 2  # dq and dk
    layer = next(x for x in FUSED if x.name == "attention")
    inputs = {k: torch.randn(s, dtype=torch.float64, requires_grad=True)
              for k, s in (("q", (5, 3)), ("k", (7, 3)), ("v", (7, 4)))}
    cpp = importlib.import_module("generated.attention_cpp")
    results = []
    for fn in (module("attention").attention, cpp.attention, layer.fn):
        out = fn(**inputs)
        results.append([out, *torch.autograd.grad(out, list(inputs.values()), torch.ones_like(out))])
    for ours, theirs, spec in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12) and torch.allclose(ours, spec, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", LOWERED, ids=lambda layer: layer.name)
def test_triton_kernel_under_the_interpreter(layer):
    """float64: the output and every gradient match autograd through the spec; float32 at scale 1 and
    100 and at an offset of 1e6: within the battery's bar (4x autograd's own error plus 4 ulps)."""
    fn = getattr(module(layer.name), layer.name)
    sizes = {d: 6 if k == 0 else 7 for k, d in enumerate(layer.dims)}
    for row in against_autograd(layer, fn, sizes):
        assert row.approximate, (row.name, row.maxdiff)
    draws = [battery.Setting(f"N(0, 1) x {s:g}", s, False, torch.float32) for s in (1.0, 100.0)]
    draws.append(battery.Setting("N(0, 1) + 1e+06", 1.0, False, torch.float32, offset=1e6))
    verdict = battery.run(layer, fn, sizes, draws=draws)
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("name", ["cross_entropy", "batchnorm_biased", "layernorm", "batchnorm3d"])
def test_rows_longer_than_a_block_and_a_masked_tail(name):
    """1030 columns: a full block of 1024 and a tail of 6 masked lanes, every pass of every row (the
    innermost axis is the columns; the outer ones, flattened, the rows)."""
    layer = next(x for x in LOWERED if x.name == name)
    sizes = {**{d: 3 - k for k, d in enumerate(layer.dims[:-1])}, layer.dims[-1]: 1030}
    rows = against_autograd(layer, getattr(module(name), name), sizes)
    assert all(row.approximate for row in rows), [(r.name, r.maxdiff) for r in rows]


def test_every_kernel_compiles_ahead_of_time_without_spills():
    """In a fresh process, after the interpreter ran in this one (which patches triton.language)."""
    usages = compile_ahead([ROOT / "generated" / f"{layer.name}_triton.py" for layer in LOWERED])
    assert {kernel.split("_forward")[0].split("_backward")[0].lstrip("_") for kernel in usages} == \
        {layer.name for layer in LOWERED}
    for kernel, usage in usages.items():
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (kernel, usage)
        assert 0 < usage["registers"] <= 255, (kernel, usage)


def test_clamp_and_where_under_the_interpreter(tmp_path):
    """A user's layer with ``clamp`` and ``torch.where``: ``derive generate --backend triton`` writes
    its Triton kernel after the battery passes under the interpreter (NaN stays NaN through both)."""
    import subprocess
    import sys

    spec = tmp_path / "masks.py"
    spec.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def clipped(x, w):
    c = x.clamp(min=-1.0, max=2.0)
    return torch.where(c > 0, c * w, 0.1 * c)
''')
    run = subprocess.run([sys.executable, "-m", "derive", "generate", "--layer", str(spec), "--out", str(tmp_path / "gen"),
                          "--backend", "triton", "--no-prove"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "note: clipped: triton kernel: battery passed" in run.stdout, run.stdout
    assert (tmp_path / "gen" / "clipped_triton.py").exists()
