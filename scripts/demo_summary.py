"""The demo's last three lines: what it showed, read back from the files the demo wrote.

    python scripts/demo_summary.py DEMO_OUT      (scripts/demo.sh calls it)

Line 1: patches written and the split balance; line 2: the pre-trained encoder's OA beside the
floors (random-init encoder, channel-statistics k-NN), saying plainly where it does not beat one;
line 3: the CWB plan (stages, bottleneck, throughput bound).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import h5py

FLOORS = {"random-init": "random-init encoder", "channel-stats": "channel-statistics k-NN"}


def patches_line(h5_path: Path) -> str:
    with h5py.File(h5_path, "r") as f:
        n = int(f["label"].shape[0])
        attrs = f.attrs
        ranks = int(attrs["n_ranks"])
        per_rank = [sum(stop - start for _, start, stop in ranges)
                    for ranges in json.loads(attrs["assignment"])]
        scenes = len(attrs["scene_names"])
        balance = float(attrs["balance"])
    return (f"patches: {n} written from {scenes} scenes by {ranks} MPI ranks (of {sum(per_rank)} "
            f"positions, the rest cloudy or no-data); positions per rank "
            f"{' / '.join(map(str, per_rank))}, split balance {balance:.3f} (max/mean, 1 is "
            "perfect)")


def evaluation_line(report_csv: Path) -> str:
    """OA per label fraction for the encoder and the floors; failures to beat a floor named."""
    with open(report_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    oa: dict[str, dict[float, float]] = defaultdict(dict)
    for row in rows:
        if row.get("oa"):
            enc = row["encoder"]
            name = enc if enc in FLOORS else f"{enc} ({row['mode']})"
            oa[name][float(row["fraction"])] = float(row["oa"])
    encoders = [name for name in oa if name not in FLOORS]
    if not encoders:
        return f"evaluation: no pre-trained encoder rows in {report_csv}"
    parts = []
    misses: dict[tuple[str, str], list[str]] = defaultdict(list)
    for frac in sorted({f for scores in oa.values() for f in scores}):
        cells = [f"{name} {oa[name][frac]:.3f}" for name in [*encoders, *FLOORS]
                 if frac in oa[name]]
        parts.append(f"{frac * 100:g} % labels: " + ", ".join(cells))
        for enc in encoders:
            for floor in FLOORS:
                if frac in oa[enc] and frac in oa[floor] and oa[enc][frac] <= oa[floor][frac]:
                    misses[enc, floor].append(f"{frac * 100:g} %")
    verdict = "; ".join(f"{enc} does NOT beat the {FLOORS[floor]} at {', '.join(fracs)} labels"
                        for (enc, floor), fracs in misses.items())
    verdict = verdict or "the encoder beats both floors at every fraction"
    n_test = {row.get("n_test") for row in rows} - {None, ""}
    where = f" ({n_test.pop()} test patches)" if len(n_test) == 1 else ""
    return f"evaluation, test OA{where}: {'; '.join(parts)} -> {verdict}"


def plan_line(plan_json: Path) -> str:
    plan = json.loads(plan_json.read_text())
    stages = " | ".join(f"{s['first_unit']}-{s['last_unit']}" for s in plan["stages"])
    e = plan.get("utilization_index")
    return (f"CWB plan ({plan['objective']}): {len(plan['stages'])} stages over units {stages}, "
            f"bottleneck stage {plan['bottleneck_s']:.3f} s, throughput bound "
            f"{plan['throughput_bound_per_s']:.2f} mini-batches/s, utilisation index E "
            f"{'inf' if e is None else f'{e:.2f}'}")


def summary(out: Path) -> list[str]:
    return [patches_line(out / "patches.h5"), evaluation_line(out / "eval" / "report.csv"),
            plan_line(out / "plan.json")]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/demo_summary.py DEMO_OUT", file=sys.stderr)
        return 2
    out = Path(args[0])
    missing = [p for p in ("patches.h5", "eval/report.csv", "plan.json") if not (out / p).is_file()]
    if missing:
        print(f"demo summary: {out} lacks {', '.join(missing)} (did a demo step fail?)",
              file=sys.stderr)
        return 2
    print("\n".join(summary(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
