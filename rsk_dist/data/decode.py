"""Decoding and augmenting encoded images, in decoder processes: :class:`Decoder`.

Decoding a 500x375 JPEG and cropping it costs about 5 ms of CPU, so a 500-image shard of a
global batch is seconds of work per step. Threads do not scale it (part of every image's work
holds the GIL: 1.23x from 1 to 2 threads, see docs/benchmarks.md), so the work runs in
processes: ``python -m rsk_dist.data.decode``, each fed chunks of images over a pipe by a thread
of the training process. They are plain subprocesses, not multiprocessing's, so they never
re-import the user's main script (multiprocessing's spawn and forkserver do, which runs an
unguarded script again) and are not forked from a process full of threads. They import this
module alone, which needs numpy and Pillow but not torch, and are shared by every source of the
process that asks for the same number (a training worker's train and evaluation data).

A sample's augmentation is drawn from ``(seed, key, sample index)`` alone, so its pixels do not
depend on which process decodes it, or on how a batch is split into chunks.

Deadline: a decoder process must take each chunk and answer it within ``deadline_s`` (see
:meth:`Decoder.submit`; a few images take milliseconds). One that does not (stopped by a
signal, stuck in a decoder library) is killed, the chunk fails with :class:`DecoderDied` and
the process is started again for the next chunk; the pipes are read and written with the
deadline, so nothing waits on such a process for ever.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import queue
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from rsk_dist.preprocess import Preprocess, shorter_side

# Images per task: enough to make the hand-off over the pipe small against the decoding
# (8 x 5 ms against well under 1 ms), few enough that a batch spreads over every process.
CHUNK = 8
# Seconds a decoder process may take to answer one chunk: minutes, far beyond any real image.
DECODE_DEADLINE_S = 120.0


def load_image(data: bytes | memoryview, in_channels: int, image_size: int, rng: np.random.Generator | None, draft: bool = False) -> Any:
    """The encoded image decoded (greyscale for ``in_channels=1``, else RGB) and cropped to
    ``image_size``: with ``rng``, a random resized crop and a horizontal flip with probability
    1/2 (training); without, the test-time transform of :meth:`rsk_dist.preprocess.Preprocess.streamed`
    (the shorter side resized to ``round(image_size * 256 / 224)``, the centre square). The crop is drawn from the stored image's size, before
    decoding, so ``draft`` (a JPEG decoded at 1/2, 1/4 or 1/8 scale where the crop keeps at
    least ``image_size`` pixels a side) crops the same region, but its pixels differ slightly."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    width, height = img.size
    box = crop_box(width, height, rng) if rng is not None else None
    mode = "L" if in_channels == 1 else "RGB"
    if draft:
        scale = min(box[2:]) / image_size if box else min(width, height) / shorter_side(image_size)
        if scale >= 2:
            img.draft(mode, (math.ceil(width / scale), math.ceil(height / scale)))
    img.load()
    if box is None:
        return Preprocess.streamed(image_size, in_channels).transform(img)
    assert rng is not None
    img = img.convert(mode)
    left, top, w, h = box
    if img.size != (width, height):  # decoded at reduced size: the box in its pixels
        fx, fy = img.width / width, img.height / height
        left, top, w, h = left * fx, top * fy, w * fx, h * fy
    out = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random resized crop, torchvision's algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class Undecodable(NamedTuple):
    """An image that could not be decoded, and why."""

    error: str


@dataclass(frozen=True)
class Augment:
    """How a source decodes its images (see :func:`load_image`); called as
    ``augment(encoded bytes, sample index, key)`` for ``H x W x C`` uint8 or
    :class:`Undecodable`."""

    in_channels: int
    image_size: int
    train: bool
    seed: int
    draft: bool = False

    def __call__(self, raw: bytes | memoryview, sample: int, key: int) -> np.ndarray | Undecodable:
        rng = np.random.default_rng([self.seed, key, sample]) if self.train else None
        try:
            img = load_image(raw, self.in_channels, self.image_size, rng, self.draft)
        except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad image
            return Undecodable(f"{type(err).__name__}: {err}")
        arr = np.array(img, dtype=np.uint8)
        return arr if arr.ndim == 3 else arr[:, :, None]


Item = tuple[int, int, bytes]  # (position in the batch, sample index, encoded bytes)
Decoded = list[tuple[int, "np.ndarray | Undecodable"]]


def decode_chunk(augment: Augment, key: int, items: list[Item]) -> Decoded:
    """What a decoder process runs: the chunk's images, by position."""
    return [(pos, augment(raw, sample, key)) for pos, sample, raw in items]


class DecoderDied(RuntimeError):
    """A decoder process ended while decoding (killed by the OS, out of memory), or missed its
    deadline and was killed."""


class _Missed(Exception):
    """The decoder process did not take or answer a chunk within its deadline."""


def _send(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        if not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
            raise _Missed
        view = view[os.write(fd, view):]


def _receive(fd: int, size: int, deadline: float) -> bytes:
    parts, got = [], 0
    while got < size:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise _Missed
        part = os.read(fd, min(size - got, 1 << 20))
        if not part:
            raise EOFError("the decoder process closed its pipe")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class Decoder:
    """``processes`` decoder processes; :meth:`submit` hands them a batch's images in chunks.
    :meth:`shared` gives this process's decoder of that size. Each process is started on first
    use, and started again after it dies: a chunk it held fails with :class:`DecoderDied`."""

    _shared: dict[int, Decoder] = {}
    _shared_lock = threading.Lock()

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"decoder processes must be >= 1, got {processes}")
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._procs: list[subprocess.Popen | None] = [None] * processes
        self._threads = [threading.Thread(target=self._serve, args=(i,), daemon=True, name=f"decoder-{i}") for i in range(processes)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def shared(cls, processes: int) -> Decoder:
        with cls._shared_lock:
            if processes not in cls._shared:
                cls._shared[processes] = cls(processes)
            return cls._shared[processes]

    @property
    def pids(self) -> list[int]:
        """The running decoder processes."""
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def submit(self, augment: Augment, key: int, items: list[Item], deadline_s: float = DECODE_DEADLINE_S) -> list[Future]:
        """Futures of :data:`Decoded`, one per chunk of ``items``; a process that takes more
        than ``deadline_s`` seconds over a chunk is killed and the chunk fails with DecoderDied."""
        futures = []
        for i in range(0, len(items), CHUNK):
            future: Future = Future()
            self._tasks.put((future, (augment, key, items[i : i + CHUNK]), deadline_s))
            futures.append(future)
        return futures

    def shutdown(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()

    def _start(self) -> subprocess.Popen:
        # The child finds this package where this process does.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        # Read and written with deadlines (select): never a blocking call on a stopped process.
        os.set_blocking(proc.stdin.fileno(), False)  # type: ignore[union-attr]
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        return proc

    def _serve(self, slot: int) -> None:
        while (task := self._tasks.get()) is not None:
            future, work, deadline_s = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._run(slot, work, deadline_s))
            except BaseException as err:  # noqa: BLE001 - the future carries it to the batch
                future.set_exception(err)
        proc = self._procs[slot]
        if proc is not None:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()

    def _run(self, slot: int, work: tuple, deadline_s: float) -> Decoded:
        proc = self._procs[slot]
        if proc is None or proc.poll() is not None:  # first use, or died while idle: not this chunk's doing
            proc = self._procs[slot] = self._start()
        deadline = time.monotonic() + deadline_s
        try:
            _send(proc.stdin.fileno(), pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL), deadline)  # type: ignore[union-attr]
            size = int.from_bytes(_receive(proc.stdout.fileno(), 8, deadline), "little")  # type: ignore[union-attr]
            return pickle.loads(_receive(proc.stdout.fileno(), size, deadline))  # type: ignore[union-attr]
        except (_Missed, OSError, EOFError, pickle.UnpicklingError) as err:
            proc.kill()
            proc.wait()
            self._procs[slot] = None
            if isinstance(err, _Missed):
                raise DecoderDied(
                    f"a decoder process did not answer within {deadline_s:g} s (stopped, or stuck on an "
                    "image): it was killed and is started again; if this repeats, look for what stops "
                    "or starves the worker's processes"
                ) from None
            raise DecoderDied(
                f"a decoder process ended while decoding a batch ({_ended(proc.returncode)}): give the "
                "worker more memory, or fewer decoders (data.decoders)"
            ) from err


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}; by the OS, most likely out of memory"
    return f"exit status {code}"


def serve(tasks: BinaryIO, results: BinaryIO) -> None:
    """A decoder process: chunks in, decoded chunks out, until ``tasks`` ends."""
    while True:
        try:
            augment, key, items = pickle.load(tasks)
        except EOFError:
            return
        data = pickle.dumps(decode_chunk(augment, key, items), protocol=pickle.HIGHEST_PROTOCOL)
        results.write(len(data).to_bytes(8, "little") + data)  # framed: the parent reads it with a deadline
        results.flush()


if __name__ == "__main__":
    # The pipe to the parent is a private copy of stdout; stdout itself goes to stderr, so that
    # nothing a library prints can corrupt a result.
    from rsk_dist.data.decode import serve as serve_imported  # one copy of the module's classes

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve_imported(sys.stdin.buffer, out)
