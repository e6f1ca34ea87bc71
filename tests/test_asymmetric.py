"""Asymmetric RS@k (a student's queries ranking a frozen teacher's embeddings of the batch)
against the naive float64 reference, alone and sharded over queries."""
import pytest
import torch
import torch.nn.functional as F

from rsk_dist.losses import recall
from rsk_dist.losses import MetricLearningLoss, RecallAtKSurrogate, Regression, recall_at_k_surrogate
from tests.reference import naive_asymmetric_rsk, naive_contrastive, naive_simix
from tests.test_loss import LABELS, batch, grads


def teacher_of(student: torch.Tensor, seed: int = 3, noise: float = 0.3) -> torch.Tensor:
    """Another model's embeddings of the same samples: near the student's, not equal to them."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(student + noise * torch.randn(student.shape, generator=g, dtype=student.dtype), dim=1)


def reference(student, teacher, simix, self_positive, seed=5, **kw):
    """The naive loss, SiMix mixing student and teacher with the same weights (same generator state)."""
    if simix:
        (student, labels), (teacher, _) = (naive_simix(e, LABELS, torch.Generator().manual_seed(seed)) for e in (student, teacher))
    else:
        labels = LABELS
    return naive_asymmetric_rsk(student, teacher, labels, self_positive=self_positive, **kw)


@pytest.mark.parametrize("self_positive", [True, False])
@pytest.mark.parametrize("simix", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_matches_naive_reference_float64(self_positive, simix, chunk_size, monkeypatch):
    # Blocks of 3 queries and sub-chunks inside them: the blocked path, not one block of all.
    monkeypatch.setattr(recall, "CPU_BUDGET", recall.LossBudget(recall.CPU_BUDGET.chunk_elements, 1, 3))
    student = batch(LABELS, spread=0.5)
    teacher = teacher_of(student)
    ref, ref_grad = grads(lambda e: reference(e, teacher, simix, self_positive), student)
    loss = RecallAtKSurrogate(simix=simix, chunk_size=chunk_size, asymmetric=True, self_positive=self_positive)
    ours, our_grad = grads(lambda e: loss(e, torch.tensor(LABELS), torch.Generator().manual_seed(5), gallery=teacher), student)
    assert 0.01 < ref.item() < 0.99, "test batch should not saturate the loss"
    assert ref_grad.abs().max() > 1e-3, "test batch should give a real gradient"
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("self_positive", [True, False])
@pytest.mark.parametrize("simix", [False, True])
def test_matches_naive_reference_float32(self_positive, simix):
    student = batch(LABELS)
    teacher = teacher_of(student)
    ref, ref_grad = grads(lambda e: reference(e, teacher, simix, self_positive), student)
    loss = RecallAtKSurrogate(simix=simix, asymmetric=True, self_positive=self_positive)
    ours, our_grad = grads(
        lambda e: loss(e, torch.tensor(LABELS), torch.Generator().manual_seed(5), gallery=teacher.float()), student.float()
    )
    assert ours.dtype == torch.float32
    # 1e-6 absolute: float32 rounding (6e-8 a term) over sums of at most ~100 terms, with
    # gradient entries up to a few 1e-2, so it still tests them to under 1e-4 of their size.
    assert ref_grad.abs().max() > 1e-2
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(our_grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_self_positive_changes_the_loss_and_singletons_count_only_with_it():
    # LABELS has singleton classes: with the self-positive they are queries (of their own teacher row).
    student = batch(LABELS)
    teacher = teacher_of(student)
    y = torch.tensor(LABELS)
    with_self = recall_at_k_surrogate(student, y, gallery=teacher)
    without = recall_at_k_surrogate(student, y, gallery=teacher, self_positive=False)
    assert abs(with_self.item() - without.item()) > 1e-3
    singletons = [i for i, c in enumerate(LABELS) if LABELS.count(c) == 1]
    assert singletons
    alone = naive_asymmetric_rsk(student, teacher, LABELS, queries=singletons)
    assert alone.item() > 0


@pytest.mark.parametrize("simix", [False, True])
def test_query_shards_sum_to_the_full_loss_and_touch_only_their_rows(simix):
    student = batch(LABELS).requires_grad_()
    teacher = teacher_of(student.detach())
    y = torch.tensor(LABELS)
    gen = lambda: torch.Generator().manual_seed(1)
    full = recall_at_k_surrogate(student, y, simix=simix, generator=gen(), gallery=teacher)
    (g_full,) = torch.autograd.grad(full, student)
    total, g_total = 0, torch.zeros_like(g_full)
    for i, (a, b) in enumerate([(0, 7), (7, 14), (14, 20)]):  # shard_bounds(20, 3)
        part = recall_at_k_surrogate(student, y, simix=simix, generator=gen(), gallery=teacher, query_shard=(i, 3))
        (g,) = torch.autograd.grad(part, student)
        outside = torch.ones(len(LABELS), dtype=torch.bool)
        outside[a:b] = False
        # A virtual query goes with its first sample's shard: only classes split between shards
        # send gradient outside it.
        own_classes = set(LABELS[a:b])
        whole = [r for r in range(len(LABELS)) if outside[r] and LABELS[r] in own_classes and
                 all(a <= j < b for j, c in enumerate(LABELS) if c == LABELS[r])]
        assert not whole or g[whole].abs().max() == 0
        if not simix:
            assert g[outside].abs().max() == 0, "without SiMix a shard's queries are its own rows"
        total, g_total = total + part, g_total + g
    torch.testing.assert_close(total, full, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_total, g_full, rtol=1e-10, atol=1e-13)


def test_bad_gallery_is_an_error():
    student, y = batch(LABELS), torch.tensor(LABELS)
    with pytest.raises(ValueError, match="dims must agree"):
        recall_at_k_surrogate(student, y, gallery=student[:, :8])
    with pytest.raises(ValueError, match="detach"):
        recall_at_k_surrogate(student, y, gallery=student.clone().requires_grad_())
    with pytest.raises(ValueError, match="self_positive"):
        recall_at_k_surrogate(student, y, gallery=student, rank_includes_query=True)
    with pytest.raises(ValueError, match="gallery="):
        RecallAtKSurrogate(asymmetric=True)(student, y)
    with pytest.raises(ValueError, match="asymmetric=True"):
        RecallAtKSurrogate()(student, y, gallery=student)
    with pytest.raises(ValueError, match="gallery="):
        Regression()(student, y)
    with pytest.raises(ValueError, match="dims must agree"):
        MetricLearningLoss("contrastive", asymmetric=True)(student, y, gallery=student[:4])


@pytest.mark.parametrize("self_positive", [True, False])  # Contr+ and Contr
def test_asymmetric_contrastive_matches_naive_reference(self_positive):
    student = batch(LABELS)
    teacher = teacher_of(student)
    # Margins where most pairs are active, both kinds.
    options = dict(pos_margin=0.3, neg_margin=1.3)
    ref, ref_grad = grads(lambda e: naive_contrastive(e, LABELS, ref=teacher, self_positive=self_positive, **options), student)
    loss = MetricLearningLoss("contrastive", asymmetric=True, self_positive=self_positive, **options)
    ours, our_grad = grads(lambda e: loss(e, torch.tensor(LABELS), None, gallery=teacher), student)
    assert ref_grad.abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_contr_plus_differs_from_contr():
    student, y = batch(LABELS), torch.tensor(LABELS)
    teacher = teacher_of(student)
    plus, plain = (MetricLearningLoss("contrastive", asymmetric=True, self_positive=s, pos_margin=0.3, neg_margin=1.3)
                   (student, y, gallery=teacher) for s in (True, False))
    assert abs(plus.item() - plain.item()) > 1e-3


def test_regression_is_minus_the_mean_cosine_with_the_teacher():
    student = batch(LABELS)
    teacher = teacher_of(student)
    ref, ref_grad = grads(lambda e: -sum(e[i] @ teacher[i] / e[i].norm() for i in range(len(LABELS))) / len(LABELS),
                          student * 2)  # not unit: the cosine normalises
    ours, our_grad = grads(lambda e: Regression()(e, torch.tensor(LABELS), gallery=teacher), student * 2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-9, atol=1e-12)
