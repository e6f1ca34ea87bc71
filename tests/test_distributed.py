import pytest
import torch
import torch.multiprocessing as mp

from tests.dist_worker import CONFIGS, run_refusal_worker, run_worker, train
from tests.reference import EXACT


@pytest.fixture(scope="module")
def single_process():
    return {config: train(*config) for config in CONFIGS}


@pytest.mark.parametrize("world", [1, 2, 3, 4])  # W=3: shards 11, 11, 10 of 32
def test_workers_match_one_process_on_the_global_batch(world, single_process, tmp_path):
    mp.spawn(run_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    for mode, simix in CONFIGS:
        initial, expected = single_process[(mode, simix)]
        moved = sum((e - i).norm() for e, i in zip(expected, initial))
        assert moved > 1e-2, "training should move the parameters, or the comparison is empty"
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}_{mode}_{simix}.pt", weights_only=True)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, rtol=EXACT, atol=EXACT * e.abs().max().item(),
                                           msg=lambda m: f"W={world} {mode} simix={simix} rank {rank}: {m}")


def test_global_batch_loss_refuses_simix_without_generator_and_unequal_split(tmp_path):
    mp.spawn(run_refusal_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        no_generator, bad_split = torch.load(tmp_path / f"refusal{rank}.pt", weights_only=True)
        assert "needs a generator" in no_generator and "mixing_generator" in no_generator
        assert "sizes [2, 4]" in bad_split and "[3, 3]" in bad_split and "shard_bounds" in bad_split


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_evaluation_matches_one_process(world, tmp_path):
    from rsk_dist.evaluate import embed_source, evaluate
    from tests.dist_worker import eval_model, run_eval_worker

    model, source = eval_model()
    n = source.labels.numel()
    chunk = -(-n // world)  # every worker embeds its share in one chunk, as one process does in W
    expected = evaluate(model, source, ks=(1, 2, 4, 8), chunk_size=chunk)
    emb, labels = embed_source(model, source, chunk_size=chunk)
    mp.spawn(run_eval_worker, args=(world, str(tmp_path), chunk), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"eval{rank}.pt", weights_only=True)
        assert got["emb"].shape == (n, 32)
        torch.testing.assert_close(got["emb"], emb, rtol=1e-5, atol=1e-6)
        assert torch.equal(got["labels"], labels)
        assert got["metrics"] == pytest.approx(expected, abs=1e-12)
    assert 0.1 < expected["recall@1"] < 1


@pytest.mark.parametrize("world", [2, 4])
def test_asymmetric_losses_on_workers_match_one_process(world, tmp_path):
    # RS@k in both modes, with and without SiMix; the asymmetric contrastive loss and regression replicated.
    from rsk_dist.sampler import shard_bounds
    from tests.dist_worker import ASYMMETRIC_CONFIGS, asymmetric_gradient, run_asymmetric_worker

    mp.spawn(run_asymmetric_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    bounds = shard_bounds(32, world)
    gallery_bytes = (world - 1) * (32 // world) * 8 * 4  # the others' teacher rows, float32 d = 8
    for rank in range(world):
        got = torch.load(tmp_path / f"asymmetric{rank}.pt", weights_only=True)
        for config in ASYMMETRIC_CONFIGS:
            batch, mode, simix, _ = config
            expected = asymmetric_gradient(*config)
            assert expected["grad"].abs().max() > 1e-3
            mine = got[config]
            msg = lambda m: f"W={world} {config} rank {rank}: {m}"
            torch.testing.assert_close(mine["loss"], expected["loss"], rtol=1e-6, atol=0, msg=msg)
            torch.testing.assert_close(mine["grad"], expected["grad"][bounds[rank]:bounds[rank + 1]], rtol=1e-5,
                                       atol=1e-6 * expected["grad"].abs().max().item(), msg=msg)
            # Sharded: only the teacher's gallery travels, unless SiMix mixes a class split between workers.
            split = simix and batch == "unequal"
            rounds = {"replicated": 2, "sharded": 3 if split else 1}[mode]  # gallery, students, gradients
            assert mine["bytes"].item() == rounds * gallery_bytes, msg("bytes received")
