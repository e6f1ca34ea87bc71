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


# ------------------------------------------------------------------ input, clock, compile (issue 20)

SHAPE = (3, 10, 6)  # C x H x W of the image tests: no activation of TinyCNN has this shape
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 8)

    def forward(self, x):
        return F.normalize(self.head(F.relu(self.conv(x)).mean((2, 3))), dim=1)


def uint8_source(n: int = 96):
    from rsk_dist.data.sources import MemorySource

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n // 4).repeat_interleave(4)
    images = (torch.rand(n, *SHAPE, generator=g) * 128 + 4 * labels[:, None, None, None] % 128).to(torch.uint8)
    source = MemorySource(images, labels)
    source.mean, source.std = MEAN, STD  # as a decoding source names its normalisation
    return source


def float_input_bytes_alive() -> int:
    """Bytes of the distinct storages of float tensors shaped like a batch of input images."""
    import gc

    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.is_floating_point() and tuple(obj.shape[1:]) == SHAPE:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("batch", [16, 64])
def test_float_input_alive_in_a_step_is_one_chunk_whatever_the_batch(batch):
    from rsk_dist.data.feeder import Feeder
    from rsk_dist.loop import train_step
    from rsk_dist.sampler import ClassBalancedSampler

    torch.manual_seed(0)
    model, chunk = TinyCNN(), 8
    feeder = Feeder(uint8_source())
    step = LargeBatchStep(model, RecallAtKSurrogate(k=(1, 2)), chunk, normalize=feeder.normalize)
    sampler = ClassBalancedSampler(feeder.labels, batch_size=batch, samples_per_class=4, seed=0)
    baseline, peaks = float_input_bytes_alive(), []
    model.register_forward_pre_hook(lambda m, args: peaks.append(float_input_bytes_alive() - baseline))
    train_step(step, torch.optim.SGD(model.parameters(), lr=0.1), sampler, feeder, 0, 0)
    assert len(peaks) == 2 * batch // chunk  # every forward of both passes was seen
    # the chunk the model is running on, nothing of the batch: the same at any batch size
    assert max(peaks) == chunk * 3 * 10 * 6 * 4


def test_uint8_batch_normalised_per_chunk_equals_the_float_batch_bit_for_bit():
    from rsk_dist.data.feeder import Feeder, to_float

    source = uint8_source(40)
    images, labels = source(torch.arange(40))
    results = []
    for normalize, batch in ((None, to_float(images, MEAN, STD)), (Feeder(source).normalize, images)):
        torch.manual_seed(0)
        model = TinyCNN()
        result = LargeBatchStep(model, RecallAtKSurrogate(k=(1, 2)), 16, normalize=normalize).step(batch, labels)
        results.append((result.loss, result.embeddings, param_grads(model)))
    (loss_a, emb_a, grads_a), (loss_b, emb_b, grads_b) = results
    assert loss_a == loss_b and torch.equal(emb_a, emb_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    with pytest.raises(ValueError, match="uint8 images need normalize="):
        LargeBatchStep(TinyCNN(), RecallAtKSurrogate(), 16).step(images, labels)


def test_every_phase_boundary_goes_through_the_clock():
    from rsk_dist.clock import Clock
    from rsk_dist.data.feeder import Feeder
    from rsk_dist.loop import train_step
    from rsk_dist.sampler import ClassBalancedSampler

    marks = []

    class Recording(Clock):
        def _now(self) -> float:
            t = super()._now()  # on CUDA: synchronises the device
            marks.append(t)
            return t

    clock = Recording("cpu")
    feeder = Feeder(uint8_source())
    step = LargeBatchStep(TinyCNN(), RecallAtKSurrogate(k=(1, 2)), 8, normalize=feeder.normalize, clock=clock)
    sampler = ClassBalancedSampler(feeder.labels, batch_size=16, samples_per_class=4, seed=0)
    metrics = train_step(step, torch.optim.SGD(step.model.parameters(), lr=0.1), sampler, feeder, 0, 0)
    assert [phase for phase, _ in clock.marks] == ["start", "data", "embed", "loss", "backward", "comm", "optimizer"]
    assert [t for _, t in clock.marks] == marks  # every time read came from the clock, in order
    assert not clock.running
    times = [t for _, t in clock.marks]
    for phase, (a, b) in zip(["data_wait_s", "embed_s", "loss_s", "backward_s", "comm_s", "optimizer_s"], zip(times, times[1:])):
        assert metrics[phase] == b - a
    assert metrics["step_s"] == times[-1] - times[0]
    # standalone, the step times itself
    assert set(step.step(*feeder(sampler.shard(0, 1, 0, 1), 1)).timings) == {"embed_s", "loss_s", "backward_s"}


def clock_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    from rsk_dist.clock import Clock
    from rsk_dist.data.feeder import Feeder
    from rsk_dist.distributed import GlobalBatchLoss
    from rsk_dist.loop import train_step
    from rsk_dist.sampler import ClassBalancedSampler
    from tests.dist_worker import init_group

    init_group(rank, world, out)
    try:
        clock, feeder = Clock("cpu"), Feeder(uint8_source())
        loss = GlobalBatchLoss(RecallAtKSurrogate(k=(1, 2)), "sharded", clock=clock)
        step = LargeBatchStep(TinyCNN(), loss, 8, normalize=feeder.normalize, clock=clock)
        sampler = ClassBalancedSampler(feeder.labels, batch_size=20, samples_per_class=4, seed=0)
        metrics = train_step(step, torch.optim.SGD(step.model.parameters(), lr=0.1), sampler, feeder, 0, 0)
        torch.save({"phases": [p for p, _ in clock.marks], "comm_s": metrics["comm_s"], "stats": loss.stats}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_loss_communication_is_timed_by_the_steps_clock(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(clock_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # all-gather, the loss, the reduce-scatter of the embedding gradient, then the gradients' all-reduce
        assert got["phases"] == ["start", "data", "embed", "loss", "comm", "loss", "comm", "loss", "backward", "comm", "optimizer"]
        assert got["comm_s"] >= got["stats"]["comm_s"] > 0


def test_compiled_model_builds_at_most_two_graphs_over_a_ragged_step_and_an_evaluation():
    """Pass 1 (no gradients) and pass 2 (gradients) with a ragged last chunk, then an
    evaluation (eval mode, ragged too): eager compilation (dynamo's graphs, no code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from rsk_dist.data.feeder import Feeder
    from rsk_dist.evaluate import evaluate

    torch.manual_seed(0)
    eager = TinyCNN()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="eager")
    feeder = Feeder(uint8_source(44))
    images, labels = feeder(torch.arange(44))
    torch._dynamo.reset()
    counters.clear()
    grads, losses = [], []
    for model in (eager, compiled):
        result = LargeBatchStep(model, RecallAtKSurrogate(k=(1, 2)), 16, normalize=feeder.normalize).step(images, labels)
        grads.append(param_grads(model))
        losses.append(result.loss)
        evaluate(model, feeder, ks=(1,), chunk_size=16)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    # the padding rows change nothing but float rounding (the conv on 16 rows instead of 12)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for e, g in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())
