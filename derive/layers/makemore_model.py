"""The makemore MLP written with layer calls: its backward uses the fused batchnorm and
cross-entropy kernels, and the step-by-step rules for the embedding, linear layers and tanh."""
import torch

from derive.spec import Labels, Tensor, layer

from .batchnorm import batchnorm
from .cross_entropy import cross_entropy
from .makemore_mlp import exercise_inputs


@layer(
    C=Tensor("v", "e"), Xb=Labels("n", "t", classes="v"),
    W1=Tensor("t*e", "hidden"), b1=Tensor("hidden"), bngain=Tensor("hidden"), bnbias=Tensor("hidden"),
    W2=Tensor("hidden", "v"), b2=Tensor("v"), Yb=Labels("n", classes="v"),
)
def makemore_model(C, Xb, W1, b1, bngain, bnbias, W2, b2, Yb):
    """Character-level MLP language model: embedding, linear, batchnorm, tanh, linear, cross-entropy."""
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    hpreact = batchnorm(hprebn, bngain, bnbias)
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    loss = cross_entropy(logits, Yb)
    return loss


makemore_model.example = exercise_inputs
makemore_model.fused = False  # its backward is assembled from fused kernels and step rules
