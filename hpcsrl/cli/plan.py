"""`hpcsrl plan`: exact CWB partition (and replica) plan from a profile; never imports torch."""

from __future__ import annotations

import argparse

from hpcsrl.errors import UserError
from hpcsrl.fileio import write_json
from hpcsrl.log import get_logger
from hpcsrl.planning.costs import Cluster
from hpcsrl.planning.plan import OBJECTIVES, make_plan
from hpcsrl.planning.profile import load_profile
from hpcsrl.planning.quantities import parse_bandwidth, parse_latency, parse_sizes
from hpcsrl.planning.report import render_plan

EPILOG = """Every objective is solved exactly (times are rounded once to integer picoseconds, so
sums and comparisons are exact). Ties: the lexicographically smallest cut list wins; for
throughput the smallest (c_1, r_1, c_2, r_2, ..., r_n), i.e. earlier cuts, then fewer replicas on
earlier stages. E is infinite at perfect balance and is written as null in plan.json."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--profile", required=True, help="profile.json written by `hpcsrl profile`")
    p.add_argument("--devices", type=int, required=True,
                   help="pipeline stages = devices in one chain")
    p.add_argument("--memory", required=True,
                   help="memory budget per device: 3GiB, 3000MB, 3221225472, or a comma list "
                        "(one per device, in stage order) for a heterogeneous cluster")
    p.add_argument("--bandwidth", required=True, help="link rate: 1Gbit/s, 125MB/s, 12500000B/s")
    p.add_argument("--latency", default="0", help="per-message latency: 0.1ms, 1e-4s (default 0)")
    p.add_argument("--objective", choices=OBJECTIVES, default="utilization",
                   help="utilization: the paper's index E (default); bottleneck: slowest stage; "
                        "throughput: also choose replicas per stage for --total-devices")
    p.add_argument("--total-devices", type=int, default=None,
                   help="nodes available in all (throughput: replicas per stage sum to this; "
                        "other objectives: fixed chains of --devices nodes)")
    p.add_argument("--in-flight", type=int, default=None,
                   help="mini-batches a node may hold when its memory allows (throughput bound)")
    p.add_argument("--out", required=True, help="plan.json to write")


def run(args: argparse.Namespace) -> int:
    log = get_logger()
    profile = load_profile(args.profile)
    budgets = parse_sizes(args.memory, "--memory")
    if args.devices < 1:
        raise UserError("--devices must be at least 1")
    if len(budgets) == 1:
        budgets = budgets * args.devices
    elif len(budgets) != args.devices:
        raise UserError(f"--memory lists {len(budgets)} budgets but --devices is {args.devices}; "
                        "give one budget, or one per device in stage order")
    cluster = Cluster(tuple(budgets), parse_bandwidth(args.bandwidth),
                      parse_latency(args.latency), args.total_devices, args.in_flight)
    plan = make_plan(profile, cluster, args.objective)
    write_json(args.out, plan)
    print(render_plan(plan))
    log.info("wrote %s", args.out)
    return 0
