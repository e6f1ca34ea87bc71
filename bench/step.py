"""One training step against batch size: the two-pass step beside single-pass backprop, seconds
per step and peak memory growth; the small CNN over a range of batches, and the paper's ResNet-50
(frozen BatchNorm) at 224 px on a small batch, on the CPU and, with ``--device cuda``, on the GPU too.

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

ResNet-50: 3 x 224 x 224 random images, dim 512, the same loss; ``--resnet50-batch`` images in
chunks of ``--resnet50-chunk``. ``--autocast bf16`` runs both forwards under autocast.

Asymmetric (``--models asymmetric``): the study's student (small CNN of width ``STUDENT_WIDTH``)
trained alone (symmetric RS@k) beside the same student against a frozen teacher (width
``TEACHER_WIDTH``, asymmetric RS@k): the step's time and memory, and the teacher's forward alone,
at ``--asymmetric-sizes``; and the asymmetric step with every sample's teacher embedding cached
(``teacher.cache_embeddings``, unaugmented data: after the first epoch no teacher forward runs). Then the bytes a worker receives per step for the loss in sharded
mode (the parameter gradients' all-reduce is the same in both): symmetric, the other workers'
embeddings and the gradient exchange; asymmetric, the other workers' teacher rows only (without
SiMix, or with SiMix when no class is split between workers; tests/test_distributed.py checks
these counts on gloo workers).

    python bench/step.py [--device cpu|cuda] [--models small_cnn resnet50 asymmetric] [--autocast none|bf16|fp16]
                         [--sizes 256 512 1024 2048 4096 8192] [--chunk 256] [--single-max 8192]
                         [--resnet50-batch 8] [--resnet50-chunk 2] [--repeats 2]
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
from rsk_dist.teacher import TeacherCache, freeze  # noqa: E402

PER_CLASS, TAU2 = 4, 0.003
# name: (embedding dim, channels, image size)
MODELS = {"small_cnn": (128, 1, 28), "resnet50": (512, 3, 224)}
STUDENT_WIDTH, TEACHER_WIDTH = 32, 64  # bench/quality.py's asymmetric study
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_case(impl: str, name: str, n: int, chunk: int, device: str, repeats: int, autocast: str) -> dict:
    torch.manual_seed(0)
    dim, channels, size = MODELS[name]
    # student, asymmetric, cached, teacher: the asymmetric comparison (small CNN widths of the study)
    width = {"student": STUDENT_WIDTH, "asymmetric": STUDENT_WIDTH, "cached": STUDENT_WIDTH, "teacher": TEACHER_WIDTH}.get(impl)
    model = build_model(name, dim=dim, in_channels=channels, width=width).to(device)
    with_teacher = impl in ("asymmetric", "cached")
    teacher = freeze(build_model(name, dim=dim, in_channels=channels, width=TEACHER_WIDTH).to(device)) if with_teacher else None
    loss = RecallAtKSurrogate(tau2=TAU2, asymmetric=teacher is not None)
    # Created before measure() takes its baseline: the batch's pixels are an input, not a cost.
    images = torch.rand(n, channels, size, size, device=device)
    labels = torch.arange(n // PER_CLASS, device=device).repeat_interleave(PER_CLASS)
    dtype = AUTOCAST[autocast]
    cache = TeacherCache(n) if impl == "cached" else None
    two_pass = LargeBatchStep(model, loss, chunk_size=chunk, autocast_dtype=dtype, teacher=teacher, teacher_cache=cache)
    ids = torch.arange(n)
    if cache is not None:  # the first epoch, which embeds every sample once (the cache then holds N x d floats)
        two_pass.embed_teacher(images, ids)

    def run(x: torch.Tensor = images, y: torch.Tensor = labels) -> None:
        model.zero_grad(set_to_none=True)
        if impl == "teacher":  # the teacher's forward of the batch, as the asymmetric step runs it
            freeze(model)
            two_pass.teacher = model
            two_pass.embed_teacher(x)
        elif impl in ("two-pass", "student", "asymmetric", "cached"):
            two_pass.step(x, y, ids=ids[: len(x)])
        else:
            with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                embeddings = model(x)
            loss(embeddings.float(), y).backward()

    # A step on at most 8 images (half the batch) first: the first step also pages in libtorch
    # code and sets up thread pools (tens of MB of RSS, the same at every batch), which is not
    # the step's memory.
    warm = min(2 * PER_CLASS, n // 2)
    run(images[:warm], labels[:warm])
    return measure(run, device, repeats=repeats)


def compare(name: str, n: int, chunk: int, device: str, args: argparse.Namespace, single: bool = True) -> tuple[list[str], dict]:
    """A table row: both implementations in fresh processes, and their ratios; and the two-pass result."""
    case = [name, str(n), str(chunk), device, str(args.repeats), args.autocast]
    ours = in_subprocess(__file__, ["two-pass", *case])
    base = in_subprocess(__file__, ["single", *case]) if single else {"error": "not run"}
    row = []
    for r in (ours, base):
        row += [r["error"], "-"] if "error" in r else [f"{r['seconds']:.3f}", f"{r['peak_growth_mb']:.0f}"]
    if "error" in ours or "error" in base:
        row += ["-", "-"]
    else:
        row += [f"{ours['seconds'] / base['seconds']:.2f}x",
                f"{base['peak_growth_mb'] / max(ours['peak_growth_mb'], 1):.1f}x"]
    print(f"done {name} N={n} on {device}", file=sys.stderr)
    return row, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: the small CNN on the GPU, and ResNet-50 on both the CPU and the GPU")
    parser.add_argument("--models", nargs="+", choices=[*MODELS, "asymmetric"], default=list(MODELS))
    parser.add_argument("--asymmetric-sizes", type=int, nargs="+", default=[1024, 4096], help="batches of the asymmetric rows")
    parser.add_argument("--autocast", choices=list(AUTOCAST), default="none")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192],
                        help="small CNN batch sizes (multiples of 4)")
    parser.add_argument("--chunk", type=int, default=256, help="two-pass chunk size, the same at every batch")
    parser.add_argument("--single-max", type=int, default=8192,
                        help="largest batch to run single pass at (a failure, e.g. out of memory, shows as an error)")
    parser.add_argument("--resnet50-batch", type=int, default=8, help="ResNet-50 batch size (a multiple of 4)")
    parser.add_argument("--resnet50-chunk", type=int, default=2, help="ResNet-50 two-pass chunk size")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case, after one warm-up")
    parser.add_argument("--case", nargs=7, metavar=("IMPL", "MODEL", "N", "CHUNK", "DEVICE", "REPEATS", "AUTOCAST"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, name, n, chunk, device, repeats, autocast = args.case
        print(json.dumps(run_case(impl, name, int(n), int(chunk), device, int(repeats), autocast)))
        return

    header = ["two-pass s/step", "two-pass MB", "single s/step", "single MB",
              "time ratio (two-pass / single)", "memory ratio (single / two-pass)"]
    memory = "peak allocated" if args.device == "cuda" else "peak RSS growth"
    if "small_cnn" in args.models:
        rows, two_pass_mb = [], []
        for n in args.sizes:
            row, ours = compare("small_cnn", n, args.chunk, args.device, args, single=n <= args.single_max)
            rows.append([str(n), *row])
            if "error" not in ours:
                two_pass_mb.append((n, ours["peak_growth_mb"]))
        dim, channels, size = MODELS["small_cnn"]
        print(f"Training step, small_cnn dim {dim}, {channels}x{size}x{size}, {PER_CLASS} per class, RS@k tau2={TAU2}, "
              f"two-pass chunk {args.chunk}, device {args.device}, autocast {args.autocast}, MB: {memory}: {machine()}\n")
        print(table(["batch", *header], rows))
        if len(two_pass_mb) >= 2:
            (n0, mb0), (n1, mb1) = two_pass_mb[0], two_pass_mb[-1]
            print(f"\nTwo-pass peak memory growth from batch {n0} to {n1}: {100 * (mb1 - mb0) / max(mb0, 1):+.0f}% "
                  f"({mb0:.0f} MB -> {mb1:.0f} MB)\n")
    if "resnet50" in args.models:
        devices = ["cpu", "cuda"] if args.device == "cuda" else ["cpu"]
        rows = [[d, *compare("resnet50", args.resnet50_batch, args.resnet50_chunk, d, args)[0]] for d in devices]
        dim, channels, size = MODELS["resnet50"]
        print(f"Training step, resnet50 (BatchNorm frozen) dim {dim}, {channels}x{size}x{size}, batch {args.resnet50_batch}, "
              f"two-pass chunk {args.resnet50_chunk}, autocast {args.autocast}, MB: peak RSS growth (cpu), "
              f"peak allocated (cuda): {machine()}\n")
        print(table(["device", *header], rows))
    if "asymmetric" in args.models:
        asymmetric_tables(args)


def asymmetric_tables(args: argparse.Namespace) -> None:
    rows = []
    for n in args.asymmetric_sizes:
        case = ["small_cnn", str(n), str(args.chunk), args.device, str(args.repeats), args.autocast]
        runs = [in_subprocess(__file__, [impl, *case]) for impl in ("student", "asymmetric", "teacher", "cached")]
        if any("error" in r for r in runs):
            rows.append([str(n), *(r.get("error", "ok") for r in runs), "-", "-", "-"])
            continue
        alone, asym, teacher, cached = runs
        rows.append([str(n), *(f"{r['seconds']:.3f}" for r in runs), f"{asym['seconds'] / alone['seconds']:.2f}x",
                     f"{cached['seconds'] / alone['seconds']:.2f}x",
                     " / ".join(f"{r['peak_growth_mb']:.0f}" for r in (alone, asym, cached))])
        print(f"done asymmetric N={n}", file=sys.stderr)
    dim, channels, size = MODELS["small_cnn"]
    print(f"Asymmetric step, student small_cnn width {STUDENT_WIDTH} against a frozen teacher of width {TEACHER_WIDTH}, "
          f"dim {dim}, {channels}x{size}x{size}, RS@k tau2={TAU2}, two-pass chunk {args.chunk}, device {args.device}: {machine()}\n")
    print(table(["batch", "student alone s/step", "asymmetric s/step", "teacher forward s", "asymmetric, cached teacher s/step",
                 "time ratio (asymmetric / alone)", "time ratio (cached / alone)", "MB alone / asymmetric / cached"], rows))
    n = max(args.asymmetric_sizes)
    rows = []
    for w in (2, 4, 8):
        shard = -(-n // w) * dim * 4  # float32 rows of the largest shard, as the collectives pad to it
        symmetric, asymmetric = 2 * (w - 1) * shard, (w - 1) * shard
        rows.append([str(w), f"{symmetric / 2**20:.2f}", f"{asymmetric / 2**20:.2f}", f"{symmetric / asymmetric:.1f}x"])
    print(f"\nLoss bytes received per worker and step, sharded mode, batch {n}, dim {dim}, float32 (ring collectives):\n")
    print(table(["workers", "symmetric MB", "asymmetric MB", "ratio"], rows))


if __name__ == "__main__":
    main()
