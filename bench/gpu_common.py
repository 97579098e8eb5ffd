"""What the sections of bench/gpu.py share: timing on the device, worker processes, error text, the device."""

from __future__ import annotations

import multiprocessing
import platform
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

import torch
from torch import Tensor

from uvit_cog import attention_variants


def triton_fn(kind: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The Triton kernels of a kind as a function of q, k and v."""
    return lambda q, k, v: attention_variants[kind](q, k, v, impl="triton")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_times(fn: Callable[[], object], device: str, warmup: int, rounds: int, calls: int) -> list[float]:
    """Seconds per call of `fn` in each of `rounds` rounds of `calls` back-to-back calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    return times


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """How far one call of `fn` raises the CUDA memory in use above what was allocated before it (None on the CPU)."""
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"device": f"cpu ({platform.processor() or platform.machine()}), Triton interpreted", "capability": None}
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}


def _worker_init() -> None:
    torch.set_num_threads(1)  # workers compile and check kernels: one thread each leaves the cores to the others


class Workers:
    """Spawned worker processes (CUDA needs spawn, not fork) for work that is not timed; jobs=0 runs it inline."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) if jobs else None

    def submit(self, fn: Callable, *args) -> Future | None:
        """fn(*args) in a worker; None without workers (jobs=0, or the pool broke)."""
        if self.executor is None:
            return None
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool:
            self.close()
            return None

    def run(self, fn: Callable, tasks: list[tuple], deadline: float) -> list:
        """fn(*task) for each task, or None for those not finished (inline: not started) by `deadline`.
        Inline too when the pool broke (a worker died): the work still gets done, only slower."""
        if self.executor is not None:
            try:
                return collect([self.executor.submit(fn, *task) for task in tasks], deadline)
            except BrokenProcessPool:
                self.close()
        return [fn(*task) if time.monotonic() < deadline else None for task in tasks]

    def close(self, grace_s: float = 10.0) -> None:
        """Cancel what has not started; give running tasks `grace_s` seconds, then end their processes."""
        if self.executor is None:
            return
        processes = list((getattr(self.executor, "_processes", None) or {}).values())  # no public handle
        self.executor.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + grace_s
        for process in processes:
            process.join(timeout=max(0.0, end - time.monotonic()))
            if process.is_alive():  # e.g. a compile that hangs: the suite must not wait past its limit
                process.terminate()
        self.executor = None


def collect(futures: list[Future | None], deadline: float) -> list:
    """The futures' results in order; None for each one not done by `deadline` (the pending ones are cancelled)
    or never submitted. A task that raised gives {"error": ...}."""
    results = []
    for future in futures:
        if future is None:
            results.append(None)
            continue
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            results.append(None)
            future.cancel()
        except Exception as e:  # noqa: BLE001 - a worker that died or a task that raised is reported, not fatal
            results.append({"error": f"{type(e).__name__}: {e}"})
    return results
