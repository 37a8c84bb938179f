"""`hpcsrl dhp` refuses bad input on rank 0 before any work: one line naming what to change."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hpcsrl.errors import UserError
from hpcsrl.pipeline.run import DhpOptions, check_run

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
from dhp_helpers import write_plan, write_rgb_h5  # noqa: E402


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {"data": write_rgb_h5(tmp_path / "p.h5"),
            "plan": write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[3, 2, 1]),
            "out": tmp_path / "run"}


def _opts(files: dict[str, Path], **kw) -> DhpOptions:
    base = dict(plan=str(files["plan"]), data=str(files["data"]), out=str(files["out"]),
                iterations=10)
    base.update(kw)
    return DhpOptions(**base)


def _refused(opts: DhpOptions, size: int, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        spec = check_run(opts, size)
        spec["lock"].release()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_a_good_run_is_described(files) -> None:
    spec = check_run(_opts(files), 6)
    spec.pop("lock").release()
    assert spec["replicas"] == [3, 2, 1] and spec["cuts"] == [6, 16] and spec["total"] == 10
    assert spec["cfg"]["batch_size"] == 4 and spec["cfg"]["input_size"] == 32


def test_rank_count_must_match_the_plan(files) -> None:
    msg = _refused(_opts(files), 5, "needs 6 ranks")
    assert "3/2/1" in msg and "mpirun -np 6" in msg


def test_momentum_methods_are_refused_with_the_reason(files, tmp_path) -> None:
    plan = write_plan(tmp_path / "byol.json", cuts=[6], replicas=[1, 1], method="byol")
    msg = _refused(_opts(files, plan=str(plan)), 2, "not supported by DHP")
    assert "momentum" in msg and "whole model" in msg


@pytest.mark.parametrize(("kw", "plan_kw", "match"), [
    ({"method": "simsiam"}, {}, "made for lite-srl/resnet18"),
    ({"batch_size": 8}, {}, "differs from the plan's 4"),
    ({"input_size": 64}, {}, "differs from the plan's 32"),
    ({}, {"bands": 12}, "profiled with 12 bands"),
    ({"memory": 10_000_000}, {}, "stage 0 needs"),
    ({"iterations": None}, {}, "exactly one of"),
])
def test_plan_against_data_and_options(files, tmp_path, kw, plan_kw, match) -> None:
    if plan_kw:
        files = dict(files, plan=write_plan(tmp_path / "other.json", cuts=[6, 16],
                                            replicas=[3, 2, 1], **plan_kw))
    _refused(_opts(files, **kw), 6, match)


def test_plan_from_another_model(files, tmp_path) -> None:
    plan = json.loads(files["plan"].read_text())
    plan["stages"][1]["first_name"] = "projector.fc9"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(plan))
    _refused(_opts(files, plan=str(other)), 6, "comes from another model")
    _refused(_opts(files, plan=str(tmp_path / "missing.json")), 6, "no such file")


def test_missing_or_corrupt_data_and_unwritable_out(files, tmp_path) -> None:
    _refused(_opts(files, data=str(tmp_path / "none.h5")), 6, "no such patch file")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    _refused(_opts(files, data=str(bad)), 6, "not a readable HDF5")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused(_opts(files, out=str(blocker / "run")), 6, "output folder")


def test_existing_run_needs_resume(files) -> None:
    files["out"].mkdir()
    (files["out"] / "checkpoint.pt").write_bytes(b"x")
    _refused(_opts(files), 6, "pass --resume")


def test_the_plan_gives_the_model_shape(files, tmp_path) -> None:
    """A small-stem, half-width plan builds that model on every rank (no --stem / --width for
    `hpcsrl dhp`: the plan was profiled for one shape); plans that do not say so are refused."""
    shaped = {"stem": "small", "width": 32}
    plan = write_plan(tmp_path / "small.json", cuts=[6, 16], replicas=[3, 2, 1],
                      options=shaped)
    spec = check_run(_opts(files, plan=str(plan)), 6)
    spec.pop("lock").release()
    assert {k: spec["config"][k] for k in shaped} == shaped
    assert spec["cfg"]["method_options"] == shaped
    assert json.loads(plan.read_text())["model"] == "lite-srl/resnet18/small-stem/width-32"

    old = json.loads(plan.read_text())
    del old["model_options"]  # a plan from before the shape was recorded
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert "profile` and `hpcsrl plan` again" in _refused(
        _opts(files, plan=str(tmp_path / "old.json")), 6, "predates")
    _refused(_opts(files, plan=str(plan), method_options={"width": 16}), 6,
             "differs from the plan's")
