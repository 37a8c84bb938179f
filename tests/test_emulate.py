"""Emulated DHP stages without MPI: profiled sleeps, exact cut sizes, tagged tensors, the checks."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hpcsrl.errors import UserError
from hpcsrl.pipeline.emulate import (
    EmulatedStage,
    StageTimes,
    check_emulated_run,
    cut_spec,
    emulated_stage,
    parse_slowdown,
    parse_time_scale,
    stage_times,
)
from hpcsrl.planning.profile import UnitProfile


class FakeClock:
    """`sleep` advances `now`; records every sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


def _unit(name: str, f: float, b: float, out: int, params: int = 0) -> UnitProfile:
    return UnitProfile(name, f, b, params, 2 * params, 0, out)


UNITS = [_unit("u0", 0.1, 0.2, 4000, 40), _unit("u1", 0.3, 0.4, 1001, 8),
         _unit("u2", 0.5, 0.6, 12, 400), _unit("u3", 0.05, 0.05, 4)]
STAGES = [{"first_unit": 0, "last_unit": 0, "replicas": 2},
          {"first_unit": 1, "last_unit": 2, "replicas": 1},
          {"first_unit": 3, "last_unit": 3, "replicas": 1}]


def test_cut_spec_has_exactly_the_profiled_bytes() -> None:
    for n in (4, 4000, 1001, 7):
        spec = cut_spec(n)
        assert spec.nbytes == n and spec.grad_nbytes == n and len(spec.tensors) == 1
        assert spec.tensors[0].dtype == (torch.float32 if n % 4 == 0 else torch.uint8)
    with pytest.raises(UserError, match="output_bytes"):
        cut_spec(0)


def test_stage_times_sum_units_and_take_the_cut_after_the_stage() -> None:
    t = stage_times(UNITS, STAGES)
    assert t[0] == StageTimes(0.1, 0.2, 4000, 40)
    assert t[1].forward_s == pytest.approx(0.8) and t[1].backward_s == pytest.approx(1.0)
    assert (t[1].out_bytes, t[1].param_bytes) == (12, 408)
    assert t[2].out_bytes == 0  # the last stage sends nothing on


def _chain(clock: FakeClock, trace: io.StringIO | None = None) -> list[EmulatedStage]:
    t = stage_times(UNITS, STAGES)
    specs = [cut_spec(x.out_bytes) for x in t[:-1]]
    return [EmulatedStage(x.forward_s, x.backward_s, specs[i - 1] if i else None,
                          specs[i] if i < len(t) - 1 else None, x.param_bytes, rank=i, stage=i,
                          trace=trace, sleep=clock.sleep, clock=clock.clock, spin_s=0)
            for i, x in enumerate(t)]


def test_a_chain_of_emulated_stages_sleeps_its_profile_and_passes_tagged_tensors() -> None:
    clock, trace = FakeClock(), io.StringIO()
    chain = _chain(clock, trace)
    for mb in (0, 1, 300):
        h = None
        for st in chain:
            h = st.forward(mb, h)
            if h is not None:  # what the receiver gets is a copy, as through MPI
                h = [t.clone() for t in h]
        g = None
        for st in reversed(chain):
            g = st.backward(g)
            st.step(mb)
            if g is not None:
                g = [t.clone() for t in g]
        assert g is None
    # per mini-batch: forwards in stage order, then backwards in reverse order
    one = [0.1, 0.8, 0.05, 0.05, 1.0, 0.2]
    assert clock.sleeps == pytest.approx(one * 3)
    lines = trace.getvalue().splitlines()
    assert lines[0].startswith("mb,rank,stage,forward_start")
    assert len(lines) == 1 + 3 * 3
    mb, rank, stage, fs, fe, bs, be = (float(v) for v in lines[1].split(","))
    assert (mb, rank, stage) == (0, 2, 2) and fe - fs == pytest.approx(0.05)
    assert [s.numel() for s in chain[0].state()] == [10, 10]  # 40 B of parameters + momentum
    assert chain[2].state() == [] and chain[0].counters() == []


def test_a_message_of_another_mini_batch_is_refused() -> None:
    clock = FakeClock()
    first, second, _ = _chain(clock)
    out = [t.clone() for t in first.forward(7, None)]
    with pytest.raises(RuntimeError, match="carries mini-batch 7"):
        second.forward(8, out)
    second.forward(7, out)
    grad = [t.clone() for t in cut_spec(12).tensors[0].empty()[None]]
    grad[0][0] = grad[0][-1] = 6
    with pytest.raises(RuntimeError, match="gradient for mini-batch 7 carries mini-batch 6"):
        second.backward(grad)


def test_uint8_cuts_wrap_the_mini_batch_id() -> None:
    clock = FakeClock()
    first, second, _ = _chain(clock)
    h = [t.clone() for t in second.forward(300, [t.clone() for t in first.forward(300, None)])]
    assert h[0].dtype == torch.float32 and int(h[0][0]) == 300
    one = EmulatedStage(0, 0, None, cut_spec(1001), sleep=clock.sleep, clock=clock.clock)
    assert int(one.forward(300, None)[0][0]) == 300 % 256


def test_real_sleeps_are_never_shorter_than_the_profile() -> None:
    st = EmulatedStage(0.02, 0.03, None, None)
    t0 = time.perf_counter()
    st.forward(0, None)
    st.backward(None)
    assert time.perf_counter() - t0 >= 0.05


def test_an_interval_ends_at_its_deadline_when_the_sleep_wakes_late() -> None:
    clock = FakeClock()

    def late(s: float) -> None:  # a loaded machine: the sleep wakes 1 ms late; a spin step
        clock.sleep(s + 1e-3 if s > 0 else 1e-5)  # (sleep(0)) takes 10 us

    st = EmulatedStage(0.1, 0.0, None, None, sleep=late, clock=clock.clock, spin_s=2e-3)
    st.forward(0, None)
    assert clock.sleeps[0] == pytest.approx(0.1 - 2e-3 + 1e-3)
    assert 0.1 <= clock.now - 100.0 <= 0.1 + 1e-5 + 1e-9


def test_slowdown_and_time_scale_parsing() -> None:
    assert parse_slowdown(["5=2", "0=1.5"]) == {5: 2.0, 0: 1.5}
    assert parse_time_scale("0.1") == 0.1
    for bad, msg in ((["5"], "RANK=FACTOR"), (["x=2"], "RANK=FACTOR"), (["1=0"], "positive"),
                     (["1=nan"], "positive"), (["1=2", "1=3"], "twice"), (["1=fast"], "number")):
        with pytest.raises(UserError, match=msg):
            parse_slowdown(bad)
    for bad in ("0", "-1", "inf", "1e9"):
        with pytest.raises(UserError, match="--time-scale"):
            parse_time_scale(bad)


def _files(tmp: Path) -> tuple[Path, Path]:
    prof = tmp / "profile.json"
    prof.write_text(json.dumps({"model": "toy", "batch_size": 8, "input_shape": [3, 32, 32],
                                "optimizer": "sgd",
                                "units": [u.__dict__ for u in UNITS]}))
    plan = tmp / "plan.json"
    stages = [dict(s, first_name=UNITS[s["first_unit"]].name,
                   last_name=UNITS[s["last_unit"]].name) for s in STAGES]
    plan.write_text(json.dumps({"model": "toy", "stages": stages,
                                "throughput_bound_per_s": 1.0}))
    return prof, plan


def _opts(tmp: Path, **kw: object) -> SimpleNamespace:
    prof, plan = _files(tmp)
    base = {"plan": str(plan), "emulate": str(prof), "out": str(tmp / "run"), "iterations": 20,
            "epochs": None, "resume": False, "aggregate_every": 10, "timeout": 30.0,
            "chains": "dynamic", "time_scale": 0.5, "slowdown": {1: 2.0}, "stop_after": None}
    base.update(kw)
    return SimpleNamespace(**base)


def test_check_emulated_run_describes_every_rank(tmp_path: Path) -> None:
    spec = check_emulated_run(_opts(tmp_path), 4)
    try:
        assert spec["replicas"] == [2, 1, 1] and spec["cuts"] == [1, 3]
        assert (spec["total"], spec["end"], spec["first"]) == (20, 20, 0)
        spec["emulate"]["trace_dir"] = None
        st0 = emulated_stage(spec, 0, 0)
        st1 = emulated_stage(spec, 0, 1)  # rank 1 is twice as slow
        last = emulated_stage(spec, 2, 3)
        assert (st0.forward_s, st0.backward_s) == pytest.approx((0.05, 0.1))
        assert (st1.forward_s, st1.backward_s) == pytest.approx((0.1, 0.2))
        assert st0.in_spec is None and st0.out_spec.nbytes == 4000
        assert last.in_spec.nbytes == 12 and last.out_spec is None
    finally:
        spec["lock"].release()


@pytest.mark.parametrize(("size", "kw", "msg"), [
    (3, {}, "needs 4 ranks"),
    (4, {"epochs": 1}, "--iterations N"),
    (4, {"resume": True}, "no --resume"),
    (4, {"slowdown": {4: 2.0}}, "ranks are 0..3"),
    (4, {"time_scale": 0.0}, "--time-scale"),
])
def test_check_emulated_run_refuses_in_one_line(tmp_path: Path, size: int, kw: dict,
                                                msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        check_emulated_run(_opts(tmp_path, **kw), size)


def test_a_plan_of_another_profile_is_refused(tmp_path: Path) -> None:
    o = _opts(tmp_path)
    plan = json.loads(Path(o.plan).read_text())
    plan["stages"][1]["last_name"] = "other"
    Path(o.plan).write_text(json.dumps(plan))
    with pytest.raises(UserError, match="was not made from --emulate"):
        check_emulated_run(o, 4)
