"""The ``derive`` command: generate, check, verify, new, latex, bench."""
from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import time
from pathlib import Path

from . import cache
from .errors import DeriveError, ProofFailure, SpecError

# torch and sympy are imported inside the commands that need them: an unchanged
# `derive generate` (everything in the cache) answers without loading either.

# The exercise's sizes for the comparison table: batch 32, 27 characters, 64 hidden units,
# block size 3, embedding 10 (other dimensions: 16).
EXERCISE_SIZES = {"n": 32, "k": 27, "d": 64, "v": 27, "t": 3, "e": 10, "hidden": 64}


_SPEC_FILES: dict[str, str] = {}  # layer name -> its spec file, to name the file in an error raised without it


def _layers(args) -> list:
    from .layers import BUILTIN, by_name, from_file

    if getattr(args, "layer", None):
        layers = [layer for a in args.layer for layer in from_file(a)]
    else:
        names = getattr(args, "names", None)
        layers = [by_name(n) for n in names] if names else list(BUILTIN)
    _SPEC_FILES.clear()
    for layer in layers:
        _SPEC_FILES.setdefault(layer.name, layer.spec_path or layer.source_file)
    return layers


def _command(args, verb: str = "generate") -> str:
    """The command line that does ``verb`` for what ``args`` selected, as the user would type it."""
    from .codegen import command

    return command(args.layer or [], args.names or [], args.out, verb)


def cmd_generate(args) -> int:
    start = time.perf_counter()
    key = cache.run_key(args.layer or [], args.names, proven=not args.no_prove,
                        options=f"allow-other-sources:{args.allow_other_sources};fused-only:{args.fused_only}")
    if not args.force and cache.unchanged(key, Path(args.out)):
        print(f"{args.out}/ is unchanged since this generation last ran (nothing it depends on changed; "
              f"{time.perf_counter() - start:.2f} s); --force re-derives")
        return 0
    from .book import index_specs
    from .generate import INDEX, generate

    layers = _layers(args)
    heading = [f"{'layer':18s} {'gradients':24s} {'sizes proven (n x other)':32s} {'kernel':12s} {'battery':10s} "
               f"{'generated vs autograd':23s} time"]

    def echo(line: str) -> None:  # the table's heading comes with its first row (not before a refusal)
        while heading:
            print(heading.pop())
        print(line)

    out = Path(args.out)
    reports = generate(layers, out, prove_sizes=not args.no_prove, force=args.force, index=not args.names,
                       allow_other_sources=args.allow_other_sources, echo=echo, fused_only=args.fused_only)
    index = [INDEX] if not args.names else []
    listed = index_specs((out / INDEX).read_text()) if index and (out / INDEX).is_file() else []
    read = frozenset().union(*(r.inputs for r in reports), cache.user_files({str(out / s.partition(":")[0]) for s in listed}))
    cache.remember(out, {key: ["__init__.py"] + index + [f for r in reports for f in r.files]}, {key: read})
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
        print(f"{len(problems)} generated file(s) out of date: run `{_command(args)}`", file=sys.stderr)
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

    failures = []

    def module(path: Path):
        if not path.is_file():
            raise DeriveError(f"{path} is missing: run `{_command(args)}` first")
        return load_module(path)

    for layer in _layers(args):
        print(f"== {layer.name}")
        sizes = {d: EXERCISE_SIZES.get(d, 16) for d in layer.dims}
        tables = []
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
        written = getattr(module(Path(args.out) / f"{layer.name}.py"), layer.name)
        what = "fused kernel" if kernel is not None else "kernel (the step-by-step backward)"
        tables.append((what, against_autograd(layer, written, sizes, dtype=torch.float32)))
        steps = module(Path(args.out) / f"{layer.name}_steps.py")
        tables.append(("step-by-step backward", steps_table(layer, steps, sizes, torch.float32)))
        for what, rows in tables:
            print(f"{what} vs autograd of the spec{' (retain_grad)' if what.startswith('step') else ''}, float32, "
                  f"sizes {sizes_text(sizes)}:")
            print(table(rows))
            failures += [f"{layer.name}: the {what}'s {r.name} is not close to autograd of the spec "
                         f"(maxdiff {r.maxdiff:.3e}, float32, sizes {sizes_text(sizes)})" for r in rows if not r.approximate]
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


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
        q.add_argument("--layer", action="append", metavar="FILE.py[:name]|DIR",
                       help="layers from a spec file (one of them with :name), or every spec file in a folder")
        q.add_argument("--out", default="generated", help="output folder (default: generated)")
        if names:
            q.add_argument("names", nargs="*", help="built-in layer names (default: all)")

    g = sub.add_parser("generate", help="derive every layer and (re)write its files")
    common(g)
    g.add_argument("--no-prove", action="store_true", help="skip the proofs on small symbolic matrices")
    g.add_argument("--force", action="store_true",
                   help="re-derive unchanged layers too, and overwrite generated files edited by hand "
                        "(never a file derive did not write)")
    g.add_argument("--allow-other-sources", action="store_true",
                   help="write into an output folder that also holds Python files derive did not write "
                        "(they are never touched)")
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


class Stopped(BaseException):
    """SIGTERM, raised where the process is, so it ends as after Ctrl-C: files whole, one line."""


def _terminated(signum, frame):
    raise Stopped(signum)


def main(argv=None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.command != "bench" and rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        return args.run(args)
    except SpecError as e:
        if not e.file and e.layer in _SPEC_FILES:
            e.file = _SPEC_FILES[e.layer]
        return _fail(str(e), 2)
    except DeriveError as e:
        return _fail(str(e), 2)
    except ProofFailure as e:
        return _fail(f"proof failed: {e}", 1)
    except OSError as e:  # a path that cannot be read or written
        where = e.filename or getattr(args, "out", "")
        return _fail(f"{where}: {e.strerror or e}; check the path and its permissions (or choose another --out)", 2)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); every file written is whole, the others are as they were", 130)
    except Stopped:
        return _fail("terminated (SIGTERM); every file written is whole, the others are as they were", 143)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(message: str, status: int) -> int:
    lines = message.splitlines() or [""]
    for line in lines:
        print(f"derive: {line}", file=sys.stderr)
    return status


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
