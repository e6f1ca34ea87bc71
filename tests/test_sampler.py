import pytest
import torch

from rsk_dist.sampler import ClassBalancedSampler, shard_bounds

LABELS = torch.arange(50).repeat_interleave(7)[torch.randperm(350, generator=torch.Generator().manual_seed(0))]


def test_global_batch_is_class_balanced_without_repeats():
    sampler = ClassBalancedSampler(LABELS, batch_size=40, samples_per_class=4, seed=3)
    for step in range(5):
        idx = sampler.global_batch(0, step)
        assert idx.numel() == 40 and idx.unique().numel() == 40
        labels = LABELS[idx].view(10, 4)
        assert (labels == labels[:, :1]).all(), "each class fills m consecutive slots"
        assert labels[:, 0].unique().numel() == 10


def test_deterministic_in_seed_epoch_step_and_varies_between_them():
    a = ClassBalancedSampler(LABELS, 40, 4, seed=3)
    b = ClassBalancedSampler(LABELS, 40, 4, seed=3)
    assert torch.equal(a.global_batch(2, 7), b.global_batch(2, 7))
    assert not torch.equal(a.global_batch(2, 7), a.global_batch(2, 8))
    assert not torch.equal(a.global_batch(2, 7), a.global_batch(3, 7))
    assert not torch.equal(a.global_batch(2, 7), ClassBalancedSampler(LABELS, 40, 4, seed=4).global_batch(2, 7))
    ga, gb = a.mixing_generator(1, 1), b.mixing_generator(1, 1)
    assert torch.equal(torch.rand(4, generator=ga), torch.rand(4, generator=gb))


@pytest.mark.parametrize("world", [1, 2, 4, 5, 8])
def test_shards_tile_the_same_global_batch_for_any_world_size(world):
    sampler = ClassBalancedSampler(LABELS, 40, 4, seed=1)
    shards = [sampler.shard(0, 3, r, world) for r in range(world)]
    assert all(s.numel() == 40 // world for s in shards)
    assert torch.equal(torch.cat(shards), sampler.global_batch(0, 3))


def test_classes_smaller_than_m_are_never_drawn():
    labels = torch.tensor([0] * 4 + [1] * 2 + [2] * 5 + [3] * 4)
    sampler = ClassBalancedSampler(labels, 12, 4)
    assert set(labels[sampler.global_batch(0, 0)].tolist()) == {0, 2, 3}
    assert sampler.steps_per_epoch == 1


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="multiple of samples_per_class"):
        ClassBalancedSampler(LABELS, 42, 4)
    with pytest.raises(ValueError, match="needs 60 classes"):
        ClassBalancedSampler(LABELS, 240, 4)
    with pytest.raises(ValueError, match="non-empty shards"):
        ClassBalancedSampler(LABELS, 8, 4).shard(0, 0, 0, 9)
    with pytest.raises(ValueError, match=">= 2"):
        ClassBalancedSampler(LABELS, 40, 1)


def test_uneven_shards_cover_the_global_batch_in_order():
    sampler = ClassBalancedSampler(LABELS, 40, 4, seed=5)
    assert shard_bounds(40, 3) == [0, 14, 27, 40]
    for world in (1, 3, 7):
        parts = [sampler.shard(2, 1, r, world) for r in range(world)]
        assert [len(p) for p in parts] == [b - a for a, b in zip(shard_bounds(40, world), shard_bounds(40, world)[1:])]
        assert torch.equal(torch.cat(parts), sampler.global_batch(2, 1))
