"""The lease on a run directory, on moto's S3 and on local files: one job holds a run; a twin
is refused, a dead job's lease is taken over, and of two jobs starting together one wins."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from rsk_dist.lease import LEASE, LeaseError, RunLease, check_holder, read_lease
from rsk_dist.storage import filesystem, join


@pytest.fixture(params=["s3", "file"])
def run_url(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3").url("lease") + "/run"
    return f"file://{tmp_path}/runs/run"


def test_a_held_run_refuses_a_second_job_and_is_free_after_release(run_url):
    first = RunLease(run_url, settle_s=0.05).acquire()
    try:
        assert read_lease(run_url)["holder"] == first.holder
        with pytest.raises(LeaseError, match=r"being trained by another job .*another run\.name.*120s is taken over"):
            RunLease(run_url, settle_s=0.05).acquire()
        check_holder(run_url, first.holder)
        with pytest.raises(LeaseError, match="no longer holds run"):
            check_holder(run_url, "some-other-job")
    finally:
        first.release()
    assert read_lease(run_url) is None
    with RunLease(run_url, settle_s=0.05) as second:
        assert read_lease(run_url)["holder"] == second.holder


def test_two_jobs_starting_together_one_wins(run_url):
    """Both find no lease and write theirs; after the settle each reads back the last writer's
    id: exactly one holds the run, and the other is refused."""
    contenders = [RunLease(run_url, settle_s=0.5) for _ in range(2)]
    start = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def contend(lease: RunLease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcome[lease.holder] = "held"
        except LeaseError as err:
            outcome[lease.holder] = str(err)

    threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        held = [h for h, o in outcome.items() if o == "held"]
        assert len(held) == 1, outcome
        assert read_lease(run_url)["holder"] == held[0]
        (loser,) = [o for o in outcome.values() if o != "held"]
        assert "another job" in loser
    finally:
        for c in contenders:
            c.release()


def test_a_stale_lease_is_taken_over_and_its_holder_finds_out(run_url):
    dead = RunLease(run_url, heartbeat_s=3600, settle_s=0.05).acquire()  # never beats again
    try:
        time.sleep(0.3)
        taker = RunLease(run_url, stale_after_s=0.2, settle_s=0.05).acquire()
        assert read_lease(run_url)["holder"] == taker.holder
        with pytest.raises(LeaseError, match=f"no longer holds run .*held by job {taker.holder}"):
            check_holder(run_url, dead.holder)  # what the old job's workers check before a checkpoint
        taker.release()
    finally:
        dead.release()


def test_heartbeat_notices_a_lost_lease(run_url):
    lease = RunLease(run_url, heartbeat_s=0.1, settle_s=0.05).acquire()
    try:
        fs, root = filesystem(run_url)
        fs.pipe_file(join(root, LEASE), json.dumps({"holder": "intruder", "heartbeat": time.time()}).encode())
        deadline = time.time() + 30
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost and "held by job intruder" in lease.lost
    finally:
        lease.release()
    assert read_lease(run_url)["holder"] == "intruder", "release leaves another job's lease alone"


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    """A killed driver re-run on the same machine need not wait for the timeout."""
    url = f"file://{tmp_path}/run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(join(root, LEASE), json.dumps({
        "holder": "killed", "host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": time.time(),
    }).encode())
    with RunLease(url, settle_s=0.05) as lease:
        assert read_lease(url)["holder"] == lease.holder


def test_fit_refuses_a_run_another_job_holds_before_any_worker_starts(tmp_path):
    import ray

    from rsk_dist.config import load_config
    from rsk_dist.train import fit

    config = load_config({
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8},
        "model": {"in_channels": 1, "dim": 16}, "sampler": {"batch_size": 8},
        "run": {"name": "twin", "storage_path": f"file://{tmp_path}/runs"},
    })
    with RunLease(join(config.run.storage_path, "twin"), settle_s=0.05):
        with pytest.raises(LeaseError, match="run .*twin is being trained by another job"):
            fit(config)
    assert not ray.is_initialized()
