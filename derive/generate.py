"""The main job: derive every layer, prove it, check it against autograd, write its files, report.

``generate`` writes, for each layer, ``<out>/<name>_steps.py`` and its derivation and, for a fused
layer, ``<out>/<name>.py`` and its derivation (``derivations/*.tex|.md``); ``stale_files`` renders
the same files in memory and names every file in ``<out>`` that is missing, stale or edited.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cache
from . import codegen
from . import native
from .book import index_markdown, index_specs
from .codegen import computes_vectors_only, render_function, render_steps, render_synced
from .synced import has_batch_sums, synced_cached
from .derivation import render_markdown, render_tex, render_unwritten
from .derivation_steps import render_steps_markdown, render_steps_tex
from .errors import DerivationError, DeriveError, ProofFailure
from .files import comparable, content_hash, ownership, plan, remove_temporaries, write_atomic
from .kernel import Kernel, build_cached
from .parallel import cores, fork_map
from .prove import Proof, default_sizes, prove
from .same_kernels import runs_the_same
from .select import CHANGED, STEPS_FAIL, Choice, check_written, chosen
from .spec import Layer, sizes_text
from .trace import Graph, trace
from .verify import against_autograd, load_module, steps_table

INDEX = "derivations/README.md"  # links every layer's derivations; written when all layers are generated


def build_named(layer: Layer) -> Kernel:
    """``build_cached(layer)``; a refusal raised where the layer is not known (the printer) gets its name."""
    try:
        return build_cached(layer)
    except DerivationError as e:
        if e.layer:
            raise
        raise DerivationError(layer.name, e.problem, e.fix) from None


def output_names(layer: Layer, backends: tuple = ()) -> list[str]:
    """The files ``render`` may write for ``layer``, relative to the output folder (known before
    deriving): its kernel and step-by-step backward, and the fused derivation of a layer declared
    fused (written only where its kernel is fused, ``select``), and its native kernels (written only
    where the plan lowers it and they pass their checks, ``native``)."""
    names = [f"{layer.name}.py", f"{layer.name}_steps.py", f"derivations/{layer.name}_steps.tex",
             f"derivations/{layer.name}_steps.md"]
    if layer.fused:
        names += [f"derivations/{layer.name}.tex", f"derivations/{layer.name}.md"]
        names += [rel for backend in backends for rel in native.output_names(layer.name, backend)]
    if layer.fused and layer.batch:
        names.append(f"{layer.name}_synced.py")
    return names


def collisions(layers: list[Layer], index: bool = True, backends: tuple = ()) -> list[str]:
    """One line per output file that two layers (or a layer and the folder's own files) would both write."""
    owners: dict[str, list[str]] = {"__init__.py": ["the package file"]}
    if index:
        owners[INDEX] = ["the derivations' index"]
    for layer in layers:
        where = f"layer {layer.name!r}" + (f" of {layer.spec_path}" if layer.spec_path else "")
        for rel in output_names(layer, backends):
            owners.setdefault(rel, []).append(where)
    shared: dict[tuple, list[str]] = {}
    for rel, who in owners.items():
        if len(who) > 1:
            shared.setdefault(tuple(who), []).append(rel)
    return [f"{' and '.join(who)} would both write {', '.join(sorted(rels))}: rename one of them (or generate "
            f"them into separate folders with --out)" for who, rels in sorted(shared.items())]


DOCUMENTS = "derivation documents"  # the key of ``reasons`` that says which documents derive failed to write


def _document(write, subject, markdown: bool, steps: bool, reasons: dict) -> str:
    """``write(subject)``, a derivation document; where derive fails to write it (its own fault: the
    spec traced, and its kernel is derived), the page ``render_unwritten`` says so, and ``reasons``
    gets a line for the report. A kernel does not depend on its document, so the run goes on."""
    try:
        return write(subject)
    except Exception as e:  # (a refusal too: the spec traced and its kernel is derived, the document is derive's)
        layer = getattr(subject, "layer", subject)
        fault = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        which = f"{layer.name}{'_steps' if steps else ''}.{'md' if markdown else 'tex'}"
        reasons[DOCUMENTS] = (f"{reasons[DOCUMENTS]}; " if DOCUMENTS in reasons else "") + \
            f"{which} could not be written ({fault}); report this as a bug"
        return render_unwritten(layer, markdown, fault, steps)


def render_kernel(layer: Layer, choice: Choice | None = None, graph=None) -> str:
    """The text of ``<name>.py``, the kernel ``render`` writes: the fused Function where a fused form
    is chosen, else the step-by-step backward, saying why (without the documents)."""
    choice = choice or chosen(layer)
    if not choice.fused:
        return render_steps(graph or trace(layer), choice.reason)
    # a layer of vectors runs the spec's own operations under autograd, where they pass the battery:
    # autograd records no more than through the spec (through the fused forward, views such as
    # ``c.view(k).log_softmax(0).view(1, k)`` are nodes too, a call's time each at these sizes)
    if computes_vectors_only(choice.kernel):
        routed = render_function(choice.kernel, route="vectors")
        if check_written(layer, routed, choice.verdict.settings if choice.verdict else None).passed:
            return routed
    text = render_function(choice.kernel)
    if "def _autograd_is_the_kernel" not in text:  # (codegen did not see autograd's own kernels in the formulas)
        routed = render_function(choice.kernel, route="same")
        if runs_the_same(layer, text, routed):
            return routed
    return text


def render(layer: Layer, choice: Choice | None = None, backends: tuple = (), reasons: dict | None = None) -> dict[str, str]:
    """Relative path -> text of every file generated for ``layer``: its step-by-step backward and that
    backward's derivation, and its kernel ``<name>.py``: the fused one with its derivation, or,
    where no fused form is used (``select.choose``), the step-by-step backward again, saying why.
    With ``backends``, the native kernels of a fused one that the plan lowers (``reasons`` gets,
    per backend, why there is none)."""
    graph = trace(layer)
    choice = choice or chosen(layer)
    reasons = {} if reasons is None else reasons
    files = {
        f"{layer.name}_steps.py": render_steps(graph),
        f"derivations/{layer.name}_steps.tex": _document(render_steps_tex, graph, False, True, reasons),
        f"derivations/{layer.name}_steps.md": _document(render_steps_markdown, graph, True, True, reasons),
    }
    if choice.fused:
        files |= {
            f"{layer.name}.py": render_kernel(layer, choice, graph),
            f"derivations/{layer.name}.tex": _document(render_tex, choice.kernel, False, False, reasons),
            f"derivations/{layer.name}.md": _document(render_markdown, choice.kernel, True, False, reasons),
        }
        if has_batch_sums(choice.kernel):  # a declared batch axis the layer sums over: a variant across ranks
            files[f"{layer.name}_synced.py"] = render_synced(synced_cached(choice.kernel))
    else:
        files[f"{layer.name}.py"] = render_kernel(layer, choice, graph)
    lowered = native.lowered(choice.kernel) if backends and choice.fused else None  # one plan, both backends
    for backend in backends:
        if not choice.fused:
            reasons[backend] = "its kernel is the step-by-step backward"
            continue
        if lowered.plan is None:
            reasons[backend] = f"the kernel plan cannot lower it: {lowered.reason}"
        elif backend == "cpp":
            files |= native.render_cpp(choice.kernel, lowered.plan)
        else:
            files |= native.render_triton(choice.kernel, lowered.plan)
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
    inputs: frozenset = frozenset()  # the user's files its spec ran or imported (``cache.user_files``)
    native: dict = field(default_factory=dict)  # backend -> its native kernel's verdict, or why there is none

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
        # a step-by-step kernel replays autograd's own operations: the battery judged the fused form
        # it replaces (the note says what failed), and the kernel written, which fails only where
        # the trace writes a torch function in other steps than torch computes it
        battery = f"passed {passed.group(1)}" if passed else "steps fail" if STEPS_FAIL in self.form \
            else "fused fail" if "numerical battery" in self.form else "-"
        return (f"{self.layer:18s} {grads:24s} {proven:32s} {kind:12s} {battery:10s} float64 maxdiff "
                f"{self.maxdiff:.1e}   {self.seconds:5.1f} s")

    def note(self) -> str:
        """Why a proof stopped early, why the kernel is not the most folded fused form, or nothing."""
        notes = []
        skipped = next((p for p in self.proofs if p.skipped), None)
        if skipped is not None:
            notes.append(f"{self.layer}: not proven at {_size_text(skipped)}: the element-wise derivative "
                         f"{skipped.skipped}; the generated code matches autograd (float64 maxdiff {self.maxdiff:.1e})")
        if not self.unchanged and (not self.fused or CHANGED in self.form) and self.form:
            notes.append(f"{self.layer}: {self.form}")
        for backend, verdict in self.native.items():
            notes.append(f"{self.layer}: {backend}: {verdict}" if backend == DOCUMENTS
                         else f"{self.layer}: {backend} kernel: {verdict}")
        return "\n".join(notes)


def _size_text(proof: Proof) -> str:
    return "x".join(str(v) for v in proof.sizes.values())


class RefusedError(DeriveError):
    """Files a run will not write (each named with its fix); nothing was written."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def package_init(layers: list[Layer]) -> str:
    """The output folder's ``__init__.py``: it makes the folder a package of its own, importable
    wherever it is, and carries the generated header like every file derive owns."""
    body = ('"""Generated backward passes: `<layer>.py` (fused kernel), `<layer>_steps.py` (step by step).\n\n'
            'Import them as modules of this package (`from <this folder>.<layer> import <layer>`), or with this\n'
            'folder on the import path (`from <layer> import <layer>`): they import nothing but torch.\n"""\n')
    arguments = list(dict.fromkeys(a for a in map(codegen.spec_argument, layers) if a))
    lines = ["@generated by derive: do not edit by hand", f"regenerate: {codegen.command(arguments)}",
             f"content-hash: {content_hash(body)}"]
    return "".join(f"# {line}\n" for line in lines) + body


def index_layers(layers: list[Layer], out: Path) -> tuple[list[Layer], list[str]]:
    """The layers the derivations' index of ``out`` lists, and their spec files relative to ``out``:
    ``layers``, and the layers of the other spec files an earlier run generated into ``out`` (named in
    the index's header) that still exist. Built-in layers are indexed alone."""
    if not any(layer.spec_path for layer in layers):
        return layers, []
    from .layers import from_file

    here = [os.path.relpath(Path(layer.spec_path).resolve(), Path(out).resolve()) for layer in layers]
    listed = index_specs(_read(out / INDEX)) if ownership(out / INDEX) in ("ours", "edited") else []
    everything, seen = list(layers), {(Path(layer.source_file).resolve(), layer.name) for layer in layers}
    kept = []
    for entry in listed:
        path, _, wanted = entry.partition(":")
        spec = Path(out) / path
        if not spec.is_file() or entry in here:
            continue
        kept.append(entry)
        for layer in from_file(f"{spec}:{wanted}" if wanted else str(spec)):
            if (Path(layer.source_file).resolve(), layer.name) not in seen:
                seen.add((Path(layer.source_file).resolve(), layer.name))
                everything.append(layer)
    specs = sorted(set(kept) | {rel + (f":{layer.name}" if _picked(layer, layers) else "")
                                for rel, layer in zip(here, layers)})
    place = {id(layer): os.path.relpath(Path(layer.source_file).resolve(), Path(out).resolve()) for layer in everything}
    return sorted(everything, key=lambda layer: place[id(layer)]), specs  # the same order from every spec file


def _picked(layer: Layer, layers: list[Layer]) -> bool:
    """True when the run has only some of the layers of ``layer``'s spec file (``FILE.py:name``)."""
    from .layers import from_file

    return len([x for x in layers if x.spec_path == layer.spec_path]) < len(from_file(layer.spec_path))


def _read(path: Path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def derive_layer(layer: Layer, prove_sizes: bool = True, fused_only: bool = False, backends: tuple = ()) -> tuple:
    """Everything about one layer that needs no file: its rendered files, the proofs of its fused
    kernel at small sizes, the seconds this took, and the kernel's form (``select.Choice.summary``,
    and whether it is fused). SymPy and small torch runs, so layers run in parallel.

    A step-by-step backward is the composition of rules that are each proven on small symbolic
    matrices (tests/test_rules.py); proving a whole network symbolically is slow.
    """
    start = time.perf_counter()
    choice = chosen(layer, fused_only)
    reasons: dict = {}
    files = render(layer, choice, backends, reasons)
    proofs = []
    for sizes in default_sizes(layer) if choice.fused and prove_sizes else []:
        proofs.append(prove(choice.kernel, sizes))
        if proofs[-1].skipped:  # larger sizes are larger still
            break
    return files, proofs, time.perf_counter() - start, choice.summary(), choice.fused, reasons


def prove_at(layer: Layer, sizes: dict[str, int], fused_only: bool = False) -> tuple[Proof | None, float]:
    """One proof of ``layer``'s fused kernel, as a job of its own, and the seconds it took (the
    kernel's choice included, where this worker had not made it yet); None where the kernel is
    the step-by-step backward."""
    start = time.perf_counter()
    choice = chosen(layer, fused_only)
    proof = prove(choice.kernel, sizes) if choice.fused else None
    return proof, time.perf_counter() - start


def _derive_all(jobs: list[list[Layer]], prove_sizes: bool, fused_only: bool = False,
                backends: tuple = ()) -> dict[int, tuple]:
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
                else [derive_layer(layer, prove_sizes and not split, fused_only, backends) for layer in work])

    def cost(item):  # the derivations first (costliest first), then the proofs, largest first
        work, sizes = item
        return (0, math.prod(sizes.values()), *sizes.values()) if sizes else (1, *max(map(_expected_cost, work)))

    done = fork_map(run, [(job, None) for job in jobs] + proofs, cost=cost)
    derived = {id(layer): result for job, results in zip(jobs, done) for layer, result in zip(job, results)}
    for (layer, _), (proof, seconds) in zip(proofs, done[len(jobs):]):
        files, kept, spent, form, fused, reasons = derived[id(layer)]
        if proof is not None and not any(p.skipped for p in kept):
            kept.append(proof)
        derived[id(layer)] = files, kept, spent + seconds, form, fused, reasons
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


def _layer_key(layer: Layer, graph: Graph, prove_sizes: bool, backends: tuple = ()) -> str | None:
    try:
        spec_file = inspect.getsourcefile(layer.fn) or ""
    except TypeError:  # a function with no source file
        spec_file = ""
    name = layer.name + "".join(f";backend:{b}" for b in backends)
    return cache.layer_key(name, spec_file, graph.sources | layer.depends, prove_sizes)


def generate(layers: list[Layer], out: Path, *, prove_sizes: bool = True, force: bool = False,
             echo=print, index: bool = True, allow_other_sources: bool = False,
             fused_only: bool = False, backends: tuple = ()) -> list[Report]:
    """Derive ``layers``, prove their fused kernels, compare the generated code with autograd, then
    write their files.

    Nothing is written, and nothing derived, when a file of the run is not derive's to write
    (``files.plan``: a user's file, a spec being read, a generated file edited by hand without
    ``force``, a folder in the way or not writable) or when two layers would write the same file:
    ``RefusedError`` names each. Layers are derived and proven on every core (``derive_layer``), and
    every proof and every comparison runs before any file is written: a formula that fails its
    proof, or generated code that disagrees with autograd of the spec, raises ``ProofFailure`` and
    leaves ``out`` as it was. With ``index`` (the whole set of layers, not a few picked by name) the
    index page of the derivations is written too; it also lists the layers of other spec files
    generated into ``out`` before. A layer whose own key (``cache.layer_key``) is recorded in ``out``
    with its files intact is left as it is, unless ``force``.
    """
    out = Path(out)
    with codegen.rendering_into(out):
        return _generate(layers, out, prove_sizes, force, echo, index, allow_other_sources, fused_only,
                         tuple(backends))


def texts_of(derived: list) -> dict[str, str]:
    """Every file the derived layers render (``derive_layer``'s results; None for an unchanged layer)."""
    return {rel: text for result in derived if result for rel, text in result[0].items()}


def _fused_names(layers: list[Layer], files: dict, out: Path) -> set[str]:
    """The layers (of ``layers``) whose kernel is fused: read off the files this run renders, or for a
    layer it does not render (unchanged, or of another spec file), off the folder."""
    rendered = {Path(rel).name.split(".")[0].removesuffix("_steps") for rel in files}
    return fused_layers(files) | {layer.name for layer in layers if layer.name not in rendered
                                  and ownership(out / f"derivations/{layer.name}.md") in ("ours", "edited")}


def _generate(layers, out, prove_sizes, force, echo, index, allow_other_sources, fused_only,
              backends=()) -> list[Report]:
    clash = collisions(layers, index, backends)
    if clash:
        raise RefusedError(clash)
    graphs = [trace(layer) for layer in layers]  # what each spec calls and which files it ran
    inputs = [cache.user_files(graph.sources | layer.depends | {layer.source_file})
              for layer, graph in zip(layers, graphs)]
    everything = index_layers(layers, out) if index else (layers, [])
    planned = {rel: None for layer in layers for rel in output_names(layer, backends)} | {"__init__.py": None}
    if index:
        planned[INDEX] = None
    read = set().union(*inputs, *(cache.user_files({layer.source_file}) for layer in everything[0]))
    refused = plan(out, planned, force=force, protected=read, allow_other_sources=allow_other_sources)
    if refused:
        raise RefusedError([str(r) for r in refused])
    keys = [_layer_key(layer, graph, prove_sizes, backends) for layer, graph in zip(layers, graphs)]
    unchanged = {id(layer) for layer, key in zip(layers, keys) if key and not force and cache.unchanged(key, out)}
    todo = [(layer, graph) for layer, graph in zip(layers, graphs) if id(layer) not in unchanged]
    by_layer = _derive_all(_jobs([layer for layer, _ in todo], [graph for _, graph in todo]), prove_sizes, fused_only,
                           backends)
    derived = [by_layer.get(id(layer)) for layer in layers]  # None: unchanged, nothing to write

    # every generated module is imported and held against autograd before any file is written
    reports = []
    with tempfile.TemporaryDirectory(prefix="derive-check-") as staging:
        for layer, key, result, used in zip(layers, keys, derived, inputs):
            gradients, unproven = [f"d{name}" for name in layer.differentiable], layer.fused and not prove_sizes
            if result is None:
                recorded = cache.recorded_files(key, out)
                reports.append(Report(layer.name, gradients, fused=layer.name in fused_layers(recorded),
                                      files=recorded, unchanged=True, unproven=unproven, inputs=used))
                continue
            files, proofs, seconds, form, fused, reasons = result
            start = time.perf_counter()
            report = Report(layer.name, gradients, form, fused, list(files), proofs,
                            unproven=unproven and fused, inputs=used, native=dict(reasons))
            report.maxdiff = _against_autograd(layer, {rel: t for rel, t in files.items() if _eager_file(rel)},
                                               Path(staging), fused)
            report.seconds = seconds + time.perf_counter() - start
            reports.append(report)
        if backends:  # every native kernel of the run in one folder: one build, then each one checked
            _check_native([(layer, result) for layer, result in zip(layers, derived) if result], Path(staging), reports)
    texts = {}
    if ownership(out / "__init__.py") != "theirs":  # a user's own __init__.py is left as it is
        texts["__init__.py"] = package_init(everything[0])
    if index:
        texts[INDEX] = index_markdown(*everything, fused=_fused_names(everything[0], texts_of(derived), out))
    for result in derived:
        texts.update(result[0] if result else {})
    refused = plan(out, texts, force=force, protected=read, allow_other_sources=allow_other_sources)
    if refused:  # changed while deriving
        raise RefusedError([str(r) for r in refused])
    remove_temporaries({(out / rel).parent for rel in texts})  # left by a run that was killed while writing
    for rel in ["__init__.py", INDEX]:
        if rel in texts:
            write_atomic(out / rel, texts.pop(rel))
    for report, result in zip(reports, derived):
        for rel in (result[0] if result else {}):
            write_atomic(out / rel, texts[rel])
        if result and not report.fused:  # a fused derivation written when its kernel was fused: derive's own
            for rel in (f"derivations/{report.layer}.tex", f"derivations/{report.layer}.md"):
                if ownership(out / rel) == "ours":
                    (out / rel).unlink()
        for backend in report.native if result else ():  # a native kernel of derive's own that no longer passes
            for rel in native.output_names(report.layer, backend):
                if rel not in result[0] and ownership(out / rel) == "ours":
                    (out / rel).unlink()
        echo(report.line())
    cache.remember(out, {key: report.files for key, report in zip(keys, reports) if key and not report.unchanged})
    return reports


def _eager_file(rel: str) -> bool:
    """A Python module of the eager kernels (not a native one)."""
    return rel.endswith(".py") and not rel.endswith(("_cpp.py", "_triton.py")) and "/" not in rel


def _check_native(derived: list, staging: Path, reports: list) -> None:
    """Hold every native kernel of the run against its spec before it is written, as the eager kernels
    are: the comparison with autograd (float64) and the numerical battery (``native.check_module``;
    the Triton kernels under Triton's interpreter). A kernel that fails, or cannot be built or run
    here, is not written (its files are dropped from the layer's) and the report says why; the layer
    keeps its eager kernel. The C++ extension of the run is built once, before the checks run on
    every core."""
    from .verify import load_module

    folder = staging / "native-kernels"
    (folder / "native").mkdir(parents=True, exist_ok=True)
    jobs = []
    for layer, (files, *_rest) in derived:
        for rel, text in files.items():
            if rel.startswith("native/") or rel.endswith(("_cpp.py", "_triton.py")) or rel == f"{layer.name}.py":
                (folder / rel).write_text(text)
        jobs += [(layer, backend) for backend in native.BACKENDS if f"{layer.name}_{backend}.py" in files]
    if any(backend == "cpp" for _, backend in jobs):  # one build, in this process, before the workers fork
        cpp = next(layer for layer, backend in jobs if backend == "cpp")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_module(folder / f"{cpp.name}_cpp.py").native_module()

    def check(job):
        layer, backend = job
        if backend == "triton":  # on this machine's CPU: the interpreter (read when the kernels are defined)
            os.environ["TRITON_INTERPRET"] = "1"
        return native.check_module(layer, load_module(folder / f"{layer.name}_{backend}.py"), backend)

    verdicts = fork_map(check, jobs, cost=lambda job: job[1] == "triton")
    by_name = {r.layer: r for r in reports}
    files_of = {layer.name: files for layer, (files, *_rest) in derived}
    for (layer, backend), verdict in zip(jobs, verdicts):
        report = by_name[layer.name]
        if verdict.startswith("battery passed"):
            report.native[backend] = verdict
            continue
        report.native[backend] = f"not written, the eager kernel is used: {verdict}"
        for rel in native.output_names(layer.name, backend):
            files_of[layer.name].pop(rel, None)
        report.files = [rel for rel in report.files if rel in files_of[layer.name]]


def _against_autograd(layer: Layer, files: dict[str, str], staging: Path, fused: bool) -> float:
    """Largest difference of the generated modules (step-by-step, and the kernel: ``fused`` or not)
    from autograd of the spec, float64; raises ``ProofFailure`` naming the value when one is not close."""
    folder = staging / layer.name
    for rel, text in files.items():
        if rel.endswith(".py"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
    sizes = {d: 5 + 2 * k for k, d in enumerate(layer.dims)}
    rows = [(row, "step-by-step") for row in steps_table(layer, load_module(folder / f"{layer.name}_steps.py"), sizes,
                                                         torch.float64)]
    kernel = getattr(load_module(folder / f"{layer.name}.py"), layer.name)
    kind = "fused" if fused else "kernel"
    rows += [(row, kind) for row in against_autograd(layer, kernel, sizes)]
    for row, kind in rows:
        if not row.approximate:
            raise ProofFailure(f"{layer.name}: the {kind} module's {row.name} differs from autograd of the spec by "
                               f"{row.maxdiff:.3e} (float64, sizes {sizes_text(sizes)}); no file was written. The derivation "
                               f"passed its proof, so the printed code is wrong: report this as a bug")
    return max(row.maxdiff for row, _ in rows)


def stale_files(layers: list[Layer], out: Path, index: bool = True, backends: tuple = ()) -> list[str]:
    """Every generated file under ``out`` that is missing, stale, hand-edited or not derive's, with the
    reason (the derivations' index page too, with ``index``); two layers writing one file are named too."""
    out = Path(out)
    with codegen.rendering_into(out):
        problems = [f"{out}: {line}" for line in collisions(layers, index, backends)]
        expected = {}
        everything = index_layers(layers, out) if index else (layers, [])
        if ownership(out / "__init__.py") != "theirs":
            expected["__init__.py"] = package_init(everything[0])
        rendered = {rel: text for layer in layers for rel, text in render(layer, backends=tuple(backends)).items()}
        expected.update(rendered)
        if index:
            expected[INDEX] = index_markdown(*everything, fused=_fused_names(everything[0], rendered, out))
    for rel, text in sorted(expected.items()):
        path = out / rel
        state = ownership(path)
        if state == "absent":
            problems.append(f"{path}: missing")
        elif state == "edited":
            problems.append(f"{path}: edited by hand (content hash does not match)")
        elif state != "ours":
            problems.append(f"{path}: not written by derive ({'not a file' if state == 'not a file' else 'no generated header'}); "
                            f"move it away, or generate into another --out")
        elif comparable(_read(path)) != comparable(text):
            problems.append(f"{path}: stale (differs from what the specs and templates generate)")
    return problems
