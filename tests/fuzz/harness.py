"""Run one random spec through the whole toolkit and hold the result against autograd of the spec.

The path is the user's: the spec is written to a ``.py`` file, loaded with ``from_file``, derived
and rendered (``derive.generate.render``: the fused Function for a fused spec, the step-by-step
Function always, and their derivations), the generated modules are written and imported, and their
Functions are run. Each one's forward and input gradients must match autograd through the spec
itself in float64, the step-by-step backward's every intermediate gradient too, gradients must
follow ``needs_input_grad``, and ``gradcheck`` must pass. The layer's kernel must then pass the
numerical battery in float32 and float64 at scaled and saturating inputs (``never_worse``), and
every derivation document must be written (``render`` writes a page that asks for a report in place
of one it failed to write, and says so in ``reasons``).

The engine may refuse a fused spec it cannot derive, but only with a ``DeriveError`` that names
the layer; a step-by-step spec uses only primitives with rules and must never be refused.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from derive import battery
from derive.errors import DeriveError, DerivationError
from derive.files import write_atomic
from derive.generate import DOCUMENTS, render
from derive.layers import from_file
from derive.verify import load_module, random_inputs, steps_table, upstream_for

from .specs import FuzzSpec

# A derivation still running after this much CPU time is stopped and counted as "slow", not as
# passed: some nested elementwise chains (log(tanh(log(x*x + 1))**2 + 1)) make the engine's refold
# search take minutes, and the CI run must stay bounded. The tally reports how many. CPU time, not
# wall time: the work a derivation does, the same whether the machine runs other tests beside it
# (under ``pytest -n auto`` a 14 s derivation took more than 20 s of wall time). 60 s: that layer
# (``fuzz_fused_f4921a2f4a``, a log of a squared log-softmax of a minimum) measures 21 to 30 s of
# CPU time alone on this machine, and took more than 40 s late in a clean-clone CI run beside the
# other worker (24 s there in an earlier run of the same derivation); the limit guards against minutes.
DERIVATION_SECONDS = int(os.environ.get("DERIVE_FUZZ_SECONDS", "60"))


class TooSlow(BaseException):
    """An interruption, like Ctrl-C: no ``except Exception`` of the engine's may take it for a failure."""


@contextmanager
def time_limit(seconds: float):
    """Raise TooSlow in this (main) thread after ``seconds`` of the process's CPU time (``ITIMER_PROF``);
    SymPy's pure-Python work is interruptible."""
    def stop(signum, frame):
        raise TooSlow()

    previous = signal.signal(signal.SIGPROF, stop)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


RTOL = 1e-6
ATOL = 1e-8  # times (1 + the reference's largest magnitude)


@dataclass
class Outcome:
    status: str  # "passed", "refused" (a clear DerivationError) or "slow" (stopped, see DERIVATION_SECONDS)
    seconds: float
    message: str = ""


def _grads(fn, inputs: dict, wanted: list[str], seed: int):
    """Output, and the gradient of each ``wanted`` input (zeros where it does not reach the output)."""
    leaves = {k: v.clone().requires_grad_(k in wanted) if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = fn(**leaves)
    tensors = [leaves[k] for k in wanted]
    if not out.requires_grad:
        return out.detach(), {k: torch.zeros_like(leaves[k]) for k in wanted}
    grads = torch.autograd.grad(out, tensors, upstream_for(out, seed), allow_unused=True)
    return out.detach(), {k: torch.zeros_like(t) if g is None else g for k, t, g in zip(wanted, tensors, grads)}


def _close(what: str, ours: torch.Tensor, reference: torch.Tensor, context: str) -> None:
    assert ours.shape == reference.shape, f"{context}: {what} has shape {tuple(ours.shape)}, " \
                                          f"autograd's is {tuple(reference.shape)}"
    assert ours.dtype == reference.dtype, f"{context}: {what} is {ours.dtype}, autograd's is {reference.dtype}"
    scale = 1.0 + float(reference.abs().max()) if reference.numel() else 1.0
    difference = float((ours - reference).abs().max()) if reference.numel() else 0.0
    assert torch.allclose(ours, reference, rtol=RTOL, atol=ATOL * scale), \
        f"{context}: {what} differs from autograd of the spec by {difference:.3e}\nours:\n{ours}\nautograd:\n{reference}"


def check_function(label: str, fn, layer, inputs: dict, seed: int, gradcheck: bool) -> None:
    """``fn`` (a generated Function's wrapper) agrees with autograd through ``layer.fn``."""
    wanted = layer.differentiable
    out_ref, ref = _grads(layer.fn, inputs, wanted, seed)
    out, ours = _grads(fn, inputs, wanted, seed)
    _close("the output", out, out_ref, label)
    for k in wanted:
        _close(f"d{k}", ours[k], ref[k], label)
    # Only the first input asks for a gradient: the others must not be needed, the first unchanged.
    _, only_first = _grads(fn, inputs, wanted[:1], seed)
    _close(f"d{wanted[0]} (only it requested)", only_first[wanted[0]], ref[wanted[0]], label)
    if gradcheck:
        names = list(inputs)

        def positional(*args):
            return fn(**dict(zip(names, args)))

        args = tuple(v.clone().requires_grad_(k in wanted) if torch.is_tensor(v) else v for k, v in inputs.items())
        assert torch.autograd.gradcheck(positional, args, raise_exception=False), f"{label}: gradcheck fails"


def run(spec: FuzzSpec, folder: Path, seed: int = 0, gradcheck: bool = True) -> Outcome:
    """Write, load, derive, generate, import and check ``spec``; raises AssertionError on a failure."""
    start = time.perf_counter()
    source = Path(folder) / f"{spec.name}.py"
    source.write_text(spec.source)
    (layer,) = from_file(str(source))
    assert layer.fused == spec.fused
    reasons: dict = {}  # a derivation document derive failed to write (its own fault) is said here
    try:
        with time_limit(DERIVATION_SECONDS):
            files = render(layer, reasons=reasons)
    except TooSlow:
        return Outcome("slow", time.perf_counter() - start, f"layer {layer.name!r}: no result in "
                       f"{DERIVATION_SECONDS} s\n{spec.source}")
    except DerivationError as e:
        message = str(e)
        assert spec.fused, f"a step-by-step spec was refused: {message}"
        assert message.startswith(f"layer {layer.name!r}"), f"the refusal does not name the layer: {message}"
        assert "report this as a bug" not in message, f"the engine reports a bug of its own: {message}"
        return Outcome("refused", time.perf_counter() - start, message)
    except DeriveError as e:
        raise AssertionError(f"{spec.name}: a supported spec was refused: {e}") from e
    assert DOCUMENTS not in reasons, f"{layer.name}: {reasons[DOCUMENTS]}"
    out = Path(folder) / spec.name
    for rel, text in files.items():
        write_atomic(out / rel, text)
    inputs = random_inputs(layer, spec.sizes, torch.float64, seed)
    steps = load_module(out / f"{layer.name}_steps.py")
    functions = {"step-by-step Function": getattr(steps, layer.name)}
    if spec.fused:
        functions["fused Function"] = getattr(load_module(out / f"{layer.name}.py"), layer.name)
    for label, fn in functions.items():
        check_function(label, fn, layer, inputs, seed, gradcheck)
    for row in steps_table(layer, steps, spec.sizes, torch.float64, seed):
        assert row.approximate, f"step-by-step backward: d{row.name} differs from autograd by {row.maxdiff:.3e}"
    never_worse(layer, functions["fused Function" if spec.fused else "step-by-step Function"], seed)
    return Outcome("passed", time.perf_counter() - start)


def never_worse(layer, fn, seed: int) -> None:
    """The kernel ``derive generate`` writes passes the numerical battery (float32 and float64,
    scaled, shifted and saturating inputs against autograd through the spec) with other inputs than
    the ones its form was chosen with (seed, 32 rows)."""
    sizes = {d: 32 if k == 0 else 5 + 2 * k for k, d in enumerate(layer.dims)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        verdict = battery.run(layer, fn, sizes, seed=seed + 7)
    finally:
        torch.set_num_threads(threads)
    assert verdict.passed, f"{layer.name}: worse than autograd through the spec: " + "; ".join(map(str, verdict.findings[:3]))
