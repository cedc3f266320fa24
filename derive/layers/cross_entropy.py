"""Softmax cross-entropy, written line by line as in the backprop exercise."""
from derive.spec import Labels, Tensor, layer


@layer(logits=Tensor("n", "k"), y=Labels("n", classes="k"))
def cross_entropy(logits, y):
    """Mean negative log-likelihood of the labels ``y`` under ``softmax(logits)``."""
    n = logits.shape[0]
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes  # subtract the row max for numerical stability
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdim=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), y].mean()
    return loss
