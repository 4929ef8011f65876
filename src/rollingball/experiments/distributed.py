"""Distributed runs: set-up from ``torchrun``'s environment, and local multi-process jobs.

Under ``torchrun --nproc_per_node N -m rollingball run CONFIG`` the runner calls
:func:`init_from_env` in every process, then wraps the model in DistributedDataParallel
(optionally with SyncBatchNorm), trains each rank on its shard of every epoch (the loaders
of ``data.make_loader`` use a ``DistributedSampler`` once a process group exists), sums the
metrics over the ranks and writes files from rank 0 only (``runner.Ranks``).

:func:`spawn` runs a function on N local processes with a fresh gloo process group and a
deadline: the tests and ``benchmarks/bench_ddp.py`` use it to run real distributed jobs
on one CPU machine.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

__all__ = ["exit_now", "init_from_env", "spawn"]


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise torch.distributed from the variables ``torchrun`` sets.

    Returns whether the run is distributed: False (and nothing is done) when ``WORLD_SIZE``
    is unset or 1. The backend defaults to NCCL when CUDA is available, gloo otherwise; with
    NCCL each process takes the GPU numbered by ``LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _entry(
    local_rank: int,
    fn: Callable[..., Any],
    world: int,
    rendezvous: str,
    backend: str,
    timeout_s: float,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=local_rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(local_rank, world, *args)
    finally:
        dist.destroy_process_group()
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """Leave a finished distributed process at once, skipping the interpreter's teardown.

    With torch 2.14 a process that has used a gloo group can abort at exit ("terminate called
    without an active exception", SIGABRT) even after `destroy_process_group`, turning a
    finished run into a crash now and then; its work is done and its files are written here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    threads: int = 1,
) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` new local processes in one process group.

    ``fn`` must be importable by name (a module-level function). An exception in any process
    is raised here; a job that has not finished after ``timeout_s`` seconds (a deadlock) is
    killed and raises TimeoutError. Collectives time out after ``timeout_s`` as well.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="rollingball_spawn_") as scratch:
        rendezvous = str(Path(scratch) / "rendezvous")
        context = mp.start_processes(
            _entry,
            args=(fn, world, rendezvous, backend, timeout_s, threads, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{fn.__name__} on {world} processes did not finish in {timeout_s:g} s"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
