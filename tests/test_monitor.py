"""Rank 0's monitoring of a real (Ray-less) training run: TensorBoard event files and
training.png beside the checkpoints, and training that goes on when monitoring cannot."""
from __future__ import annotations

import struct
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch


from rsk_dist.config import load_config  # noqa: E402
from rsk_dist.monitor import RunMonitor, tag  # noqa: E402
from rsk_dist.train import Trainer  # noqa: E402


def tiny_config(storage_path: str, eval_data: bool = True, name: str = "mon"):
    return load_config({
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8,
                 **({"eval": {"kind": "digits", "split": "test"}} if eval_data else {})},
        "model": {"in_channels": 1, "dim": 16}, "sampler": {"batch_size": 40},
        "train": {"epochs": 2, "steps_per_epoch": 2, "chunk_size": 40, "eval_k": [1, 2]},
        "run": {"name": name, "storage_path": storage_path},
    })


def train(config) -> tuple[Trainer, list[dict]]:
    trainer, reports = Trainer(config, torch.device("cpu")), []
    trainer.run(lambda metrics, state: reports.append(metrics))
    return trainer, reports


def read_events(path: Path) -> list:
    """The Event protos of a TFRecord event file, every record's CRCs checked."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == masked_crc32c(header)
        body = data[at + 12 : at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
        at += 16 + length
    return events


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file in ``folder``."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                out[value.tag][event.step] = value.simple_value
    return out


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_run_leaves_tensorboard_events_and_a_plot(tmp_path):
    trainer, reports = train(tiny_config(f"file://{tmp_path}/runs"))
    run = tmp_path / "runs" / "mon"

    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2, "one event file per checkpoint interval (checkpoint_every=1, 2 epochs)"
    tags = scalars(run / "tensorboard")
    # Step metrics reach the monitor alone (reports carry checkpoints): each epoch's summary loss
    # is the mean of its steps' logged losses.
    assert set(tags["train/loss"]) == {1, 2, 3, 4}
    losses = tags["train/loss"]
    assert [h["loss"] for h in trainer.history] == pytest.approx([(losses[1] + losses[2]) / 2, (losses[3] + losses[4]) / 2])
    assert set(tags["train/lr"]) == {1, 2, 3, 4} and tags["train/images_per_s"][4] > 0
    assert {"time/step_s", "time/data_s", "time/embed_s", "time/backward_s"} <= set(tags)
    epochs = {h["step"]: h for h in trainer.history}
    assert set(epochs) == {2, 4}
    for key in ("recall@1", "recall@2", "map@r", "r_precision"):
        assert tags[tag("eval", key)] == pytest.approx({s: h[key] for s, h in epochs.items()}), key
    assert 0 < tags["eval/recall_at_1"][4] <= 1
    assert set(tags) == {
        "train/loss", "train/lr", "train/images_per_s", "eval/recall_at_1", "eval/recall_at_2", "eval/map_at_r",
        "eval/r_precision", *(f"time/{t}_s" for t in ("data", "data_wait", "embed", "loss", "backward", "comm", "optimizer", "step")),
    }

    png = (run / "training.png").read_bytes()
    width, height = png_size(png)
    assert width > 0 and height > 0 and width > height, "two panels side by side"
    assert not list(run.glob(".training.png.tmp-*")), "written atomically"


def test_monitoring_changes_nothing_in_training(tmp_path):
    monitored, _ = train(tiny_config(f"file://{tmp_path}/runs", eval_data=False))
    assert (tmp_path / "runs" / "mon" / "training.png").exists()
    config = tiny_config(f"file://{tmp_path}/other", eval_data=False)
    plain = Trainer(config, torch.device("cpu"))
    plain.monitor.enabled = False  # as on ranks other than 0
    plain.run(lambda metrics, state: None)
    assert not (tmp_path / "other").exists(), "a disabled monitor writes nothing"
    for name, value in monitored.model.state_dict().items():
        assert torch.equal(value, plain.model.state_dict()[name]), name
    assert [h["loss"] for h in monitored.history] == [h["loss"] for h in plain.history]


def test_unwritable_storage_warns_once_and_training_goes_on(tmp_path):
    (tmp_path / "a_file").write_text("storage under a file cannot be created")
    # No eval data: the best-model checkpoint would (rightly) fail on this storage.
    config = tiny_config(f"file://{tmp_path}/a_file/runs", eval_data=False)
    with pytest.warns(RuntimeWarning) as caught:
        trainer, _ = train(config)
    assert trainer.epoch == 2
    messages = [str(w.message) for w in caught]
    assert sum("cannot upload TensorBoard events" in m for m in messages) == 1, "once, not at every checkpoint"
    assert sum("cannot write" in m and "training.png" in m for m in messages) == 1
    assert all("monitoring:" in m and "training goes on" in m for m in messages)


def test_missing_libraries_warn_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(RuntimeWarning) as caught:
        trainer, _ = train(tiny_config(f"file://{tmp_path}/runs", eval_data=False))
    assert trainer.epoch == 2
    messages = [str(w.message) for w in caught]
    assert sum("tensorboardX is not installed" in m for m in messages) == 1
    assert sum("matplotlib is not installed" in m for m in messages) == 1
    assert not (tmp_path / "runs").exists()


def test_sync_mid_run_uploads_what_was_logged(tmp_path):
    """What a killed run keeps: everything logged before its last checkpoint's sync."""
    monitor = RunMonitor(f"file://{tmp_path}/runs", "killed")
    monitor.log_step(1, {"loss": 0.5, "lr": 0.1, "images_per_s": 10.0, "data_s": 0.01, "bytes_received": 3.0})
    monitor.log_epoch(1, {"epoch": 1, "step": 1, "loss": 0.5, "recall@1": 0.25, "map@r": 0.125})
    monitor.sync()
    tags = scalars(tmp_path / "runs" / "killed" / "tensorboard")
    assert dict(tags) == {
        "train/loss": {1: 0.5}, "train/lr": {1: pytest.approx(0.1)}, "train/images_per_s": {1: 10.0},
        "time/data_s": {1: pytest.approx(0.01)}, "eval/recall_at_1": {1: 0.25}, "eval/map_at_r": {1: 0.125},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.sync()  # nothing new: no error, no new file
    assert len(list((tmp_path / "runs" / "killed" / "tensorboard").iterdir())) == 1
