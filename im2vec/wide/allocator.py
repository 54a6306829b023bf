"""Host memory for training: glibc malloc thresholds, and huge pages for the tag table.

**malloc.** By default glibc serves every allocation above a (dynamic) threshold with its own ``mmap`` and
returns the heap's free top to the OS above a trim threshold. A training step allocates and frees
the same large temporaries every step (the trunk's activations, the sampled rows and their
gradients), so each step pays for fresh pages again: on a 2-core VM a 5.5 MB zero-fill measured
~10 ms instead of ~0.5 ms, and the tag head's forward + backward 7–10 ms instead of 4 ms
(``python -m im2vec.bench`` shows the whole step with and without, ``--no-malloc-tuning``).

``tune_malloc`` raises both thresholds once (allocations below 32 MiB come from the heap, and up to
1 GiB of freed heap is kept), like setting ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``.
It does nothing off glibc, or when the user set either variable or ``IM2VEC_MALLOC_TUNING=0``.

**Huge pages.** ``empty_hugepages`` allocates the tag table and its optimizer state so that Linux
backs them with 2 MiB pages (where transparent huge pages are "always" or "madvise"): the sparse
update and the row gather touch ~5k random rows per step, and with 4 KiB pages nearly each row is a
TLB miss. Measured on a 2-core VM at V = 600k, d = 256 (random rows, 2 threads): the fused Adam
update 2.57 -> 1.91 ms, the row gather 0.85 -> 0.59 ms.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Apply the settings above; True when they are in effect."""
    if os.environ.get("IM2VEC_MALLOC_TUNING", "1") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user chose
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ---------------------------------------------------------------- transparent huge pages for the tag table
MADV_HUGEPAGE = 14
HUGE = 2 << 20


def _thp_mode() -> str:
    try:  # e.g. "always [madvise] never"
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        return text[text.index("[") + 1: text.index("]")]
    except (OSError, ValueError):
        return "never"


def advise_hugepages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large CPU tensor with 2 MiB pages (``madvise(MADV_HUGEPAGE)``).

    The tag table and its optimizer state are read and written a row (1 KB at d = 256) at a time,
    at random: with 4 KiB pages nearly every row costs a TLB miss (a nested page walk on a VM).
    Call it before the tensor is first written: pages faulted in afterwards are huge ones. It does
    nothing (and returns False) off Linux, when THP is off, or for tensors under 4 MiB.
    """
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < 2 * HUGE or platform.system() != "Linux" or _thp_mode() == "never":
        return False
    start = -(-t.data_ptr() // 4096) * 4096  # the page-aligned inside of the allocation
    end = (t.data_ptr() + nbytes) // 4096 * 4096
    libc = _libc()
    if libc is None:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


def empty_hugepages(*shape: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """An uninitialised fp32 CPU tensor (or one shaped like ``like``) advised to use huge pages."""
    t = torch.empty_like(like, memory_format=torch.contiguous_format) if like is not None else torch.empty(*shape)
    advise_hugepages(t)
    return t
