"""How an image becomes a model's input at test time: :class:`Preprocess`.

The one definition that training's evaluation transform (:mod:`rsk_dist.data.decode` for
ingested datasets, :mod:`rsk_dist.data.omniglot` for image-folder zips, the float conversion of
:mod:`rsk_dist.data.feeder`), ``rsk-dist embed`` and the record written beside every export
(``model.pt.preprocess.json``) share, so that they cannot drift apart. A model's record follows
from the data it was trained on (:meth:`Preprocess.for_config`):

- ingested datasets (``shards``): greyscale (``in_channels: 1``) or RGB; the shorter side resized
  to ``round(size * 256 / 224)`` (bilinear), the centre ``size`` square; /255; for RGB, less
  ImageNet's mean over its std per channel;
- image-folder zips (``zip``, Omniglot): greyscale, resized to ``size x size`` (bilinear,
  antialiased), inverted (strokes bright on dark), /255;
- scikit-learn's digits: greyscale, 8 x 8, /255 (the digits' 0-16 grey levels are scaled to the
  same [0, 1] range, as /16).

Needs numpy and Pillow; torch only for :func:`to_float`, so decoder processes import it without torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SIZE = 8


def shorter_side(image_size: int) -> int:
    """The length the shorter side is resized to before the centre crop (the 256/224 rule)."""
    return int(round(image_size * 256 / 224))


def centre_crop(img: Any, image_size: int) -> Any:
    """A PIL image's shorter side resized to :func:`shorter_side`, and its centre ``image_size`` square."""
    from PIL import Image

    short = shorter_side(image_size)
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BILINEAR)
    w, h = img.size
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return img.crop((left, top, left + image_size, top + image_size))


def to_float(images: Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Tensor:
    """uint8 images as floats in [0, 1], less ``mean`` over ``std`` per channel when given;
    float images (in-memory sources hold them ready) pass unchanged."""
    import torch

    if images.dtype != torch.uint8:
        return images
    x = images.float().div_(255.0)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        x.sub_(torch.tensor(mean, device=x.device).view(shape)).div_(torch.tensor(std, device=x.device).view(shape))
    return x


@dataclass(frozen=True)
class Preprocess:
    """An image file to a model input: ``channels`` 1 (greyscale) or 3 (RGB); ``resize``
    ``"shorter_side_crop"`` (see :func:`centre_crop`) or ``"stretch"`` (to ``size x size``);
    ``invert`` (255 - pixel); then /255 and, when given, less ``mean`` over ``std`` per channel."""

    size: int
    channels: Literal[1, 3]
    resize: Literal["shorter_side_crop", "stretch"]
    invert: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {self.channels}")
        if self.resize not in ("shorter_side_crop", "stretch") or self.size < 1:
            raise ValueError(f"resize must be shorter_side_crop or stretch and size positive, got {self.resize!r}, {self.size}")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != self.channels):
            raise ValueError(f"mean and std must both be given, one value per channel ({self.channels}), or neither")

    @classmethod
    def streamed(cls, size: int, channels: int, imagenet: bool | None = None) -> Preprocess:
        """An ingested dataset's evaluation transform: ImageNet statistics for RGB unless ``imagenet`` is False."""
        stats = channels == 3 if imagenet is None else imagenet
        return cls(size, channels, "shorter_side_crop", False, IMAGENET_MEAN if stats else None, IMAGENET_STD if stats else None)  # type: ignore[arg-type]

    @classmethod
    def for_config(cls, config: Any) -> Preprocess:
        """What a model trained under the job config ``config`` expects (from its training data)."""
        kind, size = config.data.train.kind, config.data.image_size
        if kind == "shards":
            return cls.streamed(size, config.model.in_channels)
        if kind == "zip":
            return cls(size, 1, "stretch", invert=True)
        return cls(DIGITS_SIZE, 1, "stretch")

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def transform(self, img: Any) -> Any:
        """A PIL image (of any size and mode) as the ``size x size`` image the model takes."""
        from PIL import Image, ImageOps

        img = img.convert(self.mode)
        if self.resize == "shorter_side_crop":
            img = centre_crop(img, self.size)
        elif img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return ImageOps.invert(img) if self.invert else img

    def decode(self, data: bytes) -> np.ndarray:
        """An encoded image file as ``C x size x size`` uint8."""
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(self.transform(img), dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 ``N x C x size x size`` images (from :meth:`decode`) as the model's float input."""
        return to_float(images, self.mean, self.std)

    def to_json(self) -> str:
        return json.dumps({"format": "rsk_dist.preprocess/1", **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        record = json.loads(text)
        if not isinstance(record, dict) or record.pop("format", None) != "rsk_dist.preprocess/1":
            raise ValueError("not a preprocessing record (format rsk_dist.preprocess/1)")
        try:
            for key in ("mean", "std"):
                if record.get(key) is not None:
                    record[key] = tuple(record[key])
            return cls(**record)
        except TypeError as err:
            raise ValueError(f"not a preprocessing record: {err}") from None
