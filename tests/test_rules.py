"""Every vector-Jacobian rule is proven on small symbolic matrices, broadcasting included,
and breaking any rule makes its proof fail."""
import pytest
import torch
import torch.nn.functional as F

from derive import rules
from derive.prove import ProofFailure, prove_steps
from derive.spec import Labels, Tensor, layer
from derive.trace import trace

N3_D2 = {"n": 3, "d": 2}


@layer(a=Tensor("n", "d"), b=Tensor("n", "1"))
def add_column(a, b):
    return a + b


@layer(a=Tensor("n", "d"), b=Tensor("d"))
def sub_row(a, b):
    return a - b


@layer(a=Tensor("n", "d"), b=Tensor("n", "1"))
def mul_3x2_by_3x1(a, b):
    return a * b


@layer(a=Tensor("n", "1"), b=Tensor("n", "d"))
def div_3x1_by_3x2(a, b):
    return a / b


@layer(a=Tensor("n", "d"))
def cube_and_inverse(a):
    return a**3 + a**-1


@layer(a=Tensor("n", "d"))
def exp_log_tanh(a):
    return torch.log(torch.exp(a) + 1) * torch.tanh(a)


@layer(a=Tensor("n", "d"))
def sigmoid_relu_abs_softplus(a):
    return torch.sigmoid(a) * torch.relu(a) + torch.abs(a) * a.clamp(min=0.5) - F.softplus(a)


@layer(a=Tensor("n", "d"), b=Tensor("d"))
def sums(a, b):
    return a.sum(0, keepdim=True) * b + a.sum(1).sum() + a.sum()


@layer(a=Tensor("n", "d"))
def means(a):
    return a.mean(1, keepdim=True) * a.mean(0) + a.mean()


@layer(a=Tensor("n", "d"))
def maxima(a):
    return a.max(1, keepdim=True).values * a.max(0).values


@layer(a=Tensor("n", "d"), w=Tensor("d", "k"))
def matmul(a, w):
    return a @ w


@layer(a=Tensor("n", "k"), y=Labels("n", classes="k"))
def pick(a, y):
    n = a.shape[0]
    return a[range(n), y] * a[range(n), y]


@layer(C=Tensor("v", "e"), X=Labels("n", "t", classes="v"))
def embed_and_view(C, X):
    emb = C[X]
    return emb.view(emb.shape[0], -1)


CASES = [
    (add_column, N3_D2), (sub_row, N3_D2), (mul_3x2_by_3x1, N3_D2), (div_3x1_by_3x2, N3_D2),
    (cube_and_inverse, N3_D2), (exp_log_tanh, N3_D2), (sigmoid_relu_abs_softplus, N3_D2), (sums, N3_D2), (means, N3_D2), (maxima, N3_D2),
    (matmul, {"n": 3, "d": 2, "k": 2}), (pick, {"n": 3, "k": 3}),
    (embed_and_view, {"n": 2, "t": 2, "v": 3, "e": 2}),
]


def ops_of(spec):
    return {n.op for n in trace(spec).nodes} - {"input", "labels"}


def test_every_rule_has_a_case():
    covered = set().union(*[ops_of(spec) for spec, _ in CASES])
    assert covered == set(rules.RULES)


@pytest.mark.parametrize("spec,sizes", CASES, ids=[c[0].name for c in CASES])
def test_rule_equals_elementwise_derivative(spec, sizes):
    proof = prove_steps(trace(spec), sizes)
    assert proof.elements_checked > 0


def _broken(rule):
    """The same rule with its first gradient doubled."""
    def wrong(*args, **kwargs):
        grads = list(rule(*args, **kwargs))
        k = next(i for i, g in enumerate(grads) if g is not None)
        grads[k] = grads[k] * 2
        return tuple(grads)
    return wrong


@pytest.mark.parametrize("op", sorted(rules.RULES))
def test_a_broken_rule_fails_its_proof(op, monkeypatch):
    spec, sizes = next((s, z) for s, z in CASES if op in ops_of(s))
    monkeypatch.setitem(rules.RULES, op, _broken(rules.RULES[op]))
    with pytest.raises(ProofFailure):
        prove_steps(trace(spec), sizes)


def test_a_missing_rule_is_named(monkeypatch):
    from derive.errors import DerivationError
    monkeypatch.delitem(rules.RULES, "tanh")
    with pytest.raises(DerivationError, match=r"exp_log_tanh.*no gradient rule for 'tanh'"):
        prove_steps(trace(exp_log_tanh), N3_D2)
