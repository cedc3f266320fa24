"""Time the kernel ``derive generate`` writes for every layer of some spec files against autograd
through each layer's own spec: forward + backward, float32, medians of interleaved repetitions.

    python scripts/spec_timing.py tests/specs/natural_layers.py --threads 1

The first dimension of each layer is ``--rows`` (1024), every other one ``--size`` (256). Each
line gives kernel / autograd, which kernel was written (fused or step-by-step) and the milliseconds
autograd takes; the slowest come last. The kernels are written to a temporary folder; nothing in
the repository is touched. (``soak.py --spec FILE --time`` does the same for the fuzzer's layers.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sweep  # noqa: E402
from derive.generate import render_kernel  # noqa: E402
from derive.layers import from_file  # noqa: E402
from derive.verify import load_module  # noqa: E402

SAMPLE_SECONDS = 0.02  # a sample repeats a call until it lasts about this long


def time_layer(layer, folder: Path, rows: int, size: int, repeat: int) -> tuple[float, str, float]:
    """(kernel / autograd through the spec, median over ``repeat`` interleaved samples; which kernel;
    autograd's milliseconds)."""
    path = folder / f"{layer.name}.py"
    path.write_text(render_kernel(layer))
    module = load_module(path)
    kind = "fused" if hasattr(module, "_backward") else "step-by-step"
    sizes = {d: rows if k == 0 else size for k, d in enumerate(layer.dims)}
    inputs = bench_sweep.inputs_for(layer, sizes)
    steps = [bench_sweep.bench.training_step(bench_sweep.forward_of(f, layer), inputs)
             for f in (getattr(module, layer.name), layer.fn)]
    number = []
    for step in steps:  # warm up, and calls per sample
        t = min(bench_sweep.time_calls(step, inputs, 1, time.perf_counter) for _ in range(3))
        number.append(max(1, round(SAMPLE_SECONDS / max(t, 1e-9))))
    ratios, theirs_ms = [], []
    for _ in range(repeat):
        ours, theirs = (bench_sweep.time_calls(s, inputs, k, time.perf_counter) for s, k in zip(steps, number))
        ratios.append(ours / theirs)
        theirs_ms.append(1e3 * theirs)
    return statistics.median(ratios), kind, statistics.median(theirs_ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", help="spec files (every layer of each is timed)")
    p.add_argument("--rows", type=int, default=1024, help="the first dimension of every layer (default 1024)")
    p.add_argument("--size", type=int, default=256, help="every other dimension (default 256)")
    p.add_argument("--repeat", type=int, default=7, help="interleaved samples (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="derive-timing-") as folder:
        for spec in args.specs:
            for layer in from_file(spec):
                ratio, kind, ms = time_layer(layer, Path(folder), args.rows, args.size, args.repeat)
                rows.append((ratio, kind, ms, layer.name))
                print(f"{ratio:6.2f}  {kind:12s}  autograd {ms:8.3f} ms  {layer.name}", flush=True)
    print("slowest:")
    for ratio, kind, ms, name in sorted(rows)[-10:]:
        print(f"{ratio:6.2f}  {kind:12s}  autograd {ms:8.3f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
