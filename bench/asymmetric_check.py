"""Why asymmetric students stay near chance after a short budget (docs/results.md, "Asymmetric"):
measurements written independently of rsk_dist's evaluation path (plain float64 torch).

1. The geometry of the teacher's test embeddings: how much of each is the shared mean direction.
2. RS@k at the first step of an untrained student, symmetric and asymmetric: how many of the
   batch's rows get a gradient, and where each query's best positive ranks (RS@k's gradient
   flows only through positives ranked near its k <= 16).
3. With ``--train NAME ...``: a student trained as in bench/quality.py's study, and after each
   epoch its test cosine with the teacher (all of it, along the teacher's mean direction, and
   the parts orthogonal to it) and its asymmetric R@1 by a naive nearest-neighbour search; at
   the end rsk_dist's own asymmetric R@1 beside it.

    python bench/asymmetric_check.py --seed 0 --train regression asym_rsk --tau2 0.003
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.measure import table  # noqa: E402
from bench.quality import ASYMMETRIC_RUNS, DATA, STUDENT_WIDTH, teacher_for, train_model  # noqa: E402
from rsk_dist.data.sources import zip_source  # noqa: E402
from rsk_dist.evaluate import evaluate  # noqa: E402
from rsk_dist.losses import RecallAtKSurrogate  # noqa: E402
from rsk_dist.models import build_model  # noqa: E402
from rsk_dist.sampler import ClassBalancedSampler  # noqa: E402

TAUS = (0.003, 0.03)


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return F.normalize(model(images).double(), dim=1)


def naive_r1(queries: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> float:
    """R@1 of each query against the gallery rows of the other images (row i is image i)."""
    sim = queries @ gallery.T
    sim.fill_diagonal_(float("-inf"))
    return (labels[sim.argmax(1)] == labels).double().mean().item()


def first_step(student: torch.Tensor, gallery: torch.Tensor | None, labels: torch.Tensor, loss: RecallAtKSurrogate) -> list[str]:
    """RS@k at a batch's first step: the loss, the share of the student's rows whose gradient is
    over 1% of the largest row's, and the median rank of each query's best positive."""
    e = student.clone().requires_grad_()
    value = loss(e, labels, torch.Generator().manual_seed(0), **({} if gallery is None else {"gallery": gallery}))
    (grad,) = torch.autograd.grad(value, e)
    norms = grad.norm(dim=1)
    sim = student @ (student if gallery is None else gallery).T
    positive = labels[:, None] == labels[None]
    if gallery is None:  # symmetric: the query is not in its own retrieval set
        sim.fill_diagonal_(float("-inf"))
        positive.fill_diagonal_(False)
    best = positive.gather(1, sim.argsort(1, descending=True)).double().argmax(1) + 1
    return [f"{value.item():.3f}", f"{100 * (norms > 0.01 * norms.max()).double().mean().item():.0f}",
            str(int(best.median().item()))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher", type=int, nargs=2, default=[64, 8], metavar=("WIDTH", "EPOCHS"))
    parser.add_argument("--teacher-dir", type=Path, default=Path("runs/teachers"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", nargs="*", default=[], choices=[n for n in ASYMMETRIC_RUNS if n != "student_rsk"])
    parser.add_argument("--tau2", type=float, default=None, help="replaces the asymmetric RS@k runs' tau2")
    args = parser.parse_args()
    train = zip_source(str(args.data / "images_background_small1.zip"), size=28)
    test = zip_source(str(args.data / "images_background_small2.zip"), size=28, exclude_classes=("Greek", "Latin"))
    teacher = teacher_for(args.seed, *args.teacher, train, args.teacher_dir)
    images, labels = test(torch.arange(len(test)))
    t = embed(teacher, images)
    mean = t.mean(0)
    direction = mean / mean.norm()
    sim = t @ t.T
    off = ~torch.eye(len(labels), dtype=torch.bool)
    same = (labels[:, None] == labels[None]) & off
    print(f"Teacher (seed {args.seed}) on the {len(labels)} test images: |mean embedding| {mean.norm():.3f}; "
          f"cos with the mean direction {(t @ direction).mean():.3f} (what a constant student gets); "
          f"mean cos same class {sim[same].mean():.3f}, other classes {sim[off & ~same].mean():.3f}, "
          f"nearest neighbour {sim.masked_fill(~off, -1).max(1).values.mean():.3f}; R@1 {naive_r1(t, t, labels):.3f}\n")

    torch.manual_seed(args.seed)
    untrained = build_model("small_cnn", dim=128, in_channels=1, width=STUDENT_WIDTH)
    bx, by = train(ClassBalancedSampler(train.labels, 272, samples_per_class=4, seed=args.seed).shard(0, 0, 0, 1))
    s0, t0 = embed(untrained, bx).float(), embed(teacher, bx).float()
    rows = [[name, str(tau2), *first_step(s0, gallery, by, RecallAtKSurrogate(tau2=tau2, **options))]
            for tau2 in TAUS for name, gallery, options in (
                ("symmetric", None, {}), ("asymmetric", t0, {"asymmetric": True}),
                ("asymmetric + SiMix", t0, {"asymmetric": True, "simix": True}))]
    print(f"RS@k of the untrained student (seed {args.seed}) at the study's first batch (68 classes x 4):\n")
    print(table(["setting", "tau2", "loss", "rows with gradient (%)", "median rank of best positive"], rows))

    for name in args.train:
        loss = ASYMMETRIC_RUNS[name]()
        if args.tau2 is not None and isinstance(loss, RecallAtKSurrogate):
            loss = RecallAtKSurrogate(tau2=args.tau2, simix=loss.simix, asymmetric=True)
        torch.manual_seed(args.seed)
        student = build_model("small_cnn", dim=128, in_channels=1, width=STUDENT_WIDTH)
        curve = []

        def measure(epoch: int, last_loss: float) -> None:
            s = embed(student, images)
            student.train()
            along = s @ direction
            s_rest = F.normalize(s - along[:, None] * direction, dim=1)
            t_rest = F.normalize(t - (t @ direction)[:, None] * direction, dim=1)
            curve.append([str(epoch + 1), f"{last_loss:.3f}", f"{(s * t).sum(1).mean():.3f}", f"{along.mean():.3f}",
                          f"{(s_rest * t_rest).sum(1).mean():.3f}", f"{100 * naive_r1(s, t, labels):.1f}",
                          f"{100 * naive_r1(s, s, labels):.1f}"])

        train_model(student, loss, args.seed, args.epochs, train, teacher=teacher, on_epoch=measure)
        ours = evaluate(student, test, ks=(1,), teacher=teacher)["asymmetric_recall@1"]
        label = f"{name}, tau2={loss.tau2}" if isinstance(loss, RecallAtKSurrogate) else name
        print(f"\n{label}, seed {args.seed}; test set; rsk_dist's asymmetric R@1 "
              f"at the end {100 * ours:.1f}:\n")
        print(table(["epoch", "train loss", "cos(s, t)", "cos(s, mean dir)", "cos, parts orthogonal to it",
                     "asym R@1 (naive)", "sym R@1 (naive)"], curve))


if __name__ == "__main__":
    main()
