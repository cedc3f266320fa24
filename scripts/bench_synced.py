"""Benchmark the synced batchnorm (``generated/batchnorm_biased_synced.py``) against
``nn.SyncBatchNorm`` on 2 gloo processes on this machine: forward + backward time, collective
calls and bytes each rank sends per step, float32.

    PYTHONPATH=. .venv/bin/python scripts/bench_synced.py [--rows 4096] [--features 1024] [--repeat 15]

``nn.SyncBatchNorm`` refuses CPU tensors, and its autograd Function
(``torch.nn.modules._functions.SyncBatchNorm``: one ``all_gather`` of each rank's mean, inverse
standard deviation and count in the forward, one ``all_reduce`` of the two gradient sums in the
backward) calls five per-rank ops that torch 2.13 implements only for GPUs. ``register_cpu_ops``
gives those five a CPU implementation (torch's fused CPU batch norm for the statistics and the
normalization, plain torch ops for the two backward ones), so that torch's own Function, with its
own collectives, runs here; the time column measures that stand-in arithmetic, not torch's GPU
kernels: the collective calls and bytes are the comparison that carries over. Each rank runs on one thread; the two columns are
sampled interleaved (a, b, a, b, ...) after a barrier, and the ratios are medians of per-step
ratios. ``--rows`` is the global batch, split evenly between the 2 ranks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_LIBRARY = []  # the registration lives as long as the process


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(n, c, ...) -> (rows, c): every value of a channel in one column (a view for (n, c))."""
    if t.dim() == 2:
        return t
    return t.transpose(0, 1).reshape(t.shape[1], -1).T


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def register_cpu_ops() -> None:
    """CPU implementations of the per-rank ops of ``nn.SyncBatchNorm``'s Function (once per process)."""
    if _LIBRARY:
        return
    library = torch.library.Library("aten", "IMPL")

    def stats(input, eps):  # torch's fused CPU batch norm computes them (and an output, unused)
        _, mean, invstd = torch.ops.aten.native_batch_norm(input, None, None, None, None, True, 0.0, eps)
        return mean, invstd

    def gather_stats_with_counts(input, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
        counts = counts.to(mean_all.dtype).view(-1, 1)
        total = counts.sum()
        mean = (counts * mean_all).sum(0) / total
        var = (counts * (invstd_all.pow(-2) - eps + (mean_all - mean) ** 2)).sum(0) / total
        return mean, torch.rsqrt(var + eps)

    def elemt(input, weight, bias, mean, invstd, eps):  # torch's fused CPU batch norm with these statistics
        return torch.nn.functional.batch_norm(input, mean, invstd.pow(-2) - eps, weight, bias, False, 0.0, eps)

    def backward_reduce(grad_out, input, mean, invstd, weight, input_g, weight_g, bias_g):
        dy, x = _channels_last(grad_out), _channels_last(input)
        sum_dy = dy.sum(0)
        sum_dy_xmu = (dy * (x - mean)).sum(0)
        return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy

    def backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        total = count.sum().to(input.dtype)
        xmu = input - _per_channel(mean, input)
        scale = _per_channel(invstd, input) * (_per_channel(weight, input) if weight is not None else 1)
        return (grad_out - _per_channel(sum_dy / total, input)
                - xmu * _per_channel(invstd**2 * sum_dy_xmu / total, input)) * scale

    for name, fn in (("batch_norm_stats", stats), ("batch_norm_gather_stats_with_counts", gather_stats_with_counts),
                     ("batch_norm_elemt", elemt), ("batch_norm_backward_reduce", backward_reduce),
                     ("batch_norm_backward_elemt", backward_elemt)):
        library.impl(name, fn, "CPU")
    _LIBRARY.append(library)


def sync_batchnorm(x, gamma, beta, eps=1e-5):
    """``nn.SyncBatchNorm`` in training over the default group: its own autograd Function."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm

    register_cpu_ops()
    return SyncBatchNorm.apply(x, gamma, beta, None, None, eps, 0.0, dist.group.WORLD, dist.get_world_size())


class Traffic:
    """Counts the collectives called while it is active and the bytes this rank contributes."""

    def __enter__(self):
        import torch.distributed as dist

        self.calls, self.bytes, self._saved = 0, 0, {}
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args, _original=original, _name=name, **kwargs):
                sent = args[1] if _name.startswith("all_gather") else args[0]
                self.calls += 1
                self.bytes += sent.numel() * sent.element_size()
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)


def _step(fn, x, gamma, beta, dout):
    x.grad = gamma.grad = beta.grad = None
    fn(x, gamma, beta).backward(dout)


def _rank(rank: int, world: int, rows: int, features: int, repeat: int):
    import torch.distributed as dist
    from generated.batchnorm_biased_synced import batchnorm_biased_synced

    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(rows, features, generator=g)
    dout_all = torch.randn(rows, features, generator=g)
    gamma = torch.randn(features, generator=g).requires_grad_(True)
    beta = torch.randn(features, generator=g).requires_grad_(True)
    x = x_all.tensor_split(world)[rank].clone().requires_grad_(True)
    dout = dout_all.tensor_split(world)[rank].clone()
    columns = {"synced": batchnorm_biased_synced, "SyncBatchNorm": sync_batchnorm}
    traffic = {}
    for name, fn in columns.items():
        with Traffic() as t:
            _step(fn, x, gamma, beta, dout)
        traffic[name] = (t.calls, t.bytes)
    for _ in range(2):
        for fn in columns.values():
            _step(fn, x, gamma, beta, dout)
    times = {name: [] for name in columns}
    for _ in range(repeat):
        for name, fn in columns.items():
            dist.barrier()
            start = time.perf_counter()
            _step(fn, x, gamma, beta, dout)
            times[name].append(time.perf_counter() - start)
    return times, traffic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="the global batch (split between the ranks)")
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)
    from derive.ranks import run_ranks

    results = run_ranks(_rank, args.ranks, (args.rows, args.features, args.repeat), timeout=600)
    # a step takes as long as its slowest rank
    times = {name: [max(r[0][name][k] for r in results) for k in range(args.repeat)] for name in results[0][0]}
    ratio = statistics.median(a / b for a, b in zip(times["synced"], times["SyncBatchNorm"]))
    print(f"forward + backward, {args.rows}x{args.features} float32 over {args.ranks} gloo ranks "
          f"({args.rows // args.ranks} rows each, 1 thread each), median of {args.repeat}:")
    print("| column | ms per step | collective calls | bytes sent per rank per step |")
    print("|---|---|---|---|")
    for name in times:
        calls, sent = results[0][1][name]
        print(f"| {name} | {1000 * statistics.median(times[name]):.2f} | {calls} | {sent:,} |")
    print(f"synced / SyncBatchNorm time: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
