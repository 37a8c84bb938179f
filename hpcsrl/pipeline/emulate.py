"""Emulated stages: a cluster of slower nodes on a small machine, with the real runtime.

`EmulatedStage` implements `StageCompute` by sleeping its units' profiled forward and backward
times (x `--time-scale`, x the rank's `--slowdown`) and by producing and consuming real tensors of
the profiled cut sizes, so the transport, scheduler, aggregation and report run unchanged while
no model, weights or data exist. Sleeping instead of computing keeps the figures independent of
how loaded the machine's cores are, which is what lets six "nodes" share two cores.

What crosses a cut is one tensor of `units[c-1].output_bytes` each way (activation forward, its
gradient back): the planner's transfer model (`planning/costs.py`) counts the same message. The
first and last element carry the mini-batch id, and every receiver checks them, so a message
delivered to the wrong mini-batch fails loudly instead of passing silently. The replicas' state
is a parameter and a momentum tensor of the stage's profiled parameter bytes, so aggregation moves
as many bytes as the real model would. With a trace folder each rank appends one CSV row per
mini-batch (monotonic clock, shared by the processes of one machine): when the forward and the
backward started and ended, from which transfer and stage times follow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from hpcsrl.errors import UserError
from hpcsrl.pipeline.cuts import CutSpec, TensorSpec

TRACE_FIELDS = ("mb", "rank", "stage", "forward_start", "forward_end", "backward_start",
                "backward_end")
MAX_FACTOR = 1e6  # a time-scale or slowdown beyond this is a typo, not a cluster
# An emulated interval ends at a deadline: one sleep that stops SPIN_S early, then the rank stays
# on the CPU (yielding the GIL) until the deadline. One plain sleep overshot by 1-1.5 ms on
# average on the loaded shared machine (a woken process can wait for a core for milliseconds),
# about 1 % of a 620 ms chain, which the runs then counted as the cluster's time; spinning the
# last SPIN_S costs about that much CPU per interval.
SPIN_S = 1.5e-3
PR_SET_TIMERSLACK = 29  # prctl option (linux/prctl.h)


@dataclass(frozen=True)
class StageTimes:
    """What one emulated stage does per mini-batch (seconds at time-scale 1, bytes)."""

    forward_s: float
    backward_s: float
    out_bytes: int     # the cut after the stage (0 on the last stage)
    param_bytes: int   # parameters (and as many momentum bytes) averaged between replicas


def stage_times(units: Sequence[Any], plan_stages: Sequence[dict[str, Any]]) -> list[StageTimes]:
    """Each plan stage's summed unit times and its cut's size, from profile units (objects with
    forward_s, backward_s, output_bytes, param_bytes)."""
    out = []
    for i, s in enumerate(plan_stages):
        a, b = int(s["first_unit"]), int(s["last_unit"]) + 1
        us = units[a:b]
        out.append(StageTimes(sum(u.forward_s for u in us), sum(u.backward_s for u in us),
                              int(units[b - 1].output_bytes) if i < len(plan_stages) - 1 else 0,
                              sum(int(u.param_bytes) for u in us)))
    return out


def cut_spec(nbytes: int) -> CutSpec:
    """One tensor of exactly `nbytes` (float32 when it divides, bytes otherwise) that carries a
    gradient back, as the planner counts a cut."""
    if nbytes < 1:
        raise UserError(f"a cut of {nbytes} bytes cannot be sent: every unit the plan cuts "
                        "after needs output_bytes >= 1 in the profile")
    if nbytes % 4 == 0:
        return CutSpec((TensorSpec((nbytes // 4,), torch.float32, False, True),), False)
    return CutSpec((TensorSpec((nbytes,), torch.uint8, False, True),), False)


def _mark(t: Tensor, mb: int) -> None:
    v = mb % (256 if t.dtype == torch.uint8 else 2**24)
    t[0] = v
    t[-1] = v


def _check(ts: Sequence[Tensor], mb: int, what: str) -> None:
    for t in ts:
        want = mb % (256 if t.dtype == torch.uint8 else 2**24)
        if int(t[0]) != want or int(t[-1]) != want:
            raise RuntimeError(f"emulated {what} for mini-batch {mb} carries mini-batch "
                               f"{int(t[0])}/{int(t[-1])}: the transport mixed messages up")


class EmulatedStage:
    """A `StageCompute` that sleeps `forward_s` / `backward_s` (already scaled) per mini-batch.

    `trace` (optional) receives one CSV row per mini-batch; `sleep`, `clock` and `spin_s` (the
    last part of each interval spent on the CPU, 0: one plain sleep) are injectable for tests.
    """

    def __init__(self, forward_s: float, backward_s: float, in_spec: CutSpec | None,
                 out_spec: CutSpec | None, param_bytes: int = 0, *, rank: int = 0,
                 stage: int = 0, trace: IO[str] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, spin_s: float = SPIN_S) -> None:
        if not (forward_s >= 0 and backward_s >= 0):
            raise ValueError("emulated times must be >= 0")
        self.forward_s, self.backward_s = forward_s, backward_s
        self.in_spec, self.out_spec = in_spec, out_spec
        self.loss: float | None = None
        self.rank, self.stage, self.trace = rank, stage, trace
        self._sleep, self._clock, self._spin_s = sleep, clock, spin_s
        self._out = [s.empty().zero_() for s in out_spec.tensors] if out_spec else None
        self._back = ([s.empty().zero_() for s in in_spec.grad_specs()] if in_spec else None)
        n = max(1, param_bytes // 4) if param_bytes else 0
        self._state = [torch.zeros(n), torch.zeros(n)] if n else []
        self._mb = -1
        self._row: list[float] = []
        if trace is not None and trace.tell() == 0:
            trace.write(",".join(TRACE_FIELDS) + "\n")

    def forward(self, mb: int, inputs: list[Tensor] | None) -> list[Tensor] | None:
        t0 = self._clock()
        if self.in_spec is not None:
            if inputs is None or len(inputs) != len(self.in_spec.tensors):
                raise RuntimeError(f"emulated stage {self.stage} expects "
                                   f"{len(self.in_spec.tensors)} input tensors")
            _check(inputs, mb, "activation")
        self._mb = mb
        self._sleep_until(t0 + self.forward_s)
        self._row = [t0, self._clock()]
        if self._out is None:
            self.loss = None  # no loss is emulated (the report's loss stays empty)
            return None
        for t in self._out:
            _mark(t, mb)
        return self._out

    def backward(self, grads: list[Tensor] | None) -> list[Tensor] | None:
        t0 = self._clock()
        if self.out_spec is not None:
            if grads is None or len(grads) != len(self.out_spec.grad_specs()):
                raise RuntimeError(f"emulated stage {self.stage} expects "
                                   f"{len(self.out_spec.grad_specs())} gradient tensors")
            _check(grads, self._mb, "gradient")
        self._sleep_until(t0 + self.backward_s)
        self._row += [t0, self._clock()]
        if self._back is None:
            return None
        for t in self._back:
            _mark(t, self._mb)
        return self._back

    def _sleep_until(self, deadline: float) -> None:
        left = deadline - self._clock()
        if left > self._spin_s:
            self._sleep(left - self._spin_s)
            left = deadline - self._clock()
        while left > 0:  # sleep(0) returns at once but lets another thread take the GIL
            self._sleep(0.0 if self._spin_s > 0 else left)
            left = deadline - self._clock()

    def step(self, mb: int) -> None:
        if self.trace is not None and len(self._row) == 4:
            self.trace.write(f"{mb},{self.rank},{self.stage},"
                             + ",".join(f"{v:.6f}" for v in self._row) + "\n")
        self._row = []

    def state(self) -> list[Tensor]:
        return self._state

    def counters(self) -> list[Tensor]:
        return []


# --- options and the run description ---------------------------------------------------------
def _factor(text: str, what: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a number") from None
    if not (math.isfinite(f) and 0 < f <= MAX_FACTOR):
        raise UserError(f"{what} must be a positive number up to {MAX_FACTOR:g}, got {text}")
    return f


def parse_time_scale(text: str | float) -> float:
    return _factor(str(text), "--time-scale")


def parse_slowdown(items: Sequence[str]) -> dict[int, float]:
    """`["5=2", "0=1.5"]` -> {5: 2.0, 0: 1.5}: that rank's emulated times are multiplied."""
    out: dict[int, float] = {}
    for item in items:
        rank, sep, factor = item.partition("=")
        if not sep or not rank.strip().isdigit():
            raise UserError(f"--slowdown {item!r}: expected RANK=FACTOR, e.g. --slowdown 5=2")
        r = int(rank)
        if r in out:
            raise UserError(f"--slowdown gives rank {r} twice")
        out[r] = _factor(factor, f"--slowdown {item}")
    return out


def check_emulated_run(o: Any, size: int) -> dict[str, Any]:
    """The run description of `hpcsrl dhp --emulate` (same keys the runtime reads as for a real
    run, plus "emulate"); raises UserError in one line. `o` is a `DhpOptions`."""
    from hpcsrl.pipeline.run import _read_plan
    from hpcsrl.planning.profile import load_profile
    from hpcsrl.train.lock import RunLock
    from hpcsrl.train.loop import PretrainConfig

    if o.resume or o.epochs is not None:
        raise UserError("--emulate runs have no data or checkpoints: give --iterations N "
                        "(no --epochs, no --resume)")
    if o.iterations is None or o.iterations < 1:
        raise UserError("--emulate needs --iterations N (N >= 1)")
    if o.aggregate_every < 1 or o.timeout <= 0:
        raise UserError("--aggregate-every must be at least 1 and --timeout positive")
    scale = parse_time_scale(o.time_scale)
    plan = _read_plan(o.plan)
    replicas = [int(s["replicas"]) for s in plan["stages"]]
    if size != sum(replicas):
        raise UserError(f"--plan {o.plan} needs {sum(replicas)} ranks "
                        f"({'/'.join(map(str, replicas))} replicas per stage) but this run has "
                        f"{size}: start it with mpirun -np {sum(replicas)}")
    bad = sorted(r for r in o.slowdown if not 0 <= r < size)
    if bad:
        raise UserError(f"--slowdown names rank {bad[0]}, but ranks are 0..{size - 1}")
    profile = load_profile(o.emulate)
    names = [u.name for u in profile.units]
    stages = plan["stages"]
    fits = (int(stages[0]["first_unit"]) == 0 and int(stages[-1]["last_unit"]) == len(names) - 1
            and all(int(a["last_unit"]) + 1 == int(b["first_unit"])
                    for a, b in zip(stages, stages[1:], strict=False))
            and all(s.get("first_name", names[int(s["first_unit"])]) == names[int(s["first_unit"])]
                    and s.get("last_name", names[int(s["last_unit"])]) == names[int(s["last_unit"])]
                    for s in stages if int(s["last_unit"]) < len(names)))
    if not fits or (plan.get("model") and profile.model and plan["model"] != profile.model):
        raise UserError(f"--plan {o.plan} was not made from --emulate {o.emulate} "
                        f"({profile.model or 'no model name'}, {len(names)} units): plan that "
                        "profile with `hpcsrl plan --profile`")
    times = stage_times(profile.units, stages)
    for t in times[:-1]:
        cut_spec(t.out_bytes)  # refuses an empty cut now, not on a rank
    total = o.iterations
    end = total
    if o.stop_after is not None:
        end = min(total, max(1, math.ceil(o.stop_after / o.aggregate_every)) * o.aggregate_every)
    out = Path(o.out)
    lock = RunLock(out).acquire()
    probe = out / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        lock.release()
        raise UserError(f"--out {out}: not writable ({exc.strerror})") from None
    cfg = PretrainConfig(batch_size=max(2, profile.batch_size), epochs=1, progress=False)
    return {
        "plan": plan, "replicas": replicas, "cuts": [int(s["first_unit"]) for s in stages[1:]],
        "n_units": len(names), "config": None, "cfg": asdict(cfg), "record": {},
        "steps_per_epoch": total, "total": total, "first": 0, "end": end, "resume_from": None,
        "history": [], "data": None, "band_names": [], "sensor": None,
        "emulate": {"profile": str(o.emulate), "time_scale": scale,
                    "slowdown": {int(r): f for r, f in o.slowdown.items()},
                    "stages": [asdict(t) for t in times], "trace_dir": str(out)},
        "lock": lock}


def fine_timers() -> None:
    """Ask Linux for 1 us timer slack in this process (threads started later inherit it): the
    default 50 us is added to every sleep, the emulated ones and the runtime's polls alike.
    Best effort: elsewhere sleeps only end a little later."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def emulated_stage(spec: dict[str, Any], stage: int, rank: int) -> EmulatedStage:
    """This rank's `EmulatedStage` from the run description of `check_emulated_run`."""
    fine_timers()
    em = spec["emulate"]
    times = [StageTimes(**t) for t in em["stages"]]
    t = times[stage]
    f = em["time_scale"] * em["slowdown"].get(rank, 1.0)
    in_spec = cut_spec(times[stage - 1].out_bytes) if stage > 0 else None
    out_spec = cut_spec(t.out_bytes) if stage < len(times) - 1 else None
    trace = None
    if em.get("trace_dir"):
        trace = (Path(em["trace_dir"]) / f"emulate_trace_rank{rank}.csv").open(
            "w", buffering=1)
    return EmulatedStage(t.forward_s * f, t.backward_s * f, in_spec, out_spec, t.param_bytes,
                         rank=rank, stage=stage, trace=trace)
