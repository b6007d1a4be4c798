"""The independent runs of an experiment grid, executed here, in local worker processes or on a Ray cluster.

``run_tasks(fn, tasks, jobs, ray_address)`` calls ``fn(task)`` for every task and returns the results in the
order of ``tasks``, whichever executor ran them:

- ``jobs=1`` (and no Ray address): one after another in this process;
- ``jobs=N``: N local worker processes (``spawn``, so nothing of this process's state leaks in);
- ``ray_address``: Ray tasks of one CPU each on the cluster at that address (``"local"`` starts a
  throw-away local cluster of ``jobs`` CPUs; Ray is the optional extra ``relist[ray]``).

Local workers end with the process that started them, even when it is killed outright (Linux): a killed
grid leaves no worker writing into its output while ``--resume`` starts again.

Every run uses ``threads`` torch threads (one by default) under every executor, so a run's floating-point
results do not depend on the executor that ran it: parallelism is across runs. (They can depend on the
machine: another CPU's math-library kernels may round differently, see docs/confirmation.md.) ``fn``
must be a module-level function and the tasks picklable; each run writes its own outputs (the
experiments' ``runs/`` folders), which is what makes an interrupted grid resumable under any executor.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends


def _end_with_parent(parent: int) -> None:
    """A local worker's initializer: ask the kernel to SIGKILL this worker when its parent ends (Linux only;
    elsewhere an orphaned worker finishes its task, then finds its pipe closed). ``run_tasks`` starts the
    workers from the thread that waits for them, so that thread lives as long as the grid."""
    if sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL):
        log.warning("worker %d: prctl(PR_SET_PDEATHSIG) failed (%s)", os.getpid(), os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def _with_threads(fn: Callable[[Any], Any], task: Any, threads: int) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(task)
    finally:
        torch.set_num_threads(before)


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    jobs: int = 1,
    ray_address: str | None = None,
    threads: int = 1,
) -> list[Any]:
    """``[fn(task) for task in tasks]`` on the executor the arguments name (see the module docstring)."""
    if jobs < 1 or threads < 1:
        raise ValueError(f"--jobs and threads must be at least 1, got {jobs} and {threads}")
    tasks = list(tasks)
    if not tasks:
        return []
    if ray_address:
        return _on_ray(fn, tasks, jobs, ray_address, threads)
    if jobs == 1 or len(tasks) == 1:
        return [_with_threads(fn, task, threads) for task in tasks]
    context = multiprocessing.get_context("spawn")
    workers = {"max_workers": min(jobs, len(tasks)), "mp_context": context}
    with ProcessPoolExecutor(**workers, initializer=_end_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_with_threads, fn, task, threads) for task in tasks]
        return [f.result() for f in futures]


def _on_ray(fn, tasks: list, jobs: int, address: str, threads: int) -> list:
    try:
        import ray  # the optional extra relist[ray]
    except ImportError:
        raise ValueError("--ray-address needs Ray: pip install 'relist[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=threads)(_with_threads)
        return ray.get([remote.remote(fn, task, threads) for task in tasks])
    finally:
        if started:
            ray.shutdown()
