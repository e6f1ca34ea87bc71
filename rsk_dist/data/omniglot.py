"""Small image sets for CPU training and tests: image-folder zips (Omniglot) and scikit-learn digits.

Needs torch, numpy and pillow only (scikit-learn, for :func:`load_digits`, is imported when called).
"""
from __future__ import annotations

import os
import posixpath
import zipfile

import numpy as np
import torch
from torch import Tensor

from rsk_dist.preprocess import Preprocess

__all__ = ["IMAGE_EXTENSIONS", "load_digits", "load_image_folder_zip"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _class_of(entries: list[str], path: str) -> list[str]:
    """Class name of each entry: its directory, less a top-level folder that every entry shares.

    Omniglot's ``images_background_small1/Balinese/character01/0108_01.png`` gives
    ``Balinese/character01``. A zip whose entries sit directly in class folders (``cat/1.png``)
    keeps the folder as the class.
    """
    dirs = [posixpath.dirname(e) for e in entries]
    if any(not d for d in dirs):
        bad = next(e for e, d in zip(entries, dirs) if not d)
        raise ValueError(f"{path}: image {bad!r} is not inside a class folder")
    parts = [d.split("/") for d in dirs]
    firsts = {p[0] for p in parts}
    if len(firsts) == 1 and all(len(p) >= 2 for p in parts):
        return ["/".join(p[1:]) for p in parts]
    return dirs


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable zip file: {e}") from e


def _image_entries(archive: zipfile.ZipFile, path: str) -> tuple[list[str], list[str]]:
    """The image files of an image-folder zip and the class of each."""
    entries = [
        info.filename
        for info in archive.infolist()
        if not info.is_dir()
        and info.filename.lower().endswith(IMAGE_EXTENSIONS)
        and not info.filename.startswith("__MACOSX/")
        and not posixpath.basename(info.filename).startswith(".")
    ]
    if not entries:
        raise ValueError(f"{path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return entries, _class_of(entries, path)


def image_folder_classes(path: str | os.PathLike) -> list[str]:
    """The class of each image in an image-folder zip, as :func:`load_image_folder_zip` reads
    them, from the zip's directory alone (nothing decoded)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image zip not found: {path}")
    with _open_zip(path) as archive:
        return _image_entries(archive, path)[1]


def load_image_folder_zip(
    path: str | os.PathLike, size: int = 28, invert: bool = True
) -> tuple[Tensor, Tensor, list[str]]:
    """Read a zip of ``[root/]class.../image.png`` into memory, straight from the zip.

    Returns ``(images, labels, class_names)``: ``images`` float32 N x 1 x size x size in [0, 1]
    (greyscale, resized with Pillow's antialiased bilinear filter: :class:`rsk_dist.preprocess.Preprocess`'s
    ``stretch``), ``labels`` int64 N with values
    0..C-1 indexing ``class_names``. Classes are the image's directory below a top-level folder shared
    by all entries (Omniglot: ``Alphabet/characterXX``). Order is deterministic: classes sorted by
    name, images sorted by file name within a class. ``invert=True`` (the default, for Omniglot's
    black strokes on white) makes strokes bright on a dark background.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image zip not found: {path}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    from PIL import UnidentifiedImageError

    preprocess = Preprocess(size, 1, "stretch", invert=invert)

    archive = _open_zip(path)
    with archive:
        entries, classes = _image_entries(archive, path)
        order = sorted(range(len(entries)), key=lambda i: (classes[i], posixpath.basename(entries[i])))
        class_names = sorted(set(classes))
        index = {c: i for i, c in enumerate(class_names)}

        images = np.empty((len(entries), size, size), dtype=np.uint8)
        labels = np.empty(len(entries), dtype=np.int64)
        for row, i in enumerate(order):
            name = entries[i]
            try:
                images[row] = preprocess.decode(archive.read(name))[0]
            except (UnidentifiedImageError, OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f"cannot decode image {name!r} in {path}: {e}") from e
            labels[row] = index[classes[i]]

    x = preprocess.to_float(torch.from_numpy(images).unsqueeze(1))
    return x, torch.from_numpy(labels), class_names


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download).

    Returns ``(images, labels)``: float32 N x 1 x 8 x 8 in [0, 1] (the 0..16 grey levels divided by
    16) and int64 labels 0..9.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels
