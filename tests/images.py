"""Test images made on the fly, and the path of the shared Omniglot data."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
OMNIGLOT_ZIP = OMNIGLOT / "images_background_small1.zip"


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (12, 10)) -> bytes:
    """An encoded random RGB image, different for every seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


class KillsItsDecoder:
    """An augmentation whose decoder process dies (as one killed by the OS would)."""

    def __call__(self, raw: bytes, sample: int, key: int) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class StopsItsDecoder:
    """An augmentation whose decoder process stops itself (SIGSTOP), as a stopped or stuck one would hang."""

    def __call__(self, raw: bytes, sample: int, key: int) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)
