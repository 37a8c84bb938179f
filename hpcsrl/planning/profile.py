"""The profile file: per-unit time and memory of one model/batch/optimizer, loaded and validated."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpcsrl.errors import UserError
from hpcsrl.fileio import write_json

_INT_FIELDS = ("param_bytes", "state_bytes", "activation_bytes", "output_bytes")
_FLOAT_FIELDS = ("forward_s", "backward_s")
# Beyond any measurement (31,700 years; 8 EiB), and small enough that the planner's exact integer
# picoseconds and its float bounds never overflow.
MAX_SECONDS = 1e12
MAX_BYTES = 2**63 - 1


def model_label(method: str, backbone: str, options: dict[str, Any]) -> str:
    """The profile's and plan's model name, e.g. lite-srl/resnet18/small-stem/width-32, from the
    non-default shape options (`hpcsrl.cli.pretrain.shape_options`); `hpcsrl dhp` rebuilds it
    to check that the model it builds is the profiled one."""
    return (f"{method}/{backbone}" + (f"/{options['stem']}-stem" if "stem" in options else "")
            + (f"/width-{options['width']}" if "width" in options else ""))


@dataclass(frozen=True)
class UnitProfile:
    """One partitionable unit; training memory = params + grad/optimizer state + activations."""

    name: str
    forward_s: float
    backward_s: float
    param_bytes: int
    state_bytes: int
    activation_bytes: int
    output_bytes: int

    @property
    def memory_bytes(self) -> int:
        return self.param_bytes + self.state_bytes + self.activation_bytes

    @property
    def time_s(self) -> float:
        return self.forward_s + self.backward_s


@dataclass(frozen=True)
class Profile:
    """What `hpcsrl profile` measures and `hpcsrl plan` reads (schema in issue 4)."""

    model: str
    batch_size: int
    input_shape: list[int]
    optimizer: str
    units: list[UnitProfile]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "batch_size": self.batch_size,
                               "input_shape": list(self.input_shape), "optimizer": self.optimizer,
                               "units": [asdict(u) for u in self.units]}
        out.update(self.extra)
        return out

    @property
    def total_memory_bytes(self) -> int:
        return sum(u.memory_bytes for u in self.units)


def _check_unit(raw: Any, i: int, where: str) -> UnitProfile:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: units[{i}] must be an object")
    missing = [k for k in ("name", *_FLOAT_FIELDS, *_INT_FIELDS) if k not in raw]
    if missing:
        raise UserError(f"{where}: units[{i}] lacks {', '.join(missing)}; re-run `hpcsrl profile`")
    values: dict[str, Any] = {"name": str(raw["name"])}
    for key in _FLOAT_FIELDS:
        v = raw[key]
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not 0 <= v <= MAX_SECONDS):
            raise UserError(f"{where}: units[{i}].{key} must be a number of seconds in "
                            f"[0, {MAX_SECONDS:g}], got {v!r}")
        values[key] = float(v)
    for key in _INT_FIELDS:
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_BYTES:
            raise UserError(f"{where}: units[{i}].{key} must be an integer number of bytes in "
                            f"[0, 2**63), got {v!r}")
        values[key] = v
    return UnitProfile(**values)


def profile_from_json(obj: Any, where: str = "profile") -> Profile:
    """Validate a parsed profile; errors name the file and the offending field."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with 'units'")
    units_raw = obj.get("units")
    if not isinstance(units_raw, list) or not units_raw:
        raise UserError(f"{where}: 'units' must be a non-empty list")
    units = [_check_unit(u, i, where) for i, u in enumerate(units_raw)]
    shape = obj.get("input_shape", [])
    if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
        raise UserError(f"{where}: 'input_shape' must be a list of integers [C, H, W]")
    batch = obj.get("batch_size", 0)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise UserError(f"{where}: 'batch_size' must be a non-negative integer")
    known = {"model", "batch_size", "input_shape", "optimizer", "units"}
    return Profile(model=str(obj.get("model", "")), batch_size=batch, input_shape=shape,
                   optimizer=str(obj.get("optimizer", "")), units=units,
                   extra={k: v for k, v in obj.items() if k not in known})


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile JSON file."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"--profile: {p} does not exist; create it with `hpcsrl profile`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--profile: cannot read {p} as JSON ({exc})") from None
    return profile_from_json(obj, where=str(p))


def save_profile(profile: Profile, path: str | os.PathLike) -> None:
    """Atomically write a profile JSON file."""
    write_json(path, profile.to_json())
