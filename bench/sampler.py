"""The sampler at paper scale: time to compute a global batch of B = 65536, and what one epoch
of a long-tailed label set sees, for the two sampler modes.

Baseline: the former sampler's loop, one ``randperm`` per drawn class in Python, in the same run.

    python bench/sampler.py [--repeats 3]
"""
from __future__ import annotations

import argparse
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


def best(run: Callable[[int], object], repeats: int) -> float:
    """Fastest of ``repeats`` calls, each given a fresh key so that no memo answers it."""
    times = []
    for key in range(repeats):
        t0 = time.perf_counter()
        run(key)
        times.append(time.perf_counter() - t0)
    return min(times)


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
    t0 = time.perf_counter()
    baseline = loop_baseline(labels, batch)
    base_build = time.perf_counter() - t0
    base = best(baseline, repeats)
    t0 = time.perf_counter()
    epoch = ClassBalancedSampler(labels, batch, M, mode="epoch")
    build = time.perf_counter() - t0
    uniform = ClassBalancedSampler(labels, batch, M, mode="uniform")
    steps = epoch.steps_per_epoch
    cold = best(lambda e: epoch.global_batch(e, 0), repeats)
    whole = best(lambda e: [epoch.global_batch(100 + e, s) for s in range(steps)], repeats) / steps
    memo = best(lambda s: epoch.global_batch(0, s % steps), repeats)
    uni = best(lambda s: uniform.global_batch(0, s), repeats)
    n = f"{len(labels):,} labels, {classes:,} classes"
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    return [
        [n, "loop baseline (former sampler), any step", ms(base), "1.0x", ms(base_build)],
        [n, "uniform mode, any step", ms(uni), f"{base / uni:.0f}x", ms(build)],
        [n, f"epoch mode, first step of an epoch (lays out all {steps} steps)", ms(cold), f"{base / cold:.0f}x", ms(build)],
        [n, "epoch mode, per step over a whole epoch", ms(whole), f"{base / whole:.0f}x", ms(build)],
        [n, "epoch mode, a step already laid out (prefetched)", ms(memo), f"{base / memo:.0f}x", ms(build)],
    ]


def coverage_rows(batch: int) -> list[list[str]]:
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
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print(f"global batch of 65536 (m = {M}), best of {args.repeats}; ratio = baseline / ours\n")
    rows = timing_rows(20000, 65536, args.repeats) + timing_rows(50000, 65536, args.repeats)
    print(table(["data", "sampler", "ms per global batch", "speed-up", "construction ms"], rows))
    print("\none epoch of 2000 classes of 4 to 404 images (403,979 images), B = 4000, m = 4\n")
    print(table(
        ["mode", "steps per epoch", "% of images seen", "% seen more than once",
         "uses per image, classes < 20 images", "uses per image, classes >= 200 images"],
        coverage_rows(4000),
    ))


if __name__ == "__main__":
    main()
