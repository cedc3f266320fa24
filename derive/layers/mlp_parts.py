"""The makemore MLP's other layers, each a spec of its own (usable as generated Functions)."""
from derive.spec import Labels, Tensor, layer


@layer(C=Tensor("v", "e"), X=Labels("n", "t", classes="v"))
def embedding(C, X):
    """Look up each index's row of the table and concatenate the rows of one example."""
    emb = C[X]
    embcat = emb.view(emb.shape[0], -1)
    return embcat


@layer(x=Tensor("n", "i"), W=Tensor("i", "o"), b=Tensor("o"))
def linear(x, W, b):
    """Affine map ``x @ W + b``."""
    out = x @ W + b
    return out


# The fused engine has no element-wise form for a view that merges axes (embcat): the embedding
# uses the step rules. (linear is fused: its gradients print as contractions, torch.einsum.)
embedding.fused = False
