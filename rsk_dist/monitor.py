"""What rank 0 leaves beside the checkpoints for people to watch a run: TensorBoard event files
at ``<run.storage_path>/<run.name>/tensorboard/`` and, at the end, ``training.png`` (loss and
Recall@k per epoch).

Events are written to a local temporary folder and uploaded when a checkpoint is reported, so a
killed run keeps its curves up to its last checkpoint. Each upload closes the local event file
and starts a new one (a closed file is complete and uploaded once); a resumed run adds its own
files to the same folder. ``tensorboard --logdir <storage_path>/<name>/tensorboard`` reads them.

Monitoring never fails training: without tensorboardX or matplotlib, or with storage that
cannot be written, it warns once per kind of problem and carries on.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import uuid
import warnings
import weakref
from typing import Any

STEP_KEYS = ("loss", "lr", "images_per_s")
TIMING = re.compile(r"^[a-z_]+_s$")  # data_s, data_wait_s, embed_s, loss_s, backward_s, comm_s, optimizer_s, step_s


def _is_eval(key: str) -> bool:
    return "@" in key or "precision" in key


def tag(section: str, key: str) -> str:
    """The TensorBoard tag of a metric: ``eval/recall_at_1`` for ``recall@1`` (TensorBoard
    tags allow no ``@``)."""
    return f"{section}/{key.replace('@', '_at_')}"


class RunMonitor:
    """TensorBoard scalars and a summary plot of one run; use on rank 0 only (``enabled=False``
    makes every method a no-op). Nothing is imported, created or written before the first call."""

    def __init__(self, storage_url: str, run_name: str, enabled: bool = True) -> None:
        self.storage_url, self.run_name, self.enabled = str(storage_url), run_name, enabled
        self._writer: Any = None
        self._logdir: str | None = None
        self._session = uuid.uuid4().hex[:8]
        self._segment = 0
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ public

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Training scalars of one step: loss, lr, images/s and the ``*_s`` timings."""
        self._scalars(step, {
            tag("train" if k in STEP_KEYS else "time", k): v
            for k, v in metrics.items() if k in STEP_KEYS or TIMING.match(k)
        })

    def log_epoch(self, step: int, summary: dict[str, Any]) -> None:
        """Evaluation scalars of an epoch summary: recall@k, map@r, r_precision (tags
        ``eval/recall_at_1``, ``eval/map_at_r``, ``eval/r_precision``)."""
        self._scalars(step, {tag("eval", k): v for k, v in summary.items() if _is_eval(k)})

    def sync(self) -> None:
        """Closes the local event file and uploads every closed one to ``<run>/tensorboard/``."""
        if not self.enabled or self._logdir is None:
            return
        try:
            if self._writer is not None:
                self._writer.close()  # drains tensorboardX's queue: the file is complete
                self._writer = None
            from rsk_dist.storage import atomic_write, filesystem, join

            names = sorted(n for n in os.listdir(self._logdir) if n.startswith("events."))
            if not names:
                return
            fs, root = filesystem(self.storage_url)
            for name in names:
                local = os.path.join(self._logdir, name)
                with open(local, "rb") as f:
                    atomic_write(fs, join(root, self.run_name, "tensorboard", name), f.read())
                os.remove(local)  # uploaded; a failed upload is retried at the next sync
        except Exception as err:  # noqa: BLE001 - monitoring must never stop training
            self._warn("sync", f"cannot upload TensorBoard events to {self._target('tensorboard')}", err)

    def finish(self, history: list[dict[str, Any]]) -> None:
        """The final upload, and ``training.png`` from the per-epoch summaries."""
        if not self.enabled:
            return
        self.sync()
        if not history:
            return
        try:
            png = plot_history(history, title=self.run_name)
        except ImportError as err:
            self._warn("matplotlib", "no training.png: matplotlib is not installed (pip install matplotlib)", err)
            return
        except Exception as err:  # noqa: BLE001
            self._warn("plot", "cannot draw training.png", err)
            return
        try:
            from rsk_dist.storage import atomic_write, filesystem, join

            fs, root = filesystem(self.storage_url)
            atomic_write(fs, join(root, self.run_name, "training.png"), png)
        except Exception as err:  # noqa: BLE001
            self._warn("png", f"cannot write {self._target('training.png')}", err)

    # ------------------------------------------------------------------ internals

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or not values:
            return
        writer = self._open()
        if writer is None:
            return
        try:
            for name, value in values.items():
                writer.add_scalar(name, float(value), global_step=int(step))
        except Exception as err:  # noqa: BLE001
            self._warn("log", "cannot write TensorBoard scalars", err)

    def _open(self) -> Any:
        """The SummaryWriter of the current local event file, opened on first use."""
        if self._writer is not None or "tensorboardX" in self._warned:
            return self._writer
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            self._warn("tensorboardX", "no TensorBoard events: tensorboardX is not installed", err)
            return None
        try:
            if self._logdir is None:
                self._logdir = tempfile.mkdtemp(prefix="rsk-dist-tb-")
                weakref.finalize(self, shutil.rmtree, self._logdir, True)
            self._segment += 1
            self._writer = SummaryWriter(
                logdir=self._logdir, filename_suffix=f".{self._session}-{self._segment:04d}", flush_secs=30,
            )
        except Exception as err:  # noqa: BLE001
            self._warn("log", "cannot open a local TensorBoard event file", err)
        return self._writer

    def _target(self, name: str) -> str:
        from rsk_dist.storage import join, redact

        return redact(join(self.storage_url, self.run_name, name))

    def _warn(self, key: str, message: str, err: BaseException) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        from rsk_dist.storage import redact

        detail = redact(f"{type(err).__name__}: {err}")
        warnings.warn(f"[rsk-dist] monitoring: {message} ({detail}); training goes on", RuntimeWarning, stacklevel=3)


def plot_history(history: list[dict[str, Any]], title: str = "") -> bytes:
    """PNG bytes of two panels, over epochs: the loss, and each Recall@k where evaluated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, recall_ax = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    loss_ax.plot(epochs, [h["loss"] for h in history], marker="o", color="tab:red")
    loss_ax.set(title="training loss (mean over each epoch)", xlabel="epoch", ylabel="loss")
    ks = sorted({k for h in history for k in h if k.startswith("recall@")}, key=lambda k: int(k.split("@")[1]))
    for key in ks:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        recall_ax.plot(*zip(*points), marker="o", label=key.replace("recall", "Recall"))
    recall_ax.set(title="evaluation Recall@k", xlabel="epoch", ylabel="Recall@k", ylim=(0, 1.02))
    if ks:
        recall_ax.legend(loc="lower right")
    else:
        recall_ax.text(0.5, 0.5, "no evaluation data", ha="center", va="center", transform=recall_ax.transAxes)
    for ax in (loss_ax, recall_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
