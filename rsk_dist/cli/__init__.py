"""``rsk-dist``: train, submit and inspect jobs, evaluate and export checkpoints, ingest data.

::

    rsk-dist validate CONFIG [--set a.b=c ...]
    rsk-dist train    CONFIG [--set a.b=c ...] [--address ADDR] [--resume-from URL] [--allow-config-change]
    rsk-dist submit   CONFIG [--set a.b=c ...] --address http://HEAD:8265 [--no-wait]
    rsk-dist status   JOB_ID --address http://HEAD:8265
    rsk-dist logs     JOB_ID --address http://HEAD:8265 [--follow]
    rsk-dist stop     JOB_ID --address http://HEAD:8265
    rsk-dist eval     CHECKPOINT_URL --data KIND:URL[:SPLIT] [--image-size N] [--k 1 2 4 8] [--device D]
                      [--protocol all|vehicleid|revisited [--queries KIND:URL[:SPLIT] --ground-truth URL]]
    rsk-dist ingest   SOURCE TARGET_URL --layout {folders,cub200,cars196,sop,inaturalist,vehicleid} [--overwrite]
    rsk-dist gc-dataset URL [--keep-last N]
    rsk-dist export   CHECKPOINT_URL OUT --format {torchscript,onnx}
    rsk-dist export-index CHECKPOINT_OR_EXPORT --data KIND:URL[:SPLIT] OUT [--device D]
    rsk-dist embed    CHECKPOINT_OR_EXPORT IMAGES... --out FILE.npz [--device D]
    rsk-dist search   INDEX QUERY_IMAGES... [--k K] [--model CHECKPOINT_OR_EXPORT] [--json] [--device D]

URLs with credentials inside (``s3://KEY:SECRET@bucket``) are refused as arguments and in
configs; every URL printed is redacted.

A config is checked (:func:`rsk_dist.config.load_config`) before anything runs or is submitted.
Errors in what the user gave (a bad config, a missing file, a failed preflight) print one
message to stderr and exit with status 2; a failed job or an unreachable cluster exits with 1.

One module per command group: :mod:`~rsk_dist.cli.jobs` (validate, train, submit, status, logs,
stop), :mod:`~rsk_dist.cli.data` (ingest, gc-dataset), :mod:`~rsk_dist.cli.model` (eval, export,
export-index, embed, search), on the shared pieces of :mod:`~rsk_dist.cli.common`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from rsk_dist.cli import data, jobs, model
from rsk_dist.cli.common import CLIError, one_paragraph, parse_data_spec, redact
from rsk_dist.cli.jobs import build_submission

__all__ = ["CLIError", "build_parser", "build_submission", "main", "parse_data_spec"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsk-dist",
        description="Distributed Recall@k-surrogate metric learning on Ray Train.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (jobs, model, data):
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rsk_dist.config import ConfigError
    from rsk_dist.console import Terminated

    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"rsk-dist {args.command}: error: {redact(one_paragraph(err))}", file=sys.stderr)
        return err.code
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"rsk-dist {args.command}: error: {redact(one_paragraph(err))}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"rsk-dist {args.command}: error: a required module is missing: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rsk-dist {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # its handler has said so
        return 143
    except BrokenPipeError:
        # The reader went away (``rsk-dist search ... | head``): end quietly, as Unix tools do.
        # stdout is pointed at /dev/null so that the interpreter's own flush at exit finds no pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
