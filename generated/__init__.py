"""Generated backward passes: `<layer>.py` (fused kernel), `<layer>_steps.py` (step by step). Regenerate with `derive generate`."""
