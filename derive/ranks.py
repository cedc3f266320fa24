"""Run a function on several local processes joined in a torch.distributed process group (gloo,
loopback), with a time limit: what the data-parallel tests and ``scripts/train_makemore.py
--ranks N`` use to run generated layers across ranks on one machine.

``run_ranks(fn, world, args, timeout)`` spawns ``world`` processes, each calling
``fn(rank, world, *args)`` inside an initialized group, and returns their results in rank order;
a process that fails or runs past ``timeout`` seconds stops them all with one line saying which.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path


def _rank_main(fn, rank: int, world: int, folder: str, args: tuple, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # each rank one core: ranks share the machine
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def run_ranks(fn, world: int, args: tuple = (), timeout: float = 120.0, threads: int = 1) -> list:
    """``[fn(rank, world, *args) for each rank]``, each rank in a spawned process of one group."""
    import torch
    import torch.multiprocessing as mp

    # fork where there is one: a spawned rank imports torch again (seconds); a forked one is ready at
    # once, and with one thread per rank it starts no thread pool the parent's could deadlock
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with tempfile.TemporaryDirectory(prefix="derive-ranks-") as folder:
        processes = [context.Process(target=_rank_main, args=(fn, rank, world, folder, args, threads), daemon=True)
                     for rank in range(world)]
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in processes):
                failed = [r for r, p in enumerate(processes) if not p.is_alive() and p.exitcode != 0]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            failed = [r for r, p in enumerate(processes) if not p.is_alive() and p.exitcode != 0]
            if failed:
                raise RuntimeError(f"rank {failed[0]} of {world} failed (exit status {processes[failed[0]].exitcode}); "
                                   f"its error is printed above")
            if any(p.is_alive() for p in processes):
                raise TimeoutError(f"{world} ranks did not finish within {timeout:g} s")
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
                p.join(5)
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


__all__ = ["run_ranks"]
