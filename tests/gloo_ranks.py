"""Shared by the gloo tests (tests/test_tensor_parallel*.py): a free local port, and N spawned
rank processes that each put one result on a queue."""
from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, n: int, timeout: float) -> tuple[dict, list]:
    """Run ``worker(rank, n, port, queue)`` in ``n`` spawned processes (``worker`` importable from
    its test module); returns ({rank: what that rank put on the queue}, the exit codes)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, n, port, queue)) for r in range(n)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return got, [p.exitcode for p in procs]
