"""Run independent pure-Python jobs (derivations, proofs) on every core, where the platform can fork.

Forked workers inherit the job list (layers, kernels: nothing is pickled but the results), take
the costliest jobs first, and one at a time, so that no core is left with a long job at the end.
An exception raised in a worker is raised again here.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from typing import Callable

_WORK: list = []  # (function, item) for the worker processes, inherited through fork
WAKE_SECONDS = 0.1  # how often the parent wakes while it waits for the workers
STOPS = {signal.SIGINT, signal.SIGTERM}  # the signals that end a run


def _run(k: int):
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        # a forked child must not use the parent's OpenMP pool (it hangs once the parent has used
        # it); its torch work (the numerical battery) is small, and one thread is deterministic too
        torch.set_num_threads(1)
    fn, item = _WORK[k]
    try:
        return fn(item)
    except Exception as e:
        try:
            pickle.dumps(e)
        except Exception:  # (SymPy's carry local functions) sent back as its type, message and trace
            raise RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}") from None
        raise


def _quiet_worker() -> None:
    """A worker leaves Ctrl-C to the parent (which then ends the pool) and dies at once, silently, on
    SIGTERM: no worker prints a traceback when a run is interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # held by the parent while it forked this worker


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fork_map(fn: Callable, items: list, cost: Callable | None = None) -> list:
    """``[fn(item) for item in items]``, computed in forked workers, costliest ``cost(item)`` first."""
    workers = min(len(items), cores())
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(item) for item in items]
    global _WORK
    _WORK = [(fn, item) for item in items]
    order = sorted(range(len(items)), key=lambda k: cost(items[k]), reverse=True) if cost else list(range(len(items)))
    gc.freeze()  # the parent's objects (torch, SymPy) are never garbage: no worker's collection walks them
    # Ctrl-C and SIGTERM are held while the pool forks its workers and starts its threads. A signal
    # handled during a fork would raise in the at-fork hooks (logging's), where Python reports the
    # exception as ignored and goes on: the run went on to its end. Held, it raises once released,
    # inside the pool's ``with``, which ends the workers. The pool's threads keep the mask, so the
    # kernel hands these signals to the main thread.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_quiet_worker) as pool:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            result = pool.map_async(_run, order, chunksize=1)
            while not result.ready():
                # in short steps: a signal another thread took (one of torch's, or while this one
                # starts a thread and blocks every signal) is handled once the main thread wakes
                result.wait(WAKE_SECONDS)
            done = dict(zip(order, result.get()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        _WORK = []
        gc.unfreeze()
    return [done[k] for k in range(len(items))]


__all__ = ["fork_map", "cores"]
