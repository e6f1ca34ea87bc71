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


def train(config, state=None):
    """Runs a trainer; returns it and the (metrics, state) of every checkpoint."""
    trainer = Trainer(config, torch.device("cpu"), state)
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
