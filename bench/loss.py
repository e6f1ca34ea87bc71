"""RS@k forward+backward: seconds and peak memory growth, ours beside the naive form.

The naive form is how the authors' public code computes the loss: one query at a time, its
positives x N rank tensor built from repeated similarity rows and an explicit mask, a clamped
sigmoid, and autograd keeping every intermediate of every query until backward.

    python bench/loss.py [--device cpu|cuda] [--sizes 400 1000 2000 4096 8192 16384]
                         [--simix-sizes 4096 8192 16384] [--naive-max 4096] [--repeats 2]
                         [--growth-rounds 5] [--floor-sizes 4096]

It also prints how the time of ours grows from the smallest to the largest N >= 4096, as the
exponent e of N^e, with and without SiMix: at most 2 means no worse than N^2 at fixed P. On a
shared host the speed drifts by up to 1.6x between minutes, so those sizes run
``--growth-rounds`` more times in rounds, each round one run per size, in alternating order.
Each run does the same work at every N, (largest N / N)^2 losses back to back timed as their
mean, so that a short case cannot gain from catching the host in a fast second. Each round gives
an exponent from its own runs, minutes apart at most; their median is the one printed first,
then the exponent of each size's fastest run.

Last, at each ``--floor-sizes`` N, ours with the floors that keep the CPU out of subnormal
floats (recall.py) beside ours without them, on random and on trained-like embeddings.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.measure import in_subprocess, machine, measure, table  # noqa: E402

from rsk_dist.losses import DEFAULT_K, RecallAtKSurrogate, recall, simix  # noqa: E402

DIM, PER_CLASS = 512, 4


def naive_loss(emb: torch.Tensor, labels: torch.Tensor, tau1: float = 1.0, tau2: float = 0.01) -> torch.Tensor:
    def sigmoid(x: torch.Tensor, temp: float) -> torch.Tensor:
        return 1.0 / (1.0 + torch.exp(torch.clamp(-x / temp, min=-50, max=50)))

    n = emb.shape[0]
    sim = emb @ emb.T
    per_query = []
    for q in range(n):
        pos = torch.nonzero((labels == labels[q]) & (torch.arange(n, device=emb.device) != q)).squeeze(1)
        if pos.numel() == 0:
            continue
        p = pos.numel()
        mask = torch.ones(p, n, device=emb.device)
        mask[torch.arange(p), pos] = 0
        mask[:, q] = 0
        rows = sim[q].repeat(p, 1)
        diff = rows - sim[q, pos][:, None].repeat(1, n)
        rank = 1 + (sigmoid(diff, tau2) * mask).sum(1)
        recalls = [torch.clamp(sigmoid(k - rank, tau1).sum(), max=k) / min(k, p) for k in DEFAULT_K]
        per_query.append(1 - torch.stack(recalls).mean())
    return torch.stack(per_query).mean()


def embeddings(n: int, kind: str, device: str) -> torch.Tensor:
    """``random``: unit vectors (cosines near 0). ``trained``: each class's samples around a
    centre, same-class cosine about 0.8 against about 0 across classes, as after training; most
    sigmoid terms are then below 1e-35 (the CPU's subnormal range, see recall.py)."""
    torch.manual_seed(0)
    x = torch.randn(n, DIM, device=device)
    if kind == "trained":
        x = 0.5 * x + torch.randn(n // PER_CLASS, DIM, device=device).repeat_interleave(PER_CLASS, 0)
    return F.normalize(x, dim=1)


def run_case(impl: str, n: int, use_simix: bool, device: str, repeats: int, kind: str, floors: bool) -> dict:
    labels = torch.arange(n // PER_CLASS, device=device).repeat_interleave(PER_CLASS)
    emb = embeddings(n, kind, device).requires_grad_()
    ours = RecallAtKSurrogate(simix=use_simix)
    if not floors:
        # The previous loss: the clamp still runs, with no effect (one pass it did not make).
        recall.SIGMOID_ARG_FLOOR, recall.RANK_GRAD_FLOOR = -math.inf, 0.0

    def run() -> None:
        emb.grad = None
        g = torch.Generator(device=device).manual_seed(0)
        if impl == "ours":
            loss = ours(emb, labels, generator=g)
        else:
            loss = naive_loss(*simix.mix(emb, labels, g)) if use_simix else naive_loss(emb, labels)
        loss.backward()

    return measure(run, device, repeats=1 if impl == "naive" else repeats, warmup=impl == "ours" and repeats > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=[400, 1000, 2000, 4096, 8192, 16384])
    parser.add_argument("--simix-sizes", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--naive-max", type=int, default=4096, help="largest N (with SiMix: samples) to run the naive form at")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of ours (fastest counts); 1 also skips the warm-up")
    parser.add_argument(
        "--growth-rounds", type=int, default=5,
        help="rounds of runs of ours at N >= 4096 for the growth exponent (the rounds' median counts): a shared host's speed drifts between cases",
    )
    parser.add_argument(
        "--floor-sizes", type=int, nargs="*", default=[4096],
        help="N to time ours with and without the subnormal floors, on random and on trained-like embeddings",
    )
    parser.add_argument("--case", nargs=7, metavar=("IMPL", "N", "SIMIX", "DEVICE", "REPEATS", "KIND", "FLOORS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, n, use_simix, device, repeats, kind, floors = args.case
        print(json.dumps(run_case(impl, int(n), use_simix == "1", device, int(repeats), kind, floors == "1")))
        return

    cases = [(n, False) for n in args.sizes] + [(n, True) for n in args.simix_sizes]
    rows, ran = [], []
    for n, use_simix in cases:
        n_ext = simix.mixing(torch.arange(n // PER_CLASS).repeat_interleave(PER_CLASS)).labels.numel() if use_simix else n
        flag = "1" if use_simix else "0"
        ours = in_subprocess(__file__, ["ours", str(n), flag, args.device, str(args.repeats), "random", "1"])
        if "error" not in ours:
            ran.append((n, use_simix))
        naive = (
            in_subprocess(__file__, ["naive", str(n), flag, args.device, "1", "random", "1"])
            if n_ext <= args.naive_max
            else {"error": "not run (too large)"}
        )
        row = [f"{n}" + (f" + SiMix ({n_ext})" if use_simix else "")]
        for r in (ours, naive):
            row += [r["error"], "-"] if "error" in r else [f"{r['seconds']:.3f}", f"{r['peak_growth_mb']:.0f}"]
        if "error" in ours or "error" in naive:
            row += ["-", "-"]
        else:
            row += [f"{naive['seconds'] / ours['seconds']:.1f}x", f"{naive['peak_growth_mb'] / max(ours['peak_growth_mb'], 1):.1f}x"]
        rows.append(row)
        print(f"done N={n} simix={use_simix}", file=sys.stderr)
    print(f"RS@k forward+backward, d={DIM}, {PER_CLASS} per class, device {args.device}: {machine()}\n")
    print(table(
        ["N", "ours s", "ours MB", "naive s", "naive MB", "speed-up", "memory ratio"], rows
    ))
    large = [case for case in ran if case[0] >= 4096]
    largest = {flag: max(n for n, f in large if f == flag) for _, flag in large}
    runs: dict[tuple[int, bool], list[float]] = {case: [] for case in large}
    for r in range(args.growth_rounds):
        for n, use_simix in large[::-1] if r % 2 == 0 else large:
            # The same work at every N: (largest / N)^2 losses back to back, timed as their mean.
            repeats = round((largest[use_simix] / n) ** 2)
            again = in_subprocess(__file__, ["ours", str(n), "1" if use_simix else "0", args.device, str(repeats), "random", "1"])
            # A failed run leaves a gap that keeps the rounds aligned.
            runs[n, use_simix].append(math.nan if "error" in again else again["mean_seconds"])
    for use_simix in (False, True):
        grown = sorted(n for n, flag in runs if flag == use_simix)
        if len(grown) < 2 or not args.growth_rounds:
            continue
        lo, hi = grown[0], grown[-1]

        def exponent(t_lo: float, t_hi: float) -> float:
            return math.log(t_hi / t_lo) / math.log(hi / lo)

        per_round = [e for e in map(exponent, runs[lo, use_simix], runs[hi, use_simix]) if not math.isnan(e)]
        fastest = exponent(*(min((t for t in runs[n, use_simix] if not math.isnan(t)), default=math.nan) for n in (lo, hi)))
        print(
            f"\ntime of ours{' with SiMix' if use_simix else ''} from N = {lo} to {hi} grows as "
            f"N^{statistics.median(per_round) if per_round else math.nan:.2f}, the median of the rounds' "
            f"N^{', N^'.join(f'{e:.2f}' for e in per_round)} (fastest runs: N^{fastest:.2f}); seconds per loss: "
            + "; ".join(f"N = {n}: " + ", ".join(f"{t:.3f}" for t in runs[n, use_simix]) for n in grown)
        )
    floor_rows = []
    for n in args.floor_sizes:
        for use_simix in (False, True):
            flag = "1" if use_simix else "0"
            for kind in ("random", "trained"):
                off, on = (in_subprocess(__file__, ["ours", str(n), flag, args.device, str(args.repeats), kind, f]) for f in "01")
                row = [f"{n}" + (" + SiMix" if use_simix else ""), kind]
                row += [r.get("error") or f"{r['seconds']:.3f}" for r in (off, on)]
                row.append("-" if "error" in off or "error" in on else f"{off['seconds'] / on['seconds']:.1f}x")
                floor_rows.append(row)
    if floor_rows:
        print("\nSubnormal floors (recall.py), ours without them beside ours with them:\n")
        print(table(["N", "embeddings", "without floors s", "with floors s", "speed-up"], floor_rows))


if __name__ == "__main__":
    main()
