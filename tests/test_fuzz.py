"""Random layers: every spec the fuzzer writes either generates code that matches autograd of the
spec (forward, gradients, gradcheck, needs_input_grad) or is refused with an error naming the layer.

CI runs a bounded number (``DERIVE_FUZZ_EXAMPLES`` per family, default 110 fused + 110 step-by-step,
short specs); a soak is opt-in::

    DERIVE_FUZZ_EXAMPLES=1000 DERIVE_FUZZ_LINES=6 pytest -s tests/test_fuzz.py

Each test prints how many layers it tried, passed and saw refused. Failures found by the fuzzer
are kept as ``@example`` regressions below.
"""
from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, example, given, settings

from fuzz.harness import run
from fuzz.specs import FuzzSpec, layer_specs

EXAMPLES = int(os.environ.get("DERIVE_FUZZ_EXAMPLES", "110"))
LINES = int(os.environ.get("DERIVE_FUZZ_LINES", "3"))
# At most this share of fused specs may be refused: the fuzzer must keep testing code, not refusals.
MOST_REFUSED = 0.25


def _regression(name: str, body: str, declared: str, signature: str, fused: bool, sizes: dict) -> FuzzSpec:
    """A failure the fuzzer found, written back as the spec it shrank to."""
    source = "\n".join([
        "import torch", "from derive import Constant, Labels, Tensor, layer", "", "",
        f"@layer({declared})", f"def {name}({signature}):", "    n, k = x.shape", body, "    return out", "",
        *([] if fused else ["", f"{name}.fused = False", ""]),
    ])
    return FuzzSpec(name, source, fused, sizes)


# An input the output does not read: the step-by-step Function asked for grads["dx"], never emitted.
UNREAD_INPUT = _regression("fuzz_found_unread_input", "    v1 = torch.tanh(c)\n    out = v1",
                           'x=Tensor("n", "k"), c=Tensor("1", "k")', "x, c", False, {"n": 4, "k": 3})
# A gradient that does not depend on the element (c.mean()): the steps derivation had no letter for i_k.
CONSTANT_GRADIENT = _regression("fuzz_found_constant_gradient", "    v1 = x.exp()\n    v2 = c.mean()\n    out = v2",
                                'x=Tensor("n", "k"), c=Tensor("1", "k")', "x, c", False, {"n": 3, "k": 2})


class Tally:
    def __init__(self, family: str):
        self.family, self.outcomes, self.start = family, [], time.perf_counter()

    def report(self) -> str:
        passed = sum(o.status == "passed" for o in self.outcomes)
        refused = [o for o in self.outcomes if o.status == "refused"]
        lines = [f"fuzz {self.family}: {len(self.outcomes)} random layers tried, {passed} passed, "
                 f"{len(refused)} refused with a clear error, {time.perf_counter() - self.start:.0f} s"]
        reasons = sorted({o.message.split(": ", 1)[1] for o in refused})
        lines += [f"  refused: {r}" for r in reasons]
        return "\n".join(lines)


def _fuzz(family: str, fused: bool, tmp_path, extra=()):
    tally = Tally(family)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("DERIVE_FUZZ_RANDOM"),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(spec=layer_specs(fused, LINES))
    def check(spec):
        tally.outcomes.append(run(spec, tmp_path))

    for spec in extra:
        check = example(spec=spec)(check)
    check()
    print("\n" + tally.report())
    return tally


def test_random_fused_layers(tmp_path):
    tally = _fuzz("fused", True, tmp_path)
    refused = sum(o.status == "refused" for o in tally.outcomes)
    assert len(tally.outcomes) >= EXAMPLES
    assert refused <= MOST_REFUSED * len(tally.outcomes), tally.report()


def test_random_step_by_step_layers(tmp_path):
    tally = _fuzz("step-by-step", False, tmp_path, extra=[UNREAD_INPUT, CONSTANT_GRADIENT])
    assert len(tally.outcomes) >= EXAMPLES
    assert all(o.status == "passed" for o in tally.outcomes), tally.report()


@pytest.mark.parametrize("spec", [UNREAD_INPUT, CONSTANT_GRADIENT], ids=lambda s: s.name)
def test_fuzz_regressions(spec, tmp_path):
    assert run(spec, tmp_path).status == "passed"
