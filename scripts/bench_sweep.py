"""Every built-in fused kernel against what a user would otherwise run: forward + backward, float32, CPU.

    .venv/bin/python scripts/bench_sweep.py [--sizes 1024x512,4096x1024] [--layers a,b] [--repeat N]
                                            [--no-compile] [--json PATH] [--markdown PATH]

Columns, for each built-in fused layer at each size:

  native         the native torch op the layer matches (``tests/test_native.py``'s table), with
                 autograd; ``n/a`` where torch has none (batchnorm with Bessel's correction)
  spec           autograd through the layer's own spec (``derive.layers``): the peer a generated
                 kernel must never be slower than
  spec_compiled  ``torch.compile(spec, dynamic=False)``, forward and backward through AOTAutograd
  generated      the generated ``torch.autograd.Function`` (``generated/<layer>.py``)
  gen_compiled   the same module after ``compile_kernels(dynamic=False)``
  cpp            the generated C++ kernel (``generated/<layer>_cpp.py``, ``derive generate --backend cpp``);
                 ``n/a`` for a layer the kernel plan does not lower (a matrix product)

Sizes: a size ``AxB`` is the element count of the layer's largest input. A 2-d layer takes it as
``(n, d)`` (``(n, k)`` for a loss); ``linear`` as ``x (n, i) = (A, B)`` and ``W (i, o) = (B, B)``;
``batchnorm3d`` as ``(n, c, l) = (A/32, 32, B)``, the same element count in three axes;
``attention`` as ``A`` queries and keys of one head of ``HEAD`` (64) features, ``q, k, v (A, 64)``
(``scripts/bench.py``'s attention rows; a head of ``B`` features is not one anybody runs).

Method: scripts/bench.py's (its timing, gradient clearing and CPU metering are imported from it):
inputs are made once per layer and size; each column's output and gradients are checked against
autograd through the spec; each column is warmed up; a sample repeats calls for at least
``--min-sample-ms``; the columns are sampled interleaved ``--repeat`` times. Times are medians over
samples; ratios are medians of the per-repetition ratios, with their quartiles as the spread.
The first call of a compiled column at a size compiles: its seconds are reported apart
(``compile s``). The CPU the rest of the machine used while a row was timed is metered; above
0.25 core the row is marked contended.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests", ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import bench  # noqa: E402  (scripts/bench.py: the measurement machinery)
from derive.layers import FUSED  # noqa: E402
from derive.verify import random_inputs  # noqa: E402
from test_native import NATIVE, NO_NATIVE  # noqa: E402  (which native op each built-in matches)

DTYPE = torch.float32
COLUMNS = ("native", "spec", "spec_compiled", "generated", "gen_compiled", "cpp")
DEFAULT_SIZES = "1024x512,4096x1024"
CHANNELS = 32  # batchnorm3d's c
HEAD = 64  # attention's d and e


def dims_for(layer, a: int, b: int) -> dict:
    """The layer's sizes for ``AxB`` (see the module docstring)."""
    dims = list(layer.dims)
    classes = [d.classes for d in layer.tensors.values() if hasattr(d, "classes")]
    if len(dims) == 2:
        return {dims[0]: a, dims[1]: b}
    if layer.name == "linear":
        return {"n": a, "i": b, "o": b}
    if layer.name == "batchnorm3d":
        return {"n": max(1, a // CHANNELS), "c": CHANNELS, "l": b}
    if layer.name == "attention":
        return {"n": a, "m": a, "d": HEAD, "e": HEAD}
    raise SystemExit(f"bench_sweep: no size rule for {layer.name} with dimensions {dims} (classes {classes})")


def load_fresh(name: str):
    """A second copy of ``generated/<name>.py`` (``compile_kernels`` changes its module)."""
    path = ROOT / "generated" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_sweep_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def columns_for(layer, compile_: bool) -> dict:
    """name -> function of the spec's keyword arguments (None where the column does not exist)."""
    generated = getattr(importlib.import_module(f"generated.{layer.name}"), layer.name)
    out = {"native": NATIVE.get(layer.name), "spec": layer.fn, "generated": generated,
           "spec_compiled": None, "gen_compiled": None, "cpp": None}
    if (ROOT / "generated" / f"{layer.name}_cpp.py").exists():
        out["cpp"] = getattr(importlib.import_module(f"generated.{layer.name}_cpp"), layer.name)
    if compile_:
        torch._dynamo.reset()
        out["spec_compiled"] = torch.compile(layer.fn, dynamic=False)
        module = load_fresh(layer.name)
        module.compile_kernels(dynamic=False)
        out["gen_compiled"] = getattr(module, layer.name)
    return out


def inputs_for(layer, sizes: dict, seed: int = 0) -> dict:
    """The layer's inputs in float32 (its own example inputs where it has them), leaves requiring
    grad, and the upstream gradient under ``dout`` (None for a scalar loss)."""
    values = random_inputs(layer, sizes, DTYPE, seed)
    inputs = {k: (v.requires_grad_(k in layer.differentiable) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in values.items()}
    with torch.no_grad():
        out = layer.fn(**values)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["dout"] = None if out.dim() == 0 else torch.randn(out.shape, generator=g, dtype=DTYPE)
    return inputs


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(step, inputs, number: int, clock) -> float:
    """Seconds per call over ``number`` calls, by ``clock``; the gradients are dropped outside it."""
    total = 0.0
    for _ in range(number):
        bench.clear_grads(inputs)
        t0 = clock()
        step()
        total += clock() - t0
    return total / number


def forward_of(fn, layer):
    names = list(layer.inputs)
    return lambda i: fn(**{k: i[k] for k in names})


def collect(forward, inputs, wanted):
    bench.clear_grads(inputs)
    out = forward(inputs)
    out.backward(inputs["dout"])
    result = {"output": out.detach()} | {f"d{k}": inputs[k].grad.detach().clone() for k in wanted}
    bench.clear_grads(inputs)
    return result


def measure(layer, label: str, sizes: dict, args) -> dict:
    result = {"layer": layer.name, "size": label, "dims": sizes,
              "native_op": None if layer.name not in NATIVE else "tests/test_native.py"}
    inputs = inputs_for(layer, sizes)
    functions = columns_for(layer, not args.no_compile)
    forwards = {c: forward_of(f, layer) for c, f in functions.items() if f is not None}
    steps = {c: bench.training_step(f, inputs) for c, f in forwards.items()}
    active = [c for c in COLUMNS if c in steps]
    wanted = layer.differentiable

    # 1. The same computation: every column against autograd through the spec; the first call of a
    #    compiled column compiles, timed apart.
    reference = collect(forwards["spec"], inputs, wanted)
    errors, compile_s = {}, {}
    for c in active:
        if c == "spec":
            continue
        t0 = time.perf_counter()
        got = collect(forwards[c], inputs, wanted)
        if c.endswith("compiled"):
            compile_s[c] = time.perf_counter() - t0
        errors[c] = max(bench.max_rel_err(got[k], reference[k]) for k in reference)
    result["max_rel_err_vs_spec"] = errors
    result["compile_s"] = compile_s
    bad = {c: e for c, e in errors.items() if not e <= args.tolerance}
    if bad:
        print(f"  WARNING {layer.name} {label}: differs from autograd through the spec: {bad}", flush=True)

    # 2. Warm-up, and calls per sample.
    clock = CLOCKS[args.clock]
    number = {}
    for c in active:
        t = time_calls(steps[c], inputs, 1, clock)
        reps = 1
        while t * reps < 0.05 and reps < 1000:
            t = min(t, time_calls(steps[c], inputs, 1, clock))
            reps += 1
        number[c] = max(1, math.ceil(args.min_sample_ms * 1e-3 / max(t, 1e-9)))

    # 3. Interleaved samples.
    samples = {c: [] for c in active}
    gc.collect()
    gc.disable()
    meter = bench.CpuMeter()
    try:
        for _ in range(args.repeat):
            for c in active:
                samples[c].append(time_calls(steps[c], inputs, number[c], clock))
    finally:
        gc.enable()
    result["other_cpu"] = meter.read()
    result["contended"] = result["other_cpu"]["other_cores"] > bench.BUSY_CORES
    result["columns"] = {c: ({**bench.summary(samples[c]), "calls_per_sample": number[c]} if c in samples else None)
                         for c in COLUMNS}

    def ratio(a, b):
        if a not in samples or b not in samples:
            return None
        r = sorted(x / y for x, y in zip(samples[a], samples[b]))
        q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
        return {"median": statistics.median(r), "q1": q[0], "q3": q[2]}

    result["ratios"] = {
        "generated_over_spec": ratio("generated", "spec"),
        "generated_over_native": ratio("generated", "native"),
        "generated_over_spec_compiled": ratio("generated", "spec_compiled"),
        "gen_compiled_over_spec_compiled": ratio("gen_compiled", "spec_compiled"),
        "gen_compiled_over_spec": ratio("gen_compiled", "spec"),
        "cpp_over_spec": ratio("cpp", "spec"),
        "cpp_over_native": ratio("cpp", "native"),
    }
    del inputs, steps, forwards, functions
    gc.collect()
    return result


# -- reports -----------------------------------------------------------------------------------

def fmt_ms(col):
    return "n/a" if col is None else bench.fmt_ms(col)


def fmt_ratio(r, spread: bool = False):
    if r is None:
        return "n/a"
    text = bench.fmt_ratio(r["median"])
    return f"{text} ({bench.fmt_ratio(r['q1'])}-{bench.fmt_ratio(r['q3'])})" if spread else text


def markdown(report) -> str:
    env = report["environment"]
    lines = [
        f"float32, CPU ({env['cpu']}), torch {env['torch']}, {env['threads']} threads, median of "
        f"{report['settings']['repeat']} interleaved repetitions, forward + backward, "
        + ("elapsed time." if report["settings"]["clock"] == "wall" else "CPU time of the process."),
        "",
        "| layer | size | native ms | spec ms | spec compiled ms (compile s) | generated ms | "
        "generated compiled ms (compile s) | cpp ms | gen/spec (q1-q3) | gen/native | gen/spec compiled "
        "| gen compiled/spec compiled | cpp/spec | cpp/native |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        c, q, s = r["columns"], r["ratios"], r["compile_s"]

        def compiled(name):
            return "n/a" if c[name] is None else f"{fmt_ms(c[name])} ({s[name]:.0f})"

        mark = " ⚠" if r["contended"] else ""
        lines.append(
            f"| {r['layer']} | {r['size']}{mark} | {fmt_ms(c['native'])} | {fmt_ms(c['spec'])} | "
            f"{compiled('spec_compiled')} | {fmt_ms(c['generated'])} | {compiled('gen_compiled')} | "
            f"{fmt_ms(c.get('cpp'))} | {fmt_ratio(q['generated_over_spec'], True)} | "
            f"{fmt_ratio(q['generated_over_native'])} | {fmt_ratio(q['generated_over_spec_compiled'])} | "
            f"{fmt_ratio(q['gen_compiled_over_spec_compiled'])} | {fmt_ratio(q.get('cpp_over_spec'))} | "
            f"{fmt_ratio(q.get('cpp_over_native'))} |")
    slower = [r for r in report["results"] if r["ratios"]["generated_over_spec"]["median"] > 1.0]
    lines += [
        "",
        "- native: the op `tests/test_native.py` matches each layer with; n/a: "
        + "; ".join(f"{k}: {v}" for k, v in NO_NATIVE.items()) + ".",
        "- ratios: median over repetitions of the per-repetition ratio (the columns of one repetition ran back "
        "to back), quartiles in brackets; > 1: the generated kernel is slower.",
        "- compile s: the first call at the size, which compiles (torch's compile cache may be warm from earlier runs).",
        f"- slower than autograd through the spec (median gen/spec > 1): "
        + (", ".join(f"{r['layer']} {r['size']} ({fmt_ratio(r['ratios']['generated_over_spec'])})" for r in slower)
           or "none") + ".",
    ]
    cpp_slower = [r for r in report["results"] if (r["ratios"].get("cpp_over_spec") or {}).get("median", 0) > 1.0]
    if any(r["ratios"].get("cpp_over_spec") for r in report["results"]):
        lines.append("- C++ kernel slower than autograd through the spec (median cpp/spec > 1): "
                     + (", ".join(f"{r['layer']} {r['size']} ({fmt_ratio(r['ratios']['cpp_over_spec'])})"
                                  for r in cpp_slower) or "none") + ".")
    contended = [r for r in report["results"] if r["contended"]]
    if contended:
        used = ", ".join(f"{r['layer']} {r['size']}: {r['other_cpu']['other_cores']:.2f}" for r in contended)
        lines.append(f"- ⚠ contended: other processes used more than {bench.BUSY_CORES} of the {env['cores']} cores "
                     f"while this row was timed ({used}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated AxB (default {DEFAULT_SIZES})")
    p.add_argument("--layers", default="", help="comma-separated built-in fused layers (default: all)")
    p.add_argument("--repeat", type=int, default=10, help="interleaved repetitions (default 10)")
    p.add_argument("--min-sample-ms", type=float, default=50.0, help="shortest sample (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, which leaves out the time "
                        "other processes hold the cores (a loaded machine; use it with --threads 1)")
    p.add_argument("--no-compile", action="store_true", help="leave out the two torch.compile columns")
    p.add_argument("--keep-pages", action="store_true", help="keep freed memory mapped (see scripts/bench.py)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference before a warning")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    sizes = []
    for text in args.sizes.split(","):
        try:
            a, b = (int(v) for v in text.lower().split("x"))
        except ValueError:
            p.error(f"--sizes: {text!r} is not AxB")
        sizes.append((text, a, b))
    layers = list(FUSED)
    if args.layers:
        known = {layer.name: layer for layer in FUSED}
        unknown = [n for n in args.layers.split(",") if n not in known]
        if unknown:
            p.error(f"--layers: {', '.join(unknown)} not among the fused built-ins ({', '.join(known)})")
        layers = [known[n] for n in args.layers.split(",")]
    if args.keep_pages:
        bench.keep_pages()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or cores)
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": bench.cpu_name(),
           "cores": cores, "threads": torch.get_num_threads(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    idle = bench.CpuMeter()
    time.sleep(1.0)
    env["other_cpu_at_start"] = idle.read()
    print(f"torch {env['torch']} on {env['cpu']}, {env['threads']} threads, float32, repeat {args.repeat}; "
          f"other processes used {env['other_cpu_at_start']['other_cores']:.2f} cores at the start", flush=True)
    started = time.perf_counter()
    results = []
    for label, a, b in sizes:
        for layer in layers:
            t0 = time.perf_counter()
            print(f"{layer.name} {label} ...", end=" ", flush=True)
            r = measure(layer, label, dims_for(layer, a, b), args)
            results.append(r)
            print(f"{time.perf_counter() - t0:.1f} s, gen/spec {fmt_ratio(r['ratios']['generated_over_spec'], True)}"
                  + (" (contended)" if r["contended"] else ""), flush=True)
    report = {"settings": {"argv": sys.argv if argv is None else argv, "repeat": args.repeat,
                           "min_sample_ms": args.min_sample_ms, "clock": args.clock, "compile": not args.no_compile,
                           "keep_pages": args.keep_pages, "dtype": "float32"},
              "environment": env, "results": results, "wall_s": time.perf_counter() - started}
    table = markdown(report)
    print()
    print(table)
    print(f"wall time {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
