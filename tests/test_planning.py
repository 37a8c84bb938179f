"""CWB planner: every objective against brute force, the formulas, parsing, infeasibility, CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import subprocess
import sys
import time

import pytest

from hpcsrl.errors import UserError
from hpcsrl.planning.costs import Cluster, Costs
from hpcsrl.planning.plan import compositions, make_plan
from hpcsrl.planning.profile import Profile, UnitProfile, load_profile, profile_from_json
from hpcsrl.planning.quantities import parse_bandwidth, parse_latency, parse_size, parse_sizes
from hpcsrl.planning.report import render_plan
from hpcsrl.planning.search import search_throughput, search_utilization

# ----------------------------------------------------------------------------- helpers


def random_profile(rng: random.Random, q: int, integer_times: bool = False) -> Profile:
    units = []
    for i in range(q):
        if integer_times:
            fw, bw = rng.randint(1, 2) / 4, rng.randint(1, 2) / 4
        else:
            fw, bw = rng.uniform(0.001, 0.5), rng.uniform(0.001, 1.0)
        units.append(UnitProfile(f"u{i}", fw, bw, rng.randint(0, 400), rng.randint(0, 800),
                                 rng.randint(0, 1500), rng.randint(1, 4) * 250_000))
    return Profile("random", 8, [3, 16, 16], "sgd", units)


def stage_bounds(cuts, q):
    return [0, *cuts, q]


def brute(profile: Profile, budgets, bandwidth, latency, total=None, in_flight=None):
    """Every cut set (and replica composition) evaluated directly from the issue's formulas."""
    u, q, n = profile.units, len(profile.units), len(budgets)
    tcut = {c: u[c - 1].output_bytes / bandwidth + latency for c in range(1, q)}
    out = []
    for cuts in itertools.combinations(range(1, q), n - 1):
        b = stage_bounds(cuts, q)
        mem = [sum(x.memory_bytes for x in u[b[i]:b[i + 1]]) for i in range(n)]
        if any(m > budgets[i] for i, m in enumerate(mem)):
            continue
        t = [sum(x.forward_s + x.backward_s for x in u[b[i]:b[i + 1]]) for i in range(n)]
        x_i = [(tcut[b[i]] if b[i] > 0 else 0) + (tcut[b[i + 1]] if b[i + 1] < q else 0)
               for i in range(n)]
        t_all = sum(t) + sum(2 * tcut[c] for c in cuts)
        d = sum((ti / t_all - 1 / n) ** 2 for ti in t) / n
        e = math.inf if d == 0 else -math.log(d)
        bott = max(ti + xi for ti, xi in zip(t, x_i, strict=True))
        lat = [sum(t[i:]) + sum(2 * tcut[c] for c in cuts[i:]) for i in range(n)]
        rec = {"cuts": list(cuts), "E": e, "bottleneck": bott, "allocs": []}
        if total is not None:
            for reps in compositions(total, n):
                terms = []
                for i, r in enumerate(reps):
                    term = r / lat[i]
                    if in_flight is not None:
                        static = sum(x.param_bytes + x.state_bytes for x in u[b[i]:b[i + 1]])
                        act = sum(x.activation_bytes for x in u[b[i]:b[i + 1]])
                        k = in_flight if act == 0 else min(in_flight, (budgets[i] - static) // act)
                        term = min(k * r / lat[i], r / (t[i] + x_i[i]))
                    terms.append(term)
                rec["allocs"].append((list(reps), min(terms)))
        out.append(rec)
    return out


def best_of(values, key, maximise, rel=1e-9):
    """Brute-force optimum and the tie-break winner among (numerical) ties."""
    vals = [key(v) for v in values]
    best = max(vals) if maximise else min(vals)
    tol = rel * abs(best) if math.isfinite(best) else 0
    ties = [v for v, x in zip(values, vals, strict=True) if abs(x - best) <= tol or x == best]
    return best, ties


def interleaved(plan):
    """Throughput tie-break key: (c_1, r_1, c_2, r_2, ..., r_n) of a (cuts, replicas, _) triple."""
    return [x for pair in itertools.zip_longest(plan[0], plan[1]) for x in pair if x is not None]


def cluster(budgets, bw=2e6, lat=1e-3, total=None, in_flight=None) -> Cluster:
    return Cluster(tuple(budgets), bw, lat, total, in_flight)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", range(40))
def test_utilization_and_bottleneck_equal_brute_force(seed):
    rng = random.Random(seed)
    q, n = rng.randint(2, 11), rng.randint(1, 5)
    n = min(n, q)
    prof = random_profile(rng, q, integer_times=seed % 4 == 0)
    total_mem = prof.total_memory_bytes
    budgets = [int(total_mem * rng.uniform(1.0 / n, 1.3 / n + 0.2)) for _ in range(n)]
    bw, lat = rng.choice([1e6, 4e6, 1e8]), rng.choice([0.0, 1e-3])
    cands = brute(prof, budgets, bw, lat)
    cl = cluster(budgets, bw, lat)
    if not cands:
        with pytest.raises(UserError):
            make_plan(prof, cl, "utilization")
        return
    for objective, key, maximise in (("utilization", lambda r: r["E"], True),
                                     ("bottleneck", lambda r: r["bottleneck"], False)):
        plan = make_plan(prof, cl, objective)
        best, ties = best_of(cands, key, maximise)
        got = next(r for r in cands if r["cuts"] == plan["cuts"])  # also: plan is feasible
        assert key(got) == pytest.approx(best, rel=1e-9, abs=1e-12)
        # deterministic tie-break: lexicographically smallest cuts among the optima
        assert plan["cuts"] == min(r["cuts"] for r in ties)
        for s in plan["stages"]:
            assert s["memory_bytes"] <= s["device_memory_bytes"]
        e = plan["utilization_index"]
        assert (math.inf if e is None else e) == pytest.approx(got["E"], rel=1e-9)
        assert plan["bottleneck_s"] == pytest.approx(got["bottleneck"], rel=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_throughput_equals_brute_force(seed):
    rng = random.Random(1000 + seed)
    q = rng.randint(2, 8)
    n = min(q, rng.randint(1, 4))
    total = n + rng.randint(0, 3)
    in_flight = rng.choice([None, 1, 2, 3])
    prof = random_profile(rng, q, integer_times=seed % 3 == 0)
    budgets = [int(prof.total_memory_bytes * rng.uniform(1.0 / n, 1.5 / n + 0.3))
               for _ in range(n)]
    bw, lat = rng.choice([1e6, 1e7]), rng.choice([0.0, 2e-3])
    cands = brute(prof, budgets, bw, lat, total, in_flight)
    if not cands:
        return
    plan = make_plan(prof, cluster(budgets, bw, lat, total, in_flight), "throughput")
    flat = [(r["cuts"], reps, v) for r in cands for reps, v in r["allocs"]]
    best = max(v for *_, v in flat)
    ties = [f for f in flat if f[2] >= best * (1 - 1e-9)]
    reps = [s["replicas"] for s in plan["stages"]]
    got = next(v for c, r, v in flat if c == plan["cuts"] and r == reps)
    assert got == pytest.approx(best, rel=1e-9)
    assert plan["throughput_bound_per_s"] == pytest.approx(best, rel=1e-9)
    assert sum(reps) == total

    winner = min(ties, key=interleaved)
    assert (plan["cuts"], reps) == (winner[0], winner[1])
    # every allocation of the chosen cuts is reported with its bound
    listed = {tuple(a["replicas"]): a["throughput_bound_per_s"] for a in plan["allocations"]}
    mine = {tuple(r): v for c, r, v in flat if c == plan["cuts"]}
    assert listed.keys() == mine.keys()
    for k, v in mine.items():
        assert listed[k] == pytest.approx(v, rel=1e-9)


@pytest.mark.parametrize("seed", range(15))
def test_exact_ties_break_to_smallest_cuts(seed):
    """Quarter-second unit times and free links make many plans exactly equally good."""
    rng = random.Random(500 + seed)
    q, n = rng.randint(3, 10), rng.randint(2, 4)
    prof = random_profile(rng, q, integer_times=True)
    budgets = [prof.total_memory_bytes] * min(n, q)
    total = len(budgets) + rng.randint(0, 2)
    cands = brute(prof, budgets, 1e30, 0.0, total=total)
    cl = cluster(budgets, 1e30, 0.0, total=total)
    for objective, key, maximise in (("utilization", lambda r: r["E"], True),
                                     ("bottleneck", lambda r: r["bottleneck"], False)):
        _, ties = best_of(cands, key, maximise)
        assert make_plan(prof, cl, objective)["cuts"] == min(r["cuts"] for r in ties)
    flat = [(r["cuts"], reps, v) for r in cands for reps, v in r["allocs"]]
    best = max(v for *_, v in flat)
    winner = min((f for f in flat if f[2] >= best * (1 - 1e-9)), key=interleaved)
    plan = make_plan(prof, cl, "throughput")
    assert (plan["cuts"], [s["replicas"] for s in plan["stages"]]) == (winner[0], winner[1])


def test_utilization_formula_matches_direct_evaluation():
    units = [UnitProfile(f"u{i}", t, 2 * t, 10, 20, 30, 1000 * (i + 1))
             for i, t in enumerate([0.3, 0.1, 0.4, 0.2, 0.5])]
    prof = Profile("m", 4, [3, 8, 8], "sgd", units)
    plan = make_plan(prof, cluster([10**6] * 3, bw=1e5, lat=1e-3), "utilization")
    b = stage_bounds(plan["cuts"], 5)
    t = [sum(3 * x for x in [0.3, 0.1, 0.4, 0.2, 0.5][b[i]:b[i + 1]]) for i in range(3)]
    tt = sum(2 * (1000 * c / 1e5 + 1e-3) for c in plan["cuts"])
    t_all = sum(t) + tt
    e = -math.log(sum((x / t_all - 1 / 3) ** 2 for x in t) / 3)
    assert plan["utilization_index"] == pytest.approx(e, rel=1e-12)
    assert plan["stages"][0]["transfer_s"] == pytest.approx(1000 * b[1] / 1e5 + 1e-3)


def test_perfect_balance_gives_infinite_index_and_null_in_json():
    units = [UnitProfile(f"u{i}", 0.25, 0.25, 1, 2, 3, 0) for i in range(6)]
    prof = Profile("m", 1, [1, 1, 1], "sgd", units)
    plan = make_plan(prof, cluster([100] * 3, bw=1e9, lat=0.0), "utilization")
    assert plan["cuts"] == [2, 4] and plan["utilization_index"] is None
    json.dumps(plan, allow_nan=False)  # valid JSON (no Infinity)


def test_paper_table5_times_make_321_the_best_use_of_six_nodes():
    times = [1.036, 1.140, 0.922]  # Lite-SRL ResNet-18 partitions on TX2 (paper Table 5, ms->s)
    units = [UnitProfile(f"p{i + 1}", t / 3, 2 * t / 3, 1, 1, 1, 0) for i, t in enumerate(times)]
    prof = Profile("paper", 64, [3, 224, 224], "sgd", units)
    plan = make_plan(prof, cluster([10] * 3, bw=1e9, lat=0.0, total=6), "throughput")
    assert [s["replicas"] for s in plan["stages"]] == [3, 2, 1]
    bounds = {tuple(a["replicas"]): a["throughput_bound_per_s"] for a in plan["allocations"]}
    assert len(bounds) == 10  # C(5, 2) compositions of six nodes over three stages
    assert bounds[(3, 2, 1)] == pytest.approx(min(3 / sum(times), 2 / sum(times[1:]), 1 / 0.922))
    assert bounds[(2, 2, 2)] == pytest.approx(2 / sum(times))
    assert plan["fixed_chains_bound_per_s"] == bounds[(2, 2, 2)]
    assert max(bounds, key=bounds.get) == (3, 2, 1)


def test_throughput_replica_ties_give_fewer_nodes_to_earlier_stages():
    # a free first stage has L_1 = L_2 = 2 s, so 2/1/1, 1/2/1 and 1/1/2 all bound at 0.5/s
    units = [UnitProfile("a", 0.0, 0.0, 1, 1, 1, 0), UnitProfile("b", 0.5, 0.5, 1, 1, 1, 0),
             UnitProfile("c", 0.5, 0.5, 1, 1, 1, 0)]
    plan = make_plan(Profile("m", 1, [1], "sgd", units),
                     cluster([10] * 3, bw=1e9, lat=0.0, total=4), "throughput")
    assert [s["replicas"] for s in plan["stages"]] == [1, 1, 2]
    bounds = {tuple(a["replicas"]): a["throughput_bound_per_s"] for a in plan["allocations"]}
    assert bounds[(2, 1, 1)] == bounds[(1, 2, 1)] == bounds[(1, 1, 2)] == pytest.approx(0.5)


def test_in_flight_uses_memory_headroom():
    # one stage per unit; stage 2 has room for 3 batches of activations, stage 1 for 1
    units = [UnitProfile("a", 0.5, 0.5, 10, 20, 70, 0), UnitProfile("b", 0.5, 0.5, 10, 20, 10, 0)]
    prof = Profile("m", 1, [1], "sgd", units)
    plan = make_plan(prof, cluster([100, 60], bw=1e9, lat=0.0, total=2, in_flight=3),
                     "throughput")
    assert [s["in_flight"] for s in plan["stages"]] == [1, 3]
    assert plan["throughput_bound_per_s"] == pytest.approx(min(1 / 2.0, 1 / 1.0, 3 / 1.0))


def test_heterogeneous_budgets_in_stage_order():
    units = [UnitProfile(f"u{i}", 0.1, 0.1, 100, 0, 0, 8) for i in range(6)]
    prof = Profile("m", 1, [1], "sgd", units)
    plan = make_plan(prof, cluster([100, 500], bw=1e9, lat=0.0), "utilization")
    assert plan["cuts"] == [1]  # the small first device fits only one unit
    plan = make_plan(prof, cluster([500, 100], bw=1e9, lat=0.0), "bottleneck")
    assert plan["cuts"] == [5]


def test_infeasible_names_devices_and_budget():
    units = [UnitProfile(f"u{i}", 0.1, 0.1, 1000, 0, 0, 8) for i in range(6)]
    prof = Profile("m", 1, [1], "sgd", units)
    with pytest.raises(UserError, match=r"--devices 3 or more.*at least --memory 3000B"):
        make_plan(prof, cluster([2500, 2500], bw=1e9), "utilization")
    with pytest.raises(UserError, match=r"6 units are too big alone, the largest unit 0 \(u0\) "
                                        r"with 1000 B, so no device count works at 500 B"):
        make_plan(prof, cluster([500, 500], bw=1e9), "bottleneck")
    with pytest.raises(UserError, match="--total-devices"):
        make_plan(prof, cluster([6000, 6000], bw=1e9, total=1), "throughput")


def test_exact_search_is_fast_for_64_units_and_8_devices():
    rng = random.Random(7)
    prof = random_profile(rng, 64)
    budgets = [int(prof.total_memory_bytes / 6)] * 8
    costs = Costs(prof, 1e6, 1e-4)
    start = time.process_time()
    cuts, _ = search_utilization(costs, budgets)
    elapsed = time.process_time() - start
    assert len(cuts) == 7
    print(f"utilization 64x8: {elapsed:.3f} s CPU")  # reported, not asserted (shared machine)


@pytest.mark.slow
def test_throughput_search_64_units_8_stages_12_nodes():
    rng = random.Random(8)
    prof = random_profile(rng, 64)
    costs = Costs(prof, 1e6, 1e-4)
    cuts, reps, _ = search_throughput(costs, [prof.total_memory_bytes] * 8, 12)
    assert len(cuts) == 7 and sum(reps) == 12


# ----------------------------------------------------------------------------- parsing, files


@pytest.mark.parametrize("text,value", [("3221225472", 3221225472), ("3GiB", 3 * 2**30),
                                        ("3000MB", 3 * 10**9), ("2.5 GB", 2_500_000_000),
                                        ("1KiB", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_sizes_list_bandwidth_latency():
    assert parse_sizes("3GiB,2GiB") == [3 * 2**30, 2 * 2**30]
    assert parse_bandwidth("1Gbit/s") == 125e6
    assert parse_bandwidth("125MB/s") == 125e6
    assert parse_bandwidth("12500000B/s") == 12.5e6
    assert parse_latency("0.1ms") == pytest.approx(1e-4)
    assert parse_latency("1e-4s") == pytest.approx(1e-4)
    for bad, fn in (("3 apples", parse_size), ("1G", parse_bandwidth), ("fast", parse_latency),
                    ("100/s", parse_bandwidth)):
        with pytest.raises(UserError):
            fn(bad)


def test_profile_validation_names_file_and_field(tmp_path):
    good = random_profile(random.Random(1), 3).to_json()
    assert profile_from_json(good).units[0].name == "u0"
    bad = json.loads(json.dumps(good))
    bad["units"][1]["forward_s"] = -1
    with pytest.raises(UserError, match=r"units\[1\]\.forward_s"):
        profile_from_json(bad, where="x.json")
    del bad["units"][2]["output_bytes"]
    p = tmp_path / "p.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="p.json"):
        load_profile(p)
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


def test_render_plan_table_mentions_everything():
    prof = random_profile(random.Random(2), 6)
    plan = make_plan(prof, cluster([prof.total_memory_bytes] * 3, total=5), "throughput")
    text = render_plan(plan)
    for word in ("stage", "u0", "replicas", "E =", "bottleneck", "throughput bound"):
        assert word in text


def test_plan_cli_end_to_end_without_torch(tmp_path):
    prof = random_profile(random.Random(3), 8)
    ppath, out = tmp_path / "profile.json", tmp_path / "plan.json"
    ppath.write_text(json.dumps(prof.to_json()))
    code = ("import sys; from hpcsrl.cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'plan imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "plan", "--profile", str(ppath),
                           "--devices", "3", "--memory", "1MiB", "--bandwidth", "100Mbit/s",
                           "--latency", "0.1ms", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert plan["objective"] == "utilization" and len(plan["stages"]) == 3
    assert "stage" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hpcsrl.cli.main", "plan", "--profile",
                           str(ppath), "--devices", "3", "--memory", "10B", "--bandwidth",
                           "1Gbit/s", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "error" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_unit_too_big_for_any_device_is_named():
    units = [UnitProfile(f"u{i}", 0.1, 0.1, 100, 0, 0, 8) for i in range(5)]
    units[3] = UnitProfile("layer3.big", 0.1, 0.1, 5000, 0, 0, 8)
    prof = Profile("m", 1, [1], "sgd", units)
    for objective in ("utilization", "bottleneck", "throughput"):
        with pytest.raises(UserError, match=r"unit 3 \(layer3\.big\) alone needs 4\.88 KiB, so no "
                                            r"device count works at 1000 B") as info:
            make_plan(prof, cluster([1000, 1000], bw=1e9), objective)
        assert "units are too big" not in str(info.value)  # only one unit is too big


def run_plan_cli(tmp_path, profile_json: dict, *options: str) -> subprocess.CompletedProcess:
    ppath = tmp_path / "profile.json"
    ppath.write_text(json.dumps(profile_json))
    return subprocess.run([sys.executable, "-m", "hpcsrl.cli.main", "plan", "--profile",
                           str(ppath), "--out", str(tmp_path / "plan.json"), *options],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("change,options,needle", [
    ({}, ("--bandwidth", "1e-300B/s"), r"--bandwidth 1e-300 B/s, sending the \d+ B output of "
                                       r"units\[\d\] \(u\d\) takes [0-9.e+]+ s, beyond"),
    ({}, ("--bandwidth", "1e400B/s"), "--bandwidth: bandwidth '1e400B/s' is too large"),
    ({}, ("--latency", "1e300"), r"--latency 1e\+300 s: give a latency in \[0, 1e\+12\] s"),
    ({}, ("--latency", "1e400s"), "--latency: time '1e400s' is too large"),
    ({}, ("--memory", "1e400"), "--memory: size '1e400' is too large"),
    ({"forward_s": 1e300}, (), r"units\[2\]\.forward_s must be a number of seconds in "
                               r"\[0, 1e\+12\], got 1e\+300"),
    ({"output_bytes": 10**400}, (), r"units\[2\]\.output_bytes must be an integer number of bytes"),
])
def test_plan_cli_refuses_extreme_values_in_one_line(tmp_path, change, options, needle):
    """Finite but absurd inputs once died with an OverflowError traceback."""
    prof = random_profile(random.Random(3), 5).to_json()
    prof["units"][2].update(change)
    args = {"--devices": "2", "--memory": "1GiB", "--bandwidth": "1Gbit/s", "--latency": "0"}
    args.update(dict(zip(options[::2], options[1::2], strict=True)))
    proc = run_plan_cli(tmp_path, prof, *itertools.chain.from_iterable(args.items()))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.search(needle, lines[0]), lines[0]
    assert not (tmp_path / "plan.json").exists()


def test_extreme_but_plannable_values_give_a_plan():
    """The largest times the planner accepts still give an exact plan with finite figures."""
    units = [UnitProfile(f"u{i}", 1e12 if i == 1 else 1e-300, 0.0, 10, 0, 0, 10**18)
             for i in range(4)]
    prof = Profile("m", 1, [1], "sgd", units)
    # 1e18 B at 1e7 B/s plus 1e11 s latency: 2e11 s per message, below the 1e12 s limit
    plan = make_plan(prof, cluster([10**300] * 2, bw=1e7, lat=1e11), "throughput")
    assert plan["cuts"] and math.isfinite(plan["throughput_bound_per_s"])
    assert "stage" in render_plan(plan)
