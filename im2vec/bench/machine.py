"""Facts about the machine a benchmark runs on: memory fields, resident and peak resident memory of this
process (the peak can be reset), the CPU and library versions, and the copy bandwidth of large buffers.
Shared by the tag-head benchmark (im2vec.bench.head) and the distributed one (im2vec.bench.dist)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

GiB = 1 << 30


def meminfo(key: str) -> int:
    """A /proc/meminfo (or /proc/self/status) field in bytes; 0 where there is none."""
    for path in ("/proc/meminfo", "/proc/self/status"):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 0


def rss() -> int:
    return meminfo("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    return meminfo("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(meminfo("MemTotal") / GiB, 1), "python": platform.python_version(),
            "torch": torch.__version__, "numba": numba_version}


def copy_bandwidth(mb: int, repeats: int = 5) -> float:
    """Bytes/s that ``dst.copy_(src)`` moves (read + write) between buffers far larger than the caches."""
    src = torch.ones(mb * (1 << 20) // 4)
    dst = torch.zeros_like(src)  # both written once, so every page is resident
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)

