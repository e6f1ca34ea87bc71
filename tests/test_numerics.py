import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rsk_dist import numerics
from rsk_dist.losses import RecallAtKSurrogate


@pytest.fixture(autouse=True)
def restore_torch_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores it
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[1:4]
    torch.set_float32_matmul_precision(saved[4])


def test_configure_sets_the_determinism_and_tf32_flags():
    numerics.configure(deterministic=True, tf32=False)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    numerics.configure(deterministic=False, tf32=True)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"


def loss_value_and_grad(**kwargs):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40).repeat_interleave(4)
    emb = F.normalize(torch.randn(160, 16, generator=g) + torch.randn(40, 16, generator=g)[labels], dim=1)
    emb.requires_grad_()
    value = RecallAtKSurrogate(k=(1, 2, 4), simix=True, **kwargs)(emb, labels, generator=torch.Generator().manual_seed(1))
    value.backward()
    return value.detach(), emb.grad


def test_loss_runs_under_deterministic_algorithms_unchanged():
    # Deterministic mode also fills fresh tensors with NaN: the loss's reused buffers must be
    # written before they are read, and its scatter_add_/index_add_ allowed.
    expected = loss_value_and_grad()
    torch.use_deterministic_algorithms(True)
    got = loss_value_and_grad()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


class MatmulPrecisionProbe(TorchFunctionMode):
    """The global float32 matmul precision whenever the loss's autograd function is applied."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "apply" or func in (torch.mm, torch.bmm):
            self.seen.add(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tf32,inside", [(False, "highest"), (True, "high")])
def test_loss_sets_its_own_matmul_precision_and_restores_the_global_one(tf32, inside):
    torch.set_float32_matmul_precision("medium" if not tf32 else "highest")
    before = torch.get_float32_matmul_precision()
    with MatmulPrecisionProbe() as probe:
        loss_value_and_grad(tf32=tf32)
    assert probe.seen == {inside}
    assert torch.get_float32_matmul_precision() == before


def test_trainer_applies_the_settings_before_building_the_model(tmp_path, monkeypatch):
    import rsk_dist.train as train
    from rsk_dist.config import load_config

    seen = []
    build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **k: seen.append(torch.are_deterministic_algorithms_enabled()) or build(*a, **k))
    config = load_config({
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8},
        "model": {"in_channels": 1, "dim": 16}, "sampler": {"batch_size": 40},
        "train": {"epochs": 1, "steps_per_epoch": 1, "chunk_size": 20, "deterministic": True},
        "run": {"name": "det", "storage_path": f"file://{tmp_path}"},
    })
    metrics = []
    train.Trainer(config, torch.device("cpu")).run(lambda m, state: metrics.append(m))
    assert seen == [True] and metrics and 0 < metrics[-1]["loss"] < 1
