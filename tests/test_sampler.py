import pickle
import time

import numpy as np
import pytest
import torch

from rsk_dist.sampler import ClassBalancedSampler, shard_bounds

LABELS = torch.arange(50).repeat_interleave(7)[torch.randperm(350, generator=torch.Generator().manual_seed(0))]


MODES = pytest.mark.parametrize("mode", ["epoch", "uniform"])


@MODES
def test_global_batch_is_class_balanced_without_repeats(mode):
    sampler = ClassBalancedSampler(LABELS, batch_size=40, samples_per_class=4, seed=3, mode=mode)
    for step in range(5):
        idx = sampler.global_batch(0, step)
        assert idx.numel() == 40 and idx.unique().numel() == 40
        labels = LABELS[idx].view(10, 4)
        assert (labels == labels[:, :1]).all(), "each class fills m consecutive slots"
        assert labels[:, 0].unique().numel() == 10


@MODES
def test_deterministic_in_seed_epoch_step_and_varies_between_them(mode):
    a = ClassBalancedSampler(LABELS, 40, 4, seed=3, mode=mode)
    b = ClassBalancedSampler(LABELS, 40, 4, seed=3, mode=mode)
    assert torch.equal(a.global_batch(2, 7), b.global_batch(2, 7))
    assert not torch.equal(a.global_batch(2, 7), a.global_batch(2, 8))
    assert not torch.equal(a.global_batch(2, 7), a.global_batch(3, 7))
    assert not torch.equal(a.global_batch(2, 7), ClassBalancedSampler(LABELS, 40, 4, seed=4, mode=mode).global_batch(2, 7))
    ga, gb = a.mixing_generator(1, 1), b.mixing_generator(1, 1)
    assert torch.equal(torch.rand(4, generator=ga), torch.rand(4, generator=gb))


@MODES
@pytest.mark.parametrize("world", [1, 2, 4, 5, 8])
def test_shards_tile_the_same_global_batch_for_any_world_size(world, mode):
    sampler = ClassBalancedSampler(LABELS, 40, 4, seed=1, mode=mode)
    shards = [sampler.shard(0, 3, r, world) for r in range(world)]
    assert all(s.numel() == 40 // world for s in shards)
    assert torch.equal(torch.cat(shards), sampler.global_batch(0, 3))


@MODES
def test_classes_smaller_than_m_are_never_drawn(mode):
    labels = torch.tensor([0] * 4 + [1] * 2 + [2] * 5 + [3] * 4)
    sampler = ClassBalancedSampler(labels, 12, 4, mode=mode)
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
    with pytest.raises(ValueError, match="'epoch', 'uniform'"):
        ClassBalancedSampler(LABELS, 40, 4, mode="balanced")


def test_uneven_shards_cover_the_global_batch_in_order():
    sampler = ClassBalancedSampler(LABELS, 40, 4, seed=5)
    assert shard_bounds(40, 3) == [0, 14, 27, 40]
    for world in (1, 3, 7):
        parts = [sampler.shard(2, 1, r, world) for r in range(world)]
        assert [len(p) for p in parts] == [b - a for a, b in zip(shard_bounds(40, world), shard_bounds(40, world)[1:])]
        assert torch.equal(torch.cat(parts), sampler.global_batch(2, 1))


# Long-tailed, like iNaturalist: 2000 classes of 4 to 404 images.
TAIL_SIZES = np.random.default_rng(0).integers(4, 405, 2000)
TAIL_LABELS = torch.from_numpy(np.random.default_rng(1).permutation(np.repeat(np.arange(2000), TAIL_SIZES)))


def _epoch(sampler, epoch):
    return torch.stack([sampler.global_batch(epoch, s) for s in range(sampler.steps_per_epoch)])


def test_epoch_mode_uses_every_image_once_and_classes_in_proportion_to_size():
    m, batch = 4, 4000
    sampler = ClassBalancedSampler(TAIL_LABELS, batch, m, seed=7)
    groups = TAIL_SIZES // m
    assert sampler.steps_per_epoch == groups.sum() // (batch // m)
    for epoch in (0, 1):
        used = _epoch(sampler, epoch).reshape(-1)
        assert used.unique().numel() == used.numel(), "no image twice in an epoch"
        # Left out: each class's n mod m last images, and the groups short of a whole batch.
        undealt = groups.sum() % (batch // m)
        assert len(TAIL_LABELS) - used.numel() == (TAIL_SIZES % m).sum() + undealt * m
        per_class = np.bincount(TAIL_LABELS[used].numpy(), minlength=2000)
        shortfall = m * groups - per_class
        assert (shortfall >= 0).all() and shortfall.sum() == undealt * m
        assert (shortfall > 0).sum() <= undealt, "only the classes dealt last lose groups"
    assert not torch.equal(_epoch(sampler, 0), _epoch(sampler, 1)), "each epoch shuffles anew"


def test_uniform_mode_sees_only_part_of_a_long_tailed_epoch():
    sampler = ClassBalancedSampler(TAIL_LABELS, 4000, 4, seed=7, mode="uniform")
    used = _epoch(sampler, 0).reshape(-1)
    assert used.unique().numel() < 0.6 * len(TAIL_LABELS)


def test_a_class_shares_a_batch_with_itself_only_when_it_has_more_groups_than_the_epoch_steps():
    m, batch = 4, 8000  # 2000 groups a batch, 51 steps an epoch: classes of 208 images or more repeat
    sampler = ClassBalancedSampler(TAIL_LABELS, batch, m, seed=3)
    steps, groups = sampler.steps_per_epoch, torch.from_numpy(TAIL_SIZES // m)
    assert (groups > steps).any() and (groups <= steps).any(), "the data has both kinds"
    for s in range(0, steps, 7):
        labels = TAIL_LABELS[sampler.global_batch(0, s)].view(batch // m, m)
        assert (labels == labels[:, :1]).all(), "each group is m images of one class"
        per_class = torch.bincount(labels[:, 0], minlength=2000)
        assert (per_class <= (groups + steps - 1) // steps).all()
        assert (per_class[groups <= steps] <= 1).all()


@pytest.mark.parametrize("mode", ["epoch", "uniform"])
def test_long_tailed_batches_are_pure_in_position_and_independent_of_world_size(mode):
    a = ClassBalancedSampler(TAIL_LABELS, 4000, 4, seed=5, mode=mode)
    b = ClassBalancedSampler(TAIL_LABELS, 4000, 4, seed=5, mode=mode)
    past_one_pass = a.steps_per_epoch + 2  # train.steps_per_epoch may ask for more than a pass
    for epoch, step in [(0, 0), (3, 17), (1, past_one_pass)]:
        expected = b.global_batch(epoch, step)
        for world in (1, 2, 3, 5):
            assert torch.equal(torch.cat([a.shard(epoch, step, r, world) for r in range(world)]), expected)
    assert not torch.equal(a.global_batch(1, past_one_pass), a.global_batch(1, 2))


@pytest.mark.parametrize("mode", ["epoch", "uniform"])
def test_a_prefetched_step_is_not_computed_again(mode):
    sampler = ClassBalancedSampler(TAIL_LABELS, 4000, 4, seed=5, mode=mode)
    prefetched = sampler.shard(0, 3, 1, 2)
    assert prefetched.untyped_storage().data_ptr() == sampler.global_batch(0, 3).untyped_storage().data_ptr()
    # The memo stays small (a pass ahead in epoch mode, 32 steps in uniform mode), and what it
    # forgets comes back the same.
    for epoch in range(1, 4 if mode == "epoch" else 34):
        sampler.global_batch(epoch, 0)
    again = sampler.shard(0, 3, 1, 2)
    assert again.untyped_storage().data_ptr() != prefetched.untyped_storage().data_ptr()
    assert torch.equal(again, prefetched)


def test_pickles_for_another_process():
    sampler = ClassBalancedSampler(LABELS, 40, 4, seed=2)
    sampler.global_batch(0, 0)
    assert torch.equal(pickle.loads(pickle.dumps(sampler)).global_batch(1, 3), sampler.global_batch(1, 3))


def test_global_batch_of_65536_under_50_ms():
    # TIMING ASSERTION (issue 11's acceptance; the only one allowed in the suite). Cold: every run
    # takes a new epoch, so it includes laying out that epoch's whole pass over ~400k images.
    # Process CPU time (numpy runs it on one thread): on idle cores it is the wall time, and on a
    # shared machine other tenants' load does not count.
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.permutation(np.repeat(np.arange(20000), rng.integers(4, 37, 20000))))
    sampler = ClassBalancedSampler(labels, 65536, 4, seed=0)
    timings = []
    for epoch in range(5):
        t0 = time.process_time()
        batch = sampler.global_batch(epoch, 0)
        timings.append(time.process_time() - t0)
    assert batch.numel() == 65536 and batch.unique().numel() == 65536
    assert min(timings) < 0.05, f"global_batch at B=65536 took {min(timings):.3f} CPU s (best of 5)"


def test_a_million_labels():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.permutation(np.repeat(np.arange(50000), rng.integers(4, 37, 50000))))
    sampler = ClassBalancedSampler(labels, 65536, 4, seed=0)
    assert sampler.steps_per_epoch == (sampler.counts // 4).sum() // 16384 and sampler.num_samples == len(labels)
    group_labels = labels[sampler.global_batch(0, sampler.steps_per_epoch - 1)].view(-1, 4)
    assert (group_labels == group_labels[:, :1]).all()
