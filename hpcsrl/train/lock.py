"""One run per output folder: a lock file naming the holder's host and PID.

Two trainers writing one folder (a second `hpcsrl pretrain` on a running run, or N copies under a
launcher that was meant to start one) would overwrite each other's checkpoints. The lock is a file
created with O_EXCL (works on shared file systems, unlike flock over NFS); a lock left by a killed
process on this host (gone, or a zombie not yet reaped) is recognised as stale and taken over,
with the temporary checkpoints the kill left behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from types import TracebackType

from hpcsrl.errors import UserError
from hpcsrl.procs import ended_on_this_host

LOCK_NAME = ".hpcsrl.lock"


class RunLock:
    """`with RunLock(out):` holds OUT/.hpcsrl.lock; a second holder gets a UserError."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.dir}: cannot create the output folder ({exc.strerror})"
                            ) from None
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, pid = self._holder()
                if host == socket.gethostname() and pid == os.getpid():
                    self.held = True  # this process already holds it (e.g. a resumed trainer)
                    return self
                if pid is not None and ended_on_this_host(host, pid):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its process is gone
                    continue
                raise UserError(
                    f"{self.dir} is in use by another run (host {host or '?'}, PID "
                    f"{pid if pid is not None else '?'}): wait for it, choose another --out, or "
                    f"delete {self.path} if that process no longer exists") from None
            except OSError as exc:
                raise UserError(f"{self.dir}: output folder is not writable ({exc.strerror})"
                                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            self._remove_stale_temps()
            return self
        raise UserError(f"{self.path}: could not take the lock; delete it and retry")

    def _holder(self) -> tuple[str, int | None]:
        try:
            host, _, pid = self.path.read_text().strip().partition(" ")
            return host, int(pid)
        except (OSError, ValueError):
            return "", None

    def _remove_stale_temps(self) -> None:
        """Temporary files of atomic writes (`.NAME.PID.tmp`) left by a killed run."""
        for tmp in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
