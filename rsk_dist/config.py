"""Job configuration: typed models loaded from YAML, with ``a.b=c`` overrides.

Every section forbids unknown keys, so a misspelt key fails with its dotted path before any
worker starts. Credentials are never fields: storage reads them from the environment (AWS_*
variables or profiles), and a URL with credentials inside (``s3://KEY:SECRET@bucket``) is
refused, so no saved config or checkpoint can carry a secret.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from rsk_dist.models import MODEL_NAMES
from rsk_dist.sampler import SamplerMode
from rsk_dist.storage.credentials import redact, refuse_credentials
from rsk_dist.teacher import check_dims

Url = Annotated[str, AfterValidator(refuse_credentials)]  # any fsspec URL or local path


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: Literal[MODEL_NAMES] = "small_cnn"  # type: ignore[valid-type]
    dim: int = Field(512, ge=2)
    pooling: Literal["avg", "gem", "cls"] | None = None
    pretrained: bool | str = False  # True: torchvision's download; a path: a local state dict
    in_channels: int = Field(3, ge=1)
    width: int | None = Field(None, ge=8)  # small_cnn's channels (None: 64); a multiple of 8 (GroupNorm)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    freeze_bn: bool = True
    compile: bool = False  # torch.compile the backbone (first steps slower while it compiles)
    channels_last: bool = False  # NHWC weights and images: faster convolutions under autocast
    # float64: weights and images in double precision, for exactness checks (tests); slower
    dtype: Literal["float32", "float64"] = "float32"


class LossConfig(Section):
    # regression: onto a teacher's embedding of the same image (asymmetric only)
    name: Literal["rsk", "contrastive", "multi_similarity", "regression"] = "rsk"
    k: tuple[int, ...] = (1, 2, 4, 8, 16)
    # At least 1e-4: the loss scales similarity differences (up to 2) by 1/tau, which must stay
    # finite in float16 (max 65504) under autocast; the paper's values are 1 and 0.01.
    tau1: float = Field(1.0, ge=1e-4, allow_inf_nan=False)
    tau2: float = Field(0.01, ge=1e-4, allow_inf_nan=False)
    simix: bool = False
    rank_includes_query: bool = False
    chunk_size: int | None = Field(None, ge=1)  # queries per loss chunk; None: from a memory budget
    mode: Literal["replicated", "sharded"] = "replicated"  # how workers share the global loss
    # RS@k's matmuls in TF32 on CUDA (Ampere+): faster, similarities off by ~1e-3, which tau2 = 0.01
    # magnifies 100x. Off: full float32, whatever torch's global matmul precision.
    tf32: bool = False
    options: dict[str, float | int | bool | str] = {}  # keyword arguments of a baseline loss
    # Asymmetric: the student's embeddings query the teacher's embeddings of the batch (needs a
    # teacher section); the query's own teacher embedding is a positive unless self_positive is off.
    asymmetric: bool = False
    asymmetric_self_positive: bool = True

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.name == "regression" and not self.asymmetric:
            raise ValueError("loss.name regression regresses onto a teacher: set loss.asymmetric: true and a teacher section")
        if self.asymmetric and self.rank_includes_query:
            raise ValueError("loss.rank_includes_query is for symmetric RS@k; asymmetric RS@k uses asymmetric_self_positive")
        if self.name != "rsk" and (self.simix or self.mode == "sharded"):
            raise ValueError("simix and mode='sharded' are RS@k features: set loss.name: rsk")
        if self.name == "rsk" and self.options:
            raise ValueError("loss.options are for baseline losses; RS@k takes k, tau1, tau2, simix")
        if not self.k or min(self.k) < 1:
            raise ValueError(f"loss.k must be positive integers, got {self.k}")
        return self


class DataSource(Section):
    """Where images come from: ``shards`` (an ingested dataset at any fsspec URL), ``zip``
    (an image-folder zip, class = its two top folders), or ``digits`` (scikit-learn's, no
    download; ``split`` train/test, two thirds/one third per class)."""

    kind: Literal["shards", "zip", "digits"]
    url: Url | None = None
    split: str | None = None
    exclude_classes: tuple[str, ...] = ()  # e.g. classes that also occur in the training data

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if self.kind != "digits" and not self.url:
            raise ValueError(f"a {self.kind!r} data source needs a url")
        if self.kind == "digits" and self.split not in ("train", "test"):
            raise ValueError("the digits source needs split: train or split: test")
        if self.kind == "digits" and self.exclude_classes:
            raise ValueError("exclude_classes applies to shards and zip sources; the digits source keeps its 10 classes")
        return self


class DataConfig(Section):
    train: DataSource
    eval: DataSource | None = None
    image_size: int = Field(28, ge=8)
    augment: bool = True
    on_bad_sample: Literal["skip", "fail"] = "skip"
    prefetch_steps: int = Field(2, ge=0)
    read_concurrency: int = Field(64, ge=1)  # ranged reads in flight per worker (and S3 connections)
    # Samples of a shard this close are read by one request: a request costs the worker about
    # 2 ms of CPU (measured: docs/benchmarks.md) and waits a time to first byte in which the
    # store could have sent about 1 MB more.
    merge_gap: int = Field(1 << 20, ge=0)
    decoders: int | None = Field(None, ge=1)  # decoder processes per worker; None: scaling.cpus_per_worker
    draft: bool = False  # JPEGs decoded at reduced size where the crop allows: faster, pixels differ
    cache_dir: str | None = None
    cache_max_bytes: int | None = Field(None, ge=0)  # shards kept in cache_dir; None: no limit
    # Seconds a batch's reads from the store may take in all, and a decoder process one chunk of
    # images, before a clear error (a stopped decoder is killed and started again first).
    read_deadline_s: float = Field(300.0, gt=0, allow_inf_nan=False)
    decode_deadline_s: float = Field(120.0, gt=0, allow_inf_nan=False)


# Seeds seed torch's generators (at most 2**64 - 1) and numpy's SeedSequence (no negatives).
MAX_SEED = 2**63 - 1
# Global batches beyond this many images are a typo (1e20), not a job: refused before they fail in a worker.
MAX_BATCH = 1 << 20


class SamplerConfig(Section):
    batch_size: int = Field(ge=2, le=MAX_BATCH)
    samples_per_class: int = Field(4, ge=2, le=MAX_BATCH)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # epoch: every image once per epoch, m at a time per class (the paper's epochs);
    # uniform: B/m classes drawn uniformly at every step (see rsk_dist.sampler)
    mode: SamplerMode = "epoch"

    @model_validator(mode="after")
    def _check(self) -> SamplerConfig:
        if self.batch_size % self.samples_per_class:
            raise ValueError(
                f"sampler.batch_size {self.batch_size} is not a multiple of samples_per_class "
                f"{self.samples_per_class}"
            )
        return self


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(4e-4, ge=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, allow_inf_nan=False)  # sgd only
    lr_steps: tuple[int, ...] = ()  # epochs at which the LR is multiplied by lr_gamma
    lr_gamma: float = Field(0.3, gt=0, allow_inf_nan=False)


class TrainConfig(Section):
    epochs: int = Field(1, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the data
    chunk_size: int = Field(128, ge=1)  # images per forward chunk of the two-pass step
    autocast: Literal["none", "bf16", "fp16"] = "none"
    eval_every: int = Field(1, ge=1)  # epochs
    eval_k: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 2, 4, 8), min_length=1)
    log_every: int = Field(1, ge=1)  # steps
    # The model's float32 convolutions and matmuls in TF32 on CUDA (Ampere+). Off (unlike torch's
    # default for cuDNN): autocast none computes in float32.
    tf32: bool = False
    # Deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS workspace :4096:8,
    # cuDNN deterministic, no autotuning): CUDA runs repeat bit for bit on one machine, slower.
    # CPU runs are deterministic either way.
    deterministic: bool = False


class ScalingConfig(Section):
    # An int, or [min, max]: elastic, Ray Train runs on as many workers in that range as it can
    # get and restarts from the latest checkpoint on the workers that remain when one is lost.
    # The global batch does not depend on the worker count, so neither does the training.
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # With use_gpu, exactly 1: NCCL needs one whole GPU per rank (see _check).
    gpus_per_worker: float = Field(1, ge=0)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed count."""
        w = self.num_workers
        return (w, w) if isinstance(w, int) else w

    @model_validator(mode="after")
    def _check(self) -> ScalingConfig:
        low, high = self.worker_range
        if not 1 <= low <= high:
            raise ValueError(f"scaling.num_workers must be >= 1, or [min, max] with 1 <= min <= max; got {self.num_workers}")
        # Caught here, not at the first collective after the cluster is up: a fraction puts two
        # ranks on one GPU (NCCL: "Duplicate GPU detected"), 0 hands CPU tensors to NCCL, and
        # more than 1 leaves GPUs idle (a worker uses one device).
        if self.use_gpu and self.gpus_per_worker != 1:
            raise ValueError(
                f"scaling.gpus_per_worker must be 1 with scaling.use_gpu (one whole GPU per worker), got "
                f"{self.gpus_per_worker:g}: set scaling.gpus_per_worker=1 and choose scaling.num_workers as the GPU count"
            )
        return self


class RunConfig(Section):
    name: str = Field("rsk-run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage_path: Url = "file://./runs"  # any fsspec URL: s3://bucket/prefix, gs://..., file://...
    checkpoint_every: int = Field(1, ge=1)  # epochs
    # Also within an epoch, every this many steps (None: at epoch ends only). A resume repeats
    # at most this many steps.
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # async: a copy of the state is taken in the step and written and uploaded in the background
    checkpoint_upload: Literal["async", "sync"] = "async"
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)  # -1: retry forever
    # Retries after Ray drained a node of the job (a preemption it was told of), counted apart
    # from max_failures; -1: retry forever. A SIGTERM notice counts as a failure.
    max_preemptions: int = Field(-1, ge=-1)
    # How long the other workers may run on past a drained node's deadline (to finish a checkpoint).
    preemption_grace_s: float = Field(0, ge=0)
    resume_from: Url | None = None  # a checkpoint URL to start from


class TeacherConfig(Section):
    """The frozen teacher of an asymmetric loss: an rsk_dist ``checkpoint`` (any URL; its model),
    an ``export`` (a TorchScript file of ``rsk-dist export``, its ``.preprocess.json`` beside it),
    or a ``model`` built here, a torchvision backbone whose ``pretrained`` is a local state-dict
    file (its head then a fixed random projection, the same on every worker). ``map: linear``
    declares a learned linear map from the student's ``model.dim`` into the teacher's space
    (needed when the dims differ). ``cache_embeddings`` embeds each sample with the teacher once
    (its view must not be augmented: ``data.augment: false``)."""

    checkpoint: Url | None = None
    export: Url | None = None
    model: ModelConfig | None = None
    map: Literal["none", "linear"] = "none"
    cache_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if sum(x is not None for x in (self.checkpoint, self.export, self.model)) != 1:
            raise ValueError("a teacher is a checkpoint, an export or a model: exactly one of them")
        if self.model is not None and not isinstance(self.model.pretrained, str):
            raise ValueError("teacher.model.pretrained must be a local state-dict file: a teacher is trained already")
        return self


class JobConfig(Section):
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig | None = None
    loss: LossConfig = LossConfig()
    data: DataConfig
    sampler: SamplerConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check_teacher(self) -> JobConfig:
        t = self.teacher
        if self.loss.asymmetric != (t is not None):
            raise ValueError(
                "loss.asymmetric: true needs a teacher section (teacher.checkpoint, teacher.export or teacher.model)"
                if self.loss.asymmetric else "a teacher is used by asymmetric losses only: set loss.asymmetric: true"
            )
        if t is None:
            return self
        if t.model is not None:
            if t.map != "linear":
                check_dims(t.model.dim, self.model.dim)
            if t.model.in_channels != self.model.in_channels:
                raise ValueError(f"the teacher reads {t.model.in_channels}-channel images but model.in_channels is {self.model.in_channels}")
        if self.model.dtype != "float32":
            raise ValueError("model.dtype float64 (for exactness checks) is not supported with a teacher: use float32")
        if t.cache_embeddings and self.data.augment:
            raise ValueError(
                "teacher.cache_embeddings keeps one teacher embedding per sample, which holds only when the teacher sees "
                "each sample the same way every time: set data.augment: false, or cache_embeddings: false"
            )
        return self


# What a resumed run may not change without --allow-config-change: the fields that change the
# training's maths. Epochs, evaluation, logging, scaling, checkpointing and the data's
# performance settings (how data is read and decoded, compilation, memory layout) apply on resume.
MATHS_SECTIONS = ("model", "teacher", "loss", "data", "sampler", "optim")
MATHS_FIELDS = ("train.steps_per_epoch", "train.autocast", "train.tf32")
NOT_MATHS = (
    "data.eval", "data.prefetch_steps", "data.cache_dir", "data.cache_max_bytes", "data.read_concurrency", "data.merge_gap",
    "data.decoders", "model.compile", "model.channels_last", "teacher.cache_embeddings",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}" if prefix else key).items()}


def maths_changes(old: JobConfig, new: JobConfig) -> list[str]:
    """Dotted names of the fields that change the training and differ between two configs."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))

    def maths(name: str) -> bool:
        return (name.split(".")[0] in MATHS_SECTIONS or name in MATHS_FIELDS) and not name.startswith(NOT_MATHS)

    return sorted(n for n in a.keys() | b.keys() if maths(n) and a.get(n) != b.get(n))


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the problem."""


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=c`` strings to (path, value) with the value parsed as YAML (numbers, lists...)."""
    parsed = []
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"override {item!r} is not of the form a.b=value")
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError, RecursionError) as err:
            raise ConfigError(f"override {path.strip()}: the value is not valid YAML: {redact(err)}") from None
        parsed.append((path.strip(), value))
    return parsed


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check its spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> JobConfig:
    """A validated :class:`JobConfig` from a YAML path (or a dict) plus ``a.b=c`` overrides."""
    if isinstance(source, dict):
        # Overrides write into nested sections: never into the caller's.
        tree, name = copy.deepcopy(source), "(dict)"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"job config {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # the constructors raise ValueError
            raise ConfigError(f"job config {path} is not valid YAML: {redact(err)}") from None
        name = str(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"job config {name} must be a mapping of sections")
    for dotted, value in parse_overrides(overrides or []):
        _set_path(tree, dotted, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format(err, name)) from None


def local_absolute(url: str | None) -> str | None:
    """A relative local path (``x``, ``./x``, ``file://./x``) made absolute against the current
    directory: Ray workers run elsewhere, so relative paths must not reach them."""
    if not url:
        return url
    if url.startswith("file://"):
        rest = url[len("file://"):]
        return url if rest.startswith("/") else "file://" + os.path.abspath(rest)
    if "://" in url or url.startswith("/"):
        return url
    return os.path.abspath(os.path.expanduser(url))


def absolutize_paths(config: JobConfig) -> JobConfig:
    """The config with its local data, storage, resume, state-dict and teacher paths absolute (see :func:`local_absolute`)."""
    data = config.data
    sources = {
        name: spec.model_copy(update={"url": local_absolute(spec.url)})
        for name in ("train", "eval")
        if (spec := getattr(data, name)) is not None and spec.url
    }
    run = config.run.model_copy(update={
        "storage_path": local_absolute(config.run.storage_path), "resume_from": local_absolute(config.run.resume_from),
    })
    updates = {"run": run}
    if sources or data.cache_dir:
        updates["data"] = data.model_copy(update={**sources, "cache_dir": local_absolute(data.cache_dir)})
    if isinstance(config.model.pretrained, str):
        updates["model"] = config.model.model_copy(update={"pretrained": local_absolute(config.model.pretrained)})
    if (t := config.teacher) is not None:
        backbone = t.model and t.model.model_copy(update={"pretrained": local_absolute(t.model.pretrained)})
        updates["teacher"] = t.model_copy(update={
            "checkpoint": local_absolute(t.checkpoint), "export": local_absolute(t.export), "model": backbone,
        })
    return config.model_copy(update=updates)


def dump_config(config: JobConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
