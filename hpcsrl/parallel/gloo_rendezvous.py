"""Start Horovod's Gloo controller under `mpirun` / `srun`, as `horovodrun --gloo` would.

Why Gloo on CPU (HOROVOD_CONTROLLER=gloo): with the MPI controller, Horovod's background thread
meets the other ranks in OpenMPI every cycle and OpenMPI waits by spinning, on the cores backward
computes on; Gloo's TCP waits block. Measured figures: benchmarks/scaling/README.md.

Gloo needs a rendezvous store that `horovodrun` normally provides. Here rank 0 starts Horovod's
own rendezvous HTTP server; the launcher's MPI (mpi4py) only exchanges the host names and the
server's address, then each rank gets the variables `horovodrun` would set (rank, local and
cross ranks, interface) before `hvd.init()`.
"""

from __future__ import annotations

import os
import socket
import subprocess

from hpcsrl.errors import UserError

ENV_IFACE = "HOROVOD_GLOO_IFACE"
ENV_ADDR = "HOROVOD_GLOO_RENDEZVOUS_ADDR"
_SERVERS: list = []  # rank 0's rendezvous server, kept alive until the process exits


def slot_layout(hosts: list[str]) -> list[dict[str, int | str]]:
    """Horovod's slot of every rank from the rank -> host list: local rank = order among the
    ranks of its host, cross rank = order of its host among the hosts with that local rank."""
    local_rank = [hosts[:r].count(h) for r, h in enumerate(hosts)]
    slots = []
    for r, host in enumerate(hosts):
        peers: list[str] = []  # hosts having a rank with this local rank, in rank order
        for q, h in enumerate(hosts):
            if local_rank[q] == local_rank[r] and h not in peers:
                peers.append(h)
        slots.append({"hostname": host, "rank": r, "size": len(hosts),
                      "local_rank": local_rank[r], "local_size": hosts.count(host),
                      "cross_rank": peers.index(host), "cross_size": len(peers)})
    return slots


def route_interface(addr: str) -> tuple[str, str]:
    """(interface, source address) this machine uses to reach `addr` (`ip route get`)."""
    try:
        out = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        return out[out.index("dev") + 1], out[out.index("src") + 1]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        raise UserError(f"cannot find the network interface that reaches {addr} for Horovod's "
                        f"Gloo controller: set {ENV_IFACE} (e.g. eth0) or "
                        "HOROVOD_CONTROLLER=mpi") from None


def start_gloo(comm=None) -> None:
    """Set the Gloo variables of this rank (collective over `comm`, default MPI world).

    One host: loopback. Several: rank 0 serves on its address towards the other hosts, and each
    rank uses the interface that reaches it (HOROVOD_GLOO_IFACE, if set, wins)."""
    from horovod.runner.common.util.hosts import SlotInfo
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    rank = comm.Get_rank()
    hosts = comm.allgather(MPI.Get_processor_name())
    slots = slot_layout(hosts)
    one_host = len(set(hosts)) == 1
    server = None
    reply: tuple[str, int] | str
    if rank == 0:
        try:
            from horovod.runner.http.http_server import RendezvousServer

            if one_host:
                addr = "127.0.0.1"
            else:  # rank 0's address on the network that faces the other hosts
                other = next(h for h in hosts if h != hosts[0])
                addr = route_interface(socket.gethostbyname(other))[1]
            server = RendezvousServer()
            port = server.start()
            server.init([SlotInfo(**s) for s in slots])
            reply = (addr, port)
        except Exception as exc:  # every rank must hear about it, or the others wait forever
            reply = f"rank 0 could not start the Gloo rendezvous server: {exc}"
    else:
        reply = ""
    reply = comm.bcast(reply, root=0)
    if isinstance(reply, str):
        raise UserError(f"{reply}; or run with HOROVOD_CONTROLLER=mpi")
    addr, port = reply
    iface = os.environ.get(ENV_IFACE) or ("lo" if one_host else route_interface(addr)[0])
    me = slots[rank]
    os.environ.update({
        ENV_ADDR: addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), ENV_IFACE: iface,
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        # Gloo's default 30 s is short for ranks that start torch on a loaded or slow node
        "HOROVOD_GLOO_TIMEOUT_SECONDS": os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "300"),
        "HOROVOD_HOSTNAME": str(me["hostname"]),
        **{f"HOROVOD_{k.upper()}": str(me[k]) for k in
           ("rank", "size", "local_rank", "local_size", "cross_rank", "cross_size")}})
    if server is not None:
        _SERVERS.append(server)  # serves until the process exits (daemon thread)
