"""A long fuzz run: many random layers through the whole toolkit, tallied, never stopping at a failure.

    python scripts/soak.py                          # 1,000 fused and 1,000 step-by-step layers
    python scripts/soak.py --family fused --examples 2000 --lines 6
    python scripts/soak.py --family fused --examples 300 --time --threads 1 --clock cpu
    python scripts/soak.py --examples 1000 --minutes 30 --time   # as many as fit in 30 minutes a family
    python scripts/soak.py --spec build/soak/timing/*.py --time --threads 1 --clock cpu  # saved layers again

The layers are the ones ``tests/test_fuzz.py`` writes (``tests/fuzz``), checked the same way
(``fuzz.harness.run``: derive, generate, import, compare with autograd in float64, gradcheck, and
the numerical battery on the kernel written, with other inputs than its form was chosen with).
Unlike the test, a failure does not stop the run: its spec is saved to ``--save`` (a file to hand
to ``derive generate --layer``) and the run goes on, so one soak reports every kind of failure.
The last line is the tally; the exit status is 1 when any layer failed.

``--time`` also times each random layer that passed, forward + backward, its kernel (the
generated ``<name>.py``: fused, or the step-by-step backward where that was chosen) against
autograd through its spec, at ``--time-size`` (default 1024x512: ``n`` x ``k``), float32, with
``scripts/bench_sweep.py``'s method (interleaved samples, the median of the per-repetition
ratios). It prints the distribution of the ratios (median, 90th percentile, largest, how many
above 1.1) and the slowest layers; it saves the spec of every layer above 1.1 (and of those
listed) to ``--save``/timing. Timing is no verdict: the exit status does not depend on it.

``--spec`` runs (and with ``--time`` times) the given spec files instead of random layers: the
failing, slow or slowest layers a soak saved, checked and timed again after a change.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

STATUSES = ("passed", "refused", "slow", "failed")
TOO_SLOW = 1.1  # a kernel this much slower than autograd through its spec is listed
SMALL_MS = 0.5  # autograd through the spec faster than this: the layer computes little at the size timed


def time_layer(spec, folder: Path, sizes: dict, repeat: int, min_ms: float, clock) -> tuple[float, str, float]:
    """The median over ``repeat`` interleaved repetitions of (this layer's kernel) / (autograd
    through its spec), forward + backward, float32, at ``sizes``; which kernel it is; and the
    milliseconds autograd through the spec takes (the work a kernel's fixed cost per call is
    weighed against)."""
    import bench_sweep
    from derive.layers import from_file
    from derive.verify import load_module

    (layer,) = from_file(str(folder / f"{spec.name}.py"))
    module = load_module(folder / spec.name / f"{layer.name}.py")
    kind = "fused" if hasattr(module, "_backward") else "step-by-step"
    kernel = getattr(module, layer.name)
    inputs = bench_sweep.inputs_for(layer, at_positions(layer, sizes))
    steps = [bench_sweep.bench.training_step(bench_sweep.forward_of(f, layer), inputs) for f in (kernel, layer.fn)]
    number = []
    for step in steps:  # warm up, and calls per sample
        t = min(bench_sweep.time_calls(step, inputs, 1, clock) for _ in range(3))
        number.append(max(1, round(min_ms * 1e-3 / max(t, 1e-9))))
    ratios, spec_s = [], []
    for _ in range(repeat):
        ours, theirs = (bench_sweep.time_calls(step, inputs, k, clock) for step, k in zip(steps, number))
        ratios.append(ours / theirs)
        spec_s.append(theirs)
    return statistics.median(ratios), kind, 1e3 * statistics.median(spec_s)


def distribution(ratios: list[float]) -> str:
    ratios = sorted(ratios)
    p90 = ratios[min(len(ratios) - 1, int(round(0.9 * (len(ratios) - 1))))]
    slow = sum(r > TOO_SLOW for r in ratios)
    return (f"{len(ratios)} layers: median {statistics.median(ratios):.2f}, p90 {p90:.2f}, max {ratios[-1]:.2f}, "
            f"{slow} above {TOO_SLOW}")


def timing_report(times: dict, sources: dict, save: Path, size: str, worst: int = 10) -> None:
    """The distribution of the ratios (all layers, by kernel, and by how much work autograd does:
    below ``SMALL_MS`` a generated Function's fixed cost per call is most of the ratio), and the
    slowest layers, of all and of those with work enough; the spec of every layer above
    ``TOO_SLOW`` is saved (to time again after a change, or to read)."""
    if not times:
        print("timing: no layer timed")
        return
    print(f"timing at {size}, kernel / autograd through the spec (forward + backward, float32), "
          + distribution([r for r, _, _ in times.values()]))
    for kind in sorted({k for _, k, _ in times.values()}):
        print(f"  {kind} kernels: " + distribution([r for r, k, _ in times.values() if k == kind]))
    for label, small in ((f"autograd under {SMALL_MS} ms", True), (f"autograd {SMALL_MS} ms or more", False)):
        ratios = [r for r, _, ms in times.values() if (ms < SMALL_MS) == small]
        if ratios:
            print(f"  {label}: " + distribution(ratios))
    folder = save / "timing"
    folder.mkdir(parents=True, exist_ok=True)
    ranked = sorted(times.items(), key=lambda kv: -kv[1][0])
    for name, (ratio, _, _) in ranked:
        if ratio > TOO_SLOW:
            (folder / f"{name}.py").write_text(sources[name])
    for label, rows in (("slowest", ranked), (f"slowest with autograd at {SMALL_MS} ms or more",
                                              [row for row in ranked if row[1][2] >= SMALL_MS])):
        print(f"  {label}:")
        for name, (ratio, kind, ms) in rows[:worst]:
            path = folder / f"{name}.py"
            if not path.exists():
                path.write_text(sources[name])
            print(f"  {ratio:.2f}  {kind:12s}  autograd {ms:.3f} ms  {path}")


def again(paths: list[Path], save: Path, timing: dict | None = None) -> Counter:
    """The saved specs ``paths`` through the same checks (and timing) as a random layer."""
    from fuzz.specs import FuzzSpec

    tally, reasons = Counter(), Counter()
    scratch = tempfile.TemporaryDirectory(prefix="derive-soak-")  # removed once the soak is done with it
    folder = Path(scratch.name)
    for path in paths:
        source = path.read_text()
        spec = FuzzSpec(path.stem, source, f"{path.stem}.fused = False" not in source, _check_sizes(path))
        _one(spec, folder, save, tally, reasons, timing)
    print(f"soak of {len(paths)} saved layers: " + ", ".join(f"{tally[s]} {s}" for s in STATUSES))
    for reason, count in reasons.most_common():
        print(f"  {count} refused: {reason}")
    return tally


def at_positions(layer, sizes: dict) -> dict:
    """``sizes`` (the fuzzer's names: ``n``, ``k``, ``m``), and each of the layer's own dimension
    names (``d`` of a user's layer) the size at its position."""
    named = list(sizes.values())
    return {**{d: named[min(k, len(named) - 1)] for k, d in enumerate(layer.dims)}, **sizes}


def _check_sizes(path: Path) -> dict:
    """The sizes a saved spec is checked at: the fuzzer's (``n`` 5, ``k`` 6, ``m`` 7), by name or
    by position (``at_positions``). A spec that does not load gets the fuzzer's, and the check
    says what is wrong with it."""
    from derive.layers import from_file

    sizes = {"n": 5, "k": 6, "m": 7}
    try:
        (layer,) = from_file(str(path))
    except Exception:
        return sizes
    return {d: size for d, size in at_positions(layer, sizes).items() if d in layer.dims}


def _one(spec, folder: Path, save: Path, tally: Counter, reasons: Counter, timing: dict | None) -> None:
    """Check ``spec`` (and time it, with ``timing``), counted in ``tally``; a failing or slow one's
    spec saved to ``save``, a refused one's to ``save``/refused."""
    from fuzz.harness import run

    try:
        outcome = run(spec, folder)
        tally[outcome.status] += 1
        if timing is not None and outcome.status == "passed":
            timing["times"][spec.name] = time_layer(spec, folder, timing["sizes"], timing["repeat"],
                                                    timing["min_ms"], timing["clock"])
            timing["sources"][spec.name] = spec.source
            ratio, kind, ms = timing["times"][spec.name]
            print(f"  time {ratio:.3f} {kind} autograd {ms:.3f} ms {spec.name}", flush=True)
        if outcome.status == "refused":  # a clear refusal: counted by reason, its spec kept to read
            reasons[outcome.message.split(": ", 1)[1]] += 1
            (save / "refused").mkdir(parents=True, exist_ok=True)
            (save / "refused" / f"{spec.name}.py").write_text(spec.source)
        elif outcome.status == "slow":
            (save / f"{spec.name}.py").write_text(spec.source)
            print(f"slow: {save / spec.name}.py", flush=True)
    except Exception as e:  # a wrong result or a crash: keep the spec, go on
        tally["failed"] += 1
        (save / f"{spec.name}.py").write_text(spec.source)
        print(f"FAILED: {save / spec.name}.py\n{traceback.format_exception_only(e)[-1][:2000]}", flush=True)


def soak(fused: bool, examples: int, lines: int, save: Path, every: int = 100, timing: dict | None = None,
         minutes: float | None = None) -> Counter:
    from fuzz.specs import layer_specs

    family = "fused" if fused else "step-by-step"
    tally, reasons, names = Counter(), Counter(), set()
    scratch = tempfile.TemporaryDirectory(prefix="derive-soak-")  # removed once the soak is done with it
    folder = Path(scratch.name)
    start = time.perf_counter()

    # generation only: a failure is saved and counted, not shrunk (shrinking one takes minutes)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(spec=layer_specs(fused, lines))
    def check(spec):
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            return  # out of time: the rest of the examples are drawn but not run
        names.add(spec.name)
        _one(spec, folder, save, tally, reasons, timing)
        done = sum(tally.values())
        if done % every == 0:
            print(f"  {family}: {done} layers, {dict(tally)}, {time.perf_counter() - start:.0f} s", flush=True)

    check()
    seconds = time.perf_counter() - start
    print(f"soak {family}, up to {lines} lines: {sum(tally.values())} random layers tried ({len(names)} distinct), "
          + ", ".join(f"{tally[s]} {s}" for s in STATUSES) + f", {seconds:.0f} s")
    for reason, count in reasons.most_common():
        print(f"  {count} refused: {reason}")
    return tally


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["fused", "steps", "both"], default="both")
    p.add_argument("--examples", type=int, default=1000, help="random layers per family (default 1000)")
    p.add_argument("--lines", type=int, default=6, help="most operations per layer (default 6)")
    p.add_argument("--seconds", type=int, default=60,
                   help="a derivation taking more CPU seconds is stopped and counted as slow (default 60)")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop running new layers of a family after this many minutes (the tally says how many ran)")
    p.add_argument("--save", type=Path, default=Path("build/soak"), help="where failing specs go (default build/soak)")
    p.add_argument("--time", action="store_true", help="also time each passing layer against autograd through its spec")
    p.add_argument("--time-size", default="1024x512", help="n x k of the timed inputs (default 1024x512)")
    p.add_argument("--time-repeat", type=int, default=7, help="interleaved repetitions per layer (default 7)")
    p.add_argument("--time-min-ms", type=float, default=20.0, help="shortest sample (default 20 ms)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (a loaded machine; with --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's)")
    p.add_argument("--spec", type=Path, nargs="+", default=None,
                   help="run (and with --time, time) these saved spec files instead of random layers")
    args = p.parse_args(argv)
    os.environ["DERIVE_FUZZ_SECONDS"] = str(args.seconds)  # read by the harness when it is imported
    args.save.mkdir(parents=True, exist_ok=True)
    families = {"fused": [True], "steps": [False], "both": [True, False]}[args.family]
    timing = None
    if args.time:
        import torch

        import bench_sweep

        try:
            n, k = (int(v) for v in args.time_size.lower().split("x"))
        except ValueError:
            p.error(f"--time-size: {args.time_size!r} is not NxK")
        if args.threads:
            torch.set_num_threads(args.threads)
        timing = {"times": {}, "sources": {}, "sizes": {"n": n, "k": k, "m": k}, "repeat": args.time_repeat,
                  "min_ms": args.time_min_ms, "clock": bench_sweep.CLOCKS[args.clock]}
    missing = [str(path) for path in args.spec or [] if not path.is_file()]
    if missing:
        p.error(f"--spec: no such file: {', '.join(missing)}")
    failed = 0
    if args.spec:
        failed = again(args.spec, args.save, timing)["failed"]
    for fused in families if not args.spec else []:
        failed += soak(fused, args.examples, args.lines, args.save, timing=timing, minutes=args.minutes)["failed"]
    if timing is not None:
        timing_report(timing["times"], timing["sources"], args.save, args.time_size)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
