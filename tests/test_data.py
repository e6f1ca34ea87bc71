import time
import zipfile
from pathlib import Path

import pytest
import torch

from rsk_dist.data import load_digits, load_image_folder_zip

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
SUBSETS = ("images_background_small1.zip", "images_background_small2.zip")


def omniglot_zip(name: str) -> Path:
    path = OMNIGLOT / name
    if not path.is_file():
        pytest.skip(f"Omniglot zip not available: {path}")
    return path


def png_count(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return sum(1 for n in z.namelist() if n.endswith(".png"))


@pytest.fixture(scope="module")
def omniglot():
    loaded = {}
    for name in SUBSETS:
        path = omniglot_zip(name)
        start = time.perf_counter()
        loaded[name] = (*load_image_folder_zip(path, size=28), time.perf_counter() - start, path)
    return loaded


@pytest.mark.parametrize("name", SUBSETS)
def test_omniglot_zip_contents(omniglot, name):
    images, labels, classes, seconds, path = omniglot[name]
    n = png_count(path)
    assert n > 2000
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert len(classes) == n // 20
    # labels contiguous from 0, 20 drawings per character, sorted by class name
    assert torch.equal(labels.unique(), torch.arange(len(classes)))
    assert torch.equal(torch.bincount(labels), torch.full((len(classes),), 20))
    assert classes == sorted(classes) and all(c.count("/") == 1 for c in classes)
    assert torch.equal(labels, torch.sort(labels).values)
    # in [0, 1], inverted: background dark (mostly 0), strokes bright
    assert images.min() >= 0 and images.max() <= 1
    assert images.max() > 0.9
    assert images.mean() < 0.25
    corners = images[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.mean() < 0.05
    assert seconds < 60


def test_omniglot_subsets_share_only_greek_and_latin(omniglot):
    # The two "small" background subsets are NOT disjoint: both hold the Greek (24 characters) and
    # Latin (26) alphabets with byte-identical drawings. A train/test split across the two zips must
    # drop these shared classes from one side, or the test set leaks into training.
    (x1, y1, c1, *_), (x2, y2, c2, *_) = (omniglot[name] for name in SUBSETS)
    shared = set(c1) & set(c2)
    assert {c.split("/")[0] for c in shared} == {"Greek", "Latin"}
    assert len(shared) == 50
    assert {c.split("/")[0] for c in set(c1) - shared} == {"Balinese", "Early_Aramaic", "Korean"}
    assert {c.split("/")[0] for c in set(c2) - shared} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    for name in ("Greek/character01", "Latin/character26"):
        torch.testing.assert_close(x1[y1 == c1.index(name)], x2[y2 == c2.index(name)], rtol=0, atol=0)


def test_omniglot_is_deterministic_and_resizes():
    path = omniglot_zip(SUBSETS[0])
    images, labels, classes = load_image_folder_zip(path, size=12)
    again, labels2, classes2 = load_image_folder_zip(path, size=12)
    assert images.shape[-2:] == (12, 12)
    assert torch.equal(images, again) and torch.equal(labels, labels2) and classes == classes2


def test_missing_zip_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.zip"):
        load_image_folder_zip(tmp_path / "nothere.zip")


def test_undecodable_image_names_the_entry(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("root/A/c1/ok.png", b"not a png at all")
    with pytest.raises(ValueError, match=r"root/A/c1/ok\.png.*bad\.zip"):
        load_image_folder_zip(path)
    not_zip = tmp_path / "plain.zip"
    not_zip.write_bytes(b"hello")
    with pytest.raises(ValueError, match="plain.zip"):
        load_image_folder_zip(not_zip)


def test_small_synthetic_zip_classes_and_inversion(tmp_path):
    from PIL import Image
    import io

    path = tmp_path / "tiny.zip"
    with zipfile.ZipFile(path, "w") as z:
        for cls, value in (("b", 0), ("a", 255)):
            for i in range(2):
                buf = io.BytesIO()
                Image.new("L", (10, 10), value).save(buf, format="PNG")
                z.writestr(f"top/{cls}/{i}.png", buf.getvalue())
    images, labels, classes = load_image_folder_zip(path, size=4)
    assert classes == ["a", "b"]
    assert labels.tolist() == [0, 0, 1, 1]
    # "a" is white -> 0 after inversion, "b" is black -> 1
    assert torch.equal(images[:2], torch.zeros(2, 1, 4, 4)) and torch.equal(images[2:], torch.ones(2, 1, 4, 4))
    plain, _, _ = load_image_folder_zip(path, size=4, invert=False)
    torch.testing.assert_close(plain, 1 - images)


def test_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert torch.equal(labels.unique(), torch.arange(10))
    assert images.min() == 0 and images.max() == 1
