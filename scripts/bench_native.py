"""The native kernels against torch: forward + backward of every fused built-in with a native kernel.

    .venv/bin/python scripts/bench_native.py [--sizes 4096x1024,65536x512] [--layers a,b] [--repeat N]
                                             [--device cpu|cuda] [--no-compile] [--no-build]
                                             [--steady-memory] [--json PATH] [--markdown PATH]

Columns, for each layer and size (float32; a size ``AxB`` is the layer's ``(n, d)``, ``(n, k)``; a size
``AxBxC`` is a layer of three axes', ``(n, c, l)``: each layer is measured at the sizes of its number of axes):

  native         the native torch op the layer matches (``tests/test_native.py``'s table), with autograd
  spec           autograd through the layer's own spec (``derive.layers``)
  spec_compiled  ``torch.compile(spec, dynamic=False)`` (``--no-compile`` leaves it out)
  generated      the generated eager kernel (``generated/<layer>.py``)
  cpp            the generated C++ kernel (``generated/<layer>_cpp.py``; on ``--device cuda``: ``triton``,
                 ``generated/<layer>_triton.py``)
  floor          a memory copy moving the bytes a forward + backward must move at least: every full-size
                 input read once, the output written once, the upstream gradient read once, every
                 full-size gradient written once

Method: inputs are made once per layer and size; each column's output and gradients are compared with
autograd through the spec in float64 on the same float32 inputs (the ``err`` columns: largest error over
the output and every gradient, relative to the largest reference entry; ``cpp/native err`` is the C++
kernel's error over native's); every column is warmed up, then the columns are sampled interleaved
in a new random order each repetition (every column follows every other as often: what ran before a
sample, and the memory it freed, changes its time), ``--repeat`` times, one forward + backward per sample, gradients dropped
outside the timed region, the garbage collector off. Times are medians; ratios are medians of the
per-repetition ratios (the columns of one repetition ran back to back). ``--steady-memory`` keeps freed
memory in the process, as a caching allocator would (``steady_memory``): by default a large freed
tensor goes back to the system, and whichever sample allocates next pays a page fault per page.

Build: ``cold build s`` is the first use of the extension in a fresh process with an empty cache folder
(the C++ compiler included), ``cached load s`` the first use in a fresh process with that folder built.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from derive.layers import FUSED  # noqa: E402
from derive.verify import random_inputs  # noqa: E402
from test_native import NATIVE  # noqa: E402  (the native op each built-in matches)

DTYPE = torch.float32
DEFAULT_SIZES = "4096x1024,65536x512,32x128x1024,256x256x512"


def native_name(device: str) -> str:
    return "triton" if device == "cuda" else "cpp"


def layers_with_native(device: str, names: list[str] | None) -> list:
    suffix = native_name(device)
    out = [layer for layer in FUSED if (ROOT / "generated" / f"{layer.name}_{suffix}.py").exists()]
    return [layer for layer in out if not names or layer.name in names]


def inputs_for(layer, shape: tuple, device: str, seed: int = 0) -> dict:
    sizes = dict(zip(layer.dims, shape))
    values = random_inputs(layer, sizes, DTYPE, seed)
    return {k: (v.to(device).requires_grad_(k in layer.differentiable) if torch.is_tensor(v) and v.is_floating_point()
                else v.to(device) if torch.is_tensor(v) else v) for k, v in values.items()}


def columns_for(layer, device: str, compile_: bool) -> dict:
    generated = getattr(importlib.import_module(f"generated.{layer.name}"), layer.name)
    native = getattr(importlib.import_module(f"generated.{layer.name}_{native_name(device)}"), layer.name)
    out = {"native": NATIVE.get(layer.name), "spec": layer.fn, "spec_compiled": None, "generated": generated,
           native_name(device): native}
    if compile_:
        torch._dynamo.reset()
        out["spec_compiled"] = torch.compile(layer.fn, dynamic=False)
    return out


def upstream(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)


def step(fn, inputs: dict, wanted: list[str], grad: torch.Tensor | None):
    out = fn(**inputs)
    out.backward(grad if out.dim() else None)
    return out


def clear(inputs: dict) -> None:
    for v in inputs.values():
        if torch.is_tensor(v):
            v.grad = None


def error(layer, fn, inputs: dict, grad) -> float:
    """Largest error of ``fn``'s output and gradients against float64 autograd through the spec."""
    wanted = layer.differentiable

    def run(f, dtype):
        leaves = {k: (v.detach().to(dtype).requires_grad_(k in wanted) if torch.is_tensor(v) and v.is_floating_point()
                      else v) for k, v in inputs.items()}
        out = f(**leaves)
        grads = torch.autograd.grad(out, [leaves[k] for k in wanted], None if grad is None else grad.to(dtype))
        return [out.detach(), *grads]

    ours, exact = run(fn, DTYPE), run(layer.fn, torch.float64)
    return max(float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)) for a, b in zip(ours, exact))


def floor_bytes(layer, inputs: dict, out: torch.Tensor) -> int:
    ndim = len(layer.dims)
    full = [v for k, v in inputs.items() if torch.is_tensor(v) and v.dim() == ndim]
    grads = [v for k, v in inputs.items() if k in layer.differentiable and torch.is_tensor(v) and v.dim() == ndim]
    outs = 2 if out.dim() == ndim else 0  # written, and its gradient read
    return sum(v.numel() * v.element_size() for v in full + grads) + outs * out.numel() * out.element_size()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(layer, shape: tuple, args) -> dict:
    inputs = inputs_for(layer, shape, args.device)
    wanted = layer.differentiable
    with torch.no_grad():
        out = layer.fn(**{k: v.detach() if torch.is_tensor(v) else v for k, v in inputs.items()})
    grad = upstream(out) if out.dim() else None
    columns = {k: f for k, f in columns_for(layer, args.device, not args.no_compile).items() if f is not None}
    errors = {k: error(layer, f, inputs, grad) for k, f in columns.items() if k != "spec_compiled"}
    src = torch.empty(max(1, floor_bytes(layer, inputs, out) // 8), dtype=DTYPE, device=args.device)
    steps = {k: (lambda f=f: step(f, inputs, wanted, grad)) for k, f in columns.items()}
    steps["floor"] = lambda: torch.empty_like(src).copy_(src)
    compile_s = None
    for name, run in steps.items():  # warm up (and compile)
        start = time.perf_counter()
        run()
        sync(args.device)
        if name == "spec_compiled":
            compile_s = time.perf_counter() - start
        clear(inputs)
        run()
        clear(inputs)
    samples = {k: [] for k in steps}
    shuffle = random.Random(0)
    gc.disable()
    try:
        order = list(steps)
        for _ in range(args.repeat):
            # a new order each repetition: every column follows every other as often (what ran
            # before a sample, its freed memory among it, changes the sample's time)
            shuffle.shuffle(order)
            for name in order:
                run = steps[name]
                clear(inputs)
                sync(args.device)
                start = time.perf_counter()
                run()
                sync(args.device)
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
        clear(inputs)
    ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    mine = native_name(args.device)

    def ratio(num, den):
        if num not in samples or den not in samples:
            return None
        return statistics.median(x / y for x, y in zip(samples[num], samples[den]))

    return dict(layer=layer.name, size="x".join(map(str, shape)), ms=ms, compile_s=compile_s, errors=errors,
                ratios={f"{mine}/native": ratio(mine, "native"), f"{mine}/spec": ratio(mine, "spec"),
                        f"{mine}/generated": ratio(mine, "generated"), f"{mine}/floor": ratio(mine, "floor"),
                        f"{mine}/spec_compiled": ratio(mine, "spec_compiled")},
                error_ratio=(errors[mine] / errors["native"]) if errors.get("native") else None)


def build_times(layer_name: str, device: str) -> dict:
    """Seconds to first use in a fresh process: with an empty cache (a cold build), then cached."""
    if device == "cuda":
        return {}
    code = (f"import time; t = time.perf_counter(); import generated.{layer_name}_cpp as m; "
            f"assert m.native_module() is not None; print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory(prefix="derive-bench-build-") as folder:
        env = {**os.environ, "DERIVE_NATIVE_CACHE": folder}
        seconds = []
        for _ in range(2):
            run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
            if run.returncode:
                return {"error": run.stderr.strip().splitlines()[-1:]}
            seconds.append(float(run.stdout.split()[-1]))
    return {"cold_build_s": seconds[0], "cached_load_s": seconds[1]}


def markdown(report: dict) -> str:
    mine = report["native_column"]
    lines = [report["title"], "",
             f"| layer | size | native ms | spec ms | spec compiled ms | generated ms | {mine} ms | floor ms | "
             f"{mine}/native | {mine}/spec | {mine}/spec compiled | {mine}/generated | {mine}/floor | native err | "
             f"{mine} err | {mine}/native err |", "|---|---|" + "---:|" * 14]

    def f(x, digits=2):
        return "n/a" if x is None else f"{x:.{digits}f}"

    def err(x):
        return "n/a" if x is None else f"{x:.1e}"

    for row in report["rows"]:
        ms, r, e = row["ms"], row["ratios"], row["errors"]
        lines.append(f"| {row['layer']} | {row['size']} | {f(ms.get('native'))} | {f(ms.get('spec'))} | "
                     f"{f(ms.get('spec_compiled'))} | {f(ms.get('generated'))} | {f(ms.get(mine))} | "
                     f"{f(ms.get('floor'))} | {f(r[f'{mine}/native'])} | {f(r[f'{mine}/spec'])} | {f(r[f'{mine}/spec_compiled'])} | "
                     f"{f(r[f'{mine}/generated'])} | {f(r[f'{mine}/floor'])} | "
                     f"{err(e.get('native'))} | {err(e.get(mine))} | "
                     f"{f(row['error_ratio'])} |")
    if report.get("build"):
        b = report["build"]
        lines += ["", f"Extension of generated/ (every layer, one build): cold build {b.get('cold_build_s', 0):.1f} s, "
                      f"cached load {b.get('cached_load_s', 0):.3f} s (fresh processes)."]
    return "\n".join(lines) + "\n"


def steady_memory() -> bool:
    """Keep every freed block in the process, as a caching allocator does (glibc: no ``mmap`` for
    large blocks, no trimming of the heap's top). By default a freed 16 MiB tensor goes back to the
    system and the next allocation of its size is fresh pages, a fault per page: which sample pays
    that depends on what ran before it, and at 4096x1024 it is tens of percent of a forward +
    backward, on either side. Both sides run under the same allocator either way."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES)
    p.add_argument("--layers", default="", help="comma-separated layer names (default: every one with a native kernel)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-build", action="store_true", help="leave out the cold-build and cached-load timings")
    p.add_argument("--steady-memory", action="store_true",
                   help="keep freed memory in the process (glibc's mallopt): no sample pays page faults")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    if args.steady_memory and not steady_memory():
        print("bench_native: --steady-memory needs glibc's mallopt; not found here", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_native: --device cuda needs a CUDA device; none is visible here", file=sys.stderr)
        return 2
    layers = layers_with_native(args.device, [x for x in args.layers.split(",") if x])
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    title = (f"float32, {args.device} ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"median of {args.repeat} interleaved repetitions, forward + backward"
             + (", freed memory kept in the process (--steady-memory)." if args.steady_memory else "."))
    report = {"title": title, "native_column": native_name(args.device), "rows": []}
    for layer in layers:
        for shape in [s for s in sizes if len(s) == len(layer.dims)]:
            row = measure(layer, shape, args)
            report["rows"].append(row)
            r = row["ratios"]
            print(f"{row['layer']:26s} {row['size']:>10s}  " + "  ".join(f"{k} {v:.3f}" for k, v in r.items() if v)
                  + f"  err {row['errors'][native_name(args.device)]:.1e}", flush=True)
    if not args.no_build and layers:
        report["build"] = build_times(layers[0].name, args.device)
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
