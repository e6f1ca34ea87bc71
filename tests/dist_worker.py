"""Training used by the distributed tests: importable, so that spawned processes can run it."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rsk_dist.distributed import GlobalBatchLoss
from rsk_dist.engine import LargeBatchStep
from rsk_dist.losses import RecallAtKSurrogate
from rsk_dist.data.sources import MemorySource
from rsk_dist.loop import train_step
from rsk_dist.sampler import ClassBalancedSampler

BATCH = 32
CONFIGS = [(mode, simix) for mode in ("replicated", "sharded") for simix in (False, True)]


class MLP(nn.Module):
    # No dropout: W workers draw W different dropout streams, which one process cannot replay.
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


def dataset() -> MemorySource:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24).repeat_interleave(6)
    images = torch.randn(labels.numel(), 12, generator=g) + 0.3 * torch.randn(24, 12, generator=g)[labels]
    # float64: W workers against one process is an exactness claim (see tests/reference.EXACT)
    return MemorySource(images.double(), labels)


def train(mode: str, simix: bool, steps: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Initial and final parameters after ``steps`` SGD steps on the global batches."""
    torch.manual_seed(0)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    data = dataset()
    sampler = ClassBalancedSampler(data.labels, BATCH, samples_per_class=4, seed=1)
    loss = GlobalBatchLoss(RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05, simix=simix), mode)
    step = LargeBatchStep(model, loss, chunk_size=3)
    # SGD: its update is linear in the gradient, so equal gradients mean equal parameters
    # (Adam's sign-like first steps would amplify float rounding of near-zero gradients).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for s in range(steps):
        train_step(step, optimizer, sampler, data, epoch=0, step_in_epoch=s)
    return initial, [p.detach().clone() for p in model.parameters()]


def init_group(rank: int, world: int, out_dir: str) -> None:
    """gloo over a rendezvous file in the test's own directory: a free TCP port picked by the
    parent could be taken by another process before the workers bind it."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)


def run_worker(rank: int, world: int, out_dir: str) -> None:
    init_group(rank, world, out_dir)
    try:
        for mode, simix in CONFIGS:
            _, final = train(mode, simix)
            torch.save(final, Path(out_dir) / f"rank{rank}_{mode}_{simix}.pt")
    finally:
        dist.destroy_process_group()


def run_refusal_worker(rank: int, world: int, out_dir: str) -> None:
    """Writes the errors GlobalBatchLoss gives for SiMix without a generator and for shards
    that do not follow shard_bounds."""
    init_group(rank, world, out_dir)
    errors = []
    try:
        loss = GlobalBatchLoss(RecallAtKSurrogate(simix=True))
        emb = F.normalize(torch.randn(2 + 2 * rank, 4), dim=1)
        labels = torch.arange(emb.shape[0]) // 2
        for generator in (None, torch.Generator().manual_seed(0)):
            try:
                loss(emb, labels, generator)
            except ValueError as e:
                errors.append(str(e))
        torch.save(errors, Path(out_dir) / f"refusal{rank}.pt")
    finally:
        dist.destroy_process_group()


def eval_model() -> tuple[nn.Module, MemorySource]:
    from rsk_dist.data.sources import digits_split
    from rsk_dist.models import build_model

    torch.manual_seed(0)
    return build_model("small_cnn", dim=32, in_channels=1), digits_split("test")


def run_eval_worker(rank: int, world: int, out_dir: str, chunk: int) -> None:
    from rsk_dist.evaluate import embed_source, evaluate

    init_group(rank, world, out_dir)
    try:
        model, source = eval_model()
        metrics = evaluate(model, source, ks=(1, 2, 4, 8), chunk_size=chunk)
        emb, labels = embed_source(model, source, chunk_size=chunk)
        torch.save({"metrics": metrics, "emb": emb, "labels": labels}, Path(out_dir) / f"eval{rank}.pt")
    finally:
        dist.destroy_process_group()


# Asymmetric RS@k: a batch of 32 in unsorted classes of unequal size with singletons (classes
# split between workers), and one of 8 classes of 4 in order (no class split for W = 2, 4).
ASYMMETRIC_BATCHES = {
    "unequal": [5, 0, 2, 5, 1, 0, 5, 7, 1, 5, 0, 3, 5, 1, 4, 2, 2, 0, 6, 3, 3, 1, 2, 8, 6, 6, 0, 9, 4, 4, 2, 1],
    "aligned": [c for c in range(8) for _ in range(4)],
}
ASYMMETRIC_CONFIGS = [
    (b, mode, simix, "rsk") for b in ASYMMETRIC_BATCHES for mode in ("replicated", "sharded") for simix in (False, True)
] + [("unequal", "replicated", False, name) for name in ("contrastive", "regression")]


def asymmetric_loss(name: str, simix: bool) -> nn.Module:
    from rsk_dist.losses import MetricLearningLoss, Regression

    if name == "rsk":
        return RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05, simix=simix, asymmetric=True)
    return Regression() if name == "regression" else MetricLearningLoss(name, asymmetric=True, pos_margin=0.3, neg_margin=1.3)


def asymmetric_gradient(batch: str, mode: str, simix: bool, name: str, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """An asymmetric loss of the batch through GlobalBatchLoss, for this worker's ``rows``: the
    global loss, the gradient of those rows of the student, the bytes received."""
    labels = torch.tensor(ASYMMETRIC_BATCHES[batch])
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 8, generator=g)
    student = F.normalize(centres[labels] + 0.5 * torch.randn(32, 8, generator=g), dim=1)
    teacher = F.normalize(centres[labels] + 0.5 * torch.randn(32, 8, generator=g), dim=1)
    loss = GlobalBatchLoss(asymmetric_loss(name, simix), mode)
    mine = student[rows].clone().requires_grad_()
    value = loss(mine, labels[rows], torch.Generator().manual_seed(7), gallery=teacher[rows])
    value.backward()
    return {"loss": value.detach(), "grad": mine.grad, "bytes": torch.tensor(loss.stats.get("bytes_received", 0.0))}


def run_asymmetric_worker(rank: int, world: int, out_dir: str) -> None:
    from rsk_dist.sampler import shard_bounds

    init_group(rank, world, out_dir)
    try:
        bounds = shard_bounds(32, world)
        out = {c: asymmetric_gradient(*c, rows=slice(bounds[rank], bounds[rank + 1])) for c in ASYMMETRIC_CONFIGS}
        torch.save(out, Path(out_dir) / f"asymmetric{rank}.pt")
    finally:
        dist.destroy_process_group()
