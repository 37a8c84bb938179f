"""The one progress bar: tqdm on a terminal, a plain line every 30 s in batch logs, rank 0 only.

Slurm `.out` files and CI logs are not terminals: tqdm's carriage-return redraws would fill them
with one endless line, so there the bar prints a normal line at a slow, fixed pace instead.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from hpcsrl.log import launcher_rank

LOG_INTERVAL_S = 30.0


class _LogLineBar(tqdm):
    """tqdm that writes each refresh as its own line (for files and pipes), at most once per
    `mininterval`: postfix updates never force a line of their own."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if text.strip():
            self.fp.write(text.strip() + "\n")
            self.fp.flush()
        return True


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) that stays silent on ranks other than 0."""
    disable = disable or launcher_rank() != 0
    stream = kwargs.setdefault("file", sys.stderr)
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, disable=disable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs["leave"] = True
    return _LogLineBar(iterable, disable=disable, **kwargs)
