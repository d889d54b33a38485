"""How scripts/bench.py measures: wall time, the process's resident memory, the CUDA allocator's counters and the
bytes of tensors.
"""
import os
import resource
import statistics
import time

import torch


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """The CUDA allocator's counters of a device, in bytes; None on the CPU, which has none."""

    def __init__(self, device):
        self.device = device

    def allocated(self):
        return self._read(torch.cuda.memory_allocated)

    def peak(self):
        return self._read(torch.cuda.max_memory_allocated)

    def reset_peak(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _read(self, counter):
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        return counter(self.device)


def tensor_bytes(tensors):
    """Bytes of this process's part of the tensors (a DTensor's local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def time_steps(step, device, repeats, warmup=1):
    """Median wall time of step() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
