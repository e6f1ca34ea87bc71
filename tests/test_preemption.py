"""Ray's preemption notice for real: a local two-node cluster whose worker node is drained, as
the autoscaler does for a spot reclaim, while a job trains there. (SIGTERM notices: test_faults.)"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rsk_dist.checkpoint import load_state
from rsk_dist.config import load_config
from tests.test_faults import train_worker_pids

# Steps per epoch: two epochs last well beyond the drain command's own start-up (a second or two),
# which begins as soon as the workers exist, before their first step.
STEPS = 40


def test_drained_node_checkpoints_the_step_it_is_seen_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")  # read by Ray Train's controller
    cfg = load_config({
        "model": {"name": "small_cnn", "in_channels": 1, "dim": 16},
        "loss": {"k": [1, 2, 4]},
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8, "augment": False},
        "sampler": {"batch_size": 40, "samples_per_class": 4, "seed": 0},
        "train": {"epochs": 2, "steps_per_epoch": STEPS, "chunk_size": 20, "log_every": 5},
        "scaling": {"num_workers": 2},
        # checkpoints at the last epoch only: any other one is the drain's
        "run": {"name": "drained", "storage_path": f"file://{tmp_path}", "checkpoint_every": 2, "keep_checkpoints": 3},
    })
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        node = cluster.add_node(num_cpus=2)  # the only place the two workers fit
        ray.init(address=cluster.address)
        from rsk_dist.train import fit

        result: dict = {}
        job = threading.Thread(target=lambda: result.update(fit(cfg)))
        started = time.time()
        job.start()
        session = os.getsid(0)
        while len(train_worker_pids(session)) < 2 and job.is_alive() and time.time() - started < 240:
            time.sleep(0.1)
        # What the autoscaler does on a spot reclaim notice: a drain with a deadline.
        drain = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address, "--node-id", node.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "test", "--deadline-remaining-seconds", "600"],
            capture_output=True, text=True, timeout=120,
        )
        assert drain.returncode == 0, drain.stderr[-2000:]
        job.join(timeout=500)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not job.is_alive() and result, "the job finished before the drain's deadline"
    names = sorted(p.name for p in (tmp_path / "drained").iterdir() if p.name.startswith("checkpoint_epoch"))
    assert names[-1] == "checkpoint_epoch_00002" and len(names) == 2, names
    state = load_state(str(tmp_path / "drained" / names[0]))
    at = state["epoch"] * STEPS + state["step"]
    assert 1 <= at < 2 * STEPS, "the checkpoint of the step in which the drain was seen"
