"""The two-pass large-batch step (spec §3): memory grows with the chunk, not the batch.

Like GradCache, the mechanism is one class whose phases are named methods:
:meth:`LargeBatchStep.embed` (pass 1, no graph, RNG state saved per chunk),
:meth:`LargeBatchStep.embedding_gradient` (loss on all embeddings and its gradient) and
:meth:`LargeBatchStep.backward` (pass 2, each chunk again with its RNG state, backpropagating its
slice of the cached gradient), then :meth:`LargeBatchStep.optimizer_step` (unscale float16
gradients, skip a step with inf/NaN, update the scale). The parameter gradient equals one
full-batch backward because ``d loss / d theta = sum_i (d loss / d e_i) (d e_i / d theta)`` and
pass 2 replays exactly the pass-1 forward of every ``e_i``.

Input memory grows with the chunk too: the batch may come as uint8 images (a quarter of float32's
bytes), and each chunk is converted to float and normalised (``normalize``) on the device as it
is embedded, in both passes. Phase boundaries go through one :class:`rsk_dist.clock.Clock`.
A compiled model sees one input shape: the last chunk is padded to the first chunk's size and the
padding rows dropped, so that it builds one graph with gradients and one without instead of
recompiling for the ragged chunk (which differs between workers when W does not divide B).

Asymmetric training adds a frozen ``teacher``: one more forward of the batch, chunked, without a
graph, under the same autocast; its embeddings are the gallery the loss's queries rank
(``loss_fn(..., gallery=...)``). It gets no gradient, so it needs no second pass. With a
``teacher_cache`` (rsk_dist.teacher.TeacherCache) and the batch's sample ``ids``, only the
samples it has not embedded before are run through it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rsk_dist.clock import Clock
from rsk_dist.models import is_compiled, warn_if_batchnorm_updates
from rsk_dist.teacher import TeacherCache

LossFn = Callable[..., Tensor]


@dataclass
class RngState:
    cpu: Tensor
    cuda: Tensor | None


@dataclass
class StepResult:
    loss: float
    embeddings: Tensor  # detached, the local batch
    timings: dict[str, float] = field(default_factory=dict)


def _capture_rng(device: torch.device) -> RngState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda)


@contextlib.contextmanager
def _replay_rng(state: RngState, device: torch.device) -> Iterator[None]:
    # fork_rng restores the generators afterwards, so pass 2 leaves them where pass 1 left them.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, device)
        yield


class LargeBatchStep:
    """One training step over a batch of any size; leaves summed gradients in ``.grad``.

    ``loss_fn`` is called as ``loss_fn(embeddings, labels, generator=generator)`` on all the
    batch's embeddings (float32), with ``gallery=`` the teacher's embeddings when there is a
    ``teacher`` (frozen: see rsk_dist.teacher); a distributed loss wrapper makes that the global batch.
    :meth:`step` leaves the gradients in ``.grad`` (multiplied by the GradScaler's scale under
    float16) for the caller to sum over workers; :meth:`optimizer_step` then applies them.
    ``normalize`` turns a chunk of uint8 images, on the device, into the model's float input
    (e.g. :meth:`rsk_dist.data.feeder.Feeder.normalize`); float images are used as they are.
    ``clock``: where the phases are timed (the step's own by default; share one with a
    :class:`rsk_dist.distributed.GlobalBatchLoss` to time its communication apart).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        chunk_size: int,
        autocast_dtype: torch.dtype | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        teacher: nn.Module | None = None,
        normalize: Callable[[Tensor], Tensor] | None = None,
        clock: Clock | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if grad_scaler is not None and autocast_dtype != torch.float16:
            raise ValueError("a GradScaler is for float16 autocast: pass autocast_dtype=torch.float16")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        self.normalize = normalize
        self.clock = clock or Clock(self.device)
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        warn_if_batchnorm_updates(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _chunks(self, images: Tensor, model: nn.Module) -> tuple[list[Tensor], int]:
        """The chunks, and the rows to pad each to: the first chunk's for a compiled ``model``."""
        if images.dtype == torch.uint8 and self.normalize is None:
            raise ValueError("uint8 images need normalize= (e.g. Feeder.normalize): the model takes floats")
        chunks = list(images.split(self.chunk_size))
        return chunks, chunks[0].shape[0] if chunks and is_compiled(model) else 0

    def _forward(self, chunk: Tensor, rows: int, model: nn.Module | None = None) -> Tensor:
        """The float output of the model (or ``model``) on ``chunk``, moved to the device,
        normalised (uint8), padded to ``rows`` rows (if fewer) and cut back."""
        model = self.model if model is None else model
        x = chunk.to(self.device, non_blocking=True)
        if self.normalize is not None:
            x = self.normalize(x)
        n = x.shape[0]
        if n < rows:
            x = torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))])
        if self.autocast_dtype is None:
            return model(x)[:n]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            # The loss runs in float32: bf16 similarities would blur ranks at tau2 = 0.01.
            return model(x)[:n].float()

    def embed(self, images: Tensor) -> tuple[Tensor, list[RngState]]:
        """Pass 1: embeddings of all chunks without a graph, and each chunk's RNG state."""
        states, outputs = [], []
        chunks, rows = self._chunks(images, self.model)
        with torch.no_grad():
            for chunk in chunks:
                states.append(_capture_rng(self.device))
                outputs.append(self._forward(chunk, rows))
        return torch.cat(outputs), states

    @torch.no_grad()
    def embed_teacher(self, images: Tensor, ids: Tensor | None = None) -> Tensor:
        """The teacher's embeddings of all chunks: the gallery of asymmetric losses (from the
        ``teacher_cache`` where it holds the samples ``ids``)."""
        if self.teacher_cache is not None:
            if ids is None:
                raise ValueError("a teacher cache needs the batch's sample ids: step(images, labels, generator, ids=...)")
            return self.teacher_cache.gallery(ids, images, self._embed_with_teacher, self.device)
        return self._embed_with_teacher(images)

    def _embed_with_teacher(self, images: Tensor) -> Tensor:
        chunks, rows = self._chunks(images, self.teacher)
        return torch.cat([self._forward(chunk, rows, self.teacher) for chunk in chunks])

    def embedding_gradient(
        self, embeddings: Tensor, labels: Tensor, generator: torch.Generator | None = None,
        gallery: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The loss on all embeddings and its gradient with respect to each of them."""
        embeddings = embeddings.detach().requires_grad_()
        with_gallery = {} if gallery is None else {"gallery": gallery}
        with torch.enable_grad():
            loss = self.loss_fn(embeddings, labels.to(embeddings.device), generator=generator, **with_gallery)
            (grad,) = torch.autograd.grad(loss, embeddings)
        return loss.detach(), grad

    def backward(self, images: Tensor, grad: Tensor, states: list[RngState]) -> None:
        """Pass 2: re-run each chunk with its RNG state and backpropagate its cached gradient."""
        if self.grad_scaler is not None:
            grad = self.grad_scaler.scale(grad)
        chunks, rows = self._chunks(images, self.model)
        for chunk, chunk_grad, state in zip(chunks, grad.split(self.chunk_size), states):
            with _replay_rng(state, self.device):
                out = self._forward(chunk, rows)
            out.backward(chunk_grad)

    def step(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None, ids: Tensor | None = None,
    ) -> StepResult:
        """Both passes; ``ids``: the batch's sample indices, which a teacher cache needs.
        ``timings`` are the seconds of ``embed_s``, ``loss_s``, ``backward_s``
        (``teacher_s`` with a teacher, and ``comm_s`` of a loss sharing the clock). A caller that
        started the clock (the training loop, which also times data and the optimizer) reads the
        record from it."""
        own = not self.clock.running
        if own:
            self.clock.start()
        gallery = None
        if self.teacher is not None:
            gallery = self.embed_teacher(images, ids)
            self.clock.mark("teacher")
        embeddings, states = self.embed(images)
        self.clock.mark("embed")
        loss, grad = self.embedding_gradient(embeddings, labels, generator, gallery)
        self.clock.mark("loss")
        self.backward(images, grad, states)
        self.clock.mark("backward")
        seconds = self.clock.stop() if own else self.clock.seconds()
        phases = ("teacher", "embed", "loss", "comm", "backward")
        return StepResult(
            loss=float(loss),
            embeddings=embeddings,
            timings={f"{p}_s": seconds[p] for p in phases if p in seconds},
        )

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Steps ``optimizer`` on the gradients in ``.grad``; returns whether it stepped.

        With a GradScaler the gradients are unscaled first, a step whose gradients hold inf or
        NaN is skipped and the scale is updated (lowered after such a step). Call it after the
        workers' gradients are summed: a non-finite value on any worker is then in every worker's
        sum, so all of them skip the same step and keep the same scale.
        """
        if self.grad_scaler is None:
            optimizer.step()
            return True
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        # update() lowers the scale exactly when it found inf/NaN (and then step() skipped).
        return self.grad_scaler.get_scale() >= scale
