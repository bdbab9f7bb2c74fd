"""Run a function on N gloo processes (torch.multiprocessing) and collect what rank 0 returns."""

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, fn, args, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
        if rank == 0:
            results.put(("ok", out))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()


def run(fn, world: int, *args):
    """``fn(rank, world, *args)`` on ``world`` processes; returns rank 0's result, raises any rank's error."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, fn, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        failures = []
        while not results.empty():
            status, payload = results.get()
            if status == "error":
                failures.append(payload)
            else:
                value = payload
        if failures or any(p.exitcode != 0 for p in procs):
            raise AssertionError("\n".join(failures) or f"exit codes {[p.exitcode for p in procs]}")
        return value
