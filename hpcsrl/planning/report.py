"""A plan as a readable text table (what `hpcsrl plan` prints)."""

from __future__ import annotations

from typing import Any

from hpcsrl.planning.quantities import format_bytes, format_seconds

MAX_ALLOCATION_ROWS = 10


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return lines


def render_plan(plan: dict[str, Any]) -> str:
    """Stage table (units, compute, transfer, memory / budget, replicas) and the plan's indices."""
    rows = []
    for i, s in enumerate(plan["stages"]):
        units = f"{s['first_unit']}..{s['last_unit']}"
        if "first_name" in s:
            units += f" ({s['first_name']} .. {s['last_name']})"
        memory = f"{format_bytes(s['memory_bytes'])} / {format_bytes(s['device_memory_bytes'])}"
        rows.append([str(i), units, format_seconds(s["compute_s"]), format_seconds(s["transfer_s"]),
                     memory, str(s["replicas"])])
    lines = [f"CWB plan ({plan['objective']}) for {plan.get('model') or 'model'}, "
             f"cuts {plan['cuts']}"]
    lines += _table(["stage", "units", "compute", "transfer", "memory / budget", "replicas"], rows)
    e = plan["utilization_index"]
    lines.append(f"utilisation index E = {'inf (perfect balance)' if e is None else f'{e:.4f}'}")
    lines.append(f"bottleneck stage time = {format_seconds(plan['bottleneck_s'])}")
    lines.append(f"throughput bound = {plan['throughput_bound_per_s']:.4f} mini-batches/s")
    allocs = plan.get("allocations")
    if allocs:
        lines.append(f"replica allocations of {plan['total_devices']} nodes for these cuts "
                     f"({len(allocs)} listed in the JSON, best first):")
        for a in allocs[:MAX_ALLOCATION_ROWS]:
            lines.append(f"  {'/'.join(map(str, a['replicas']))}: "
                         f"{a['throughput_bound_per_s']:.4f} mini-batches/s")
        if "fixed_chains_bound_per_s" in plan:
            lines.append(f"  fixed chains ({plan['total_devices'] // len(plan['stages'])} per "
                         f"stage): {plan['fixed_chains_bound_per_s']:.4f} mini-batches/s")
    return "\n".join(lines)
