"""Random layers: every spec the fuzzer writes generates code that matches autograd of the spec
(forward, gradients, gradcheck, needs_input_grad). The harness tells a refusal (a clear error naming
the layer) from a wrong result and a derivation stopped as slow; the tests require every layer to pass.

CI runs a bounded number (``DERIVE_FUZZ_EXAMPLES`` per family, default 100 fused + 100 step-by-step,
short specs); a soak is opt-in, either these tests at a larger count (they stop at the first
failure and shrink it)::

    DERIVE_FUZZ_RANDOM=1 DERIVE_FUZZ_EXAMPLES=1000 DERIVE_FUZZ_LINES=6 pytest -s tests/test_fuzz.py

or ``scripts/soak.py``, which goes on past failures, saves each failing spec and tallies them all.

Each test prints how many layers it tried, passed, saw refused and stopped as slow. Failures found by the fuzzer
are kept as regressions below (``test_fuzz_regressions``), each run once.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fuzz.harness import run
from fuzz.specs import FuzzSpec, layer_specs

EXAMPLES = int(os.environ.get("DERIVE_FUZZ_EXAMPLES", "100"))
LINES = int(os.environ.get("DERIVE_FUZZ_LINES", "3"))


def _regression(name: str, body: str, declared: str, signature: str, fused: bool, sizes: dict) -> FuzzSpec:
    """A failure the fuzzer found, written back as the spec it shrank to."""
    source = "\n".join([
        "import torch", "import torch.nn.functional as F", "from derive import Constant, Labels, Tensor, layer", "", "",
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


# A scalar intermediate the fused gradient reads (v1 = b.mean()): the kernel did not save it and the
# backward raised NameError; now saved as a 0-d tensor.
SCALAR_READ = _regression("fuzz_found_scalar_read", "    v1 = b.mean()\n    v2 = x * v1\n    out = v2.sum()",
                          'x=Tensor("n", "k"), b=Tensor("n", "1")', "x, b", True, {"n": 4, "k": 2})
# Recognition learned sum(x) = out/v1 from out = v1*sum(x): db read out/v1, 0/0 where b is zero.
DIVIDES_BY_INPUT = _regression("fuzz_found_divides_by_input",
                               "    v1 = b.mean(0, keepdim=True)\n    v2 = x * v1\n    out = v2.sum(1, keepdim=True)",
                               'x=Tensor("n", "k"), b=Tensor("n", "1")', "x, b", True, {"n": 3, "k": 4})
# softmax(x).mean() is the constant 1/k: its gradient is zero, which printed as (0).expand(n, k);
# now dout.new_zeros((n, k)).
ZERO_GRADIENT = _regression("fuzz_found_zero_gradient", "    v1 = x.max(1, keepdim=True).values\n    v2 = x - v1\n"
                            "    v3 = v2.exp()\n    v4 = v3.sum(1, keepdim=True)\n    v5 = v3 / v4\n    out = v5.mean()",
                            'x=Tensor("n", "k")', "x", True, {"n": 3, "k": 2})
# The gradient flows through a max: the printer refused it as layer '' with no line; now the
# one-hot of the maximum's position.
THROUGH_MAX = _regression("fuzz_found_through_max", "    v1 = x.max(1, keepdim=True).values\n    v2 = torch.tanh(v1)\n"
                          "    out = v2 + torch.tanh(w).mean()", 'x=Tensor("n", "k"), w=Tensor("k")', "x, w", True,
                          {"n": 2, "k": 2})
# dc = dv2*w for a (1, k) c and a (k,) w had shape (k,): autograd refused it; now w.view(1, k).
LOWER_RANK_GRADIENT = _regression("fuzz_found_lower_rank_gradient", "    v1 = c * w\n    v2 = v1.sum()\n    out = v2",
                                  'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k")', "x, c, w", True,
                                  {"n": 3, "k": 5})
# A row maximum of zeros is a (n, 1) constant; exp(0 - it) summed over k printed as a sum over
# that one column: the forward's output was wrong (by 9.7 here). Now k*exp(-v2).
CONSTANT_ALONG_AXIS = _regression("fuzz_found_constant_along_axis",
                                  "    v1 = x - x\n    v2 = v1.max(1, keepdim=True).values\n    v3 = (v1 - v2).exp()\n"
                                  "    v4 = v3.sum(1, keepdim=True)\n    out = v4.log().sum() + torch.tanh(x).mean()",
                                  'x=Tensor("n", "k")', "x", True, {"n": 3, "k": 4})
# Refold wrote tanh(x) as log(v3) - log(2) (v3 = 2*exp(tanh(x))); cse shared log(2), printed as
# torch.log(2), which refuses an int. Now math.log(2).
FUNCTION_OF_A_NUMBER = _regression("fuzz_found_function_of_a_number",
                                   "    v1 = torch.tanh(x)\n    v2 = v1.exp()\n    v3 = v2 + v2\n    v4 = torch.tanh(v3)\n"
                                   "    v5 = torch.tanh(v4)\n    out = v5.sum()", 'x=Tensor("n", "k")', "x", True,
                                   {"n": 3, "k": 4})
# c.max(1) written twice: both values were one temporary named after the second, and the first
# (read by v2) was never assigned (NameError). Now the second reads the first.
REPEATED_MAX = _regression("fuzz_found_repeated_max",
                           "    v1 = c.max(1, keepdim=True).values\n    v2 = c - v1\n    v3 = c.max(1, keepdim=True).values\n"
                           "    v4 = (c - v3).exp()\n    v5 = v4 / v4.sum(1, keepdim=True)\n    out = (v5 ** 3) * v2",
                           'x=Tensor("n", "k"), c=Tensor("1", "k")', "x, c", True, {"n": 3, "k": 4})
# The same through a shared 0-d temporary (shared0 = dv4*(1 - v4**2)): it was taken for a (1, 1)
# tensor, so dc = shared0*w stayed (k,).
SCALAR_SHARED_GRADIENT = _regression("fuzz_found_scalar_shared_gradient",
                                     "    v1 = c * w\n    v2 = v1.sum()\n    out = torch.tanh(v2)",
                                     'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k")', "x, c, w", True,
                                     {"n": 3, "k": 2})
# (x - w).mean() summed axis after axis in the fused forward: its output rounded 6x autograd's
# float32 error, past the battery's bar at the harness's sizes. Now one reduction, as the spec's.
WHOLE_MEAN = _regression("fuzz_found_whole_mean", "    v1 = x - w\n    v2 = v1.mean()\n    out = v2",
                         'x=Tensor("n", "k"), w=Tensor("k")', "x, w", True, {"n": 3, "k": 4})
# softmax(V).mean() is constant: its gradient cancels to about 0. The step-by-step backward's
# s*(g - (g*s).sum(1)) rounded 500 million times autograd's error there; now autograd's own
# kernel for it (torch._softmax_backward_data), the formula in a comment above.
SOFTMAX_CANCELS = _regression('fuzz_found_softmax_gradient_cancels',
    '    v1 = F.softmax(V, dim=1)\n    v2 = v1.mean()\n    out = v2',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), A=Tensor("k", "k"), W=Tensor("k", "m"), V=Tensor("m", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, A, W, V, p, eps=0.001, scale=0.75', False, {'n': 3, 'k': 4, 'm': 2})
# The same formula at N(0, 1) x 100: 5.6x autograd's float32 error, past the bar of 4x.
SOFTMAX_ROWS = _regression('fuzz_found_softmax_of_rows',
    '    v1 = 0.5 * x\n    v2 = F.softmax(V, dim=1)\n    out = v2',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), u=Tensor("n", "k", differentiable=False), V=Tensor("m", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, u, V, p, y, eps=0.001, scale=0.75', False, {'n': 3, 'k': 4, 'm': 2})
# (1 - y**2)*g at a saturated tanh: y**2 rounds before the subtraction (4.5x autograd's error);
# now torch.ops.aten.tanh_backward(g, y).
SATURATED_TANH_STEPS = _regression('fuzz_found_saturated_tanh_steps',
    '    v1 = x.T @ x\n    v2 = c.max(1).values\n    v3 = torch.tanh(v1)\n    v4 = torch.tanh(v1)\n    v5 = torch.minimum(x, v2)\n    v6 = torch.tanh(v5)\n    v7 = v6 + torch.tanh(V).mean()\n    out = v7',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), V=Tensor("m", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, V, eps=0.001, scale=0.75', False, {'n': 3, 'k': 4, 'm': 2})
# sigmoid(a)*g for softplus: sigmoid(-90) is 0 in float32 where exp(-90)*g/(exp(-90) + 1) keeps
# its digits (a subnormal gradient of 5.6e-43 printed as 0); now softplus_backward.
SOFTPLUS_UNDERFLOW = _regression('fuzz_found_softplus_underflow',
    '    v1 = x.max(0).values\n    v2 = F.softplus(A)\n    v3 = v2.T\n    v4 = torch.tanh(v3)\n    v5 = v4.mean()\n    out = v5',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), A=Tensor("k", "k"), W=Tensor("k", "m"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, A, W, y, eps=0.001, scale=0.75', False, {'n': 3, 'k': 4, 'm': 2})
# A non-finite gradient of a maximum (0*inf upstream) reached every entry through one-hot * grad;
# now torch.where(mask, grad, 0): only the maximum's entry, as autograd.
INFINITE_THROUGH_MAX = _regression('fuzz_found_infinite_through_max',
    '    v1 = x.max(0).values\n    v2 = v1.exp()\n    v3 = torch.minimum(v1, v2)\n    v4 = torch.tanh(v3)\n    out = v4 - v4',
    'x=Tensor("n", "k")',
    'x', False, {'n': 3, 'k': 4})
# The same through x[range(n), y]: now only the label's entry.
INFINITE_THROUGH_PICK = _regression('fuzz_found_infinite_through_pick',
    '    v1 = x[range(n), y]\n    v2 = v1.exp()\n    v3 = torch.tanh(v2)\n    out = torch.tanh(v3)',
    'x=Tensor("n", "k"), y=Labels("n", classes="k")',
    'x, y', False, {'n': 3, 'k': 4})
# A clamp's mask (NonNeg) had no numbers in the documents' evaluator: NameError.
CLAMP_DOCUMENT = _regression('fuzz_found_clamp_document',
    '    v1 = x.mean(1, keepdim=True)\n    out = v1.clamp(min=-1.0, max=0.5)',
    'x=Tensor("n", "k")',
    'x', True, {'n': 3, 'k': 4})
# A.sum() of a (k, k) A beside an (n, k) x was summed axis by axis (the frame has a third axis):
# 46x autograd's float32 error where the sum cancels. Now one reduction.
WHOLE_SUM_OF_A_SQUARE = _regression('fuzz_found_whole_sum_of_a_square',
    '    v1 = x * w\n    v2 = A.sum()\n    v3 = (v2 * v2 + 1).log()\n    out = v3',
    'x=Tensor("n", "k"), w=Tensor("k"), A=Tensor("k", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, w, A, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
# dv4*(1 - v3**2)/n of a 0-d tanh: 59x autograd's error; now tanh_backward(dv4/n, v3).
SATURATED_SCALAR_TANH = _regression('fuzz_found_saturated_scalar_tanh',
    '    v1 = x[range(n), y]\n    v2 = v1.mean()\n    v3 = torch.tanh(v2)\n    v4 = torch.maximum(v3, v3)\n    out = v4',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), u=Tensor("n", "k", differentiable=False), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, u, p, y, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
FOUND = [UNREAD_INPUT, CONSTANT_GRADIENT, SCALAR_READ, DIVIDES_BY_INPUT, ZERO_GRADIENT, THROUGH_MAX, LOWER_RANK_GRADIENT,
         CONSTANT_ALONG_AXIS, FUNCTION_OF_A_NUMBER, REPEATED_MAX, SCALAR_SHARED_GRADIENT, WHOLE_MEAN]
# found by scripts/soak.py (each failed the numerical battery, or crashed, before its fix)
# The fused gradient of F.softplus printed sigmoid(z) = 1/(1 + exp(-z)): 0 from z = -89 in float32,
# where autograd's softplus_backward keeps exp(z)'s subnormal digits. Now that kernel, once per
# softplus of the chain.
SOFTPLUS_SUBNORMAL = _regression('fuzz_found_softplus_subnormal',
    '    v1 = F.softplus(w)\n    v2 = v1 * w\n    out = v2',
    'x=Tensor("n", "k"), w=Tensor("k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, w, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
SOFTPLUS_OF_SOFTPLUS = _regression('fuzz_found_softplus_of_softplus',
    '    v1 = F.softplus(w)\n    v2 = F.softplus(v1) * x\n    out = v2',
    'x=Tensor("n", "k"), w=Tensor("k")',
    'x, w', True, {'n': 3, 'k': 4})
# tanh_backward(dv3*exp(b), v3): the product overflowed before meeting the saturated tanh's 0 (inf*0,
# where autograd gives 0). Now the upstream gradient alone through the kernel, then exp(b).
TANH_OF_EXP_OVERFLOW = _regression('fuzz_found_tanh_of_exp_overflow',
    '    v1 = b.T\n    v2 = v1.exp()\n    v3 = torch.tanh(v2)\n    out = v3',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), w=Tensor("k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, w, u, A, p, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
# The same order at a picked label's mean: 1.2x the bar.
TANH_OF_PICKED_MEAN = _regression('fuzz_found_tanh_of_picked_mean',
    '    v1 = torch.maximum(x, x)\n    v2 = v1[range(n), y]\n    v3 = v2.mean()\n    v4 = torch.tanh(v3)\n    out = v4',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), A=Tensor("k", "k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, A, y, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
# closed_form's cancel split exp(v1 - v2) into exp(v1)*exp(-v2), exp(-v2) out of the row's sum: 1.3x
# the bar at a saturated softmax. Now guarded as the terms are (simplify._cancelled).
LOGSUMEXP_OF_SOFTMAX = _regression('fuzz_found_logsumexp_of_softmax',
    '    v1 = F.softmax(x, dim=1)\n    v2 = torch.logsumexp(v1, dim=1, keepdim=True)\n    out = v2',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), A=Tensor("k", "k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, A, y, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
# exp(A - lse)*(1 - t**2) expanded to s - s*t**2 (2.5x the bar where the tanh saturates): a function
# of entries shared by terms is now collected like an entry (simplify._grouped).
TANH_OF_ROW_LOGSUMEXP = _regression('fuzz_found_tanh_of_row_logsumexp',
    '    v1 = torch.logsumexp(A, dim=1, keepdim=True)\n    v2 = v1.sum(0)\n    v3 = torch.tanh(v2)\n    out = v3',
    'x=Tensor("n", "k"), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, A, p, y, eps=0.001, scale=0.75', True, {'n': 3, 'k': 4})
# torch.maximum of values that tie in float32 (N(0, 1) at an offset of 1e6): autograd gives each half
# the gradient, the fused form gave all of it to one
TIES_OF_A_PICKED_MAXIMUM = _regression('fuzz_found_ties_of_a_picked_maximum',
    '    v1 = torch.maximum(b, c)\n    v2 = v1[range(n), y]\n    v3 = v2.mean()\n    out = v3',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# (x - c) @ A with x - c saved: the forward computed x - c again inside a broadcast sum of products,
# 36x less accurate than autograd's matrix product at inputs of 1e6
PRODUCT_OF_A_SAVED_DIFFERENCE = _regression('fuzz_found_product_of_a_saved_difference',
    '    v1 = x - c\n    v2 = v1 @ A\n    v3 = torch.maximum(v2, u)\n    v4 = v3.clamp(min=-1.0, max=0.5)\n    v5 = v4.T @ v4\n    out = v5',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, w, u, A, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# the total of a softmax is n whatever its input: dx is 0, where the fused form read the saved
# softmax's row sums and kept 1 - sum(p), rounding noise 160x autograd's error
TOTAL_OF_A_SOFTMAX = _regression('fuzz_found_total_of_a_softmax',
    '    v1 = torch.minimum(x, x)\n    v2 = torch.minimum(x, u)\n    v3 = torch.tanh(v2)\n    v4 = torch.minimum(v3, v2)\n    v5 = F.softmax(v3, dim=1)\n    v6 = v5.sum()\n    out = v6',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), u=Tensor("n", "k", differentiable=False), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, u, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# exp(x - lse) factored into exp(x)*exp(-lse): inf*0 at negative inputs of 6000, where autograd is finite
EXPONENTIAL_OF_A_SHIFT_FACTORED = _regression('fuzz_found_exponential_of_a_shift_factored',
    '    v1 = torch.logsumexp(x, dim=1, keepdim=True)\n    v2 = torch.maximum(v1, x)\n    v3 = v2.exp()\n    v4 = torch.tanh(v3)\n    out = v4',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, w, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# rsqrt(q) of a log-softmax squared at q = 1e26: the gradient divided by q**1.5 (inf in float32, so 0)
# where autograd's rsqrt(q)**3 is a subnormal
RSQRT_OF_A_LARGE_SQUARE = _regression('fuzz_found_rsqrt_of_a_large_square',
    '    v1 = x[range(n), y]\n    v2 = A.max(1, keepdim=True).values\n    v3 = A - v2\n    v4 = v3.exp()\n    v5 = v4.sum(1, keepdim=True)\n    v6 = v3 - v5.log()\n    v7 = torch.rsqrt(v6 * v6 + 1)\n    out = v7',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, w, A, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# a denominator 2*t1 + 2 factored as 2*(t1 + 1) changed the refold's costs: the gradient of
# log(exp(tanh(c.sum()))**2 + 1) then read log(t1) of the saved square, past the bar
LOG_OF_A_SQUARED_EXPONENTIAL = _regression('fuzz_found_log_of_a_squared_exponential',
    '    v1 = c.sum()\n    v2 = torch.tanh(v1)\n    v3 = v2 - w\n    v4 = F.log_softmax(p, dim=-1)\n    v5 = v2.exp()\n    v6 = (v5 * v5 + 1).log()\n    out = v6',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, w, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# a saved softmax row total read as (v4 - 1) in the gradient: noise where the gradient is 0
SAVED_TOTAL_OF_A_SOFTMAX = _regression('fuzz_found_saved_total_of_a_softmax',
    '    v1 = torch.tanh(c)\n    v2 = torch.where(v1 > 0, v1, 0.1 * v1)\n    v3 = F.softmax(v2, dim=1)\n    v4 = v3.sum(1)\n    v5 = torch.tanh(v4)\n    v6 = torch.tanh(v5)\n    out = v6',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# a chain of scalar tanh rebuilt through atanh of the saved outer one, then expanded
SCALAR_CHAIN_THROUGH_ATANH = _regression('fuzz_found_scalar_chain_through_atanh',
    '    v1 = A.sum()\n    v2 = torch.tanh(v1)\n    v3 = 1 - v2\n    v4 = torch.tanh(v3)\n    v5 = torch.tanh(v4)\n    out = v5',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), A=Tensor("k", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, A, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# a vector times a matrix summed as a broadcast product: every product rounded, where the spec's @ fuses them
TANH_OF_A_VECTOR_PRODUCT = _regression('fuzz_found_tanh_of_a_vector_product',
    '    v1 = F.log_softmax(u, dim=-1)\n    v2 = c @ A\n    v3 = torch.tanh(v2)\n    out = v3',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, u, A, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# log((w.mean() + b*x)**2 + 1): the denominator expanded, dw a difference of sums, the forward's
# b*x + m an addcmul; then the step-by-step fallback summed the mean's gradient axis by axis
CENTRED_SQUARE_OF_A_PRODUCT = _regression('fuzz_found_centred_square_of_a_product',
    '    v1 = x + x\n    v2 = x.T @ x\n    v3 = b * x\n    v4 = w.mean(0, keepdim=True)\n    v5 = v4 + v3\n    v6 = (v5 * v5 + 1).log()\n    out = v6',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), w=Tensor("k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, w, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# sqrt(v**2 + 1) of a total of log(w*w + 1): dw divided by the product (w**2 + 1)*sqrt(...), which
# overflows float32 at w of 1e19 where each divisor does not (the gradient there is 1e-19, not 0)
PRODUCT_OF_DIVISORS_OVERFLOWS = _regression('fuzz_found_product_of_divisors_overflows',
    '    v1 = x[range(n), y]\n    v2 = (w * w + 1).log()\n    v3 = torch.tanh(v2)\n    v4 = v2.sum(0)\n    v5 = v4 + v4\n    v6 = torch.sqrt(v5 * v5 + 1)\n    out = v6',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# tanh of a total of softplus(c): sigmoid(c) printed as a factor beside tanh_backward is 0 from
# c = -89 in float32, where autograd's softplus_backward keeps the subnormal gradient
SOFTPLUS_INSIDE_A_TANH = _regression('fuzz_found_softplus_inside_a_tanh',
    '    v1 = x.mean()\n    v2 = F.softplus(c)\n    v3 = p.exp()\n    v4 = v2.sum(1)\n    v5 = torch.tanh(v4)\n    out = v5',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# tanh((1 - x[y])**3): chosen with the bar over three draws together, a form at the edge of the bar
# (the cube expanded) was written and failed at other inputs; a form is chosen draw by draw
CHOSEN_AT_THE_EDGE = _regression('fuzz_found_chosen_at_the_edge',
    '    v1 = x[range(n), y]\n    v2 = 1 - v1\n    v3 = v2 ** 3\n    v4 = torch.minimum(v3, v3)\n    v5 = torch.tanh(v4)\n    out = v5',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, w, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# tanh(exp(x.mean()))**4: dx read e - e*t**2 of the scalars e = exp(v1), t = tanh(e), cancelling near
# t = 1; a polynomial in scalar forward values is factored whole, e*(t - 1)*(t + 1)
SCALAR_POLYNOMIAL_OF_A_TANH = _regression('fuzz_found_scalar_polynomial_of_a_tanh',
    '    v1 = x.mean()\n    v2 = v1.exp()\n    v3 = torch.tanh(v2)\n    v4 = v3**2\n    v5 = v4**2\n    v6 = torch.minimum(v5, v5)\n    out = v6',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# rsqrt(tanh(c.mean())**2 + 1): cse shared the tanh's square, and 1 - shared0 rounded it first (4x
# autograd's error near a saturated tanh); a saved tanh's square stays in place for tanh_backward
SHARED_SQUARE_OF_A_TANH = _regression('fuzz_found_shared_square_of_a_tanh',
    '    v1 = c.mean(1)\n    v2 = b.sum(0)\n    v3 = w.sum(0)\n    v4 = v3**2\n    v5 = torch.tanh(v1)\n    v6 = torch.rsqrt(v5 * v5 + 1)\n    out = v6',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), w=Tensor("k"), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, w, A, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
TANH_OF_A_SOFTMAX_TOTAL = _regression('fuzz_found_tanh_of_a_softmax_total',
    '    v1 = x.max(1, keepdim=True).values\n    v3 = (x - v1).exp()\n    v5 = v3 / v3.sum(1, keepdim=True)\n    v8 = v5 - v5.max(1, keepdim=True).values\n    v10 = v8.exp().sum(1, keepdim=True)\n    v14 = torch.tanh(v10 + v10)\n    out = v14',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, A, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# the sum over rows of dw: its body's (1 - t**2) was distributed over two masked terms (dout taken out
# first, the rest was not grouped), 45x autograd's error where the tanh saturates
SUMMED_TANH_OF_A_CLAMPED_SOFTPLUS = _regression('fuzz_found_summed_tanh_of_a_clamped_softplus',
    '    v1 = torch.maximum(x, w)\n    v2 = F.softplus(v1)\n    v3 = torch.minimum(v2, w)\n    v5 = torch.tanh(v3)\n    out = v5',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), w=Tensor("k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, w, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# the exponential of a logsumexp: refolding the softmax exp(x - v1) as exp(x)/v2 divided by v2 = exp(v1),
# which underflows to 0 at rows of inputs near -100 (0/0, NaN where autograd is finite)
DIVIDED_BY_AN_EXPONENTIATED_LOGSUMEXP = _regression('fuzz_found_divided_by_an_exponentiated_logsumexp',
    '    v1 = torch.logsumexp(x, dim=1, keepdim=True)\n    v2 = v1.exp()\n    v3 = v2 + v2\n    v4 = v1 + v3\n    out = v4',
    'x=Tensor("n", "k"), w=Tensor("k"), p=Tensor("n", "k", differentiable=False, domain="probability"), '
    'eps=Constant(1e-3), scale=Constant(0.75)',
    'x, w, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# a softmax written with its shift: one draw at inputs times 100 made the whole of the three draws'
# error (the other two one-hot on their rows), and on it autograd's error at an entry whose terms
# cancel was a tenth of its typical size: 38x the kernel's there, as accurate at nearby inputs.
# Failing sums are now judged over six more draws (``battery.CONFIRM_DRAWS``)
SHIFTED_SOFTMAX_OF_A_LUCKY_DRAW = _regression('fuzz_found_shifted_softmax_of_a_lucky_draw',
    '    v1 = F.softmax(A, dim=1)\n    v2 = A.max(1, keepdim=True).values\n    v3 = A - v2\n    v4 = v3.exp()\n    v5 = v4.sum(1, keepdim=True)\n    v6 = v4 / v5\n    out = v6',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, u, A, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# dx of a softmax of a softmax: the closed form summed ``S1*sum(v5*v6) - sum(dv6*v5*v6)``, a
# difference of two sums (S1 itself a sum), 1.2e-10 where autograd's ``sum((dv6 - S1)*v6*v5)`` is
# exactly 0 (inputs times 1e30). A term's sum may now take another sum of it into its body
# (``simplify._the_sum``): here it is torch's softmax backward
SUM_TIMES_A_SUM = _regression('fuzz_found_sum_times_a_sum',
    '    v1 = x.max(1, keepdim=True).values\n    v2 = x - v1\n    v3 = v2.exp()\n    v4 = v3.sum(1, keepdim=True)\n'
    '    v5 = v3 / v4\n    v6 = F.softmax(v5, dim=1)\n    v7 = F.softmax(v6, dim=1)\n    v8 = v7.max(1, keepdim=True).values\n'
    '    v9 = v7 - v8\n    v10 = v9.exp()\n    v11 = v10.sum(1, keepdim=True)\n    v12 = v9 - v11.log()\n'
    '    v13 = v12.sum(dim=(0, 1))\n    out = v13',
    'x=Tensor("n", "k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, u, A, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# softmax(tanh(exp(A))): ``tanh_backward(g*exp(A + v2 - v3), v2)``, the exponential (``exp(A)``
# times the softmax's) overflowed before meeting the saturated tanh's 0 where ``exp(A)`` alone did
# not. Now a factor that is an exponential is multiplied in after the kernel (``upstream_first``)
EXPONENTIAL_MERGED_INTO_A_TANH = _regression('fuzz_found_exponential_merged_into_a_tanh',
    '    v1 = A.exp()\n    v2 = torch.tanh(v1)\n    v3 = v2.max(1, keepdim=True).values\n    v4 = v2 - v3\n'
    '    v5 = v4.exp()\n    v6 = v5.sum(1, keepdim=True)\n    v7 = v5 / v6\n    v8 = torch.tanh(v7)\n    out = v8',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), A=Tensor("k", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, A, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# minimum(x, x - u): both sides pass dx on, so the tie mask of x against x - u cancels from every
# gradient, but stayed a shared temporary with no gradient to need it: ``if :`` (a SyntaxError in
# the generated module). A temporary no gradient reads is now dropped (``kernel``)
UNREAD_TIE_MASK = _regression('fuzz_found_unread_tie_mask',
    '    v1 = x - u\n    v2 = torch.minimum(x, v1)\n    v3 = torch.minimum(w, v2)\n    v4 = torch.maximum(v3, v3)\n'
    '    v5 = 1 - v3\n    v6 = v5.mean()\n    out = v6',
    'x=Tensor("n", "k"), w=Tensor("k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, w, u, A, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# the mean of rsqrt(c*c + 1)**2: the gradient's denominator (c**2 + 1)**2 was multiplied out,
# k*c**4 + 2*k*c**2 + k, infinite in float32 from c = 1e10 (so the gradient 0) where autograd's
# rsqrt(q)**4 is a subnormal; now factored and printed as the reciprocal squared, (1/(c**2 + 1))**2
SQUARED_DENOMINATOR_MULTIPLIED_OUT = _regression('fuzz_found_squared_denominator_multiplied_out',
    '    v1 = torch.rsqrt(c * c + 1)\n    v2 = v1 * v1\n    v3 = v2.mean()\n    out = v3',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, u, A, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# log(softmax(tanh(exp(A)))): the saved v1 = exp(A) went into the tanh's one-pass kernel,
# tanh_backward(g*v1, v4), infinite where g*v1 passes float32's range (A near 87) and v1 does not:
# inf*0 where autograd multiplies the tanh's 0 by v1. A saved exponential now multiplies the result
# (``KernelPrinter.upstream_first``), as an exp the formula computes did
SAVED_EXPONENTIAL_INTO_A_TANH = _regression('fuzz_found_saved_exponential_into_a_tanh',
    '    v1 = A.exp()\n    v4 = torch.tanh(v1)\n    v5 = v4.max(1, keepdim=True).values\n    v6 = v4 - v5\n    v7 = v6.exp()\n'
    '    v8 = v7.sum(1, keepdim=True)\n    v9 = v7 / v8\n    v10 = v9.log()\n    out = v10',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, A, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 7})
# tanh(b + (1 - x)): the fused forward printed (b + 1 - x).tanh_(), SymPy's sum having forgotten the
# spec's grouping, and where b nearly cancels 1 - x the two orders round apart (8.2e-6 against a bar
# of 5.4e-6 at tanh arguments near 20). The forward now keeps each of the spec's sums together
# (``ForwardPrinter._spec_grouping``)
SUM_REGROUPED_IN_THE_FORWARD = _regression('fuzz_found_sum_regrouped_in_the_forward',
    '    v1 = c.mean()\n    v2 = 1 - x\n    v3 = b + v2\n    v4 = torch.tanh(v3)\n    out = v4',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# A softmax written out over a (k, k) A at saturating inputs, its shift's zero adjoint dropped:
# (g - sum(g*s))*s at the argmax of a near one-hot row is a difference of nearly equal terms, 150x
# autograd's float32 error there. The battery's draws had every row 13 long and passed it; one
# draw now has short rows too (``battery.run``), which fails it, and the shift's adjoint is replayed.
SATURATED_SOFTMAX_OF_A_SQUARE = _regression('fuzz_found_saturated_softmax_of_a_square',
    '    v1 = A.max(1, keepdim=True).values\n    v2 = A - v1\n    v3 = v2.exp()\n    v4 = v3.sum(1, keepdim=True)\n    v5 = v3 / v4\n    v6 = v5.exp()\n    v7 = torch.tanh(v5)\n    out = v7',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), c=Tensor("1", "k"), u=Tensor("n", "k", differentiable=False), A=Tensor("k", "k"), p=Tensor("n", "k", differentiable=False, domain="probability"), y=Labels("n", classes="k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, c, u, A, p, y, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# A mean of v11.T @ v11, v11 a clamped softmax of a softmax: the gradient reaching the inner softmax
# is constant along its rows and cancels to 0. The reference is float64's rounding, and autograd's
# float32 lands on exactly 0 on some rows where any other order rounds to 1e-12 of the upstream
# gradient: failed 17x "autograd's error" at one draw in ten. Now held to ulps of the upstream.
GRADIENT_THAT_CANCELS_TO_ZERO = _regression('fuzz_found_gradient_that_cancels_to_zero',
    '    v1 = A.max(1, keepdim=True).values\n    v2 = A - v1\n    v3 = v2.exp()\n    v4 = v3.sum(1, keepdim=True)\n    v5 = v3 / v4\n    v6 = v5.max(1, keepdim=True).values\n    v7 = v5 - v6\n    v8 = v7.exp()\n    v9 = v8.sum(1, keepdim=True)\n    v10 = v8 / v9\n    v11 = v10.clamp(min=-1.0, max=0.5)\n    v12 = v11.T @ v11\n    v13 = v12.mean()\n    out = v13',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), w=Tensor("k"), A=Tensor("k", "k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, w, A, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# x*b/p minus itself: every adjoint is 0, and the derivation document's route dropped a sum that is
# 0 as written (``expand`` now keeps the terms' denominators alike) by replacing the whole
# expression with Python's int 0, which ``expand`` then failed on: the documents were not written
SUM_THAT_IS_ZERO_AS_WRITTEN = _regression('fuzz_found_sum_that_is_zero_as_written',
    '    v1 = x * b\n    v2 = -v1\n    v3 = v1 / p\n    v4 = v3 - v3\n    out = v4',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), p=Tensor("n", "k", differentiable=False, domain="probability"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, b, p, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# a softmax of a softmax of a (1, k) input, its shift's zero adjoint replayed: at inputs times 100
# the first softmax is one-hot and dc is of order 1e-20, but the fused dz at the argmax is a
# difference that is 0 only in exact arithmetic; dz - dz.sum() there kept its residue and lost the
# row's other entries (2.4e-19 off where autograd's chain is off by 6.3e-24). The argmax's entry is
# now minus the total of the others, summed with it zeroed (``printer._added_at_argmax``)
RESIDUE_AT_A_REPLAYED_ARGMAX = _regression('fuzz_found_residue_at_a_replayed_argmax',
    '    v1 = c.max(1, keepdim=True).values\n    v2 = c - v1\n    v3 = v2.exp()\n    v4 = v3.sum(1, keepdim=True)\n'
    '    v5 = v3 / v4\n    v6 = F.softmax(v5, dim=1)\n    v7 = (v6 * v6 + 1).log()\n    v8 = v7 ** 3\n    out = v8',
    'x=Tensor("n", "k"), c=Tensor("1", "k"), w=Tensor("k"), eps=Constant(1e-3), scale=Constant(0.75)',
    'x, c, w, eps=0.001, scale=0.75', True, {'n': 5, 'k': 6})
# A spec variable ``t1`` bound to the output (``t1 = torch.maximum(v5, v2); out = t1``): the output's
# node is ``out``, and the transpose, unnamed, took ``t1``; the step-by-step check read the spec's
# ``t1`` as that node (a (k, k) gradient against the output's (1, k)). Generated names now skip the
# spec's variables.
GENERATED_NAME_OF_A_SPEC_VARIABLE = _regression(
    'fuzz_found_generated_name_of_a_spec_variable',
    '    out = A.T\n    v2 = out.sum(0, keepdim=True)\n    v3 = (v2 * v2 + 1).log()\n    v4 = v3 + v3\n'
    '    v5 = torch.tanh(v4)\n    t1 = torch.maximum(v5, v2)\n    out = t1',
    'x=Tensor("n", "k"), b=Tensor("n", "1"), A=Tensor("k", "k"), y=Labels("n", classes="k"), '
    'eps=Constant(1e-3), scale=Constant(0.75)', 'x, b, A, y, eps=0.001, scale=0.75', True, {'n': 3, 'k': 7})
SOAKED = [SOFTMAX_CANCELS, SOFTMAX_ROWS, SATURATED_TANH_STEPS, SOFTPLUS_UNDERFLOW, INFINITE_THROUGH_MAX,
          INFINITE_THROUGH_PICK, CLAMP_DOCUMENT, WHOLE_SUM_OF_A_SQUARE, SATURATED_SCALAR_TANH,
          SOFTPLUS_SUBNORMAL, SOFTPLUS_OF_SOFTPLUS, TANH_OF_EXP_OVERFLOW, TANH_OF_PICKED_MEAN,
          LOGSUMEXP_OF_SOFTMAX, TANH_OF_ROW_LOGSUMEXP, TIES_OF_A_PICKED_MAXIMUM,
          PRODUCT_OF_A_SAVED_DIFFERENCE, TOTAL_OF_A_SOFTMAX, EXPONENTIAL_OF_A_SHIFT_FACTORED,
          RSQRT_OF_A_LARGE_SQUARE, LOG_OF_A_SQUARED_EXPONENTIAL, SAVED_TOTAL_OF_A_SOFTMAX,
          SCALAR_CHAIN_THROUGH_ATANH, TANH_OF_A_VECTOR_PRODUCT, CENTRED_SQUARE_OF_A_PRODUCT,
          PRODUCT_OF_DIVISORS_OVERFLOWS, SOFTPLUS_INSIDE_A_TANH, CHOSEN_AT_THE_EDGE, SCALAR_POLYNOMIAL_OF_A_TANH,
          SHARED_SQUARE_OF_A_TANH, TANH_OF_A_SOFTMAX_TOTAL, SUMMED_TANH_OF_A_CLAMPED_SOFTPLUS,
          DIVIDED_BY_AN_EXPONENTIATED_LOGSUMEXP, SHIFTED_SOFTMAX_OF_A_LUCKY_DRAW, SUM_TIMES_A_SUM,
          EXPONENTIAL_MERGED_INTO_A_TANH, UNREAD_TIE_MASK, SQUARED_DENOMINATOR_MULTIPLIED_OUT,
          SAVED_EXPONENTIAL_INTO_A_TANH, SUM_REGROUPED_IN_THE_FORWARD, SATURATED_SOFTMAX_OF_A_SQUARE,
          GRADIENT_THAT_CANCELS_TO_ZERO, SUM_THAT_IS_ZERO_AS_WRITTEN, RESIDUE_AT_A_REPLAYED_ARGMAX,
          GENERATED_NAME_OF_A_SPEC_VARIABLE]


class Tally:
    def __init__(self, family: str):
        self.family, self.outcomes, self.start = family, [], time.perf_counter()

    def report(self) -> str:
        passed = sum(o.status == "passed" for o in self.outcomes)
        refused = [o for o in self.outcomes if o.status == "refused"]
        slow = [o for o in self.outcomes if o.status == "slow"]
        lines = [f"fuzz {self.family}: {len(self.outcomes)} random layers tried, {passed} passed, "
                 f"{len(refused)} refused with a clear error, {len(slow)} stopped as slow, "
                 f"{time.perf_counter() - self.start:.0f} s"]
        lines += [f"  slow: {o.message}" for o in slow]
        reasons = sorted({o.message.split(": ", 1)[1] for o in refused})
        lines += [f"  refused: {r}" for r in reasons]
        return "\n".join(lines)


def _fuzz(family: str, fused: bool, tmp_path):
    tally = Tally(family)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get("DERIVE_FUZZ_RANDOM"),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(spec=layer_specs(fused, LINES))
    def check(spec):
        tally.outcomes.append(run(spec, tmp_path))

    check()
    print("\n" + tally.report())
    return tally


def test_random_fused_layers(tmp_path):
    tally = _fuzz("fused", True, tmp_path)
    assert len(tally.outcomes) >= EXAMPLES
    assert all(o.status == "passed" for o in tally.outcomes), tally.report()


def test_random_step_by_step_layers(tmp_path):
    tally = _fuzz("step-by-step", False, tmp_path)
    assert len(tally.outcomes) >= EXAMPLES
    assert all(o.status == "passed" for o in tally.outcomes), tally.report()  # no derivation: never slow


@pytest.mark.parametrize("spec", FOUND + SOAKED, ids=lambda v: v.name)
def test_fuzz_regressions(spec, tmp_path):
    outcome = run(spec, tmp_path)
    assert outcome.status == "passed", outcome.message


def test_a_zero_input_gives_finite_gradients(tmp_path):
    """The divides-by-input regression at the point where it went wrong: b = 0 (a zero-initialized bias)."""
    from derive.layers import from_file
    from derive.verify import load_module
    run(DIVIDES_BY_INPUT, tmp_path)
    (layer,) = from_file(str(tmp_path / f"{DIVIDES_BY_INPUT.name}.py"))
    fused = getattr(load_module(tmp_path / layer.name / f"{layer.name}.py"), layer.name)
    x = torch.randn(3, 4, dtype=torch.float64)
    b = torch.zeros(3, 1, dtype=torch.float64)
    ours = torch.autograd.grad(fused(x, b.requires_grad_()).sum(), b)[0]
    reference = torch.autograd.grad(layer.fn(x, b).sum(), b)[0]
    assert torch.isfinite(ours).all() and torch.allclose(ours, reference)


def _soak_script(name: str):
    """``scripts/soak.py`` imported as the module ``name`` (a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
    spec = importlib.util.spec_from_file_location(name, script)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    return soak


def test_the_soak_script_goes_on_past_a_failure_and_keeps_its_spec(tmp_path, monkeypatch, capsys):
    """``scripts/soak.py`` tallies every layer, saves each failing spec, and exits 1 when one failed."""
    import fuzz.harness

    soak = _soak_script("derive_soak")
    real_run, calls = fuzz.harness.run, []

    def every_third_fails(layer_spec, folder, *args, **kwargs):
        calls.append(layer_spec.name)
        if len(calls) % 3 == 0:
            raise AssertionError("a planted failure")
        return real_run(layer_spec, folder, *args, **kwargs)

    monkeypatch.setattr(fuzz.harness, "run", every_third_fails)
    monkeypatch.setenv("DERIVE_FUZZ_SECONDS", "20")  # main() sets it; restored afterwards
    status = soak.main(["--family", "steps", "--examples", "9", "--lines", "2", "--save", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "9 random layers tried" in out and "6 passed, 0 refused, 0 slow, 3 failed" in out
    saved = sorted(p.stem for p in tmp_path.glob("*.py"))
    assert saved == sorted({calls[2], calls[5], calls[8]})
    assert out.count("a planted failure") == 3


def test_the_soak_script_runs_saved_specs_again(tmp_path, monkeypatch, capsys):
    """``scripts/soak.py --spec FILE...`` checks the given spec files (a step-by-step one as such)
    instead of random layers, and refuses a file that is not there in one line."""
    import fuzz.harness

    soak = _soak_script("derive_soak_again")
    real_run, seen = fuzz.harness.run, []

    def second_fails(layer_spec, folder, *args, **kwargs):
        seen.append((layer_spec.name, layer_spec.fused))
        if len(seen) == 2:
            raise AssertionError("a planted failure")
        return real_run(layer_spec, folder, *args, **kwargs)

    monkeypatch.setattr(fuzz.harness, "run", second_fails)
    monkeypatch.setenv("DERIVE_FUZZ_SECONDS", "20")
    files = [tmp_path / f"{s.name}.py" for s in (UNREAD_INPUT, TANH_OF_A_SOFTMAX_TOTAL)]
    for path, s in zip(files, (UNREAD_INPUT, TANH_OF_A_SOFTMAX_TOTAL)):
        path.write_text(s.source)
    save = tmp_path / "saved"
    status = soak.main(["--spec", *map(str, files), "--save", str(save)])
    out = capsys.readouterr().out
    assert status == 1 and "soak of 2 saved layers: 1 passed, 0 refused, 0 slow, 1 failed" in out, out
    assert seen == [(UNREAD_INPUT.name, False), (TANH_OF_A_SOFTMAX_TOTAL.name, True)]
    assert [p.stem for p in save.glob("*.py")] == [TANH_OF_A_SOFTMAX_TOTAL.name]
    with pytest.raises(SystemExit):
        soak.main(["--spec", str(tmp_path / "missing.py")])
    assert "--spec: no such file" in capsys.readouterr().err


def test_a_saved_spec_with_its_own_dimension_names_is_checked_and_timed(tmp_path, capsys):
    """A user's spec saved for ``--spec`` names its dimensions as it likes (``d``, not the fuzzer's
    ``k``): each takes the size at its position, for the check and for the timing (both raised
    ``KeyError: 'd'``)."""
    soak = _soak_script("derive_soak_dims")
    path = tmp_path / "own_dims.py"
    path.write_text('''import torch
from derive import Tensor, layer


@layer(x=Tensor("n", "d"), w=Tensor("d"))
def own_dims(x, w):
    return torch.tanh(x * w).sum()
''')
    assert soak._check_sizes(path) == {"n": 5, "d": 6}
    status = soak.main(["--spec", str(path), "--save", str(tmp_path / "saved"), "--time", "--time-size", "64x16",
                        "--time-repeat", "1", "--time-min-ms", "1"])
    out = capsys.readouterr().out
    assert status == 0 and "1 passed" in out and "1 layers: median" in out, out


def test_the_timing_report_keeps_every_layer_above_the_bar(tmp_path, capsys):
    """The timing report lists the slowest layers, of all and of those where autograd does work
    enough, and saves the spec of every layer above 1.1 (it kept the ten slowest only, so the
    slow layers of some size were lost behind ten tiny ones), and none of those at or below it
    that it does not list."""
    soak = _soak_script("derive_soak_report")
    times = {f"layer{k}": (ratio, "fused", ms) for k, (ratio, ms) in
             enumerate([(3.0, 0.02), (2.5, 0.03), (1.5, 4.0), (1.2, 2.0), (1.05, 3.0), (0.8, 5.0)])}
    sources = {name: f"# {name}\n" for name in times}
    soak.timing_report(times, sources, tmp_path, "1024x512", worst=1)
    out = capsys.readouterr().out
    saved = sorted(p.stem for p in (tmp_path / "timing").glob("*.py"))
    assert saved == ["layer0", "layer1", "layer2", "layer3"], saved
    assert "slowest with autograd at 0.5 ms or more:\n  1.50" in out, out
    assert "6 layers" in out and "4 above 1.1" in out, out


def test_the_derivation_limit_counts_cpu_time_not_waiting():
    """A derivation is stopped by the CPU time it takes, not by the wall time that passes while
    other tests share the machine: a busy loop is stopped soon after the limit, a wait of twice
    the limit is not stopped at all."""
    from fuzz.harness import TooSlow, time_limit

    start = time.process_time()
    with pytest.raises(TooSlow):
        with time_limit(0.2):
            while time.process_time() - start < 5:
                pass
    assert time.process_time() - start < 2
    with time_limit(0.2):
        time.sleep(0.4)  # no CPU time: never stopped
