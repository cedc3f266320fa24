

@layer(logits=Tensor("n", "d"), target=Tensor("n", "d", differentiable=False))
def bce_with_logits(logits, target):
    """Binary cross-entropy of ``sigmoid(logits)`` against targets in [0, 1], averaged, as
    ``F.binary_cross_entropy_with_logits``; written in the stable form
    ``max(x, 0) - x*t + log(1 + exp(-|x|))``, which never exponentiates a large positive number."""
    per_element = torch.relu(logits) - logits * target + (1 + (-logits.abs()).exp()).log()
    loss = per_element.mean()
    return loss
