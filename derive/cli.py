"""The ``derive`` command: generate, check, verify, latex."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .book import build_book
from .errors import DeriveError
from .generate import generate, stale_files
from .kernel import build
from .layers import BUILTIN, by_name, from_file
from .prove import default_sizes, prove
from .verify import against_autograd, load_module, steps_table, table

# The exercise's sizes for the comparison table: batch 32, 27 characters, 64 hidden units,
# block size 3, embedding 10 (other dimensions: 16).
EXERCISE_SIZES = {"n": 32, "k": 27, "d": 64, "v": 27, "t": 3, "e": 10, "hidden": 64}


def _layers(args) -> list:
    if getattr(args, "layer", None):
        return [layer for a in args.layer for layer in from_file(a)]
    names = getattr(args, "names", None)
    return [by_name(n) for n in names] if names else list(BUILTIN)


def cmd_generate(args) -> int:
    start = time.perf_counter()
    print(f"{'layer':18s} {'gradients':24s} {'sizes proven (n x other)':33s} {'generated vs autograd':23s} time")
    generate(_layers(args), Path(args.out), prove_sizes=not args.no_prove, force=args.force, index=not args.names)
    print(f"done in {time.perf_counter() - start:.1f} s; files in {args.out}/")
    return 0


def cmd_check(args) -> int:
    problems = stale_files(_layers(args), Path(args.out), index=not args.names)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} generated file(s) out of date: run `derive generate`", file=sys.stderr)
        return 1
    print(f"{args.out}/ is up to date")
    return 0


def cmd_verify(args) -> int:
    for layer in _layers(args):
        print(f"== {layer.name}")
        sizes = {d: EXERCISE_SIZES.get(d, 16) for d in layer.dims}
        if layer.fused:
            kernel = build(layer)
            for small in default_sizes(kernel):
                proof = prove(kernel, small)
                shown = ", ".join(f"{k}={v}" for k, v in small.items())
                print(f"proven: fused {', '.join(proof.gradients)} equal the element-wise SymPy derivative at {shown} "
                      f"({proof.elements_checked} elements, {proof.seconds:.1f} s)")
            module = load_module(Path(args.out) / f"{layer.name}.py")
            rows = against_autograd(layer, getattr(module, layer.name), sizes, dtype=torch.float32)
            print(f"fused kernel vs autograd of the spec, float32, sizes {sizes}:")
            print(table(rows))
        steps = load_module(Path(args.out) / f"{layer.name}_steps.py")
        print(f"step-by-step backward vs autograd of the spec (retain_grad), float32, sizes {sizes}:")
        print(table(steps_table(layer, steps, sizes, torch.float32)))
    return 0


def cmd_latex(args) -> int:
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
    g.add_argument("--force", action="store_true", help="overwrite generated files edited by hand")
    g.set_defaults(run=cmd_generate)
    c = sub.add_parser("check", help="fail when generated files are stale or edited by hand")
    common(c)
    c.set_defaults(run=cmd_check)
    v = sub.add_parser("verify", help="prove each formula and print the comparison table against autograd")
    common(v)
    v.set_defaults(run=cmd_verify)
    t = sub.add_parser("latex", help="build one PDF of every layer's derivations, with a table of contents")
    common(t)
    t.add_argument("--build", default="build/derivations", help="build folder (default: build/derivations)")
    t.set_defaults(run=cmd_latex)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except DeriveError as e:
        print(f"derive: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
