"""Test infrastructure: a real one-node Slurm (munged, slurmctld, slurmd) in a scratch folder.

Why private daemons: tests must exercise the same `sbatch` / `srun --mpi=pmix` path a cluster user
takes, without systemd, without touching a site's Slurm or another user's munged. Everything lives
in one temporary folder: its own munge key and socket, free TCP ports, state/spool/log folders, so
several clusters can run side by side on one machine and nothing outside the folder is modified.
Only the daemons started here are ever stopped, by PID, even when the body of the `with` fails.

    with slurm_cluster(cpus=4) as cluster:        # exports SLURM_CONF inside the block
        result = cluster.sbatch(["job.sbatch"], timeout=60)
        assert result.returncode == 0, cluster.diagnostics()

As a command (scripts/slurm_smoke.sh uses it):
    python tests/slurm/cluster.py -- sbatch --wait job.sbatch
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcsrl.errors import UserError

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


class SlurmClusterError(RuntimeError):
    """The cluster could not start or a wait timed out; the message carries the daemon logs."""


def find_binary(name: str) -> str | None:
    """A Slurm/munge executable on PATH or in the sbin folders (often not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_binaries() -> list[str]:
    """Names of the daemons and client commands this machine lacks (empty: a cluster can start)."""
    return [name for name in (*DAEMONS, *CLIENTS) if find_binary(name) is None]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free right now (all sockets held open until chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def render_slurm_conf(*, root: Path, node: str, cpus: int, memory_mb: int, ctld_port: int,
                      slurmd_port: int, munge_socket: Path, partition: str = "debug",
                      min_job_age: int = 5, first_job_id: int = 1) -> str:
    """slurm.conf for one node without systemd, cgroups or accounting; all paths under `root`.

    `SlurmdParameters=config_overrides` makes slurmd report the configured `cpus` instead of the
    cores it finds, so jobs with more tasks than the machine has cores can still be scheduled.
    `sbatch --wait` polls every 2 s but quadruples its interval (up to 32 s) while that stays below
    MinJobAge/2; a MinJobAge of 4-5 s keeps it at 2 s, so a test job is not waited on 30 s longer
    than it runs. Finished jobs stay queryable for MinJobAge up to the next purge (about 60 s).
    Clusters side by side need different `first_job_id`s: OpenMPI names its shared-memory files
    after the PMIx namespace, which holds the job id, so two "job 1"s would clobber each other.
    """
    lines = {
        "ClusterName": "hpcsrl-test",
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmctldPort": ctld_port,
        "SlurmdPort": slurmd_port,
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={munge_socket}",
        "MpiDefault": "pmix",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "SchedulerType": "sched/builtin",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SlurmdParameters": "config_overrides",
        "ReturnToService": 2,
        "MinJobAge": min_job_age,
        "FirstJobId": first_job_id,
        "KillWait": 5,
        "InactiveLimit": 0,
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "run" / "slurmctld.pid",
        "SlurmdPidFile": root / "run" / "slurmd.pid",
        "SlurmctldLogFile": root / "log" / "slurmctld.log",
        "SlurmdLogFile": root / "log" / "slurmd.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "PlugStackConfig": root / "plugstack.conf",
        "TmpFS": root / "tmp",
    }
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    text += (f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} "
             "State=UNKNOWN\n")
    text += f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP\n"
    return text


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the starting thread dies, so no daemon is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int, skip: str | None = None) -> str:
    """Last `lines` lines of a log, leaving out lines containing `skip` (noise)."""
    if not path.exists():
        return f"({path} does not exist)"
    text = [line for line in path.read_text(errors="replace").splitlines()
            if skip is None or skip not in line]
    return "\n".join(text[-lines:])


@dataclass
class SbatchResult:
    """What `sbatch --wait` reported: the job's exit code (sbatch's), its id and sbatch's output."""

    returncode: int
    job_id: str
    stdout: str
    stderr: str


@dataclass
class SlurmCluster:
    """A running private cluster. `env` is os.environ plus SLURM_CONF (and the sbin PATH)."""

    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def command(self, args: Sequence[str], timeout: float = 30,
                check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env=self.env)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} exited {proc.returncode}: "
                                    f"{proc.stderr.strip()}\n{self.diagnostics()}")
        return proc

    def sbatch(self, args: Sequence[str], timeout: float = 120,
               env: dict[str, str] | None = None) -> SbatchResult:
        """`sbatch --wait --parsable ARGS`; on timeout the job is cancelled and an error raised."""
        cmd = ["sbatch", "--wait", "--parsable", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**self.env, **(env or {})})
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            job_id = out.strip().split(";")[0]
            report = self.diagnostics()
            if job_id:
                self.command(["scancel", job_id], check=False)
            raise SlurmClusterError(f"{' '.join(cmd)}: job {job_id or '?'} did not finish within "
                                    f"{timeout:.0f} s (cancelled)\n{report}") from None
        return SbatchResult(proc.returncode, out.strip().split(";")[0], out, err)

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.processes.items()}

    def diagnostics(self, lines: int = 40) -> str:
        """Daemon states, the queue and the last log lines: what a failing test should print."""
        parts = [f"slurm cluster in {self.root}; daemons alive: {self.alive()}"]
        for args in (["scontrol", "ping"], ["sinfo", "-N", "-l"], ["squeue", "-l"]):
            try:
                p = subprocess.run(args, capture_output=True, text=True, timeout=10, env=self.env)
                parts.append(f"$ {' '.join(args)}\n{(p.stdout + p.stderr).strip()}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                parts.append(f"$ {' '.join(args)}: {exc}")
        for daemon in ("slurmctld", "slurmd", "munged"):
            # The daemons echo their log file on stdout; show the file, or stdout if it is absent.
            path = self.log_dir / f"{daemon}.log"
            if not path.exists():
                path = self.log_dir / f"{daemon}.out"
            # munged logs an Info line for each credential Slurm checks: noise, not a failure.
            skip = "Info:" if daemon == "munged" else None
            parts.append(f"--- {path.name} (last {lines} lines)\n{_tail(path, lines, skip)}")
        return "\n".join(parts)

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until true; fail early if a daemon died, with the logs, after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [name for name, ok in self.alive().items() if not ok]
            if dead:
                raise SlurmClusterError(f"{', '.join(dead)} exited while waiting for {what}\n"
                                        f"{self.diagnostics()}")
            time.sleep(0.2)
        raise SlurmClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                f"{self.diagnostics()}")

    def query(self, args: Sequence[str]) -> str:
        """stdout of a client command against this cluster, or "" when it hangs (for polling)."""
        try:
            p = subprocess.run(list(args), capture_output=True, text=True, timeout=10,
                               env=self.env)
        except subprocess.TimeoutExpired:
            return ""
        return p.stdout

    def start_daemon(self, name: str, args: Sequence[str]) -> None:
        """Start one daemon in the foreground of a child process; output to log/<name>.out."""
        with open(self.log_dir / f"{name}.out", "ab") as out:
            self.processes[name] = subprocess.Popen(
                list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, preexec_fn=_die_with_parent)

    def cancel_jobs(self, timeout: float = 20) -> None:
        """Cancel every job of this cluster and wait (bounded) until the queue is empty."""
        ids = self.query(["squeue", "-h", "-o", "%i"]).split()
        if not ids:
            return
        subprocess.run(["scancel", *ids], capture_output=True, timeout=10, env=self.env)
        with contextlib.suppress(SlurmClusterError):
            self.wait_for("cancelled jobs to leave the queue",
                          lambda: not self.query(["squeue", "-h", "-o", "%i"]).split(), timeout)

    def stop(self, grace: float = 10) -> None:
        """Stop the daemons this object started (slurmd, slurmctld, munged), by PID only."""
        if self.alive().get("slurmctld"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.cancel_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)


def _write_munge_key(path: Path) -> None:
    """A fresh 1024-byte key readable only by us (munged refuses keys others can read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(1024))


@contextlib.contextmanager
def slurm_cluster(cpus: int = 4, memory_mb: int = 2000, workdir: str | os.PathLike | None = None,
                  start_timeout: float = 60, keep: bool = False) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd privately; yield the cluster; always stop them.

    `cpus` is what the node declares (more than the real cores is fine). SLURM_CONF is exported in
    os.environ inside the block and restored after. The scratch folder is removed at the end
    unless `keep` (or it was given as `workdir`).
    """
    missing = missing_binaries()
    if missing:
        raise UserError(f"cannot start a test Slurm cluster: missing {', '.join(missing)} "
                        "(Debian: apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise UserError("the test Slurm cluster runs slurmd as root (it starts job steps as the "
                        "submitting user); run as root or use your site's Slurm instead")
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="hpcsrl-slurm-") if owned else workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # munged insists every folder up to its socket is searchable by all.
    os.chmod(root, 0o711)
    for sub in ("munge", "state", "spool", "log", "run", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    os.chmod(root / "munge", 0o711)
    node = socket.gethostname().split(".")[0]
    munge_socket = root / "munge" / "munge.socket"
    ctld_port, slurmd_port = free_ports(2)
    first_job_id = random.SystemRandom().randrange(10_000, 60_000_000)
    conf = root / "slurm.conf"
    conf.write_text(render_slurm_conf(root=root, node=node, cpus=cpus, memory_mb=memory_mb,
                                      ctld_port=ctld_port, slurmd_port=slurmd_port,
                                      munge_socket=munge_socket, first_job_id=first_job_id))
    (root / "plugstack.conf").write_text("")
    env = dict(os.environ, SLURM_CONF=str(conf))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, env=env)
    old_conf = os.environ.get("SLURM_CONF")
    try:
        key = root / "munge" / "munge.key"
        if not key.exists():
            _write_munge_key(key)
        cluster.start_daemon("munged", [
            find_binary("munged"), "--foreground", f"--socket={munge_socket}",
            f"--key-file={key}", f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
            f"--log-file={root / 'log' / 'munged.log'}"])
        cluster.wait_for("munged's socket", munge_socket.exists, start_timeout)
        cluster.start_daemon("slurmctld", [find_binary("slurmctld"), "-D", "-i", "-f", str(conf)])
        cluster.wait_for("`scontrol ping` to report UP",
                         lambda: " is UP" in cluster.query(["scontrol", "ping"]), start_timeout)
        cluster.start_daemon("slurmd", [find_binary("slurmd"), "-D", "-N", node, "-f", str(conf)])
        cluster.wait_for(f"node {node} to be idle in sinfo",
                         lambda: cluster.query(["sinfo", "-h", "-n", node, "-o", "%T"]).strip()
                         == "idle", start_timeout)
        os.environ["SLURM_CONF"] = str(conf)
        yield cluster
    finally:
        cluster.stop()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if owned and not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/slurm/cluster.py",
        description="Start a private one-node Slurm (munged, slurmctld, slurmd as root), run "
                    "COMMAND with SLURM_CONF pointing at it, then stop the daemons. Example: "
                    "python tests/slurm/cluster.py -- sbatch --wait job.sbatch")
    parser.add_argument("--cpus", type=int, default=4,
                        help="CPUs the node declares (may exceed the real cores; default 4)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch folder (config, logs) and print its path")
    parser.add_argument("--timeout", type=float, default=60,
                        help="seconds to wait for each daemon to come up (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="command to run inside the cluster (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a COMMAND to run, e.g. -- sinfo")
    try:
        with slurm_cluster(cpus=args.cpus, start_timeout=args.timeout, keep=args.keep) as cluster:
            print(f"[slurm_cluster] up: SLURM_CONF={cluster.conf}", file=sys.stderr)
            rc = subprocess.run(command, env=cluster.env).returncode
            if rc != 0:
                print(cluster.diagnostics(), file=sys.stderr)
    except UserError as exc:
        print(f"slurm_cluster: error: {exc}", file=sys.stderr)
        return 2
    except SlurmClusterError as exc:
        print(f"slurm_cluster: {exc}", file=sys.stderr)
        return 3
    if args.keep:
        print(f"[slurm_cluster] kept {cluster.root}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
