"""How much of a generated activation's time is the ``torch.autograd.Function`` mechanism itself.

    .venv/bin/python scripts/function_floor.py [--sizes 1x1,1024x512,4096x1024] [--repeat 31]
                                               [--threads 1] [--clock cpu] [--keep-pages]

For each built-in fused layer with one input of shape (n, d) (the activations), three columns,
forward + backward, float32:

  spec       autograd through the layer's own spec
  bare       a bare ``torch.autograd.Function`` around the generated module's own ``_forward`` and
             ``_backward`` (the same tensor operations): no input checks, no double-backward branch
  generated  the generated Function (``generated/<layer>.py``)

bare/spec is what any Python ``autograd.Function`` costs over autograd's C++ nodes for the same
math (at 1x1 it is nearly all fixed cost); generated/bare is what the generated module adds to that.
Method as ``scripts/bench_sweep.py``: interleaved samples of at least ``--min-sample-ms``, medians
of the per-repetition ratios.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests", ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

import bench  # noqa: E402
import bench_sweep  # noqa: E402
from derive.layers import FUSED  # noqa: E402


def bare_function(module, layer):
    """An ``autograd.Function`` calling ``module._forward`` and ``module._backward`` and nothing else."""
    (name,) = layer.inputs
    saved_names = [p for p in inspect.signature(module._kernels["backward"]).parameters][2:-2]  # (needs, dout, ..., n, d)

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            n, d = x.shape
            out, saved = module._forward(x, n, d)
            ctx.save_for_backward(x, *saved)
            ctx.sizes = (n, d)
            return out

        @staticmethod
        def backward(ctx, dout):
            x, *saved = ctx.saved_tensors
            rest = iter(saved)  # what the forward saved, in the order the backward reads it
            return module._kernels["backward"](ctx.needs_input_grad, dout, *(x if v == name else next(rest) for v in saved_names),
                                    *ctx.sizes)

    return Bare.apply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1x1,1024x512,4096x1024")
    p.add_argument("--repeat", type=int, default=31)
    p.add_argument("--min-sample-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(bench_sweep.CLOCKS), default="cpu")
    p.add_argument("--keep-pages", action="store_true", help="keep freed memory mapped (see scripts/bench.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_pages:
        bench.keep_pages()
    clock = bench_sweep.CLOCKS[args.clock]
    layers = [layer for layer in FUSED if len(layer.inputs) == 1 and len(layer.dims) == 2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, {args.clock} clock, "
          f"median of {args.repeat} interleaved repetitions, forward + backward")
    print("| layer | size | spec ms | bare Function ms | generated ms | bare/spec | generated/spec | generated/bare |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for text in args.sizes.split(","):
        a, b = (int(v) for v in text.lower().split("x"))
        for layer in layers:
            module = bench_sweep.load_fresh(layer.name)
            inputs = bench_sweep.inputs_for(layer, {layer.dims[0]: a, layer.dims[1]: b})
            columns = {"spec": layer.fn, "bare": bare_function(module, layer), "generated": getattr(module, layer.name)}
            steps = {c: bench.training_step(bench_sweep.forward_of(f, layer), inputs) for c, f in columns.items()}
            reference = bench_sweep.collect(bench_sweep.forward_of(layer.fn, layer), inputs, layer.differentiable)
            for c in ("bare", "generated"):  # the same computation
                got = bench_sweep.collect(bench_sweep.forward_of(columns[c], layer), inputs, layer.differentiable)
                assert max(bench.max_rel_err(got[k], reference[k]) for k in reference) < 1e-3, (layer.name, c)
            number = {}
            for c, step in steps.items():
                t = min(bench_sweep.time_calls(step, inputs, 1, clock) for _ in range(5))
                number[c] = max(1, round(args.min_sample_ms * 1e-3 / max(t, 1e-9)))
            samples = {c: [] for c in steps}
            for _ in range(args.repeat):
                for c, step in steps.items():
                    samples[c].append(bench_sweep.time_calls(step, inputs, number[c], clock))

            def ratio(x, y):
                return statistics.median(p / q for p, q in zip(samples[x], samples[y]))

            ms = {c: statistics.median(s) * 1e3 for c, s in samples.items()}
            print(f"| {layer.name} | {text} | {ms['spec']:.3f} | {ms['bare']:.3f} | {ms['generated']:.3f} | "
                  f"{ratio('bare', 'spec'):.2f} | {ratio('generated', 'spec'):.2f} | {ratio('generated', 'bare'):.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
