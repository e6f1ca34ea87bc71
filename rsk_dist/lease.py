"""The lease on a run directory: one job at a time trains a run.

Two jobs with the same ``run.storage_path`` and ``run.name`` would resume from each other's
checkpoints and delete them in their rotation. So the driver takes a lease, an object
``<storage_path>/<run name>/_lease.json`` holding a holder id and a heartbeat time, before any
worker starts; it renews the heartbeat every :data:`HEARTBEAT_S` seconds and deletes the lease
when the job ends. Workers check, before they resume and before each checkpoint, that their
job still holds it. A second job finds a fresh lease and is refused.

A lease whose heartbeat is older than :data:`STALE_AFTER_S` seconds belongs to a dead job and is
taken over. So is one written on this host by a process that no longer exists (a killed driver
re-run on the same machine need not wait). Staleness is judged against the reader's clock: the
hosts' clocks must agree to well within the timeout (NTP does).

What the storage guarantees: object stores (S3 and the like) have no general atomic
create-if-absent, only strong read-after-write consistency, and the last writer of an object
wins. Taking a lease is therefore: read (refuse a fresh lease of another holder), write ours
with a unique holder id, wait :data:`SETTLE_S`, read back, and hold it only when the read-back
holder is ours. Of two contenders that both found no lease, the one that wrote last reads its
own id back and the other reads the winner's and is refused, provided each contender's read
and write are less than ``SETTLE_S`` apart (one request each; seconds would be an outage).
The heartbeat re-reads before each renewal, so a lease lost anyway is noticed within
``HEARTBEAT_S`` by the driver and at the next checkpoint by the workers, before a checkpoint
of the other job can be overwritten.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from rsk_dist.storage import atomic_write, filesystem, join, redact

LEASE = "_lease.json"
HEARTBEAT_S = 15.0
# Eight missed heartbeats: a driver stalled by a loaded machine or a slow store keeps its run.
STALE_AFTER_S = 120.0
SETTLE_S = 1.0


class LeaseError(ValueError):  # a ValueError, as the CLI reports them: a message, no traceback
    """The run is held by another job, or this job's lease was taken."""


def _alive_here(lease: dict[str, Any]) -> bool:
    """False when the lease was written on this host by a process that has ended."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return True
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_lease(run_url: str) -> dict[str, Any] | None:
    """The lease object of a run directory, or None when there is none (or it is unreadable:
    a lease half-written by a killed job holds nothing)."""
    fs, root = filesystem(run_url)
    fs.invalidate_cache()
    try:
        lease = json.loads(fs.cat_file(join(root, LEASE)))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return lease if isinstance(lease, dict) and isinstance(lease.get("holder"), str) else None


def _describe(lease: dict[str, Any], now: float) -> str:
    beat = lease.get("heartbeat")
    age = f"{now - beat:.0f}s ago" if isinstance(beat, (int, float)) else "never"
    return f"job {lease['holder']} (host {lease.get('host')}, pid {lease.get('pid')}, last heartbeat {age})"


def check_holder(run_url: str, holder: str) -> None:
    """Raises :class:`LeaseError` unless ``holder`` holds the run's lease."""
    lease = read_lease(run_url)
    if lease is None or lease["holder"] != holder:
        now = time.time()
        held = f"it is held by {_describe(lease, now)}" if lease else "it has no lease"
        raise LeaseError(
            f"this job ({holder}) no longer holds run {redact(run_url)}: {held}. Two jobs were started "
            "on the same run.storage_path and run.name; give each its own run.name"
        )


class RunLease:
    """The lease of this job on ``run_url``: :meth:`acquire` takes it (raising :class:`LeaseError`
    when another live job holds it) and starts the heartbeat; :meth:`release` stops it and
    deletes the lease. A context manager."""

    def __init__(self, run_url: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 settle_s: float = SETTLE_S) -> None:
        self.run_url = run_url
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        self.lost: str | None = None  # why the heartbeat found the lease gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        fs, root = filesystem(self.run_url)
        body = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        # Whole or not at all: a worker reading a half-written lease would think it lost.
        atomic_write(fs, join(root, LEASE), json.dumps(body).encode())

    def refuse_if_held(self) -> None:
        """Raises :class:`LeaseError` when another live job holds the run (reads only)."""
        lease = read_lease(self.run_url)
        if lease is None or lease["holder"] == self.holder:
            return
        now = time.time()
        beat = lease.get("heartbeat")
        fresh = isinstance(beat, (int, float)) and now - beat < self.stale_after_s
        if fresh and _alive_here(lease):
            raise LeaseError(
                f"run {redact(self.run_url)} is being trained by another {_describe(lease, now)}: a second job on "
                "the same run.storage_path and run.name would resume from its checkpoints and delete them. Wait "
                "for that job to end or stop it, or set another run.name; a lease with no heartbeat for "
                f"{self.stale_after_s:.0f}s is taken over"
            )

    def acquire(self) -> RunLease:
        self.refuse_if_held()
        self._write()
        time.sleep(self.settle_s)
        lease = read_lease(self.run_url)
        if lease is None or lease["holder"] != self.holder:
            raise LeaseError(
                f"run {redact(self.run_url)} was claimed by another job at the same moment "
                f"({_describe(lease, time.time()) if lease else 'its lease'}); set another run.name, or wait and retry"
            )
        self._thread = threading.Thread(target=self._beat, name="rsk-run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                check_holder(self.run_url, self.holder)
                self._write()
            except LeaseError as err:
                self.lost = str(err)
                print(f"[rsk-dist] error: {err}", flush=True)
                return
            except Exception as err:  # noqa: BLE001 - a storage hiccup: the next beat retries
                print(f"[rsk-dist] warning: lease heartbeat failed ({type(err).__name__}: {redact(str(err))[:200]})",
                      flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lease = read_lease(self.run_url)
        if lease is not None and lease["holder"] == self.holder:
            fs, root = filesystem(self.run_url)
            fs.rm_file(join(root, LEASE))

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
