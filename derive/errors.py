"""Errors that name the layer, the operation, the source line and the fix."""
from __future__ import annotations


class DeriveError(Exception):
    """Base class: every error the toolkit raises on purpose."""


class SpecError(DeriveError):
    """A mistake in a spec: ``FILE: layer 'name' (line N: the line): what is wrong. Fix: the fix.``

    ``file`` is the spec's file where it is known; the command line fills it in from the layer when
    the place that raised did not know it."""

    def __init__(self, layer: str, problem: str, fix: str, line: int | None = None, source: str = "",
                 file: str = ""):
        super().__init__(layer, problem, fix, line, source)
        self.layer, self.problem, self.fix, self.line, self.source, self.file = layer, problem, fix, line, source, file

    def __str__(self):
        where = (f"(line {self.line}: {self.source.strip()})" if self.source.strip() else f"(line {self.line})") if self.line else ""
        what = " ".join(filter(None, [f"layer {self.layer!r}" if self.layer else "", where]))
        place = f"{self.file}: {what}" if self.file and what.startswith("layer") else " ".join(filter(None, [self.file, what]))
        return f"{place}: {self.problem}. Fix: {self.fix}."

    def __reduce__(self):  # raised in a worker process, pickled back to the parent
        return _restore, (type(self), dict(vars(self)))


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



def _restore(cls, state: dict) -> SpecError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("layer"), state.get("problem"), state.get("fix"))
    vars(error).update(state)
    return error


class ProofFailure(AssertionError):
    """A derived formula or the code printed from it disagrees with the derivative it must equal:
    a bug of the engine, never of the spec (nothing is written when one is raised)."""
