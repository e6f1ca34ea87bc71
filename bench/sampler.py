"""The sampler at paper scale: time to compute a global batch of B = 65536, and what one epoch
of a long-tailed label set sees, for the two sampler modes.

Baseline: the former sampler's loop, one ``randperm`` per drawn class in Python, in the same run.

    python bench/sampler.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.measure import machine, table  # noqa: E402
from rsk_dist.grouping import LabelGroups  # noqa: E402
from rsk_dist.sampler import ClassBalancedSampler  # noqa: E402

M = 4


def best(run: Callable[[int], object], repeats: int) -> tuple[float, float]:
    """Fastest wall and process CPU seconds of ``repeats`` calls, each given a fresh key so that
    no memo answers it. CPU time leaves out the other tenants of a shared machine."""
    wall, cpu = [], []
    for key in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        run(key)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def loop_baseline(labels: torch.Tensor, batch: int) -> Callable[[int], torch.Tensor]:
    members = [idx for idx in LabelGroups(labels).members() if idx.numel() >= M]

    def global_batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        chosen = torch.randperm(len(members), generator=g)[: batch // M]
        return torch.cat([members[c][torch.randperm(members[c].numel(), generator=g)[:M]] for c in chosen.tolist()])

    return global_batch


def timing_rows(classes: int, batch: int, repeats: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.permutation(np.repeat(np.arange(classes), rng.integers(4, 37, classes))))
    baseline: list[Callable[[], object]] = []
    base_build = best(lambda _: baseline.append(loop_baseline(labels, batch)), 1)
    samplers: dict[str, ClassBalancedSampler] = {}
    build = best(lambda _: samplers.update(epoch=ClassBalancedSampler(labels, batch, M, mode="epoch")), 1)
    uniform = ClassBalancedSampler(labels, batch, M, mode="uniform")
    epoch = samplers["epoch"]
    steps = epoch.steps_per_epoch
    base = best(baseline[0], repeats)
    cases = [
        ("uniform mode, any step", best(lambda s: uniform.global_batch(0, s), repeats), 1),
        (f"epoch mode, first step of an epoch (lays out all {steps} steps)",
         best(lambda e: epoch.global_batch(e, 0), repeats), 1),
        ("epoch mode, per step over a whole epoch",
         best(lambda e: [epoch.global_batch(100 + e, s) for s in range(steps)], repeats), steps),
        ("epoch mode, a step already laid out (prefetched)", best(lambda s: epoch.global_batch(0, s % steps), repeats), 1),
    ]
    n = f"{len(labels):,} labels, {classes:,} classes"
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    rows = [[n, "loop baseline (former sampler), any step", ms(base[0]), ms(base[1]), "1x", ms(base_build[1])]]
    for name, (wall, cpu), per in cases:
        rows.append([n, name, ms(wall / per), ms(cpu / per), f"{base[1] * per / max(cpu, 1e-6):.0f}x", ms(build[1])])
    return rows


def coverage_rows(batch: int) -> tuple[int, list[list[str]]]:
    sizes = np.random.default_rng(0).integers(4, 405, 2000)
    labels = torch.from_numpy(np.random.default_rng(1).permutation(np.repeat(np.arange(2000), sizes)))
    rows = []
    for mode in ("uniform", "epoch"):
        sampler = ClassBalancedSampler(labels, batch, M, seed=0, mode=mode)
        drawn = torch.cat([sampler.global_batch(0, s) for s in range(sampler.steps_per_epoch)])
        uses = torch.bincount(drawn, minlength=len(labels)).numpy()
        size_of = sizes[labels.numpy()]
        rows.append([
            mode, str(sampler.steps_per_epoch), f"{100 * (uses > 0).mean():.1f}", f"{100 * (uses > 1).mean():.1f}",
            f"{uses[size_of < 20].mean():.2f}", f"{uses[size_of >= 200].mean():.2f}",
        ])
    return len(labels), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start\n")
    print(f"global batch of 65536 (m = {M}), best of {args.repeats}; ratio = baseline / ours\n")
    rows = timing_rows(20000, 65536, args.repeats) + timing_rows(50000, 65536, args.repeats)
    print(table(["data", "sampler", "wall ms per global batch", "CPU ms", "speed-up (CPU)", "construction CPU ms"], rows))
    images, rows = coverage_rows(4000)
    print(f"\none epoch of 2000 classes of 4 to 404 images ({images:,} images), B = 4000, m = 4\n")
    print(table(
        ["mode", "steps per epoch", "% of images seen", "% seen more than once",
         "uses per image, classes < 20 images", "uses per image, classes >= 200 images"],
        rows,
    ))


if __name__ == "__main__":
    main()
