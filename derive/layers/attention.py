"""Attention, written the way PyTorch users write it."""
import math

import torch

from ..spec import Tensor, layer


@layer(q=Tensor("n", "d"), k=Tensor("m", "d"), v=Tensor("m", "e"))
def attention(q, k, v):
    """Scaled dot-product attention of one head, ``softmax(q @ k.T / sqrt(d)) @ v``, as
    ``F.scaled_dot_product_attention(q, k, v)``."""
    scores = q @ k.T / math.sqrt(q.shape[1])
    probs = torch.softmax(scores, dim=1)
    out = probs @ v
    return out
