"""Whether a process named by (host, PID) has ended: for stale run locks and for naming dead ranks.

A process killed together with its parent (mpirun SIGKILLed) is re-parented to PID 1, which in
containers and micro-VMs may reap it seconds later: until then `kill(pid, 0)` still succeeds on the
zombie, so /proc's state is read instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def ended_on_this_host(host: str, pid: int) -> bool:
    """True when `host` is this machine and `pid` is gone or a zombie; False when it runs, or when
    it is on another host (which this machine cannot see)."""
    if host != socket.gethostname():
        return False
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (OSError, IndexError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
