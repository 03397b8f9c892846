"""Run a two-rank ``torch.distributed`` job on one host (tests and the calibration benchmark).

Each rank is a spawned process with an initialized process group over loopback TCP: gloo for
CPU tensors, NCCL for CUDA tensors (rank ``r`` on ``cuda:r``). The whole job is bounded: a rank
that hangs past ``timeout_s`` is terminated and :func:`run_pair` raises ``TimeoutError``.

Example::

    run_pair(worker, (out_path,), backend="gloo", timeout_s=60)   # worker(rank, out_path)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

__all__ = ["free_port", "run_pair"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    fn: Callable[..., None],
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_pair(
    fn: Callable[..., None],
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    threads: int = 1,
    port: int | None = None,
) -> None:
    """Run ``fn(rank, *args)`` on ranks 0 and 1; ``fn`` must be importable (module level).

    ``threads``: torch intra-op threads per rank (keep it small on a shared CPU). Raises
    ``torch.multiprocessing.ProcessRaisedException`` if a rank fails, ``TimeoutError`` if the
    job outlives ``timeout_s`` (plus a start-up allowance).
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = start_processes(  # type: ignore[no-untyped-call]
        _entry,
        args=(fn, port or free_port(), backend, timeout_s, threads, args),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    # NOTE: spawned ranks re-import torch (seconds on a loaded 2-core host): allow for it.
    deadline = time.monotonic() + timeout_s + 60.0
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"two-rank job still running after {timeout_s + 60:.0f} s")
