"""One training step of the small CNN against batch size: the two-pass step beside single-pass
backprop, seconds per step and peak memory growth.

Two-pass is ``LargeBatchStep(model, loss, chunk_size).step(images, labels)`` (spec §3); single
pass is ``loss(model(images), labels).backward()``, autograd keeping the whole batch's
activations. Model ``small_cnn`` (dim 128, 1 channel), random 1 x 28 x 28 images (Omniglot's
size), 4 images per class, loss RS@k with tau2 = 0.003 (no SiMix). Every case runs in a fresh
process (bench/measure.py); seconds are the fastest of ``--repeats`` steps after one warm-up.

Peak memory growth is peak RSS on CPU (peak allocated on CUDA) over what the process holds just
before the first step: the model and the images tensor exist by then, so the images themselves
are not counted, and one step on 8 images has run, so that libtorch's code pages and thread
pools (the same at every batch) are not counted either. What two-pass memory still grows with the batch is the loss's: N x d
embeddings and the N x N similarities and their gradient, which are the batch's own and do not
depend on the model.

    python bench/step.py [--device cpu|cuda] [--sizes 256 512 1024 2048 4096 8192]
                         [--chunk 256] [--single-max 8192] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.measure import in_subprocess, machine, measure, table  # noqa: E402
from rsk_dist.engine import LargeBatchStep  # noqa: E402
from rsk_dist.losses import RecallAtKSurrogate  # noqa: E402
from rsk_dist.models import build_model  # noqa: E402

DIM, PER_CLASS, IMAGE_SIZE, TAU2 = 128, 4, 28, 0.003


def run_case(impl: str, n: int, chunk: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model("small_cnn", dim=DIM, in_channels=1).to(device)
    loss = RecallAtKSurrogate(tau2=TAU2)
    # Created before measure() takes its baseline: the batch's pixels are an input, not a cost.
    images = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    labels = torch.arange(n // PER_CLASS, device=device).repeat_interleave(PER_CLASS)
    two_pass = LargeBatchStep(model, loss, chunk_size=chunk)

    def run(x: torch.Tensor = images, y: torch.Tensor = labels) -> None:
        model.zero_grad(set_to_none=True)
        if impl == "two-pass":
            two_pass.step(x, y)
        else:
            loss(model(x), y).backward()

    # A step on 8 images first: the first step also pages in libtorch code and sets up thread
    # pools (tens of MB of RSS, the same at every batch), which is not the step's memory.
    run(images[: 2 * PER_CLASS], labels[: 2 * PER_CLASS])
    return measure(run, device, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192],
                        help="batch sizes (multiples of 4)")
    parser.add_argument("--chunk", type=int, default=256, help="two-pass chunk size, the same at every batch")
    parser.add_argument("--single-max", type=int, default=8192,
                        help="largest batch to run single pass at (a failure, e.g. out of memory, shows as an error)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case, after one warm-up")
    parser.add_argument("--case", nargs=5, metavar=("IMPL", "N", "CHUNK", "DEVICE", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, n, chunk, device, repeats = args.case
        print(json.dumps(run_case(impl, int(n), int(chunk), device, int(repeats))))
        return

    rows, two_pass_mb = [], []
    for n in args.sizes:
        case = [str(n), str(args.chunk), args.device, str(args.repeats)]
        ours = in_subprocess(__file__, ["two-pass", *case])
        single = in_subprocess(__file__, ["single", *case]) if n <= args.single_max else {"error": "not run"}
        row = [str(n)]
        for r in (ours, single):
            row += [r["error"], "-"] if "error" in r else [f"{r['seconds']:.3f}", f"{r['peak_growth_mb']:.0f}"]
        if "error" in ours or "error" in single:
            row += ["-", "-"]
        else:
            row += [f"{ours['seconds'] / single['seconds']:.2f}x",
                    f"{single['peak_growth_mb'] / max(ours['peak_growth_mb'], 1):.1f}x"]
        rows.append(row)
        if "error" not in ours:
            two_pass_mb.append((n, ours["peak_growth_mb"]))
        print(f"done N={n}", file=sys.stderr)
    print(f"Training step, small_cnn dim {DIM}, 1x{IMAGE_SIZE}x{IMAGE_SIZE}, {PER_CLASS} per class, RS@k tau2={TAU2}, "
          f"two-pass chunk {args.chunk}, device {args.device}: {machine()}\n")
    print(table(["batch", "two-pass s/step", "two-pass MB", "single s/step", "single MB",
                 "time ratio (two-pass / single)", "memory ratio (single / two-pass)"], rows))
    if len(two_pass_mb) >= 2:
        (n0, mb0), (n1, mb1) = two_pass_mb[0], two_pass_mb[-1]
        print(f"\nTwo-pass peak memory growth from batch {n0} to {n1}: {100 * (mb1 - mb0) / max(mb0, 1):+.0f}% "
              f"({mb0:.0f} MB -> {mb1:.0f} MB)")


if __name__ == "__main__":
    main()
