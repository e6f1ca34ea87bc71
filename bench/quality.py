"""Learning quality on Omniglot: RS@k variants against pytorch-metric-learning baselines, and
a batch-size sweep, with the same pipeline and budget for every run.

Train on ``images_background_small1``, evaluate retrieval on ``images_background_small2`` less
the Greek and Latin alphabets (they occur in both subsets). Small CNN from scratch, Adam,
the same number of epochs (images seen) for every run; the two-pass step with 64-image chunks.

    python bench/quality.py [--seeds 0 1 2] [--epochs 8] [--out docs/quality.json]

Results are appended to the JSON file as runs finish (a re-run skips finished ones), then the
tables are printed in markdown.

``--asymmetric`` runs the asymmetric study instead (docs/results.md): a frozen RS@k teacher
(``--teacher WIDTH EPOCHS``, trained once per seed and kept in ``--teacher-dir``) embeds the
gallery and a narrower small CNN (``STUDENT_WIDTH``) learns to query it, under each loss of
``ASYMMETRIC_RUNS`` with the same budget; evaluated symmetric, asymmetric and teacher-side.

    python bench/quality.py --asymmetric --out docs/asymmetric.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.measure import table  # noqa: E402
from rsk_dist.data.sources import MemorySource, zip_source  # noqa: E402
from rsk_dist.engine import LargeBatchStep  # noqa: E402
from rsk_dist.evaluate import evaluate  # noqa: E402
from rsk_dist.losses import MetricLearningLoss, RecallAtKSurrogate, Regression  # noqa: E402
from rsk_dist.loop import train_step  # noqa: E402
from rsk_dist.models import build_model  # noqa: E402
from rsk_dist.sampler import ClassBalancedSampler  # noqa: E402
from rsk_dist.teacher import freeze  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
TAU2 = 0.003  # from scratch the similarity spread starts ~0.005: see docs/results.md
# name -> (loss factory, batch size, samples per class)
RUNS = {
    "rsk": (lambda: RecallAtKSurrogate(tau2=TAU2), 272, 4),
    "rsk_simix": (lambda: RecallAtKSurrogate(tau2=TAU2, simix=True), 272, 4),
    "rsk_rank_includes_query": (lambda: RecallAtKSurrogate(tau2=TAU2, rank_includes_query=True), 272, 4),
    "contrastive": (lambda: MetricLearningLoss("contrastive"), 272, 4),
    "multi_similarity": (lambda: MetricLearningLoss("multi_similarity"), 272, 4),
    "rsk_batch64": (lambda: RecallAtKSurrogate(tau2=TAU2), 64, 4),
    "rsk_batch136": (lambda: RecallAtKSurrogate(tau2=TAU2), 136, 4),
    "rsk_batch544": (lambda: RecallAtKSurrogate(tau2=TAU2), 544, 4),
    "rsk_batch2720": (lambda: RecallAtKSurrogate(tau2=TAU2), 2720, 20),  # the whole training subset
}
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")

# The asymmetric study: the student's width (the teacher's is --teacher's) and its losses, all at
# batch 272 (68 x 4). "student_rsk" trains alone (symmetric RS@k); "teacher" is the teacher itself.
STUDENT_WIDTH = 32
ASYMMETRIC_RUNS = {
    "student_rsk": lambda: RecallAtKSurrogate(tau2=TAU2),
    "asym_rsk": lambda: RecallAtKSurrogate(tau2=TAU2, asymmetric=True),
    "asym_rsk_simix": lambda: RecallAtKSurrogate(tau2=TAU2, simix=True, asymmetric=True),
    "regression": Regression,
    "asym_contrastive": lambda: MetricLearningLoss("contrastive", asymmetric=True, self_positive=False),
    "contr_plus": lambda: MetricLearningLoss("contrastive", asymmetric=True),
}


def train_model(
    model: torch.nn.Module, loss: torch.nn.Module, seed: int, epochs: int, train: MemorySource,
    batch: int = 272, m: int = 4, teacher: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """``model`` trained on ``train`` with ``loss`` (asymmetric against ``teacher``), Adam 1e-3."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)
    step = LargeBatchStep(model, loss, chunk_size=64, teacher=teacher)
    sampler = ClassBalancedSampler(train.labels, batch, samples_per_class=m, seed=seed)
    steps = max(1, len(train) // batch)  # equal images seen per epoch for every batch size
    source = MemorySource(train.images, train.labels, augment_seed=seed)
    for epoch in range(epochs):
        for s in range(steps):
            train_step(step, optimizer, sampler, source, epoch, s)
    return model


def run(name: str, seed: int, epochs: int, train: MemorySource, test: MemorySource) -> dict[str, float]:
    make_loss, batch, m = RUNS[name]
    torch.manual_seed(seed)
    model = train_model(build_model("small_cnn", dim=128, in_channels=1), make_loss(), seed, epochs, train, batch, m)
    return evaluate(model, test, ks=(1, 2, 4, 8))


def small_cnn_flops(width: int, size: int = 28, in_channels: int = 1) -> int:
    """Multiply-adds x 2 of the small CNN's convolutions on one image (the rest is negligible)."""
    flops, channels = 0, in_channels
    for _ in range(4):
        flops += 2 * size * size * channels * width * 9
        channels, size = width, -(-size // 2)
    return flops


def teacher_for(seed: int, width: int, epochs: int, train: MemorySource, directory: Path) -> torch.nn.Module:
    """The RS@k teacher of ``seed`` (trained once, then loaded from ``directory``), frozen."""
    path = directory / f"teacher_w{width}_e{epochs}_seed{seed}.pt"
    torch.manual_seed(seed)
    model = build_model("small_cnn", dim=128, in_channels=1, width=width)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        train_model(model, RecallAtKSurrogate(tau2=TAU2), seed, epochs, train)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return freeze(model)


def run_asymmetric(
    name: str, seed: int, epochs: int, train: MemorySource, test: MemorySource, teacher: torch.nn.Module
) -> dict[str, float]:
    """One row of the asymmetric study at one seed: metrics in the three settings."""
    if name == "teacher":
        return evaluate(teacher, test, ks=(1, 2, 4, 8), teacher=teacher)
    torch.manual_seed(seed)
    student = build_model("small_cnn", dim=128, in_channels=1, width=STUDENT_WIDTH)
    alone = name == "student_rsk"
    train_model(student, ASYMMETRIC_RUNS[name](), seed, epochs, train, teacher=None if alone else teacher)
    return evaluate(student, test, ks=(1, 2, 4, 8), teacher=teacher)


def summarise_asymmetric(results: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = []
    for name in [*ASYMMETRIC_RUNS, "teacher"]:
        seeds = [r for key, r in results.get(name, {}).items()]
        if not seeds:
            continue
        cells = []
        for metric in ("recall@1", "map@r", "asymmetric_recall@1", "asymmetric_map@r"):
            values = [100 * r[metric] for r in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        rows.append([name, str(len(seeds)), *cells])
    return table(["run", "seeds", "sym R@1", "sym MAP@R", "asym R@1", "asym MAP@R"], rows)


def main_asymmetric(args: argparse.Namespace, train: MemorySource, test: MemorySource) -> None:
    width, teacher_epochs = args.teacher
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["setup"] = {
        "teacher": {"width": width, "epochs": teacher_epochs, "gflops_per_image": small_cnn_flops(width) / 1e9},
        "student": {"width": STUDENT_WIDTH, "epochs": args.epochs, "gflops_per_image": small_cnn_flops(STUDENT_WIDTH) / 1e9},
    }
    for seed in args.seeds:
        teacher = teacher_for(seed, width, teacher_epochs, train, args.teacher_dir)
        for name in args.asymmetric_runs:
            if str(seed) in results.get(name, {}):
                continue
            t0 = time.perf_counter()
            metrics = run_asymmetric(name, seed, args.epochs, train, test, teacher)
            results.setdefault(name, {})[str(seed)] = metrics
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed}: R@1 {metrics['recall@1']:.4f} asym {metrics['asymmetric_recall@1']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"Omniglot, teacher small CNN width {width} ({teacher_epochs} epochs), student width {STUDENT_WIDTH} "
          f"({args.epochs} epochs); mean ± std over seeds (%)\n")
    print(summarise_asymmetric(results))


def summarise(results: dict[str, dict[str, dict[str, float]]], names: list[str]) -> str:
    rows = []
    for name in names:
        seeds = results.get(name, {})
        if not seeds:
            continue
        cells = []
        for metric in METRICS:
            values = [100 * r[metric] for r in seeds.values()]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        rows.append([name, str(RUNS[name][1]), str(len(seeds)), *cells])
    return table(["run", "batch", "seeds", "R@1", "R@2", "R@4", "R@8", "MAP@R"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("docs/quality.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="the folder of the Omniglot zips")
    parser.add_argument("--asymmetric", action="store_true", help="the asymmetric study (see above)")
    parser.add_argument("--asymmetric-runs", nargs="+", default=[*ASYMMETRIC_RUNS, "teacher"],
                        choices=[*ASYMMETRIC_RUNS, "teacher"])
    parser.add_argument("--teacher", type=int, nargs=2, default=[64, 16], metavar=("WIDTH", "EPOCHS"))
    parser.add_argument("--teacher-dir", type=Path, default=Path("runs/teachers"))
    args = parser.parse_args()
    train = zip_source(str(args.data / "images_background_small1.zip"), size=28)
    test = zip_source(str(args.data / "images_background_small2.zip"), size=28, exclude_classes=("Greek", "Latin"))
    if args.asymmetric:
        main_asymmetric(args, train, test)
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for seed in args.seeds:  # seed-major, so that an early stop still has every run at some seed
        for name in args.runs:
            if str(seed) in results.get(name, {}):
                continue
            t0 = time.perf_counter()
            metrics = run(name, seed, args.epochs, train, test)
            results.setdefault(name, {})[str(seed)] = metrics
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed}: R@1 {metrics['recall@1']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"Omniglot, small CNN from scratch, {args.epochs} epochs, Adam 1e-3; mean ± std over seeds (%)\n")
    print("Losses at batch 272 (68 classes x 4):\n")
    print(summarise(results, ["rsk", "rsk_simix", "rsk_rank_includes_query", "contrastive", "multi_similarity"]))
    print("\nRS@k batch-size sweep:\n")
    print(summarise(results, ["rsk_batch64", "rsk_batch136", "rsk", "rsk_batch544", "rsk_batch2720"]))


if __name__ == "__main__":
    main()
