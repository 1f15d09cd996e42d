"""glibc's malloc kept from handing freed memory back to the system between the calls of a long run (MD, relaxations,
training).

A force call (or a training step) allocates its tensors afresh and frees them at its end. glibc gives the free top of
its heap back to the system once it exceeds M_TRIM_THRESHOLD and serves blocks at or above M_MMAP_THRESHOLD by mmap
(unmapped when freed); both start low (128 kB) and rise with the largest mmap'd block the process has freed so far.
So whether every call faults its memory in again from the system (thousands of page faults per call of M3GNet on a
64- to 256-atom cell, up to ~20 % of its time) depends on what the process happened to free before: speed that varies
from process to process (bench/RESULTS.md). `retain_freed_memory` fixes the two thresholds: blocks under 32 MB (the
value glibc's own rising threshold stops at on 64-bit systems) come from the heap, and the free top of a heap goes back
to the system only once it exceeds 256 MB (per arena: the main one, and one per thread that allocates); blocks of
32 MB or more are mapped and unmapped as before. This is not a bound on the freed memory a process holds: free memory
below blocks still in use stays in the process as with glibc's defaults; `release_freed_memory` (malloc_trim) gives it
back on demand. Process-wide, once, on glibc only. Left alone with MULTIFI_MALLOC=0 (or off/false/no), when the
environment already sets glibc's malloc (any MALLOC_* variable, or a malloc entry in GLIBC_TUNABLES), and when
LD_PRELOAD brings another allocator (jemalloc, tcmalloc, mimalloc).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger("multifi")

MMAP_THRESHOLD = 32 << 20  # bytes: glibc's own upper limit for its rising threshold on 64-bit systems
TRIM_THRESHOLD = 256 << 20  # bytes of free heap kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_lock = threading.Lock()
_state: dict[str, bool] = {}  # "set": the thresholds were set by this process


def _left_alone() -> str | None:
    """Why the thresholds stay as they are, or None."""
    if os.environ.get("MULTIFI_MALLOC", "1").lower() in ("0", "false", "no", "off", ""):
        return "MULTIFI_MALLOC=0"
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "the environment sets glibc's malloc"
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return "LD_PRELOAD brings another allocator"
    if not _glibc():
        return "not glibc"
    return None


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _mallopt(param: int, value: int) -> bool:
    return bool(ctypes.CDLL(None).mallopt(ctypes.c_int(param), ctypes.c_int(value)))


def retain_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD) once per process; True when they are set
    (now or before), False when left alone (see the module's docstring) or refused."""
    with _lock:
        if "set" in _state:
            return _state["set"]
        why = _left_alone()
        ok = why is None and _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _state["set"] = ok
        if ok:
            log.info(
                "glibc malloc: blocks under %d MB from the heap, a heap's free top returned only beyond %d MB (freed "
                "memory kept for the next calls; MULTIFI_MALLOC=0 leaves glibc's settings)",
                MMAP_THRESHOLD >> 20,
                TRIM_THRESHOLD >> 20,
            )
        else:
            log.debug("glibc malloc left as it is (%s)", why or "mallopt refused")
        return ok


def release_freed_memory() -> bool:
    """Give the process's free heap memory back to the system now (glibc's malloc_trim(0): every arena, below blocks
    in use too), e.g. after a long run and before other work; True when some was released. False off glibc."""
    return _glibc() and bool(ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0)))
