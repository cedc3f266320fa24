"""Choose the form of a layer's kernel: the proof says a formula is equal, the battery says it is usable.

1. The most folded fused formula (``kernel.build``): every refold rewrite the cost model takes.
2. Its generated module runs through the numerical battery (``battery.run``). For each gradient
   that fails, the last rewrite its refold took is forbidden and the kernel is built again: the
   refold then takes the next best rewrite, or stops a step earlier (a less folded form). After
   ``MAX_ATTEMPTS - 1`` such steps a gradient that still fails is tried unfolded (no rewrite).
   A gradient printed as an in-place chain (``backward_plan.chain_form``) that fails is first
   printed as its formula reads; that is not counted as a step.
3. When a failing value has no rewrite left to undo (a gradient, or the output: the fused forward
   rounds worse than the spec's), one more fused form is tried: every line the spec names a node
   of its own (``_spelled_form``), so that the forward computes them and the backward reads them
   where autograd reads them, with the derived formulas between them.
4. When that fails too, when a less folded form cannot be built, or when the fused engine cannot
   derive the layer at all, the kernel is the step-by-step backward, which replays autograd's own
   operations.

   Where that step-by-step kernel fails the battery too (the spec calls one torch function the
   trace writes in steps, ``F.layer_norm``, whose own statistics round better), the most folded
   form is written instead if it passes the bar every written kernel is held to (without the
   margin forms are chosen by): no better kernel exists, and that one is the faster.

So no fused kernel worse than autograd through its spec is written; the choice and the reason for
it are reported per layer. The step-by-step kernel written in place of a fused one goes through the
battery too: it replays the operations the trace records, and where the spec calls a torch function
the trace writes in other steps, torch's own may round better; the report says so.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import battery
from .errors import DerivationError, DeriveError
from .functions import COMPARISONS, LABEL_COMPARISONS
from .kernel import Kernel, build, build_cached
from .simplify import EVERY_REWRITE
from .memo import LAYERS_KEPT, ByObject
from .spec import Layer

MAX_SAME_FORMS = 6  # rewrites undone in a row that give a form already judged (not counted as attempts)
MAX_ATTEMPTS = 4  # fused forms tried by undoing rewrites, before the unfolded form and the step-by-step backward
# A gradient that is one scalar broadcast (``dc`` of ``log((1 - tanh(c.sum()))**8 + 1)``) has one error
# per draw: at most a handful of a setting's draws land where its form rounds worse than autograd's
# (``tanh`` near -1, not saturated), so a form that fails one draw in three passed the battery's own
# seed and was written. Such a layer's form is chosen over these seeds too (the same settings).
FEW_ENTRY_SEEDS = (10, 20)


@dataclass
class Choice:
    layer: Layer
    kernel: Kernel | None  # the fused kernel chosen; None: the step-by-step backward is the kernel
    verdict: battery.Verdict | None = None
    reason: str = ""  # why the step-by-step backward
    # how the form written differs from the most folded one, in the order tried: "dx: bnraw for x
    # undone", "dx: in-place form undone", "m: its zero adjoint replayed"
    changes: list[str] = field(default_factory=list)
    steps_verdict: battery.Verdict | None = None  # the step-by-step kernel's, where it is the kernel
    # why a fused form is written though none passed with the margin forms are chosen by (``WRITTEN_BAR``)
    note: str = ""

    @property
    def fused(self) -> bool:
        return self.kernel is not None

    def summary(self) -> str:
        """The report's words for the form chosen."""
        if not self.fused:
            if self.steps_verdict is not None and not self.steps_verdict.passed:
                return f"step-by-step kernel: {self.reason}; {STEPS_FAIL} too: {self.steps_verdict.findings[0]}"
            return f"step-by-step kernel: {self.reason}"
        checked = f"battery passed ({len(self.verdict.settings)} draws)" if self.verdict else "battery not run"
        if self.note:
            checked = f"{checked}: {self.note}"
        if self.changes:
            return f"fused, {checked} after {len(self.changes)} {CHANGED} ({'; '.join(self.changes)})"
        return f"fused, {checked}"


# the report's words where the step-by-step kernel fails the battery as well, and where the fused form
# is not the most folded one (``generate`` reads them)
STEPS_FAIL = "the step-by-step kernel fails the battery"
WRITTEN_BAR = ("at the battery's own bar; no form passes with the margin forms are chosen by, and the "
               "step-by-step kernel fails the battery")
CHANGED = "change(s) of form"


def _steps_verdict(layer: Layer, draws: list | None, reason: str) -> battery.Verdict:
    """The numerical battery of the step-by-step kernel written in place of a fused one. It replays
    autograd's operations as the trace records them; where the spec calls a torch function that
    the trace writes in primitives, torch's own may round better, and the report says so (a
    variance did, until it was computed with ``torch.var``: see ``trace.reductions``)."""
    from .codegen import render_steps
    from .trace import trace

    with _imported(layer.name, render_steps(trace(layer), reason)) as fn:
        return battery.run(layer, fn, battery.battery_sizes(layer), draws=draws, slack=battery.CHOOSE_SLACK,
                           pooled=False)


def _steps_choice(layer: Layer, reason: str) -> Choice:
    """The step-by-step kernel for a layer the fused engine cannot derive, through the battery
    where the battery can read its settings off the layer (it reads the graph as the engine does:
    the cause of the refusal may stop it too, and the kernel is written all the same)."""
    try:
        with _one_thread():
            draws = battery.settings(layer, battery.battery_sizes(layer))
    except Exception:  # (a refusal or a fault, already in ``reason``)
        return Choice(layer, None, reason=reason)
    return Choice(layer, None, reason=reason, steps_verdict=_steps_verdict(layer, draws, reason))


@contextmanager
def _one_thread():
    """torch on one thread inside (the battery's results are then deterministic), as before after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _loaded(name: str, source: str, folder: Path):
    """The function ``name`` of the module ``source``, written to ``folder`` and imported."""
    from .verify import load_module

    path = folder / f"{name}.py"
    path.write_text(source)
    return getattr(load_module(path), name)


@contextmanager
def _imported(name: str, source: str):
    """``_loaded`` in a temporary folder, with torch on one thread (``_one_thread``) while it is in use."""
    with _one_thread(), tempfile.TemporaryDirectory(prefix="derive-battery-") as folder:
        yield _loaded(name, source, Path(folder))


def _imported_kernel(kernel: Kernel):
    """``_imported`` of ``kernel``'s generated module."""
    from .codegen import render_function

    return _imported(kernel.name, render_function(kernel))


def check(kernel: Kernel, draws: list | None = None) -> battery.Verdict:
    """The numerical battery of ``kernel``'s generated module, single-threaded (deterministic)."""
    layer = kernel.layer
    with _imported_kernel(kernel) as fn:
        sizes = battery.battery_sizes(layer)
        verdict = battery.run(layer, fn, sizes, draws=draws, slack=battery.CHOOSE_SLACK, pooled=False)
        for seed in FEW_ENTRY_SEEDS if verdict.passed and verdict.few else ():
            # judged over each setting's draws together, as the form written is: one draw's error
            # of a total whose terms cancel is chance (``battery._judge_pooled``); and only the
            # few-entry gradients are in question, the others were judged on many entries
            again = battery.run(layer, fn, sizes, seed=seed, draws=verdict.settings,
                                slack=battery.CHOOSE_SLACK)
            verdict.findings += [f for f in again.findings if f.value in verdict.few]
            if not verdict.passed:
                break
        return verdict


def _check_written(kernel: Kernel, draws: list) -> battery.Verdict:
    """The battery at the bar every written kernel is held to (``SLACK``, each setting's draws
    together), not the margin forms are chosen by."""
    from .codegen import render_function

    return check_written(kernel.layer, render_function(kernel), draws)


def check_written(layer: Layer, source: str, draws: list | None = None) -> battery.Verdict:
    """``_check_written`` of the module ``source``: also a form of the module other than the one
    chosen (its forward run under autograd, ``codegen.render_function``'s route)."""
    with _imported(layer.name, source) as fn:
        return battery.run(layer, fn, battery.battery_sizes(layer), draws=draws)


def choose(layer: Layer, fused_only: bool = False) -> Choice:
    """The kernel ``layer`` gets (see the module docstring); ``fused_only`` raises instead of
    falling back to the step-by-step backward."""
    if not layer.fused:
        if fused_only:
            raise DerivationError(layer.name, "the layer is declared step-by-step only (fused = False)",
                                  "remove `fused = False` from the spec, or drop --fused-only")
        return Choice(layer, None, reason="declared step-by-step only (fused = False)")
    try:
        kernel = build_cached(layer)
    except DerivationError as e:
        if fused_only:
            raise
        return _steps_choice(layer, f"the fused engine cannot derive it: {_one_line(e)}")
    except DeriveError:  # the spec's own mistake (it cannot be traced): one line for the user, no fallback
        raise
    except Exception as e:  # a fault of the fused engine: the layer still gets a kernel, and the report says why
        if fused_only:
            raise
        return _steps_choice(layer, f"the fused engine failed ({type(e).__name__}: {_one_line(e)}); "
                                    f"report this as a bug")
    with _one_thread():
        draws = battery.settings(layer, battery.battery_sizes(layer))
    most_folded = kernel
    forbidden: dict[str, frozenset] = {}
    as_written: frozenset = frozenset()
    replayed: frozenset = frozenset()  # maxima whose zero adjoints are kept
    fault = ""
    changes: list[str] = []
    attempt = 0  # rewrites undone so far (trying a gradient as its formula reads is not counted)
    judged: set = set()  # (input, code) of the gradients' forms that failed
    while True:
        verdict = check(kernel, draws)
        if verdict.passed:
            return Choice(layer, kernel, verdict, changes=changes)
        formulas = {f"d{f.input}": f for f in kernel.formulas}
        failing = list(dict.fromkeys(f.value for f in verdict.findings))
        # a maximum's adjoint dropped as zero is computed as autograd does (``replayed_maxima``)
        vanished = frozenset(n.name for n in kernel.gradients.vanished)
        if vanished and not replayed:
            replayed = vanished
            changes += _replayed_changes(vanished)
            kernel, fault = _rebuilt(layer, forbidden, as_written, replayed)
            if fault:
                break
            continue
        # a gradient printed in place (``backward_plan``) is first printed as its formula reads
        fast = [v for v in failing if v in formulas and (formulas[v].fast or formulas[v].chain)
                and formulas[v].input not in as_written]
        if fast:
            as_written |= {formulas[v].input for v in fast}
            changes += [f"{v}: in-place form undone" for v in fast]
            kernel, fault = _rebuilt(layer, forbidden, as_written, replayed)
            if fault:
                break
            continue
        if attempt == MAX_ATTEMPTS or any(v not in formulas or not formulas[v].rewrites for v in failing):
            break
        for value in failing:
            formula = formulas[value]
            if formula.input in as_written:  # it failed as written too: its in-place form was not the cause
                changes.remove(f"{value}: in-place form undone")
            as_written -= {formula.input}  # the less folded formula is tried in place first again
            if attempt == MAX_ATTEMPTS - 1:  # the last try: the gradient as differentiated, no rewrite at all
                forbidden[formula.input] = frozenset({EVERY_REWRITE})
                changes.append(f"{value}: every rewrite undone")
                continue
            _undo_last(formula, forbidden, changes)
        attempt += 1
        judged |= {(formulas[v].input, formulas[v].code) for v in failing}
        kernel, fault = _rebuilt(layer, forbidden, as_written, replayed)
        # undoing a rewrite may give a form judged already (solving ``pred - target`` for ``pred``
        # or for ``target`` is one rewrite): its next rewrite is undone too, neither judged again
        # nor counted as an attempt
        for _ in range(MAX_SAME_FORMS):
            repeated = [f for f in (kernel.formulas if kernel else []) if (f.input, f.code) in judged and f.rewrites]
            if fault or not repeated:
                break
            for f in repeated:
                _undo_last(f, forbidden, changes)
            kernel, fault = _rebuilt(layer, forbidden, as_written, replayed)
        if fault:
            break
    if not fault:
        spelled = _spelled_form(layer, kernel, draws, replayed)
        if spelled is not None:
            kernel, verdict, changes = spelled  # (the rewrites undone above are not undone in it)
            return Choice(layer, kernel, verdict, changes=changes)
    finding = verdict.findings[0]
    if fused_only:
        raise DerivationError(layer.name, f"every fused form fails the numerical battery ({finding})",
                              "drop --fused-only to get the step-by-step backward as the kernel")
    reason = f"the fused form fails the numerical battery: {finding}"
    if fault:
        reason += f"; a less folded form cannot be built ({fault})"
    steps_verdict = _steps_verdict(layer, draws, reason)
    if not steps_verdict.passed:
        # no kernel passes with the margin: the step-by-step one (autograd's operations as the trace
        # writes them, where the spec calls one torch function: ``F.layer_norm``'s own statistics
        # round better) is no better, and slower (8x ``F.layer_norm``'s time). The most folded form
        # is written where it passes the bar every written kernel is held to
        written = _check_written(most_folded, draws)
        if written.passed:
            return Choice(layer, most_folded, written, note=WRITTEN_BAR)
    return Choice(layer, None, verdict, reason=reason, steps_verdict=steps_verdict)


# values that are no tensor of the layer's own arithmetic to keep: views, and masks
_NOT_SPELLED = frozenset({"input", "labels", "view", "permute", "expand", "not", "and", "or"}) | \
    frozenset(COMPARISONS) | frozenset(LABEL_COMPARISONS)


def _spelled_form(layer: Layer, kernel: Kernel, draws: list, replayed: frozenset) -> tuple | None:
    """The last fused form, tried before the step-by-step backward: every line the spec names is a
    node of its own, read where autograd reads it (its saved value, its adjoint), so the backward's
    arithmetic meets the spec's lines where autograd's does, with the derived formulas between
    them (a softmax written out keeps ``exp(x - m)`` as the forward computed it, where the normal
    form merged it into a larger ``exp``, rounding both arguments into one). ``(kernel, verdict,
    changes)`` where it passes the battery, else None."""
    graph = kernel.graph
    # (and every variance, named or not: inlined, ``x.std(0)``'s derivative recomputed it as
    # ``sum(x**2)/(n - 1) - sum(x)**2/(n**2 - n)``, the difference of sums that cancels at an offset)
    spelled = frozenset(n.name for n in graph.nodes if n is not graph.output and (
        n.named and n.shape and n.op not in _NOT_SPELLED or "variance_of" in n.attrs))
    if not spelled:
        return None
    before = replayed
    for _ in range(2):
        kernel, fault = _rebuilt(layer, {}, frozenset(), replayed, spelled)
        if fault:
            return None
        verdict = check(kernel, draws)
        if verdict.passed:
            what = "named lines" if all(n.named for n in graph.nodes if n.name in spelled) else "named lines and variances"
            named = f"the {what} kept as nodes ({', '.join(sorted(spelled))})"
            return kernel, verdict, _replayed_changes(before) + [named] + _replayed_changes(replayed - before)
        vanished = frozenset(n.name for n in kernel.gradients.vanished) - replayed
        if not vanished:
            return None
        replayed |= vanished  # and its maxima's zero adjoints replayed
    return None


def _replayed_changes(names: frozenset) -> list[str]:
    """The report's line for each maximum whose zero adjoint is replayed."""
    return [f"{name}: its zero adjoint replayed" for name in sorted(names)]


def _undo_last(formula, forbidden: dict, changes: list) -> None:
    """Forbid the last rewrite ``formula``'s refold took, for its gradient's next form."""
    last = formula.rewrites[-1]
    forbidden[formula.input] = forbidden.get(formula.input, frozenset()) | {(last.node.name, last.variable.name)}
    changes.append(f"d{formula.input}: {last.node.name} for {last.variable.name} undone")


def _rebuilt(layer: Layer, forbidden: dict, as_written: frozenset, replayed: frozenset,
             spelled: frozenset = frozenset()) -> tuple[Kernel | None, str]:
    """The kernel built again with fewer rewrites, or why it cannot be: a less folded form may hold
    what the printer refuses (an entry read at a computed position) or trip a fault of the engine's;
    the layer then gets its step-by-step kernel, as when no form passes, and the report says why."""
    try:
        return build(layer, forbidden, as_written, replayed, spelled), ""
    except DeriveError as e:
        return None, _one_line(e)
    except Exception as e:
        return None, f"{type(e).__name__}: {_one_line(e)}; report this as a bug"


_CHOSEN = {False: ByObject(maxsize=LAYERS_KEPT), True: ByObject(maxsize=LAYERS_KEPT)}


def chosen(layer: Layer, fused_only: bool = False) -> Choice:
    """``choose(layer)``, once per layer object in this process (of the latest ``LAYERS_KEPT``)."""
    return _CHOSEN[fused_only].get(layer, lambda layer: choose(layer, fused_only))


def fused_kernel(layer: Layer) -> Kernel | None:
    """The fused kernel ``layer`` gets, or None where its kernel is the step-by-step backward."""
    return chosen(layer).kernel


def has_fused_kernel(layer: Layer) -> bool:
    """Whether ``layer``'s backward is a fused kernel, so that a spec calling it uses that kernel
    (declared fused, and a fused form passed its checks); otherwise its operations are walked
    step by step like the caller's own."""
    return layer.fused and fused_kernel(layer) is not None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


__all__ = ["Choice", "choose", "chosen", "check", "check_written", "fused_kernel", "has_fused_kernel"]
