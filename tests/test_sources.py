from pathlib import Path

import pytest
import torch

from rsk_dist.data.sources import MemorySource, digits_split, zip_source

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def test_digits_split_is_disjoint_two_thirds_per_class():
    train, test = digits_split("train"), digits_split("test")
    assert len(train) + len(test) == 1797
    assert 0.6 < len(train) / 1797 < 0.7
    flat = lambda s: {tuple(x.flatten().tolist()) for x in s.images}
    assert len(flat(train) & flat(test)) < 10  # digits has a few duplicate images, no shared rows by index
    assert torch.equal(train.labels.unique(), torch.arange(10))


def test_augmentation_depends_on_key_and_sample_not_on_the_split():
    base = digits_split("train")
    source = MemorySource(base.images, base.labels, augment_seed=3)
    idx = torch.tensor([5, 9, 2, 40, 7, 100])
    whole, labels = source(idx, key=11)
    halves = torch.cat([source(idx[:2], key=11)[0], source(idx[2:], key=11)[0]])
    assert torch.equal(whole, halves)
    assert torch.equal(labels, base.labels[idx])
    assert not torch.equal(whole, source(idx, key=12)[0])
    assert not torch.equal(whole, base.images[idx]), "training images are shifted"
    assert torch.equal(base(idx)[0], base.images[idx]), "no augmentation without a seed"


def test_zip_source_drops_excluded_alphabets():
    path = OMNIGLOT / "images_background_small2.zip"
    if not path.exists():
        pytest.skip(f"{path} not present")
    full = zip_source(str(path), size=14)
    kept = zip_source(str(path), size=14, exclude_classes=("Greek", "Latin"))
    assert len(full) - len(kept) == (24 + 26) * 20
