"""derive: write a layer's forward pass in plain PyTorch; get its fused backward derived, proven and generated."""
from .spec import Constant, Labels, Layer, Tensor, layer

__all__ = ["layer", "Tensor", "Labels", "Constant", "Layer"]
