"""When a worker checkpoints: at epoch ends, every ``checkpoint_every_steps`` steps, and after
the step in which any worker was given notice that it will be stopped.

Notice comes two ways.

- SIGTERM, sent to the process from outside the cluster manager (a Kubernetes pod deletion,
  ``docker stop``, a spot agent). The worker that receives it finishes its step; then every worker
  learns of it (one all-reduce of a flag per step), the state of that step is checkpointed, and the
  job stops with :class:`Preempted` so that its retry resumes from that very step.
- The cluster draining a node of the job (Ray's preemption notice, ``draining``). The step in which
  it is seen is checkpointed and training goes on: Ray stops the job when the node goes or its
  deadline passes, and retries it from that checkpoint, counted apart from real failures. Raising
  instead would count as a failure of the training code.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

_notice = threading.Event()


class Preempted(RuntimeError):
    """Raised after the checkpoint that a preemption notice asked for."""


def install_sigterm_handler() -> None:
    """Makes SIGTERM a preemption notice for this process. Must run on its main thread (the
    training itself may run on another). A second SIGTERM gets the previous handler's effect."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame) -> None:
        _notice.set()
        signal.signal(signal.SIGTERM, previous)

    signal.signal(signal.SIGTERM, on_sigterm)


def notice_received() -> bool:
    return _notice.is_set()


class CheckpointSchedule:
    """Decides, identically on every worker, whether the state after a step is checkpointed."""

    def __init__(
        self, every_epochs: int, every_steps: int | None, epochs: int, device: torch.device,
        draining: Callable[[], bool] | None = None,
    ) -> None:
        """``draining()``: whether the cluster is draining a node of this job, the same answer on
        every worker (Ray's ``get_preemption_info``); None where no cluster tells."""
        self.every_epochs, self.every_steps, self.epochs, self.device = every_epochs, every_steps, epochs, device
        self.draining, self.drain_seen = draining, False

    def preempted(self) -> bool:
        """Whether any worker has had a preemption notice; the same answer on every worker."""
        flag = torch.tensor([float(_notice.is_set())], device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def drained(self) -> bool:
        """True once: after the first step in which a node of the job is being drained. Asks no
        more after that, on every worker alike (each ask is a barrier)."""
        if self.draining is None or self.drain_seen:
            return False
        self.drain_seen = bool(self.draining())
        return self.drain_seen

    def due(self, epoch: int, step: int) -> bool:
        """After ``epoch`` epochs and ``step`` steps of the next (0 at an epoch's end)."""
        if step == 0:
            return epoch % self.every_epochs == 0 or epoch == self.epochs
        return self.every_steps is not None and step % self.every_steps == 0
