"""Host memory that torch frees goes back to the operating system (glibc's malloc, Linux).

glibc serves a large allocation with its own mmap and unmaps it when freed, but it raises that size threshold
to the size of every such block freed (up to 32 MiB): after the first few, the buffers a training step
allocates and frees (activations, FSDP's gathered layers, gradients before their reduce-scatter) come from
the heap instead, whose freed holes are kept and fragment. Pinning the threshold at 4 MiB keeps the large
ones in their own mappings. Measured on SmolLM2-135M, 2 CPU cores (`benchmarks/launch_memory.py`,
docs/scale.md#fsdp): an expert job's peak 4.65 → 4.33 GiB in one process, 3.0 → 2.7 GiB in each of a
2-process FSDP launch, at the same training speed (8 steps: 25.5-27.1 s against 27.0-28.0 s). A lower
threshold saves more and costs speed: 1 MiB gave 2.3 GiB per FSDP process, 30% slower, because every
activation is then a fresh mapping whose pages fault in on each step.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
THRESHOLD = 4 << 20  # bytes


def pin_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Serve allocations of at least `threshold` bytes from their own mappings, returned to the system when
    freed, for the rest of this process. Leaves alone a process whose MALLOC_MMAP_THRESHOLD_ is set (the
    user's choice) and any C library without glibc's mallopt. Returns whether the threshold was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (macOS, Windows)
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("glibc mmap threshold pinned at %d bytes: %s", threshold, done)
    return done
