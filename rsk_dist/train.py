"""Training jobs on Ray Train: the config builds the components, and every worker runs the
shared step of :mod:`rsk_dist.loop` on its shard of each global batch (spec §4).

A step is a pure function of the state and (seed, epoch, step): the sampler, the SiMix weights,
the augmentation and each worker's RNG are all derived from them. So a job that resumes from a
checkpoint, after a lost worker, a killed driver or ``--resume-from``, continues as the
uninterrupted job would have: bit for bit on the CPU (same torch build, threads and worker
count); on CUDA within float rounding, as cuDNN's and other kernels' sums vary in order, unless
``train.deterministic`` (then bit for bit on one machine and software stack; see
:mod:`rsk_dist.numerics`). Another worker count agrees within float rounding everywhere.
"""
from __future__ import annotations

import bisect
from collections import Counter
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rsk_dist import numerics
from rsk_dist.checkpoint import (
    CheckpointError, checkpoint_name, cpu_copy, latest_state, load_model, load_state, publish_state, state_config,
    write_checkpoint,
)
from rsk_dist.clock import Clock
from rsk_dist.config import (
    DataConfig, DataSource, JobConfig, LossConfig, OptimConfig, absolutize_paths, local_absolute,
)
from rsk_dist.console import duration
from rsk_dist.data.feeder import Feeder
from rsk_dist.data.sources import MemorySource, digits_split, zip_source
from rsk_dist.distributed import GlobalBatchLoss, rank_and_world
from rsk_dist.engine import LargeBatchStep
from rsk_dist.evaluate import embed_source, evaluate, three_settings
from rsk_dist.lease import RunLease, check_holder
from rsk_dist.metrics import retrieval_metrics, revisited_map, vehicleid_metrics
from rsk_dist.losses import MetricLearningLoss, RecallAtKSurrogate, Regression
from rsk_dist.loop import train_step
from rsk_dist.models import build_model
from rsk_dist.monitor import RunMonitor
from rsk_dist.preemption import CheckpointSchedule, Preempted
from rsk_dist.sampler import ClassBalancedSampler
from rsk_dist.storage import join
from rsk_dist.teacher import TeacherCache, check_teacher, load_teacher, with_teacher_map

if TYPE_CHECKING:  # Ray is imported where it is used: importing this module stays light
    import ray.train

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE = {"float32": torch.float32, "float64": torch.float64}


def open_source(
    spec: DataSource, data: DataConfig, train: bool, seed: int = 0, in_channels: int = 1,
    device: torch.device | str = "cpu", cpus: float | None = None, dtype: torch.dtype = torch.float32,
) -> Feeder:
    """The source ``spec`` names, fed as ``dtype`` batches to ``device``; a streamed source decodes
    with ``data.decoders`` processes, or one per CPU of ``cpus`` (None: all this process may use)."""
    if spec.kind == "digits":
        source = digits_split(spec.split or "train")
    elif spec.kind == "zip":
        source = zip_source(spec.url, size=data.image_size, exclude_classes=spec.exclude_classes)
    else:
        from rsk_dist.data.shards import ShardSource

        return Feeder(ShardSource(
            spec.url, split=spec.split, image_size=data.image_size, train=train and data.augment,
            in_channels=in_channels, on_bad_sample=data.on_bad_sample, cache_dir=data.cache_dir, seed=seed,
            exclude_classes=spec.exclude_classes, read_concurrency=data.read_concurrency, merge_gap=data.merge_gap,
            decoders=data.decoders or (max(1, int(cpus)) if cpus else None),
            # this step's batch and prefetch_steps more (evaluation prefetches one chunk ahead)
            max_pending=max(2, data.prefetch_steps + 1), cache_max_bytes=data.cache_max_bytes, draft=data.draft,
            read_deadline_s=data.read_deadline_s, decode_deadline_s=data.decode_deadline_s,
        ), device, dtype)
    if train and data.augment:
        source = MemorySource(source.images, source.labels, augment_seed=seed)
    return Feeder(source, device, dtype)


def build_loss(cfg: LossConfig, clock: Clock | None = None) -> GlobalBatchLoss:
    if cfg.name == "rsk":
        loss: nn.Module = RecallAtKSurrogate(
            k=cfg.k, tau1=cfg.tau1, tau2=cfg.tau2, simix=cfg.simix,
            rank_includes_query=cfg.rank_includes_query, chunk_size=cfg.chunk_size, tf32=cfg.tf32,
            asymmetric=cfg.asymmetric, self_positive=cfg.asymmetric_self_positive,
        )
    elif cfg.name == "regression":
        loss = Regression()
    else:
        loss = MetricLearningLoss(cfg.name, asymmetric=cfg.asymmetric, self_positive=cfg.asymmetric_self_positive, **cfg.options)
    return GlobalBatchLoss(loss, cfg.mode, clock=clock)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        optimizer = cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Stepped once per epoch: lr_steps are epochs, as in the paper's schedules.
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_steps), cfg.lr_gamma)


def apply_optim_config(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.MultiStepLR
) -> None:
    """Puts ``cfg``'s hyperparameters into an optimizer and schedule loaded from a checkpoint,
    whose states restore the old ones; the learning rate is the schedule's at its epoch."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.milestones = Counter(cfg.lr_steps)
    scheduler.gamma = cfg.lr_gamma
    lr = cfg.lr * cfg.lr_gamma ** bisect.bisect_right(sorted(cfg.lr_steps), scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(lr=lr, initial_lr=cfg.lr, weight_decay=cfg.weight_decay)
        if "momentum" in group:
            group["momentum"] = cfg.momentum


def check_state(
    config: JobConfig, state: dict[str, Any], url: str, fingerprint: str | None, allow_config_change: bool
) -> JobConfig:
    """Refuses to resume ``config`` from the checkpoint ``state`` (at ``url``) when the training
    would change (its config's maths fields, or the training data's fingerprint) unless
    ``allow_config_change``; returns the checkpoint's config. Runs wherever a resume happens."""
    from rsk_dist.config import maths_changes

    old = state_config(state, url)
    if allow_config_change:
        return old
    changed = maths_changes(old, config)
    if changed:
        raise CheckpointError(
            f"the config differs from the one {url} was trained with in fields that change the training: "
            f"{', '.join(changed)}; restore them, or pass --allow-config-change to continue with the new values"
        )
    recorded = state.get("dataset")
    if recorded and fingerprint and recorded != fingerprint:
        raise CheckpointError(
            f"the training data at {config.data.train.url} has changed since {url} was written (dataset "
            f"fingerprint {recorded[:16]} then, {fingerprint[:16]} now: it was re-ingested or overwritten); "
            "resume on the data it was trained on, or pass --allow-config-change to continue on the new data"
        )
    return old


class Trainer:
    """The components of one worker's training, and its loop. Runs with or without Ray:
    ``report(metrics, state_or_None)`` is how it hands out metrics and checkpoint states."""

    def __init__(
        self, config: JobConfig, device: torch.device, state: dict[str, Any] | None = None,
        allow_config_change: bool = False, state_url: str = "the checkpoint",
        draining: Callable[[], bool] | None = None,
    ) -> None:
        """``draining``: the cluster's notice that a node of the job is being drained (see
        :class:`~rsk_dist.preemption.CheckpointSchedule`). A ``state`` (read from ``state_url``) is
        checked against ``config`` here, wherever the resume happens (see :func:`check_state`)."""
        self.config, self.device = config, device
        c = config
        numerics.configure(c.train.deterministic, c.train.tf32)  # before any CUDA work of the model
        # Frozen: it is in no optimizer, gets no gradient and stays in eval mode (rsk_dist.teacher).
        self.teacher, teacher_dim = None, None
        if c.teacher is not None:
            self.teacher, preprocess = load_teacher(c.teacher, device)
            teacher_dim = check_teacher(c, self.teacher, preprocess)
        torch.manual_seed(c.sampler.seed)  # the same initial weights on every worker
        student = build_model(
            c.model.name, dim=c.model.dim, pooling=c.model.pooling, pretrained=c.model.pretrained,
            in_channels=c.model.in_channels, dropout=c.model.dropout, freeze_bn=c.model.freeze_bn,
            channels_last=c.model.channels_last, compile=c.model.compile, width=c.model.width,
        )
        self.model = with_teacher_map(student, c, teacher_dim).to(device, DTYPE[c.model.dtype])
        clock = Clock(device)  # one for the step's phases and the loss's communication
        self.loss = build_loss(c.loss, clock)
        self.optimizer, self.scheduler = build_optimizer(c.optim, self.model)
        cpus = c.scaling.cpus_per_worker
        dtype = DTYPE[c.model.dtype]
        self.train_data = open_source(c.data.train, c.data, True, c.sampler.seed, c.model.in_channels, device, cpus, dtype)
        self.eval_data = (
            open_source(c.data.eval, c.data, False, 0, c.model.in_channels, device, cpus, dtype) if c.data.eval else None
        )
        # The training data's content (an ingested dataset's fingerprint; None for built-in sources).
        self.dataset = getattr(self.train_data.source, "fingerprint", None)
        self.sampler = ClassBalancedSampler(
            self.train_data.labels, c.sampler.batch_size, c.sampler.samples_per_class, c.sampler.seed, c.sampler.mode
        )
        self.steps_per_epoch = c.train.steps_per_epoch or self.sampler.steps_per_epoch
        scaler = torch.amp.GradScaler(device.type) if c.train.autocast == "fp16" else None
        cache = TeacherCache(len(self.train_data.labels)) if c.teacher is not None and c.teacher.cache_embeddings else None
        self.step = LargeBatchStep(
            self.model, self.loss, c.train.chunk_size, AUTOCAST[c.train.autocast], scaler, self.teacher,
            normalize=self.train_data.normalize, clock=clock, teacher_cache=cache,
        )
        # Progress: epochs done, steps done in the next one and their losses (for its summary).
        self.epoch, self.step_in_epoch, self.losses, self.history, self.best = 0, 0, [], [], -math.inf
        self.schedule = CheckpointSchedule(
            c.run.checkpoint_every, c.run.checkpoint_every_steps, c.train.epochs, device, draining
        )
        # TensorBoard events and training.png beside the checkpoints, written by rank 0 alone
        self.monitor = RunMonitor(c.run.storage_path, c.run.name, enabled=rank_and_world()[0] == 0)
        if state is not None:
            old = check_state(c, state, state_url, self.dataset, allow_config_change)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if old.optim != c.optim:  # only then: recomputing an unchanged LR could differ in the last bit
                apply_optim_config(c.optim, self.optimizer, self.scheduler)
            self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
            self.step_in_epoch, self.losses = state["step"], state.get("losses", [])
            if self.step_in_epoch >= self.steps_per_epoch:
                raise ValueError(
                    f"the checkpoint is at step {self.step_in_epoch} of epoch {self.epoch + 1}, but an epoch now has "
                    f"{self.steps_per_epoch} steps: keep train.steps_per_epoch as it was"
                )
            if scaler is not None and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step_in_epoch,
            "losses": self.losses, "history": self.history, "best": self.best,
            "config": self.config.model_dump(mode="json"), "dataset": self.dataset,
            "grad_scaler": self.step.grad_scaler.state_dict() if self.step.grad_scaler is not None else None,
        }

    def run(self, report) -> None:
        """Trains to the last epoch, from where the state left off. ``report(metrics, state)``
        is called on every worker at each checkpoint (``state`` on rank 0, None elsewhere);
        after a preemption notice, at the checkpoint of that step, then :class:`Preempted` is raised;
        when the cluster starts draining a node, at the checkpoint of that step, and training goes on."""
        c = self.config
        rank, _ = rank_and_world()
        total = c.train.epochs * self.steps_per_epoch
        started = time.perf_counter()
        done_at_start = self.epoch * self.steps_per_epoch + self.step_in_epoch
        while self.epoch < c.train.epochs:
            metrics = self._step(self.step_in_epoch)
            self.losses.append(metrics["loss"])
            self.step_in_epoch += 1
            done = self.epoch * self.steps_per_epoch + self.step_in_epoch
            if rank == 0 and self.step_in_epoch % c.train.log_every == 0:
                rate = (time.perf_counter() - started) / (done - done_at_start)
                print(
                    f"[rsk-dist] epoch {self.epoch + 1}/{c.train.epochs} step {done}/{total} "
                    f"loss {metrics['loss']:.4f} {metrics['images_per_s']:.0f} img/s "
                    f"ETA {duration(rate * (total - done))}", flush=True,
                )
                self.monitor.log_step(done, metrics)
            summary = {**metrics, "epoch": self.epoch, "step": done}
            if self.step_in_epoch == self.steps_per_epoch:
                summary = self._end_epoch()
            preempted, drained = self.schedule.preempted(), self.schedule.drained()
            if drained and rank == 0:
                print(f"[rsk-dist] a node of this job is being drained: checkpointing step {done}; training goes "
                      "on until Ray stops the job and retries it from there", flush=True)
            if preempted or drained or self.schedule.due(self.epoch, self.step_in_epoch):
                report(summary, self.state() if rank == 0 else None)
                self.monitor.sync()
            if preempted:
                raise Preempted(f"stopped by a preemption notice after step {done}, which is checkpointed")
        self.monitor.finish(self.history)

    def _end_epoch(self) -> dict[str, Any]:
        """Steps the schedule, evaluates if due; returns the epoch's summary."""
        c = self.config
        rank, _ = rank_and_world()
        self.scheduler.step()
        self.epoch += 1
        last = self.epoch == c.train.epochs
        # workers: how many ran the epoch's last step (elastic runs change it)
        summary: dict[str, Any] = {"epoch": self.epoch, "step": self.epoch * self.steps_per_epoch,
                                   "loss": sum(self.losses) / len(self.losses), "workers": rank_and_world()[1]}
        self.step_in_epoch, self.losses = 0, []
        if self.eval_data is not None and (self.epoch % c.train.eval_every == 0 or last):
            summary.update(evaluate(self.model, self.eval_data, ks=c.train.eval_k, chunk_size=c.train.chunk_size,
                                    teacher=self.teacher))
            if rank == 0:
                print("[rsk-dist] eval " + " ".join(f"{k} {v:.4f}" for k, v in summary.items() if "@" in k or "precision" in k), flush=True)
            # An asymmetric student is for querying the teacher's gallery: the best is the best at that.
            key = "recall@1" if self.teacher is None else "asymmetric_recall@1"
            if summary[key] > self.best:
                self.best = summary[key]
                if rank == 0:
                    self._publish_best(summary)
        self.history.append(summary)
        self.monitor.log_epoch(summary["step"], summary)
        return summary

    def _publish_best(self, metrics: dict[str, Any]) -> None:
        """The best model by validation Recall@1, at ``<storage_path>/<name>/best``: kept apart
        from the last K checkpoints that resumption uses."""
        state = {"model": self.model.state_dict(), "config": self.config.model_dump(mode="json"),
                 "epoch": self.epoch, "step": 0, "metrics": metrics}
        publish_state(join(self.config.run.storage_path, self.config.run.name, "best"), state)

    def _step(self, s: int) -> dict[str, float]:
        c = self.config
        self.train_data.prefetch_ahead(
            self.sampler, self.epoch, s, self.steps_per_epoch, c.train.epochs * self.steps_per_epoch,
            c.data.prefetch_steps, *rank_and_world(),
        )
        metrics = train_step(self.step, self.optimizer, self.sampler, self.train_data, self.epoch, s)
        # Undecodable images replaced so far (the streaming source counts them; memory has none).
        metrics["bad_samples"] = getattr(self.train_data.source, "bad_samples", 0)
        return metrics


class RayCheckpointReport:
    """``report`` for :meth:`Trainer.run` under Ray Train. Rank 0's state is copied to the CPU
    in the step; writing it (state file, then manifest) into the run directory happens in Ray's
    upload thread when ``run.checkpoint_upload`` is async, so training does not wait for storage.
    At most one copy is in flight: a store slower than the checkpoints slows training down
    instead of filling memory with copies."""

    def __init__(self, mode: str, steps_per_epoch: int, run_url: str, holder: str | None) -> None:
        from ray.train import CheckpointUploadMode

        self.mode = CheckpointUploadMode.ASYNC if mode == "async" else CheckpointUploadMode.SYNC
        self.steps_per_epoch = steps_per_epoch
        self.run_url, self.holder = run_url, holder
        self.written = threading.Event()
        self.written.set()

    def __call__(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        import ray.train

        name = checkpoint_name(metrics["epoch"], metrics["step"] % self.steps_per_epoch)
        if state is None:
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        if self.holder is not None:  # never write into a run another job has taken over
            check_holder(self.run_url, self.holder)
        self.written.wait()
        self.written.clear()
        snapshot = cpu_copy(state)
        # Ray wants a local directory to hand to the upload; ours stays empty (deleted after).
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tempfile.mkdtemp(prefix="rsk-ckpt-")),
            checkpoint_dir_name=name, checkpoint_upload_mode=self.mode,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=lambda _, dir_name: self.write(snapshot, dir_name),
        )

    def write(self, state: dict[str, Any], dir_name: str) -> ray.train.Checkpoint:
        import ray.train

        try:
            storage = ray.train.get_context().get_storage()
            path = storage.build_checkpoint_path_from_name(dir_name)
            write_checkpoint(storage.storage_filesystem, path, state)
            return ray.train.Checkpoint(path, filesystem=storage.storage_filesystem)
        finally:
            self.written.set()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    config = JobConfig.model_validate(loop_config["config"])
    device = ray.train.torch.get_device()
    run_url = join(config.run.storage_path, config.run.name)
    holder = loop_config.get("holder")
    if holder is not None:  # a worker of a job that does not hold the run must not resume from it
        check_holder(run_url, holder)
    # The run's latest verified checkpoint, rather than ray.train.get_checkpoint(): that is the
    # latest Ray registered, and an asynchronous upload can complete (manifest written) just
    # before a driver dies, unregistered. Its manifest makes it as safe to load.
    found = latest_state(run_url, map_location=device)
    if found is None and loop_config.get("resume_from"):
        found = loop_config["resume_from"], load_state(loop_config["resume_from"], map_location=device)
    start, state = found or (None, None)
    trainer = Trainer(
        config, device, state, allow_config_change=loop_config.get("allow_config_change", False),
        state_url=start or "", draining=lambda: ray.train.get_preemption_info() is not None,
    )
    try:
        trainer.run(RayCheckpointReport(config.run.checkpoint_upload, trainer.steps_per_epoch, run_url, holder))
    except Preempted:
        # The step's checkpoint must be committed before this attempt ends and the retry looks for it.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        raise


def load_ground_truth(url: str) -> list[dict]:
    """Revisited Oxford/Paris ground truth from a JSON file (any fsspec URL): a list, or
    ``{"gnd": [...]}``, of ``{"easy": [...], "hard": [...], "junk": [...]}`` with gallery indices
    in the order of the gallery source. revisitop's ``.pkl`` files are not read: a pickle from
    storage can run code; convert once with
    ``python -c "import pickle,json,sys; g=pickle.load(open(sys.argv[1],'rb'))['gnd'];
    json.dump([{k: [int(i) for i in q[k]] for k in ('easy','hard','junk')} for q in g], sys.stdout)" gnd.pkl``."""
    import json

    from rsk_dist.storage import filesystem, redact

    if url.endswith(".pkl"):
        raise ValueError(f"{redact(url)}: pickled ground truth is not loaded (it can run code); convert it to JSON: "
                         "see rsk_dist.train.load_ground_truth")
    fs, path = filesystem(url)
    data = json.loads(fs.cat_file(path))
    gnd = data["gnd"] if isinstance(data, dict) else data
    if not isinstance(gnd, list) or not all(isinstance(q, dict) and {"easy", "hard", "junk"} <= q.keys() for q in gnd):
        raise ValueError(f"{redact(url)}: expected a list of {{'easy', 'hard', 'junk'}} index lists, one per query")
    return gnd


def embed_with_checkpoint(
    model: nn.Module, config: JobConfig, spec: DataSource, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of ``spec`` under a checkpoint's model and data settings
    (test-time transform; ``image_size`` overrides the checkpoint's)."""
    data_config = config.data.model_copy(update={"image_size": image_size or config.data.image_size})
    device = next(model.parameters()).device
    source = open_source(spec, data_config, train=False, in_channels=config.model.in_channels, device=device)
    return embed_source(model, source, chunk_size=config.train.chunk_size)


def evaluate_checkpoint(
    checkpoint_url: str,
    data: DataSource,
    image_size: int | None = None,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    protocol: str = "all",
    queries: DataSource | None = None,
    ground_truth: str | None = None,
    gallery_model: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Retrieval metrics of a checkpoint's model on ``data``, on this machine's ``device``. ``protocol``:
    ``all`` (every image queries all others), ``vehicleid`` (one image per identity is the
    gallery, the rest query it) or ``revisited`` (``queries`` against the ``data`` gallery,
    medium/hard mAP from ``ground_truth``). ``gallery_model``: a teacher's checkpoint or export, whose
    embeddings are the gallery of asymmetric retrieval (protocol ``all``): metrics in the three
    settings of :func:`rsk_dist.evaluate.three_settings`, each model with its own preprocessing."""
    model, config = load_model(checkpoint_url)
    model.to(device)

    def embed(spec: DataSource) -> tuple[torch.Tensor, torch.Tensor]:
        return embed_with_checkpoint(model, config, spec, image_size)

    if gallery_model is not None:
        if protocol != "all":
            raise ValueError(f"--gallery-model evaluates with protocol all, not {protocol!r}")
        from rsk_dist.index import EmbeddingModel

        student_emb, labels = embed(data)
        gallery = EmbeddingModel(gallery_model, device, image_size).embed([data]).vectors
        return three_settings(student_emb, torch.from_numpy(gallery).to(student_emb.device), labels, ks)
    if protocol == "all":
        return retrieval_metrics(*embed(data), ks=ks)
    if protocol == "vehicleid":
        # A fixed generator: the same gallery draw for every checkpoint compared.
        return vehicleid_metrics(*embed(data), ks=ks, generator=torch.Generator().manual_seed(0))
    if protocol == "revisited":
        if queries is None or ground_truth is None:
            raise ValueError("the revisited protocol needs a query source and a ground-truth file")
        gnd = load_ground_truth(ground_truth)
        return revisited_map(embed(queries)[0], embed(data)[0], gnd)
    raise ValueError(f"unknown protocol {protocol!r}: use all, vehicleid or revisited")


def _preemptible_torch_config(backend: str):
    """Ray's TorchConfig whose workers also take SIGTERM as a preemption notice: the handler
    must be installed on each worker's main thread, where Ray runs its setup, not its training.

    Ray 2.60's public preemption route (``ray.train.get_preemption_info`` with
    ``FailureConfig.max_preemption_failures``) only covers nodes Ray itself drains, which
    :class:`Trainer` reacts to. It cannot replace this private subclass: a SIGTERM sent from outside
    Ray (a Kubernetes pod deletion, ``docker stop``) never becomes a drain, and no public hook runs
    code on each worker's main thread, where alone a signal handler can be installed (the training
    function runs on another thread; ``worker_process_setup_hook`` is taken from ``ray.init``'s
    job-wide runtime_env only, not from ``RunConfig.worker_runtime_env``, and would then run in
    every worker process of the job)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    from rsk_dist.preemption import install_sigterm_handler

    class PreemptibleBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            super().on_start(worker_group, backend_config)
            worker_group.execute(install_sigterm_handler)

    class PreemptibleTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return PreemptibleBackend

    return PreemptibleTorchConfig(backend=backend)


def check_resume(
    config: JobConfig, resume_from: str | None, allow_config_change: bool = False, fingerprint: str | None = None
) -> str | None:
    """The checkpoint a run starts from (the run's latest that verifies, else ``resume_from``),
    checked against ``config`` and the training data's ``fingerprint``; raises before any worker
    starts when it cannot be used."""
    found = latest_state(join(config.run.storage_path, config.run.name))
    latest = found[0] if found else None
    if latest and resume_from:
        raise CheckpointError(
            f"run {config.run.name!r} in {config.run.storage_path} already has checkpoints (latest: {latest}); "
            f"a re-run resumes from them, so resume-from {resume_from} would be ignored: drop it, or set "
            "another run.name to start a new run from that checkpoint"
        )
    if found is None and resume_from is None:
        return None
    start, state = found or (resume_from, load_state(resume_from))
    check_state(config, state, start, fingerprint, allow_config_change)
    return start


def start_ray(address: str | None) -> None:
    """Connects to the cluster at ``address``, or, without one, starts a Ray instance of this
    process's own: never one that another process started (``RAY_ADDRESS``, the machine's
    latest ``ray start``), which could go away with that process."""
    import ray

    from rsk_dist.console import install_filters, job_runtime_env, stop_on_sigterm

    install_filters()
    # Without an address, RAY_ADDRESS is not passed on to the new instance's processes either.
    inherited = os.environ.pop("RAY_ADDRESS", None) if address is None else None
    try:
        ray.init(address=address or "local", runtime_env=job_runtime_env(), log_to_driver=True)
    finally:
        if inherited is not None:
            os.environ["RAY_ADDRESS"] = inherited
    if threading.current_thread() is threading.main_thread():
        stop_on_sigterm()


def fit(
    config: JobConfig, address: str | None = None, resume_from: str | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """Runs the job on a Ray cluster (a new local one when ``address`` is None, see
    :func:`start_ray`); returns the last reported metrics and the URL of the last checkpoint.
    Re-running with the same ``run.storage_path`` and ``run.name`` resumes from that run's
    latest checkpoint, with the new config (fields that change the training only with
    ``allow_config_change``)."""
    from rsk_dist.prestart import check_data
    from rsk_dist.storage import preflight

    config = absolutize_paths(config)  # Ray workers run in other directories
    fingerprint = check_data(config)
    resume_from = local_absolute(resume_from) or config.run.resume_from
    preflight(config.run.storage_path, need_index=False, writable=True)
    lease = RunLease(join(config.run.storage_path, config.run.name))
    lease.refuse_if_held()  # "another job runs it" first: its checkpoints would fail the next check
    # Refuses a bad checkpoint or config change before any worker starts (check_data: a teacher that does not fit).
    check_resume(config, resume_from, allow_config_change, fingerprint)
    with lease:
        return _fit(config, address, resume_from, allow_config_change, lease.holder)


def _fit(config: JobConfig, address: str | None, resume_from: str | None, allow_config_change: bool, holder: str) -> dict[str, Any]:
    import pyarrow.fs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rsk_dist.console import TRAIN_LOG_LEVEL
    from rsk_dist.storage import filesystem

    fs, path = filesystem(config.run.storage_path)
    if not ray.is_initialized():
        start_ray(address)
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    low, high = s.worker_range
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "resume_from": resume_from,
                           "allow_config_change": allow_config_change, "holder": holder},
        torch_config=_preemptible_torch_config("nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=low if low == high else (low, high), use_gpu=s.use_gpu, resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=path,
            storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)),
            failure_config=FailureConfig(
                max_failures=config.run.max_failures, max_preemption_failures=config.run.max_preemptions,
                preemption_grace_s=config.run.preemption_grace_s,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    checkpoint = None
    if result.checkpoint is not None:
        # Ray gives a path within the storage filesystem; hand back a URL anyone can open.
        checkpoint = config.run.storage_path.rstrip("/") + result.checkpoint.path[len(path.rstrip("/")):]
    return {**(result.metrics or {}), "checkpoint": checkpoint}
