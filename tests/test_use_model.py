"""Using a trained model: the preprocessing record, ``embed``, ``export-index`` and ``search``,
on the quickstart's model, against ``eval``."""
from __future__ import annotations

import pytest

from rsk_dist.checkpoint import CheckpointError, checkpoint_name, load_state, save_state


def test_a_run_folder_is_named_as_such_with_what_to_pass(tmp_path):
    run = tmp_path / "quickstart"
    save_state(run / checkpoint_name(2, 0), {"x": 1})
    save_state(run / checkpoint_name(3, 0), {"x": 2})
    (run / checkpoint_name(4, 0)).mkdir()  # being written: no manifest yet
    with pytest.raises(CheckpointError, match="is a run folder, not a checkpoint") as err:
        load_state(str(run))
    assert f"its latest checkpoint {run}/{checkpoint_name(3, 0)}" in str(err.value)
    assert "best" not in str(err.value)
    save_state(run / "best", {"x": 3})
    with pytest.raises(CheckpointError, match=f"or its best model {run}/best"):
        load_state(str(run))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_state(str(tmp_path / "nothing"))
