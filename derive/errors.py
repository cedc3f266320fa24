"""Errors that name the layer, the operation, the source line and the fix."""
from __future__ import annotations


class DeriveError(Exception):
    """Base class: every error the toolkit raises on purpose."""


class SpecError(DeriveError):
    def __init__(self, layer: str, problem: str, fix: str, line: int | None = None, source: str = ""):
        where = f" (line {line}: {source.strip()})" if line else ""
        super().__init__(f"layer {layer!r}{where}: {problem}. Fix: {fix}.")
        self.layer, self.problem, self.fix, self.line, self.source = layer, problem, fix, line, source

    def __reduce__(self):  # raised in a worker process, pickled back to the parent
        return type(self), (self.layer, self.problem, self.fix, self.line, self.source)


class TraceError(SpecError):
    """The forward pass uses something the tracer cannot follow."""


class DerivationError(SpecError):
    """The engine cannot derive a fused backward for this layer.

    Raised where the layer is not known (the printer), it names the ``tensor`` it could not print,
    so that the caller can add the layer and the spec line that computes or reads that tensor."""

    def __init__(self, layer: str, problem: str, fix: str, line: int | None = None, source: str = "",
                 tensor: str = ""):
        super().__init__(layer, problem, fix, line, source)
        self.tensor = tensor

    def __reduce__(self):
        return type(self), (self.layer, self.problem, self.fix, self.line, self.source, self.tensor)


class ProofFailure(AssertionError):
    """A derived formula or the code printed from it disagrees with the derivative it must equal:
    a bug of the engine, never of the spec (nothing is written when one is raised)."""
