"""Run under `mpirun -np K --tag-output`: bad-input cases of `hpcsrl pretrain` / `hpcsrl train`
in the same ranks, one after the other (one Horovod start-up for all). Before each case rank 0
prints `=== CASE`; every rank writes `CASE RC` lines to OUT/rc-RANK.txt.

    horovod_bad_input.py OUT NAME -- ARGS... [--- NAME -- ARGS...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpcsrl.cli.main import main
from hpcsrl.log import launcher_rank


def cases(argv: list[str]) -> list[tuple[str, list[str]]]:
    out, item = [], []
    for word in [*argv, "---"]:
        if word == "---":
            if item:
                out.append((item[0], item[2:]))
            item = []
        else:
            item.append(word)
    return out


def run() -> None:
    out = Path(sys.argv[1])
    rank = launcher_rank()
    lines = []
    for name, args in cases(sys.argv[2:]):
        if rank == 0:
            print(f"=== {name}", file=sys.stderr, flush=True)
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        sys.stderr.flush()
        lines.append(f"{name} {rc}\n")
    (out / f"rc-{rank}.txt").write_text("".join(lines))


if __name__ == "__main__":
    run()
