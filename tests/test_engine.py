import copy

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


def test_compiled_dropout_model_matches_graph_kept_chunked_forward():
    """The same exactness with the model under torch.compile (CPU inductor): pass 1 runs its
    no-grad graph, pass 2 and the reference its training graph, and both must draw the same
    dropout masks from the replayed RNG state. A tiny model: inductor compiles each kernel with
    the C++ compiler, about 40 CPU-seconds here even for this one (ResNet-50 would take many minutes)."""
    import torch._inductor.config

    torch.manual_seed(1)
    model = Net(0.3, torch.float32)
    model.compile()
    images, labels = data(torch.float32)
    loss_fn = RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05, simix=True)
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers to start
        expected = reference_grads(model, loss_fn, images, labels, 8, seed=11, gen_seed=3)
        got, _ = two_pass_grads(model, loss_fn, images, labels, 8, seed=11, gen_seed=3)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    assert model._compiled_call_impl is not None


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


def dtypes_inside(model):
    """The dtypes the model's first layer computes in, recorded on every forward."""
    seen = []
    model.body[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_computes_in_low_precision_and_is_close_to_float32(dtype):
    torch.manual_seed(3)
    model = Net(0.0, torch.float32)
    images, labels = data(torch.float32)
    loss_fn = RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05)
    exact, _ = two_pass_grads(model, loss_fn, images, labels, 8, 0, 0)
    seen = dtypes_inside(model)
    model.zero_grad()
    result = LargeBatchStep(model, loss_fn, 8, autocast_dtype=dtype).step(images, labels)
    # Both passes (4 chunks each) ran under autocast; the loss still gets float32.
    assert seen == [dtype] * 8
    assert result.embeddings.dtype == torch.float32
    mixed = param_grads(model)
    flat_mixed, flat_exact = torch.cat([g.flatten() for g in mixed]), torch.cat([g.flatten() for g in exact])
    assert not torch.equal(flat_mixed, flat_exact)
    assert F.cosine_similarity(flat_mixed, flat_exact, dim=0) > 0.95


def sgd_update(model, step, images, labels, lr=0.1):
    """The parameter change of one SGD step through ``step.optimizer_step``, and whether it stepped."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    step.step(images, labels)
    stepped = step.optimizer_step(optimizer)
    return [p.detach() - b for p, b in zip(model.parameters(), before)], stepped


def test_float16_update_is_unscaled_and_equals_the_float32_update():
    torch.manual_seed(4)
    model = Net(0.0, torch.float32)
    images, labels = data(torch.float32)
    loss_fn = RecallAtKSurrogate(k=(1, 2, 4), tau2=0.05)
    initial = copy.deepcopy(model.state_dict())
    exact, stepped = sgd_update(model, LargeBatchStep(model, loss_fn, 8), images, labels)
    assert stepped
    model.load_state_dict(initial)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = LargeBatchStep(model, loss_fn, 8, autocast_dtype=torch.float16, grad_scaler=scaler)
    mixed, stepped = sgd_update(model, step, images, labels)
    assert stepped and scaler.get_scale() == 2.0**10  # a finite step keeps the scale (growth after 2000)
    for e, m in zip(exact, mixed):
        # float16 tolerance: ~1e-3 relative per op; a missing unscale would be off by 1024x
        torch.testing.assert_close(m, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


def float16_setup(seed: int):
    """A model, its batch, a GradScaler at 2^10 and an fp16 two-pass step; the initial parameters."""
    torch.manual_seed(seed)
    model = Net(0.0, torch.float32)
    images, labels = data(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = LargeBatchStep(model, RecallAtKSurrogate(k=(1, 2)), 8, autocast_dtype=torch.float16, grad_scaler=scaler)
    return model, images, labels, scaler, step, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_float16_step_with_nonfinite_gradient_is_skipped_and_the_scale_drops(bad):
    model, images, labels, scaler, step, before = float16_setup(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step.step(images, labels)
    next(model.parameters()).grad[0, 0] = bad
    assert not step.optimizer_step(optimizer)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(p.detach(), b)
    assert scaler.get_scale() == 2.0**9
    # the next, finite, step runs at the lowered scale
    optimizer.zero_grad()
    step.step(images, labels)
    assert step.optimizer_step(optimizer)
    assert not torch.equal(next(model.parameters()).detach(), before[0])


def skip_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    from rsk_dist.distributed import sum_gradients
    from tests.dist_worker import init_group

    init_group(rank, world, out)
    try:
        model, images, labels, scaler, step, before = float16_setup(6)
        step.step(images, labels)
        if rank == 0:
            next(model.parameters()).grad[0, 0] = float("inf")  # an overflow on one worker only
        sum_gradients(model)
        stepped = step.optimizer_step(torch.optim.SGD(model.parameters(), lr=0.1))
        unchanged = all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        torch.save({"stepped": stepped, "unchanged": unchanged, "scale": scaler.get_scale()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_float16_overflow_on_one_worker_skips_the_step_on_all(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(skip_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got == {"stepped": False, "unchanged": True, "scale": 2.0**9}, f"rank {rank}: {got}"


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


def test_trainer_checkpoints_and_restores_the_grad_scaler(tmp_path):
    from rsk_dist.config import load_config
    from rsk_dist.train import Trainer

    config = load_config({
        "data": {"train": {"kind": "digits", "split": "train"}, "image_size": 8},
        "model": {"in_channels": 1, "dim": 16, "channels_last": True}, "sampler": {"batch_size": 40},
        "train": {"epochs": 1, "steps_per_epoch": 2, "chunk_size": 20, "autocast": "fp16"},
        "run": {"name": "amp", "storage_path": f"file://{tmp_path}"},
    })
    trainer, states = Trainer(config, torch.device("cpu")), []
    assert trainer.model.memory_format == torch.channels_last
    # a scale that differs from a fresh scaler's
    trainer.step.grad_scaler.load_state_dict(torch.amp.GradScaler("cpu", init_scale=2.0**7).state_dict())
    trainer.run(lambda metrics, state: states.append(state))
    saved = states[-1]["grad_scaler"]
    assert saved["scale"] == 2.0**7 and saved["_growth_tracker"] == 2
    resumed = Trainer(config, torch.device("cpu"), states[-1])
    assert resumed.step.grad_scaler.state_dict() == saved
