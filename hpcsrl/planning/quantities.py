"""Parse and format the sizes, bandwidths and latencies a user types on the `plan` command line."""

from __future__ import annotations

import math
import re

from hpcsrl.errors import UserError

_DECIMAL = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_SIZE_RE = re.compile(rf"^{_NUMBER}\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?(B|bit|b)?$")
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_TIME_RE = re.compile(rf"^{_NUMBER}\s*(s|ms|us|µs|ns)?$")


def _scaled(text: str, what: str, option: str, shown: str | None = None) -> tuple[float, str]:
    """Number times its (decimal or binary) prefix, plus the trailing unit ('B', 'bit' or '').

    `shown` is what the user typed (errors quote it), when `text` is a part of it.
    """
    shown = text if shown is None else shown
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UserError(f"{option}: cannot read {what} {shown!r} "
                        "(examples: 3GiB, 3000MB, 3221225472)")
    number, prefix, unit = float(m.group(1)), m.group(2) or "", m.group(3) or ""
    factor = _BINARY.get(prefix) or _DECIMAL[prefix]
    value = number * factor
    if not math.isfinite(value):
        raise UserError(f"{option}: {what} {shown!r} is too large to be a number")
    return value, unit


def parse_size(text: str, option: str = "--memory") -> int:
    """Bytes from '3221225472', '3GiB', '3000MB' or '2.5 GB' (SI prefixes are powers of 1000)."""
    value, unit = _scaled(text, "size", option)
    if unit in ("bit", "b"):
        value /= 8
    if round(value) < 1:
        raise UserError(f"{option}: size {text!r} must be at least one byte")
    return int(round(value))


def parse_sizes(text: str, option: str = "--memory") -> list[int]:
    """A single size or a comma list of sizes (one per device, in stage order)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError(f"{option}: expected a size or a comma list of sizes, got {text!r}")
    return [parse_size(p, option) for p in parts]


def parse_bandwidth(text: str, option: str = "--bandwidth") -> float:
    """Bytes per second from '1Gbit/s', '125MB/s', '12500000B/s' or '1Gbps'."""
    t = text.strip()
    for suffix, repl in (("bps", "bit/s"), ("Bps", "B/s")):
        if t.endswith(suffix):
            t = t[: -len(suffix)] + repl
    if not t.endswith("/s"):
        raise UserError(f"{option}: bandwidth {text!r} needs a rate unit "
                        "(examples: 1Gbit/s, 125MB/s, 12500000B/s)")
    value, unit = _scaled(t[:-2], "bandwidth", option, shown=text)
    if unit == "":
        raise UserError(f"{option}: say whether {text!r} is bits or bytes per second "
                        "(e.g. 1Gbit/s or 125MB/s)")
    if unit in ("bit", "b"):
        value /= 8
    if value <= 0:
        raise UserError(f"{option}: bandwidth {text!r} must be positive")
    return value


def parse_latency(text: str, option: str = "--latency") -> float:
    """Seconds from '0.1ms', '1e-4s', '100us' or a plain number of seconds."""
    m = _TIME_RE.match(text.strip())
    if not m:
        raise UserError(f"{option}: cannot read time {text!r} (examples: 0.1ms, 1e-4s, 100us)")
    value = float(m.group(1)) * _TIME_UNITS[m.group(2) or "s"]
    if not math.isfinite(value):
        raise UserError(f"{option}: time {text!r} is too large to be a number")
    if value < 0:
        raise UserError(f"{option}: latency {text!r} must not be negative")
    return value


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. 3.00 GiB (up to PiB; then in scientific notation)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{float(n):.3g} B"


def format_seconds(s: float) -> str:
    """Seconds with a unit that keeps three significant digits readable."""
    if s == 0:
        return "0 s"
    if abs(s) >= 1:
        return f"{s:.3f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"
