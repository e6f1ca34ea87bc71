"""The frozen teacher of asymmetric training (Budnik & Avrithis, CVPR 2021): a model whose
embeddings of the batch are the gallery that the student's queries learn to rank, and that
embeds the database at test time. It is never trained: no parameter requires a gradient, it
stays in eval mode (dropout off, normalisation statistics fixed), and the step runs it without
a graph (rsk_dist.engine.LargeBatchStep).

A teacher is an rsk_dist checkpoint, a TorchScript export (``rsk-dist export``, with its
preprocessing record beside it) or a backbone built here from a local state-dict file. Its
embeddings live in its own space: a student of another dimension reaches it through a learned
linear map (:class:`TeacherSpaceMap`), declared in the config, never implied. When the teacher's
view of a sample is not augmented its embedding of that sample never changes, and
:class:`TeacherCache` embeds each sample once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the service's config and preprocessing: the frozen model itself needs torch alone
    from rsk_dist.config import JobConfig, TeacherConfig
    from rsk_dist.preprocess import Preprocess

MAP_WEIGHT = "map.weight"  # the learned map's key in a student's state dict


class _StayFrozen:
    """A frozen model's ``train``: whatever mode is asked, it stays in eval. A plain object,
    not a bound method, so that the model still pickles and deep-copies."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode for good, without gradients: a teacher."""
    for p in model.parameters():  # not requires_grad_(False): a TorchScript export lacks it
        p.requires_grad_(False)
    model.eval()
    model.train = _StayFrozen(model)  # type: ignore[method-assign]
    return model


class TeacherSpaceMap(nn.Module):
    """A student whose ``dim``-d embeddings are mapped into a ``teacher_dim``-d teacher's space by
    a learned linear map, then normalised: the output used everywhere (the loss, evaluation,
    exports), so its queries search a gallery the teacher indexed."""

    def __init__(self, student: nn.Module, dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.student = student
        self.map = nn.Linear(dim, teacher_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.map(self.student(images)), dim=-1)


def with_teacher_map(student: nn.Module, config: JobConfig, teacher_dim: int | None) -> nn.Module:
    """The job's student: ``student`` itself, or with the learned map ``teacher.map: linear`` declares."""
    if config.teacher is None or config.teacher.map != "linear":
        return student
    if teacher_dim is None:
        raise ValueError("teacher.map: linear needs the teacher's dimension")
    return TeacherSpaceMap(student, config.model.dim, teacher_dim)


def map_dim(state_dict: dict[str, Tensor]) -> int | None:
    """The teacher dimension a student's state dict maps into (None: no learned map)."""
    weight = state_dict.get(MAP_WEIGHT)
    return None if weight is None else int(weight.shape[0])


def load_teacher(config: TeacherConfig, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Preprocess | None]:
    """The frozen teacher a job config's ``teacher`` section names, and the preprocessing its
    model expects (None for a backbone built here: it takes the job's own)."""
    if config.checkpoint is not None:
        from rsk_dist.checkpoint import load_model
        from rsk_dist.preprocess import Preprocess

        model, stored = load_model(config.checkpoint, map_location)
        return freeze(model), Preprocess.for_config(stored)
    if config.export is not None:
        from rsk_dist.index import load_export

        module, preprocess = load_export(config.export, map_location)
        return freeze(module), preprocess
    from rsk_dist.models import build_model

    m = config.model
    # The head a backbone's state dict lacks: a fixed draw, the same on every worker.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(m.name, dim=m.dim, pooling=m.pooling, pretrained=m.pretrained, in_channels=m.in_channels,
                            freeze_bn=m.freeze_bn, width=m.width).to(map_location)
    return freeze(model), None


@torch.no_grad()
def check_teacher(config: JobConfig, teacher: nn.Module, preprocess: Preprocess | None) -> int:
    """Raises unless ``teacher`` (as :func:`load_teacher` gives it) can serve the job's student:
    it embeds the job's images (one blank image of the job's size and channels is run), was
    trained on images prepared as the job prepares them (any size: it runs at the job's), and its
    embeddings have the student's dimension unless ``teacher.map: linear`` maps into them.
    Returns the teacher's dimension."""
    from rsk_dist.preprocess import Preprocess

    c = config.model.in_channels
    size = config.data.image_size
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    if preprocess is not None:
        ours = Preprocess.for_config(config)
        if replace(preprocess, size=size) != replace(ours, size=size):
            raise ValueError(
                f"the teacher was trained on images prepared otherwise than this job's: it expects {_describe(preprocess)}, "
                f"the job's data gives {_describe(ours)}: train the student on data of the teacher's kind and channels"
            )
    try:
        out = teacher(torch.zeros(1, c, size, size, device=device))
    except Exception as err:  # noqa: BLE001 - a model raises what its layers raise
        raise ValueError(
            f"the teacher cannot embed this job's {c}-channel {size} x {size} images ({type(err).__name__}: {err}): "
            "set data.image_size and model.in_channels to what the teacher takes"
        ) from None
    dim = int(out.shape[-1])
    if config.teacher is not None and config.teacher.map != "linear":
        check_dims(dim, config.model.dim)
    return dim


def check_dims(teacher_dim: int, student_dim: int) -> None:
    if teacher_dim != student_dim:
        raise ValueError(
            f"the teacher's embeddings are {teacher_dim}-d but model.dim is {student_dim}: set model.dim: {teacher_dim} "
            "(the student's head then maps into the teacher's space), or declare teacher.map: linear (a learned "
            f"{student_dim} -> {teacher_dim} map after the student's head)"
        )


def _describe(p: Preprocess) -> str:
    fields: dict[str, Any] = {"channels": p.channels, "resize": p.resize, "invert": p.invert, "mean": p.mean, "std": p.std}
    return ", ".join(f"{k} {v}" for k, v in fields.items())


class TeacherCache:
    """Each sample's teacher embedding, computed the first time the sample is in this worker's
    shard and kept (on the CPU: ``samples x dim`` floats, 2 KB a sample at 512-d) for the rest of the run. Valid only
    while the teacher sees every sample the same way (no augmentation; the config enforces it)."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.embeddings: Tensor | None = None
        self.known = torch.zeros(samples, dtype=torch.bool)
        self.hits = 0  # rows served from the cache, over the run
        self.misses = 0  # rows the teacher embedded
        self.last_hit_rate = 0.0  # of the last batch

    def gallery(self, ids: Tensor, images: Tensor, embed: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
        """The teacher's embeddings of the samples ``ids`` (rows of ``images``) on ``device``: the
        cached ones looked up, the others computed by ``embed(images[rows])`` and kept."""
        ids = ids.cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.samples):
            raise ValueError(f"sample ids must be in [0, {self.samples}), got {int(ids.min())}..{int(ids.max())}")
        missing = (~self.known[ids]).nonzero().flatten()
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        self.last_hit_rate = 1.0 - len(missing) / max(len(ids), 1)
        if len(missing):
            fresh = embed(images[missing.to(images.device)])
            if self.embeddings is None:
                self.embeddings = torch.zeros(self.samples, fresh.shape[1], dtype=fresh.dtype)
            # A sample twice in one batch is computed once per row; either value serves.
            self.embeddings[ids[missing]] = fresh.cpu()
            self.known[ids[missing]] = True
        assert self.embeddings is not None
        return self.embeddings[ids].to(device)
