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


def test_state_larger_than_its_manifest_says_is_refused_unread(tmp_path):
    """A 1 GiB state.pt (sparse: no disk used) whose manifest says 100 bytes: refused from its
    size, without reading it (the process's peak memory does not grow by the file's size)."""
    import resource

    save_state(tmp_path / "ckpt", {"epoch": 1})
    (tmp_path / "ckpt" / MANIFEST).write_text(json.dumps({"bytes": 100, "sha256": "0" * 64}))
    with open(tmp_path / "ckpt" / STATE, "wb") as f:
        f.truncate(1 << 30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(CheckpointError, match=r"does not match its manifest: it is 1073741824 bytes, the manifest says 100"):
        load_state(tmp_path / "ckpt")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024, "the state was read"


def test_newest_damaged_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path):
    from rsk_dist.checkpoint import checkpoint_name, latest_state

    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_state(run / checkpoint_name(0, step), {"epoch": 0, "step": step})
    damaged = run / checkpoint_name(0, 3) / STATE
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the digest tells
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"{checkpoint_name(0, 3)}.*does not match its manifest"):
        url, state = latest_state(str(run))
    assert url.endswith(checkpoint_name(0, 2)) and state["step"] == 2
    for step in (1, 2):
        (run / checkpoint_name(0, step) / MANIFEST).unlink()
    with pytest.warns(UserWarning):
        assert latest_state(str(run)) is None


def test_checkpoint_without_a_config_is_a_clear_error(tmp_path):
    from rsk_dist.checkpoint import load_model

    save_state(tmp_path / "ckpt", {"epoch": 1, "model": {}})
    with pytest.raises(CheckpointError, match="holds no job config"):
        load_model(str(tmp_path / "ckpt"))
