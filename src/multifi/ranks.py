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


def end_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; a no-op elsewhere, False). A parent
        that died while the request was made (this process re-parented meanwhile) ends this one now; a parent that is
    PID 1 (a container's entry point) is a parent like any other. Rank 0 owns the run directory and the
        checkpoints, so a further rank has nothing to save."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect (re-parented since)
        os._exit(1)
    return True
