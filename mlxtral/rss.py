"""This process's peak resident memory: the one figure every "peak memory" shows (the stats line,
``bench``, ``--json``), whatever the backend."""
from __future__ import annotations

import resource
import sys


def peak_rss() -> int:
    """Peak resident memory of this process, bytes: Linux's own ``VmHWM`` (``ru_maxrss`` would carry
    the peak of a parent that forked it); elsewhere ``ru_maxrss`` (bytes on macOS, KiB elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
