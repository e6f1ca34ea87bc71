import pytest
import torch
import torch.multiprocessing as mp

from tests.dist_worker import CONFIGS, free_port, run_worker, train


@pytest.fixture(scope="module")
def single_process():
    return {config: train(*config) for config in CONFIGS}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_workers_match_one_process_on_the_global_batch(world, single_process, tmp_path):
    mp.spawn(run_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for mode, simix in CONFIGS:
        initial, expected = single_process[(mode, simix)]
        moved = sum((e - i).norm() for e, i in zip(expected, initial))
        assert moved > 1e-2, "training should move the parameters, or the comparison is empty"
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}_{mode}_{simix}.pt", weights_only=True)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(),
                                           msg=lambda m: f"W={world} {mode} simix={simix} rank {rank}: {m}")
