"""Phase timings of a training step through one clock: :class:`Clock`.

CUDA kernels and NCCL collectives run asynchronously: a host timer read without waiting shows
when work was queued, not when it was done (an all-gather would read 0 s and show up in the next
phase). So every boundary goes through :meth:`Clock.mark`, which on CUDA first waits for the
device. Needs torch only.
"""
from __future__ import annotations

import time

import torch


class Clock:
    """Seconds per phase of one step. :meth:`start` begins a step's record, each
    :meth:`mark` ends a phase (the time since the previous boundary counts for it; a phase may
    recur, and its times add up), :meth:`stop` ends the record and returns the seconds per phase
    and ``total``. ``marks``: the record's (phase, time) boundaries, ``start`` first."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.marks: list[tuple[str, float]] = []
        self.running = False

    def _now(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> float:
        self.marks, self.running = [("start", self._now())], True
        return self.marks[0][1]

    def mark(self, phase: str) -> float:
        """Ends ``phase`` now; returns the time."""
        if not self.running:
            raise RuntimeError("Clock.mark before Clock.start")
        t = self._now()
        self.marks.append((phase, t))
        return t

    def seconds(self) -> dict[str, float]:
        """Seconds per phase of the record so far, and ``total``."""
        out: dict[str, float] = {}
        for (_, t0), (phase, t1) in zip(self.marks, self.marks[1:]):
            out[phase] = out.get(phase, 0.0) + t1 - t0
        out["total"] = self.marks[-1][1] - self.marks[0][1] if self.marks else 0.0
        return out

    def stop(self) -> dict[str, float]:
        self.running = False
        return self.seconds()
