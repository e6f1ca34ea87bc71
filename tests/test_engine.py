import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsk_dist.engine import LargeBatchStep
from rsk_dist.losses import RecallAtKSurrogate


class Net(nn.Module):
    def __init__(self, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 8))
        self.to(dtype)

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


def data(dtype, n=32):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n // 4).repeat_interleave(4)[torch.randperm(n, generator=g)]
    images = torch.randn(n, 10, generator=g, dtype=dtype) + 0.5 * labels[:, None].to(dtype)
    return images, labels


def param_grads(model):
    return [p.grad.clone() for p in model.parameters()]


def reference_grads(model, loss_fn, images, labels, chunk, seed, gen_seed):
    """One backward through the chunk-by-chunk forward kept with its graph."""
    model.zero_grad()
    torch.manual_seed(seed)
    emb = torch.cat([model(c) for c in images.split(chunk)])
    loss_fn(emb, labels, generator=torch.Generator().manual_seed(gen_seed)).backward()
    return param_grads(model)


def two_pass_grads(model, loss_fn, images, labels, chunk, seed, gen_seed):
    model.zero_grad()
    torch.manual_seed(seed)
    result = LargeBatchStep(model, loss_fn, chunk).step(images, labels, generator=torch.Generator().manual_seed(gen_seed))
    return param_grads(model), result


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [8, 7, 32, 1])
@pytest.mark.parametrize("simix", [False, True])
def test_dropout_model_matches_graph_kept_chunked_forward(dtype, rtol, chunk, simix):
    torch.manual_seed(1)
    model = Net(0.3, dtype)
    images, labels = data(dtype)
    loss_fn = RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05, simix=simix)
    expected = reference_grads(model, loss_fn, images, labels, chunk, seed=11, gen_seed=3)
    got, result = two_pass_grads(model, loss_fn, images, labels, chunk, seed=11, gen_seed=3)
    assert result.embeddings.shape == (32, 8)
    assert 0 < result.loss < 1
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * e.abs().max().item())
    # Dropout matters here: another seed gives other gradients, so replaying RNG is tested.
    other = reference_grads(model, loss_fn, images, labels, chunk, seed=12, gen_seed=3)
    assert not torch.allclose(other[0], expected[0], rtol=1e-3)


@pytest.mark.parametrize("chunk", [5, 16])
def test_deterministic_model_matches_full_batch_backward(chunk):
    torch.manual_seed(2)
    model = Net(0.0, torch.float64)
    images, labels = data(torch.float64)
    loss_fn = RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05)
    model.zero_grad()
    loss_fn(model(images), labels).backward()
    expected = param_grads(model)
    got, _ = two_pass_grads(model, loss_fn, images, labels, chunk, seed=0, gen_seed=0)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_rng_continues_as_after_the_first_pass():
    model = Net(0.5, torch.float32)
    images, labels = data(torch.float32)
    loss_fn = RecallAtKSurrogate(k=(1, 2))
    torch.manual_seed(5)
    with torch.no_grad():
        for c in images.split(8):
            model(c)
    expected = torch.rand(3)
    torch.manual_seed(5)
    LargeBatchStep(model, loss_fn, 8).step(images, labels)
    assert torch.equal(torch.rand(3), expected)


def test_gradients_accumulate_into_existing_grad():
    model = Net(0.0, torch.float64)
    images, labels = data(torch.float64)
    loss_fn = RecallAtKSurrogate(k=(1, 2))
    step = LargeBatchStep(model, loss_fn, 8)
    model.zero_grad()
    step.step(images, labels)
    once = param_grads(model)
    step.step(images, labels)
    for a, b in zip(once, param_grads(model)):
        torch.testing.assert_close(b, 2 * a)


def test_bfloat16_autocast_on_cpu_is_close_to_float32():
    torch.manual_seed(3)
    model = Net(0.0, torch.float32)
    images, labels = data(torch.float32)
    loss_fn = RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05)
    exact, _ = two_pass_grads(model, loss_fn, images, labels, 8, 0, 0)
    model.zero_grad()
    result = LargeBatchStep(model, loss_fn, 8, autocast_dtype=torch.bfloat16).step(images, labels)
    assert result.embeddings.dtype == torch.float32
    mixed = param_grads(model)
    cos = F.cosine_similarity(torch.cat([g.flatten() for g in mixed]), torch.cat([g.flatten() for g in exact]), dim=0)
    assert cos > 0.95


def test_batchnorm_in_training_mode_warns():
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8))
    with pytest.warns(UserWarning, match="BatchNorm"):
        LargeBatchStep(model, RecallAtKSurrogate(), 8)


def test_bad_arguments_are_clear_errors():
    model = Net(0.0, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        LargeBatchStep(model, RecallAtKSurrogate(), 0)
    with pytest.raises(ValueError, match="float16"):
        LargeBatchStep(model, RecallAtKSurrogate(), 4, grad_scaler=torch.amp.GradScaler("cpu"))
