"""Further ranks of a multi-process training end with the process that started them.

Lightning's launcher (and torchrun's agent) start ranks 1… as child processes. If the parent is killed
outright (SIGKILL, an out-of-memory kill), a child waiting in a collective would otherwise sit orphaned
until the process group's timeout (30 minutes), holding its memory. On Linux the kernel ends it instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux; a no-op elsewhere, False).
    A parent that died before the request took effect (this process re-parented meanwhile; `parent`, its PID,
    when the caller knows it from before this process started working) ends this one now; a parent that is
    PID 1 (a container's entry point) is a parent like any other. SIGKILL suits a further rank of a training
    (rank 0 owns the run directory and checkpoints, so it has nothing to save); SIGTERM lets a worker that owns
    a run stop it as a scheduler's time limit would (checkpoint kept, resumable)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect (re-parented since)
        os._exit(1)
    return True
