"""Job commands: ``validate`` and ``train`` a config here, or ``submit`` it to a cluster's job
server and follow it with ``status``, ``logs`` and ``stop``.

Credentials never travel with a job: ``submit`` puts no environment variable into the runtime
environment and nothing secret into the entrypoint or metadata. The cluster's own environment
(instance profile / IRSA role, or AWS_* variables set on the nodes from a secret store) gives
the workers their storage access. The only secret the client handles is the Ray token, read
from ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``) and sent as an ``Authorization: Bearer``
header to the job server.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from rsk_dist.cli.common import CLIError, load, one_paragraph, print_metrics, redact, url_arg, with_config

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIG_NAME = "job.yaml"  # the resolved config's name inside the submitted working dir
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


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
        if not path and address and _on_this_machine(address):
            path = str(Path.home() / ".ray" / "auth_token")
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
    if not token:
        return {}
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return {"Authorization": f"Bearer {token}"}


def _on_this_machine(address: str) -> bool:
    """Whether a cluster address is a loopback one: the cluster runs on this machine."""
    return re.match(r"^(https?://)?(127\.|localhost[:/]|localhost$|\[::1\])", address) is not None


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
        raise CLIError(f"cannot use the Ray job server at {address}: {one_paragraph(err)}", code=1) from None


def _job_call(fn, *a, **kw):
    """A job-server request with its failures (unknown job, refused token) as one message."""
    try:
        return fn(*a, **kw)
    except _remote_errors() as err:
        raise CLIError(one_paragraph(err), code=1) from None



def cmd_validate(args: argparse.Namespace) -> int:
    from rsk_dist.config import absolutize_paths, dump_config
    from rsk_dist.prestart import check_data

    config = load(args.config, args.set)
    check_data(absolutize_paths(config))  # what train checks before any worker starts
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


def finished_run(config) -> str | None:
    """The latest checkpoint of the config's run when it has trained all ``train.epochs``."""
    from rsk_dist.checkpoint import latest_checkpoint
    from rsk_dist.storage import join

    latest = latest_checkpoint(join(config.run.storage_path, config.run.name))
    done = re.fullmatch(r"checkpoint_epoch_(\d+)", latest.rstrip("/").rsplit("/", 1)[-1]) if latest else None
    return latest if done and int(done.group(1)) >= config.train.epochs else None


def cmd_train(args: argparse.Namespace) -> int:
    from rsk_dist.config import absolutize_paths

    config = absolutize_paths(load(args.config, args.set))
    latest = finished_run(config)
    if latest is not None:
        run = f"{config.run.storage_path.rstrip('/')}/{config.run.name}"
        print(redact(
            f"run {config.run.name} has already finished: its {config.train.epochs} epoch(s) are done, nothing "
            f"to train.\nResults in {run}/: best/ (the best model by Recall@1), training.png, tensorboard/, and "
            f"the last checkpoint {latest}.\nTo train further: more epochs of this run with --set "
            f"train.epochs=N (N > {config.train.epochs}), or a new run with --set run.name=NEW_NAME."
        ))
        return 0
    from rsk_dist.console import quiet_driver

    quiet_driver()
    from rsk_dist.train import fit

    started = time.perf_counter()
    metrics = fit(config, address=args.address, resume_from=args.resume_from, allow_config_change=args.allow_config_change)
    print_metrics(dict(metrics or {}), f"finished {config.run.name} in {time.perf_counter() - started:.0f}s:")
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
    # --address auto: the cluster the job runs on (its driver's RAY_ADDRESS), not a new instance.
    parts = ["python", "-m", "rsk_dist.cli", "train", CONFIG_NAME, "--address", "auto"]
    for item in overrides:  # already applied to job.yaml; repeated so the job listing shows them
        parts += ["--set", item]
    entrypoint = " ".join(shlex.quote(p) for p in parts)
    runtime_env = {
        "working_dir": str(workdir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__", "*.pyc"],
    }
    return entrypoint, runtime_env


def _local_paths(config) -> list[tuple[str, str]]:
    """(field, value) of every data and storage location in ``config`` that is a path on this
    machine (relative, absolute or ``file://``) rather than a URL every node can open."""
    fields = [(f"data.{name}.url", spec.url) for name in ("train", "eval")
              if (spec := getattr(config.data, name)) is not None and spec.url]
    fields += [("run.storage_path", config.run.storage_path), ("run.resume_from", config.run.resume_from)]
    return [(f, v) for f, v in fields if v and ("://" not in v or v.startswith("file://"))]


def _paths_for_cluster(config, address: str, shared_fs: bool):
    """The config as the cluster's nodes must read it: its local paths made absolute when the
    nodes see this machine's files (a cluster on this machine, or ``--shared-fs``); otherwise
    a :class:`CLIError` naming each path that no node could read."""
    from rsk_dist.config import absolutize_paths

    local = _local_paths(config)
    if not local:
        return config
    if shared_fs or _on_this_machine(address):
        absolute = absolutize_paths(config)
        for (field, before), (_, after) in zip(local, _local_paths(absolute)):
            if after != before:
                print(redact(f"{field}: {before} is read on the cluster's nodes as {after}"), file=sys.stderr)
        return absolute
    listed = "; ".join(f"{field} {value!r}" for field, value in local)
    raise CLIError(
        f"{listed}: a path on this machine, which the nodes of the cluster at {address} cannot read "
        "(a relative one would even resolve in the job's temporary working dir, deleted with it). "
        "Put data in object storage (rsk-dist ingest SOURCE s3://BUCKET/NAME --layout ..., then "
        "data.train.url: s3://BUCKET/NAME) and checkpoints too (--set run.storage_path=s3://BUCKET/runs); "
        "or, if every node mounts these paths where this machine does, pass --shared-fs"
    )


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
        raise CLIError(f"cannot follow the logs of {job_id}: {one_paragraph(err)}", code=1) from None


def cmd_submit(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    config = load(args.config, overrides)  # a bad config stops here: nothing is submitted
    config = _paths_for_cluster(config, _address(args), args.shared_fs)
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
    print(redact(f"submitted {config.run.name} as {job_id} to {_address(args)}"), file=sys.stderr)
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    def with_address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None, type=url_arg,
                       help="job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")

    p = sub.add_parser("validate", help="validate a config and print it resolved")
    with_config(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "train", help="run a training job here (a Ray instance of its own without --address)",
        description="Run a training job from this process. Without --address it starts a Ray instance of its "
                    "own, stopped when the job ends: never one that another process started ($RAY_ADDRESS, the "
                    "machine's latest `ray start`). Re-running a run resumes it from its latest checkpoint; a "
                    "finished run (all train.epochs done) says so and trains nothing.",
    )
    with_config(p)
    p.add_argument("--address", default=None, type=url_arg,
                   help="join this Ray cluster instead: HOST:6379, ray://HOST:10001, or 'auto' ($RAY_ADDRESS, "
                        "else the machine's latest `ray start`)")
    p.add_argument("--resume-from", default=None, metavar="URL", type=url_arg,
                   help="checkpoint URL to start a new run from (a run with checkpoints resumes from its own)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though model, loss, data, sampler or optim fields differ from the checkpoint's")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="submit a training job to a Ray cluster's job server")
    with_config(p)
    with_address(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--shared-fs", action="store_true",
                   help="the config's local paths (data, run.storage_path) are on a filesystem every node mounts at "
                        "the same place (default: refused unless the cluster runs on this machine)")
    p.set_defaults(func=cmd_submit)

    for name, help_, func in (
        ("status", "a submitted job's status", cmd_status),
        ("logs", "a submitted job's logs", cmd_logs),
        ("stop", "stop a submitted job", cmd_stop),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id", metavar="JOB_ID",
                       help="the id `submit` printed (raysubmit_...); `ray job list` lists them")
        with_address(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)
