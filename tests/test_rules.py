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


@layer(a=Tensor("n", "d"))
def torch_activations(a):
    return F.gelu(a) * F.silu(a) + F.gelu(a, approximate="tanh") - F.elu(a, 0.5) * F.leaky_relu(a, 0.2)


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
    return a.max(1, keepdim=True).values * a.max(0).values + a.amax(1, keepdim=True) * a.amin(0)


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


@layer(a=Tensor("n", "d"))
def roots_and_friends(a):
    return (torch.sqrt(a * a + 1) * torch.rsqrt(a * a + 2) + torch.erf(a) + torch.sin(a) * torch.cos(a)
            + torch.log1p(a * a) + a.square() * a.reciprocal())


@layer(a=Tensor("n", "d"))
def clamps(a):
    return a.clamp(min=-0.5, max=0.5) * a.clamp(max=0.25)


@layer(a=Tensor("n", "d"), b=Tensor("n", "1"))
def where_masks(a, b):
    return torch.where((a > 0) & ~(a <= b), a, b * 2) + torch.where(a != 1, a, 0.5) * (a >= b) * (a < 3) * (a == 2).logical_not()


@layer(a=Tensor("n", "d"), b=Tensor("n", "1"))
def extrema(a, b):
    return torch.maximum(a, b) * torch.minimum(a, b)


@layer(a=Tensor("n", "d"))
def softmaxes(a):
    return F.softmax(a, dim=1) * F.log_softmax(a, dim=0) + torch.logsumexp(a, 1, keepdim=True) + a.logsumexp(0)


@layer(a=Tensor("n", "d", "k"), b=Tensor("n", "1"))
def permute_expand(a, b):
    return a.permute(2, 0, 1).sum(0) * b.expand(-1, a.shape[1]) + a.transpose(0, 1).sum(2).T


@layer(a=Tensor("b", "n", "d"), w=Tensor("b", "d", "k"))
def batched_matmul(a, w):
    return a @ w


CASES = [
    (add_column, N3_D2), (sub_row, N3_D2), (mul_3x2_by_3x1, N3_D2), (div_3x1_by_3x2, N3_D2),
    (cube_and_inverse, N3_D2), (exp_log_tanh, N3_D2), (sigmoid_relu_abs_softplus, N3_D2), (torch_activations, N3_D2), (sums, N3_D2), (means, N3_D2), (maxima, N3_D2),
    (matmul, {"n": 3, "d": 2, "k": 2}), (pick, {"n": 3, "k": 3}),
    (embed_and_view, {"n": 2, "t": 2, "v": 3, "e": 2}),
    (roots_and_friends, N3_D2), (clamps, N3_D2), (where_masks, N3_D2), (extrema, N3_D2), (softmaxes, N3_D2),
    (permute_expand, {"n": 2, "d": 3, "k": 2}), (batched_matmul, {"b": 2, "n": 2, "d": 2, "k": 2}),
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


MASKS = {"gt", "ge", "lt", "le", "eq", "ne", "not", "and"}  # no gradient flows back through a mask


def test_masks_have_no_gradient():
    for op in MASKS:
        assert rules.RULES[op] is rules._no_gradient


@pytest.mark.parametrize("op", sorted(set(rules.RULES) - MASKS))
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
