"""How close dynamic 3/2/1 comes to its bound as the emulated intervals grow: the runtime's
per-mini-batch cost (hops, scheduling, wake-ups, aggregation) is fixed in seconds, so its share
falls as the time-scale rises.

    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/timescale.py      # ~8 min

Writes results/timescale.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROFILES,
    RESULTS,
    hop_ms,
    paper_plan,
    rate_fields,
    read_trace,
    run_dhp,
    write_csv,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, default=PROFILES / "paper_table5.json")
    p.add_argument("--scales", default="0.05,0.1,0.5")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--aggregate-every", type=int, default=100)
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/timescale"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--reuse", action="store_true")
    a = p.parse_args()
    rows = []
    for scale in (float(s) for s in a.scales.split(",")):
        runs = a.runs / f"s{scale:g}"
        paper_plan(a.profile, scale, runs)
        rep = run_dhp(runs / "plan.json", a.profile, runs / "dynamic", a.iterations,
                      aggregate_every=a.aggregate_every, time_scale=scale, reuse=a.reuse)
        rows.append({"time_scale": scale, "chain_ms": round(1e3 * scale * 3.098, 1),
                     **rate_fields(rep), **hop_ms(read_trace(runs / "dynamic"), 3)})
    write_csv(a.out_dir / "timescale.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
