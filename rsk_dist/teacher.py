"""The frozen teacher of asymmetric training (Budnik & Avrithis, CVPR 2021): a model whose
embeddings of the batch are the gallery that the student's queries learn to rank, and that
embeds the database at test time. It is never trained: no parameter requires a gradient, it
stays in eval mode (dropout off, normalisation statistics fixed), and the step runs it without
a graph (rsk_dist.engine.LargeBatchStep)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the service's config: the frozen model itself needs torch alone
    from rsk_dist.config import ModelConfig, TeacherConfig


class _StayFrozen:
    """A frozen model's ``train``: whatever mode is asked, it stays in eval. A plain object,
    not a bound method, so that the model still pickles and deep-copies."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode for good, without gradients: a teacher."""
    model.requires_grad_(False)
    model.eval()
    model.train = _StayFrozen(model)  # type: ignore[method-assign]
    return model


def load_teacher(config: TeacherConfig, map_location: str | torch.device = "cpu") -> nn.Module:
    """The frozen teacher a job config's ``teacher`` section names."""
    from rsk_dist.checkpoint import load_model
    from rsk_dist.models import build_model

    if config.checkpoint is not None:
        model, _ = load_model(config.checkpoint, map_location)
    else:
        m = config.model
        # The head a backbone's state dict lacks: a fixed draw, the same on every worker.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(m.name, dim=m.dim, pooling=m.pooling, pretrained=m.pretrained, in_channels=m.in_channels,
                                freeze_bn=m.freeze_bn, width=m.width).to(map_location)
    return freeze(model)


def teacher_model_config(config: TeacherConfig) -> ModelConfig:
    """The teacher's model section (a checkpoint's from its stored config)."""
    if config.model is not None:
        return config.model
    from rsk_dist.checkpoint import load_state
    from rsk_dist.config import JobConfig

    return JobConfig.model_validate(load_state(config.checkpoint)["config"]).model
