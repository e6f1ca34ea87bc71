"""``rsk-dist``: train, submit and inspect jobs, evaluate and export checkpoints, ingest data.

::

    rsk-dist validate CONFIG [--set a.b=c ...]
    rsk-dist train    CONFIG [--set a.b=c ...] [--address ADDR] [--resume-from URL] [--allow-config-change]
    rsk-dist submit   CONFIG [--set a.b=c ...] --address http://HEAD:8265 [--no-wait]
    rsk-dist status   JOB_ID --address http://HEAD:8265
    rsk-dist logs     JOB_ID --address http://HEAD:8265 [--follow]
    rsk-dist stop     JOB_ID --address http://HEAD:8265
    rsk-dist eval     CHECKPOINT_URL --data KIND:URL[:SPLIT] [--image-size N] [--k 1 2 4 8]
                      [--protocol all|vehicleid|revisited [--queries KIND:URL[:SPLIT] --ground-truth URL]]
    rsk-dist ingest   SOURCE TARGET_URL --layout {folders,cub200,cars196,sop,inaturalist,vehicleid} [--overwrite]
    rsk-dist gc-dataset URL [--keep-last N]
    rsk-dist export   CHECKPOINT_URL OUT --format {torchscript,onnx}
    rsk-dist export-index CHECKPOINT_URL --data KIND:URL[:SPLIT] OUT

URLs with credentials inside (``s3://KEY:SECRET@bucket``) are refused as arguments and in
configs; every URL printed is redacted.

A config is checked (:func:`rsk_dist.config.load_config`) before anything runs or is submitted.
Errors in what the user gave (a bad config, a missing file, a failed preflight) print one
message to stderr and exit with status 2; a failed job or an unreachable cluster exits with 1.

Credentials never travel with a job: ``submit`` puts no environment variable into the runtime
environment and nothing secret into the entrypoint or metadata. The cluster's own environment
(instance profile / IRSA role, or AWS_* variables set on the nodes from a secret store) gives
the workers their storage access. The only secret the client handles is the Ray token, read
from ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``) and sent as an ``Authorization: Bearer``
header to the job server.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "job.yaml"  # the resolved config's name inside the submitted working dir
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LAYOUTS = ("folders", "cub200", "cars196", "sop", "inaturalist", "vehicleid")


class CLIError(Exception):
    """A problem to report in one message, without a traceback."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _url(value: str) -> str:
    """An argparse type: the URL, refused (with a redacted message) when it embeds credentials."""
    from rsk_dist.storage import refuse_credentials

    try:
        return refuse_credentials(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _redact(text: Any) -> str:
    from rsk_dist.storage import redact

    return redact(text)


def _load(path: str, overrides: Sequence[str] | None):
    from rsk_dist.config import load_config

    return load_config(path, list(overrides or []))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    """Recall@k first, then the other scalar metrics, one per line; and a JSON line."""
    print(title)
    keys = sorted((k for k in metrics if k.startswith("recall@")), key=lambda k: int(k.split("@")[1]))
    keys += [k for k in metrics if k not in keys]
    for key in keys:
        value = metrics[key]
        if isinstance(value, (int, float, str)) or value is None:
            print(f"  {key}: {_format_value(value)}")
    safe = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool)) or v is None}
    print("metrics " + json.dumps(safe, sort_keys=True), flush=True)


def parse_data_spec(spec: str, exclude: Sequence[str] = ()):
    """``KIND:URL[:SPLIT]`` to a :class:`~rsk_dist.config.DataSource`.

    ``shards:s3://bucket/cub200:test``, ``zip:../shared/data/omniglot/x.zip``,
    ``digits:test`` (digits has no URL; ``digits::test`` works too). A trailing ``:WORD`` is
    the split when WORD has no ``/`` (so ``s3://bucket`` keeps its scheme).
    """
    from pydantic import ValidationError

    from rsk_dist.config import ConfigError, DataSource

    kind, sep, rest = spec.partition(":")
    if not sep or not kind:
        raise ConfigError(f"--data {spec!r} is not of the form KIND:URL[:SPLIT] (KIND: shards, zip or digits)")
    url: str | None
    split: str | None = None
    if kind == "digits":
        url, split = None, rest.lstrip(":") or None
    else:
        url = rest
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail and not head.endswith(":"):
            url, split = head, tail  # "s3://b/x:test" splits; "s3://b" ("s3" + "//b") does not
    try:
        return DataSource(kind=kind, url=url, split=split, exclude_classes=tuple(exclude))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"--data {spec!r}: {problems}") from None


def _auth_headers(address: str | None = None) -> dict[str, str]:
    """The job server's token header, when a Ray token is at hand.

    Ray 2.60's job server reads ``Authorization: Bearer <token>`` (or ``X-Ray-Authorization``).
    Its ``JobSubmissionClient`` adds that header by itself only when ``RAY_AUTH_MODE=token`` is set
    on the client too; passing it explicitly makes ``RAY_AUTH_TOKEN`` alone enough (and a header
    given here is never overridden by the client's own token loader). The token comes from
    ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else, for a cluster on
    this machine only (a loopback address), Ray's default ``~/.ray/auth_token``, which a local
    ``ray start`` uses whenever that file exists.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if not path and address and re.match(r"^(https?://)?(127\.|localhost[:/]|localhost$|\[::1\])", address):
            path = str(Path.home() / ".ray" / "auth_token")
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
    if not token:
        return {}
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return {"Authorization": f"Bearer {token}"}


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CLIError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / job server)")
    if "://" not in address:
        address = f"http://{address}"
    return address


def _remote_errors() -> tuple[type[BaseException], ...]:
    """What a failed job-server request raises: a refused token, an unknown job, no server."""
    errors: list[type[BaseException]] = [RuntimeError, ConnectionError]
    for module, name in (("ray.exceptions", "AuthenticationError"), ("requests", "RequestException"),
                         ("aiohttp", "ClientError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _client(args: argparse.Namespace):
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:
        raise CLIError(f"Ray's job submission SDK is not installed ({err}): pip install 'ray[default]'") from None
    address = _address(args)
    try:
        return JobSubmissionClient(address, headers=_auth_headers(address) or None)
    except _remote_errors() as err:
        raise CLIError(f"cannot use the Ray job server at {address}: {_one_paragraph(err)}", code=1) from None


def _job_call(fn, *a, **kw):
    """A job-server request with its failures (unknown job, refused token) as one message."""
    try:
        return fn(*a, **kw)
    except _remote_errors() as err:
        raise CLIError(_one_paragraph(err), code=1) from None


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from rsk_dist.config import dump_config

    config = _load(args.config, args.set)
    sys.stdout.write(dump_config(config))
    low, high = config.scaling.worker_range
    batch = config.sampler.batch_size
    workers = str(low) if low == high else f"{low} to {high}"
    print(
        f"ok: {args.config} is a valid job config ({workers} worker(s), global batch {batch}, "
        f"{batch // high} to {-(-batch // low)} per worker)",
        file=sys.stderr,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args.config, args.set)
    from rsk_dist.train import fit

    started = time.perf_counter()
    metrics = fit(config, address=args.address, resume_from=args.resume_from, allow_config_change=args.allow_config_change)
    _print_metrics(dict(metrics or {}), f"finished {config.run.name} in {time.perf_counter() - started:.0f}s:")
    return 0


def build_submission(config, overrides: Sequence[str], workdir: Path) -> tuple[str, dict[str, Any]]:
    """Writes the resolved config into ``workdir``; returns the entrypoint and runtime env.

    The package travels as a ``py_module`` (so the cluster runs this checkout's code even where
    its image has an older one), the config in the ``working_dir``. No ``env_vars``: credentials
    come from the cluster's environment, never from the submitting machine.
    """
    from rsk_dist.config import dump_config

    (workdir / CONFIG_NAME).write_text(dump_config(config))
    # The module, not the rsk-dist console script: py_modules ships the package but no scripts.
    parts = ["python", "-m", "rsk_dist.cli", "train", CONFIG_NAME]
    for item in overrides:  # already applied to job.yaml; repeated so the job listing shows them
        parts += ["--set", item]
    entrypoint = " ".join(shlex.quote(p) for p in parts)
    runtime_env = {
        "working_dir": str(workdir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__", "*.pyc"],
    }
    return entrypoint, runtime_env


def _wait(client, job_id: str, follow_logs: bool) -> str:
    if follow_logs:
        _follow(client, job_id)
    while True:
        status = str(_job_call(client.get_job_status, job_id))
        status = status.split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(2)


def _follow(client, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except _remote_errors() as err:
        raise CLIError(f"cannot follow the logs of {job_id}: {_one_paragraph(err)}", code=1) from None


def cmd_submit(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    config = _load(args.config, overrides)  # a bad config stops here: nothing is submitted
    if config.run.storage_path.startswith("file://") or "://" not in config.run.storage_path:
        print(
            f"warning: run.storage_path {config.run.storage_path!r} is a path on the cluster's "
            "nodes (relative ones land in the job's working dir); use s3://... to keep checkpoints",
            file=sys.stderr,
        )
    client = _client(args)
    with tempfile.TemporaryDirectory(prefix="rsk-dist-submit-") as tmp:
        entrypoint, runtime_env = build_submission(config, overrides, Path(tmp))
        job_id = _job_call(
            client.submit_job,
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata={"rsk_dist.run": config.run.name},
        )
    print(job_id, flush=True)
    print(_redact(f"submitted {config.run.name} as {job_id} to {_address(args)}"), file=sys.stderr)
    if args.no_wait:
        return 0
    status = _wait(client, job_id, follow_logs=True)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    info = _job_call(client.get_job_info, args.job_id)
    status = str(info.status).split(".")[-1]
    print(status)
    if info.message:
        print(info.message, file=sys.stderr)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        _follow(client, args.job_id)
    else:
        sys.stdout.write(_job_call(client.get_job_logs, args.job_id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    stopped = _job_call(client.stop_job, args.job_id)
    print(f"stop requested for {args.job_id}" if stopped else f"{args.job_id} was not running")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    data = parse_data_spec(args.data, args.exclude_class)
    from rsk_dist.train import evaluate_checkpoint

    queries = parse_data_spec(args.queries, args.exclude_class) if args.queries else None
    metrics = evaluate_checkpoint(args.checkpoint_url, data=data, image_size=args.image_size, ks=tuple(args.k),
                                  protocol=args.protocol, queries=queries, ground_truth=args.ground_truth)
    _print_metrics(dict(metrics), _redact(f"{args.checkpoint_url} on {args.data}:"))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import dataclasses

    from rsk_dist.ingest import ingest

    kwargs: dict[str, Any] = {"overwrite": args.overwrite}
    if args.shard_mb is not None:
        kwargs["shard_bytes"] = int(args.shard_mb * 2**20)
    if args.threads is not None:
        kwargs["threads"] = args.threads
    if args.default_split is not None:
        kwargs["default_split"] = args.default_split
    result = ingest(args.source, args.target_url, layout=args.layout, **kwargs)
    fields = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    if isinstance(fields, dict):
        for key, value in fields.items():
            print(f"{key}: {value}")
    elif fields is not None:
        print(fields)
    print(_redact(f"ingested {args.source} into {args.target_url} ({args.layout})"), file=sys.stderr)
    return 0


def cmd_gc_dataset(args: argparse.Namespace) -> int:
    from rsk_dist.ingest import gc_dataset

    removed = gc_dataset(args.url, keep_last=args.keep_last)
    for folder in removed:
        print(f"removed {folder}")
    print(_redact(f"{args.url}: removed {len(removed)} replaced version(s), kept the last {args.keep_last}"),
          file=sys.stderr)
    return 0


def _example_input(config, image_size: int | None):
    import torch

    size = image_size or config.data.image_size
    return torch.zeros(2, config.model.in_channels, size, size)


def _open_out(out: str):
    """A writable binary file for a local path or any fsspec URL."""
    if "://" in out and not out.startswith("file://"):
        import fsspec

        return fsspec.open(out, "wb").open()
    path = Path(out.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def cmd_export(args: argparse.Namespace) -> int:
    import io

    import torch

    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
        if missing:
            raise CLIError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript")
    from rsk_dist.checkpoint import load_model

    model, config = load_model(args.checkpoint_url)
    example = _example_input(config, args.image_size)
    buffer = io.BytesIO()
    with torch.no_grad():
        if args.format == "torchscript":
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, buffer)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                torch.onnx.export(
                    model, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False,
                )
                buffer.write(path.read_bytes())
    with _open_out(args.out) as f:
        f.write(buffer.getvalue())
    print(
        f"exported {config.model.name} ({config.model.dim}-d, input N x {example.shape[1]} x "
        f"{example.shape[2]} x {example.shape[3]}) as {args.format} to {_redact(args.out)}"
    )
    return 0


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cmd_export_index(args: argparse.Namespace) -> int:
    if not _importable("faiss"):
        raise CLIError("export-index needs faiss: pip install faiss-cpu (or faiss-gpu-cu12 on CUDA 12 machines)")
    import faiss
    import numpy as np

    from rsk_dist.checkpoint import load_model
    from rsk_dist.train import embed_with_checkpoint

    spec = parse_data_spec(args.data, args.exclude_class)
    model, config = load_model(args.checkpoint_url)
    emb, labels = embed_with_checkpoint(model, config, spec, args.image_size)
    emb = np.ascontiguousarray(emb.cpu().numpy(), dtype=np.float32)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(emb.shape[1]))  # unit vectors: inner product = cosine
    index.add_with_ids(emb, np.arange(len(emb), dtype=np.int64))
    blob = faiss.serialize_index(index)
    with _open_out(args.out) as f:
        f.write(blob.tobytes())
    with _open_out(args.out + ".labels.npy") as f:
        np.save(f, labels.cpu().numpy())
    print(f"indexed {len(emb)} gallery embeddings ({emb.shape[1]}-d, inner product) into {_redact(args.out)}")
    print(f"labels (row i = id i) in {_redact(args.out)}.labels.npy")
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsk-dist",
        description="Distributed Recall@k-surrogate metric learning on Ray Train.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", metavar="CONFIG", help="job config YAML (see jobs/)")
        p.add_argument("--set", action="append", default=[], metavar="a.b=VALUE",
                       help="override a config field (value parsed as YAML); repeatable")

    def with_address(p: argparse.ArgumentParser, required_hint: str) -> None:
        p.add_argument("--address", default=None, type=_url,
                       help=f"{required_hint} (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")

    def with_data(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, metavar="KIND:URL[:SPLIT]", type=_url,
                       help="e.g. shards:s3://bucket/cub200:test, zip:path.zip, digits:test")
        p.add_argument("--exclude-class", action="append", default=[], metavar="NAME",
                       help="leave out a class (or a top folder of classes); repeatable")
        p.add_argument("--image-size", type=int, default=None, metavar="N",
                       help="input size (default: the checkpoint's data.image_size)")

    p = sub.add_parser("validate", help="validate a config and print it resolved")
    with_config(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="run a training job (a local Ray instance without --address)")
    with_config(p)
    p.add_argument("--address", default=None, type=_url, help="Ray cluster address (ray://..., HOST:6379 or 'auto')")
    p.add_argument("--resume-from", default=None, metavar="URL", type=_url,
                   help="checkpoint URL to start a new run from (a run with checkpoints resumes from its own)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though model, loss, data, sampler or optim fields differ from the checkpoint's")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="submit a training job to a Ray cluster's job server")
    with_config(p)
    with_address(p, "job server, http://HEAD:8265")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.set_defaults(func=cmd_submit)

    for name, help_, func in (
        ("status", "a submitted job's status", cmd_status),
        ("logs", "a submitted job's logs", cmd_logs),
        ("stop", "stop a submitted job", cmd_stop),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id", metavar="JOB_ID")
        with_address(p, "job server, http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="retrieval metrics of a checkpoint on a data set")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=_url)
    with_data(p)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K", help="Recall@k values")
    p.add_argument("--protocol", choices=["all", "vehicleid", "revisited"], default="all",
                   help="all: every image queries the others; vehicleid: one gallery image per identity; "
                        "revisited: --queries against the --data gallery, Revisited Oxford/Paris mAP")
    p.add_argument("--queries", metavar="KIND:URL[:SPLIT]", type=_url, help="query images for --protocol revisited")
    p.add_argument("--ground-truth", metavar="URL", type=_url, help="ground-truth JSON for --protocol revisited")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ingest", help="write a data set as shards plus index to any fsspec URL")
    p.add_argument("source", metavar="SOURCE", type=_url, help="the data set's folder or archive")
    p.add_argument("target_url", metavar="TARGET_URL", type=_url, help="e.g. s3://bucket/cub200")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--shard-mb", type=float, default=None, metavar="MB", help="target shard size (default 64)")
    p.add_argument("--threads", type=int, default=None, help="parallel uploads")
    p.add_argument("--default-split", default=None, metavar="SPLIT",
                   help="split of images the layout does not assign one (default train)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different ingest at TARGET_URL: the new version is written beside "
                        "the old one, which jobs already running keep reading (see gc-dataset)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("gc-dataset", help="delete the shards of replaced ingests of a dataset")
    p.add_argument("url", metavar="URL", type=_url, help="the dataset, e.g. s3://bucket/cub200")
    p.add_argument("--keep-last", type=int, default=1, metavar="N",
                   help="versions to keep, the current one included (default 1). Old versions are "
                        "read by jobs started before the overwrite: run this once those ended")
    p.set_defaults(func=cmd_gc_dataset)

    p = sub.add_parser("export", help="export a checkpoint's embedding model")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=_url)
    p.add_argument("out", metavar="OUT", type=_url, help="output file (local path or fsspec URL)")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="example input size for tracing (default: the checkpoint's data.image_size)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-index", help="a faiss index of a gallery's embeddings")
    p.add_argument("checkpoint_url", metavar="CHECKPOINT_URL", type=_url)
    with_data(p)
    p.add_argument("out", metavar="OUT", type=_url, help="output index file (local path or fsspec URL)")
    p.set_defaults(func=cmd_export_index)
    return parser


def _one_paragraph(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rsk_dist.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"rsk-dist {args.command}: error: {_redact(_one_paragraph(err))}", file=sys.stderr)
        return err.code
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"rsk-dist {args.command}: error: {_redact(_one_paragraph(err))}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"rsk-dist {args.command}: error: a required module is missing: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rsk-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
