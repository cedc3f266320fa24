"""Generated fused kernels: one module per layer. Regenerate with `derive generate`."""
