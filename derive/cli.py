"""The ``derive`` command: generate, check, verify, new, latex, bench."""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from . import cache
from .errors import DeriveError, ProofFailure

# torch and sympy are imported inside the commands that need them: an unchanged
# `derive generate` (everything in the cache) answers without loading either.

# The exercise's sizes for the comparison table: batch 32, 27 characters, 64 hidden units,
# block size 3, embedding 10 (other dimensions: 16).
EXERCISE_SIZES = {"n": 32, "k": 27, "d": 64, "v": 27, "t": 3, "e": 10, "hidden": 64}


def _layers(args) -> list:
    from .layers import BUILTIN, by_name, from_file

    if getattr(args, "layer", None):
        return [layer for a in args.layer for layer in from_file(a)]
    names = getattr(args, "names", None)
    return [by_name(n) for n in names] if names else list(BUILTIN)


def cmd_generate(args) -> int:
    start = time.perf_counter()
    key = cache.run_key(args.layer or [], args.names, proven=not args.no_prove, fused_only=args.fused_only)
    if not args.force and cache.unchanged(key, Path(args.out)):
        print(f"{args.out}/ is unchanged since this generation last ran (nothing it depends on changed; "
              f"{time.perf_counter() - start:.2f} s); --force re-derives")
        return 0
    from .generate import INDEX, generate

    layers = _layers(args)
    print(f"{'layer':18s} {'gradients':24s} {'sizes proven (n x other)':32s} {'kernel':12s} {'battery':10s} "
          f"{'generated vs autograd':23s} time")
    reports = generate(layers, Path(args.out), prove_sizes=not args.no_prove, force=args.force,
                       index=not args.names, fused_only=args.fused_only)
    cache.remember(Path(args.out), {key: ["__init__.py"] + ([INDEX] if not args.names else [])
                                    + [f for r in reports for f in r.files]})
    for note in filter(None, (r.note() for r in reports)):
        print(f"note: {note}")
    print(f"done in {time.perf_counter() - start:.1f} s; files in {args.out}/")
    return 0


def cmd_check(args) -> int:
    from .generate import stale_files

    problems = stale_files(_layers(args), Path(args.out), index=not args.names)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} generated file(s) out of date: run `derive generate`", file=sys.stderr)
        return 1
    print(f"{args.out}/ is up to date")
    return 0


def cmd_verify(args) -> int:
    if args.kernel:
        return verify_kernel(args)
    import torch

    from .prove import default_sizes, prove
    from .select import fused_kernel
    from .verify import against_autograd, load_module, sizes_text, steps_table, table

    for layer in _layers(args):
        print(f"== {layer.name}")
        sizes = {d: EXERCISE_SIZES.get(d, 16) for d in layer.dims}
        kernel = fused_kernel(layer)
        if kernel is not None:
            for small in default_sizes(layer):
                proof = prove(kernel, small)
                shown = sizes_text(small)
                if proof.skipped:
                    print(f"not proven at {shown}: the element-wise derivative {proof.skipped}")
                    break
                print(f"proven: fused {', '.join(proof.gradients)} equal the element-wise SymPy derivative at {shown} "
                      f"({proof.elements_checked} elements, {proof.seconds:.1f} s)")
        module = load_module(Path(args.out) / f"{layer.name}.py")
        rows = against_autograd(layer, getattr(module, layer.name), sizes, dtype=torch.float32)
        print(f"{'fused' if kernel is not None else 'step-by-step'} kernel vs autograd of the spec, float32, "
              f"sizes {sizes}:")
        print(table(rows))
        steps = load_module(Path(args.out) / f"{layer.name}_steps.py")
        print(f"step-by-step backward vs autograd of the spec (retain_grad), float32, sizes {sizes}:")
        print(table(steps_table(layer, steps, sizes, torch.float32)))
    return 0


def verify_kernel(args) -> int:
    """``derive verify LAYER --kernel FILE.py:NAME``: a hand-written kernel against autograd of the
    spec; exit 1 when it differs (for CI)."""
    import torch

    from .verify import as_function, check_kernel, kernel_sizes, load_function, sizes_text, table

    layers = _layers(args)
    if len(layers) != 1:
        raise DeriveError(f"--kernel {args.kernel}: name the one layer it implements (a built-in name, or "
                          f"--layer FILE.py:name); {len(layers)} layers were selected")
    layer = layers[0]
    fn = as_function(load_function(args.kernel), layer)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    check = check_kernel(layer, fn, args.kernel, kernel_sizes(layer, EXERCISE_SIZES), dtype)
    print(f"== {check.kernel} against autograd of the spec")
    for sizes, rows in check.tables:
        print(f"{args.dtype}, sizes {sizes_text(sizes)}:")
        print(table(rows))
    print(f"gradcheck (float64): {check.gradcheck}")
    failures = check.failures()
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"{args.kernel}: " + ("matches the spec" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


def cmd_new(args) -> int:
    from .scaffold import new_layer

    folder = Path(args.out)
    kernels = str(folder / "generated")
    path = new_layer(args.name, folder, kernels, force=args.force)
    print(f"wrote {path}: edit its forward pass, then run")
    print(f"  derive generate --layer {path} --out {kernels}")
    return 0


def cmd_latex(args) -> int:
    from .book import build_book

    pdf = build_book(_layers(args), Path(args.out) / "derivations", Path(args.build))
    print(f"wrote {pdf}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="derive", description="Derive, prove and generate fused backward passes.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, names=True):
        q.add_argument("--layer", action="append", metavar="FILE.py[:name]", help="layers from a spec file")
        q.add_argument("--out", default="generated", help="output folder (default: generated)")
        if names:
            q.add_argument("names", nargs="*", help="built-in layer names (default: all)")

    g = sub.add_parser("generate", help="derive every layer and (re)write its files")
    common(g)
    g.add_argument("--no-prove", action="store_true", help="skip the proofs on small symbolic matrices")
    g.add_argument("--force", action="store_true",
                   help="re-derive unchanged layers too, and overwrite generated files edited by hand")
    g.add_argument("--fused-only", action="store_true",
                   help="fail for a layer that gets no fused kernel (the fused engine cannot derive it, or every fused "
                        "form fails the numerical battery) instead of using its step-by-step backward as the kernel")
    g.set_defaults(run=cmd_generate)
    c = sub.add_parser("check", help="fail when generated files are stale or edited by hand")
    common(c)
    c.set_defaults(run=cmd_check)
    v = sub.add_parser("verify", help="prove each formula and print the comparison table against autograd; "
                                      "with --kernel, hold a hand-written kernel against the spec")
    common(v)
    v.add_argument("--kernel", metavar="FILE.py:NAME",
                   help="a hand-written function with the spec's arguments (by name), or an autograd.Function class "
                        "(its apply, with them in the spec's order): compare its output and "
                        "gradients with autograd of the spec, run gradcheck, exit 1 on a difference")
    v.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="with --kernel: float64 (default: the exercise's table, and gradcheck) or float32 (each "
                        "value's error against a float64 reference, held against autograd's own float32 error)")
    v.set_defaults(run=cmd_verify)
    t = sub.add_parser("latex", help="build one PDF of every layer's derivations, with a table of contents")
    common(t)
    t.add_argument("--build", default="build/derivations", help="build folder (default: build/derivations)")
    t.set_defaults(run=cmd_latex)
    b = sub.add_parser("bench", add_help=False,
                       help="time the generated kernels against native torch, autograd and a memory floor "
                            "(scripts/bench.py; `derive bench --help` for its options)")
    b.set_defaults(run=cmd_bench)
    n = sub.add_parser("new", help="write a spec file NAME.py to start a new layer from")
    n.add_argument("name", help="the layer's name (a Python identifier)")
    n.add_argument("--out", default=".", help="folder for NAME.py (default: the current folder)")
    n.add_argument("--force", action="store_true", help="overwrite an existing NAME.py")
    n.set_defaults(run=cmd_new)
    return p


def cmd_bench(args) -> int:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    if not script.is_file():
        raise DeriveError(f"bench: {script} not found; run `derive bench` from a checkout of the project")
    spec = importlib.util.spec_from_file_location("derive_bench", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module.main(args.rest, prog="derive bench")


def main(argv=None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.command != "bench" and rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.run(args)
    except DeriveError as e:
        print(f"derive: {e}", file=sys.stderr)
        return 2
    except ProofFailure as e:
        print(f"derive: proof failed: {e}", file=sys.stderr)
        return 1


def console() -> int:
    """The ``derive`` command: ``main`` in a process that ends when it returns."""
    status = main()
    # Interpreter shutdown runs the garbage collector over every live object, torch's and SymPy's:
    # 0.4 s of each run here. The process is ending and its memory goes back whole, so the heap is
    # frozen out of those passes.
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(console())
