"""The C++ kernels' vector exp (``derive_exp``) against torch's own (``Vectorized<float>::exp``).

    .venv/bin/python scripts/bench_exp.py [--range=-10,0] [--repeat 21]

Both are compiled into one small program with the flags of the generated extension
(``generated/cross_entropy_cpp.py``'s ``_flags()``: the instruction set torch uses here,
``-ffp-contract=off``), against torch's headers and library; ``derive_exp`` is read from
``generated/native/cross_entropy.cpp`` as printed there. Each sample applies one of them to 4,096
floats drawn evenly from ``--range`` (in cache: the exponential's own cost, not memory's), 2,000
times, and stores the results; the two alternate, ``--repeat`` times. Reported: nanoseconds per float
(medians) and the median of the per-repetition ratios. The default range is a softmax's arguments
``x - max`` of a row; below about -87 every vector of ``derive_exp`` on AVX2 takes its clamped form.
Where torch's ``Vectorized<float>`` has neither AVX2 nor AVX-512, ``derive_exp`` is torch's exp.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <ATen/cpu/vec/vec.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
using at::vec::Vectorized;
DERIVE_EXP
template <typename F> static double sample(const std::vector<float>& in, std::vector<float>& out, int times, F f) {
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < times; ++t)
    for (size_t i = 0; i < in.size(); i += Vectorized<float>::size()) f(Vectorized<float>::loadu(&in[i])).store(&out[i]);
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / (double(times) * in.size());
}
int main(int argc, char** argv) {
  const float low = std::atof(argv[1]), high = std::atof(argv[2]);
  const int repeat = std::atoi(argv[3]), times = 2000;
  std::vector<float> in(4096), out(4096);
  for (size_t i = 0; i < in.size(); ++i) in[i] = low + (high - low) * float((i * 2654435761u) % 4096) / 4095.0f;
  auto theirs = [](const Vectorized<float>& x) { return x.exp(); };
  auto ours = [](const Vectorized<float>& x) { return derive_exp(x); };
  sample(in, out, times, theirs), sample(in, out, times, ours);  // warm up
  for (int r = 0; r < repeat; ++r) {
    const double a = sample(in, out, times, theirs), b = sample(in, out, times, ours);
    std::printf("%.6f %.6f\n", a, b);
  }
}
"""


def exp_source() -> str:
    """``derive_exp`` and what it calls, as printed into the generated kernels."""
    text = (ROOT / "generated" / "native" / "cross_entropy.cpp").read_text()
    start = text.index("template <typename Vec>\nstatic inline Vec derive_exp")
    return text[start:text.index("template <typename Vec>\nstatic inline Vec derive_softplus_vec")]


def extension_flags() -> list[str]:
    """The generated extension's compiler flags (OpenMP left out: the program has no threads)."""
    spec = importlib.util.spec_from_file_location("_derive_cross_entropy_cpp", ROOT / "generated" / "cross_entropy_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [f for f in module._flags() if f != "-fopenmp"]


def build(source: str, folder: Path) -> Path:
    """``source`` (a program using torch's vectors) compiled with the extension's flags; raises
    ``RuntimeError`` with the compiler's message when it fails."""
    torch_dir = Path(torch.__file__).parent
    (folder / "program.cpp").write_text(source)
    built = subprocess.run(["g++", "-std=c++17", *extension_flags(), "-I", str(torch_dir / "include"),
                            str(folder / "program.cpp"), "-L", str(torch_dir / "lib"), "-ltorch_cpu", "-lc10",
                            f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(folder / "program")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(built.stderr[-3000:])
    return folder / "program"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--range", default="-10,0", help="the arguments' interval, LOW,HIGH (default -10,0)")
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args(argv)
    low, high = (float(v) for v in args.range.split(","))
    with tempfile.TemporaryDirectory() as folder:
        try:
            program = build(PROGRAM.replace("DERIVE_EXP", exp_source()), Path(folder))
        except RuntimeError as error:
            print(f"bench_exp: the program does not build here: {str(error).splitlines()[-1]}", file=sys.stderr)
            return 1
        ran = subprocess.run([str(program), str(low), str(high), str(args.repeat)], capture_output=True, text=True,
                             check=True)
    samples = [tuple(float(v) for v in line.split()) for line in ran.stdout.split("\n") if line]
    theirs, ours = (statistics.median(s[i] for s in samples) for i in (0, 1))
    ratio = statistics.median(b / a for a, b in samples)
    print(f"float32 exp over [{low:g}, {high:g}], {torch.backends.cpu.get_cpu_capability()}, "
          f"median of {args.repeat} interleaved repetitions: torch {theirs:.3f} ns/float, "
          f"derive_exp {ours:.3f} ns/float, derive_exp/torch {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
