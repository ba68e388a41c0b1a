"""A training process's peak memory: CUDA's allocator counter, or on CPUs Linux's resident-set high-water mark.

On Linux CPUs the resident set is more than the live tensors: glibc's malloc serves blocks of 128 KiB and more
with mmap only until the first such block is freed, then raises its threshold (up to 32 MiB), so later
activations come from the heap, which keeps what is freed. Measured (benchmarks/memory_bench.py, RESULTS.md
"Training memory", QDyLoRA with a cached teacher): training peak 3893 MB with glibc's default, 2478 MB with
MALLOC_MMAP_THRESHOLD_=131072 in the environment (a fixed threshold), but 6.36 instead of 3.47 s per step (every
large block then costs fresh pages). kdlora leaves the default; set the variable where memory matters more.
"""

import resource
from pathlib import Path

import torch


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator counter, or Linux's resident-set high-water mark (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak stays the whole process's
        pass


def peak_memory_mb() -> float:
    """Peak since the last reset_peak_memory (or the start): CUDA max allocated, else the resident-set high-water mark."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
