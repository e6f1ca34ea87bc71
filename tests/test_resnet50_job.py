"""The paper's ResNet-50 end to end, at a CPU-sized 32 px: a Ray Train job of two gloo workers
reads RGB shards from moto S3, writes its checkpoint there, and ``rsk-dist eval`` reads it. And
on the same shards, asymmetric training: a small student against a teacher checkpoint on S3."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray
import torch

from rsk_dist.checkpoint import load_state, publish_state
from rsk_dist.config import load_config
from rsk_dist.ingest import ingest
from rsk_dist.models import build_model
from rsk_dist.train import fit
from tests.images import image_bytes

SIZE = 32


@pytest.fixture(scope="module")
def rgb_shards(s3, tmp_path_factory) -> str:
    """6 classes x 4 RGB images for training and 3 x 4 others for testing, ingested into moto."""
    root = tmp_path_factory.mktemp("rgb")
    for split, classes in (("train", range(6)), ("test", range(6, 9))):
        for c in classes:
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                (folder / f"{i}.png").write_bytes(image_bytes(100 * c + i, size=(40, 36)))
    url = s3.url("rgb-shards")
    ingest(str(root), url, "folders")
    return url


def rsk_dist_eval(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "rsk_dist.cli", "eval", *args], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=600)
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("metrics ")]
    return json.loads(line[len("metrics "):])


def test_resnet50_trains_on_ray_from_s3_shards_and_its_checkpoint_evaluates(s3, rgb_shards):
    storage = s3.url("runs-resnet50")
    config = load_config({
        "data": {"train": {"kind": "shards", "url": rgb_shards, "split": "train"}, "image_size": SIZE},
        "model": {"name": "resnet50", "dim": 32},
        "sampler": {"batch_size": 8, "samples_per_class": 2, "seed": 1},
        "train": {"epochs": 1, "steps_per_epoch": 2, "chunk_size": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": "r50", "storage_path": storage},
    })
    # After the s3 fixture: Ray's workers inherit the AWS_* environment that points at moto.
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = fit(config)
    finally:
        ray.shutdown()
    assert result["checkpoint"].startswith(storage) and "checkpoint_epoch_00001" in result["checkpoint"]
    state = load_state(result["checkpoint"])
    assert state["epoch"] == 1 and state["config"]["model"]["name"] == "resnet50"
    assert "backbone.7.2.conv3.weight" in state["model"]  # ResNet-50's last bottleneck
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    metrics = rsk_dist_eval(result["checkpoint"], "--data", f"shards:{rgb_shards}:test", "--k", "1", "2")
    assert 0 <= metrics["recall@1"] <= metrics["recall@2"] <= 1


def test_student_trains_against_a_teacher_checkpoint_on_s3_and_evaluates_in_three_settings(s3, rgb_shards):
    def job(name: str, **sections) -> dict:
        return {
            "data": {"train": {"kind": "shards", "url": rgb_shards, "split": "train"},
                     "eval": {"kind": "shards", "url": rgb_shards, "split": "test"}, "image_size": SIZE},
            "sampler": {"batch_size": 8, "samples_per_class": 2, "seed": 1},
            "train": {"epochs": 1, "steps_per_epoch": 2, "chunk_size": 4, "eval_k": [1, 2]},
            "scaling": {"num_workers": 2},
            "run": {"name": name, "storage_path": s3.url("runs-asymmetric")},
            **sections,
        }

    torch.manual_seed(0)
    teacher_url = s3.url("teachers") + "/wide"
    teacher = build_model("small_cnn", dim=16, width=24)
    publish_state(teacher_url, {"model": teacher.state_dict(), "epoch": 1, "step": 0,
                                "config": load_config(job("teacher", model={"dim": 16, "width": 24})).model_dump(mode="json")})
    config = load_config(job("student", model={"dim": 16, "width": 8}, teacher={"checkpoint": teacher_url},
                             loss={"asymmetric": True, "simix": True, "mode": "sharded", "k": [1, 2], "tau2": 0.05}))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = fit(config)
    finally:
        ray.shutdown()
    for prefix in ("", "asymmetric_", "teacher_"):  # eval during training, every setting
        assert 0 <= result[prefix + "recall@1"] <= result[prefix + "recall@2"] <= 1, prefix
    assert load_state(result["checkpoint"])["config"]["teacher"]["checkpoint"] == teacher_url
    metrics = rsk_dist_eval(result["checkpoint"], "--data", f"shards:{rgb_shards}:test", "--k", "1", "2",
                            "--gallery-model", teacher_url)
    for key in ("recall@1", "map@r", "asymmetric_recall@1", "asymmetric_map@r", "teacher_recall@1", "teacher_map@r"):
        assert metrics[key] == pytest.approx(result[key], abs=1e-9), key
