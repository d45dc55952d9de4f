"""Process-wide settings for programs that own their process, such as the command line.

Two defaults cost a one-CT run time without saving anything useful:

- By default glibc serves each block above its mmap threshold (adjusted at run time, at
  most 32 MB) with a fresh `mmap` and returns it to the kernel when it is freed. It also
  trims the top of its heap when enough free memory collects there. A network batch
  allocates and frees an output of about 10 MB per layer (8 slices of 16 x 192 x 192 in
  bf16), so the kernel maps and zeroes the same memory again for every layer. On the
  2-core CPU of `benchmarks/BENCHMARKS.md` a batch of the U-Net took 34 ms instead of
  24 ms, and reading a 129-slice DICOM series 0.29 s instead of 0.19 s.
- Python's full garbage collection walks every object the imports created (about
  280,000 with torch, SimpleITK and matplotlib), which took 70 to 80 ms per pass.

`prepare_process` keeps freed memory in the process for reuse and moves the objects that
exist so far out of the collector's reach (`gc.freeze`). Memory is then returned only
when the process exits, so the peak resident size grows: on the 512x512x129 CT of the
benchmark it was 1.57 GB instead of 1.26 GB. Libraries should leave both to the program
that owns the process, so the engine does not call them itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

logger = logging.getLogger(__name__)

__all__ = ["keep_freed_memory", "prepare_process"]

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# 1 GiB: a float32 volume of 512 x 512 x 1000 voxels (1000 MiB) still fits.
DEFAULT_KEPT_BLOCK_BYTES = 1 << 30


def keep_freed_memory(max_block_bytes: int = DEFAULT_KEPT_BLOCK_BYTES) -> bool:
    """Keep freed memory in this process for reuse instead of returning it to the kernel.

    Blocks up to `max_block_bytes` come from the heap instead of separate mappings, and
    the heap is trimmed only when that much memory is free at its top.

    Returns:
        True when glibc accepted both settings; False on other C libraries and systems,
        where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("No mallopt in this C library: malloc settings left unchanged.")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    accepted = (mallopt(_M_MMAP_THRESHOLD, max_block_bytes) == 1
                and mallopt(_M_TRIM_THRESHOLD, max_block_bytes) == 1)
    logger.debug("malloc keeps freed blocks up to %d bytes: %s", max_block_bytes, accepted)
    return accepted


def prepare_process() -> bool:
    """Apply both settings; call once, after the imports and before the first run.

    Returns:
        Whether the malloc setting was applied (see `keep_freed_memory`).
    """
    malloc_applied = keep_freed_memory()
    gc.freeze()  # objects created later are still collected as usual
    return malloc_applied
