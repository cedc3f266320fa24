"""Benchmark the generated fused kernels against native PyTorch, autograd through the chunked
spec, and a memory-bound floor: forward + backward time and peak memory, float32, on CPU.

    PYTHONPATH=. .venv/bin/python scripts/bench.py [--quick] [--repeat N] [--json PATH]
                                                    [--markdown PATH] [--plot PATH]

Columns, for each layer and size:

  generated      the generated ``torch.autograd.Function`` (``generated/<layer>.py``)
  unchecked      the same module with its input checks switched off (``check_inputs(False)``, for a
                 trusted training loop): what the checks cost shows at small sizes
  compiled       the same module after ``compile_kernels(dynamic=False)``: its forward and backward
                 math through ``torch.compile`` (compile time reported apart, ``compile_s``;
                 ``--no-compile`` leaves the column out)
  native         the native torch op with autograd: ``F.cross_entropy(logits, y)``,
                 ``F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)`` for the
                 biased batchnorm. Bessel-corrected batchnorm has no native op: its column is
                 ``n/a`` and its peer is the spec-autograd column.
  spec_autograd  autograd through the chunked spec (``derive.layers.<layer>.fn``)
  floor          a memory-bound floor: ``torch.empty_like(src).copy_(src)``, with ``src`` sized so
                 the copy moves (reads + writes) the bytes a forward + backward must move at least
                 (see ``ce_floor`` and ``bn_floor``; ``columns.floor.traffic_bytes`` in the JSON).

Method (see ``measure``): inputs are made once per configuration; each column is run once and its
output and gradients checked against the peer (so that we time the same computation), warmed up,
then the columns are sampled interleaved (a, b, c, d, a, b, c, d, ...) ``--repeat`` times so that
drift (thermal, other processes, allocator state) hits every column equally. Each sample times
one or more forward + backward calls with ``time.perf_counter`` (more than one when a call is
shorter than ``--min-sample-ms``, to stay far above the timer's resolution and overhead), with
Python's garbage collector off; the gradients of the previous call are dropped outside the timed
region. Reported times are medians over the samples; ratios are medians of the per-repetition
ratios (paired, because the columns of one repetition ran back to back). The CPU used by other
processes while a configuration ran is measured (``CpuMeter``); above 0.25 core the row is marked
as contended, since its timings then say more about the scheduler than about the kernels (metered
over the timed samples only: compiling runs the C++ compiler in other processes).

Memory safety: before a configuration runs, its peak is estimated (from the peak measured at the
previous size of the same layer, scaled by the element count, with a margin; a fixed multiple of
one tensor for the first size) and the configuration is skipped, with a message, above
``--max-mem-gib`` (16 GiB) or 85% of MemAvailable.

Peak memory: ``tracemalloc`` does not see torch's allocations, and CPU torch has no
``max_memory_allocated``. We use ``torch.profiler`` with ``profile_memory=True``, which records every
allocation and free of torch's CPU allocator with its time stamp, over one extra (untimed)
forward + backward per column, and take the running sum of those events: ``peak`` is its maximum
(bytes allocated above what existed before the call: the inputs are not counted; the gradients
the call leaves in ``.grad`` are), ``held`` its value at the start of the backward (outputs plus
tensors saved for backward: the activation memory a training step keeps between the passes).
Unlike a sum of the sizes of saved tensors, this also sees the transient temporaries inside the
forward and the backward, which is what the peak is made of.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from derive.layers import attention as spec_attention  # noqa: E402
from derive.layers import batchnorm as spec_batchnorm  # noqa: E402
from derive.layers import batchnorm_biased as spec_batchnorm_biased  # noqa: E402
from derive.layers import cross_entropy as spec_cross_entropy  # noqa: E402
from generated.attention import attention as gen_attention  # noqa: E402
from generated.batchnorm import batchnorm as gen_batchnorm  # noqa: E402
from generated.batchnorm_biased import batchnorm_biased as gen_batchnorm_biased  # noqa: E402
from generated.cross_entropy import cross_entropy as gen_cross_entropy  # noqa: E402

DTYPE = torch.float32
EPS = 1e-5
COLUMNS = ("generated", "unchecked", "compiled", "native", "spec_autograd", "floor")
CE_SIZES = [(32, 27), (4096, 1024), (8192, 32000)]
BN_SIZES = [(32, 64), (4096, 1024), (65536, 512)]
ATTENTION_SIZES = [(128, 64), (512, 64), (2048, 64)]  # (n = m queries and keys, d = e head size)
GiB = 1024**3
MiB = 1024**2
BACKWARD_MARK = "bench::backward"


# ---------------------------------------------------------------------------------------------
# The layers: inputs, the four columns, the floor's traffic.
# ---------------------------------------------------------------------------------------------

@dataclass
class Bench:
    layer: str
    dims: tuple[str, str]
    sizes: list[tuple[int, int]]
    make_inputs: Callable          # (n, m, seed) -> dict of tensors (leaves, upstream gradient)
    arguments: tuple[str, ...]     # the inputs, in the generated function's argument order
    generated: Callable            # (inputs) -> output
    native: Callable | None        # (inputs) -> output, None when torch has no such op
    native_op: str | None
    spec: Callable                 # (inputs) -> output
    grads: tuple[str, ...]         # the leaves whose gradients the backward computes
    floor_traffic: Callable        # (n, m) -> (bytes, explanation)
    peak_estimate: float           # a guess of the peak, in multiples of one n x m tensor, used
    #                                only to skip a size before any of it has been measured
    notes: list[str] = field(default_factory=list)

    def copy(self, tag: str):
        """A second copy of the generated module, to change its settings apart from ``generated``."""
        path = ROOT / "generated" / f"{self.layer}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{tag}_{self.layer}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def compiled(self) -> Callable:
        """The generated layer from a second copy of its module, with compiled math."""
        module = self.copy("compiled")
        module.compile_kernels(dynamic=False)
        function = getattr(module, self.layer)
        return lambda i: function(*[i[k] for k in self.arguments])

    def unchecked(self) -> Callable:
        """The generated layer from a copy of its module whose input checks are off."""
        module = self.copy("unchecked")
        module.check_inputs(False)
        function = getattr(module, self.layer)
        return lambda i: function(*[i[k] for k in self.arguments])


def ce_inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=DTYPE).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g)
    return {"logits": logits, "y": y, "dout": None}


def bn_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE).mul_(2.0).add_(0.5).requires_grad_()
    gamma = (1 + 0.1 * torch.randn(d, generator=g, dtype=DTYPE)).requires_grad_()
    beta = (0.1 * torch.randn(d, generator=g, dtype=DTYPE)).requires_grad_()
    dout = torch.randn(n, d, generator=g, dtype=DTYPE)  # the upstream gradient, made once
    return {"x": x, "gamma": gamma, "beta": beta, "dout": dout}


def ce_floor(n, k):
    # Compulsory traffic of forward + backward (the timed quantity), one pass over each full-size
    # tensor a fused implementation cannot avoid: the forward reads logits (1), the backward reads
    # logits or one saved n x k tensor (1) and writes dlogits (1): 3 n x k float32 tensors, plus
    # the labels read in each pass (2 x n int64). The brief's example, "read logits + write
    # dlogits", is the backward's share (2 of the 3); since the columns are timed forward +
    # backward, the floor counts the forward's read too, so the ratio to it is not inflated.
    full = n * k * 4
    return 3 * full + 2 * n * 8, "3 x (n*k*4): fwd reads logits; bwd reads logits (or saved probs), writes dlogits; + labels"


def bn_floor(n, d):
    # Compulsory traffic of forward + backward: the forward reads x (1) and writes out (1); the
    # backward reads dout (1), reads x or one saved n x d tensor (1) and writes dx (1): 5 n x d
    # float32 tensors, plus the d-sized ones (gamma, beta read in the forward, gamma read and
    # dgamma, dbeta written in the backward). A single pass per tensor is a lower bound: batchnorm
    # needs its column statistics before it can normalize, so real kernels read x (and dout)
    # twice unless a column block stays in cache.
    full = n * d * 4
    return 5 * full + 5 * d * 4, "5 x (n*d*4): fwd reads x, writes out; bwd reads dout and x (or saved bnraw), writes dx; + d-sized"


def attention_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, d, generator=g, dtype=DTYPE).requires_grad_() for _ in range(3))
    dout = torch.randn(n, d, generator=g, dtype=DTYPE)
    return {"q": q, "k": k, "v": v, "dout": dout}


def attention_floor(n, d):
    # What any implementation moves at least: the forward reads q, k, v and writes out (4 n x d),
    # the backward reads dout, q, k, v and writes dq, dk, dv (7 n x d). The n x n scores need not
    # reach memory (a fused kernel keeps them in cache), so they are not counted: attention is
    # bound by its matrix products (4 n^2 d multiply-adds forward, 8 backward), not by memory.
    return 11 * n * d * 4, "11 x (n*d*4): fwd reads q, k, v, writes out; bwd reads dout, q, k, v, writes dq, dk, dv"


def _bn_native(i):
    return F.batch_norm(i["x"], None, None, i["gamma"], i["beta"], training=True, eps=EPS)


BENCHES = [
    Bench(
        layer="cross_entropy", dims=("n", "k"), sizes=CE_SIZES, make_inputs=ce_inputs, arguments=("logits", "y"),
        generated=lambda i: gen_cross_entropy(i["logits"], i["y"]),
        native=lambda i: F.cross_entropy(i["logits"], i["y"]),
        native_op="F.cross_entropy(logits, y)",
        spec=lambda i: spec_cross_entropy.fn(i["logits"], i["y"]),
        grads=("logits",), floor_traffic=ce_floor, peak_estimate=12.0,
    ),
    Bench(
        layer="batchnorm", dims=("n", "d"), sizes=BN_SIZES, make_inputs=bn_inputs, arguments=("x", "gamma", "beta"),
        generated=lambda i: gen_batchnorm(i["x"], i["gamma"], i["beta"], EPS),
        native=None, native_op=None,
        spec=lambda i: spec_batchnorm.fn(i["x"], i["gamma"], i["beta"], EPS),
        grads=("x", "gamma", "beta"), floor_traffic=bn_floor, peak_estimate=12.0,
        notes=["Bessel-corrected variance: torch has no native op; the peer is the spec-autograd column"],
    ),
    Bench(
        layer="batchnorm_biased", dims=("n", "d"), sizes=BN_SIZES, make_inputs=bn_inputs,
        arguments=("x", "gamma", "beta"),
        generated=lambda i: gen_batchnorm_biased(i["x"], i["gamma"], i["beta"], EPS),
        native=_bn_native,
        native_op="F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)",
        spec=lambda i: spec_batchnorm_biased.fn(i["x"], i["gamma"], i["beta"], EPS),
        grads=("x", "gamma", "beta"), floor_traffic=bn_floor, peak_estimate=12.0,
    ),
    Bench(
        layer="attention", dims=("n", "d"), sizes=ATTENTION_SIZES, make_inputs=attention_inputs,
        arguments=("q", "k", "v"),
        generated=lambda i: gen_attention(i["q"], i["k"], i["v"]),
        native=lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"]),
        native_op="F.scaled_dot_product_attention(q, k, v)",
        spec=lambda i: spec_attention.fn(i["q"], i["k"], i["v"]),
        grads=("q", "k", "v"), floor_traffic=attention_floor, peak_estimate=100.0,
        notes=["n = m queries and keys of size d = e: the n x n scores are the largest tensor"],
    ),
]


# ---------------------------------------------------------------------------------------------
# Steps: one forward + backward of a column, as a zero-argument callable.
# ---------------------------------------------------------------------------------------------

def clear_grads(inputs):
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            v.grad = None


def training_step(forward, inputs):
    dout = inputs["dout"]

    def step():
        out = forward(inputs)
        out.backward(dout)  # dout is None for a scalar loss

    return step


def floor_step(src):
    def step():
        torch.empty_like(src).copy_(src)

    return step


def run_and_collect(forward, inputs, grads):
    """One forward + backward; the output and the gradients, detached copies for the check."""
    clear_grads(inputs)
    out = forward(inputs)
    out.backward(inputs["dout"])
    result = {"output": out.detach()}
    result.update({f"d{k}": inputs[k].grad.detach().clone() for k in grads})
    clear_grads(inputs)
    return result


def max_rel_err(ours, ref):
    """max |ours - ref| / max |ref|: one number per tensor, scale-free."""
    scale = ref.abs().max().item()
    return (ours - ref).abs().max().item() / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# Time and memory.
# ---------------------------------------------------------------------------------------------

def time_calls(step, inputs, number):
    """Seconds per call, over ``number`` calls; the gradients are dropped outside the timer."""
    total = 0.0
    for _ in range(number):
        if inputs is not None:
            clear_grads(inputs)
        t0 = time.perf_counter()
        step()
        total += time.perf_counter() - t0
    return total / number


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2; keep the report readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def memory_of(forward, inputs):
    """(peak, held) bytes of one forward + backward, from the profiler's allocator events."""
    clear_grads(inputs)
    gc.collect()
    with quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = forward(inputs)
            with record_function(BACKWARD_MARK):
                out.backward(inputs["dout"])
            del out
    events = prof.profiler.kineto_results.events()
    mark = min((e.start_ns() for e in events if e.name() == BACKWARD_MARK), default=None)
    mem = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda t: t[0])
    running = peak = 0
    held = None
    for t, nbytes in mem:
        if held is None and mark is not None and t >= mark:
            held = running
        running += nbytes
        peak = max(peak, running)
    clear_grads(inputs)
    return peak, (held if held is not None else running)


def floor_memory(step):
    gc.collect()
    with quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    mem = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]"), key=lambda t: t[0])
    running = peak = 0
    for _, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
    return peak, 0


def summary(samples):
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_ms": statistics.median(s) * 1e3, "min_ms": s[0] * 1e3,
            "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "samples_ms": [x * 1e3 for x in samples]}


def paired_ratio(num, den):
    return statistics.median(a / b for a, b in zip(num, den))


BUSY_CORES = 0.25  # other processes using more CPU than this (in cores) make a result "contended"


class CpuMeter:
    """CPU time the *rest of the machine* used since creation, in cores (from /proc/stat, minus
    this process's own user + system time), and the hypervisor's steal time. Timings taken while
    other processes compete for the cores are not comparable (with 2 threads on 2 cores, an
    OpenMP parallel region waits for a descheduled thread: one op can take a scheduler slice)."""

    def __init__(self):
        self.t0, self.stat0, self.self0 = time.perf_counter(), self._stat(), self._self()

    @staticmethod
    def _stat():
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            v = [int(x) for x in fields] + [0] * 10
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
        return user + nice + system + irq + softirq, steal

    @staticmethod
    def _self():
        t = os.times()
        return t.user + t.system

    def read(self):
        wall = time.perf_counter() - self.t0
        stat = self._stat()
        if stat is None or self.stat0 is None or wall <= 0:
            return {"other_cores": 0.0, "steal_cores": 0.0, "measured": False}
        tick = os.sysconf("SC_CLK_TCK")
        busy = (stat[0] - self.stat0[0]) / tick
        steal = (stat[1] - self.stat0[1]) / tick
        own = self._self() - self.self0
        return {"other_cores": max(0.0, busy - own) / wall, "steal_cores": steal / wall, "measured": True}


def mem_available():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(bench: Bench, n: int, m: int, args, estimate_bytes: float):
    """Everything about one layer at one size; a dict for the JSON."""
    shape = f"{n}x{m}"
    result = {"layer": bench.layer, "size": {bench.dims[0]: n, bench.dims[1]: m}, "shape": shape,
              "native_op": bench.native_op, "notes": list(bench.notes)}
    limit = args.max_mem_gib * GiB
    available = mem_available()
    if available is not None:
        limit = min(limit, 0.85 * available)
    if estimate_bytes > limit:
        reason = (f"estimated peak {estimate_bytes / GiB:.1f} GiB exceeds the limit {limit / GiB:.1f} GiB "
                  f"(--max-mem-gib {args.max_mem_gib}, 85% of MemAvailable)")
        print(f"  SKIP {bench.layer} {shape}: {reason}", flush=True)
        result.update(status="skipped", reason=reason)
        return result
    result["estimated_peak_bytes"] = int(estimate_bytes)

    inputs = bench.make_inputs(n, m, seed=0)
    traffic, traffic_doc = bench.floor_traffic(n, m)
    src = torch.randn(max(1, traffic // 8), dtype=DTYPE)  # one float32 copy reads 4 and writes 4 bytes
    forwards = {"generated": bench.generated, "unchecked": bench.unchecked(), "native": bench.native,
                "spec_autograd": bench.spec, "compiled": None if args.no_compile else bench.compiled()}
    steps = {name: training_step(f, inputs) for name, f in forwards.items() if f is not None}
    steps["floor"] = floor_step(src)
    active = [c for c in COLUMNS if c in steps]

    # 1. Same computation? The generated kernel against the native op (or the spec where there is
    #    none) and against the spec; this is also each column's first (cold) call.
    check = {}
    ours = run_and_collect(bench.generated, inputs, bench.grads)
    for name in ("unchecked", "native", "spec_autograd"):
        if forwards[name] is None:
            continue
        ref = run_and_collect(forwards[name], inputs, bench.grads)
        check[name] = {k: max_rel_err(ours[k], ref[k]) for k in ours}
        del ref
    if forwards["compiled"] is not None:
        # the first call at a size compiles: timed on its own, then checked like the others
        t0 = time.perf_counter()
        compiled = run_and_collect(forwards["compiled"], inputs, bench.grads)
        result["compile_s"] = time.perf_counter() - t0
        check["compiled"] = {k: max_rel_err(compiled[k], ours[k]) for k in ours}
        del compiled
    del ours
    steps["floor"]()
    worst = max(v for c in check.values() for v in c.values())
    result["check"] = {"max_rel_err": check, "ok": worst <= args.tolerance, "tolerance": args.tolerance}
    if worst > args.tolerance:
        print(f"  WARNING {bench.layer} {shape}: generated differs from its peers, max rel err {worst:.2e}",
              flush=True)

    # 2. Warm-up, and how many calls make one sample (>= --min-sample-ms).
    number = {}
    for c in active:
        t = time_calls(steps[c], None if c == "floor" else inputs, 1)
        reps = 1
        while t * reps < 0.05 and reps < 1000:  # warm up for >= 50 ms, a few calls at least
            t = min(t, time_calls(steps[c], None if c == "floor" else inputs, 1))
            reps += 1
        number[c] = max(1, math.ceil(args.min_sample_ms * 1e-3 / max(t, 1e-9)))

    # 3. Interleaved samples. The rest of the machine's CPU is metered over these alone: the
    #    compilation above runs the C++ compiler in other processes, which is not contention.
    samples = {c: [] for c in active}
    gc.collect()
    gc.disable()
    meter = CpuMeter()
    try:
        for _ in range(args.repeat):
            for c in active:
                samples[c].append(time_calls(steps[c], None if c == "floor" else inputs, number[c]))
    finally:
        gc.enable()
    result["other_cpu"] = meter.read()
    result["contended"] = result["other_cpu"]["other_cores"] > BUSY_CORES

    # 4. Memory, one untimed call per column.
    columns = {}
    for c in COLUMNS:
        if c not in steps:
            columns[c] = None
            continue
        if c == "floor":
            peak, held = floor_memory(steps[c])
        else:
            peak, held = memory_of(forwards[c], inputs)
        columns[c] = {**summary(samples[c]), "calls_per_sample": number[c],
                      "peak_bytes": int(peak), "held_bytes": int(held)}
    columns["floor"]["traffic_bytes"] = int(traffic)
    columns["floor"]["traffic"] = traffic_doc
    columns["floor"]["effective_GBps"] = traffic / (columns["floor"]["median_ms"] * 1e-3) / 1e9

    gen = samples["generated"]
    ratios = {
        "generated_over_native": paired_ratio(gen, samples["native"]) if "native" in samples else None,
        "unchecked_over_native": (paired_ratio(samples["unchecked"], samples["native"])
                                  if "native" in samples else None),
        "generated_over_spec_autograd": paired_ratio(gen, samples["spec_autograd"]),
        "generated_over_floor": paired_ratio(gen, samples["floor"]),
        "compiled_over_native": (paired_ratio(samples["compiled"], samples["native"])
                                 if "compiled" in samples and "native" in samples else None),
        "compiled_over_floor": paired_ratio(samples["compiled"], samples["floor"]) if "compiled" in samples else None,
    }
    result.update(status="ok", columns=columns, ratios=ratios,
                  peer="native" if bench.native is not None else "spec_autograd")
    del inputs, src, steps
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------

def fmt_ms(col):
    if col is None:
        return "n/a"
    v = col["median_ms"]
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_ratio(r):
    if r is None:
        return "n/a"
    return f"{r:.0f}" if r >= 100 else f"{r:.1f}" if r >= 10 else f"{r:.2f}" if r >= 0.1 else f"{r:.3g}"


def fmt_bytes(b):
    if b < MiB:
        return f"{b / 1024:.1f} KiB"
    if b < 10 * GiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / GiB:.2f} GiB"


def fmt_mem(col):
    if col is None:
        return "n/a"
    return f"{fmt_bytes(col['peak_bytes'])} ({fmt_bytes(col['held_bytes'])})"


def markdown(report):
    env = report["environment"]
    lines = [
        f"float32, CPU ({env['cpu']}), torch {env['torch']}, {env['threads']} threads, "
        f"median of {report['settings']['repeat']} interleaved repetitions, forward + backward"
        + (", freed memory kept mapped (`--keep-pages`: no call pays for fresh pages)."
           if report["settings"].get("keep_pages") else "."),
        "",
        "| layer | size | generated ms | unchecked ms | compiled ms (compile s) | native ms | spec-autograd ms "
        "| floor ms | gen/native | unchecked/native | gen/spec | gen/floor | compiled/native | compiled/floor "
        "| peak (held) generated | peak (held) native | peak (held) spec-autograd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['layer']} | {r['shape']} | skipped: {r['reason']} |" + " |" * 15)
            continue
        c, q = r["columns"], r["ratios"]
        compiled = f"{fmt_ms(c['compiled'])} ({r['compile_s']:.0f})" if c.get("compiled") else "n/a"
        mark = " ⚠" if r.get("contended") else ""
        lines.append(
            f"| {r['layer']} | {r['shape']}{mark} | {fmt_ms(c['generated'])} | {fmt_ms(c['unchecked'])} | {compiled} | "
            f"{fmt_ms(c['native'])} | {fmt_ms(c['spec_autograd'])} | {fmt_ms(c['floor'])} | "
            f"{fmt_ratio(q['generated_over_native'])} | {fmt_ratio(q['unchecked_over_native'])} | "
            f"{fmt_ratio(q['generated_over_spec_autograd'])} | {fmt_ratio(q['generated_over_floor'])} | "
            f"{fmt_ratio(q['compiled_over_native'])} | {fmt_ratio(q['compiled_over_floor'])} | "
            f"{fmt_mem(c['generated'])} | {fmt_mem(c['native'])} | {fmt_mem(c['spec_autograd'])} |")
    lines += [
        "",
        "- native: `F.cross_entropy(logits, y)`; `F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)` "
        "for batchnorm_biased. batchnorm (Bessel's correction) has no native op: n/a, its peer is spec-autograd.",
        "- floor: `torch.empty_like(src).copy_(src)` moving the bytes forward + backward must move at least "
        "(cross-entropy 3 n*k float32 tensors, batchnorm 5 n*d; `columns.floor.traffic_bytes` in the JSON).",
        "- unchecked: the generated module with `check_inputs(False)` (no input checks, for a trusted training loop).",
        "- compiled: the generated module after `compile_kernels(dynamic=False)` (`torch.compile` of its "
        "forward and backward math); in brackets the seconds its first call took (compilation).",
        "- ratios: median over repetitions of the per-repetition ratio (columns of one repetition ran back to back); "
        "> 1 means the generated kernel is slower.",
        "- peak (held): bytes allocated above the inputs during one forward + backward (gradients included), "
        "and held between forward and backward (outputs + saved tensors), from `torch.profiler` allocator events.",
    ]
    contended = [r for r in report["results"] if r.get("contended")]
    if contended:
        used = ", ".join(f"{r['layer']} {r['shape']}: {r['other_cpu']['other_cores']:.2f}" for r in contended)
        lines.append(f"- ⚠ contended: other processes used more than {BUSY_CORES} of the {env['cores']} cores while "
                     f"this row's samples were timed ({used}); its timings are not reliable.")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    keys = [("generated_over_native", "generated / native"),
            ("generated_over_spec_autograd", "generated / spec autograd"),
            ("generated_over_floor", "generated / memory floor"),
            ("compiled_over_native", "compiled / native"),
            ("compiled_over_floor", "compiled / memory floor")]
    keys = [(k, label) for k, label in keys if any(r["ratios"][k] is not None for r in ok)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok) + 2), 4.5))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i, r in enumerate(ok) if r["ratios"][key] is not None]
        ys = [r["ratios"][key] for r in ok if r["ratios"][key] is not None]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, labels=[f"{y:.2g}" for y in ys], fontsize=7, padding=1)
        for i, r in enumerate(ok):
            if r["ratios"][key] is None:
                ax.annotate("no native op", (i + (j - (len(keys) - 1) / 2) * width, 1.0), rotation=90, fontsize=7,
                            ha="center", va="bottom", xytext=(0, 3), textcoords="offset points")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ok)), [f"{r['layer']}\n{r['shape']}" for r in ok], fontsize=8)
    ax.set_ylabel("time ratio, forward + backward (log; < 1: generated faster)")
    env = report["environment"]
    ax.set_title(f"Generated fused kernels, float32 CPU, {env['threads']} threads, torch {env['torch']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generated_hashes():
    """The content hash in each benchmarked generated module's header: which code was timed."""
    out = {}
    for module in ("generated.cross_entropy", "generated.batchnorm", "generated.batchnorm_biased"):
        text = Path(sys.modules[module].__file__).read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith("# content-hash:")), "")
        out[module] = line.partition(":")[2].strip() or None
    return out


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_pages() -> None:
    """Make glibc's malloc keep freed memory mapped: no allocation gets fresh pages from ``mmap``
    and freed memory is not given back, so after the warm-up no call pays for the kernel zeroing
    new pages. Above 32 MiB that costs about a pass over memory per allocation, more or less
    depending on whether huge pages are free: the noise of the default run. What remains is the
    kernels' own passes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise SystemExit("bench: --keep-pages needs glibc's malloc (mallopt), which this platform lacks")


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the two smaller sizes of each layer")
    p.add_argument("--layers", nargs="+", choices=[b.layer for b in BENCHES], metavar="LAYER",
                   help=f"only these layers (of: {', '.join(b.layer for b in BENCHES)})")
    p.add_argument("--repeat", type=int, default=10, help="interleaved repetitions (default 10)")
    p.add_argument("--json", type=Path, help="write machine-readable results here")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here")
    p.add_argument("--plot", type=Path, help="write a PNG bar chart of the ratios here (matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    p.add_argument("--min-sample-ms", type=float, default=50.0,
                   help="a sample repeats short calls until it lasts this long (default 50)")
    p.add_argument("--max-mem-gib", type=float, default=16.0,
                   help="skip a configuration whose estimated peak exceeds this (default 16)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="max relative error of the generated kernel against its peers before a warning")
    p.add_argument("--keep-pages", action="store_true",
                   help="keep freed memory mapped (glibc mallopt), so that no call pays for fresh pages: "
                        "times the kernels' own passes, without the page-fault noise")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.keep_pages:
        keep_pages()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    torch.set_num_threads(threads)
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu": cpu_name(), "cores": cores, "threads": torch.get_num_threads(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "generated_content_hash": generated_hashes()}
    print(f"torch {env['torch']} on {env['cpu']}: torch.set_num_threads({threads}) "
          f"({cores} cores available), float32, repeat {args.repeat}"
          + (", quick" if args.quick else "") + (", freed memory kept mapped" if args.keep_pages else ""), flush=True)
    idle = CpuMeter()
    time.sleep(1.0)
    other = idle.read()
    env["other_cpu_at_start"] = other
    if other["other_cores"] > BUSY_CORES:
        print(f"WARNING: other processes use {other['other_cores']:.2f} of the {cores} cores before starting "
              f"(steal {other['steal_cores']:.2f}): the timings will be noisy; each result records the "
              f"CPU the rest of the machine used while it ran", flush=True)

    started = time.perf_counter()
    results = []
    for bench in [b for b in BENCHES if not args.layers or b.layer in args.layers]:
        sizes = bench.sizes[:2] if args.quick else bench.sizes
        measured = None  # (numel, peak bytes) of the last size measured, to estimate the next
        for n, m in sizes:
            numel = n * m
            inputs_bytes = 2 * numel * 4 + 2 * m * 4  # the leaf and the upstream gradient / labels
            if measured is None:
                estimate = inputs_bytes + bench.peak_estimate * numel * 4
            else:
                # scale the largest peak measured at the previous size, with a margin; the
                # check holds one column's output and gradients while another runs: + 2 tensors
                estimate = inputs_bytes + (1.25 * measured[1] / measured[0] + 2 * 4) * numel
            t0 = time.perf_counter()
            print(f"{bench.layer} {n}x{m} ...", end=" ", flush=True)
            r = measure(bench, n, m, args, estimate)
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
            if r["status"] == "ok":
                peak = max(c["peak_bytes"] for k, c in r["columns"].items() if c is not None and k != "floor")
                measured = (numel, peak)
                busy = (f", CONTENDED: other processes used {r['other_cpu']['other_cores']:.2f} cores"
                        if r["contended"] else "")
                print(f"{r['wall_s']:.1f} s{busy}", flush=True)
    wall = time.perf_counter() - started

    report = {
        "settings": {"argv": sys.argv if argv is None else argv, "quick": args.quick, "repeat": args.repeat,
                     "min_sample_ms": args.min_sample_ms, "keep_pages": args.keep_pages, "compile": not args.no_compile, "max_mem_gib": args.max_mem_gib, "dtype": "float32",
                     "device": "cpu", "timer": "time.perf_counter",
                     "memory": "torch.profiler profile_memory=True allocator events: peak and held bytes above the inputs"},
        "environment": env,
        "results": results,
        "wall_s": wall,
    }
    table = markdown(report)
    print()
    print(table)
    print(f"wall time {wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError as e:
            print(f"--plot: matplotlib is not available ({e}); no plot written", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
