"""Cog attention and the other fused attention kinds against softmax SDPA: forward+backward time and peak memory.

    python bench/attention.py                 # CPU float32 (and GPU bfloat16 when CUDA is available)
    python bench/attention.py --block-sweep   # also time the CPU path for several block sizes
    python bench/attention.py --kinds-only    # only the table of every fused kind
    python bench/attention.py --threads 1 --clock process   # CPU time of one thread: steady on a loaded machine

The kinds table times every row map of the fused kernels (cog, softmax, sigmoid, softpick, softmax1, ...)
through the blocked CPU path (the Triton kernels on a GPU) against SDPA, interleaved in one round.
On a machine that other jobs load, wall times of the fused CPU path (hundreds of short multi-threaded
ATen calls, each ending in a barrier that waits for a descheduled thread) inflate far more than SDPA's;
`--threads 1 --clock process` measures the CPU time of one thread instead, which such load hardly moves.

CPU rows: SDPA softmax, the naive Cog (`impl="reference"`: sign(s)·softmax(|s|) with plain autograd),
the lean autograd Function (`impl="torch"`) and the fused CPU path (`impl="cpu"`). Each time is the
median over interleaved repetitions (SDPA and the fused path in one round, the two O(N²)-memory
implementations in a second); the peak memory is the growth of the peak RSS (VmHWM, reset first) of
a fresh process running one forward+backward (glibc told to hand freed blocks back, so RSS follows live memory).
GPU rows (bfloat16): SDPA restricted to its flash backend against the Triton kernel, then the peak
CUDA memory of the Triton kernel as N grows. Ratios are to SDPA (time: lower is better; GPU
throughput: higher is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import uvit_cog.kernels.cpu as cpu_kernels
from uvit_cog import attention_variants, cog_attention
from uvit_cog.attention import kernel_kinds

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CPU_IMPLS: dict[str, Fn] = {
    "sdpa softmax": F.scaled_dot_product_attention,
    "naive cog (reference)": lambda q, k, v: cog_attention(q, k, v, impl="reference"),
    'cog "torch" Function': lambda q, k, v: cog_attention(q, k, v, impl="torch"),
    'cog "cpu" fused': lambda q, k, v: cog_attention(q, k, v, impl="cpu"),
}
LINEAR_MEMORY = ["sdpa softmax", 'cog "cpu" fused']  # timed side by side, apart from the O(N²) ones
FUSED_KINDS = tuple(kernel_kinds())  # every kind with a fused row map


def _kind_impl(kind: str, impl: str) -> Fn:
    return lambda q, k, v: attention_variants[kind](q, k, v, impl=impl)


KIND_IMPLS: dict[str, Fn] = {"sdpa softmax": F.scaled_dot_product_attention}
KIND_IMPLS |= {f'{kind} "cpu"': _kind_impl(kind, "cpu") for kind in FUSED_KINDS}
ALL_CPU_IMPLS = CPU_IMPLS | KIND_IMPLS  # what a memory child can be asked to run
CPU_SHAPES = [(32, 8, 65, 64), (32, 8, 257, 64), (4, 8, 1025, 64), (1, 4, 4096, 64)]  # (B, H, N, D)
GPU_SHAPES = [(64, 8, 257, 64), (16, 8, 1025, 64), (64, 8, 257, 72)]
GPU_MEMORY_LENGTHS = [1025, 2049, 4097]


def make_inputs(shape, dtype, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    return [q, k, v], torch.randn(shape, dtype=dtype, device=device)


def forward_backward(fn: Fn, qkv: list[torch.Tensor], grad: torch.Tensor) -> None:
    for t in qkv:
        t.grad = None
    fn(*qkv).backward(grad)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def median_times(impls: dict[str, Fn], shape, dtype, device, reps: int, clock: str = "wall") -> dict[str, float]:
    """Median seconds of forward+backward per implementation, repetitions interleaved across them.

    `clock`: "wall", or "process" (this process's CPU time; CPU only).
    """
    qkv, grad = make_inputs(shape, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock_fn = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in impls}
    for fn in impls.values():  # warm-up: kernels, autotuning, allocator
        forward_backward(fn, qkv, grad)
    for _ in range(reps):
        for name, fn in impls.items():
            sync()
            start = clock_fn()
            forward_backward(fn, qkv, grad)
            sync()
            times[name].append(clock_fn() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_peak_growth(name: str, shape) -> int:
    """Bytes by which one forward+backward of impl `name` raises the peak RSS of a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-child", name, json.dumps(shape)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, shape) -> None:
    fn = ALL_CPU_IMPLS[name]
    forward_backward(fn, *make_inputs((1, 1, 64, shape[-1]), torch.float32, "cpu"))  # load libraries first
    qkv, grad = make_inputs(shape, torch.float32, "cpu")
    # Reset the peak RSS to the current RSS: getrusage's maxrss would start from the parent's peak, which a
    # forked child inherits, and hide this run's peak below it.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    forward_backward(fn, qkv, grad)
    print(_status_bytes("VmHWM") - base)


def bench_cpu(reps: int, clock: str) -> None:
    print(f"## CPU float32, forward+backward, {torch.get_num_threads()} threads, {clock} clock, "
          f"load {os.getloadavg()[0]:.1f}")
    for shape in CPU_SHAPES:
        n_reps = reps if shape[2] <= 257 else max(2, reps // 2)
        # Two rounds: the O(N²)-memory implementations free GiB-sized tensors after every call, which slowed
        # whatever ran next (the fused path by up to 40% at N = 4096) when all four were interleaved.
        times = {}
        for group in (LINEAR_MEMORY, [name for name in CPU_IMPLS if name not in LINEAR_MEMORY]):
            times |= median_times({name: CPU_IMPLS[name] for name in group}, shape, torch.float32, "cpu", n_reps, clock)
        peaks = {name: cpu_peak_growth(name, shape) for name in CPU_IMPLS}
        base_t, base_m = times["sdpa softmax"], peaks["sdpa softmax"]
        print(f"\nB,H,N,D = {shape}")
        print(f"{'impl':24s} {'time ms':>9s} {'x SDPA':>7s} {'peak MiB':>9s} {'x SDPA':>7s}")
        for name in CPU_IMPLS:
            t, m = times[name], peaks[name]
            print(f"{name:24s} {t * 1e3:9.1f} {t / base_t:7.2f} {m / 2**20:9.1f} {m / max(base_m, 1):7.2f}")


def bench_cpu_kinds(reps: int, clock: str) -> None:
    print(f"\n## CPU float32, every fused kind (blocked CPU path) against SDPA, forward+backward, "
          f"{torch.get_num_threads()} threads, {clock} clock, load {os.getloadavg()[0]:.1f}")
    print(f"{'B,H,N,D':20s} {'kind':16s} {'time ms':>9s} {'x SDPA':>7s} {'peak MiB':>9s} {'x SDPA':>7s}")
    for shape in CPU_SHAPES:
        n_reps = reps if shape[2] <= 257 else max(2, reps // 2)
        times = median_times(KIND_IMPLS, shape, torch.float32, "cpu", n_reps, clock)
        peaks = {name: cpu_peak_growth(name, shape) for name in KIND_IMPLS}
        base_t, base_m = times["sdpa softmax"], peaks["sdpa softmax"]
        for name in KIND_IMPLS:
            t, m = times[name], peaks[name]
            print(f"{str(shape):20s} {name:16s} {t * 1e3:9.1f} {t / base_t:7.2f} {m / 2**20:9.1f} "
                  f"{m / max(base_m, 1):7.2f}")


def bench_block_sweep(reps: int) -> None:
    print("\n## CPU fused path: time / SDPA time for BLOCK_ELEMENTS (scores per block)")
    default = cpu_kernels.BLOCK_ELEMENTS
    sizes = [1 << 17, 1 << 18, 1 << 19, 1 << 20]
    print(f"{'B,H,N,D':20s}" + "".join(f"{'2^' + str(s.bit_length() - 1):>8s}" for s in sizes))
    for shape in CPU_SHAPES[1:]:
        impls: dict[str, Fn] = {"sdpa": F.scaled_dot_product_attention}
        for size in sizes:

            def run(q, k, v, size=size):
                cpu_kernels.BLOCK_ELEMENTS = size
                return cog_attention(q, k, v, impl="cpu")

            impls[str(size)] = run
        times = median_times(impls, shape, torch.float32, "cpu", max(2, reps // 2))
        print(f"{str(shape):20s}" + "".join(f"{times[str(s)] / times['sdpa']:8.2f}" for s in sizes))
    cpu_kernels.BLOCK_ELEMENTS = default


def bench_gpu(reps: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    impls: dict[str, Fn] = {
        "sdpa flash softmax": flash,
        'cog "triton"': lambda q, k, v: cog_attention(q, k, v, impl="triton"),
        'cog "torch" Function': lambda q, k, v: cog_attention(q, k, v, impl="torch"),
    }
    print(f"\n## GPU bfloat16, forward+backward, {torch.cuda.get_device_name()}")
    print(f"{'B,H,N,D':20s}" + "".join(f"{name + ' ms':>24s}" for name in impls) + f"{'triton throughput x SDPA':>26s}")
    for shape in GPU_SHAPES:
        times = median_times(impls, shape, torch.bfloat16, "cuda", reps)
        ratio = times["sdpa flash softmax"] / times['cog "triton"']
        print(f"{str(shape):20s}" + "".join(f"{times[n] * 1e3:24.2f}" for n in impls) + f"{ratio:26.2f}")
    print("\npeak CUDA memory of one forward+backward, B=8 H=8 D=64 (linear in N means MiB/N constant)")
    for n in GPU_MEMORY_LENGTHS:
        row = []
        for name in ("sdpa flash softmax", 'cog "triton"'):
            qkv, grad = make_inputs((8, 8, n, 64), torch.bfloat16, "cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward(impls[name], qkv, grad)
            torch.cuda.synchronize()
            row.append(f"{name}: {(torch.cuda.max_memory_allocated() - base) / 2**20:7.1f} MiB")
        print(f"N={n:5d}  " + "   ".join(row))


def bench_gpu_kinds(reps: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    impls: dict[str, Fn] = {"sdpa flash softmax": flash}
    impls |= {f'{kind} "triton"': _kind_impl(kind, "triton") for kind in FUSED_KINDS}
    print(f"\n## GPU bfloat16, every fused kind (Triton) against flash SDPA, forward+backward, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'B,H,N,D':20s} {'kind':22s} {'time ms':>9s} {'throughput x SDPA':>18s} {'peak MiB':>9s}")
    for shape in GPU_SHAPES + [(8, 8, GPU_MEMORY_LENGTHS[-1], 64)]:
        times = median_times(impls, shape, torch.bfloat16, "cuda", reps)
        for name, fn in impls.items():
            qkv, grad = make_inputs(shape, torch.bfloat16, "cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward(fn, qkv, grad)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ratio = times["sdpa flash softmax"] / times[name]
            print(f"{str(shape):20s} {name:22s} {times[name] * 1e3:9.2f} {ratio:18.2f} {peak:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation")
    parser.add_argument("--block-sweep", action="store_true", help="also sweep the CPU path's block size")
    parser.add_argument("--kinds-only", action="store_true", help="only the table of every fused kind")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="CPU timings: wall time, or the process's CPU time (use with --threads 1)")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], tuple(json.loads(args.memory_child[1])))
        return
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.kinds_only:
        bench_cpu(args.reps, args.clock)
    bench_cpu_kinds(args.reps, args.clock)
    if args.block_sweep:
        bench_block_sweep(args.reps)
    if torch.cuda.is_available():
        if not args.kinds_only:
            bench_gpu(args.reps)
        bench_gpu_kinds(args.reps)
    else:
        print("\n(no CUDA GPU: GPU section not run)")


if __name__ == "__main__":
    main()
