"""Step checkpoints in one process (no Ray): the state after any step resumes to the same end,
epoch summaries included; a preemption notice checkpoints the step it came in; a resume with a
config that changes the training is refused unless allowed, and so is --resume-from on a run
that has its own checkpoints."""
import os
import signal

import pytest
import torch

from rsk_dist import preemption
from rsk_dist.checkpoint import CheckpointError, checkpoint_name, cpu_copy, save_state
from rsk_dist.config import load_config
from rsk_dist.preemption import Preempted, install_sigterm_handler
from rsk_dist.storage import join
from rsk_dist.train import Trainer, check_resume


def job(tmp_path, **run):
    return load_config({
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8},
        "model": {"in_channels": 1, "dim": 16},
        "loss": {"k": [1, 2, 4], "simix": True},
        "sampler": {"batch_size": 24, "seed": 7},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "steps_per_epoch": 2, "chunk_size": 8},
        "run": {"name": "r", "storage_path": f"file://{tmp_path}/runs", "checkpoint_every_steps": 1, **run},
    })


def train(config, state=None, **kwargs):
    """Runs a trainer; returns it and the (metrics, state) of every checkpoint."""
    trainer = Trainer(config, torch.device("cpu"), state, **kwargs)
    reports = []
    trainer.run(lambda metrics, s: reports.append((metrics, cpu_copy(s))))  # a copy: s holds live tensors
    return trainer, reports


def test_every_step_checkpoint_resumes_to_the_same_end(tmp_path):
    config = job(tmp_path)
    clean, reports = train(config)
    assert [(s["epoch"], s["step"]) for _, s in reports] == [(0, 1), (1, 0), (1, 1), (2, 0)]
    for _, state in (reports[0], reports[2]):  # mid-epoch, in the first epoch and after a summary
        state = torch.load(_saved(tmp_path, state), weights_only=True)
        resumed, _ = train(config, state)
        for name, value in clean.model.state_dict().items():
            torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)
        assert resumed.history == clean.history, "epoch summaries (mean loss) as uninterrupted"


def _saved(tmp_path, state) -> str:
    # Through the checkpoint file: what a resume reads is what was written, not live tensors.
    save_state(tmp_path / "c", state)
    return str(tmp_path / "c" / "state.pt")


def test_sigterm_checkpoints_the_step_and_stops(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm_handler()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.notice_received()
        assert signal.getsignal(signal.SIGTERM) is previous, "a second SIGTERM acts as before"
        trainer = Trainer(job(tmp_path, checkpoint_every_steps=None), torch.device("cpu"))
        reports = []
        with pytest.raises(Preempted):
            trainer.run(lambda metrics, state: reports.append(state))
        assert len(reports) == 1 and (reports[0]["epoch"], reports[0]["step"]) == (0, 1)
    finally:
        preemption._notice.clear()
        signal.signal(signal.SIGTERM, previous)


def test_resume_refuses_changes_to_the_training_unless_allowed(tmp_path):
    config = job(tmp_path)
    run = join(config.run.storage_path, config.run.name)
    save_state(join(run, checkpoint_name(0, 2)).removeprefix("file://"), Trainer(config, torch.device("cpu")).state())
    # Epochs, evaluation, logging, scaling and checkpointing may change.
    applies = load_config(config.model_dump(mode="json"), [
        "train.epochs=5", "train.log_every=2", "scaling.num_workers=[1, 3]", "run.checkpoint_every_steps=4",
        "data.eval={kind: digits, split: test}", "data.prefetch_steps=0",
    ])
    assert check_resume(applies, None).endswith(checkpoint_name(0, 2))
    changed = load_config(config.model_dump(mode="json"), ["optim.lr=0.1", "sampler.seed=1", "model.dim=32"])
    with pytest.raises(CheckpointError, match=r"model\.dim, optim\.lr, sampler\.seed; .*--allow-config-change"):
        check_resume(changed, None)
    assert check_resume(changed, None, allow_config_change=True)
    with pytest.raises(CheckpointError, match=r"already has checkpoints .* drop it, or set another run\.name"):
        check_resume(config, "file:///elsewhere/checkpoint_epoch_00001")


def _checkpoint(tmp_path, config, state, epoch: int, step: int) -> str:
    url = join(config.run.storage_path, config.run.name, checkpoint_name(epoch, step))
    save_state(url.removeprefix("file://"), state)
    return url


def test_a_resume_anywhere_refuses_a_changed_config_unless_allowed(tmp_path):
    """The check runs where the state is loaded (Trainer: every Ray worker), not only on the driver."""
    config = job(tmp_path)
    _, reports = train(config)
    changed = load_config(config.model_dump(mode="json"), ["optim.lr=0.1"])
    with pytest.raises(CheckpointError, match=r"optim\.lr; .*--allow-config-change"):
        Trainer(changed, torch.device("cpu"), reports[1][1])
    Trainer(changed, torch.device("cpu"), reports[1][1], allow_config_change=True)


def test_allowed_optimizer_change_is_in_effect_after_the_resume(tmp_path):
    config = job(tmp_path, checkpoint_every_steps=1)
    config = load_config(config.model_dump(mode="json"), ["optim.lr_steps=[1]", "optim.lr_gamma=0.5"])
    _, reports = train(config)
    state = reports[1][1]  # after epoch 1: the schedule has multiplied the LR by 0.5 once
    new = load_config(config.model_dump(mode="json"), ["optim.lr=0.1", "optim.weight_decay=0.001"])
    # Copies: a loaded optimizer shares the state's tensors and steps them in place.
    same, same_reports = train(config, cpu_copy(state))
    changed, changed_reports = train(new, cpu_copy(state), allow_config_change=True)
    assert same_reports[0][0]["lr"] == pytest.approx(0.005) and changed_reports[0][0]["lr"] == pytest.approx(0.05)
    assert changed.optimizer.param_groups[0]["weight_decay"] == 0.001
    assert changed.scheduler.base_lrs == [0.1], "later milestones scale the new LR"
    assert changed_reports[-1][1]["config"]["optim"]["lr"] == 0.1
    # lr only (weight decay back as it was): Adam's first step from the same state and batch
    # moves every weight 10x as far. Each measured move p' - p carries a rounding error of at
    # most one float32 ulp of |p| (the update rounds once into p'), so a move 10x as large
    # matches 10x the other to within 11 ulp(|p|) <= 11 * 2^-23 * |p|.
    lr_only = load_config(config.model_dump(mode="json"), ["optim.lr=0.1"])
    _, lr_reports = train(lr_only, cpu_copy(state), allow_config_change=True)
    moved = 0.0
    for name, before in state["model"].items():
        if before.is_floating_point() and before.numel():
            slow = same_reports[0][1]["model"][name] - before
            fast = lr_reports[0][1]["model"][name] - before
            bound = 11 * 2.0**-23 * before.abs().max().item() + 1e-30
            torch.testing.assert_close(fast, 10 * slow, rtol=0, atol=bound, msg=lambda m: f"{name}: {m}")
            moved += slow.abs().sum().item()
    assert moved > 1e-3, "the step must move the weights for the comparison to mean anything"


def test_damaged_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(tmp_path):
    config = job(tmp_path)
    _, reports = train(config)
    good = _checkpoint(tmp_path, config, reports[1][1], 1, 0)
    bad = _checkpoint(tmp_path, config, reports[2][1], 1, 1)
    state_file = bad.removeprefix("file://") + "/state.pt"
    data = bytearray(open(state_file, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(state_file, "wb").write(bytes(data))
    with pytest.warns(UserWarning, match=checkpoint_name(1, 1)):
        assert check_resume(config, None) == good


def test_checkpoint_records_the_dataset_and_a_changed_one_is_refused_unless_allowed(tmp_path):
    from rsk_dist.ingest import ingest
    from rsk_dist.prestart import check_data
    from rsk_dist.storage import open_dataset
    from tests.test_shards import make_folders

    make_folders(tmp_path / "a", classes=3)
    ingest(str(tmp_path / "a"), str(tmp_path / "ds"), "folders")
    tree = job(tmp_path).model_dump(mode="json")
    tree["data"] = {"train": {"kind": "shards", "url": str(tmp_path / "ds"), "split": "train"}, "image_size": 8}
    tree["model"]["in_channels"], tree["sampler"]["batch_size"] = 3, 8
    config = load_config(tree, ["train.epochs=1", "train.steps_per_epoch=2"])
    before = open_dataset(str(tmp_path / "ds")).manifest["fingerprint"]
    _, reports = train(config)
    state = reports[0][1]
    assert state["dataset"] == before
    _checkpoint(tmp_path, config, state, 0, 1)
    make_folders(tmp_path / "b", classes=4)  # the same URL re-ingested with other images
    ingest(str(tmp_path / "b"), str(tmp_path / "ds"), "folders", overwrite=True)
    after = check_data(config)
    assert after != before
    with pytest.raises(CheckpointError, match=r"training data at .*ds has changed .*--allow-config-change"):
        check_resume(config, None, fingerprint=after)
    with pytest.raises(CheckpointError, match="has changed"):
        Trainer(config, torch.device("cpu"), state)
    assert check_resume(config, None, allow_config_change=True, fingerprint=after)
    Trainer(config, torch.device("cpu"), state, allow_config_change=True)
