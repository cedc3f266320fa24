"""The makemore MLP of the backprop exercise: embedding, linear, batchnorm, tanh, linear, cross-entropy."""
import torch

from derive.spec import Labels, Tensor, layer


@layer(
    C=Tensor("v", "e"), Xb=Labels("n", "t", classes="v"),
    W1=Tensor("t*e", "hidden"), b1=Tensor("hidden"), bngain=Tensor("hidden"), bnbias=Tensor("hidden"),
    W2=Tensor("hidden", "v"), b2=Tensor("v"), Yb=Labels("n", classes="v"),
)
def makemore_mlp(C, Xb, W1, b1, bngain, bnbias, W2, b2, Yb):
    """Character-level MLP language model, forward pass chunked as in the exercise."""
    n = Xb.shape[0]
    emb = C[Xb]  # embed the characters into vectors
    embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
    hprebn = embcat @ W1 + b1  # hidden layer pre-activation
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)  # Bessel's correction
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)  # hidden layer
    logits = h @ W2 + b2  # output layer
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes  # subtract max for numerical stability
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdim=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()
    return loss


def exercise_inputs(sizes, dtype=torch.float32, seed=2147483647):
    """The exercise's initialization: small non-zero biases and batchnorm parameters, so that no
    gradient is trivially zero and a wrong formula cannot hide."""
    g = torch.Generator().manual_seed(seed)
    v, e, t, h, n = (sizes[k] for k in ("v", "e", "t", "hidden", "n"))
    fan_in = t * e
    values = dict(
        C=torch.randn((v, e), generator=g),
        Xb=torch.randint(0, v, (n, t), generator=g),
        W1=torch.randn((fan_in, h), generator=g) * (5 / 3) / fan_in**0.5,
        b1=torch.randn(h, generator=g) * 0.1,
        bngain=torch.randn(h, generator=g) * 0.1 + 1.0,
        bnbias=torch.randn(h, generator=g) * 0.1,
        W2=torch.randn((h, v), generator=g) * 0.1,
        b2=torch.randn(v, generator=g) * 0.1,
        Yb=torch.randint(0, v, (n,), generator=g),
    )
    return {k: x.to(dtype) if x.is_floating_point() else x for k, x in values.items()}


# The exercise's sizes: batch 32, block size 3, embedding 10, hidden 64, vocabulary 27.
EXERCISE_SIZES = {"n": 32, "t": 3, "e": 10, "hidden": 64, "v": 27}
makemore_mlp.example = exercise_inputs
# The fused engine does not yet derive through the embedding lookup and the view; this layer gets
# the step-by-step backward.
makemore_mlp.fused = False
