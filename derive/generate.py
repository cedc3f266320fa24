"""The main job: derive every layer, prove it, check it against autograd, write its files, report.

``generate`` writes, for each layer, ``<out>/<name>_steps.py`` and its derivation and, for a fused
layer, ``<out>/<name>.py`` and its derivation (``derivations/*.tex|.md``); ``stale_files`` renders
the same files in memory and names every file in ``<out>`` that is missing, stale or edited.
"""
from __future__ import annotations

import inspect
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cache
from .book import index_markdown
from .codegen import render_function, render_steps
from .derivation import render_markdown, render_tex
from .derivation_steps import render_steps_markdown, render_steps_tex
from .errors import DerivationError, DeriveError, ProofFailure
from .files import is_hand_edited, remove_temporaries, write_atomic
from .kernel import Kernel, build_cached
from .parallel import cores, fork_map
from .prove import Proof, default_sizes, prove
from .select import Choice, chosen
from .spec import Layer
from .trace import Graph, trace
from .verify import against_autograd, load_module, steps_table

INDEX = "derivations/README.md"  # links every layer's derivations; written when all layers are generated
PACKAGE_INIT = '"""Generated backward passes: `<layer>.py` (fused kernel), `<layer>_steps.py` (step by step). Regenerate with `derive generate`."""\n'


def build_named(layer: Layer) -> Kernel:
    """``build_cached(layer)``; a refusal raised where the layer is not known (the printer) gets its name."""
    try:
        return build_cached(layer)
    except DerivationError as e:
        if e.layer:
            raise
        raise DerivationError(layer.name, e.problem, e.fix) from None


def render(layer: Layer, choice: Choice | None = None) -> dict[str, str]:
    """Relative path -> text of every file generated for ``layer``: its step-by-step backward and that
    backward's derivation, and its kernel ``<name>.py``: the fused one with its derivation, or,
    where no fused form is used (``select.choose``), the step-by-step backward again, saying why."""
    graph = trace(layer)
    choice = choice or chosen(layer)
    files = {
        f"{layer.name}_steps.py": render_steps(graph),
        f"derivations/{layer.name}_steps.tex": render_steps_tex(graph),
        f"derivations/{layer.name}_steps.md": render_steps_markdown(graph),
    }
    if choice.fused:
        files |= {
            f"{layer.name}.py": render_function(choice.kernel),
            f"derivations/{layer.name}.tex": render_tex(choice.kernel),
            f"derivations/{layer.name}.md": render_markdown(choice.kernel),
        }
    else:
        files[f"{layer.name}.py"] = render_steps(graph, choice.reason)
    return files


def fused_layers(files) -> set[str]:
    """The names of the layers whose kernel is fused, read off their files: a fused derivation."""
    return {Path(rel).stem for rel in files if rel.startswith("derivations/") and rel.endswith(".md")
            and not rel.endswith("_steps.md") and rel != INDEX}


@dataclass
class Report:
    layer: str
    gradients: list[str]
    form: str = ""  # the kernel's form and the battery's verdict (``select.Choice.summary``)
    fused: bool = False
    files: list[str] = field(default_factory=list)  # written, relative to the output folder
    proofs: list[Proof] = field(default_factory=list)
    maxdiff: float = float("nan")
    seconds: float = 0.0
    unchanged: bool = False  # its files were left as an earlier run wrote them (``cache.layer_key``)
    unproven: bool = False  # a fused kernel generated without its proofs (--no-prove)

    def line(self) -> str:
        if self.unchanged:
            done = "derived and written" if self.unproven else "derived, proven and written"
            return f"{self.layer:18s} unchanged since it was {done} (--force derives it again)"
        sizes = ", ".join(_size_text(p) for p in self.proofs if not p.skipped)
        proven = f"proven at {sizes or '(rules proven)'}"
        if any(p.skipped for p in self.proofs):  # see note()
            proven = f"proven at {sizes}, no larger" if sizes else "not proven (too large)"
        if self.unproven:
            proven = "not proven (--no-prove)"
        if not self.fused:
            proven = "(rules proven)"
        grads = " ".join(self.gradients)
        grads = grads if len(grads) <= 24 else f"{len(self.gradients)} gradients"
        kind = "fused" if self.fused else "step-by-step"
        passed = re.search(r"battery passed \((\d+) draws\)", self.form)
        battery = f"passed {passed.group(1)}" if passed else "failed" if "numerical battery" in self.form else "-"
        return (f"{self.layer:18s} {grads:24s} {proven:32s} {kind:12s} {battery:10s} float64 maxdiff "
                f"{self.maxdiff:.1e}   {self.seconds:5.1f} s")

    def note(self) -> str:
        """Why a proof stopped early, why the kernel is not the most folded fused form, or nothing."""
        notes = []
        skipped = next((p for p in self.proofs if p.skipped), None)
        if skipped is not None:
            notes.append(f"{self.layer}: not proven at {_size_text(skipped)}: the element-wise derivative "
                         f"{skipped.skipped}; the generated code matches autograd (float64 maxdiff {self.maxdiff:.1e})")
        if not self.unchanged and (not self.fused or "undoing" in self.form) and self.form:
            notes.append(f"{self.layer}: {self.form}")
        return "\n".join(notes)


def _size_text(proof: Proof) -> str:
    return "x".join(str(v) for v in proof.sizes.values())


class HandEditedError(DeriveError):
    pass


def derive_layer(layer: Layer, prove_sizes: bool = True, fused_only: bool = False) -> tuple:
    """Everything about one layer that needs no file: its rendered files, the proofs of its fused
    kernel at small sizes, the seconds this took, and the kernel's form (``select.Choice.summary``,
    and whether it is fused). SymPy and small torch runs, so layers run in parallel.

    A step-by-step backward is the composition of rules that are each proven on small symbolic
    matrices (tests/test_rules.py); proving a whole network symbolically is slow.
    """
    start = time.perf_counter()
    choice = chosen(layer, fused_only)
    files = render(layer, choice)
    proofs = []
    for sizes in default_sizes(layer) if choice.fused and prove_sizes else []:
        proofs.append(prove(choice.kernel, sizes))
        if proofs[-1].skipped:  # larger sizes are larger still
            break
    return files, proofs, time.perf_counter() - start, choice.summary(), choice.fused


def prove_at(layer: Layer, sizes: dict[str, int], fused_only: bool = False) -> tuple[Proof | None, float]:
    """One proof of ``layer``'s fused kernel, as a job of its own, and the seconds it took (the
    kernel's choice included, where this worker had not made it yet); None where the kernel is
    the step-by-step backward."""
    start = time.perf_counter()
    choice = chosen(layer, fused_only)
    proof = prove(choice.kernel, sizes) if choice.fused else None
    return proof, time.perf_counter() - start


def _derive_all(jobs: list[list[Layer]], prove_sizes: bool, fused_only: bool = False) -> dict[int, tuple]:
    """``derive_layer`` of every layer of ``jobs`` on every core: id(layer) -> its result.

    With fewer jobs than cores (a run that derives one changed layer), each proof of a fused kernel
    is a job of its own, so that the idle cores prove while one renders; a worker builds a kernel
    it has not built yet. The proofs then all run, and those after the first stopped one (its
    element-wise derivative too large) are left out, as ``derive_layer`` would not have run them.
    """
    split = prove_sizes and len(jobs) < cores()
    fused = [layer for job in jobs for layer in job if layer.fused] if split else []
    proofs = [(layer, sizes) for layer in fused for sizes in default_sizes(layer)]

    def run(item):  # a job's layers to derive, or (a layer, sizes) to prove it at
        work, sizes = item
        return (prove_at(work, sizes, fused_only) if sizes
                else [derive_layer(layer, prove_sizes and not split, fused_only) for layer in work])

    def cost(item):  # the derivations first (costliest first), then the proofs, largest first
        work, sizes = item
        return (0, math.prod(sizes.values()), *sizes.values()) if sizes else (1, *max(map(_expected_cost, work)))

    done = fork_map(run, [(job, None) for job in jobs] + proofs, cost=cost)
    derived = {id(layer): result for job, results in zip(jobs, done) for layer, result in zip(job, results)}
    for (layer, _), (proof, seconds) in zip(proofs, done[len(jobs):]):
        files, kept, spent, form, fused = derived[id(layer)]
        if proof is not None and not any(p.skipped for p in kept):
            kept.append(proof)
        derived[id(layer)] = files, kept, spent + seconds, form, fused
    return derived


def _expected_cost(layer: Layer) -> tuple:
    """Derive the costliest layers first: fused ones with the most dimensions and the longest spec."""
    try:
        size = len(inspect.getsource(layer.fn))
    except (OSError, TypeError):  # defined where its source cannot be read
        size = 0
    return layer.fused, len(layer.dims), size


def _jobs(layers: list[Layer], graphs: list[Graph]) -> list[list[Layer]]:
    """The layers in groups, each derived in turn by one worker: a layer whose spec calls fused layers
    of the list goes with them, since its step-by-step backward prints their kernels, and one worker
    builds each kernel once (``build_cached``) where two would build it twice."""
    group = {id(layer): [layer] for layer in layers}
    for layer, graph in zip(layers, graphs):
        for region in graph.regions:
            called = group.get(id(region.layer))
            if region.layer.fused and called is not None and called is not group[id(layer)]:
                group[id(layer)].extend(called)
                for member in called:
                    group[id(member)] = group[id(layer)]
    position = {id(layer): k for k, layer in enumerate(layers)}
    unique = {id(g): g for g in group.values()}
    return [sorted(g, key=lambda layer: position[id(layer)]) for g in unique.values()]


def _layer_key(layer: Layer, graph: Graph, prove_sizes: bool) -> str | None:
    try:
        spec_file = inspect.getsourcefile(layer.fn) or ""
    except TypeError:  # a function with no source file
        spec_file = ""
    return cache.layer_key(layer.name, spec_file, graph.sources, prove_sizes)


def generate(layers: list[Layer], out: Path, *, prove_sizes: bool = True, force: bool = False,
             echo=print, index: bool = True, fused_only: bool = False) -> list[Report]:
    """Derive ``layers``, prove their fused kernels, compare the generated code with autograd, then
    write their files.

    Layers are derived and proven on every core (``derive_layer``), and every proof and every
    comparison runs before any file is written: a formula that fails its proof, or generated code
    that disagrees with autograd of the spec, raises ``ProofFailure`` and leaves ``out`` as it was.
    With ``index`` (the whole set of layers, not a few picked by name) the index page of the
    derivations is written too. A layer whose own key (``cache.layer_key``) is recorded in ``out``
    with its files intact is left as it is, unless ``force``.
    """
    out = Path(out)
    graphs = [trace(layer) for layer in layers]  # what each spec calls and which files it ran
    keys = [_layer_key(layer, graph, prove_sizes) for layer, graph in zip(layers, graphs)]
    unchanged = {id(layer) for layer, key in zip(layers, keys) if key and not force and cache.unchanged(key, out)}
    todo = [(layer, graph) for layer, graph in zip(layers, graphs) if id(layer) not in unchanged]
    by_layer = _derive_all(_jobs([layer for layer, _ in todo], [graph for _, graph in todo]), prove_sizes, fused_only)
    derived = [by_layer.get(id(layer)) for layer in layers]  # None: unchanged, nothing to write
    for layer, (files, *_) in ((layer, d) for layer, d in zip(layers, derived) if d is not None):
        edited = [out / rel for rel in files if is_hand_edited(out / rel)]
        if edited and not force:
            raise HandEditedError(f"{edited[0]} was edited by hand (its content hash no longer matches); "
                                  f"move your changes into the spec, or pass --force to overwrite it")

    if index and is_hand_edited(out / INDEX) and not force:
        raise HandEditedError(f"{out / INDEX} was edited by hand (its content hash no longer matches); "
                              f"pass --force to overwrite it")
    # every generated module is imported and held against autograd before any file is written
    reports = []
    with tempfile.TemporaryDirectory(prefix="derive-check-") as staging:
        for layer, key, result in zip(layers, keys, derived):
            gradients, unproven = [f"d{name}" for name in layer.differentiable], layer.fused and not prove_sizes
            if result is None:
                recorded = cache.recorded_files(key, out)
                reports.append(Report(layer.name, gradients, fused=layer.name in fused_layers(recorded),
                                      files=recorded, unchanged=True, unproven=unproven))
                continue
            files, proofs, seconds, form, fused = result
            start = time.perf_counter()
            report = Report(layer.name, gradients, form, fused, list(files), proofs,
                            unproven=unproven and fused)
            report.maxdiff = _against_autograd(layer, files, Path(staging))
            report.seconds = seconds + time.perf_counter() - start
            reports.append(report)
    remove_temporaries(out)  # left by a run that was killed while writing
    write_atomic(out / "__init__.py", PACKAGE_INIT)
    if index:
        write_atomic(out / INDEX, index_markdown(layers, fused_layers([f for r in reports for f in r.files])))
    for report, result in zip(reports, derived):
        for rel, text in (result[0] if result else {}).items():
            write_atomic(out / rel, text)
        echo(report.line())
    cache.remember(out, {key: report.files for key, report in zip(keys, reports) if key and not report.unchanged})
    return reports


def _against_autograd(layer: Layer, files: dict[str, str], staging: Path) -> float:
    """Largest difference of the generated modules (step-by-step and fused) from autograd of the
    spec, float64; raises ``ProofFailure`` naming the value when one is not close."""
    folder = staging / layer.name
    for rel, text in files.items():
        if rel.endswith(".py"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
    sizes = {d: 5 + 2 * k for k, d in enumerate(layer.dims)}
    rows = [(row, "step-by-step") for row in steps_table(layer, load_module(folder / f"{layer.name}_steps.py"), sizes,
                                                         torch.float64)]
    kernel = getattr(load_module(folder / f"{layer.name}.py"), layer.name)
    kind = "fused" if layer.name in fused_layers(files) else "kernel"
    rows += [(row, kind) for row in against_autograd(layer, kernel, sizes)]
    for row, kind in rows:
        if not row.approximate:
            raise ProofFailure(f"{layer.name}: the {kind} module's {row.name} differs from autograd of the spec by "
                               f"{row.maxdiff:.3e} (float64, sizes {sizes}); no file was written. The derivation "
                               f"passed its proof, so the printed code is wrong: report this as a bug")
    return max(row.maxdiff for row, _ in rows)


def stale_files(layers: list[Layer], out: Path, index: bool = True) -> list[str]:
    """Every generated file under ``out`` that is missing, stale or hand-edited, with the reason
    (the derivations' index page too, with ``index``)."""
    out = Path(out)
    problems = []
    expected = {"__init__.py": PACKAGE_INIT}
    for layer in layers:
        expected.update(render(layer))
    if index:
        expected[INDEX] = index_markdown(layers, fused_layers(expected))
    for rel, text in sorted(expected.items()):
        path = out / rel
        if not path.exists():
            problems.append(f"{path}: missing")
        elif is_hand_edited(path):
            problems.append(f"{path}: edited by hand (content hash does not match)")
        elif path.read_text() != text:
            problems.append(f"{path}: stale (differs from what the specs and templates generate)")
    return problems
