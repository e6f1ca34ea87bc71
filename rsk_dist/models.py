"""Embedding models: a backbone, global pooling, a linear head to ``dim``, L2 normalisation.

Backbones:

- ``small_cnn``: four conv blocks (conv3x3 -> GroupNorm -> ReLU -> maxpool), 64 channels, for 1- or
  3-channel images of any size from 8x8 up (Omniglot, scikit-learn digits); trains on a CPU in minutes.
  It has no BatchNorm, so the two-pass step (spec §3) has no running statistics to corrupt.
- ``resnet50``: torchvision's ResNet-50 without avgpool/fc, BatchNorm frozen (:func:`freeze_batchnorm`)
  as in the paper.
- ``vit_b_16`` / ``vit_b_32``: torchvision's ViT without its classifier head; the embedding comes from
  the class token (``pooling="cls"``, the default) or the mean of all tokens (``pooling="avg"``).
  Inputs must be of the size the model is built for (``image_size``, 224 by default).

torchvision is imported only when one of its backbones is built, so this module needs torch alone.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "MODEL_NAMES",
    "EmbeddingModel",
    "GeM",
    "SmallCNN",
    "build_model",
    "freeze_batchnorm",
    "warn_if_batchnorm_updates",
]

MODEL_NAMES: tuple[str, ...] = ("small_cnn", "resnet50", "vit_b_16", "vit_b_32")
_FEATURE_MAP_POOLINGS = ("avg", "gem")
_TOKEN_POOLINGS = ("cls", "avg")


# --------------------------------------------------------------------------------------------
# Frozen BatchNorm
# --------------------------------------------------------------------------------------------
#
# Why: the two-pass step (spec §3) runs the forward of every chunk twice, once without a graph to
# get the embeddings and once with it to backpropagate. A BatchNorm in training mode would (a)
# update its running statistics twice per step and (b) normalise each chunk with that chunk's own
# batch statistics, so the parameter gradient would depend on the chunking instead of equalling the
# full-batch gradient. With the statistics frozen (eval-mode BatchNorm) the layer is a fixed affine
# map per channel: both passes compute the same function and the gradient matches. The paper trains
# ResNet-50 this way. The affine weight and bias stay trainable unless ``freeze_affine=True``.

_FROZEN_FLAG = "_rsk_bn_frozen"


class _StayInEval:
    """Replacement for a frozen norm layer's ``train`` method: whatever mode is asked, stay in eval.

    A plain object (not a bound method) so that the module still pickles and deep-copies, e.g. when
    Ray ships the model to its workers.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


def _force_eval_pre_hook(module: nn.Module, args: tuple) -> None:
    # Guards against ``bn.training = True`` set by hand: the forward always sees eval mode.
    module.training = False


def _is_norm_with_running_stats(module: nn.Module) -> bool:
    # _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants and InstanceNorm (which
    # keeps running statistics only with track_running_stats=True).
    return isinstance(module, _NormBase) and bool(getattr(module, "track_running_stats", False))


def freeze_batchnorm(module: nn.Module, freeze_affine: bool = False) -> nn.Module:
    """Put every BatchNorm (and stat-tracking InstanceNorm) under ``module`` in eval mode for good.

    Running statistics are never updated again, whatever ``module.train()`` is called with: each such
    layer's ``train`` is replaced by one that keeps it in eval mode, and a forward pre-hook resets
    ``training`` to False in case it was set by hand. Affine parameters keep ``requires_grad`` (the
    paper freezes the statistics only) unless ``freeze_affine=True``. Idempotent; returns ``module``.

    Why it matters here: the two-pass step forwards every chunk twice, so a BatchNorm in training
    mode would update its running statistics twice per step and normalise with per-chunk statistics,
    breaking the equality of the chunked and the full-batch gradient.
    """
    for layer in module.modules():
        if not isinstance(layer, _NormBase):
            continue
        if freeze_affine:
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.requires_grad_(False)
        if getattr(layer, _FROZEN_FLAG, False):
            continue
        layer.eval()
        layer.train = _StayInEval(layer)  # instance attribute shadows nn.Module.train
        layer.register_forward_pre_hook(_force_eval_pre_hook)
        setattr(layer, _FROZEN_FLAG, True)
    return module


def batchnorm_layers_updating(model: nn.Module) -> list[str]:
    """Names of the norm layers under ``model`` whose next forward would update running statistics."""
    return [
        name or type(layer).__name__
        for name, layer in model.named_modules()
        if _is_norm_with_running_stats(layer) and layer.training and not getattr(layer, _FROZEN_FLAG, False)
    ]


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is, or holds, a compiled module (``torch.compile(module)`` or
    ``module.compile()``, as :func:`build_model` does for its backbone)."""
    # Both private: torch.compile's wrapper keeps _orig_mod, nn.Module.compile sets _compiled_call_impl.
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def warn_if_batchnorm_updates(model: nn.Module) -> list[str]:
    """Warn (``UserWarning``) when a BatchNorm in ``model`` would update its running statistics.

    Called by the two-pass step, which runs every forward twice (the statistics would be updated
    twice per step, from per-chunk batches). Returns the offending layer names (empty when none).
    """
    names = batchnorm_layers_updating(model)
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        warnings.warn(
            f"BatchNorm layers in training mode will update their running statistics twice per step "
            f"in the two-pass step (each chunk is forwarded twice) and normalise with per-chunk "
            f"statistics, so gradients will not match the full-batch ones: {shown}. Call "
            f"rsk_dist.models.freeze_batchnorm(model) (as the paper does for ResNet-50) or use "
            f"GroupNorm/LayerNorm instead.",
            UserWarning,
            stacklevel=2,
        )
    return names


# --------------------------------------------------------------------------------------------
# Pooling and the embedding model
# --------------------------------------------------------------------------------------------


class GeM(nn.Module):
    """Generalised-mean pooling over H x W: ``(mean(x.clamp(eps) ** p)) ** (1 / p)``, p learnable.

    p = 1 is average pooling (for non-negative inputs); large p approaches max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # In float32 whatever autocast chose: in float16, eps ** p underflows to 0, and the root's
        # gradient at 0 is inf, so every float16 step would overflow and be skipped.
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class EmbeddingModel(nn.Module):
    """``backbone -> pooling -> dropout -> Linear(feature_dim, dim) -> L2 normalise``.

    The backbone returns either a feature map N x C x H x W (pooled with ``"avg"`` or ``"gem"``),
    token features N x T x C (pooled with ``"cls"``, token 0, or ``"avg"``, the token mean), or
    already pooled features N x C (used as they are). ``forward(images)`` gives N x ``dim`` unit vectors.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        dim: int = 512,
        pooling: str = "gem",
        gem_p: float = 3.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "gem", "cls"):
            raise ValueError(f"pooling must be 'avg', 'gem' or 'cls', got {pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.pooling = pooling
        self.gem = GeM(gem_p) if pooling == "gem" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(feature_dim, dim)
        self.feature_dim = feature_dim
        self.dim = dim
        self.memory_format = torch.contiguous_format

    def use_channels_last(self) -> EmbeddingModel:
        """Weights and inputs in NHWC layout, which cuDNN's (and oneDNN's) fastest convolutions
        use under mixed precision; the function computed stays the same."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def pool(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            if self.pooling == "gem":
                return self.gem(features)
            if self.pooling == "avg":
                return features.mean(dim=(-2, -1))
            raise ValueError("pooling 'cls' needs token features (N x T x C), got a feature map")
        if features.dim() == 3:
            if self.pooling == "cls":
                return features[:, 0]
            if self.pooling == "avg":
                return features.mean(dim=1)
            raise ValueError("GeM pooling needs a feature map (N x C x H x W); use 'cls' or 'avg' for tokens")
        if features.dim() == 2:
            return features
        raise ValueError(f"backbone output of shape {tuple(features.shape)} is not supported")

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() == 4:
            images = images.contiguous(memory_format=self.memory_format)
        x = self.pool(self.backbone(images))
        x = self.head(self.dropout(x))
        return F.normalize(x, dim=-1)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four blocks of conv3x3 -> GroupNorm(8) -> ReLU -> maxpool 2x2; returns N x width x H' x W'.

    Max pooling uses ``ceil_mode`` so a 1 x 1 map stays 1 x 1: 8x8 inputs give 1x1, 28x28 give
    2x2, 64x64 give 4x4; global pooling in :class:`EmbeddingModel` handles any size.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, groups: int = 8) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(groups, width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class _ViTTokens(nn.Module):
    """torchvision VisionTransformer up to its encoder output (N x T x C, final LayerNorm applied)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        vit.heads = nn.Identity()  # the classifier is never used; drop its parameters

    def forward(self, x: Tensor) -> Tensor:
        vit = self.vit
        x = vit._process_input(x)  # patchify + flatten: N x (H/p * W/p) x C; checks the image size
        cls = vit.class_token.expand(x.shape[0], -1, -1)
        return vit.encoder(torch.cat([cls, x], dim=1))


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
        import torchvision.models
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the resnet50 and vit_b_16/vit_b_32 backbones need torchvision, which is not installed "
            "(or does not match this torch build): run `pip install torchvision` with a version "
            "matching your torch, or use build_model('small_cnn')"
        ) from e
    return torchvision.models


def _load_state_dict_file(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _downloaded_state(models, name: str) -> dict:
    """torchvision's default weights for ``name``, from the torch hub cache or downloaded into it."""
    weights = models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:
        import torch.hub

        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise RuntimeError(
            f"could not get torchvision's pretrained weights for {name} from {weights.url} ({e}). "
            f"Without network access, either set model.pretrained to a local state-dict file (e.g. that "
            f"file, copied from a machine that can download it), or pre-download it to {cached} "
            f"(the torch hub cache; TORCH_HOME moves it), where it is found without a download"
        ) from e


def _torchvision_model(
    name: str, pretrained: bool | str | os.PathLike, head_prefix: str, **options: int
) -> nn.Module:
    """torchvision model ``name`` (constructor ``options``, e.g. a ViT's ``image_size``); weights
    from torchvision's download, a local state-dict file, or none."""
    models = _import_torchvision()
    model = getattr(models, name)(weights=None, **options)
    if pretrained is False or pretrained is None:
        return model
    if pretrained is True:
        state = _downloaded_state(models, name)
    elif isinstance(pretrained, (str, os.PathLike)):
        state = _load_state_dict_file(pretrained)
    else:
        raise TypeError(f"pretrained must be a bool or a path, got {type(pretrained).__name__}")
    pos = state.get("encoder.pos_embedding")
    if pos is not None and pos.shape != model.encoder.pos_embedding.shape:
        # Weights for another image size (torchvision's are for 224): resample the position grid.
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The classifier head is dropped anyway, so a backbone-only file is fine.
    missing = [k for k in missing if not k.startswith(head_prefix)]
    unexpected = [k for k in unexpected if not k.startswith(head_prefix)]
    if missing or unexpected:
        raise ValueError(
            f"state dict in {pretrained} does not fit torchvision's {name}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model


def build_model(
    name: str,
    dim: int = 512,
    pooling: str | None = None,
    pretrained: bool | str | os.PathLike = False,
    in_channels: int = 3,
    dropout: float = 0.0,
    freeze_bn: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    image_size: int = 224,
    width: int | None = None,
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel` by backbone name (one of :data:`MODEL_NAMES`).

    ``pooling``: ``"gem"`` (default for CNNs) or ``"avg"`` for ``small_cnn``/``resnet50``; ``"cls"``
    (default for ViTs) or ``"avg"`` (token mean) for ViTs. ``pretrained``: False, True (torchvision's
    download of its default weights) or the path of a local state-dict file (``torch.load(...,
    weights_only=True)``; for ``small_cnn`` a state dict of the :class:`SmallCNN` backbone).
    ``in_channels``: 1 or 3 for ``small_cnn``; torchvision backbones take 3. ``dropout`` is applied
    to the pooled features before the head. ``freeze_bn`` freezes ResNet-50's BatchNorm statistics.
    ``channels_last``: see :meth:`EmbeddingModel.use_channels_last`. ``compile``: the backbone is
    compiled in place (``nn.Module.compile``, so state-dict keys stay those of the eager model)
    on its first forward; the two-pass step pads its chunks to one shape and evaluation runs
    eagerly (:mod:`rsk_dist.evaluate`), so a run builds two graphs, with and without gradients.
    ``image_size``: the input size a ViT is built for (its position embeddings; pretrained ones
    are resampled to it); CNNs take any size. ``width``: the channels of ``small_cnn``'s blocks
    (None: 64).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    is_vit = name.startswith("vit")
    if pooling is None:
        pooling = "cls" if is_vit else "gem"
    allowed = _TOKEN_POOLINGS if is_vit else _FEATURE_MAP_POOLINGS
    if pooling not in allowed:
        raise ValueError(f"pooling {pooling!r} is not available for {name}; choose one of {allowed}")
    if name != "small_cnn" and in_channels != 3:
        raise ValueError(f"{name} takes 3-channel images, got in_channels={in_channels}")
    if name != "small_cnn" and width is not None:
        raise ValueError(f"width is small_cnn's; {name} has its own")

    if name == "small_cnn":
        if pretrained is True:
            raise ValueError("small_cnn has no downloadable weights: pass a local state-dict file or False")
        backbone = SmallCNN(in_channels=in_channels, width=width or 64)
        if pretrained:
            backbone.load_state_dict(_load_state_dict_file(pretrained))
        feature_dim = backbone.out_channels
    elif name == "resnet50":
        resnet = _torchvision_model(name, pretrained, head_prefix="fc.")
        backbone = nn.Sequential(*list(resnet.children())[:-2])  # strip avgpool and fc
        feature_dim = resnet.fc.in_features
        if freeze_bn:
            freeze_batchnorm(backbone)
    else:
        vit = _torchvision_model(name, pretrained, head_prefix="heads.", image_size=image_size)
        feature_dim = vit.hidden_dim
        backbone = _ViTTokens(vit)
    model = EmbeddingModel(backbone, feature_dim, dim=dim, pooling=pooling, dropout=dropout)
    if channels_last:
        model.use_channels_last()
    if compile:
        model.backbone.compile()
    return model
