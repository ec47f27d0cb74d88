"""Run a function on N processes with an initialised process group (tests and tools).

``run_distributed(fn, world_size)`` starts ``world_size`` processes, initialises
torch.distributed in each, calls ``fn(*args, **kwargs)`` on every rank and returns the
per-rank results. :class:`DistributedWorkers` does the same but keeps the processes alive
between calls, so a test module pays the start-up (importing torch on every rank) once.

- The rendezvous store is hosted by the calling process on a port the OS picks, so concurrent
  runs never collide on a port and no port can be taken between choosing and using it.
- A rank that raises is reported with its own traceback; ranks left waiting in a collective
  are then killed.
- Every call has a timeout; a hang is reported with the ranks that did not finish.
- Worker processes are always terminated on close, on error and at interpreter exit, and exit
  on their own when the process that owns the pool dies (a killed run leaves no spinning workers).

Functions passed in must be picklable (defined at module level): CPU ranks are forked from a
forkserver that has imported torch and megamoe once, NCCL ranks are spawned.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megamoe.parallel.state import ParallelLayout, ParallelState

_HOST = "127.0.0.1"
_ERROR_GRACE_SECONDS = 3.0  # after one rank fails, how long to wait for the others' reports


class DistributedTestError(RuntimeError):
    """One or more ranks failed, died or timed out."""


def _exit_with_owner(owner_alive) -> None:
    """Die when the process that owns the pool does (killed test run, CI timeout): otherwise a
    worker blocked in a collective or a queue would outlive it and keep spinning. ``owner_alive``
    is the read end of a pipe whose only write end the owner holds: its EOF is the owner's exit.
    (The direct parent is no witness: under the forkserver it is the server, which stays up while
    any of its children does.)"""

    def watch() -> None:
        try:
            owner_alive.recv()  # nothing is ever sent
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def _freeze_imports() -> None:
    """Move what the first task imported (torch, megamoe: about a million objects) out of the
    cyclic garbage collector's reach. Its full collections otherwise walk them all, over and
    over, while the ranks exchange small tensors (Python's GC showed in a profile of a rank's
    collective loop here)."""
    gc.collect()
    gc.freeze()


def _worker_main(
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    timeout_s: float,
    tasks: "mp.Queue",
    results: "mp.Queue",
    owner_alive,
    env: dict[str, str],
) -> None:
    os.environ.update(env)  # a forked rank has the forkserver's environment, from whenever it started
    torch.set_num_threads(1)
    _exit_with_owner(owner_alive)
    try:
        store = dist.TCPStore(_HOST, port, world_size=None, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        frozen = False
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs = task
            try:
                results.put((rank, "ok", fn(*args, **kwargs)))
            except BaseException:
                results.put((rank, "error", traceback.format_exc()))
            if not frozen:
                _freeze_imports()
                frozen = True
    finally:
        dist.destroy_process_group()


# What every CPU rank imports: a forkserver loads it once and forks the ranks from itself, where
# spawning would import torch and megamoe again in each (about 4 s of CPU per rank).
_PRELOAD = ["torch", "torch.distributed", "megamoe.training.train"]


def preloaded_context():
    """The forkserver context for CPU ranks (``_PRELOAD`` imported in the server; it imports no
    CUDA state, and the ranks start their threads after the fork); spawn where there is none."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class DistributedWorkers:
    """``world_size`` long-lived processes sharing one process group.

    ``run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the results in rank order.
    After a failure the processes are killed; the next ``run`` starts fresh ones.
    """

    def __init__(self, world_size: int, backend: str = "gloo", timeout: float = 120.0,
                 env: Optional[dict[str, str]] = None):
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size, self.backend, self.timeout = world_size, backend, timeout
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self._procs: list[mp.Process] = []
        self._store: Optional[dist.TCPStore] = None
        atexit.register(self.close)

    def __enter__(self) -> "DistributedWorkers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        ctx = preloaded_context() if self.backend == "gloo" else mp.get_context("spawn")
        self._store = dist.TCPStore(_HOST, 0, world_size=None, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=self.timeout))
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        owner_alive, self._owner_alive = ctx.Pipe(duplex=False)  # the workers' end; ours closes in close()
        saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # what a spawned rank's interpreter reads as it starts (OMP_NUM_THREADS)
        try:
            for rank in range(self.world_size):
                proc = ctx.Process(
                    target=_worker_main,
                    args=(rank, self.world_size, self.backend, self._store.port, self.timeout,
                          self._tasks[rank], self._results, owner_alive, self.env),
                    daemon=True,
                    name=f"megamoe-rank{rank}",
                )
                proc.start()
                self._procs.append(proc)
        finally:
            owner_alive.close()  # the workers hold their own copies
            for k, v in saved_env.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        deadline = time.monotonic() + (timeout or self.timeout)
        outcomes: dict[int, tuple[str, Any]] = {}
        first_error_at: Optional[float] = None
        while len(outcomes) < self.world_size:
            now = time.monotonic()
            if now > deadline or (first_error_at and now > first_error_at + _ERROR_GRACE_SECONDS):
                break
            try:
                rank, status, value = self._results.get(timeout=0.2)
                outcomes[rank] = (status, value)
                if status == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead and first_error_at is None:
                    first_error_at = time.monotonic()
        failures = {r: v for r, (s, v) in outcomes.items() if s == "error"}
        if not failures and len(outcomes) == self.world_size:
            return [outcomes[r][1] for r in range(self.world_size)]
        missing = [r for r in range(self.world_size) if r not in outcomes]
        exit_codes = {r: self._procs[r].exitcode for r in missing}
        self.close()
        name = getattr(fn, "__qualname__", repr(fn))
        parts = [f"{name} failed on {self.world_size} ranks ({self.backend})"]
        for rank, tb in sorted(failures.items()):
            parts.append(f"--- rank {rank} raised:\n{tb.rstrip()}")
        if missing:
            reasons = ", ".join(
                f"rank {r} " + ("still running (hung or waiting on a failed peer)" if c is None else f"died with exit code {c}")
                for r, c in exit_codes.items()
            )
            parts.append(f"--- no result from: {reasons}")
        raise DistributedTestError("\n".join(parts))

    def close(self) -> None:
        """Stop every worker (politely, then by force) and release the store."""
        for proc, q in zip(self._procs, getattr(self, "_tasks", [])):
            if proc.is_alive():
                try:
                    q.put(None)
                except (ValueError, OSError):
                    pass
        for proc in self._procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        self._procs = []
        self._store = None
        if getattr(self, "_owner_alive", None) is not None:
            self._owner_alive.close()
            self._owner_alive = None


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    backend: str = "gloo",
    timeout: float = 120.0,
    args: tuple = (),
    kwargs: Optional[dict[str, Any]] = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh ranks; return the per-rank results."""
    with DistributedWorkers(world_size, backend=backend, timeout=timeout) as workers:
        return workers.run(fn, *args, **(kwargs or {}))


def worker_device() -> torch.device:
    """The device a rank should compute on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fake_state(world_size: int, rank: int = 0, **degrees) -> ParallelState:
    """A ParallelState with groups but no process groups (layout tests only: no collectives)."""
    return ParallelState.without_process_groups(ParallelLayout.build(world_size, **degrees), rank)


def run_on_threads(fn: Callable[[int], Any], world_size: int) -> dict[int, Any]:
    """``fn(rank)`` on one thread per rank, for tests whose ranks talk through a simulated
    transport (e.g. point-to-point with NCCL's matching rules); returns each rank's result and
    re-raises the first exception a rank raised."""
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # re-raised by the calling thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
