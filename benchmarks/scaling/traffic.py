"""Bytes the ranks of a run sent, counted rather than computed.

Two transports carry a data-parallel run's traffic: MPI (start-up, DHP's point-to-point messages,
Horovod with the MPI controller, the default) and TCP sockets (Horovod's Gloo controller).
OpenMPI's PML monitoring counts every byte handed to an MPI transport, shared memory included;
the kernel's interface counters count the sockets. A run's total is the sum of both.
"""

from __future__ import annotations

from pathlib import Path


def pml_sent_bytes(prefix: Path | str, ranks: int) -> list[float]:
    """Bytes each rank sent through MPI ('E' lines of OpenMPI's prefix.R.prof monitoring files)."""
    out = []
    for r in range(ranks):
        text = Path(f"{prefix}.{r}.prof").read_text()
        out.append(float(sum(int(line.split("\t")[3].split()[0]) for line in text.splitlines()
                             if line.startswith("E\t"))))
    return out


def socket_tx_bytes() -> int:
    """Bytes transmitted so far on every network interface of this machine (/proc/net/dev).

    Ranks on one node talk through the loopback interface; the difference over a run, divided by
    the ranks, is each rank's socket traffic (other traffic of the machine counts too: keep the
    machine otherwise quiet while measuring)."""
    total = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        _, _, fields = line.partition(":")
        total += int(fields.split()[8])
    return total
