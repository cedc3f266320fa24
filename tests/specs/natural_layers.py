"""Layers as people write them in PyTorch, first try: normalizations, attention, recurrent cells,
pooling, losses, quadratic forms and heads. The tests derive each one and hold it against
autograd through the same function."""
import math

import torch
import torch.nn.functional as F

from derive import Constant, Labels, Tensor, layer


# -- normalizations ---------------------------------------------------------------------------------
@layer(x=Tensor("n", "d"), w=Tensor("d"), b=Tensor("d"))
def layer_norm_functional(x, w, b):
    return F.layer_norm(x, (x.shape[1],), w, b, 1e-5)


@layer(x=Tensor("n", "d"), w=Tensor("d"), b=Tensor("d"))
def layer_norm_var(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


@layer(x=Tensor("n", "d"), g=Tensor("d"))
def rms_norm_rsqrt(x, g):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g


@layer(x=Tensor("n", "c", "l"), gamma=Tensor("c"), beta=Tensor("c"))
def instance_norm(x, gamma, beta):
    mu = x.mean(dim=2, keepdim=True)
    sigma = x.std(dim=2, keepdim=True, unbiased=False)
    return (x - mu) / (sigma + 1e-5) * gamma[:, None] + beta[:, None]


@layer(x=Tensor("n", "c", "l"), gamma=Tensor("c"), beta=Tensor("c"))
def batch_norm_1d(x, gamma, beta):
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2), keepdim=True)
    return (x - mean) / (var + 1e-5).sqrt() * gamma.view(1, -1, 1) + beta.view(1, -1, 1)


@layer(x=Tensor("n", "c"), gamma=Tensor("c"), beta=Tensor("c"))
def group_norm(x, gamma, beta):
    n, c = x.shape
    groups = 2
    xg = x.view(n, groups, c // groups)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, keepdim=True, unbiased=False)
    xhat = ((xg - mean) / torch.sqrt(var + 1e-5)).reshape(n, c)
    return xhat * gamma + beta


@layer(x=Tensor("n", "d"))
def l2_normalize(x):
    return F.normalize(x, dim=-1)


# -- attention --------------------------------------------------------------------------------------
@layer(q=Tensor("n", "d"), k=Tensor("m", "d"), v=Tensor("m", "e"))
def attention(q, k, v):
    scores = q @ k.T / math.sqrt(q.shape[-1])
    weights = F.softmax(scores, dim=-1)
    return weights @ v


@layer(x=Tensor("t", "c"), wq=Tensor("c", "c"), wk=Tensor("c", "c"), wv=Tensor("c", "c"))
def self_attention(x, wq, wk, wv):
    q, k, v = x @ wq, x @ wk, x @ wv
    att = (q @ k.transpose(0, 1)) * k.shape[-1] ** -0.5
    att = att.softmax(dim=-1)
    return att @ v


@layer(q=Tensor("t", "d"), k=Tensor("t", "d"), v=Tensor("t", "d"),
       mask=Tensor("t", "t", differentiable=False, domain="binary"))
def masked_attention(q, k, v, mask):
    scores = q @ k.t() / q.shape[1] ** 0.5
    scores = scores.masked_fill(mask == 0, -1e9)
    return torch.softmax(scores, dim=1) @ v


@layer(x=Tensor("b", "t", "c"), w=Tensor("c", "c"))
def batched_attention(x, w):
    q = x @ w
    att = torch.softmax(q @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
    return att @ x


# -- recurrent cells --------------------------------------------------------------------------------
@layer(x=Tensor("n", "i"), h=Tensor("n", "h"), wx=Tensor("i", "h"), wh=Tensor("h", "h"), b=Tensor("h"))
def rnn_cell(x, h, wx, wh, b):
    return torch.tanh(x @ wx + h @ wh + b)


@layer(x=Tensor("n", "i"), h=Tensor("n", "h"), wz=Tensor("i", "h"), uz=Tensor("h", "h"),
       wr=Tensor("i", "h"), ur=Tensor("h", "h"), wn=Tensor("i", "h"), un=Tensor("h", "h"))
def gru_cell(x, h, wz, uz, wr, ur, wn, un):
    z = torch.sigmoid(x @ wz + h @ uz)
    r = torch.sigmoid(x @ wr + h @ ur)
    cand = torch.tanh(x @ wn + (r * h) @ un)
    return (1 - z) * h + z * cand


@layer(x=Tensor("n", "i"), h=Tensor("n", "h"), c=Tensor("n", "h"), wi=Tensor("i", "h"), ui=Tensor("h", "h"),
       wf=Tensor("i", "h"), uf=Tensor("h", "h"), wo=Tensor("i", "h"), uo=Tensor("h", "h"),
       wg=Tensor("i", "h"), ug=Tensor("h", "h"))
def lstm_cell(x, h, c, wi, ui, wf, uf, wo, uo, wg, ug):
    i = torch.sigmoid(x @ wi + h @ ui)
    f = torch.sigmoid(x @ wf + h @ uf)
    o = torch.sigmoid(x @ wo + h @ uo)
    g = torch.tanh(x @ wg + h @ ug)
    c_next = f * c + i * g
    return o * torch.tanh(c_next)


# -- pooling ----------------------------------------------------------------------------------------
@layer(x=Tensor("n", "t", "c"))
def mean_max_pool(x):
    return x.mean(dim=1) + x.amax(dim=1)


@layer(x=Tensor("n", "t", "c"), w=Tensor("c"))
def attention_pool(x, w):
    weights = torch.softmax(x @ w, dim=1)
    return (weights.unsqueeze(-1) * x).sum(dim=1)


@layer(x=Tensor("n", "t", "c"))
def logsumexp_pool(x):
    return torch.logsumexp(x, dim=1)


@layer(table=Tensor("v", "e"), tokens=Labels("n", "t", classes="v"))
def bag_of_embeddings(table, tokens):
    return table[tokens].mean(1)


# -- losses -----------------------------------------------------------------------------------------
@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def cross_entropy_functional(logits, y):
    return F.cross_entropy(logits, y)


@layer(logits=Tensor("n", "k"), target=Tensor("n", "k", differentiable=False, domain="probability"))
def soft_cross_entropy(logits, target):
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@layer(logits=Tensor("n", "k"), target=Tensor("n", "k", differentiable=False, domain="probability"))
def kl_divergence(logits, target):
    return (target * (target.log() - torch.log_softmax(logits, -1))).sum(-1).mean()


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def focal_loss(logits, y):
    logp = F.log_softmax(logits, dim=-1)[torch.arange(logits.shape[0]), y]
    p = logp.exp()
    return (-(1 - p) ** 2 * logp).mean()


@layer(scores=Tensor("n", "k"), y=Labels("n", classes="k"))
def multiclass_hinge(scores, y):
    n = scores.shape[0]
    correct = scores[range(n), y].unsqueeze(1)
    return torch.clamp(1 + scores - correct, min=0).sum(1).mean()


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def huber(pred, target):
    diff = (pred - target).abs()
    return torch.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).mean()


@layer(logits=Tensor("n"), target=Tensor("n", differentiable=False, domain="unit"))
def bce_logits_functional(logits, target):
    return F.binary_cross_entropy_with_logits(logits, target)


@layer(a=Tensor("n", "d"), b=Tensor("n", "d"))
def cosine_loss(a, b):
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return (1 - cos).mean()


@layer(anchor=Tensor("n", "d"), pos=Tensor("n", "d"), neg=Tensor("n", "d"))
def triplet_margin(anchor, pos, neg):
    d_pos = ((anchor - pos) ** 2).sum(1)
    d_neg = ((anchor - neg) ** 2).sum(1)
    return F.relu(d_pos - d_neg + 1.0).mean()


@layer(pred=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def mse_functional(pred, target):
    return F.mse_loss(pred, target)


# -- quadratic forms --------------------------------------------------------------------------------
@layer(x=Tensor("n", "d"), A=Tensor("d", "d"))
def quadratic_form(x, A):
    return ((x @ A) * x).sum(-1)


@layer(x=Tensor("n", "d"), mu=Tensor("d"), L=Tensor("d", "d"))
def mahalanobis(x, mu, L):
    z = (x - mu) @ L
    return (z * z).sum(1).sqrt()


@layer(x=Tensor("n", "p"), W=Tensor("p", "q"), y=Tensor("n", "q"))
def bilinear(x, W, y):
    return ((x @ W) * y).sum(1)


# -- heads ------------------------------------------------------------------------------------------
@layer(h=Tensor("n", "d"), W=Tensor("k", "d"), b=Tensor("k"), y=Labels("n", classes="k"))
def linear_cross_entropy(h, W, b, y):
    return F.cross_entropy(F.linear(h, W, b), y)


@layer(x=Tensor("n", "d"), w1=Tensor("d", "h"), w2=Tensor("h", "o"))
def mlp_gelu(x, w1, w2):
    return F.gelu(x @ w1) @ w2


@layer(x=Tensor("n", "d"), wa=Tensor("d", "h"), wb=Tensor("d", "h"))
def glu(x, wa, wb):
    return (x @ wa) * torch.sigmoid(x @ wb)


@layer(a=Tensor("n", "d"), b=Tensor("n", "d"), W=Tensor("d", "h"))
def gated_projection(a, b, W):
    return (a * torch.sigmoid(b)) @ W


@layer(x=Tensor("n", "d"), s=Tensor("d"), W=Tensor("d", "h"))
def scaled_projection(x, s, W):
    return (x * s) @ W


@layer(x=Tensor("n", "d"), s=Tensor("d"), W=Tensor("d", "h"))
def scaled_tanh_projection(x, s, W):
    return torch.tanh((x * s) @ W)


@layer(x=Tensor("n", "d"), w=Tensor("d", "h"), v=Tensor("h"))
def swiglu_score(x, w, v):
    return F.silu(x @ w) @ v


@layer(x=Tensor("n", "d"), w=Tensor("d", "k"), temperature=Tensor("1"))
def softmax_with_temperature(x, w, temperature):
    return torch.softmax((x @ w) / temperature, dim=-1)


@layer(x=Tensor("n", "d"), W=Tensor("d", "h"), b=Tensor("h"))
def relu_of_a_variable_named_out(x, W, b):
    out = x @ W + b  # the name the generated code gives an output of its own
    return F.relu(out)


@layer(x=Tensor("n", "k"))
def softmax_over_an_axis_of_one(x):
    totals = x.sum(0, keepdim=True)
    weights = torch.softmax(totals, dim=0)  # over the axis of 1: ones, as torch computes them
    return x * weights + F.log_softmax(totals, dim=0)


@layer(x=Tensor("n", "d"), W=Tensor("d", "d"), b=Tensor("d"))
def input_name_bound_again(x, W, b):
    x = torch.tanh(x @ W + b)  # the input's name bound to a new value, as module code often does
    return x * x
