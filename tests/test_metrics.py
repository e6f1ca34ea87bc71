import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsk_dist.metrics import (
    _MATMUL_BYTES_PER_SIM,
    SearchPlan,
    free_device_bytes,
    knn,
    plan_search,
    retrieval_metrics,
    retrieval_metrics_qg,
    revisited_map,
    vehicleid_metrics,
    vehicleid_split,
)


# ---------------------------------------------------------------- naive float64 references


def naive_knn(q: np.ndarray, g: np.ndarray, k: int, exclude_self: bool):
    """Full sort of every row by (-similarity, index)."""
    sims = q @ g.T
    idx = []
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: (-sims[i, j], j))
        if exclude_self:
            order.remove(i)
        idx.append(order[:k])
    idx = np.array(idx)
    return np.take_along_axis(sims, idx, 1), idx


def naive_metrics(q, ql, g, gl, ks, exclude_self):
    """Recall@k, MAP@R, R-precision query by query; queries with R = 0 skipped."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    _, idx = naive_knn(q, g, len(g) - int(exclude_self), exclude_self)
    recall = {k: [] for k in ks}
    ap, rp = [], []
    for i in range(len(q)):
        rel = [gl[j] == ql[i] for j in idx[i]]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            recall[k].append(any(rel[:k]))
        rp.append(sum(rel[:r]) / r)
        ap.append(sum(sum(rel[: p + 1]) / (p + 1) for p in range(r) if rel[p]) / r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out.update({"map@r": float(np.mean(ap)), "r_precision": float(np.mean(rp))})
    return out


def clustered(labels, dim=8, seed=0, spread=0.8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    centres = torch.randn(int(labels.max()) + 1, dim, generator=g, dtype=dtype)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=dtype)


# Unsorted, unequal class sizes (1 to 7), two singletons.
LABELS = [5, 0, 2, 5, 1, 0, 5, 3, 1, 5, 0, 4, 5, 1, 6, 5,
          2, 2, 0, 5, 1, 2, 0, 1, 2, 5, 3, 0, 1, 2, 3]


# ---------------------------------------------------------------- (a) vs brute force


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 31, 100])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_knn_matches_brute_force(chunk_size, exclude_self):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 6, generator=g, dtype=torch.float64)
    y = x if exclude_self else torch.randn(23, 6, generator=g, dtype=torch.float64)
    k = 9
    sims, idx = knn(x, y, k, exclude_self, chunk_size=chunk_size, use_faiss=False)
    ref_sims, ref_idx = naive_knn(x.numpy(), y.numpy(), k, exclude_self)
    assert sims.shape == idx.shape == (len(x), k)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 40])
def test_knn_ties_broken_by_index(chunk_size):
    # Small integer vectors: exact integer similarities, many ties and duplicate rows.
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-1, 2, (40, 3), generator=g).double()
    k = 12
    _, idx = knn(x, x, k, True, chunk_size=chunk_size, use_faiss=False)
    _, ref_idx = naive_knn(x.numpy(), x.numpy(), k, True)
    sims = (x @ x.T).numpy()
    assert any(sims[i, ref_idx[i, -1]] == sims[i, ref_idx[i, -2]] for i in range(40))  # ties at k
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


def test_knn_never_returns_self_even_for_duplicates():
    x = torch.ones(5, 2, dtype=torch.float64)  # every pair ties with the self-similarity
    _, idx = knn(x, x, 4, True, chunk_size=2, use_faiss=False)
    assert (idx != torch.arange(5)[:, None]).all()
    np.testing.assert_array_equal(idx.numpy(), [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4],
                                                [0, 1, 2, 4], [0, 1, 2, 3]])


@pytest.mark.parametrize("chunk_size", [3, 8, 31, 4096])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_brute_force(chunk_size, seed):
    emb = clustered(LABELS, seed=seed)
    ks = (1, 2, 4, 8, 16)
    got = retrieval_metrics(emb, torch.tensor(LABELS), ks, chunk_size=chunk_size)
    ref = naive_metrics(emb.numpy(), LABELS, emb.numpy(), LABELS, ks, True)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0 < got["map@r"] < got["recall@1"] < 1  # informative, not saturated


def test_retrieval_metrics_with_ties():
    # Signed one-hot embeddings: cosines are exactly -1, 0 or 1, so ranks hinge on tie-breaks.
    g = torch.Generator().manual_seed(3)
    axis = torch.randint(0, 3, (30,), generator=g)
    sign = torch.randint(0, 2, (30,), generator=g) * 2 - 1
    emb = F.one_hot(axis, 3).double() * sign[:, None]
    labels = torch.randint(0, 5, (30,), generator=g).tolist()
    got = retrieval_metrics(emb, torch.tensor(labels), (1, 3, 10), chunk_size=7)
    ref = naive_metrics(emb.numpy(), labels, emb.numpy(), labels, (1, 3, 10), True)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_qg_matches_brute_force():
    q, g = clustered(LABELS, seed=4), clustered(LABELS[15:], seed=5)
    ql, gl = torch.tensor(LABELS), torch.tensor(LABELS[15:])  # labels 4 and 6 not in gallery
    assert not {4, 6} & set(LABELS[15:])
    got = retrieval_metrics_qg(q, ql, g, gl, (1, 5, 16), chunk_size=6)
    ref = naive_metrics(q.numpy(), LABELS, g.numpy(), LABELS[15:], (1, 5, 16), False)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_singletons_left_out_of_recall():
    # 0 and 1 are a pair whose nearest other sample is each other; 2 is a singleton nearest to 0.
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 0, 7, 1, 1])
    # Query 0's nearest is 2 (a miss), 1's is 2 (miss), 3's is 4, 4's is 3: 2 hits out of the 4
    # non-singleton queries (not out of 5).
    m = retrieval_metrics(emb, labels, (1, 2))
    assert m["recall@1"] == pytest.approx(2 / 4)
    assert m["recall@2"] == pytest.approx(4 / 4)
    assert math.isnan(retrieval_metrics(emb, torch.arange(5), (1,))["recall@1"])


# ---------------------------------------------------------------- (b) vs pytorch-metric-learning


def pml_accuracy(query, query_labels, reference=None, reference_labels=None):
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",  # enough neighbours for MAP@R's R
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),  # exact, and no faiss needed
    )
    # reference=None means reference = query with ref_includes_query=True: self excluded,
    # R = class size - 1 and singleton queries dropped.
    return calc.get_accuracy(query, query_labels, reference, reference_labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytorch_metric_learning(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 1, 2, 3, 5, 8, 13, 4, 6, 2]
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    emb = clustered(labels, dim=16, seed=seed, spread=1.0, dtype=torch.float32)
    ours = retrieval_metrics(emb, labels, (1,), chunk_size=9)
    pml = pml_accuracy(emb, labels)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert 0.05 < ours["map@r"] < 0.95


def test_qg_matches_pytorch_metric_learning():
    labels = torch.tensor(LABELS)
    q = clustered(LABELS, seed=6, dtype=torch.float32)
    g = clustered(LABELS, seed=7, dtype=torch.float32)
    ours = retrieval_metrics_qg(q, labels, g[15:], labels[15:], (1,), chunk_size=4)
    pml = pml_accuracy(q, labels, g[15:], labels[15:])  # queries of labels 4, 6 have R = 0
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)


# ---------------------------------------------------------------- (c) VehicleID


def test_vehicleid_split_one_gallery_image_per_identity():
    labels = torch.tensor([4, 4, 9, 1, 9, 9, 1, 4, 7, 9, 4])
    q, g = vehicleid_split(labels, torch.Generator().manual_seed(0))
    assert sorted(labels[g].tolist()) == [1, 4, 7, 9]
    assert sorted(q.tolist() + g.tolist()) == list(range(len(labels)))
    again = vehicleid_split(labels, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], q) and torch.equal(again[1], g)
    galleries = {tuple(vehicleid_split(labels, torch.Generator().manual_seed(s))[1].tolist())
                 for s in range(20)}
    assert len(galleries) > 1  # actually random, not always the first image


def test_vehicleid_hand_computed():
    deg = torch.tensor([0.0, 0.0, 30.0, 30.0, 90.0, 10.0]) * math.pi / 180
    emb = torch.stack([deg.cos(), deg.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        _, g = vehicleid_split(labels, gen)
        m = vehicleid_metrics(emb, labels, (1, 2, 3), torch.Generator().manual_seed(seed))
        # Identities 0 and 1 find their twin first. Identity 2: if the 90° image is the gallery,
        # the 10° query sees 0° (10°), 30° (20°), then 90°: rank 3. Otherwise the 90° query
        # sees 30° (60°), then 10° (80°): rank 2.
        assert m["recall@1"] == pytest.approx(2 / 3)
        assert m["recall@2"] == pytest.approx(2 / 3 if 4 in g.tolist() else 1.0)
        assert m["recall@3"] == pytest.approx(1.0)
        assert m["map@r"] == pytest.approx(m["recall@1"])  # one relevant gallery image: R = 1


# ---------------------------------------------------------------- (d) Revisited Oxford/Paris


def revisited_setup():
    # Every query is (1, 0); gallery image j at 10*j degrees, so the ranking is 0, 1, ..., 5.
    deg = torch.arange(6, dtype=torch.float64) * 10 * math.pi / 180
    queries = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    return queries, torch.stack([deg.cos(), deg.sin()], 1)


def test_revisited_map_hand_computed():
    queries, gallery = revisited_setup()
    gnd = [
        # Medium: positives {1, 3}, junk 0 dropped -> ranking 1,2,3,4,5, positives at ranks 0, 2:
        #   j=0: (1 + 1/1)/2 * 1/2 = 1/2;  j=1: (1/2 + 2/3)/2 * 1/2 = 7/24;  AP = 19/24.
        # Hard: positive {3}, junk {0, 1} (easy 1 is junk) -> ranking 2,3,4,5, positive at rank 1:
        #   (0/1 + 1/2)/2 = 1/4.
        dict(easy=[1], hard=[3], junk=[0]),
        # Both: positives {0, 4} at ranks 0, 4: 1/2 + (1/4 + 2/5)/2 * 1/2 = 0.6625.
        dict(easy=[], hard=[0, 4], junk=[]),
        # Medium: positive {2} at rank 2 (junk 5 lies after it): (0/2 + 1/3)/2 = 1/6.
        # Hard: no positives -> skipped.
        dict(easy=[2], hard=[], junk=[5]),
    ]
    m = revisited_map(queries, gallery, gnd)
    assert m["medium"] == pytest.approx((19 / 24 + 0.6625 + 1 / 6) / 3)
    assert m["hard"] == pytest.approx((1 / 4 + 0.6625) / 2)
    # Junk really is ignored: counted as a negative, query 0's medium AP would be 1/3.
    no_junk = revisited_map(queries[:1], gallery, [dict(easy=[1], hard=[3], junk=[])])
    assert no_junk["medium"] == pytest.approx(1 / 8 + (1 / 3 + 1 / 2) / 4)
    assert math.isnan(revisited_map(queries[:1], gallery, [gnd[0] | dict(hard=[])])["hard"])


def official_compute_map(ranks, gnd):
    """revisitop's compute_map / compute_ap (evaluate.py), ported line by line."""
    def compute_ap(ranks, nres):
        ap, recall_step = 0.0, 1.0 / nres
        for j, rank in enumerate(ranks):
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        return ap

    total, nempty = 0.0, 0
    for i in range(len(gnd)):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            for ip in range(len(pos)):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
        total += compute_ap(pos, len(qgnd))
    return total / (len(gnd) - nempty)


def test_revisited_map_matches_official_code():
    g = torch.Generator().manual_seed(8)
    queries = torch.randn(6, 5, generator=g, dtype=torch.float64)
    gallery = torch.randn(40, 5, generator=g, dtype=torch.float64)
    gnd = []
    for _ in range(6):
        p = torch.randperm(40, generator=g).tolist()
        gnd.append(dict(easy=p[:4], hard=p[4:7], junk=p[7:12]))
    sims = (F.normalize(gallery, dim=1) @ F.normalize(queries, dim=1).T).numpy()
    ranks = np.argsort(-sims, axis=0, kind="stable")
    medium = [dict(ok=d["easy"] + d["hard"], junk=d["junk"]) for d in gnd]
    hard = [dict(ok=d["hard"], junk=d["junk"] + d["easy"]) for d in gnd]
    m = revisited_map(queries, gallery, gnd)
    assert m["medium"] == pytest.approx(official_compute_map(ranks, medium), abs=1e-12)
    assert m["hard"] == pytest.approx(official_compute_map(ranks, hard), abs=1e-12)
    assert m["medium"] != pytest.approx(m["hard"])


# ---------------------------------------------------------------- (e) bad input, optional faiss


def test_clear_errors():
    emb, labels = clustered(LABELS), torch.tensor(LABELS)
    with pytest.raises(ValueError, match="Recall@31 needs 31 neighbours"):
        retrieval_metrics(emb, labels, (1, 31))  # 31 samples: only 30 others
    retrieval_metrics(emb, labels, (1, 30))  # k = N - 1 is fine
    with pytest.raises(ValueError, match="k=31 is out of range"):
        knn(emb, emb, 31, True)
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(emb, labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics_qg(emb, labels, emb[:5], labels[:4], (1,))
    with pytest.raises(ValueError, match="same width"):
        knn(emb, emb[:, :3], 1, False)
    with pytest.raises(ValueError, match="same length"):
        knn(emb, emb[:5], 1, True)
    with pytest.raises(ValueError, match="NaN"):
        knn(emb.clone().fill_(math.nan), emb, 1, False)
    with pytest.raises(ValueError, match="ground truth"):
        revisited_map(emb[:2], emb, [dict(easy=[], hard=[1], junk=[])])


def test_import_does_not_need_faiss():
    code = ("import sys; sys.modules['faiss'] = None; import rsk_dist.metrics as m, torch; "
            "print(m.knn(torch.eye(3), torch.eye(3), 1, False)[1].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[0], [1], [2]]"


def test_faiss_path_matches_matmul():
    # Exact ties in float32 too; tie groups often run past faiss's extra candidates (redone by
    # matmul), and k = N - 1 leaves no candidate out at all.
    x = torch.randint(-2, 3, (300, 4)).float()
    for k in (1, 7, 50, 299):
        a = knn(x, x, k, True, chunk_size=64, use_faiss=True)
        b = knn(x, x, k, True, chunk_size=64, use_faiss=False)
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    q, g = torch.randn(200, 16), torch.randn(150, 16)
    a = knn(q, g, 10, False, chunk_size=33, use_faiss=True)
    b = knn(q, g, 10, False, chunk_size=33, use_faiss=False)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)  # faiss sums in another order


def test_use_faiss_true_without_faiss_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match="faiss is not installed"):
        knn(torch.eye(3), torch.eye(3), 1, False, use_faiss=True)


GIB = 1 << 30


def test_search_plan_on_the_cpu_is_as_before():
    """The CPU keeps its behaviour: faiss whenever importable, unless the matmul path is asked for."""
    assert plan_search("cpu", 10**6, 8, 4096, None, None, True, False) == SearchPlan("faiss", 4096)
    assert plan_search("cpu", 10**6, 8, 4096, None, None, False, False) == SearchPlan("matmul", 4096)
    assert plan_search("cpu", 10**6, 8, 4096, None, False, True, False) == SearchPlan("matmul", 4096)
    assert plan_search("cpu", 10**6, 8, 4096, None, True, True, False) == SearchPlan("faiss", 4096)
    assert free_device_bytes(torch.device("cpu")) is None


def test_search_plan_on_cuda_prefers_the_exact_on_device_matmul():
    # SOP-sized: 4096 x 60502 similarities need 4 GB, well inside 20 GiB free; faiss-gpu installed.
    assert plan_search("cuda", 60502, 8, 4096, 20 * GIB, None, True, True) == SearchPlan("matmul", 4096)
    # Asked for: faiss, on the GPU; k beyond faiss-gpu's limit stays with matmul.
    assert plan_search("cuda", 60502, 8, 4096, 20 * GIB, True, True, True) == SearchPlan("faiss", 4096)
    assert plan_search("cuda", 60502, 2040, 4096, 20 * GIB, True, True, True).backend == "matmul"
    # faiss-cpu only, asked for explicitly: the CPU index (through the host), as requested.
    assert plan_search("cuda", 60502, 8, 4096, 20 * GIB, True, True, False) == SearchPlan("faiss", 4096)
    with pytest.raises(ImportError, match="faiss is not installed"):
        plan_search("cuda", 60502, 8, 4096, 20 * GIB, True, False, False)


def test_search_plan_on_cuda_when_a_chunk_does_not_fit():
    n, free = 10**7, 20 * GIB  # one 4096-row chunk of similarities: 655 GB
    assert plan_search("cuda", n, 8, 4096, free, None, True, True) == SearchPlan("faiss", 4096)
    # Without faiss-gpu the chunk shrinks until its similarities fit in free memory.
    for have_faiss in (False, True):
        plan = plan_search("cuda", n, 8, 4096, free, None, have_faiss, False)
        assert plan.backend == "matmul"
        assert plan.chunk_size * n * _MATMUL_BYTES_PER_SIM <= free < (plan.chunk_size + 1) * n * _MATMUL_BYTES_PER_SIM
    # The boundary: exactly fitting is fitting.
    fit = 4096 * 1000 * _MATMUL_BYTES_PER_SIM
    assert plan_search("cuda", 1000, 8, 4096, fit, None, True, True) == SearchPlan("matmul", 4096)
    assert plan_search("cuda", 1000, 8, 4096, fit - 1, None, True, True) == SearchPlan("faiss", 4096)
