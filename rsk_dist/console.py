"""One line per event on a training run's console: rank 0's progress and eval lines once, and
none of Ray's notices of things that are not wrong.

Fixed where each comes from, so that real errors stay visible:

- Ray Train replaces ``print`` in its workers by a logger that writes to stderr while the
  print still reaches stdout: every line twice. ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` keeps the
  plain print.
- Ray Train's preemption watcher (which :mod:`rsk_dist.preemption` relies on for drained
  nodes) is an actor created with ``max_restarts`` and arguments in the object store, which
  Ray's core worker logs as an error line at every start (ray-project/ray#53727): the driver
  skips that one line (``RAY_DEDUP_LOGS_SKIP_REGEX``, read when Ray is imported).
- Ray Train's placement-group cleaner finds its cluster through the state API, which, with no
  ``RAY_ADDRESS``, picks the machine's latest ``ray start`` cluster (or fails, with a traceback,
  when there are several) instead of its own: :func:`setup_worker` sets ``RAY_ADDRESS`` to the
  worker's own cluster in every worker process.
- Ray Train's own INFO lines (worker-group start) are below the run's log level, WARNING.
- Notices repeated by many processes (botocore's "Found credentials in environment
  variables", faiss's instruction-set probing, Ray's "token authentication is enabled", Ray
  Train's ``TrainingReport(...)`` dump per checkpoint, its controller's timed-out resource
  request on a busy machine, with a traceback) are demoted to DEBUG and logged once per process.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys

# Environment of every Ray process of a job (its runtime_env's env_vars).
JOB_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Lines of other processes the driver does not print.
SKIPPED_LINES = r"'PreemptionWatcher' .*constructor arguments in the object store and max_restarts > 0"
TRAIN_LOG_LEVEL = "WARNING"  # Ray Train's ray.train loggers on the console
WORKER_SETUP_HOOK = "rsk_dist.console.setup_worker"

# logger name -> message prefixes that are notices, not news: DEBUG, once per process.
DEMOTED = {
    "botocore.credentials": ("Found credentials",),
    "aiobotocore.credentials": ("Found credentials",),
    "faiss.loader": ("",),
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
    # Ray Train's controller re-sends its resource request to the autoscaling coordinator every
    # 20 s and, when one send times out (5 s, a busy CPU), logs a traceback that it calls "safe to
    # ignore" when transient; it seldom is anything else, and the training does not depend on it.
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": (
        "Failed to send resource request",
    ),
}


class DemoteToDebug(logging.Filter):
    """Turns the matching records of a logger into DEBUG ones, passed on only the first time
    and only where that logger is enabled for DEBUG."""

    def __init__(self, logger: logging.Logger, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.logger, self.prefixes, self.seen = logger, prefixes, set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes) or record.levelno <= logging.DEBUG:
            return True
        if message in self.seen or not self.logger.isEnabledFor(logging.DEBUG):
            self.seen.add(message)
            return False
        self.seen.add(message)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _report_logger() -> dict[str, tuple[str, ...]]:
    """Ray Train's "Reporting training result ... TrainingReport(...)" dump, per checkpoint: its
    logger is named by its file's path (so no ``ray.train`` level applies to it)."""
    try:
        spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    except ImportError:
        return {}
    return {spec.origin: ("Reporting training result",)} if spec is not None and spec.origin else {}


def install_filters() -> None:
    """Installs the :data:`DEMOTED` filters in this process (idempotent)."""
    for name, prefixes in {**DEMOTED, **_report_logger()}.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteToDebug) for f in logger.filters):
            logger.addFilter(DemoteToDebug(logger, prefixes))


def quiet_driver() -> None:
    """Makes this process skip :data:`SKIPPED_LINES` of other processes; must run before it
    imports Ray (``rsk-dist train`` does; a program calling :func:`rsk_dist.train.fit` may)."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", SKIPPED_LINES)


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: runs first in every worker process of the job."""
    import ray

    install_filters()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def job_runtime_env() -> dict:
    """What ``ray.init`` adds to the job's runtime environment (merged with a submitted job's)."""
    return {"env_vars": dict(JOB_ENV), "worker_process_setup_hook": WORKER_SETUP_HOOK}


class Terminated(Exception):
    """The driver was sent SIGTERM (``rsk-dist stop``, ``ray job stop``, a pod's deletion)."""


def stop_on_sigterm() -> None:
    """SIGTERM prints one line and ends the driver with :class:`Terminated`. Installed after
    ``ray.init``, replacing Ray's handlers (one prints a ``*** SIGTERM received ...`` stack
    dump). The line comes first: the job server SIGKILLs a driver still cleaning up 3 s later."""

    def on_sigterm(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        print("rsk-dist: stopped by SIGTERM (rsk-dist stop, or the node shutting down); the same command "
              "resumes the run from its latest checkpoint", file=sys.stderr, flush=True)
        raise Terminated("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)


def duration(seconds: float) -> str:
    """``1h05m`` or ``3m07s``: an ETA on a progress line."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
