"""Object storage and failures end to end: moto S3 on 127.0.0.1, a real local Ray cluster,
real SIGKILLs. A resumed job must end with the parameters of an uninterrupted one."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ray

from rsk_dist.checkpoint import CheckpointError, load_state  # noqa: E402
from rsk_dist.config import load_config  # noqa: E402
from rsk_dist.ingest import ingest  # noqa: E402
from rsk_dist.storage import StorageError, filesystem, join  # noqa: E402
from rsk_dist.train import evaluate_checkpoint, fit  # noqa: E402
from tests.reference import EXACT  # noqa: E402

# RSK_OMNIGLOT: where the zips are when the checkout is not beside shared/ (a git worktree)
OMNIGLOT = Path(os.environ.get("RSK_OMNIGLOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def omniglot(s3):
    """Both Omniglot subsets ingested into the moto bucket: (train URL, test URL)."""
    if not OMNIGLOT.exists():
        pytest.skip(f"{OMNIGLOT} not present")
    train, test = s3.url("omniglot/small1"), s3.url("omniglot/small2")
    ingest(str(OMNIGLOT / "images_background_small1.zip"), train, "folders")
    ingest(str(OMNIGLOT / "images_background_small2.zip"), test, "folders", default_split="test")
    return train, test


@pytest.fixture(scope="module")
def local_ray(s3):
    # After the s3 fixture: Ray's workers inherit the AWS_* environment that points at moto.
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def config(storage: str, name: str, train_url: str, test_url: str | None = None, **run):
    tree = {
        "data": {"train": {"kind": "shards", "url": train_url, "split": "train"}, "image_size": 20},
        # float64: resumed and uninterrupted runs must agree exactly (see tests/reference.EXACT)
        "model": {"in_channels": 1, "dim": 32, "dtype": "float64"},
        "loss": {"k": [1, 2, 4], "tau2": 0.003, "simix": True},
        "sampler": {"batch_size": 32, "seed": 5},
        # SGD: linear in the gradient, so resumed and uninterrupted runs agree to float rounding.
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 3, "steps_per_epoch": 2, "chunk_size": 16},
        "scaling": {"num_workers": 2},
        "run": {"name": name, "storage_path": storage, "keep_checkpoints": 2, **run},
    }
    if test_url:
        tree["data"]["eval"] = {"kind": "shards", "url": test_url, "split": "test", "exclude_classes": ["Greek", "Latin"]}
    return load_config(tree)


def assert_same_model(a: dict, b: dict) -> None:
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=EXACT, atol=EXACT, msg=lambda m: f"{name}: {m}")


def wait_for(path_url: str, timeout: float = 300) -> None:
    fs, path = filesystem(path_url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(path):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path_url} did not appear")


def train_worker_pids(session: int | None = None) -> list[int]:
    """Ray Train worker processes (of one driver's session, if given)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes() and (
                    session is None or os.getsid(int(entry.name)) == session
                ):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def driver(cfg, tmp_path: Path, **popen) -> tuple[list[str], dict]:
    """The command and environment of a job's own driver process (its own local Ray cluster)."""
    from rsk_dist.config import dump_config

    path = tmp_path / f"{cfg.run.name}.yaml"
    path.write_text(dump_config(cfg))
    code = f"from rsk_dist.config import load_config; from rsk_dist.train import fit; fit(load_config({str(path)!r}))"
    return [sys.executable, "-c", code], {**os.environ, "RAY_ADDRESS": ""}


@pytest.fixture(scope="module")
def uninterrupted(s3, omniglot, local_ray):
    """The uninterrupted run the interrupted ones must end as, evaluated after each epoch:
    evaluation draws no random numbers and restores training mode, so the interrupted runs
    (no evaluation) must still end with exactly its parameters; one run serves both."""
    storage = s3.url("runs")
    result = fit(config(storage, "clean", *omniglot))
    return storage, result


def test_train_on_s3_with_s3_checkpoints_and_evaluate(s3, omniglot, uninterrupted):
    storage, result = uninterrupted
    assert result["checkpoint"] is not None and "checkpoint_epoch_00003" in result["checkpoint"]
    assert 0 < result["recall@1"] <= 1
    fs, root = filesystem(join(storage, "clean"))
    fs.invalidate_cache()
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root) if "checkpoint_epoch" in p)
    assert kept == ["checkpoint_epoch_00002", "checkpoint_epoch_00003"], "the last K=2 are kept"
    best = load_state(join(storage, "clean", "best"))
    history = load_state(result["checkpoint"])["history"]
    assert len(history) == 3 and best["metrics"]["recall@1"] == max(h["recall@1"] for h in history)
    # The evaluation command's path: the best model, evaluated again from storage.
    spec = config(storage, "clean", *omniglot).data.eval
    metrics = evaluate_checkpoint(join(storage, "clean", "best"), spec)
    assert metrics["recall@1"] == pytest.approx(best["metrics"]["recall@1"], abs=1e-9)


def test_sigkilled_worker_is_replaced_and_training_ends_as_uninterrupted(s3, omniglot, uninterrupted, tmp_path):
    storage, clean = uninterrupted
    cmd, env = driver(config(storage, "worker-kill", omniglot[0], max_failures=2), tmp_path)
    # In its own session, so that its workers can be told from other jobs' and all be cleaned up.
    job = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(join(storage, "worker-kill", "checkpoint_epoch_00001", "manifest.json"))
        victims = train_worker_pids(job.pid)
        assert len(victims) == 2
        os.kill(victims[-1], signal.SIGKILL)
        fs, root = filesystem(join(storage, "worker-kill"))
        assert not fs.exists(join(root, "checkpoint_epoch_00003")), "the worker was killed mid-run"
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-3000:]
    assert_same_model(load_state(clean["checkpoint"]), load_state(join(storage, "worker-kill", "checkpoint_epoch_00003")))


def printed_steps(output: str) -> list[int]:
    """The global steps a run printed (rank 0 prints every step: log_every is 1), once per
    worker process that ran them (Ray may forward a line twice)."""
    pairs = set(re.findall(r"pid=(\d+)\S* \[rsk-dist\] epoch \d+/\d+ step (\d+)/", output))
    return sorted(int(step) for _, step in pairs)


def test_killed_driver_rerun_resumes_mid_epoch_and_ends_as_uninterrupted(s3, omniglot, uninterrupted, tmp_path):
    storage, clean = uninterrupted
    cmd, env = driver(config(storage, "driver-kill", omniglot[0], checkpoint_every_steps=1), tmp_path)
    log = tmp_path / "killed.log"
    # SIGKILL to the driver's whole session: driver, its raylet and its workers die at once.
    with log.open("w") as out:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Step 3 of 6: mid-epoch (epoch 2, step 1).
            wait_for(join(storage, "driver-kill", "checkpoint_epoch_00001_step_00001", "manifest.json"))
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    fs, root = filesystem(join(storage, "driver-kill"))
    assert not fs.exists(join(root, "checkpoint_epoch_00003")), "the driver was killed mid-run"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_model(load_state(clean["checkpoint"]), load_state(join(storage, "driver-kill", "checkpoint_epoch_00003")))
    before, after = printed_steps(log.read_text()), printed_steps(rerun.stdout + rerun.stderr)
    assert 3 in before and after and after[-1] == 6
    assert min(after) >= 4 - 1, "the re-run resumes within the epoch, not from its start"
    assert len(set(before) & set(after)) <= 1, "at most checkpoint_every_steps steps are repeated"


def test_sigterm_to_a_worker_checkpoints_that_step_and_the_retry_resumes_from_it(s3, omniglot, uninterrupted, tmp_path):
    storage, clean = uninterrupted
    # Checkpoints at the last epoch only: any other one is the preemption's.
    cfg = config(storage, "preempted", omniglot[0], checkpoint_every=3, max_failures=1)
    cmd, env = driver(cfg, tmp_path)
    job = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in job.stdout:
            output.append(line)
            if printed_steps(line):
                break
        victims = train_worker_pids(job.pid)
        assert len(victims) == 2
        os.kill(victims[-1], signal.SIGTERM)
        output.append(job.communicate(timeout=600)[0])
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = "".join(output)
    assert job.returncode == 0, out[-3000:]
    fs, root = filesystem(join(storage, "preempted"))
    fs.invalidate_cache()
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root) if "checkpoint_epoch" in p)
    assert len(kept) == 2 and kept[-1] == "checkpoint_epoch_00003", kept
    preempted = load_state(join(storage, "preempted", kept[0]))
    at = preempted["epoch"] * 2 + preempted["step"]
    # The notice lands after rank 0 printed step 1: before the victim's own check at the end of
    # step 1 (that step is checkpointed) or during a later step (that one is).
    assert 1 <= at < 6, "the checkpoint of the step in which the notice came"
    # Every step ran once: the retry went on from the preemption's step.
    assert sorted(printed_steps(out)) == list(range(1, 7)), out[-3000:]
    assert_same_model(load_state(clean["checkpoint"]), load_state(join(storage, "preempted", "checkpoint_epoch_00003")))


def test_interrupted_upload_is_never_resumed_from(s3, omniglot, uninterrupted):
    storage, clean = uninterrupted
    fs, root = filesystem(join(storage, "clean"))
    good = join(root, "checkpoint_epoch_00002", "state.pt")
    # An upload cut off half-way: half the state, no manifest, under a later epoch's name.
    partial = join(storage, "partial", "checkpoint_epoch_00009")
    pfs, ppath = filesystem(partial)
    pfs.pipe_file(join(ppath, "state.pt"), fs.cat_file(good)[: fs.size(good) // 2])
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_state(partial)
    # Resuming from it is refused before any worker starts, and nothing is written.
    with pytest.raises(CheckpointError):
        fit(config(storage, "from-partial", omniglot[0]), resume_from=partial)
    assert not filesystem(join(storage, "from-partial"))[0].exists(filesystem(join(storage, "from-partial"))[1])
    # A manifest that does not match its state (truncated after the manifest was written).
    pfs.pipe_file(join(ppath, "manifest.json"), fs.cat_file(join(root, "checkpoint_epoch_00002", "manifest.json")))
    with pytest.raises(CheckpointError, match="does not match"):
        load_state(partial)
    # A re-run of a finished job with a partial upload beside its checkpoints loads the last
    # complete checkpoint Ray registered, not the partial one, and ends where it ended.
    stray = join(root, "checkpoint_epoch_00009")
    pfs.pipe_file(join(stray, "state.pt"), fs.cat_file(good)[:100])
    try:
        result = fit(config(storage, "clean", *omniglot))
    finally:
        fs.rm(stray, recursive=True)  # the shared run's listing, as other tests see it
    assert "checkpoint_epoch_00003" in result["checkpoint"]
    assert_same_model(load_state(clean["checkpoint"]), load_state(result["checkpoint"]))


def test_bad_storage_is_rejected_before_any_worker_starts(s3, omniglot, local_ray):
    secret = s3.secret_key
    cases = [
        (config("s3://no-such-bucket-here/runs", "x", omniglot[0]), "no-such-bucket-here"),
        (config(s3.url("runs"), "x", s3.url("no-dataset")), "index"),
    ]
    for cfg, needle in cases:
        with pytest.raises(StorageError, match=needle) as err:
            fit(cfg)
        assert secret not in str(err.value)
    assert not train_worker_pids()
