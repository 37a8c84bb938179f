"""Write the hand-made emulation profiles of the paper's cluster (Tables 5-6) from its numbers.

The paper gives one time per partition node and iteration (Table 6: 1036 / 1140 / 922 ms for
partitions {p1,p2}, {p3..p7}, {p8..p28} of Lite-SRL/ResNet-18, batch 64) and nothing finer. We
split each into forward and backward in the proportions our own measured profile of the same
model gives for the same units (`benchmarks/cwb/results/profile_resnet18.json`, 224 px, batch 64,
this CPU): forward 58.0 % / 38.7 % / 29.3 % (backward the rest). The throughput bound does not
depend on this split (a node holds a mini-batch from its forward to its own backward), the order
of events in a chain does.

Cut sizes: the paper gives none, and its per-node times cannot include moving the real 224-px
activations (411 MB at p2|p3, 51 MB at p7|p8: 3.3 s and 0.4 s at 1 Gbit/s, more than the nodes'
whole iteration). The profile sends 1/100 of them (4.1 MB and 0.51 MB) so that, at the
benchmarks' time-scale, transfers through shared memory stay a small part of a stage's time
while the rate-limited links benchmark still sees them. Parameter, state and activation bytes
are our measured ones for the same units (aggregation moves real parameter-sized tensors).

Table 7 (Lite-SRL with ResNet-34, batch 64, and ResNet-50, batch 32, 224 px): unit times measured
here by `hpcsrl profile` at batch 4 per view (a full-batch timing of every unit takes tens of
minutes on this shared 2-core machine) and scaled linearly to the paper's batch; memory and cut
bytes as measured at the paper's batch by the same profiler (`benchmarks/cwb/results/
profile_<backbone>.json`); cut bytes / 100 as above.

    python benchmarks/dhp/profiles/make_profiles.py      # writes paper_table5.json here
    python benchmarks/dhp/profiles/make_profiles.py --table7 DIR   # + lite-srl_resnet34/50.json
        (DIR holds profile_resnet34_b4.json / profile_resnet50_b4.json from
         hpcsrl profile --backbone B --input-size 224 --batch-size 4 --repeats 3 --threads 1)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MEASURED = REPO / "benchmarks" / "cwb" / "results" / "profile_resnet18.json"
PAPER_NODE_S = (1.036, 1.140, 0.922)       # Table 6, per node and iteration
PAPER_PARTITIONS = ((0, 2), (2, 7), (7, 28))  # units p1-p2, p3-p7, p8-p28 (0-based, end excl.)
CUT_DIVISOR = 100


def paper_profile(measured: dict) -> dict:
    units = measured["units"]
    out = []
    for i, ((a, b), node_s) in enumerate(zip(PAPER_PARTITIONS, PAPER_NODE_S, strict=True)):
        us = units[a:b]
        f = sum(u["forward_s"] for u in us)
        share = f / (f + sum(u["backward_s"] for u in us))
        last = i == len(PAPER_PARTITIONS) - 1
        out.append({
            "name": f"partition{i + 1}",
            "forward_s": round(node_s * share, 6),
            "backward_s": round(node_s * (1 - share), 6),
            "param_bytes": sum(u["param_bytes"] for u in us),
            "state_bytes": sum(u["state_bytes"] for u in us),
            "activation_bytes": sum(u["activation_bytes"] for u in us),
            "output_bytes": 4 if last else us[-1]["output_bytes"] // CUT_DIVISOR,
        })
    return {"model": "paper Table 6 nodes (Lite-SRL/ResNet-18)", "batch_size": 64,
            "input_shape": [3, 224, 224], "optimizer": "sgd", "units": out,
            "source": "Lite-SRL paper Table 6 per-node times; forward share, bytes from "
                      "benchmarks/cwb/results/profile_resnet18.json; cut bytes / 100"}


def table7_profile(timed: dict, memory: dict) -> dict:
    """Times of `timed` x (memory's batch / timed's batch), bytes of `memory`, cut bytes / 100."""
    if len(timed["units"]) != len(memory["units"]):
        raise SystemExit(f"{timed['model']}: the timed and the memory profile list other units")
    # (the memory profile predates one rename in the head: projector.relu3 -> stop_grad; the
    # units are the same ones, position by position; names follow the current model)
    k = memory["batch_size"] / timed["batch_size"]
    units = []
    for t, m in zip(timed["units"], memory["units"], strict=True):
        units.append({**m, "name": t["name"], "forward_s": t["forward_s"] * k,
                      "backward_s": t["backward_s"] * k,
                      "output_bytes": max(4, m["output_bytes"] // CUT_DIVISOR)})
    return {"model": memory["model"], "batch_size": memory["batch_size"],
            "input_shape": memory["input_shape"], "optimizer": memory["optimizer"],
            "units": units,
            "source": f"times: hpcsrl profile at batch {timed['batch_size']} x {k:g}; bytes: "
                      f"benchmarks/cwb/results at batch {memory['batch_size']}; cut bytes / 100"}


def main() -> int:
    ap = argparse.ArgumentParser(description="write the emulation profiles")
    ap.add_argument("--table7", type=Path, default=None,
                    help="folder with profile_resnet34_b4.json and profile_resnet50_b4.json")
    a = ap.parse_args()
    if a.table7 is not None:
        for b in ("resnet34", "resnet50"):
            timed = json.loads((a.table7 / f"profile_{b}_b4.json").read_text())
            memory = json.loads((MEASURED.parent / f"profile_{b}.json").read_text())
            prof = table7_profile(timed, memory)
            path = HERE / f"lite-srl_{b}.json"
            path.write_text(json.dumps(prof, indent=1) + "\n")
            total = sum(u["forward_s"] + u["backward_s"] for u in prof["units"])
            print(f"wrote {path}: {total:.1f} s per mini-batch of {prof['batch_size']}")
    measured = json.loads(MEASURED.read_text())
    prof = paper_profile(measured)
    for u in prof["units"]:
        share = u["forward_s"] / (u["forward_s"] + u["backward_s"])
        print(f"{u['name']}: forward {u['forward_s'] * 1e3:.1f} ms + backward "
              f"{u['backward_s'] * 1e3:.1f} ms (forward share {share:.3f}), "
              f"cut {u['output_bytes'] / 1e6:.2f} MB")
    path = HERE / "paper_table5.json"
    path.write_text(json.dumps(prof, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
