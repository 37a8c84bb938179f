"""Run one `hpcsrl` command in this process, then write this process's peak resident set size
(bytes, `getrusage` ru_maxrss) to OUT.RANK: the same measurement for every rank of a Horovod and
a DHP run, whichever runtime it is.

    mpirun -np K python peak_rss.py OUT hpcsrl-subcommand [ARGS...]
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from hpcsrl.log import launcher_rank


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from hpcsrl.cli.main import main as hpcsrl_main

    try:
        return hpcsrl_main(argv)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        Path(f"{out}.{launcher_rank()}").write_text(str(peak))


if __name__ == "__main__":
    sys.exit(main())
