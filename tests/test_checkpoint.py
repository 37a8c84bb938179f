"""Checkpoint files that must be refused: unsafe pickles and truncated files, in one whole line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from hpcsrl.errors import UserError
from hpcsrl.train.checkpoint import read_checkpoint, write_checkpoint


class MakesAFolder:
    """Unpickling this calls os.makedirs: code a checkpoint must never be allowed to run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (str(self.target),))


def test_a_pickle_with_code_is_refused_as_unsafe_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "hpcsrl-checkpoint", "version": 1, "payload": MakesAFolder(marker)},
               evil)
    with pytest.raises(UserError) as info:
        read_checkpoint(evil)
    message = str(info.value)
    assert not marker.exists()
    assert message.startswith(f"{evil}: refused as unsafe"), message
    assert "makedirs" in message and "corrupt" not in message, message
    assert "\n" not in message and "\x1b" not in message, message


def test_a_plain_pickle_with_code_is_refused_as_unsafe(tmp_path: Path) -> None:
    """Not torch's zip format at all: the legacy unpickler refuses it just the same."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"x": MakesAFolder(marker)}, protocol=2))
    with pytest.raises(UserError, match="refused as unsafe"):
        read_checkpoint(evil)
    assert not marker.exists()


def test_a_truncated_checkpoint_says_so_in_whole_sentences(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    write_checkpoint(good, {"model": {"w": torch.zeros(1000)}, "note": "x" * 100})
    data = good.read_bytes()
    for keep in (0, 10, 100, len(data) // 3, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut-{keep}.pt"
        bad.write_bytes(data[:keep])
        with pytest.raises(UserError) as info:
            read_checkpoint(bad)
        message = str(info.value)
        assert message.startswith(f"{bad}: not a readable checkpoint, the file is corrupt or "
                                  "truncated ("), message
        assert "\n" not in message and message.endswith(")"), message
        # torch's own reason, quoted up to the end of a sentence, never cut inside one
        # (its messages run to several hundred characters)
        reason = message[message.index("(") + 1:-1]
        with pytest.raises(Exception) as raw:
            torch.load(bad, map_location="cpu", weights_only=True)
        torch_text = str(raw.value).strip() or type(raw.value).__name__
        assert torch_text.startswith(reason), (reason, torch_text)
        assert torch_text[len(reason):][:1] in ("", ".", "!", "?", "\n"), (reason, torch_text)
    assert len(read_checkpoint(good)["model"]["w"]) == 1000
