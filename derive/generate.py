"""The main job: derive every layer, write its files, prove it, check it against autograd, report.

``generate`` writes ``<out>/<name>.py`` and ``<out>/derivations/<name>.tex|.md`` for each layer;
``check`` renders the same files in memory and names every file in ``<out>`` that differs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .codegen import render_function
from .derivation import render_markdown, render_tex
from .errors import DeriveError
from .files import is_hand_edited, write_atomic
from .kernel import Kernel, build
from .prove import Proof, default_sizes, prove
from .spec import Layer
from .verify import against_autograd, load_module

PACKAGE_INIT = '"""Generated fused kernels: one module per layer. Regenerate with `derive generate`."""\n'


def render(kernel: Kernel) -> dict[str, str]:
    """Relative path -> text of every file generated for ``kernel``."""
    return {
        f"{kernel.name}.py": render_function(kernel),
        f"derivations/{kernel.name}.tex": render_tex(kernel),
        f"derivations/{kernel.name}.md": render_markdown(kernel),
    }


@dataclass
class Report:
    layer: str
    gradients: list[str]
    proofs: list[Proof] = field(default_factory=list)
    maxdiff: float = float("nan")
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)

    def line(self) -> str:
        proven = ", ".join("x".join(str(v) for v in p.sizes.values()) for p in self.proofs) or "-"
        return (f"{self.layer:18s} {' '.join(self.gradients):24s} proven at {proven:22s} "
                f"float64 maxdiff {self.maxdiff:.1e}   {self.seconds:5.1f} s")


class HandEditedError(DeriveError):
    pass


def generate(layers: list[Layer], out: Path, *, prove_sizes: bool = True, force: bool = False,
             echo=print) -> list[Report]:
    out = Path(out)
    reports = []
    write_atomic(out / "__init__.py", PACKAGE_INIT)
    for layer in layers:
        start = time.perf_counter()
        kernel = build(layer)
        files = render(kernel)
        edited = [out / rel for rel in files if is_hand_edited(out / rel)]
        if edited and not force:
            raise HandEditedError(f"{edited[0]} was edited by hand (its content hash no longer matches); "
                                  f"move your changes into the spec, or pass --force to overwrite it")
        report = Report(layer.name, [f"d{f.input}" for f in kernel.formulas])
        for rel, text in files.items():
            if write_atomic(out / rel, text):
                report.written.append(rel)
        if prove_sizes:
            report.proofs = [prove(kernel, s) for s in default_sizes(kernel)]
        module = load_module(out / f"{layer.name}.py")
        sizes = {d: 5 + 2 * k for k, d in enumerate(layer.dims)}
        rows = against_autograd(layer, getattr(module, layer.name), sizes)
        report.maxdiff = max(r.maxdiff for r in rows)
        report.seconds = time.perf_counter() - start
        echo(report.line())
        reports.append(report)
    return reports


def stale_files(layers: list[Layer], out: Path) -> list[str]:
    """Every generated file under ``out`` that is missing, stale or hand-edited, with the reason."""
    out = Path(out)
    problems = []
    expected = {"__init__.py": PACKAGE_INIT}
    for layer in layers:
        expected.update(render(build(layer)))
    for rel, text in sorted(expected.items()):
        path = out / rel
        if not path.exists():
            problems.append(f"{path}: missing")
        elif is_hand_edited(path):
            problems.append(f"{path}: edited by hand (content hash does not match)")
        elif path.read_text() != text:
            problems.append(f"{path}: stale (differs from what the specs and templates generate)")
    return problems
