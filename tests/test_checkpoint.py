"""Checkpoint directories read back: complete ones load, incomplete or damaged ones are refused
with a CheckpointError that says what is wrong."""
from __future__ import annotations

import json

import pytest
import torch

from rsk_dist.checkpoint import MANIFEST, STATE, CheckpointError, load_state, save_state


def test_round_trip(tmp_path):
    save_state(tmp_path / "ckpt", {"epoch": 2, "step": 7, "w": torch.arange(3.0)})
    state = load_state(tmp_path / "ckpt")
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.arange(3.0))


def test_manifest_without_state_is_a_checkpoint_error(tmp_path):
    """Ray uploads a checkpoint's files on threads in no set order: the manifest may be there
    while the state is not."""
    save_state(tmp_path / "ckpt", {"epoch": 1})
    (tmp_path / "ckpt" / STATE).unlink()
    with pytest.raises(CheckpointError, match=f"has a {MANIFEST} but no {STATE}.*resume from an earlier"):
        load_state(tmp_path / "ckpt")


@pytest.mark.parametrize("manifest", [b"not json", b"[1, 2]", json.dumps({"bytes": "12", "sha256": "x"}).encode()])
def test_malformed_manifest_is_a_checkpoint_error(tmp_path, manifest):
    save_state(tmp_path / "ckpt", {"epoch": 1})
    (tmp_path / "ckpt" / MANIFEST).write_bytes(manifest)
    with pytest.raises(CheckpointError, match="is not a checkpoint manifest"):
        load_state(tmp_path / "ckpt")
