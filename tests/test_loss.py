import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rsk_dist.losses import recall
from rsk_dist.losses import MetricLearningLoss, RecallAtKSurrogate, recall_at_k_surrogate, simix
from rsk_dist.sampler import shard_bounds
from tests.reference import naive_contrastive, naive_multi_similarity, naive_rsk, naive_simix


def batch(labels: list[int], dim: int = 16, seed: int = 0, spread: float = 0.4):
    """Unit embeddings clustered by label so that ranks and recalls sit away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(labels) + 1, dim, generator=g, dtype=torch.float64)
    e = centres[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return F.normalize(e, dim=1)


# Unsorted labels, classes of unequal size (up to 6), singletons, k beyond every class.
LABELS = [3, 0, 7, 3, 1, 0, 3, 9, 1, 3, 0, 4, 3, 1, 5, 3, 2, 2, 0, 8]
CASES = [
    dict(k=(1, 2, 4, 8, 16), tau1=1.0, tau2=0.01),
    dict(k=(1, 3, 32), tau1=0.5, tau2=0.05),
]


def grads(fn, emb):
    emb = emb.clone().requires_grad_()
    value = fn(emb)
    (grad,) = torch.autograd.grad(value, emb)
    return value.detach(), grad


@pytest.mark.parametrize("rank_includes_query", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_matches_naive_reference_float64(rank_includes_query, case, chunk_size):
    emb = batch(LABELS)
    ref, ref_grad = grads(lambda e: naive_rsk(e, LABELS, rank_includes_query=rank_includes_query, **case), emb)
    loss = RecallAtKSurrogate(rank_includes_query=rank_includes_query, chunk_size=chunk_size, **case)
    ours, our_grad = grads(lambda e: loss(e, torch.tensor(LABELS)), emb)
    assert 0.01 < ref.item() < 0.99, "test batch should not saturate the loss"
    assert ref_grad.abs().max() > 1e-3, "test batch should give a real gradient"
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank_includes_query", [False, True])
def test_matches_naive_reference_float32(rank_includes_query):
    emb = batch(LABELS)
    ref, ref_grad = grads(lambda e: naive_rsk(e, LABELS, rank_includes_query=rank_includes_query), emb)
    loss = RecallAtKSurrogate(rank_includes_query=rank_includes_query)
    ours, our_grad = grads(lambda e: loss(e, torch.tensor(LABELS)), emb.float())
    assert ours.dtype == torch.float32
    # Most sigmoid arguments (s_qz - s_qx) / tau2 lie below the CPU's subnormal floor here, so
    # this also checks that the floors leave the loss and its gradient exact in float32.
    labels, sim = torch.tensor(LABELS), emb @ emb.T
    positive = (labels[:, None] == labels[None]) & ~torch.eye(len(LABELS), dtype=torch.bool)
    args = (sim[:, None, :] - sim[:, :, None]) / loss.tau2  # [q, x, z]
    assert (args[positive] < recall.SIGMOID_ARG_FLOOR).float().mean() > 0.5
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(our_grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("simix_flag", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_many_similarity_blocks_match_naive_reference(simix_flag, chunk_size, monkeypatch):
    # Blocks of 3 queries (the default holds all of this batch in one), sub-chunks inside them.
    monkeypatch.setattr(recall, "CPU_BUDGET", recall.LossBudget(recall.CPU_BUDGET.chunk_elements, 1, 3))
    emb = batch(LABELS, spread=0.5)
    gen = lambda: torch.Generator().manual_seed(5)
    ref, ref_grad = grads(lambda e: naive_rsk(*(naive_simix(e, LABELS, gen()) if simix_flag else (e, LABELS))), emb)
    loss = RecallAtKSurrogate(simix=simix_flag, chunk_size=chunk_size)
    ours, our_grad = grads(lambda e: loss(e, torch.tensor(LABELS), generator=gen()), emb)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_cuda_budget_plans_few_sub_chunks_at_65536_with_simix():
    # 16384 classes of 4 real samples; SiMix adds 6 virtual ones per class: 163840 samples and
    # 9 positives per query. The CPU budget cuts that into 81,920 sub-chunks (~53 kernels each).
    labels = torch.arange(16384).repeat_interleave(4)
    mixed = simix.mixing(labels, torch.Generator().manual_seed(0)).labels
    assert mixed.numel() == 163840
    count = lambda plan: sum(len(subs) for _, _, subs in plan)
    assert count(recall.plan_for_labels(mixed, recall.CPU_BUDGET)) == 81920
    for gib in (16, 24, 80, 141):  # the plan is a host function: any device's, here
        plan = recall.plan_for_labels(mixed, recall.cuda_budget(gib << 30))
        assert count(plan) <= 5000, (gib, count(plan))
        # every query once, each sub-chunk's sigmoid buffer within the budget's share of memory
        assert [b0 for b0, _, _ in plan[1:]] == [b1 for _, b1, _ in plan[:-1]] and plan[-1][1] == mixed.numel()
        largest = max((c1 - c0) * p * mixed.numel() for _, _, subs in plan for c0, c1, p in subs)
        assert largest * 4 <= (gib << 30) // recall.CUDA_MEMORY_SHARE
    assert recall.loss_budget(torch.device("cpu")) == recall.CPU_BUDGET


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    # The reference sees the same rounded inputs: what remains is the loss's own arithmetic,
    # which in half precision put the gradient several percent off.
    emb = batch(LABELS).to(dtype)
    ref, ref_grad = grads(lambda e: naive_rsk(e, LABELS), emb.double())
    ours, our_grad = grads(lambda e: RecallAtKSurrogate()(e, torch.tensor(LABELS)), emb)
    assert ours.dtype == torch.float32 and our_grad.dtype == dtype
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(our_grad.double(), ref_grad, rtol=0, atol=1e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("rank_includes_query", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_simix_matches_naive_reference(rank_includes_query, dtype, rtol):
    emb = batch(LABELS, spread=0.5)
    ref, ref_grad = grads(
        lambda e: naive_rsk(*naive_simix(e, LABELS, torch.Generator().manual_seed(5)), rank_includes_query=rank_includes_query),
        emb,
    )
    loss = RecallAtKSurrogate(simix=True, rank_includes_query=rank_includes_query, chunk_size=5)
    ours, our_grad = grads(lambda e: loss(e, torch.tensor(LABELS), generator=torch.Generator().manual_seed(5)), emb.to(dtype))
    assert ref_grad.abs().max() > 1e-3
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=0)
    torch.testing.assert_close(our_grad.double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


def test_simix_flag_equals_explicit_mix():
    emb = batch(LABELS).requires_grad_()
    y = torch.tensor(LABELS)
    a = RecallAtKSurrogate(simix=True)(emb, y, generator=torch.Generator().manual_seed(3))
    (ga,) = torch.autograd.grad(a, emb)
    b = RecallAtKSurrogate()(*simix.mix(emb, y, torch.Generator().manual_seed(3)))
    (gb,) = torch.autograd.grad(b, emb)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-13)


def test_simix_adds_one_virtual_sample_per_same_class_pair():
    y = torch.tensor([2, 2, 2, 2, 5, 5, 5, 5, 9])
    e, labels = simix.mix(batch(y.tolist()), y, torch.Generator().manual_seed(0))
    assert e.shape[0] == 9 + 6 + 6
    assert labels[9:].tolist() == [2] * 6 + [5] * 6
    # 4096 images in classes of 4 become 10240 samples (spec §2).
    y = torch.arange(1024).repeat_interleave(4)
    assert simix.mixing(y).labels.numel() == 10240


def previous_mixing(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The enumeration SiMix used before it grouped labels (an N x N mask), kept as the reference
    for its documented order: (first, second, weight) of the virtual samples."""
    same = labels[:, None] == labels[None, :]
    i, j = torch.nonzero(torch.triu(same, diagonal=1), as_tuple=True)
    order = torch.sort(labels[i], stable=True).indices
    i, j = i[order], j[order]
    return i, j, torch.rand(i.numel(), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("labels", [LABELS, torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(2)).tolist()])
def test_simix_pairs_and_weights_keep_the_previous_order(labels):
    y = torch.tensor(labels)
    m = simix.mixing(y, torch.Generator().manual_seed(4))
    first, second, weight = previous_mixing(y, torch.Generator().manual_seed(4))
    n = y.numel()
    assert len(set(torch.bincount(y).tolist()) - {0}) > 2, "classes of unequal size"
    assert torch.equal(m.first[n:], first) and torch.equal(m.second[n:], second)
    assert torch.equal(m.weight[n:], weight)
    assert torch.equal(m.labels[n:], y[first])


def test_simix_mixing_memory_stays_small_at_n_65536():
    # In a fresh process, so that the peak is this draw's own. 16384 classes of 4 plus unequal ones.
    code = (
        "import resource, torch\n"
        "from rsk_dist.losses import simix\n"
        "y = torch.arange(65536) // 4\n"
        "y[:4096] = torch.arange(4096) // 11\n"
        "simix.mixing(y[:8], torch.Generator().manual_seed(0))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = simix.mixing(y[torch.randperm(65536)], torch.Generator().manual_seed(0))\n"
        "print(m.labels.numel(), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    n_ext, growth_mb = map(int, out.stdout.split())
    assert n_ext > 65536 + 6 * 15000
    assert growth_mb < 300, f"drawing the SiMix mixing grew peak RSS by {growth_mb} MB"


def test_simix_weights_follow_the_generator():
    y = torch.tensor([0, 1, 0, 1, 0])
    m1 = simix.mixing(y, torch.Generator().manual_seed(7))
    m2 = simix.mixing(y, torch.Generator().manual_seed(7))
    m3 = simix.mixing(y, torch.Generator().manual_seed(8))
    assert torch.equal(m1.weight, m2.weight)
    assert not torch.equal(m1.weight, m3.weight)


@pytest.mark.parametrize("simix_flag", [False, True])
def test_query_shards_sum_to_the_full_loss(simix_flag):
    emb = batch(LABELS).requires_grad_()
    y = torch.tensor(LABELS)
    full = recall_at_k_surrogate(emb, y, simix=simix_flag, generator=torch.Generator().manual_seed(1))
    (g_full,) = torch.autograd.grad(full, emb)
    parts = [
        recall_at_k_surrogate(emb, y, simix=simix_flag, generator=torch.Generator().manual_seed(1), query_shard=(i, 3))
        for i in range(3)
    ]
    assert all(p.item() > 0 for p in parts)
    (g_parts,) = torch.autograd.grad(sum(parts), emb)
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("simix_flag", [False, True])
def test_query_shard_is_the_workers_own_rows(simix_flag):
    # 20 samples over 3 workers: shards 7, 7, 6; with SiMix the virtual samples split likewise.
    emb = batch(LABELS)
    y = torch.tensor(LABELS)
    gen = lambda: torch.Generator().manual_seed(1)
    extended, ext_labels = naive_simix(emb, LABELS, gen()) if simix_flag else (emb, LABELS)
    real = shard_bounds(len(LABELS), 3)
    virtual = shard_bounds(len(ext_labels) - len(LABELS), 3) if simix_flag else [0] * 4
    for i in range(3):
        own = list(range(real[i], real[i + 1])) + [len(LABELS) + v for v in range(virtual[i], virtual[i + 1])]
        ours = recall_at_k_surrogate(emb, y, simix=simix_flag, generator=gen(), query_shard=(i, 3))
        torch.testing.assert_close(ours, naive_rsk(extended, ext_labels, queries=own), rtol=1e-9, atol=0)


def test_bad_query_shard_is_an_error():
    with pytest.raises(ValueError, match="query_shard"):
        recall_at_k_surrogate(batch(LABELS), torch.tensor(LABELS), query_shard=(3, 3))


def test_gradcheck_small_case():
    emb = batch([0, 1, 0, 1, 1, 2, 0], dim=4, spread=0.6).requires_grad_()
    y = torch.tensor([0, 1, 0, 1, 1, 2, 0])
    for flag in (False, True):
        fn = lambda e: recall_at_k_surrogate(e, y, k=(1, 2), tau2=0.1, simix=flag, chunk_size=2,
                                             generator=torch.Generator().manual_seed(0))
        assert torch.autograd.gradcheck(fn, (emb,), eps=1e-6, atol=1e-7)


def test_no_positive_pair_is_an_error():
    with pytest.raises(ValueError, match="no positive pair"):
        RecallAtKSurrogate()(batch([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="N labels"):
        RecallAtKSurrogate()(batch([0, 0, 1]), torch.tensor([0, 0]))


def test_tight_clusters_match_hand_computed_value():
    # Classes of 4 collapsed to points: each positive ties with the 2 others (sigmoid(0) = 0.5
    # each) and beats all negatives, so its rank is 2; R_1 = min(1, 3 sigmoid(-1)),
    # R_2 = 3 sigmoid(0) / 2.
    y = torch.arange(8).repeat_interleave(4)
    tight = batch(y.tolist(), spread=1e-4)
    expected = 1 - (min(1.0, 3 * torch.sigmoid(torch.tensor(-1.0)).item()) + 0.75) / 2
    assert RecallAtKSurrogate(k=(1, 2))(tight, y).item() == pytest.approx(expected, abs=1e-3)
    shuffled = y[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    assert RecallAtKSurrogate(k=(1, 2))(tight, shuffled).item() > 0.8


def test_backward_scales_with_upstream_gradient_and_retained_graph():
    emb = batch(LABELS).requires_grad_()
    loss = RecallAtKSurrogate()(emb, torch.tensor(LABELS))
    (once,) = torch.autograd.grad(loss, emb, retain_graph=True)
    (scaled,) = torch.autograd.grad(3 * loss, emb)
    torch.testing.assert_close(scaled, 3 * once)


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_baselines_match_an_independent_computation(name):
    reference = {"contrastive": naive_contrastive, "multi_similarity": naive_multi_similarity}[name]
    # Spread out so that both margins and both soft-max terms are active.
    emb = batch(LABELS, spread=0.8)
    ref, ref_grad = grads(lambda e: reference(e, LABELS), emb)
    ours, our_grad = grads(lambda e: MetricLearningLoss(name)(e, torch.tensor(LABELS)), emb)
    assert ref_grad.abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-7, atol=1e-9 * ref_grad.abs().max().item())


def test_unknown_baseline_names_the_choices():
    with pytest.raises(ValueError, match="contrastive"):
        MetricLearningLoss("arcface_typo")
